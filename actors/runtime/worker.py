"""The actor runtime: typed handlers, failure policy, time limit, dedupe and graceful shutdown.

An actor binds handlers to message types by annotation::

    class Verifier(Actor):
        name = "verifier"

        async def verify(self, message: VerifyObject, ctx: Context) -> None: ...

A Worker consumes the actor's queue and, for each delivery, checks the bus vouches for it (an
internal command without a valid MAC → dead letter at once, unread), decodes it (undecodable → dead
letter at once, no job touched; ``Actor.on_undecodable`` may still answer the sender), runs the
handler under the actor's time limit and settles the delivery. What to do is decided by the pure
functions of ``actors/runtime/settle.py`` (ack | retry(delay) | dead letter | release, and which code an
exception means); the Worker applies the answer in one place (``Worker._apply``), which also
records the message's one outcome metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import typing
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from actors.runtime import metrics
from actors.runtime.logs import actor_var, job_id_var, message_id_var
from actors.runtime.settings import Settings
from actors.runtime.settle import (
    Ack,
    Cancelled,
    DeadLetter,
    Limits,
    Release,
    Retry,
    Settlement,
    classify,
    refusal,
    settle,
    unauthenticated,
    undecodable,
    unreported,
)
from bus.base import Bus, Delivery
from messages.codec import H_REPLAYS, DecodeError, Envelope, decode
from messages.errors import Error, ErrorCode, JobError
from messages.types import Base, Stage, StepFailed

log = logging.getLogger("getgoodtape.runtime")

#: message ids remembered per process to drop a redelivered duplicate of finished work
DEDUPE_MEMORY = 10_000

class Context:
    """What a handler gets besides its message: the envelope, the bus and the settings."""

    def __init__(self, *, actor: Actor, delivery: Delivery) -> None:
        self.actor = actor
        self.delivery = delivery
        self.envelope: Envelope = delivery.envelope
        self.bus: Bus = actor.bus
        self.settings: Settings = actor.settings

    @property
    def attempt(self) -> int:
        """1 on the first try of this message through our retry path."""
        return self.envelope.attempt

    @property
    def reply_to(self) -> str | None:
        """The queue the original requester asked the final event to be sent to."""
        return self.delivery.reply_to

    @property
    def owner(self) -> str:
        """The tenant owning the handled message's job ("" when it names none)."""
        return self.envelope.owner

    async def publish(self, message: Base, *, reply_to: str | None = None) -> None:
        """Publish a command or event (confirmed); the original reply-to, owner and replay count travel
        along, so the result of a replayed step is known as such (it may revive its failed job)."""
        replays = self.envelope.replays
        await self.bus.publish(message, owner=self.envelope.owner, reply_to=reply_to or self.delivery.reply_to,
                               headers={H_REPLAYS: replays} if replays else None)


HandlerFn = Callable[[Base, Context], Awaitable[None]]


class Actor:
    """Base of every actor: a name, typed handlers, and hooks for setup and failures."""

    name: ClassVar[str]
    #: this actor's own step name in StepFailed and logs
    step: ClassVar[str] = ""
    #: unacked messages at once when GGT_PREFETCH does not say (how much work one process takes on)
    prefetch: ClassVar[int] = 4
    #: the job stage this actor's steps run in, for the progress event that announces a retry
    stage: ClassVar[Stage | None] = None

    def __init__(self, *, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.log = logging.getLogger(f"getgoodtape.{self.name}")

    async def setup(self) -> None:
        """Open what the handlers need (storage clients, yt-dlp); called once before consuming."""

    async def teardown(self) -> None:
        """Close what setup opened."""

    def time_limit(self, message: Base) -> float:
        """Seconds a handler may run for this message; below the broker's consumer timeout."""
        return self.settings.job_time_limit

    def handlers(self) -> dict[type[Base], HandlerFn]:
        """Handlers found by annotation: a method whose first parameter is a message type."""
        found: dict[type[Base], HandlerFn] = {}
        for attr in dir(type(self)):
            fn = getattr(type(self), attr, None)
            if attr.startswith("_") or not inspect.iscoroutinefunction(fn):
                continue
            params = list(inspect.signature(fn).parameters.values())
            if len(params) != 3:
                continue
            hints = typing.get_type_hints(fn)
            hint = hints.get(params[1].name)
            if isinstance(hint, type) and issubclass(hint, Base):
                found[hint] = getattr(self, attr)
        return found

    def classify(self, exc: BaseException) -> JobError:
        """Turn an unexpected exception into a coded error (``actors.runtime.settle.classify``'s table)."""
        return classify(exc)

    async def on_undecodable(self, body: bytes, envelope: Envelope, error: Error, ctx: Context) -> None:
        """Answer the sender of a message that cannot be decoded, if the actor can; it touches no job.

        Called before the message is dead-lettered; the default does nothing (the coordinator
        answers requests that name their job and reply-to).
        """

    def retry_stage(self, message: Base) -> Stage | None:
        """The job stage a retry of ``message`` is announced in; None announces nothing."""
        return self.stage

    async def on_retry(self, message: Base, error: Error, ctx: Context, *, attempt: int, delay: float) -> None:
        """Tell the job's followers that its step waits ``delay`` s for retry ``attempt``."""
        from actors.core.stages import retry_progress

        stage = self.retry_stage(message)
        job_id = getattr(message, "job_id", "") or ctx.envelope.job_id
        if stage is None or not job_id:
            return
        await ctx.publish(retry_progress(job_id, stage, code=error.code, attempt=attempt,
                                         retries=self.settings.max_attempts - 1, delay=delay))

    async def on_failure(self, message: Base | None, error: Error, ctx: Context) -> None:
        """Report a failed step to the coordinator (the coordinator overrides this)."""
        job_id = ctx.envelope.job_id or getattr(message, "job_id", "")
        if not job_id or isinstance(message, StepFailed):
            return
        await ctx.publish(StepFailed(job_id=job_id, step=self.step or self.name, error=error,
                                     cause=ctx.envelope.message_id))


class Worker:
    """Runs one actor on its queue until ``stopping`` is set, then shuts down gracefully."""

    def __init__(self, actor: Actor, *, rng: Any = None) -> None:
        self.actor = actor
        self.settings = actor.settings
        self.bus = actor.bus
        self._handlers = actor.handlers()
        self._done: OrderedDict[str, None] = OrderedDict()
        #: message id → set when its handling ends; a concurrent duplicate waits for it
        self._running: dict[str, asyncio.Event] = {}
        self._rng = rng
        self._limits = Limits(max_attempts=self.settings.max_attempts, retry_delays=self.settings.retry_delays,
                              delivery_limit=self.settings.delivery_limit)
        self.processed = 0
        #: set once the worker consumes; tests and the CLI wait on it
        self.ready = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until ``stopping`` is set; then let in-flight work finish within the grace period."""
        actor_var.set(self.actor.name)
        await self.actor.setup()
        inflight: set[asyncio.Task[None]] = set()
        metrics.WORKERS.labels(self.actor.name).inc()
        try:
            async with asyncio.TaskGroup() as group:
                pump = group.create_task(self._pump(group, inflight))
                stop_wait = group.create_task(stopping.wait())
                await asyncio.wait({pump, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                pump.cancel()
                stop_wait.cancel()
                if inflight:
                    log.info("stopping: waiting for in-flight work", extra={"in_flight": len(inflight)})
                    _, pending = await asyncio.wait(set(inflight), timeout=self.settings.shutdown_grace)
                    for task in pending:
                        task.cancel()  # _process releases the message for redelivery
        finally:
            metrics.WORKERS.labels(self.actor.name).dec()
            await self.actor.teardown()

    async def _pump(self, group: asyncio.TaskGroup, inflight: set[asyncio.Task[None]]) -> None:
        async with contextlib.aclosing(
            self.bus.deliveries(self.actor.name, prefetch=self.settings.prefetch or self.actor.prefetch)
        ) as deliveries:
            self.ready.set()
            async for delivery in deliveries:
                task = group.create_task(self._process(delivery))
                inflight.add(task)
                task.add_done_callback(inflight.discard)

    async def _process(self, delivery: Delivery) -> None:
        env = delivery.envelope
        job_id_var.set(env.job_id)
        message_id_var.set(env.message_id)
        metrics.IN_FLIGHT.labels(self.actor.name).inc()
        try:
            await self._handle(delivery)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._apply(settle(Cancelled(), attempt=env.attempt, limits=self._limits), delivery, None,
                                  Context(actor=self.actor, delivery=delivery))
            log.info("released for redelivery (shutdown)")
            raise
        except Exception:
            # settling failed (a publish or the broker failed): give the message back so it is
            # redelivered — left unacked on a live channel it would never be; the delivery limit
            # bounds a loop, dedupe and job state absorb a duplicate
            log.exception("could not settle the delivery; released for redelivery")
            with contextlib.suppress(Exception):  # a dead channel: the broker redelivers by itself
                await delivery.release()
        finally:
            metrics.IN_FLIGHT.labels(self.actor.name).dec()
            self.processed += 1

    async def _handle(self, delivery: Delivery) -> None:
        env = delivery.envelope
        ctx = Context(actor=self.actor, delivery=delivery)
        if not delivery.authenticated:
            log.warning("unauthenticated message dead-lettered",
                        extra={"exchange": delivery.exchange, "routing_key": delivery.routing_key,
                               "user_id": delivery.user_id})
            metrics.UNAUTHENTICATED.labels(self.actor.name).inc()
            where = f"{delivery.exchange or '(default exchange)'}/{delivery.routing_key}"
            await self._apply(unauthenticated(where), delivery, None, ctx)
            return
        try:
            message = decode(delivery.body, type_name_hint=env.type or None, schema=env.schema or None)
        except DecodeError as exc:
            refused = undecodable(exc.field, exc.reason)
            log.warning("undecodable message dead-lettered", extra={"field": exc.field, "reason": exc.reason})
            try:
                await self.actor.on_undecodable(delivery.body, env, refused.error, ctx)
            except Exception:  # the letter must still be settled; answering is best effort
                log.exception("could not answer the sender of an undecodable message")
            await self._apply(refused, delivery, None, ctx)
            return
        handler = self._handlers.get(type(message))
        refused = refusal(deliveries=delivery.delivery_count, has_handler=handler is not None,
                          limits=self._limits, actor=self.actor.name, type_name=env.type)
        if refused is not None:
            if refused.report:
                log.error("crash loop: dead-lettered before the delivery limit",
                          extra={"deliveries": delivery.delivery_count})
            await self._apply(refused, delivery, message, ctx)
            return
        assert handler is not None  # refusal() refuses a message without one
        while (other := self._running.get(env.message_id)) is not None:
            await other.wait()  # the same message is being handled right now: see how that ends
        if env.message_id in self._done:
            log.info("duplicate of finished work dropped")
            await self._apply(Ack(outcome=None, remember=False), delivery, message, ctx)
            return
        self._running[env.message_id] = finished = asyncio.Event()
        try:
            await self._run_handler(handler, message, delivery, ctx)
        finally:
            del self._running[env.message_id]
            finished.set()

    async def _run_handler(self, handler: HandlerFn, message: Base, delivery: Delivery, ctx: Context) -> None:
        limit = self.actor.time_limit(message)
        failure: JobError | None = None
        exc: BaseException | None = None
        try:
            async with asyncio.timeout(limit) as deadline:
                await handler(message, ctx)
        except Exception as raised:
            exc = raised
            if isinstance(raised, TimeoutError) and deadline.expired():
                failure = JobError(ErrorCode.TIMEOUT, f"{self.actor.name} ran past its {limit:.0f}s time limit")
            else:
                failure = self.actor.classify(raised)
        settlement = settle(failure, attempt=delivery.envelope.attempt, limits=self._limits, rng=self._rng)
        if failure is not None:
            self._log_failure(settlement, failure, delivery.envelope.attempt, exc)
        await self._apply(settlement, delivery, message, ctx)

    def _log_failure(self, settlement: Settlement, failure: JobError, attempt: int, exc: BaseException | None) -> None:
        extra = {"code": str(failure.code), "attempt": attempt, "detail": failure.detail[:500]}
        if isinstance(settlement, Retry):
            log.warning("transient failure, retrying", extra={**extra, "delay": round(settlement.delay, 3)},
                        exc_info=exc is not None and not isinstance(exc, JobError))
        elif isinstance(settlement, DeadLetter):
            log.error("failed after the last attempt; dead-lettered", extra=extra)
        else:
            log.warning("job step failed", extra=extra)

    async def _apply(self, settlement: Settlement, delivery: Delivery, message: Base | None, ctx: Context) -> None:
        """Carry out ``settlement``: report the job's failure when it says so, settle the delivery,
        record the one metric it names."""
        if isinstance(settlement, Ack | DeadLetter) and settlement.report and settlement.error is not None:
            if not await self._report_failure(message, settlement.error, ctx):
                settlement = unreported(settlement)
        match settlement:
            case Ack():
                await delivery.ack()
                if settlement.remember:
                    self._remember(delivery.envelope.message_id)
            case Retry():
                await delivery.retry(actor=self.actor.name, delay=settlement.delay, error=settlement.error)
                try:  # a follower sees the wait; announcing it must never unsettle the retry
                    await self.actor.on_retry(message, settlement.error, ctx, attempt=delivery.envelope.attempt,
                                              delay=settlement.delay)
                except Exception:
                    log.warning("could not announce the retry", exc_info=True)
            case DeadLetter():
                await delivery.dead_letter(actor=self.actor.name, error=settlement.error)
            case Release():
                await delivery.release()
        if settlement.outcome is not None:
            error = getattr(settlement, "error", None)
            metrics.message_outcome(self.actor.name, settlement.outcome, str(error.code) if error else "")

    async def _report_failure(self, message: Base | None, error: Error, ctx: Context) -> bool:
        """Tell the job about the failure; False when that failed too (storage or broker down)."""
        try:
            await self.actor.on_failure(message, error, ctx)
        except Exception:
            # the message must still be settled: left unacked on a live channel it is never redelivered
            log.exception("could not report the failure; the message is dead-lettered for a replay")
            return False
        return True

    def _remember(self, message_id: str) -> None:
        self._done[message_id] = None
        while len(self._done) > DEDUPE_MEMORY:
            self._done.popitem(last=False)
