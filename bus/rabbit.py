"""The RabbitMQ bus over aio-pika.

Topology (declared idempotently by ``start``):

- ``ggt.commands`` (direct): each actor's quorum queue ``ggt.<actor>`` is bound with the routing
  keys of the commands it consumes and ``actor.<actor>`` (used by retries).
- ``ggt.events`` (topic): JobProgress / JobCompleted / JobFailed as ``job.<job_id>.<event>``.
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
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from bus.base import (
    Bus,
    BusError,
    DeadLetter,
    DeadLetterBatch,
    Delivery,
    PublishTimeout,
    Topology,
    Unroutable,
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
    Envelope,
    new_id,
    now,
)
from messages.routing import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
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
    """The envelope carried in a received message's properties (lenient for hand-published ones)."""
    headers = message.headers or {}
    schema = headers.get(H_SCHEMA)
    if isinstance(schema, bytes):
        schema = schema.decode()
    created = message.timestamp or now()
    if created.tzinfo is None:
        from datetime import UTC

        created = created.replace(tzinfo=UTC)
    return Envelope(
        message_id=message.message_id or new_id(),
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
    keys = first.get("routing-keys") or [""]
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
        self.envelope = envelope_of(message)
        self.exchange = message.exchange or ""
        self.routing_key = message.routing_key or ""
        count = (message.headers or {}).get("x-delivery-count", 0)
        self.delivery_count = int(count) if isinstance(count, int) else 0
        self.reply_to = message.reply_to

    async def ack(self) -> None:
        await self._message.ack()

    async def release(self) -> None:
        await self._message.nack(requeue=True)

    async def _publish_copy(self, exchange: str, routing_key: str, headers: dict[str, str | int],
                            *, expiration: float | None = None) -> None:
        envelope = Envelope(
            message_id=self.envelope.message_id, job_id=self.envelope.job_id, type=self.envelope.type,
            schema=self.envelope.schema or "1.0", created_at=self.envelope.created_at, headers=headers,
        )
        await self._bus.publish_raw(exchange=exchange, routing_key=routing_key, body=self.body,
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
    """GetGoodTape's topology on RabbitMQ, with confirms, returns, retries and dead letters."""

    def __init__(self, url: str, topology: Topology, *, name: str = "getgoodtape") -> None:
        self.url, self.topology, self.name = url, topology, name
        self._publish_conn: AbstractRobustConnection | None = None
        self._consume_conn: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None

    async def start(self) -> None:
        self._publish_conn = await aio_pika.connect_robust(
            self.url, reconnect_interval=RECONNECT_INTERVAL,
            client_properties={"connection_name": f"{self.name}/publish"},
        )
        self._consume_conn = await aio_pika.connect_robust(
            self.url, reconnect_interval=RECONNECT_INTERVAL,
            client_properties={"connection_name": f"{self.name}/consume"},
        )
        self._channel = await self._publish_conn.channel(publisher_confirms=True, on_return_raises=True)
        await self._declare(self._channel)

    async def close(self) -> None:
        for conn in (self._consume_conn, self._publish_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _declare(self, channel: AbstractChannel) -> None:
        ex = aio_pika.ExchangeType
        commands = await channel.declare_exchange(COMMANDS_EXCHANGE, ex.DIRECT, durable=True)
        await channel.declare_exchange(EVENTS_EXCHANGE, ex.TOPIC, durable=True)
        dlx = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, ex.DIRECT, durable=True)
        for tier in self.topology.retry_delays:
            name = retry_exchange(tier)
            tier_exchange = await channel.declare_exchange(name, ex.FANOUT, durable=True)
            tier_queue = await channel.declare_queue(name, durable=True, arguments=retry_queue_arguments(tier))
            await tier_queue.bind(tier_exchange)
        for actor in self.topology.actors:
            work = await channel.declare_queue(
                queue_name(actor), durable=True,
                arguments=work_queue_arguments(actor, delivery_limit=self.topology.delivery_limit),
            )
            for key in routing_keys_for(actor):
                await work.bind(commands, key)
            # classic, durable, no TTL and no length limit: dead letters never expire silently;
            # classic so that letters put back after an inspection keep their order
            dlq = await channel.declare_queue(dead_letter_queue(actor), durable=True,
                                              arguments={"x-queue-type": "classic"})
            await dlq.bind(dlx, actor)

    # ------------------------------------------------------------------------------- publishing

    async def publish_raw(self, *, exchange: str, routing_key: str, body: bytes, envelope: Envelope,
                          reply_to: str | None = None, expiration: float | None = None) -> None:
        headers: dict[str, Any] = {H_SCHEMA: envelope.schema or "1.0", **envelope.headers}
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
                raise aiormq.exceptions.ChannelInvalidStateError("publish channel closed (reconnecting)")
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
            if queue is None:
                q = await channel.declare_queue(exclusive=True, auto_delete=True)
                await q.bind(EVENTS_EXCHANGE, pattern)
            else:
                q = await channel.get_queue(queue, ensure=True)
            async with q.iterator() as messages:
                yield self._read(messages)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    @staticmethod
    async def _read(messages: Any) -> AsyncIterator[tuple[Envelope, bytes]]:
        async for message in messages:
            await message.ack()
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
        return _RabbitBatch(channel, messages, [_dead_letter(actor, m) for m in messages])

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


def _dead_letter(actor: str, message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    envelope = envelope_of(message)
    own = envelope.headers
    reason, x_exchange, x_key = _delivery_limit_origin(headers)
    at = own.get(H_DEAD_LETTERED_AT)
    if reason and at is None:
        # the broker dead-lettered it (delivery limit): our headers describe an earlier retry
        own = {k: v for k, v in own.items() if k not in (H_ERROR_CODE, H_ERROR_MESSAGE)}
    when: datetime | None = datetime.fromisoformat(str(at)) if at else None
    if when is None and reason:
        deaths = headers.get("x-death") or []
        when = deaths[-1].get("time") if deaths else None
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
    )
