"""The in-memory bus: RabbitMQ's semantics in one process, for the zero-config mode and fast tests.

Same topology as the RabbitMQ bus: an actor queue per actor, retry tiers that return a message to
one actor after a delay, a dead-letter queue per actor fed by explicit dead-lettering and by the
delivery limit, events fanned out by topic pattern, reply-to queues, mandatory publishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import AsyncIterator, Sequence

import msgspec

from bus.auth import BusKeys, verify
from bus.base import Bus, DeadLetter, DeadLetterBatch, Delivery, Topology, Unroutable, admit, retry_exchange
from messages.codec import (
    H_ACTOR,
    H_DEAD_LETTERED_AT,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_ORIGIN_EXCHANGE,
    H_ORIGIN_ROUTING_KEY,
    Envelope,
    header_time,
    now,
)
from messages.routing import (
    COMMANDS_EXCHANGE,
    COORDINATOR,
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    REQUESTS_BINDING,
    REQUESTS_EXCHANGE,
    dead_letter_queue,
    queue_name,
    routing_keys_for,
)


class _Stored(msgspec.Struct, kw_only=True):
    body: bytes
    envelope: Envelope
    exchange: str
    routing_key: str
    reply_to: str | None = None
    delivery_count: int = 0


class _Queue:
    """A FIFO with a wake-up for consumers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: deque[_Stored] = deque()
        self.changed = asyncio.Event()

    def put(self, item: _Stored, *, front: bool = False) -> None:
        (self.items.appendleft if front else self.items.append)(item)
        self.changed.set()


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` one word, ``#`` zero or more words."""
    parts = []
    for word in pattern.split("."):
        parts.append({"*": r"[^.]+", "#": r".*"}.get(word, re.escape(word)))
    regex = r"\.".join(parts).replace(r".*\.", r"(?:.*\.)?").replace(r"\..*", r"(?:\..*)?")
    return re.fullmatch(regex, key) is not None


class MemoryDelivery(Delivery):
    """A delivery from the in-memory bus."""

    def __init__(self, bus: MemoryBus, queue: _Queue, stored: _Stored, settled: asyncio.Event) -> None:
        self._bus, self._queue, self._stored, self._settled = bus, queue, stored, settled
        self.body = stored.body
        self.keys = bus.keys
        self.envelope, self.authenticated = admit(stored.envelope, stored.body, exchange=stored.exchange,
                                                  routing_key=stored.routing_key, keys=bus.keys)
        self.exchange = stored.exchange
        self.routing_key = stored.routing_key
        self.delivery_count = stored.delivery_count
        self.reply_to = stored.reply_to

    def _settle(self) -> None:
        if self._settled.is_set():
            raise RuntimeError("delivery already settled")
        self._settled.set()

    async def ack(self) -> None:
        self._settle()

    async def release(self) -> None:
        self._settle()
        self._stored.delivery_count += 1
        self._bus._requeue_or_dead_letter(self._queue, self._stored)

    async def _publish_copy(self, exchange: str, routing_key: str, headers: dict[str, str | int],
                            *, expiration: float | None = None, body: bytes | None = None) -> None:
        envelope = msgspec.structs.replace(self.envelope, headers=headers)
        copy = _Stored(body=self.body if body is None else body, envelope=envelope, exchange=exchange,
                       routing_key=routing_key, reply_to=self.reply_to)
        if exchange.startswith("ggt.retry."):
            self._bus._delay(copy, expiration or 0.0)
        else:
            self._bus._route(copy)

    def _tiers(self) -> Sequence[float]:
        return self._bus.topology.retry_delays


class _MemoryBatch(DeadLetterBatch):
    def __init__(self, queue: _Queue, taken: list[_Stored], letters: list[DeadLetter]) -> None:
        self._queue, self._taken, self.letters = queue, taken, letters
        self._removed: set[int] = set()

    async def remove(self, index: int) -> None:
        self._removed.add(index)

    async def close(self) -> None:
        for index in reversed(range(len(self._taken))):
            if index not in self._removed:
                self._queue.put(self._taken[index], front=True)
        self._taken = []


class MemoryBus(Bus):
    """RabbitMQ's semantics in memory; nothing survives the process."""

    def __init__(self, topology: Topology, *, keys: BusKeys | None = None) -> None:
        self.topology = topology
        #: made up per process unless given: nothing outside this process can sign a command
        self.keys: BusKeys = keys or BusKeys.random()
        self._queues: dict[str, _Queue] = {}
        self._bindings: dict[str, list[str]] = {}
        self._subscribers: list[tuple[str, asyncio.Queue[tuple[Envelope, bytes]]]] = []
        self._timers: set[asyncio.TimerHandle] = set()

    async def start(self) -> None:
        for actor in self.topology.actors:
            self._declare(queue_name(actor))
            self._declare(dead_letter_queue(actor))
            for key in routing_keys_for(actor):
                self._bindings.setdefault(key, [])
                if queue_name(actor) not in self._bindings[key]:
                    self._bindings[key].append(queue_name(actor))

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def _declare(self, name: str) -> _Queue:
        if name not in self._queues:
            self._queues[name] = _Queue(name)
        return self._queues[name]

    # ------------------------------------------------------------------------------- publishing

    async def publish_raw(self, *, exchange: str, routing_key: str, body: bytes, envelope: Envelope,
                          reply_to: str | None = None) -> None:
        self._route(_Stored(body=body, envelope=envelope, exchange=exchange, routing_key=routing_key,
                            reply_to=reply_to))

    def _route(self, item: _Stored) -> None:
        if item.exchange == EVENTS_EXCHANGE:
            for pattern, sink in self._subscribers:
                if topic_matches(pattern, item.routing_key):
                    sink.put_nowait((item.envelope, item.body))
            return  # a topic exchange with no subscriber drops events, as RabbitMQ would
        if item.exchange == COMMANDS_EXCHANGE:
            targets = self._bindings.get(item.routing_key, [])
        elif item.exchange == REQUESTS_EXCHANGE:
            bound = COORDINATOR in self.topology.actors and topic_matches(REQUESTS_BINDING, item.routing_key)
            targets = [queue_name(COORDINATOR)] if bound else []
        elif item.exchange == DEAD_LETTER_EXCHANGE:
            targets = [dead_letter_queue(item.routing_key)] if item.routing_key in self.topology.actors else []
        elif item.exchange == "":
            targets = [item.routing_key] if item.routing_key in self._queues else []
        else:
            targets = []
        if not targets:
            raise Unroutable(f"no queue bound to {item.exchange!r} with routing key {item.routing_key!r}")
        for name in targets:
            self._queues[name].put(msgspec.structs.replace(item, delivery_count=0))

    def _delay(self, item: _Stored, seconds: float) -> None:
        """A retry tier: after ``seconds`` the copy goes back through ggt.commands (as TTL dead-lettering)."""
        if item.exchange not in {retry_exchange(t) for t in self.topology.retry_delays}:
            raise Unroutable(f"no retry tier {item.exchange!r}")
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            self._route(msgspec.structs.replace(item, exchange=COMMANDS_EXCHANGE))

        handle = loop.call_later(seconds, fire)
        self._timers.add(handle)

    def _requeue_or_dead_letter(self, queue: _Queue, item: _Stored) -> None:
        """A returned message goes back to the head, or to the DLQ past the delivery limit."""
        actor = queue.name.removeprefix("ggt.")
        if item.delivery_count > self.topology.delivery_limit and actor in self.topology.actors:
            exchange, key = item.exchange, item.routing_key
            headers = dict(item.envelope.headers)
            headers.setdefault(H_ERROR_CODE, "delivery_limit")
            headers.setdefault(H_ERROR_MESSAGE, "redelivered past the delivery limit (consumer kept dying)")
            headers.setdefault(H_ACTOR, actor)
            headers[H_ORIGIN_EXCHANGE], headers[H_ORIGIN_ROUTING_KEY] = exchange, key  # the real delivery
            headers[H_DEAD_LETTERED_AT] = now().isoformat()
            envelope = msgspec.structs.replace(item.envelope, headers=headers)
            self._queues[dead_letter_queue(actor)].put(
                msgspec.structs.replace(item, envelope=envelope, exchange=DEAD_LETTER_EXCHANGE, routing_key=actor)
            )
        else:
            queue.put(item, front=True)

    # -------------------------------------------------------------------------------- consuming

    async def deliveries(self, actor: str, *, prefetch: int) -> AsyncIterator[Delivery]:  # type: ignore[override]
        queue = self._queues[queue_name(actor)]
        unsettled: list[asyncio.Event] = []
        while True:
            unsettled = [e for e in unsettled if not e.is_set()]
            if len(unsettled) >= prefetch:
                waits = [asyncio.ensure_future(e.wait()) for e in unsettled]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                continue
            if not queue.items:
                queue.changed.clear()
                await queue.changed.wait()
                continue
            settled = asyncio.Event()
            unsettled.append(settled)
            yield MemoryDelivery(self, queue, queue.items.popleft(), settled)

    @contextlib.asynccontextmanager
    async def subscribe(self, pattern: str = "job.#", *, queue: str | None = None  # type: ignore[override]
                        ) -> AsyncIterator[AsyncIterator[tuple[Envelope, bytes]]]:
        if queue is not None:
            yield self._read_queue(self._declare(queue))
            return
        sink: asyncio.Queue[tuple[Envelope, bytes]] = asyncio.Queue()
        entry = (pattern, sink)
        self._subscribers.append(entry)
        try:
            yield self._read_sink(sink)
        finally:
            self._subscribers.remove(entry)

    @staticmethod
    async def _read_sink(sink: asyncio.Queue[tuple[Envelope, bytes]]) -> AsyncIterator[tuple[Envelope, bytes]]:
        while True:
            yield await sink.get()

    @staticmethod
    async def _read_queue(q: _Queue) -> AsyncIterator[tuple[Envelope, bytes]]:
        while True:
            if not q.items:
                q.changed.clear()
                await q.changed.wait()
                continue
            item = q.items.popleft()
            yield item.envelope, item.body

    async def declare_reply_queue(self, name: str) -> None:
        """Create a named queue that ``reply_to`` can address."""
        self._declare(name)

    # ------------------------------------------------------------------------------ dead letters

    async def take_dead_letters(self, actor: str, *, limit: int | None = None) -> DeadLetterBatch:
        queue = self._queues[dead_letter_queue(actor)]
        taken: list[_Stored] = []
        while queue.items and (limit is None or len(taken) < limit):
            taken.append(queue.items.popleft())
        return _MemoryBatch(queue, taken, [_dead_letter(actor, item, self.keys) for item in taken])

    async def queue_depths(self) -> dict[str, int]:
        return {name: len(q.items) for name, q in self._queues.items()}


def _dead_letter(actor: str, item: _Stored, keys: BusKeys) -> DeadLetter:
    headers = item.envelope.headers
    at = headers.get(H_DEAD_LETTERED_AT)
    return DeadLetter(
        actor=actor,
        envelope=item.envelope,
        body=item.body,
        error_code=str(headers.get(H_ERROR_CODE, "")),
        error_message=str(headers.get(H_ERROR_MESSAGE, "")),
        origin_exchange=str(headers.get(H_ORIGIN_EXCHANGE, "")),
        origin_routing_key=str(headers.get(H_ORIGIN_ROUTING_KEY, "")),
        dead_lettered_at=header_time(at),
        reply_to=item.reply_to,
        authenticated=verify(keys, item.envelope, item.body),
    )
