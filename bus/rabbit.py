"""The RabbitMQ bus over aio-pika.

Topology (declared idempotently by ``start``):

- ``ggt.requests`` (topic, the public ingress): ConvertRequested as ``convert.<tenant>``; the
  coordinator's queue is bound with ``convert.*``. Integrators may write here and nowhere else.
- ``ggt.commands`` (direct, only the service writes): each actor's quorum queue ``ggt.<actor>`` is
  bound with the routing keys of the commands it consumes and ``actor.<actor>`` (used by retries).
- ``ggt.events`` (topic): JobProgress / JobCompleted / JobFailed as ``job.<tenant>.<job_id>.<event>``.
- ``ggt.dlx`` (direct): ``ggt.<actor>.dlq`` bound with key ``<actor>``; fed by our explicit
  dead-lettering and by the quorum queue's delivery limit (crash loops).
- ``ggt.retry.<ms>`` (fanout) → queue ``ggt.retry.<ms>`` with that TTL, dead-lettering back to
  ``ggt.commands`` with the copy's routing key ``actor.<actor>``.

Publishing uses its own connection and a confirmed channel (mandatory, returns raise, persistent,
every publish under a timeout); consuming uses another connection, one channel per consumer with
its own prefetch. Both connections are robust: they reconnect and restore consumers by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from bus.auth import BusKeys, verify
from bus.base import (
    Bus,
    BusError,
    DeadLetter,
    DeadLetterBatch,
    Delivery,
    PublishTimeout,
    Topology,
    Unroutable,
    admit,
    retry_exchange,
)
from messages.codec import (
    CONTENT_TYPE,
    H_ACTOR,
    H_DEAD_LETTERED_AT,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_ORIGIN_EXCHANGE,
    H_ORIGIN_ROUTING_KEY,
    H_SCHEMA,
    SCHEMA_VERSION,
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
    command_type_name,
    dead_letter_queue,
    queue_name,
    routing_keys_for,
)

#: AMQP delivery mode of a message written to disk by the broker
PERSISTENT = 2
#: the app_id property of everything GetGoodTape publishes
APP_ID = "getgoodtape"
#: seconds between reconnect attempts of the robust connections
RECONNECT_INTERVAL = 1.0


def work_queue_arguments(actor: str, *, delivery_limit: int) -> dict[str, Any]:
    """Arguments of an actor's quorum queue: delivery limit and at-least-once dead-lettering."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": actor,
        # at-least-once dead-lettering needs reject-publish overflow; nothing is lost in between
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


log = logging.getLogger("getgoodtape.bus")


async def declare_work_queue(connection: AbstractRobustConnection, channel: AbstractChannel, name: str,
                             arguments: dict[str, Any]) -> tuple[aio_pika.abc.AbstractQueue, str]:
    """Declare a work queue with ``arguments``; a queue that exists with other arguments (an operator
    changed GGT_DELIVERY_LIMIT) is kept as it is instead of failing the start.

    RabbitMQ cannot change a queue's arguments, and quorum queues cannot be deleted only-if-empty, so
    nothing is deleted: the actors enforce the configured delivery limit themselves (the runtime
    dead-letters a message delivered more often, reporting its job); the broker's own limit stays the
    first one as a backstop. Returns the queue and a note ("" when the arguments matched).
    """
    probe = await connection.channel()  # a refused declaration closes its channel: not the caller's
    note = ""
    try:
        await probe.declare_queue(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        note = (f"queue {name} exists with other arguments ({exc.args[0] if exc.args else exc}); kept as it is: "
                "the actors enforce the configured delivery limit themselves (docs/DEAD_LETTERS.md)")
        log.warning("queue arguments differ; existing queue kept", extra={"queue": name, "note": note})
    finally:
        with contextlib.suppress(Exception):
            await probe.close()
    return await channel.declare_queue(name, passive=True), note


def retry_queue_arguments(tier: float) -> dict[str, Any]:
    """Arguments of a retry tier queue: its TTL, then back to ggt.commands."""
    return {"x-message-ttl": round(tier * 1000), "x-dead-letter-exchange": COMMANDS_EXCHANGE}


def _own_headers(headers: dict[str, Any] | None) -> dict[str, str | int]:
    out: dict[str, str | int] = {}
    for key, value in (headers or {}).items():
        if not key.startswith("ggt-") or key == H_SCHEMA:
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (str, int)):
            out[key] = value
    return out


def envelope_of(message: AbstractIncomingMessage) -> Envelope:
    """The envelope carried in a received message's properties (lenient for hand-published ones).

    A message without an id keeps an empty one: ``admit`` derives a request's id from its body.
    """
    headers = message.headers or {}
    schema = headers.get(H_SCHEMA)
    if isinstance(schema, bytes):
        schema = schema.decode()
    created = message.timestamp or now()
    if created.tzinfo is None:
        from datetime import UTC

        created = created.replace(tzinfo=UTC)
    return Envelope(
        message_id=message.message_id or "",
        job_id=message.correlation_id or "",
        type=message.type or command_type_name(message.routing_key or "") or "",
        schema=str(schema) if schema else "",
        created_at=created,
        headers=_own_headers(headers),
    )


def _delivery_limit_origin(headers: dict[str, Any]) -> tuple[str, str, str]:
    """(reason, exchange, routing key) from the broker's x-death header, if any."""
    deaths = headers.get("x-death") or []
    if not deaths:
        return "", "", ""
    first = deaths[-1] if isinstance(deaths, list) else deaths
    if not isinstance(first, dict):  # a publisher's junk, not the broker's record
        return "", "", ""
    keys = first.get("routing-keys") or [""]
    keys = keys if isinstance(keys, list) and keys else [""]
    reason = first.get("reason", "")
    return (
        reason.decode() if isinstance(reason, bytes) else str(reason),
        str(first.get("exchange", "")),
        str(keys[0]),
    )


class RabbitDelivery(Delivery):
    """A delivery from RabbitMQ."""

    def __init__(self, bus: RabbitBus, message: AbstractIncomingMessage) -> None:
        self._bus, self._message = bus, message
        self.body = message.body
        self.exchange = message.exchange or ""
        self.routing_key = message.routing_key or ""
        assert bus.keys is not None, "a consuming bus holds keys"
        self.keys = bus.keys
        self.envelope, self.authenticated = admit(envelope_of(message), message.body, exchange=self.exchange,
                                                  routing_key=self.routing_key, keys=bus.keys)
        self.user_id = message.user_id
        count = (message.headers or {}).get("x-delivery-count", 0)
        self.delivery_count = int(count) if isinstance(count, int) else 0
        self.reply_to = message.reply_to

    async def ack(self) -> None:
        await self._message.ack()

    async def release(self) -> None:
        await self._message.nack(requeue=True)

    async def _publish_copy(self, exchange: str, routing_key: str, headers: dict[str, str | int],
                            *, expiration: float | None = None, body: bytes | None = None) -> None:
        envelope = Envelope(
            message_id=self.envelope.message_id, job_id=self.envelope.job_id, type=self.envelope.type,
            schema=self.envelope.schema or SCHEMA_VERSION, created_at=self.envelope.created_at, headers=headers,
        )
        await self._bus.publish_raw(exchange=exchange, routing_key=routing_key,
                                    body=self.body if body is None else body,
                                    envelope=envelope, reply_to=self.reply_to, expiration=expiration)

    def _tiers(self) -> Sequence[float]:
        return self._bus.topology.retry_delays


class _RabbitBatch(DeadLetterBatch):
    def __init__(self, channel: AbstractChannel, messages: list[AbstractIncomingMessage],
                 letters: list[DeadLetter]) -> None:
        self._channel, self._messages, self.letters = channel, messages, letters
        self._removed: set[int] = set()

    async def remove(self, index: int) -> None:
        await self._messages[index].ack()
        self._removed.add(index)

    async def close(self) -> None:
        for index in reversed(range(len(self._messages))):
            if index not in self._removed:
                await self._messages[index].nack(requeue=True)
        self._messages = []
        await self._channel.close()


class RabbitBus(Bus):
    """GetGoodTape's topology on RabbitMQ, with confirms, returns, retries and dead letters.

    Without ``keys`` it refuses to start, unless it is ``publisher_only``: a client (``submit``)
    that publishes ConvertRequested to the public ingress, declares no topology and signs nothing
    (it may still follow events through its own queue).
    """

    def __init__(self, url: str, topology: Topology, *, name: str = "getgoodtape", keys: BusKeys | None = None,
                 publisher_only: bool = False) -> None:
        self.url, self.topology, self.name = url, topology, name
        self.keys, self.publisher_only = keys, publisher_only
        self._publish_conn: AbstractRobustConnection | None = None
        self._consume_conn: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        #: what start() found different from the settings (queues kept with their first arguments)
        self.topology_notes: list[str] = []

    async def start(self) -> None:
        if self.keys is None and not self.publisher_only:
            raise BusError("GGT_BUS_KEY is not set: actors on RabbitMQ sign and verify every internal command "
                           "with it. Give every service process the same key "
                           "(python -c 'import secrets; print(secrets.token_hex(32))'); see docs/SECURITY.md")
        self._publish_conn = await aio_pika.connect_robust(
            self.url, reconnect_interval=RECONNECT_INTERVAL,
            client_properties={"connection_name": f"{self.name}/publish"},
        )
        self._channel = await self._publish_conn.channel(publisher_confirms=True, on_return_raises=True)
        self._consume_conn = await aio_pika.connect_robust(
            self.url, reconnect_interval=RECONNECT_INTERVAL,
            client_properties={"connection_name": f"{self.name}/consume"},
        )
        if not self.publisher_only:  # an integrator's rights do not reach the topology
            await self._declare(self._channel)

    async def close(self) -> None:
        for conn in (self._consume_conn, self._publish_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _declare(self, channel: AbstractChannel) -> None:
        ex = aio_pika.ExchangeType
        commands = await channel.declare_exchange(COMMANDS_EXCHANGE, ex.DIRECT, durable=True)
        requests = await channel.declare_exchange(REQUESTS_EXCHANGE, ex.TOPIC, durable=True)
        await channel.declare_exchange(EVENTS_EXCHANGE, ex.TOPIC, durable=True)
        dlx = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, ex.DIRECT, durable=True)
        for tier in self.topology.retry_delays:
            name = retry_exchange(tier)
            tier_exchange = await channel.declare_exchange(name, ex.FANOUT, durable=True)
            tier_queue = await channel.declare_queue(name, durable=True, arguments=retry_queue_arguments(tier))
            await tier_queue.bind(tier_exchange)
        for actor in self.topology.actors:
            assert self._publish_conn is not None
            work, note = await declare_work_queue(
                self._publish_conn, channel, queue_name(actor),
                work_queue_arguments(actor, delivery_limit=self.topology.delivery_limit),
            )
            if note:
                self.topology_notes.append(note)
            for key in routing_keys_for(actor):
                await work.bind(commands, key)
            if actor == COORDINATOR:
                await work.bind(requests, REQUESTS_BINDING)
            # classic, durable, no TTL and no length limit: dead letters never expire silently;
            # classic so that letters put back after an inspection keep their order
            dlq = await channel.declare_queue(dead_letter_queue(actor), durable=True,
                                              arguments={"x-queue-type": "classic"})
            await dlq.bind(dlx, actor)

    # ------------------------------------------------------------------------------- publishing

    async def publish_raw(self, *, exchange: str, routing_key: str, body: bytes, envelope: Envelope,
                          reply_to: str | None = None, expiration: float | None = None) -> None:
        headers: dict[str, Any] = {H_SCHEMA: envelope.schema or SCHEMA_VERSION, **envelope.headers}
        # the AMQP properties built directly (aio-pika's Message costs a third of a publish's CPU)
        properties = aiormq.spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=envelope.message_id,
            correlation_id=envelope.job_id or None,
            message_type=envelope.type or None,
            timestamp=envelope.created_at,
            headers=headers,
            reply_to=reply_to,
            app_id=APP_ID,
            expiration=str(round(expiration * 1000)) if expiration is not None else None,
        )
        assert self._channel is not None, "bus not started"
        try:
            if self._channel.is_closed:
                await self._await_reconnect(exchange)
            # the robust channel's current underlying channel: a new one after a reconnect
            channel = await self._channel.get_underlay_channel()
            # asyncio.timeout rather than a timeout argument, which wraps every publish in a task
            async with asyncio.timeout(self.topology.publish_timeout):
                await channel.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                            properties=properties, mandatory=True)
        except aiormq.exceptions.PublishError as exc:
            raise Unroutable(f"no queue bound to {exchange!r} with routing key {routing_key!r}") from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise BusError(f"broker refused the message (nack) on {exchange!r}/{routing_key!r}") from exc
        except (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError,
                aiormq.exceptions.ChannelClosed, ConnectionError, RuntimeError) as exc:
            raise BusError(f"broker connection unavailable while publishing to {exchange!r}: {exc}") from exc
        except TimeoutError as exc:
            raise PublishTimeout(
                f"no confirm within {self.topology.publish_timeout}s for {exchange!r}/{routing_key!r}"
            ) from exc

    async def _await_reconnect(self, exchange: str) -> None:
        """Wait, up to the publish timeout, for the robust channel to come back after a dropped connection.

        Raising at once would turn every caller's retry into a busy loop that starves the very
        reconnect it waits for; nothing has been sent yet, so a caller may retry a BusError freely.
        """
        assert self._channel is not None and self._publish_conn is not None
        if self._publish_conn.close_called:
            raise BusError(f"bus stopped: cannot publish to {exchange!r}")
        try:
            async with asyncio.timeout(self.topology.publish_timeout):
                await self._channel.ready()
        except TimeoutError:
            raise BusError(f"broker connection still down after {self.topology.publish_timeout}s: "
                           f"nothing published to {exchange!r}") from None

    # -------------------------------------------------------------------------------- consuming

    async def deliveries(self, actor: str, *, prefetch: int) -> AsyncIterator[Delivery]:  # type: ignore[override]
        assert self._consume_conn is not None, "bus not started"
        channel = await self._consume_conn.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name(actor), ensure=True)
        async with queue.iterator() as messages:
            async for message in messages:
                yield RabbitDelivery(self, message)

    @contextlib.asynccontextmanager
    async def subscribe(self, pattern: str = "job.#", *, queue: str | None = None  # type: ignore[override]
                        ) -> AsyncIterator[AsyncIterator[tuple[Envelope, bytes]]]:
        assert self._consume_conn is not None, "bus not started"
        channel = await self._consume_conn.channel()
        try:
            # an exclusive queue dies with its connection, so an ack there buys nothing but a round
            # trip that fails when the broker restarts under it: the broker forgets what it sent.
            # A named (reply) queue outlives us: its messages are acked as they are read.
            transient = queue is None
            if transient:
                q = await channel.declare_queue(exclusive=True, auto_delete=True)
                await q.bind(EVENTS_EXCHANGE, pattern)
            else:
                q = await channel.get_queue(queue, ensure=True)
            async with q.iterator(no_ack=transient) as messages:
                yield self._read(messages, ack=not transient)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    @staticmethod
    async def _read(messages: Any, *, ack: bool) -> AsyncIterator[tuple[Envelope, bytes]]:
        async for message in messages:
            if ack:
                try:
                    await message.ack()
                except (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError,
                        aiormq.exceptions.ChannelClosed, ConnectionError) as exc:
                    # the connection went while acking: the message is handed on now and, if the
                    # ack never reached the broker, once more after the reconnect (at least once)
                    log.warning("ack lost with the connection (%s): the message may come again", exc)
            yield envelope_of(message), message.body

    async def declare_reply_queue(self, name: str) -> None:
        """Create a durable named queue that ``reply_to`` can address."""
        assert self._channel is not None
        await self._channel.declare_queue(name, durable=True)

    # ------------------------------------------------------------------------------ dead letters

    async def take_dead_letters(self, actor: str, *, limit: int | None = None) -> DeadLetterBatch:
        assert self._publish_conn is not None, "bus not started"
        channel = await self._publish_conn.channel()
        queue = await channel.get_queue(dead_letter_queue(actor), ensure=True)
        messages: list[AbstractIncomingMessage] = []
        while limit is None or len(messages) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            messages.append(message)
        return _RabbitBatch(channel, messages, [_dead_letter(actor, m, self.keys) for m in messages])

    async def queue_depths(self) -> dict[str, int]:
        assert self._publish_conn is not None, "bus not started"
        depths: dict[str, int] = {}
        channel = await self._publish_conn.channel()
        try:
            for actor in self.topology.actors:
                for name in (queue_name(actor), dead_letter_queue(actor)):
                    declared = await channel.declare_queue(name, passive=True)
                    depths[name] = declared.declaration_result.message_count or 0
        finally:
            await channel.close()
        return depths

    async def purge_all(self) -> None:
        """Empty every queue of the topology (tests)."""
        assert self._channel is not None
        names = [retry_exchange(t) for t in self.topology.retry_delays]
        for actor in self.topology.actors:
            names += [queue_name(actor), dead_letter_queue(actor)]
        for name in names:
            queue = await self._channel.get_queue(name, ensure=True)
            await queue.purge()


def _dead_letter(actor: str, message: AbstractIncomingMessage, keys: BusKeys | None) -> DeadLetter:
    headers = message.headers or {}
    envelope = envelope_of(message)
    own = envelope.headers
    reason, x_exchange, x_key = _delivery_limit_origin(headers)
    at = own.get(H_DEAD_LETTERED_AT)
    if reason and at is None:
        # the broker dead-lettered it (delivery limit): our headers describe an earlier retry, and
        # where it came from is what the broker recorded
        own = {k: v for k, v in own.items()
               if k not in (H_ERROR_CODE, H_ERROR_MESSAGE, H_ORIGIN_EXCHANGE, H_ORIGIN_ROUTING_KEY)}
    when = header_time(at)
    if when is None and reason:
        deaths = headers.get("x-death") or []
        when = header_time(deaths[-1].get("time")) if isinstance(deaths, list) and deaths else None
    return DeadLetter(
        actor=str(own.get(H_ACTOR, actor)),
        envelope=envelope,
        body=message.body,
        error_code=str(own.get(H_ERROR_CODE, reason or "")),
        error_message=str(own.get(H_ERROR_MESSAGE, f"dead-lettered by the broker: {reason}" if reason else "")),
        origin_exchange=str(own.get(H_ORIGIN_EXCHANGE, x_exchange)),
        origin_routing_key=str(own.get(H_ORIGIN_ROUTING_KEY, x_key)),
        dead_lettered_at=when,
        reply_to=message.reply_to,
        authenticated=keys is not None and verify(keys, envelope, message.body),
    )
