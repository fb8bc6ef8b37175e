"""The actor runtime: typed handlers, failure policy, time limit, dedupe and graceful shutdown.

An actor binds handlers to message types by annotation::

    class Verifier(Actor):
        name = "verifier"

        async def verify(self, message: VerifyObject, ctx: Context) -> None: ...

A Worker consumes the actor's queue and, for each delivery, decodes it (undecodable → dead letter
at once), runs the handler under the actor's time limit and settles the delivery by policy:

- success → ack;
- JobError that is not retryable, or the time limit → the job's failure is reported, ack;
- retryable JobError or a transient error → a delayed retry, and after the last attempt a dead
  letter with diagnostics plus the job's failure;
- any other exception → treated as transient with code ``internal``;
- shutdown (cancellation) → release: the message is redelivered, never dead-lettered.
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

import aiohttp

from actors import metrics
from actors.logs import actor_var, job_id_var, message_id_var
from actors.settings import Settings
from bus.base import Bus, BusError, Delivery, retry_delay
from messages.codec import H_REPLAYS, DecodeError, Envelope, decode
from messages.errors import Error, ErrorCode, JobError
from messages.types import Base, StepFailed

log = logging.getLogger("getgoodtape.runtime")

#: message ids remembered per process to drop a redelivered duplicate of finished work
DEDUPE_MEMORY = 10_000

#: exceptions that say "the world is briefly unavailable", worth a delayed retry
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    BusError,
    aiohttp.ClientError,
    ConnectionError,
    TimeoutError,
    OSError,
)


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

    async def publish(self, message: Base, *, reply_to: str | None = None) -> None:
        """Publish a command or event (confirmed); the original reply-to and replay count travel along,
        so the result of a replayed step is known as such (it may revive its failed job)."""
        replays = self.envelope.replays
        await self.bus.publish(message, reply_to=reply_to or self.delivery.reply_to,
                               headers={H_REPLAYS: replays} if replays else None)


HandlerFn = Callable[[Base, Context], Awaitable[None]]


class Actor:
    """Base of every actor: a name, typed handlers, and hooks for setup and failures."""

    name: ClassVar[str]
    #: this actor's own step name in StepFailed and logs
    step: ClassVar[str] = ""
    #: unacked messages at once when GGT_PREFETCH does not say (how much work one process takes on)
    prefetch: ClassVar[int] = 4

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
        """Turn an unexpected exception into a coded error; transient ones are retryable."""
        if isinstance(exc, JobError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            return self.classify(exc.exceptions[0])  # a TaskGroup wraps the one error that ended it
        if isinstance(exc, TRANSIENT_ERRORS):
            return JobError(ErrorCode.STORAGE_UNAVAILABLE if "s3" in repr(exc).lower() else ErrorCode.INTERNAL,
                            f"{type(exc).__name__}: {exc}", retryable=True)
        return JobError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", retryable=True)

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
                await delivery.release()
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
        try:
            message = decode(delivery.body, type_name_hint=env.type or None, schema=env.schema or None)
        except DecodeError as exc:
            error = Error.of(ErrorCode.UNDECODABLE_MESSAGE, f"{exc.field}: {exc.reason}" if exc.field else exc.reason)
            log.warning("undecodable message dead-lettered", extra={"field": exc.field, "reason": exc.reason})
            await self.actor.on_failure(None, error, ctx)
            await delivery.dead_letter(actor=self.actor.name, error=error)
            metrics.message_outcome(self.actor.name, "dead_lettered", error.code)
            return
        if delivery.delivery_count >= self.settings.delivery_limit:
            # the broker would dead-letter the message after this delivery without a word to the job:
            # a process died on it every time; end it here, reported, instead of a last crash
            error = Error.of(ErrorCode.INTERNAL, f"delivered {delivery.delivery_count + 1} times without being "
                             "settled (the handling process kept dying)")
            log.error("crash loop: dead-lettered before the delivery limit", extra={"deliveries": delivery.delivery_count})
            await self._report_failure(message, error, ctx)
            await delivery.dead_letter(actor=self.actor.name, error=error)
            metrics.message_outcome(self.actor.name, "dead_lettered", error.code)
            return
        handler = self._handlers.get(type(message))
        if handler is None:
            error = Error.of(ErrorCode.UNDECODABLE_MESSAGE, f"actor {self.actor.name} has no handler for {env.type}")
            await delivery.dead_letter(actor=self.actor.name, error=error)
            metrics.message_outcome(self.actor.name, "dead_lettered", error.code)
            return
        while (other := self._running.get(env.message_id)) is not None:
            await other.wait()  # the same message is being handled right now: see how that ends
        if env.message_id in self._done:
            log.info("duplicate of finished work dropped")
            await delivery.ack()
            return
        self._running[env.message_id] = finished = asyncio.Event()
        try:
            await self._run_handler(handler, message, delivery, ctx)
        finally:
            del self._running[env.message_id]
            finished.set()

    async def _run_handler(self, handler: HandlerFn, message: Base, delivery: Delivery, ctx: Context) -> None:
        env = delivery.envelope
        limit = self.actor.time_limit(message)
        try:
            async with asyncio.timeout(limit) as deadline:
                await handler(message, ctx)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                failure = JobError(ErrorCode.TIMEOUT, f"{self.actor.name} ran past its {limit:.0f}s time limit")
            else:
                failure = self.actor.classify(exc)
            await self._settle_failure(message, failure, delivery, ctx, exc)
            return
        await delivery.ack()
        metrics.message_outcome(self.actor.name, "processed")
        self._remember(env.message_id)

    async def _settle_failure(self, message: Base, failure: JobError, delivery: Delivery, ctx: Context,
                              exc: BaseException) -> None:
        error = failure.to_error()
        attempt = delivery.envelope.attempt
        extra = {"code": str(error.code), "attempt": attempt, "detail": error.detail[:500]}
        if not failure.retryable:
            log.warning("job step failed", extra=extra)
            if not await self._report_failure(message, error, ctx):
                await delivery.dead_letter(actor=self.actor.name, error=error)
                metrics.message_outcome(self.actor.name, "dead_lettered", error.code)
                return
            await delivery.ack()
            metrics.message_outcome(self.actor.name, "failed", error.code)
            self._remember(delivery.envelope.message_id)
            return
        if attempt < self.settings.max_attempts:
            delay = retry_delay(attempt, self.settings.retry_delays, rng=self._rng)
            log.warning("transient failure, retrying", extra={**extra, "delay": round(delay, 3)},
                        exc_info=not isinstance(exc, JobError))
            await delivery.retry(actor=self.actor.name, delay=delay, error=error)
            metrics.message_outcome(self.actor.name, "retried", error.code)
            return
        log.error("failed after the last attempt; dead-lettered", extra=extra)
        await self._report_failure(message, error, ctx)
        await delivery.dead_letter(actor=self.actor.name, error=error)
        metrics.message_outcome(self.actor.name, "dead_lettered", error.code)

    async def _report_failure(self, message: Base, error: Error, ctx: Context) -> bool:
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
