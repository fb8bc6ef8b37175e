"""The endpoints: small functions reading the shared state from the app by typed keys."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path

import msgspec
from aiohttp import web

from actors.core.jobs import JobRecord, decode_record, job_id_for, store_owner
from actors.core.request import allowed_qualities, default_quality
from actors.gateway import sse
from actors.gateway.auth import request_tenant
from actors.gateway.errors import MESSAGES, ApiError, HttpCode, job_error_response, json_response
from actors.gateway.keys import (
    ACCEPTED,
    BUS,
    HUB,
    MONITOR,
    OPTIONS,
    PUBLIC_STORAGE,
    SETTINGS,
    STORAGE,
    TRACKER,
)
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
from actors.runtime import metrics
from bus.base import BusError
from messages.codec import DecodeError, decode, new_id
from messages.errors import Error, ErrorCode
from messages.types import JOB_ID_SHAPE, ConvertRequested, Format, Stage
from storage import JobStore, StorageUnavailable
from storage.keys import download_filename

#: the demo page and its assets
STATIC_DIR = Path(__file__).parent / "static"
#: seconds a redirect's presigned download URL stays valid (it is used at once)
DOWNLOAD_REDIRECT_TTL_S = 3600
#: a job id as the wire contract allows it (messages.types.JobId), matched whole (no trailing newline)
JOB_ID_RE = re.compile(JOB_ID_SHAPE)

log = logging.getLogger("getgoodtape.gateway")


def links(job_id: str) -> Links:
    """Where to follow a job."""
    base = f"/api/jobs/{job_id}"
    return Links(self=base, events=f"{base}/events", download=f"{base}/download")


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    if not JOB_ID_RE.fullmatch(job_id):
        raise ApiError(404, HttpCode.JOB_NOT_FOUND, detail="not a valid job id")
    return job_id


def storage_unavailable(exc: Exception) -> ApiError:
    """The 503 for a storage failure: the detail (endpoint, addresses) goes to the log, not the caller."""
    log.warning("storage unavailable", extra={"reason": str(exc)})
    return ApiError(503, HttpCode.STORAGE_UNAVAILABLE)


async def load_record(app: web.Application, owner: str, job_id: str) -> JobRecord | None:
    """The owner's record of the job, or None (also for another tenant's job); 503 when storage does
    not answer."""
    try:
        found = await JobStore(app[STORAGE]).load(job_id, owner=store_owner(owner))
    except StorageUnavailable as exc:
        raise storage_unavailable(exc) from exc
    if found is None:
        return None
    record = decode_record(found[0])
    return record if record.owner == owner else None


# ----------------------------------------------------------------------------------------- jobs


async def convert(request: web.Request) -> web.Response:
    """POST /api/convert: decode a ConvertRequested strictly, publish it, answer 202 with the job's links."""
    try:
        message = decode(await request.read(), type_name_hint="convert_requested")
    except DecodeError as exc:
        raise ApiError(400, HttpCode.INVALID_REQUEST, field=exc.field, detail=exc.reason) from None
    except RecursionError:  # JSON nested thousands deep: msgspec's decoder gives up on the stack
        raise ApiError(400, HttpCode.INVALID_REQUEST, detail="JSON nested too deeply") from None
    assert isinstance(message, ConvertRequested)
    if message.job_id is not None and not JOB_ID_RE.fullmatch(message.job_id):
        # the schema's pattern lets a trailing newline through; a job id is matched whole
        raise ApiError(400, HttpCode.INVALID_REQUEST, field="$.job_id", detail="not a valid job id")
    if message.reply_to is not None:
        # a queue on the broker is not an HTTP caller's to name: results come over /events
        raise ApiError(400, HttpCode.INVALID_REQUEST, field="$.reply_to",
                       detail="reply_to is for AMQP publishers; over HTTP follow /api/jobs/{id}/events")
    tenant = request_tenant(request)
    # the same id the coordinator would derive, so an idempotency key keeps naming one job of this tenant
    job_id = message.job_id or (job_id_for(message, message_id="", owner=tenant) if message.idempotency_key
                                else new_id())
    try:
        await request.app[BUS].publish(msgspec.structs.replace(message, job_id=job_id), owner=tenant)
    except BusError as exc:
        log.warning("bus unavailable", extra={"reason": str(exc)})
        raise ApiError(503, HttpCode.BUS_UNAVAILABLE) from exc
    request.app[ACCEPTED].remember(tenant, job_id)
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
    tenant = request_tenant(request)
    record = await load_record(request.app, tenant, job_id)
    if record is not None:
        return json_response(job_view(record))
    if request.app[ACCEPTED].knows(tenant, job_id):
        return json_response(JobView(job_id=job_id, stage=Stage.QUEUED, percent=0.0, format="", url="",
                                     links=links(job_id)))
    raise ApiError(404, HttpCode.JOB_NOT_FOUND)


async def events(request: web.Request) -> web.StreamResponse:
    """GET /api/jobs/{id}/events: the job's state, then its live events until the final one (SSE)."""
    job_id = _job_id(request)
    tenant = request_tenant(request)
    app = request.app
    last_seen = sse.parse_last_event_id(request.headers.get("Last-Event-ID") or request.query.get("last_event_id"))
    # listen on the shared subscription BEFORE reading the record: nothing published in between is missed
    try:
        with app[HUB].listen(tenant, job_id, limit=app[SETTINGS].sse_streams_per_key) as live:
            return await _stream(request, tenant, job_id, live, last_seen)
    except sse.TooManyStreams:
        raise ApiError(429, HttpCode.TOO_MANY_STREAMS, headers={"Retry-After": "5"}) from None


async def _stream(request: web.Request, tenant: str, job_id: str, live: asyncio.Queue,
                  last_seen: int) -> web.StreamResponse:
    app = request.app
    options = app[OPTIONS]
    record = await load_record(app, tenant, job_id)
    if record is not None:
        first = sse.state_event(record)
    elif app[ACCEPTED].knows(tenant, job_id):
        first = sse.queued_event(job_id)
    else:  # a job another gateway accepted may be a moment from its first record or event
        first = await sse.first_event(live, timeout=options.unknown_job_wait)
        if first is None:
            raise ApiError(404, HttpCode.JOB_NOT_FOUND)
    if sse.is_final(first) and sse.event_id(first) <= last_seen:
        return web.Response(status=204)  # EventSource stops reconnecting on 204
    response = await sse.open_stream(request)
    try:
        await sse.run_stream(response, first=first, live=live, last_seen=last_seen, keepalive=options.keepalive)
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass  # the client left
    return response


async def download(request: web.Request) -> web.Response:
    """GET /api/jobs/{id}/download: 302 to a fresh presigned URL on the public endpoint."""
    job_id = _job_id(request)
    record = await load_record(request.app, request_tenant(request), job_id)
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
    """GET /api/storage/stats: the bucket's files and uploads (a listing reused for seconds), the
    outcome rates, the data path."""
    app = request.app
    try:
        stored = await app[MONITOR].storage_stats()
    except StorageUnavailable as exc:
        raise storage_unavailable(exc) from exc
    queues: dict[str, int] = {}
    with contextlib.suppress(Exception):  # figures without queue depths beat no figures
        queues = await app[MONITOR].queue_depths()
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


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: the broker and the storage answer a cheap call each (the verdict is reused for a
    few seconds); 503 names the one that failed."""
    checks = await request.app[MONITOR].readiness.get()
    broker, bucket = checks["broker"], checks["storage"]
    if broker == "ok" and bucket == "ok":
        return json_response(Health(status="ready", checks=checks))
    code = HttpCode.BUS_UNAVAILABLE if broker != "ok" else HttpCode.STORAGE_UNAVAILABLE
    failed = ", ".join(name for name, result in checks.items() if result != "ok")
    body = {**msgspec.to_builtins(Health(status="not_ready", checks=checks)),
            "error": msgspec.to_builtins(ErrorDetail(code=code, message=MESSAGES[code], detail=f"{failed} failed"))}
    return json_response(body, status=503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text; queue depths read from the bus at most every few seconds."""
    return await metrics.metrics_response(request.app[MONITOR])


# -------------------------------------------------------------------------------- description


async def openapi(request: web.Request) -> web.Response:
    """GET /api/openapi.json."""
    return json_response(openapi_document(auth=bool(request.app[SETTINGS].api_keys)))


def formats_view() -> Formats:
    """Every output format with its qualities and default (from actors.core.catalog)."""
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
