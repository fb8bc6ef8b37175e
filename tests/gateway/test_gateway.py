"""The HTTP gateway against the real pipeline (in-memory bus, fresh bucket, loopback media).

aiohttp's TestServer/TestClient serve the app on 127.0.0.1; the four actors run in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from actors.bootstrap.wiring import topology
from actors.gateway import sse
from actors.gateway.app import make_app
from actors.gateway.keys import GatewayOptions
from actors.gateway.stats import OutcomeTracker
from bus.memory import MemoryBus
from messages.errors import Error, ErrorCode
from messages.types import Format, JobCompleted, JobFailed, JobProgress, Quality, Stage
from tests.fixtures.broker import test_settings as settings_for_tests

#: quick keepalives and a short wait for unknown jobs, so the tests see both; nothing cached, so
#: readiness and figures follow what a test changes at once
FAST = GatewayOptions(keepalive=0.5, unknown_job_wait=0.3, monitor_ttl=0, stats_ttl=0)
#: two API keys as GGT_API_KEYS bare tokens (each its own tenant)
KEY_ONE, KEY_TWO = "key-one-0123456789abcdef", "key-two-0123456789abcdef"
#: seconds a test waits for a whole job's event stream
STREAM_TIMEOUT = 120.0


class Event(msgspec.Struct, frozen=True):
    """One parsed SSE event."""

    id: int
    event: str
    data: dict


@contextlib.asynccontextmanager
async def serve(app) -> AsyncIterator[TestClient]:
    """A test client of ``app`` served on 127.0.0.1."""
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


@pytest.fixture
async def gateway(pipeline) -> AsyncIterator[TestClient]:
    """The gateway on the running pipeline's bus and bucket (no keys, no rate limit)."""
    settings = msgspec.structs.replace(pipeline.settings, rate_limit_per_minute=0)
    async with serve(make_app(settings, bus=pipeline.bus, storage=pipeline.storage, options=FAST)) as client:
        yield client


@contextlib.asynccontextmanager
async def bare_gateway(storage, *, options: GatewayOptions = FAST, **overrides) -> AsyncIterator[TestClient]:
    """A gateway on an idle in-memory bus (no actors) with settings ``overrides``."""
    settings = settings_for_tests(**overrides)
    bus = MemoryBus(topology(settings))
    await bus.start()
    try:
        async with serve(make_app(settings, bus=bus, storage=storage, options=options)) as client:
            yield client
    finally:
        await bus.close()


async def read_events(response: aiohttp.ClientResponse, *, limit: int | None = None,
                      keepalives: list[float] | None = None) -> list[Event]:
    """Parse SSE events until the stream ends (or ``limit`` events were read)."""
    events: list[Event] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith(":") and keepalives is not None:
                keepalives.append(time.monotonic())
            elif line == "" and "data" in fields:
                events.append(Event(int(fields["id"]), fields["event"], json.loads(fields["data"])))
                fields = {}
                if limit is not None and len(events) >= limit:
                    break
            elif ":" in line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.strip()
    return events


async def submit(client: TestClient, media_server, path: str = "audio.mp3", **fields) -> str:
    response = await client.post("/api/convert", json={"url": media_server.url(path), "format": "mp3", **fields})
    assert response.status == 202, await response.text()
    return (await response.json())["job_id"]


async def follow(client: TestClient, job_id: str, **headers: str) -> list[Event]:
    async with client.get(f"/api/jobs/{job_id}/events", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return await read_events(response)


# --------------------------------------------------------------------------------- the job flow


async def test_convert_answers_202_and_the_events_stream_runs_to_completed(gateway, media_server):
    response = await gateway.post("/api/convert", json={"url": media_server.url("audio.mp3"), "format": "mp3"})
    assert response.status == 202
    body = await response.json()
    job_id = body["job_id"]
    assert body["links"] == {"self": f"/api/jobs/{job_id}", "events": f"/api/jobs/{job_id}/events",
                             "download": f"/api/jobs/{job_id}/download"}
    assert response.headers["Location"] == f"/api/jobs/{job_id}"

    events = await follow(gateway, job_id)
    ids = [e.id for e in events]
    assert ids == sorted(set(ids)), "event ids grow strictly"
    assert events[-1].event == "completed" and events[-1].data["job_id"] == job_id
    progress = [e for e in events if e.event == "progress"]
    assert progress, "progress events come before the final one"
    assert [p.data["percent"] for p in progress] == sorted(p.data["percent"] for p in progress)
    assert {p.data["stage"] for p in progress} >= {"converting"}
    assert all(e.event == "progress" for e in events[:-1])


async def test_resuming_with_last_event_id_skips_what_was_seen(gateway, media_server):
    job_id = await submit(gateway, media_server, "av_h264_aac.mp4")
    async with gateway.get(f"/api/jobs/{job_id}/events") as response:
        seen = await read_events(response, limit=1)
    last = seen[-1].id

    resumed = await follow(gateway, job_id, **{"Last-Event-ID": str(last)})
    assert resumed and all(e.id > last for e in resumed)
    assert resumed[-1].event == "completed"

    # a client that saw the final event is told to stop reconnecting
    done = await gateway.get(f"/api/jobs/{job_id}/events", headers={"Last-Event-ID": str(resumed[-1].id)})
    assert done.status == 204


async def test_a_finished_job_yields_its_final_event_at_once(gateway, media_server):
    job_id = await submit(gateway, media_server)
    await follow(gateway, job_id)
    started = time.monotonic()
    again = await follow(gateway, job_id)
    assert [e.event for e in again] == ["completed"]
    assert time.monotonic() - started < FAST.keepalive, "no wait for live events once the job is over"


async def test_a_job_accepted_but_not_yet_recorded_streams_queued_then_keepalives(storage):
    async with bare_gateway(storage) as client:  # no coordinator: the job stays queued
        response = await client.post("/api/convert", json={"url": "http://127.0.0.1/a.mp4", "format": "mp3"})
        job_id = (await response.json())["job_id"]
        assert (await (await client.get(f"/api/jobs/{job_id}")).json())["stage"] == "queued"
        keepalives: list[float] = []
        async with client.get(f"/api/jobs/{job_id}/events") as stream:
            first = await read_events(stream, limit=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FAST.keepalive * 2.5):
                    await read_events(stream, keepalives=keepalives)
    assert first[0].event == "progress" and first[0].data["stage"] == "queued" and first[0].id == 0
    assert len(keepalives) >= 2


async def test_download_redirects_to_a_presigned_url_that_returns_the_file(gateway, media_server, pipeline):
    job_id = await submit(gateway, media_server)
    events = await follow(gateway, job_id)
    completed = events[-1].data
    response = await gateway.get(f"/api/jobs/{job_id}/download", allow_redirects=False)
    assert response.status == 302
    location = response.headers["Location"]
    assert location.startswith(pipeline.settings.s3_endpoint)
    async with aiohttp.ClientSession() as http, http.get(location) as stored:
        assert stored.status == 200
        data = await stored.read()
    assert len(data) == completed["size"]
    assert hashlib.sha256(data).hexdigest() == completed["sha256"]


async def test_the_job_endpoint_shows_the_record(gateway, media_server):
    job_id = await submit(gateway, media_server)
    await follow(gateway, job_id)
    response = await gateway.get(f"/api/jobs/{job_id}")
    assert response.status == 200
    job = await response.json()
    assert job["job_id"] == job_id and job["stage"] == "completed" and job["percent"] == 100
    assert job_id in job["result"]["key"] and job["result"]["key"].endswith(".mp3") and job["error"] is None
    assert job["format"] == "mp3" and job["url"].startswith("http://127.0.0.1:")


async def test_a_failed_job_streams_failed_and_its_download_answers_with_its_code(gateway, media_server):
    job_id = await submit(gateway, media_server, "not_media.mp4")
    events = await follow(gateway, job_id)
    assert events[-1].event == "failed"
    code = events[-1].data["error"]["code"]
    response = await gateway.get(f"/api/jobs/{job_id}/download", allow_redirects=False)
    assert response.status == 409
    assert (await response.json())["error"]["code"] == code


async def test_an_idempotency_key_names_one_job(gateway, media_server):
    first = await submit(gateway, media_server, idempotency_key="order-4711")
    second = await submit(gateway, media_server, idempotency_key="order-4711")
    assert first == second


async def test_stats_show_storage_rates_and_a_coordinator_that_touched_no_file_byte(gateway, media_server):
    job_id = await submit(gateway, media_server)
    events = await follow(gateway, job_id)
    size = events[-1].data["size"]
    response = await gateway.get("/api/storage/stats")
    assert response.status == 200
    stats = await response.json()
    assert stats["storage"]["objects"] == 1 and stats["storage"]["bytes"] == size
    assert stats["storage"]["by_format"]["mp3"] == {"objects": 1, "bytes": size}
    assert stats["storage"]["open_uploads"] == 0
    assert stats["rates"]["presigned_url_success_rate"] == 1.0
    assert stats["rates"]["direct_upload_success_rate"] == 1.0
    assert stats["rates"]["verification_pass_rate"] == 1.0
    assert stats["rates"]["average_processing_seconds"] > 0
    assert stats["counts"]["completed"] == 1 and stats["counts"]["failed"] == 0
    data_path = stats["data_path"]
    assert set(data_path["actors_in_process"]) == {"coordinator", "converter", "uploader", "verifier"}
    assert data_path["coordinator_file_bytes"] == 0
    assert data_path["uploader_bytes_streamed"] >= size and data_path["completed_bytes"] == size
    assert "ggt.coordinator" in stats["queues"]


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("body", "field"), [
    ({"url": "http://127.0.0.1/a.mp4", "format": "mp9"}, "$.format"),
    ({"format": "mp3"}, "$.url"),
    ({"url": "http://127.0.0.1/a.mp4", "format": "mp3", "start": -1}, "$.start"),
    ({"url": "http://127.0.0.1/a.mp4", "format": "mp3", "job_id": "no/slashes"}, "$.job_id"),
    # an HTTP caller may not name a broker queue for the final event (it follows /events instead)
    ({"url": "http://127.0.0.1/a.mp4", "format": "mp3", "reply_to": "ggt.uploader"}, "$.reply_to"),
])
async def test_a_bad_request_answers_400_naming_the_field(gateway, body, field):
    response = await gateway.post("/api/convert", json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "invalid_request" and error["field"] == field and error["message"]


async def test_a_body_that_is_not_json_answers_400(gateway):
    response = await gateway.post("/api/convert", data=b"{nope", headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_request"


async def test_unknown_jobs_and_routes_answer_json_404s(gateway):
    for path in ("/api/jobs/unknown-job-123", "/api/jobs/unknown-job-123/events",
                 "/api/jobs/unknown-job-123/download"):
        response = await gateway.get(path)
        assert response.status == 404, path
        assert (await response.json())["error"]["code"] == "job_not_found"
    response = await gateway.get("/no/such/route")
    assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
    response = await gateway.delete("/api/convert")
    assert response.status == 405 and (await response.json())["error"]["code"] == "method_not_allowed"


# --------------------------------------------------------------------------------------- access


async def test_with_keys_configured_the_job_endpoints_need_one(storage):
    async with bare_gateway(storage, api_keys=(KEY_ONE, KEY_TWO), rate_limit_per_minute=0) as client:
        body = {"url": "http://127.0.0.1/a.mp4", "format": "mp3"}
        response = await client.post("/api/convert", json=body)
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = await client.post("/api/convert", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        ok = await client.post("/api/convert", json=body, headers={"Authorization": f"Bearer {KEY_TWO}"})
        assert ok.status == 202
        job_id = (await ok.json())["job_id"]
        assert (await client.get(f"/api/jobs/{job_id}")).status == 401
        assert (await client.get(f"/api/jobs/{job_id}?access_token={KEY_TWO}")).status == 200
        assert (await client.get(f"/api/jobs/{job_id}?access_token={KEY_ONE}")).status == 404, "another tenant's"
        assert (await client.get("/api/storage/stats")).status == 401
        for public in ("/healthz", "/metrics", "/api/openapi.json", "/api/formats", "/file-flow-demo"):
            assert (await client.get(public)).status == 200, public


async def test_past_the_rate_limit_requests_answer_429_with_retry_after(storage):
    async with bare_gateway(storage, rate_limit_per_minute=3) as client:
        statuses = [(await client.get("/api/jobs/unknown-job-123")).status for _ in range(3)]
        assert statuses == [404, 404, 404]
        limited = await client.get("/api/jobs/unknown-job-123")
        assert limited.status == 429
        assert (await limited.json())["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert (await client.get("/healthz")).status == 200, "health is never limited"


async def test_cors_lets_configured_origins_in(storage):
    origin = "http://app.test"
    async with bare_gateway(storage, cors_origins=(origin,)) as client:
        response = await client.get("/api/formats", headers={"Origin": origin})
        assert response.headers["Access-Control-Allow-Origin"] == origin
        preflight = await client.options("/api/convert", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type"})
        assert preflight.status == 200
        assert preflight.headers["Access-Control-Allow-Origin"] == origin
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        other = await client.get("/api/formats", headers={"Origin": "http://elsewhere.test"})
        assert "Access-Control-Allow-Origin" not in other.headers


# ----------------------------------------------------------------------------------- operations


async def test_readyz_answers_503_naming_storage_while_it_is_down(strict_s3, strict_storage):
    async with bare_gateway(strict_storage) as client:
        assert (await client.get("/readyz")).status == 200
        await strict_s3.down()
        response = await client.get("/readyz")
        assert response.status == 503
        body = await response.json()
        assert body["checks"]["broker"] == "ok" and body["checks"]["storage"].startswith("failed")
        assert body["error"]["code"] == "storage_unavailable"
        assert (await client.get("/healthz")).status == 200, "alive even when not ready"
        await strict_s3.up()
        assert (await client.get("/readyz")).status == 200


async def test_metrics_name_every_product_metric(gateway, media_server):
    job_id = await submit(gateway, media_server)
    await follow(gateway, job_id)
    response = await gateway.get("/metrics")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    for name in ("ggt_presign_attempts_total", "ggt_direct_upload_attempts_total", "ggt_bytes_streamed_total",
                 "ggt_verifications_total", "ggt_job_stage_seconds_bucket", "ggt_jobs_in_flight",
                 "ggt_messages_processed_total", "ggt_queue_depth", "ggt_coordinator_file_bytes_total",
                 "ggt_http_requests_total", "process_resident_memory_bytes"):
        assert f"\n{name}" in text, name
    assert 'ggt_queue_depth{queue="ggt.coordinator"}' in text


async def test_openapi_is_valid_json_describing_every_path(gateway):
    response = await gateway.get("/api/openapi.json")
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) >= {"/api/convert", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events",
                                      "/api/jobs/{job_id}/download", "/api/storage/stats", "/healthz",
                                      "/readyz", "/metrics", "/api/formats"}
    schemas = document["components"]["schemas"]
    assert "url" in schemas["ConvertRequested"]["properties"]
    assert "type" not in schemas["ConvertRequested"]["required"]
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[-1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    assert refs <= set(schemas), f"unresolved: {refs - set(schemas)}"


async def test_formats_list_each_formats_qualities(gateway):
    formats = {f["format"]: f for f in (await (await gateway.get("/api/formats")).json())["formats"]}
    assert set(formats) == {"mp3", "m4a", "opus", "flac", "wav", "mp4", "webm"}
    assert formats["mp3"]["default_quality"] in formats["mp3"]["qualities"]
    assert formats["mp4"]["video"] and "720" in formats["mp4"]["qualities"]


# ------------------------------------------------------------------------- pure: ids and counts


def _progress(stage: Stage, percent: float) -> JobProgress:
    return JobProgress(job_id="job-00000001", stage=stage, percent=percent)


def test_event_ids_grow_with_stage_and_percent_and_finals_outrank_progress():
    ids = [sse.event_id(_progress(Stage.PREPARING, 3.5)), sse.event_id(_progress(Stage.CONVERTING, 35)),
           sse.event_id(_progress(Stage.CONVERTING, 80)), sse.event_id(_progress(Stage.VERIFYING, 80)),
           sse.event_id(_progress(Stage.FINISHING, 99.99))]
    assert ids == sorted(set(ids))
    failed = JobFailed(job_id="job-00000001", stage=Stage.CONVERTING, error=Error.of(ErrorCode.TIMEOUT))
    assert sse.event_id(failed) > ids[-1]
    assert sse.parse_last_event_id("203500") == 203500
    assert sse.parse_last_event_id(None) == sse.parse_last_event_id("junk") == sse.NONE_SEEN


def _completed(job_id: str, seconds: float) -> JobCompleted:
    return JobCompleted(job_id=job_id, download_url="http://127.0.0.1/x", expires_at="", key="k", format=Format.MP3,
                        quality=Quality.K192, content_type="audio/mpeg", size=10, sha256="0" * 64, duration=1.0,
                        timings={"total": seconds})


def test_outcome_counts_give_the_design_notes_four_rates():
    tracker = OutcomeTracker(since=datetime.now(UTC))
    assert set(tracker.rates().values()) == {None}
    tracker.observe(JobProgress(job_id="job-aaaaaaaa", stage=Stage.CONVERTING, percent=35))
    tracker.observe(_completed("job-aaaaaaaa", 2.0))
    tracker.observe(_completed("job-aaaaaaaa", 2.0))  # announced twice: counted once
    tracker.observe(_completed("job-bbbbbbbb", 4.0))
    tracker.observe(JobFailed(job_id="job-cccccccc", stage=Stage.PREPARING,
                              error=Error.of(ErrorCode.STORAGE_UNAVAILABLE)))
    tracker.observe(JobFailed(job_id="job-dddddddd", stage=Stage.CONVERTING, error=Error.of(ErrorCode.UPLOAD_FAILED)))
    tracker.observe(JobFailed(job_id="job-eeeeeeee", stage=Stage.VERIFYING,
                              error=Error.of(ErrorCode.VERIFICATION_FAILED)))
    tracker.observe(JobFailed(job_id="job-ffffffff", stage=Stage.PREPARING, error=Error.of(ErrorCode.NO_MEDIA_FOUND)))
    rates = tracker.rates()
    # presign reached by a, b, d, e; failed for c
    assert rates["presigned_url_success_rate"] == round(4 / 5, 4)
    # uploads: a, b, e stored everything; d failed
    assert rates["direct_upload_success_rate"] == 0.75
    assert rates["verification_pass_rate"] == round(2 / 3, 4)
    assert rates["average_processing_seconds"] == 3.0
    counts = tracker.counts()
    assert counts["completed"] == 2 and counts["failed"] == 4
    assert counts["failed_by_code"]["no_media_found"] == 1


@pytest.mark.broker
async def test_on_rabbitmq_the_events_stream_runs_to_completed(rabbit_pipeline, media_server):
    settings = msgspec.structs.replace(rabbit_pipeline.settings, rate_limit_per_minute=0)
    app = make_app(settings, bus=rabbit_pipeline.bus, storage=rabbit_pipeline.storage, options=FAST)
    async with serve(app) as client:
        job_id = await submit(client, media_server)
        events = await follow(client, job_id)
        assert events[-1].event == "completed"
        assert [e.id for e in events] == sorted({e.id for e in events})
        assert (await client.get("/readyz")).status == 200


async def test_shutting_the_gateway_down_ends_open_streams(storage):
    settings = settings_for_tests()
    bus = MemoryBus(topology(settings))
    await bus.start()
    server = TestServer(make_app(settings, bus=bus, storage=storage, options=GatewayOptions(keepalive=60)),
                        host="127.0.0.1")
    try:
        async with TestClient(server) as client:
            accepted = await client.post("/api/convert", json={"url": "http://127.0.0.1/a.mp4", "format": "mp3"})
            job_id = (await accepted.json())["job_id"]
            async with client.get(f"/api/jobs/{job_id}/events") as stream:
                assert (await read_events(stream, limit=1))[0].data["stage"] == "queued"
                rest = asyncio.ensure_future(read_events(stream))
                await server.runner.shutdown()  # what cleanup does first: on_shutdown ends the streams
                async with asyncio.timeout(5):
                    assert await rest == []
    finally:
        await bus.close()

