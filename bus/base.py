"""The bus interface: one contract, two implementations (RabbitMQ and in-memory).

A Delivery is one received message, admitted by ``admit`` (the bus vouches for its envelope only
when it came from the public ingress or carries a valid MAC), with four ways to settle it: ``ack``
(done), ``release`` (leave for redelivery — shutdown), ``retry`` (a delayed copy with attempt + 1, then ack) and
``dead_letter`` (a copy with diagnostic headers in the actor's DLQ, then ack). Copies are always
confirmed before the original is acked, so a crash in between duplicates, never loses.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator, Sequence
from datetime import datetime

import msgspec

from bus.auth import BusKeys, signed, verify
from messages.codec import (
    DEAD_LETTER_KEEP_BYTES,
    H_ACTOR,
    H_ATTEMPT,
    H_BODY_BYTES,
    H_BODY_SHA256,
    H_DEAD_LETTERED_AT,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_FIRST_FAILURE,
    H_MAC,
    H_ORIGIN_EXCHANGE,
    H_ORIGIN_ROUTING_KEY,
    H_OWNER,
    H_RETRY_DELAY_MS,
    MAX_BODY_BYTES,
    Envelope,
    encode,
    envelope_for,
    new_id,
    now,
    request_message_id,
)
from messages.errors import Error
from messages.routing import (
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    REQUESTS_EXCHANGE,
    ROUTING_KEYS,
    event_routing_key,
    is_event,
    request_routing_key,
    tenant_of_request,
)
from messages.types import Base, ConvertRequested, type_name

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


def admit(envelope: Envelope, body: bytes, *, exchange: str, routing_key: str,
          keys: BusKeys) -> tuple[Envelope, bool]:
    """What the bus vouches for in a delivery: the envelope to act on, and whether it is authenticated.

    ``exchange`` and ``routing_key`` are the broker's, never a header. A request from the public
    ingress loses every ``ggt-*`` header, is owned by the tenant its routing key names, is a
    ConvertRequested whatever it claims, and gets a stable id when it has none; it is authenticated
    when the key names a valid tenant. Anything else is authenticated by its MAC; without a valid
    one it loses its ``ggt-*`` headers too (only the service sets them).
    """
    if exchange == REQUESTS_EXCHANGE:
        tenant = tenant_of_request(routing_key)
        return msgspec.structs.replace(
            envelope, type=type_name(ConvertRequested), headers={H_OWNER: tenant} if tenant else {},
            message_id=envelope.message_id or request_message_id(tenant or "", body),
        ), tenant is not None
    if verify(keys, envelope, body):
        return envelope, True
    return msgspec.structs.replace(envelope, headers={}, message_id=envelope.message_id or new_id()), False


class Delivery(abc.ABC):
    """One received message and how to settle it."""

    body: bytes
    #: the envelope as admitted (``admit``): outside ``ggt-*`` headers already dropped
    envelope: Envelope
    exchange: str
    routing_key: str
    #: deliveries of this copy so far that were not settled (crashes, shutdowns); 0 on the first
    delivery_count: int
    reply_to: str | None
    #: the bus vouches for the envelope: a valid MAC, or a request from the public ingress
    authenticated: bool
    #: the broker user the publisher set in ``user_id`` (RabbitMQ checks it against the connection)
    user_id: str | None = None
    keys: BusKeys

    @abc.abstractmethod
    async def ack(self) -> None:
        """Done: remove the message."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the message back unsettled, to be delivered again (used at shutdown)."""

    @abc.abstractmethod
    async def _publish_copy(self, exchange: str, routing_key: str, headers: dict[str, str | int],
                            *, expiration: float | None = None, body: bytes | None = None) -> None:
        """Publish a copy of this message (same body — or ``body`` when given —, id and job) with
        ``headers``, confirmed."""

    def origin(self) -> tuple[str, str]:
        """Where the broker delivered this message from: (exchange, routing key) — never a header."""
        return self.exchange, self.routing_key

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
        body = self.body
        if len(body) > MAX_BODY_BYTES:  # undecodable whatever happens: keep its head and its fingerprint
            headers.pop(H_MAC, None)
            headers[H_BODY_BYTES] = len(body)
            headers[H_BODY_SHA256] = hashlib.sha256(body).hexdigest()
            body = body[:DEAD_LETTER_KEEP_BYTES]
        await self._publish_copy(DEAD_LETTER_EXCHANGE, actor, headers, body=body)
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
        headers.pop(H_MAC, None)
        if self.authenticated:
            # re-signed with the current key (a request from the ingress gets its first MAC here);
            # an unauthenticated message never gets one, so a replay cannot launder it
            envelope = msgspec.structs.replace(self.envelope, headers=headers)
            headers = dict(signed(self.keys, envelope, self.body).headers)
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
    #: its MAC verifies under this bus's keys: the service wrote it (only such letters are replayed)
    authenticated: bool = False


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
    #: the keys that sign and verify internal commands
    keys: BusKeys | None

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

    async def publish(self, message: Base, *, owner: str = "", envelope: Envelope | None = None,
                      reply_to: str | None = None, headers: dict[str, str | int] | None = None) -> Envelope:
        """Publish a message for the job of tenant ``owner``; returns the envelope used.

        ConvertRequested goes to ggt.requests as ``convert.<owner>``; an event to ggt.events as
        ``job.<owner>.<job_id>.<event>`` (signed when the bus holds a key); any other command to
        ggt.commands, signed, with the owner in ``ggt-owner``. An empty owner is the envelope's, else the
        default tenant.
        """
        env = envelope or envelope_for(message, headers=headers)
        owner = owner or env.owner
        body = encode(message)
        if isinstance(message, ConvertRequested):
            # the owner travels as the routing key: the ingress ignores headers
            exchange, key = REQUESTS_EXCHANGE, request_routing_key(owner)
        else:
            if owner:
                env = msgspec.structs.replace(env, headers={**env.headers, H_OWNER: owner})
            if is_event(type(message)):
                exchange, key = EVENTS_EXCHANGE, event_routing_key(message, owner)
                if self.keys is not None:  # signed too: the gateway streams only what the service wrote
                    env = signed(self.keys, env, body)
            else:
                if self.keys is None:
                    raise BusError("this bus holds no GGT_BUS_KEY: it may publish requests only")
                exchange, key = COMMANDS_EXCHANGE, ROUTING_KEYS[type(message)]
                env = signed(self.keys, env, body)
        await self.publish_raw(exchange=exchange, routing_key=key, body=body, envelope=env, reply_to=reply_to)
        return env

    async def reply(self, queue: str, message: Base, *, owner: str = "") -> None:
        """Send an event to a caller's own queue (AMQP reply-to, default exchange)."""
        await self.publish_raw(exchange="", routing_key=queue, body=encode(message),
                               envelope=envelope_for(message, headers={H_OWNER: owner} if owner else None))

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

