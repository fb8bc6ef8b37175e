"""The endpoints: small functions reading the shared state from the app by typed keys."""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

import msgspec
from aiohttp import web

from actors import metrics
from actors.gateway import sse
from actors.gateway.errors import MESSAGES, ApiError, HttpCode, job_error_response, json_response
from actors.gateway.keys import ACCEPTED, BUS, OPTIONS, PUBLIC_STORAGE, SETTINGS, STORAGE, STREAMS, TRACKER
from actors.gateway.openapi import openapi_document
from actors.gateway.views import (
    Accepted,
    Counts,
    DataPath,
    ErrorDetail,
    FormatInfo,
    Formats,
    FormatStatsView,
    Health,
    JobView,
    Links,
    Rates,
    StatsView,
    StorageView,
)
from actors.jobs import JobRecord, decode_record, job_id_for
from actors.planning import allowed_qualities, default_quality
from bus.base import BusError
from messages.codec import DecodeError, decode, new_id
from messages.errors import Error, ErrorCode
from messages.types import ConvertRequested, Format, Stage
from storage import JobStore, StorageUnavailable

#: the demo page and its assets
STATIC_DIR = Path(__file__).parent / "static"
#: seconds a redirect's presigned download URL stays valid (it is used at once)
DOWNLOAD_REDIRECT_TTL_S = 3600
#: seconds each readiness check may take
READY_TIMEOUT_S = 3.0
#: a job id as the wire contract allows it (messages.types.JobId)
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{7,63}$")


def links(job_id: str) -> Links:
    """Where to follow a job."""
    base = f"/api/jobs/{job_id}"
    return Links(self=base, events=f"{base}/events", download=f"{base}/download")


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    if not JOB_ID_RE.match(job_id):
        raise ApiError(404, HttpCode.JOB_NOT_FOUND, detail="not a valid job id")
    return job_id


async def load_record(app: web.Application, job_id: str) -> JobRecord | None:
    """The coordinator's record of the job, or None; 503 when storage does not answer."""
    try:
        found = await JobStore(app[STORAGE]).load(job_id)
    except StorageUnavailable as exc:
        raise ApiError(503, HttpCode.STORAGE_UNAVAILABLE, detail=str(exc)) from exc
    return decode_record(found[0]) if found else None


# ----------------------------------------------------------------------------------------- jobs


async def convert(request: web.Request) -> web.Response:
    """POST /api/convert: decode a ConvertRequested strictly, publish it, answer 202 with the job's links."""
    try:
        message = decode(await request.read(), type_name_hint="convert_requested")
    except DecodeError as exc:
        raise ApiError(400, HttpCode.INVALID_REQUEST, field=exc.field, detail=exc.reason) from None
    assert isinstance(message, ConvertRequested)
    if message.reply_to is not None:
        # a queue on the broker is not an HTTP caller's to name: results come over /events
        raise ApiError(400, HttpCode.INVALID_REQUEST, field="$.reply_to",
                       detail="reply_to is for AMQP publishers; over HTTP follow /api/jobs/{id}/events")
    # the same id the coordinator would derive, so an idempotency key keeps naming one job
    job_id = message.job_id or (job_id_for(message, message_id="") if message.idempotency_key else new_id())
    try:
        await request.app[BUS].publish(msgspec.structs.replace(message, job_id=job_id))
    except BusError as exc:
        raise ApiError(503, HttpCode.BUS_UNAVAILABLE, detail=str(exc)) from exc
    request.app[ACCEPTED].remember(job_id)
    return json_response(Accepted(job_id=job_id, links=links(job_id)), status=202,
                         headers={"Location": links(job_id).self})


def job_view(record: JobRecord) -> JobView:
    """What GET /api/jobs/{id} shows of a record."""
    return JobView(job_id=record.job_id, stage=record.stage, percent=record.percent,
                   format=record.request.format.value, url=record.request.url, created_at=record.created_at,
                   updated_at=record.updated_at, result=record.result, error=record.error,
                   links=links(record.job_id))


async def job(request: web.Request) -> web.Response:
    """GET /api/jobs/{id}: the job record (or ``queued`` for a job accepted here and not yet recorded)."""
    job_id = _job_id(request)
    record = await load_record(request.app, job_id)
    if record is not None:
        return json_response(job_view(record))
    if job_id in request.app[ACCEPTED]:
        return json_response(JobView(job_id=job_id, stage=Stage.QUEUED, percent=0.0, format="", url="",
                                     links=links(job_id)))
    raise ApiError(404, HttpCode.JOB_NOT_FOUND)


async def events(request: web.Request) -> web.StreamResponse:
    """GET /api/jobs/{id}/events: the job's state, then its live events until the final one (SSE)."""
    job_id = _job_id(request)
    app = request.app
    last_seen = sse.parse_last_event_id(request.headers.get("Last-Event-ID") or request.query.get("last_event_id"))
    live: asyncio.Queue = asyncio.Queue()
    # subscribe BEFORE reading the record: nothing published in between is missed
    async with app[BUS].subscribe(f"job.{job_id}.#") as subscription:
        # owned by this block (not a TaskGroup: that would wrap a 404 raised here in an ExceptionGroup)
        pump = asyncio.create_task(sse.pump(subscription, live))
        try:
            return await _stream(request, job_id, live, last_seen)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


async def _stream(request: web.Request, job_id: str, live: asyncio.Queue, last_seen: int) -> web.StreamResponse:
    app = request.app
    options = app[OPTIONS]
    record = await load_record(app, job_id)
    if record is not None:
        first = sse.state_event(record)
    elif job_id in app[ACCEPTED]:
        first = sse.queued_event(job_id)
    else:  # a job another gateway accepted may be a moment from its first record or event
        first = await sse.first_event(live, timeout=options.unknown_job_wait)
        if first is None:
            raise ApiError(404, HttpCode.JOB_NOT_FOUND)
    if sse.is_final(first) and sse.event_id(first) <= last_seen:
        return web.Response(status=204)  # EventSource stops reconnecting on 204
    response = await sse.open_stream(request)
    app[STREAMS].add(live)
    try:
        await sse.run_stream(response, first=first, live=live, last_seen=last_seen, keepalive=options.keepalive)
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass  # the client left
    finally:
        app[STREAMS].discard(live)
    return response


async def download(request: web.Request) -> web.Response:
    """GET /api/jobs/{id}/download: 302 to a fresh presigned URL on the public endpoint."""
    from actors.coordinator import download_filename

    job_id = _job_id(request)
    record = await load_record(request.app, job_id)
    if record is None:
        raise ApiError(404, HttpCode.JOB_NOT_FOUND)
    if record.stage == Stage.FAILED:
        return job_error_response(record.error or Error.of(ErrorCode.INTERNAL), status=409)
    if record.stage != Stage.COMPLETED or record.plan is None:
        raise ApiError(409, HttpCode.JOB_NOT_FINISHED, detail=f"stage {record.stage.value}")
    filename = download_filename(record.plan.title, record.plan.extension, job_id)
    url = await metrics.counted_presign("download", request.app[PUBLIC_STORAGE].presign_get(
        record.key, expires=DOWNLOAD_REDIRECT_TTL_S, filename=filename))
    raise web.HTTPFound(url)


# ---------------------------------------------------------------------------------- monitoring


async def stats(request: web.Request) -> web.Response:
    """GET /api/storage/stats: the bucket's files and uploads, the outcome rates, the data path."""
    app = request.app
    try:
        stored = await app[STORAGE].stats()
    except StorageUnavailable as exc:
        raise ApiError(503, HttpCode.STORAGE_UNAVAILABLE, detail=str(exc)) from exc
    queues: dict[str, int] = {}
    with contextlib.suppress(Exception):  # figures without queue depths beat no figures
        async with asyncio.timeout(READY_TIMEOUT_S):
            queues = await app[BUS].queue_depths()
    tracker = app[TRACKER]
    here = metrics.actors_here()
    view = StatsView(
        storage=StorageView(objects=stored.objects, bytes=stored.bytes, open_uploads=stored.open_uploads,
                            by_format={f: FormatStatsView(objects=s.objects, bytes=s.bytes)
                                       for f, s in stored.by_format.items()}),
        rates=msgspec.convert(tracker.rates(), type=Rates),
        counts=msgspec.convert(tracker.counts(), type=Counts),
        data_path=DataPath(
            coordinator_file_bytes=(int(metrics.total("ggt_coordinator_file_bytes_total"))
                                    if "coordinator" in here else None),
            uploader_bytes_streamed=int(metrics.total("ggt_bytes_streamed_total")) if "uploader" in here else None,
            completed_bytes=tracker.completed_bytes,
            actors_in_process=sorted(here),
        ),
        queues=queues,
    )
    return json_response(view)


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process answers."""
    return json_response(Health(status="ok"))


async def _check(call) -> str:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await call
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {exc}"[:300]
    return "ok"


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: the broker and the storage answer a cheap call each; 503 names the one that failed."""
    storage = request.app[STORAGE]
    broker, bucket = await asyncio.gather(_check(request.app[BUS].queue_depths()),
                                          _check(storage.client.head_bucket(Bucket=storage.bucket)))
    checks = {"broker": broker, "storage": bucket}
    if broker == "ok" and bucket == "ok":
        return json_response(Health(status="ready", checks=checks))
    code = HttpCode.BUS_UNAVAILABLE if broker != "ok" else HttpCode.STORAGE_UNAVAILABLE
    failed = ", ".join(name for name, result in checks.items() if result != "ok")
    body = {**msgspec.to_builtins(Health(status="not_ready", checks=checks)),
            "error": msgspec.to_builtins(ErrorDetail(code=code, message=MESSAGES[code], detail=f"{failed} failed"))}
    return json_response(body, status=503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text, queue depths read from the bus now."""
    return await metrics.metrics_response(request.app[BUS])


# -------------------------------------------------------------------------------- description


async def openapi(request: web.Request) -> web.Response:
    """GET /api/openapi.json."""
    return json_response(openapi_document(auth=bool(request.app[SETTINGS].api_keys)))


def formats_view() -> Formats:
    """Every output format with its qualities and default (from actors.planning)."""
    return Formats(formats=[
        FormatInfo(format=f.value, video=f.is_video, qualities=[q.value for q in allowed_qualities(f)],
                   default_quality=default_quality(f).value)
        for f in Format
    ])


async def formats(request: web.Request) -> web.Response:
    """GET /api/formats."""
    return json_response(formats_view())


async def demo(request: web.Request) -> web.FileResponse:
    """GET /file-flow-demo: the live demo page."""
    return web.FileResponse(STATIC_DIR / "file-flow-demo.html")


async def root(request: web.Request) -> web.Response:
    """GET /: to the demo page."""
    raise web.HTTPFound("/file-flow-demo")
