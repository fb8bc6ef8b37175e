"""The bus interface: one contract, two implementations (RabbitMQ and in-memory).

A Delivery is one received message with four ways to settle it: ``ack`` (done), ``release`` (leave
for redelivery — shutdown), ``retry`` (a delayed copy with attempt + 1, then ack) and
``dead_letter`` (a copy with diagnostic headers in the actor's DLQ, then ack). Copies are always
confirmed before the original is acked, so a crash in between duplicates, never loses.
"""

from __future__ import annotations

import abc
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from datetime import datetime

import msgspec

from messages.codec import (
    H_ACTOR,
    H_ATTEMPT,
    H_DEAD_LETTERED_AT,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_FIRST_FAILURE,
    H_ORIGIN_EXCHANGE,
    H_ORIGIN_ROUTING_KEY,
    H_RETRY_DELAY_MS,
    Envelope,
    encode,
    envelope_for,
    now,
)
from messages.errors import Error
from messages.routing import (
    COMMANDS_EXCHANGE,
    CONSUMER,
    EVENTS_EXCHANGE,
    ROUTING_KEYS,
    event_routing_key,
    is_event,
)
from messages.types import Base

#: Default retry tiers in seconds; one TTL queue each. Exponential: ×5 per step.
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (1.0, 5.0, 25.0, 120.0)


class BusError(Exception):
    """The bus could not do what was asked (publish not confirmed, broker gone)."""


class Unroutable(BusError):
    """A mandatory publish reached no queue: nothing is bound to its routing key."""


class PublishTimeout(BusError):
    """The broker did not confirm a publish in time; the message may or may not be stored."""


class Topology(msgspec.Struct, frozen=True, kw_only=True):
    """The shape of the broker side: tiers, limits, prefetch. Declared idempotently at start."""

    actors: tuple[str, ...]
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    #: redeliveries after a consumer died before the broker dead-letters (crash loops)
    delivery_limit: int = 10
    publish_timeout: float = 10.0


class Delivery(abc.ABC):
    """One received message and how to settle it."""

    body: bytes
    envelope: Envelope
    exchange: str
    routing_key: str
    #: deliveries of this copy so far that were not settled (crashes, shutdowns); 0 on the first
    delivery_count: int
    reply_to: str | None

    @abc.abstractmethod
    async def ack(self) -> None:
        """Done: remove the message."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the message back unsettled, to be delivered again (used at shutdown)."""

    @abc.abstractmethod
    async def _publish_copy(self, exchange: str, routing_key: str, headers: dict[str, str | int],
                            *, expiration: float | None = None) -> None:
        """Publish a copy of this message (same body, id and job) with ``headers``, confirmed."""

    def origin(self) -> tuple[str, str]:
        """Where this message was first published: (exchange, routing key)."""
        headers = self.envelope.headers
        return (
            str(headers.get(H_ORIGIN_EXCHANGE, self.exchange)),
            str(headers.get(H_ORIGIN_ROUTING_KEY, self.routing_key)),
        )

    async def retry(self, *, actor: str, delay: float, error: Error) -> None:
        """Send a copy through the retry tier for ``delay`` back to ``actor`` with attempt + 1, then ack."""
        tier = retry_tier(delay, self._tiers())
        headers = self._failure_headers(actor, error)
        headers[H_ATTEMPT] = self.envelope.attempt + 1
        headers[H_RETRY_DELAY_MS] = round(delay * 1000)
        await self._publish_copy(retry_exchange(tier), f"actor.{actor}", headers, expiration=min(delay, tier))
        await self.ack()

    async def dead_letter(self, *, actor: str, error: Error) -> None:
        """Put a copy with diagnostic headers into ``actor``'s dead-letter queue, then ack."""
        from messages.routing import DEAD_LETTER_EXCHANGE

        headers = self._failure_headers(actor, error)
        headers[H_DEAD_LETTERED_AT] = now().isoformat()
        await self._publish_copy(DEAD_LETTER_EXCHANGE, actor, headers)
        await self.ack()

    def _failure_headers(self, actor: str, error: Error) -> dict[str, str | int]:
        exchange, routing_key = self.origin()
        headers = dict(self.envelope.headers)
        headers.update({
            H_ERROR_CODE: str(error.code),
            H_ERROR_MESSAGE: (error.detail or error.message)[:1000],
            H_ACTOR: actor,
            H_ATTEMPT: self.envelope.attempt,
            H_ORIGIN_EXCHANGE: exchange,
            H_ORIGIN_ROUTING_KEY: routing_key,
        })
        headers.setdefault(H_FIRST_FAILURE, now().isoformat())
        return headers

    @abc.abstractmethod
    def _tiers(self) -> Sequence[float]:
        """The retry tiers of the bus this delivery came from."""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A message in a dead-letter queue, as the replay tool sees it."""

    actor: str
    envelope: Envelope
    body: bytes
    error_code: str
    error_message: str
    origin_exchange: str
    origin_routing_key: str
    dead_lettered_at: datetime | None
    reply_to: str | None = None


class DeadLetterBatch(abc.ABC):
    """Dead letters taken from a queue: settle each one; whatever is left is put back on close."""

    letters: list[DeadLetter]

    @abc.abstractmethod
    async def remove(self, index: int) -> None:
        """Delete one dead letter for good (after a confirmed replay, or a purge)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Put every letter not removed back into its queue, in order."""


class Bus(abc.ABC):
    """Publish commands and events, consume an actor's queue, reach dead letters."""

    topology: Topology

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and declare the topology (idempotent)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; unsettled deliveries go back to their queues."""

    async def __aenter__(self) -> Bus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def publish_raw(self, *, exchange: str, routing_key: str, body: bytes, envelope: Envelope,
                          reply_to: str | None = None) -> None:
        """Publish bytes, confirmed, mandatory: raises Unroutable or PublishTimeout rather than lose it."""

    async def publish(self, message: Base, *, envelope: Envelope | None = None, reply_to: str | None = None,
                      headers: dict[str, str | int] | None = None) -> Envelope:
        """Publish a command to its actor, or an event to ggt.events; returns the envelope used."""
        env = envelope or envelope_for(message, headers=headers)
        if is_event(type(message)):
            exchange, key = EVENTS_EXCHANGE, event_routing_key(message)
        else:
            exchange, key = COMMANDS_EXCHANGE, ROUTING_KEYS[type(message)]
        await self.publish_raw(exchange=exchange, routing_key=key, body=encode(message), envelope=env,
                               reply_to=reply_to)
        return env

    async def reply(self, queue: str, message: Base) -> None:
        """Send an event to a caller's own queue (AMQP reply-to, default exchange)."""
        await self.publish_raw(exchange="", routing_key=queue, body=encode(message),
                               envelope=envelope_for(message))

    @abc.abstractmethod
    def deliveries(self, actor: str, *, prefetch: int) -> AsyncIterator[Delivery]:
        """Messages of ``actor``'s queue, at most ``prefetch`` unsettled at once.

        Closing the iterator (``contextlib.aclosing``) stops consuming; deliveries already handed
        out stay the caller's to settle.
        """

    @abc.abstractmethod
    def subscribe(self, pattern: str = "job.#", *, queue: str | None = None
                  ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[tuple[Envelope, bytes]]]:
        """Events on ggt.events matching a topic pattern, through a private queue bound on entry.

        With ``queue`` the named queue (e.g. a reply-to queue) is read instead. Events published
        after entering the block are all seen.
        """

    @abc.abstractmethod
    async def declare_reply_queue(self, name: str) -> None:
        """Create a named durable queue that a ``reply_to`` can address (idempotent)."""

    @abc.abstractmethod
    async def take_dead_letters(self, actor: str, *, limit: int | None = None) -> DeadLetterBatch:
        """Take up to ``limit`` dead letters of ``actor`` to inspect, replay or purge."""

    @abc.abstractmethod
    async def queue_depths(self) -> dict[str, int]:
        """Messages waiting in each work and dead-letter queue."""


def retry_exchange(tier: float) -> str:
    """The fanout exchange (and queue) of a retry tier: ``ggt.retry.<ms>``."""
    return f"ggt.retry.{round(tier * 1000)}"


def retry_tier(delay: float, tiers: Sequence[float]) -> float:
    """The smallest tier that holds ``delay`` (the largest tier for longer delays)."""
    for tier in sorted(tiers):
        if delay <= tier:
            return tier
    return max(tiers)


def retry_delay(attempt: int, tiers: Sequence[float], *, rng: random.Random | None = None) -> float:
    """Backoff before attempt ``attempt + 1``: the attempt's tier, jittered down by up to half.

    Jitter stays inside the tier so a TTL queue never holds a message longer than its TTL.
    """
    tier = sorted(tiers)[min(max(attempt, 1), len(tiers)) - 1]
    return tier * (0.5 + 0.5 * (rng or random).random())


def consumer_of(message_type: type[Base]) -> str:
    """The actor that consumes a command type."""
    return CONSUMER[message_type]
