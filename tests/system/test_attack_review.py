"""A hostile second review of the trust boundaries (issues #11 and #12), each hole as an attack.

Loopback only. Where the bus is involved the attack runs on the real broker: a provisioned
integrator (least rights, as documented) or the broadest credentials (guest), as named per test.
A test that is marked ``xfail(strict=True)`` is a hole found and not yet closed: its reason says
what the fix is; it turns into a failure (XPASS) the moment the hole closes, so the mark must go.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aiohttp import web

from actors.core.ffmpeg_args import _input_args
from actors.guard import FetchGuard
from bus.base import Bus
from bus.replay import Action, LetterFilter, list_letters, purge, replay
from messages.codec import H_ATTEMPT, H_DEAD_LETTERED_AT, H_ERROR_CODE, encode, envelope_for
from messages.routing import DEAD_LETTER_EXCHANGE, REQUESTS_EXCHANGE, reply_queue_allowed
from messages.types import JobFailed, MediaInput, VerifyObject
from tests.fixtures.media import MediaLibrary, MediaServer
from tests.fixtures.pipeline import JOB_TIMEOUT
from tests.guard.test_guard_sources import INTERNAL_HOST, Listener, hls_media, internal  # noqa: F401 (fixture)
from tests.support.buses import dead_letters_of
from tests.system.test_trust_boundaries import Integrator, connected, integrator  # noqa: F401 (fixture)

WAIT = 15.0


# ------------------------------------------- attacker 1 and 3: a tenant aims the service at others


def test_a_reply_queue_must_be_the_owners_own() -> None:
    assert reply_queue_allowed("acme", "integrator.acme.replies")
    for foreign in ("integrator.victim.replies", "integrator.acme", "integrator.acmex.replies", "ggt.uploader",
                    "ggt.coordinator.dlq", "amq.gen-abc", "test.other"):
        assert not reply_queue_allowed("acme", foreign), foreign
    # the default tenant (the CLI, the service's own callers) keeps any queue outside the service's
    # and the integrators' namespaces
    assert reply_queue_allowed("default", "test.reply.replay")
    assert not reply_queue_allowed("default", "ggt.verifier")
    assert not reply_queue_allowed("default", "integrator.acme.replies")


def test_a_tenant_id_with_a_trailing_newline_is_refused() -> None:
    """messages.types defined TenantId twice; the second, without ``(?!\\n)``, let "acme\\n" through."""
    import msgspec

    from messages.types import TenantId

    assert msgspec.convert("acme", TenantId) == "acme"
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert("acme\n", TenantId)


async def test_a_tenant_cannot_make_the_service_deliver_events_into_another_tenants_queue(
        rabbit_pipeline, integrator: Integrator) -> None:  # noqa: F811 (fixture)
    """Tenant acme, provisioned with the documented least rights, names tenant victim's reply queue
    (and a work queue of the service) as ``reply_to``. The service user may write the default
    exchange, so without a check the coordinator itself would put acme's answers — among them a
    JobFailed naming a job id of victim's choosing — into victim's queue and into ggt.uploader."""
    bus: Bus = rabbit_pipeline.bus
    victim_queue = "integrator.victim.replies"
    await bus.declare_reply_queue(victim_queue)
    async with connected(integrator.url) as conn:
        channel = await conn.channel(publisher_confirms=True)
        requests = await channel.get_exchange(REQUESTS_EXCHANGE, ensure=False)

        async def send(body: dict) -> None:
            await requests.publish(aio_pika.Message(json.dumps({"type": "convert_requested", **body}).encode(),
                                                    content_type="application/json"),
                                   routing_key=f"convert.{integrator.tenant}", mandatory=True)

        # a valid request that fails at once (a literal internal address: nothing is fetched)
        await send({"url": "http://127.0.0.2/a.mp3", "format": "mp3", "job_id": "acme-aimed-0001",
                    "reply_to": victim_queue})
        failed = await rabbit_pipeline.final("acme-aimed-0001", timeout=JOB_TIMEOUT)
        # a request that cannot become a job, naming the victim's job id and queue
        await send({"url": "http://127.0.0.1/a.mp3", "format": "mp5", "job_id": "victim-order-0001",
                    "reply_to": victim_queue})
        await send({"url": "http://127.0.0.1/a.mp3", "format": "mp5", "job_id": "victim-order-0002",
                    "reply_to": "ggt.uploader"})
        # each undecodable request is answered (or not) before it is dead-lettered: the barrier
        await dead_letters_of(bus, "coordinator", count=2, timeout=WAIT)
    async with bus.subscribe(queue=victim_queue) as victims:
        with pytest.raises(TimeoutError):
            envelope, body = await asyncio.wait_for(anext(victims), 1.0)
            pytest.fail(f"the victim's queue received {envelope.type}: {body[:200]!r}")
    uploader_letters = await bus.take_dead_letters("uploader")
    try:
        assert [letter.envelope.type for letter in uploader_letters.letters] == [], \
            "an event was put into the uploader's work queue and dead-lettered there"
    finally:
        await uploader_letters.close()
    assert isinstance(failed, JobFailed), "the refused reply_to fails the request with a code"
    assert failed.error.code == "invalid_request" and "reply_to" in failed.error.detail


# ---------------------------------------------- attacker 1: a planted dead letter jams the operator


async def test_a_planted_letter_with_junk_headers_cannot_jam_the_operators_dlq_tool(rabbit_bus: Bus) -> None:
    """With the broadest credentials anyone may publish into ggt.dlx. A letter whose diagnostic headers
    are junk (a time that is no time, a counter that is no number) must still be listed, shown as JSON,
    refused for replay and purged — not crash ``dlq list/replay/purge`` for every letter of the queue."""
    from actors.cli.dlq import letter_json, letters_table

    bus = rabbit_bus
    message = VerifyObject(job_id="planted-junk-01", key="converted/x.mp3", size=1, etag="e",
                           content_type="audio/mpeg", format="mp3", duration=1.0)
    env = envelope_for(message, headers={H_ERROR_CODE: "internal", H_DEAD_LETTERED_AT: "yesterday-ish",
                                         H_ATTEMPT: "many"})
    await bus.publish_raw(exchange=DEAD_LETTER_EXCHANGE, routing_key="verifier", body=encode(message), envelope=env)
    mine = LetterFilter(job_id="planted-junk-01")

    letters = await list_letters(bus, actor="verifier", filters=mine)
    assert [letter.envelope.job_id for letter in letters] == ["planted-junk-01"]
    assert letters[0].dead_lettered_at is None, "a time that does not parse is no time"
    assert letter_json(letters[0])["attempts"] == 1 and letters_table(letters)
    [refused] = await replay(bus, actor="verifier", filters=mine)
    assert refused.action is Action.SKIPPED and "not written by the service" in refused.reason
    [purged] = await purge(bus, actor="verifier", filters=mine)
    assert purged.action is Action.PURGED
    assert await list_letters(bus, actor="verifier", filters=mine) == []


# ------------------------------------------------ attacker 2: a playlist split across two responses

#: bytes of the first (partial) response: too few for the gateway to see ``#EXTM3U``
SPLIT_AT = 3


@pytest.fixture
async def split_playlist_url(media_files: MediaLibrary, media_server: MediaServer,
                             internal: Listener) -> AsyncIterator[str]:  # noqa: F811 (fixture)
    """A "video" whose first response (206, ``bytes 0-2/<total>``) is ``#EX`` and whose remainder,
    fetched by ffmpeg's reconnect with ``Range: bytes=3-``, is the rest of an HLS playlist: one real
    segment, then one on the internal host. Each response alone sniffs as media."""
    media_files.path("hls/index.m3u8")
    playlist = hls_media(media_server.url("hls/seg0.ts"), f"http://{INTERNAL_HOST}:{internal.port}/s1.ts").encode()
    total = len(playlist)

    async def answer(request: web.Request) -> web.Response:
        start = int(request.headers.get("Range", "bytes=0-").removeprefix("bytes=").partition("-")[0] or 0)
        end = SPLIT_AT - 1 if start == 0 else total - 1
        return web.Response(status=206, body=playlist[start:end + 1], content_type="video/mp4",
                            headers={"Content-Range": f"bytes {start}-{end}/{total}", "Accept-Ranges": "bytes"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/media/video.mp4"
    finally:
        await runner.cleanup()


async def test_a_playlist_split_across_two_responses_is_judged_whole_and_refused(
        split_playlist_url: str, internal: Listener) -> None:  # noqa: F811 (fixture)
    media_input = MediaInput(url=split_playlist_url)  # a direct "video", as the converter plans one
    async with FetchGuard(allow=["127.0.0.1/32"]) as guard:
        # as the uploader runs the input: its own options (reconnect included), the guard's whitelist
        args = guard.input_args(_input_args(media_input, start=0.0, network_timeout=10.0))
        process = await asyncio.create_subprocess_exec(
            "ffmpeg", "-nostdin", "-loglevel", "verbose", *args, "-i", guard.gateway_url(split_playlist_url),
            "-f", "null", "-",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env=guard.subprocess_env({"PATH": "/usr/bin:/bin"}),
        )  # fmt: skip
        async with asyncio.timeout(60):
            _, stderr = await process.communicate()
        gateway = guard.proxy_url + "/via/"
        refused = [fetch.reason for fetch in guard.blocked]
    assert internal.connections == [], "the proxy variables still keep ffmpeg off the internal host"
    assert any("manifest split across responses" in reason for reason in refused), refused
    opened = re.findall(r"Opening '([^']+)' for reading", stderr.decode(errors="replace"))
    assert [url for url in opened if not url.startswith(gateway)] == [], \
        "ffmpeg opened URLs the guard never wrote: it was handed an unrewritten playlist"


# ------------------------------------- attacker 1: a captured, validly signed command sent again


@pytest.mark.xfail(strict=True, reason=(
    "the MAC proves who wrote a command, not when: a captured stream_to_storage re-published within its "
    "URLs' life (job time limit + 600 s) to an uploader that has not seen its message id (a restart, "
    "another replica) runs ffmpeg again and PUTs to the still valid put_url over the verified object. "
    "Fix (not small): single PUTs with If-None-Match: * (a 412 on a retry of the same command is "
    "'already stored'), or the coordinator keeps the verified object under a key no upload URL names "
    "(server-side copy), or a per-command expiry covered by the MAC (created_at signed, the dlq tool "
    "re-signing replays) with upload URLs that expire with it"))
async def test_a_captured_stream_command_sent_again_cannot_replace_a_verified_object(
        storage_config, storage, amqp_url: str, media_files: MediaLibrary) -> None:
    from actors.bootstrap.serve import workers
    from actors.bootstrap.wiring import make_bus
    from messages.codec import new_id
    from messages.routing import COMMANDS_EXCHANGE
    from messages.types import ConvertRequested, JobCompleted
    from tests.fixtures.pipeline import pipeline_settings, running_pipeline

    served = {"body": media_files.path("audio.flac").read_bytes()}

    async def source(request: web.Request) -> web.Response:
        return web.Response(body=served["body"], content_type="audio/flac")

    app = web.Application()
    app.router.add_get("/song", source)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    settings = pipeline_settings(storage_config, amqp_url=amqp_url)
    bus = make_bus(settings, name="tests-replay-attack")
    await bus.start()
    try:
        await bus.purge_all()
        async with connected(amqp_url) as attacker:  # guest: the broadest credentials
            channel = await attacker.channel()
            tap = await channel.declare_queue(exclusive=True)
            await tap.bind(COMMANDS_EXCHANGE, "stream_to_storage")
            await tap.bind(COMMANDS_EXCHANGE, "streamed")
            job_id = new_id()
            async with running_pipeline(bus, settings, storage) as pipeline:
                await bus.publish(ConvertRequested(url=f"http://127.0.0.1:{runner.addresses[0][1]}/song",
                                                   format="mp3", job_id=job_id))
                done = await pipeline.final(job_id, timeout=JOB_TIMEOUT)
            assert isinstance(done, JobCompleted), done
            captured = await tap.get(timeout=WAIT)
            assert captured.type == "stream_to_storage"
            await captured.ack()
            assert (await tap.get(timeout=WAIT)).type == "streamed"

            served["body"] = media_files.path("audio.opus").read_bytes()  # the page has changed since
            async with workers(["uploader"], settings=settings, bus=bus, stopping=asyncio.Event()):
                commands = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
                await commands.publish(aio_pika.Message(
                    captured.body, headers=captured.headers, message_id=captured.message_id,
                    correlation_id=captured.correlation_id, type=captured.type, timestamp=captured.timestamp,
                    content_type=captured.content_type), routing_key="stream_to_storage")
                async with tap.iterator() as tapped:  # the fresh uploader's Streamed: it has PUT
                    async with asyncio.timeout(JOB_TIMEOUT):
                        async for seen in tapped:
                            await seen.ack()
                            if seen.type == "streamed":
                                break
        stored = await storage.client.get_object(Bucket=storage.bucket, Key=done.key)
        body = await stored["Body"].read()
        assert hashlib.sha256(body).hexdigest() == done.sha256, \
            "the object behind a completed, verified job was replaced by a replayed command"
    finally:
        await bus.purge_all()
        await bus.close()
        await runner.cleanup()


# ------------------------------------------------ attacker 1 against tenant 3: forged job events


async def test_a_forged_completed_event_never_reaches_a_tenants_event_stream(rabbit_pipeline, amqp_url: str,
                                                                           media_server: MediaServer) -> None:
    """With the broadest credentials anyone may write ggt.events. The gateway streams what it reads there
    to the job's owner, and the demo page follows a completed job's download link: a forged
    JobCompleted would hand tenant alice an attacker's "download". Only events the service signed
    may reach a stream."""
    import msgspec

    from actors.gateway.app import make_app
    from messages.codec import H_OWNER
    from messages.routing import EVENTS_EXCHANGE
    from messages.types import JobCompleted
    from tests.gateway.test_gateway import FAST, read_events, serve

    token = "alice-token-0123456789abcdef"
    settings = msgspec.structs.replace(rabbit_pipeline.settings, rate_limit_per_minute=0, api_keys=(f"alice:{token}",))
    bait = "https://attacker.example/your-file.mp3"  # a string in an event, never fetched
    async with serve(make_app(settings, bus=rabbit_pipeline.bus, storage=rabbit_pipeline.storage,
                              options=FAST)) as client, connected(amqp_url) as attacker:
        headers = {"Authorization": f"Bearer {token}"}
        response = await client.post("/api/convert", headers=headers,
                                     json={"url": media_server.url("slow/audio.mp3?rate=40000"), "format": "mp3"})
        assert response.status == 202, await response.text()
        job_id = (await response.json())["job_id"]
        async with client.get(f"/api/jobs/{job_id}/events", headers=headers) as stream:
            first = await read_events(stream, limit=1)  # the stream is registered: forge now
            forged = JobCompleted(job_id=job_id, download_url=bait, expires_at="2099-01-01T00:00:00+00:00",
                                  key="converted/x.mp3", format="mp3", quality="best", content_type="audio/mpeg",
                                  size=1, sha256="0" * 64, duration=1.0)
            channel = await attacker.channel()
            events = await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
            await events.publish(aio_pika.Message(encode(forged), type="job_completed", correlation_id=job_id,
                                                  headers={H_OWNER: "alice"}, content_type="application/json"),
                                 routing_key=f"job.alice.{job_id}.completed")
            rest = await read_events(stream)
    finals = [e for e in [*first, *rest] if e.event in ("completed", "failed")]
    assert finals, "the stream ended with the job's final event"
    assert all(e.data.get("download_url") != bait for e in finals), "a forged event reached the tenant"
    assert finals[-1].event == "completed" and finals[-1].data["key"] != forged.key


def test_a_continuation_is_judged_with_the_short_body_it_extends_and_media_stays_media() -> None:
    from actors.guard.manifests import BodyKind
    from actors.guard.ranges import Span

    guard = FetchGuard()
    media = b"\x00\x00\x00\x18ftypmp42"
    # real media cut short and resumed: still media, however it is split
    assert guard._judged_with_head("http://a/v", None, media[:3], BodyKind.MEDIA) is BodyKind.MEDIA
    assert guard._judged_with_head("http://a/v", Span(3, None), media[3:], BodyKind.MEDIA) is BodyKind.MEDIA
    # a playlist or a manifest split in two: refused, and so is every later try at its continuation
    for url, head, rest in [("http://a/p", b"#EX", b"TM3U\n#EXTINF:1,\nx.ts\n"), ("http://a/d", b"<?xml ", b"<MPD>")]:
        assert guard._judged_with_head(url, Span(0, None), head, BodyKind.MEDIA) is BodyKind.MEDIA
        assert guard._judged_with_head(url, Span(len(head), None), rest, BodyKind.MEDIA) is None
        assert guard._judged_with_head(url, Span(len(head), None), rest, BodyKind.MEDIA) is None
    # a seek elsewhere (not where the short body ended) is judged on its own
    assert guard._judged_with_head("http://a/s", None, b"#EX", BodyKind.MEDIA) is BodyKind.MEDIA
    assert guard._judged_with_head("http://a/s", Span(1000, None), b"\x00data", BodyKind.MEDIA) is BodyKind.MEDIA
