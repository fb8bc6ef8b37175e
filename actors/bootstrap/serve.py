"""Run actors in this process until SIGTERM/SIGINT: one Worker per actor on one bus connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Sequence

from actors.bootstrap.registry import ACTOR_CLASSES, actor_class
from actors.bootstrap.wiring import make_bus, new_embedded_s3, with_embedded_s3
from actors.runtime import metrics
from actors.runtime.settings import Settings
from actors.runtime.worker import Actor, Worker
from bus.base import Bus

log = logging.getLogger("getgoodtape.serve")


def install_stop_signals(stopping: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stopping`` (graceful shutdown) instead of killing the loop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)


@contextlib.asynccontextmanager
async def workers(names: Sequence[str], *, settings: Settings, bus: Bus,
                  stopping: asyncio.Event) -> AsyncIterator[list[Worker]]:
    """Start a Worker per actor name in tasks owned by this block; on exit stop them gracefully."""
    built: list[Worker] = []
    for name in names:
        actor: Actor = actor_class(name)(settings=settings, bus=bus)
        built.append(Worker(actor))
    async with asyncio.TaskGroup() as group:
        for worker in built:
            group.create_task(worker.run(stopping))
        try:
            yield built
        finally:
            stopping.set()


@contextlib.asynccontextmanager
async def embedded_storage(settings: Settings) -> AsyncIterator[Settings]:
    """``settings`` pointed at an embedded S3 started for this block when no endpoint is configured
    (only when every actor shares this process); stopped on exit. moto is imported off the event
    loop, so what already runs on it (the converter's warm-up) keeps going meanwhile."""
    if settings.s3_endpoint:
        yield settings
        return
    embedded = await asyncio.to_thread(new_embedded_s3, bucket=settings.s3_bucket)
    await asyncio.to_thread(embedded.start)
    try:
        yield with_embedded_s3(settings, embedded)
    finally:
        await asyncio.to_thread(embedded.stop)


@contextlib.asynccontextmanager
async def started_bus(settings: Settings, *, name: str = "getgoodtape") -> AsyncIterator[Bus]:
    """The bus of these settings, started; closed on exit."""
    bus = make_bus(settings, name=name)
    await bus.start()
    try:
        yield bus
    finally:
        await bus.close()


@contextlib.asynccontextmanager
async def local_services(settings: Settings, *, name: str = "getgoodtape",
                         embedded_s3: bool = True) -> AsyncIterator[tuple[Settings, Bus]]:
    """The bus, and the embedded S3 when no endpoint is configured and ``embedded_s3`` allows it
    (only when every actor shares this process); both closed on exit."""
    async with contextlib.AsyncExitStack() as stack:
        if embedded_s3:
            settings = await stack.enter_async_context(embedded_storage(settings))
        yield settings, await stack.enter_async_context(started_bus(settings, name=name))


async def serve(names: Sequence[str], settings: Settings) -> None:
    """Run the named actors until a stop signal; the process's main loop for ``getgoodtape run``.

    With every actor here and nothing configured, the in-memory bus and the embedded S3 serve them;
    actors in separate processes need GGT_AMQP_URL and (coordinator, verifier) GGT_S3_ENDPOINT.
    """
    stopping = asyncio.Event()
    install_stop_signals(stopping)
    everything_here = set(names) >= set(ACTOR_CLASSES)
    async with local_services(settings, name="+".join(names), embedded_s3=everything_here) as (settings, bus), \
            metrics.exposed(settings, bus), workers(names, settings=settings, bus=bus, stopping=stopping):
        log.info("actors running", extra={"actors": ",".join(names)})
        await stopping.wait()
        log.info("stop signal: finishing in-flight work", extra={"grace": settings.shutdown_grace})
