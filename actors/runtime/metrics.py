"""The product's Prometheus metrics, defined once: the same names in every process.

Each actor process records what it does (the runtime: messages and in-flight work; the coordinator:
presigning, processing times, file bytes it touched; the uploader: direct uploads and bytes
streamed; the verifier: verdicts). ``exposed(settings, bus)`` serves them on ``GGT_METRICS_PORT``;
the gateway serves them on its own ``/metrics``. Queue depths are read from the bus at each scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from messages.errors import ErrorCode, JobError

log = logging.getLogger("getgoodtape.metrics")

T = TypeVar("T")

#: the one registry of the product's metrics (plus process CPU/memory, the original's "Worker resources")
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

#: processing-time buckets in seconds: short clips finish in seconds, long talks in many minutes
SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)
#: the part of a storage request path that holds converted files (storage.keys' prefix)
CONVERTED_PATH = "/converted/"
#: seconds a scrape may spend asking the broker for queue depths
QUEUE_DEPTH_TIMEOUT_S = 3.0

# ------------------------------------------------------------------------------------ the metrics

PRESIGN_ATTEMPTS = Counter("ggt_presign_attempts", "Presigned-URL generations started by the coordinator.",
                           ["kind"], registry=REGISTRY)
PRESIGN_FAILURES = Counter("ggt_presign_failures", "Presigned-URL generations that failed.",
                           ["kind", "code"], registry=REGISTRY)
UPLOAD_ATTEMPTS = Counter("ggt_direct_upload_attempts", "Direct uploads (ffmpeg output → storage) started.",
                          ["format"], registry=REGISTRY)
UPLOAD_FAILURES = Counter("ggt_direct_upload_failures", "Direct uploads that failed, by error code.",
                          ["format", "code"], registry=REGISTRY)
BYTES_STREAMED = Counter("ggt_bytes_streamed", "Bytes the uploader streamed straight into storage.",
                         ["format"], registry=REGISTRY)
VERIFICATIONS = Counter("ggt_verifications", "Verdicts of the verifier on stored files.",
                        ["outcome"], registry=REGISTRY)
STAGE_SECONDS = Histogram("ggt_job_stage_seconds", "Seconds completed jobs spent in each stage (and total).",
                          ["format", "stage"], buckets=SECONDS_BUCKETS, registry=REGISTRY)
COORDINATOR_FILE_BYTES = Counter(
    "ggt_coordinator_file_bytes",
    "Bytes of converted files the coordinator's storage client sent or received (by design 0).",
    ["direction"], registry=REGISTRY)
for _direction in ("sent", "received"):  # exported as 0 from the start: the demo's 0 is a reading
    COORDINATOR_FILE_BYTES.labels(_direction)
IN_FLIGHT = Gauge("ggt_jobs_in_flight", "Messages an actor is handling right now.", ["actor"], registry=REGISTRY)
WORKERS = Gauge("ggt_actor_workers", "Workers of each actor running in this process.", ["actor"],
                registry=REGISTRY)
PROCESSED = Counter("ggt_messages_processed", "Messages handled successfully.", ["actor"], registry=REGISTRY)
FAILED = Counter("ggt_messages_failed", "Messages whose step failed for good (not retryable).",
                 ["actor", "code"], registry=REGISTRY)
RETRIED = Counter("ggt_messages_retried", "Messages sent through a retry tier.", ["actor", "code"],
                  registry=REGISTRY)
DEAD_LETTERED = Counter("ggt_messages_dead_lettered", "Messages dead-lettered.", ["actor", "code"],
                        registry=REGISTRY)
UNAUTHENTICATED = Counter("ggt_messages_unauthenticated",
                          "Internal commands dead-lettered unread because their MAC was missing or wrong.",
                          ["actor"], registry=REGISTRY)
HTTP_REQUESTS = Counter("ggt_http_requests", "Requests the gateway answered, by method, route and status.",
                        ["method", "route", "status"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("ggt_queue_depth", "Messages waiting in a work or dead-letter queue (at the last scrape).",
                    ["queue"], registry=REGISTRY)

#: runtime outcome → its counter
OUTCOMES = {"failed": FAILED, "retried": RETRIED, "dead_lettered": DEAD_LETTERED}

# --------------------------------------------------------------------------------- recording helpers


def error_code_of(exc: BaseException) -> str:
    """A bounded label for a failure: the JobError's code, else ``internal``."""
    return str(exc.code) if isinstance(exc, JobError) else str(ErrorCode.INTERNAL)


def message_outcome(actor: str, outcome: str, code: str = "") -> None:
    """Count one settled message: ``processed``, ``failed``, ``retried`` or ``dead_lettered``."""
    if outcome == "processed":
        PROCESSED.labels(actor).inc()
    else:
        OUTCOMES[outcome].labels(actor, code or str(ErrorCode.INTERNAL)).inc()


async def counted_presign(kind: str, call: Awaitable[T]) -> T:
    """Await a presigning call (``upload`` or ``download``), counting the attempt and any failure."""
    PRESIGN_ATTEMPTS.labels(kind).inc()
    try:
        return await call
    except Exception as exc:
        PRESIGN_FAILURES.labels(kind, error_code_of(exc)).inc()
        raise


async def counted_upload(call: Awaitable[T], *, format: str) -> T:
    """Await a direct upload, counting the attempt, a failure by code, and the bytes it stored."""
    UPLOAD_ATTEMPTS.labels(format).inc()
    try:
        result = await call
    except Exception as exc:
        UPLOAD_FAILURES.labels(format, error_code_of(exc)).inc()
        raise
    BYTES_STREAMED.labels(format).inc(getattr(result, "size", 0))
    return result


def verification(ok: bool) -> None:
    """Count one verdict of the verifier."""
    VERIFICATIONS.labels("passed" if ok else "failed").inc()


def job_timings(format: str, timings: dict[str, float]) -> None:
    """Record a completed job's seconds per stage (JobCompleted.timings)."""
    for stage, seconds in timings.items():
        STAGE_SECONDS.labels(format, stage).observe(seconds)


def watch_file_bytes(client: Any, *, counter: Counter = COORDINATOR_FILE_BYTES) -> None:
    """Count every byte of a converted file that passes through this storage client.

    Hooked into botocore's request events, so it measures what the client really sends and
    receives: if the coordinator ever relayed file data, this counter would show it.
    """
    def sent(request: Any = None, **_: Any) -> None:
        # a file's bytes leave in a PUT (PutObject, UploadPart); a POST to the key carries only the
        # multipart control XML (create, complete: the part ETags), which is not file data
        if (request is not None and getattr(request, "method", "") == "PUT"
                and CONVERTED_PATH in str(getattr(request, "url", ""))):
            body = getattr(request, "body", None)
            length = (getattr(request, "headers", None) or {}).get("Content-Length")
            size = int(length) if length else len(body) if isinstance(body, bytes | bytearray) else 0
            if size:
                counter.labels("sent").inc(size)

    def received(http_response: Any = None, parsed: Any = None, **_: Any) -> None:
        if http_response is not None and CONVERTED_PATH in str(getattr(http_response, "url", "")):
            size = int((parsed or {}).get("ContentLength") or 0)
            if size:
                counter.labels("received").inc(size)

    client.meta.events.register("before-send.s3", sent)
    client.meta.events.register("after-call.s3.GetObject", received)


def value(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of a sample of this registry (0 when it has none yet)."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def total(name: str, **match: str) -> float:
    """The sum of every sample called ``name`` whose labels include ``match``."""
    found = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in match.items()):
                found += sample.value
    return found


def actors_here() -> set[str]:
    """The actors with a worker running in this process."""
    return {labels["actor"] for labels, n in _gauge_values(WORKERS) if n > 0}


def _gauge_values(gauge: Gauge) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for family in gauge.collect() for s in family.samples]


# ------------------------------------------------------------------------------------- exposition


async def refresh_queue_depths(bus: Any) -> None:
    """Read the bus's queue depths into ``ggt_queue_depth`` (a broker that does not answer keeps the old ones)."""
    try:
        async with asyncio.timeout(QUEUE_DEPTH_TIMEOUT_S):
            depths = await bus.queue_depths()
    except Exception as exc:  # a scrape must not fail because the broker is briefly away
        log.warning("queue depths unavailable", extra={"reason": f"{type(exc).__name__}: {exc}"})
        return
    for queue, depth in depths.items():
        QUEUE_DEPTH.labels(queue).set(depth)


def exposition() -> tuple[bytes, str]:
    """The registry in Prometheus' text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


async def metrics_response(bus: Any | None) -> web.Response:
    """An aiohttp response with fresh queue depths and every metric."""
    if bus is not None:
        await refresh_queue_depths(bus)
    body, content_type = exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


@contextlib.asynccontextmanager
async def metrics_server(host: str, port: int, *, bus: Any | None) -> AsyncIterator[int]:
    """Serve ``GET /metrics`` on ``host:port`` until the block ends; yields the bound port."""
    async def handler(request: web.Request) -> web.Response:
        return await metrics_response(bus)

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    log.info("metrics served", extra={"host": host, "port": bound})
    try:
        yield bound
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def exposed(settings: Any, bus: Any) -> AsyncIterator[int | None]:
    """Serve this process's metrics on ``settings.metrics_port`` (on ``settings.http_host``) when > 0."""
    if settings.metrics_port <= 0:
        yield None
        return
    async with metrics_server(settings.http_host, settings.metrics_port, bus=bus) as port:
        yield port
