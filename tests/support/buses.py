"""Helpers for tests that read queues directly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from bus.auth import signed
from bus.base import Bus, Delivery
from messages.codec import Envelope, decode
from messages.routing import COMMANDS_EXCHANGE
from messages.types import Base

WAIT = 15.0


@contextlib.asynccontextmanager
async def receiving(bus: Bus, actor: str, prefetch: int = 10) -> AsyncIterator[asyncio.Queue[Delivery]]:
    """Deliveries of ``actor``'s queue collected into an asyncio queue by a task owned by this block."""
    got: asyncio.Queue[Delivery] = asyncio.Queue()

    async def pump() -> None:
        async with contextlib.aclosing(bus.deliveries(actor, prefetch=prefetch)) as it:
            async for d in it:
                await got.put(d)

    task = asyncio.create_task(pump())
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish_signed(bus: Bus, *, routing_key: str, body: bytes, envelope: Envelope,
                         exchange: str = COMMANDS_EXCHANGE) -> Envelope:
    """Publish hand-made bytes as the service would: with a MAC of the bus's key."""
    assert bus.keys is not None
    env = signed(bus.keys, envelope, body)
    await bus.publish_raw(exchange=exchange, routing_key=routing_key, body=body, envelope=env)
    return env


async def next_message(got: asyncio.Queue[Delivery], timeout: float = WAIT) -> Base:
    """The next delivery's decoded message (acked)."""
    d = await asyncio.wait_for(got.get(), timeout)
    await d.ack()
    return decode(d.body, type_name_hint=d.envelope.type)


@contextlib.asynccontextmanager
async def running(worker, *, stopping: asyncio.Event | None = None) -> AsyncIterator[asyncio.Event]:
    """Run a Worker in a task owned by this block; stop it (gracefully) on exit."""
    stop = stopping or asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(_ready(worker, task), WAIT)
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def _ready(worker, task: asyncio.Task) -> None:
    ready = asyncio.ensure_future(worker.ready.wait())
    done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()


async def dead_letters_of(bus: Bus, actor: str, *, count: int, timeout: float = WAIT) -> list:
    """Wait until ``actor``'s DLQ holds ``count`` letters; return them (left in the queue)."""
    async with asyncio.timeout(timeout):
        while True:
            batch = await bus.take_dead_letters(actor)
            letters = list(batch.letters)
            await batch.close()
            if len(letters) >= count:
                return letters
            await asyncio.sleep(0.05)  # polls the queue; the broker offers no notification
