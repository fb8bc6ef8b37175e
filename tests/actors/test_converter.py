"""The converter end to end on loopback: yt-dlp and ffprobe through the SSRF guard, against media_server.

127.0.0.1 is allow-listed; 127.0.0.2 plays the internal network the guard must protect (both are
loopback on Linux, so no byte leaves this machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from actors.adapters.ffprobe import probe_argv
from actors.bootstrap.wiring import make_bus
from actors.converter import Converter, ytdlp_params
from actors.guard import BlockedFetch, FetchGuard
from actors.runtime.settings import Settings
from actors.runtime.worker import Worker
from bus.base import Bus
from messages.errors import ErrorCode, JobError
from messages.types import (
    ConvertRequested,
    Format,
    InputVia,
    MediaPlan,
    MediaResolved,
    Quality,
    ResolveMedia,
    StepFailed,
)
from tests.fixtures import broker
from tests.fixtures.media import STANDARD_SECONDS, MediaServer
from tests.support.buses import next_message, receiving, running

ALLOW = ("127.0.0.1/32",)
FORBIDDEN_HOST = "127.0.0.2"
#: tolerance between ffprobe's duration and the generated file's length, seconds
DURATION_TOLERANCE = 0.2


def settings_for(**overrides: object) -> Settings:
    """Test settings: only 127.0.0.1 reachable, short network timeout."""
    return broker.test_settings(**{"allow_networks": ALLOW, "network_timeout": 10.0, **overrides})


@dataclass
class RecordingContext:
    """A stand-in for the runtime's Context: records what the handler publishes."""

    published: list[object] = field(default_factory=list)

    async def publish(self, message: object, *, reply_to: str | None = None) -> None:
        self.published.append(message)


MakeConverter = Callable[..., Awaitable[Converter]]


@pytest.fixture
async def make_converter() -> AsyncIterator[MakeConverter]:
    """Start Converters (setup run) with settings overrides; all are torn down after the test."""
    started: list[Converter] = []

    async def make(**overrides: object) -> Converter:
        settings = settings_for(**overrides)
        actor = Converter(settings=settings, bus=make_bus(settings))
        await actor.setup()
        started.append(actor)
        return actor

    yield make
    for actor in started:
        await actor.teardown()


@pytest.fixture
async def converter(make_converter: MakeConverter) -> Converter:
    """A started Converter with the test settings."""
    return await make_converter()


def request(url: str, fmt: Format = Format.MP3, **kw: object) -> ConvertRequested:
    return ConvertRequested(url=url, format=fmt, **kw)  # type: ignore[arg-type]


async def resolve(converter: Converter, url: str, fmt: Format = Format.MP3, **kw: object) -> MediaPlan:
    """Run the converter's handler on one request; return the published plan."""
    ctx = RecordingContext()
    await converter.resolve(ResolveMedia(job_id="job-conv-0001", request=request(url, fmt, **kw)), ctx)  # type: ignore[arg-type]
    [resolved] = ctx.published
    assert isinstance(resolved, MediaResolved) and resolved.job_id == "job-conv-0001"
    return resolved.plan


async def failure(converter: Converter, url: str, fmt: Format = Format.MP3, **kw: object) -> JobError:
    """Run the handler on a request that must fail; return the coded error (nothing published)."""
    ctx = RecordingContext()
    with pytest.raises(JobError) as caught:
        await converter.resolve(ResolveMedia(job_id="job-conv-0002", request=request(url, fmt, **kw)), ctx)  # type: ignore[arg-type]
    assert ctx.published == []
    return caught.value


# --- sources that resolve


async def test_direct_mp4_gives_one_ffmpeg_input_with_the_probed_duration(
    converter: Converter, media_server: MediaServer
) -> None:
    url = media_server.url("av_h264_aac.mp4")
    plan = await resolve(converter, url, Format.MP4, quality=Quality.BEST)
    [media_input] = plan.inputs
    assert media_input.url == url and media_input.via is InputVia.FFMPEG
    assert abs(plan.duration - STANDARD_SECONDS) < DURATION_TOLERANCE
    # the probe told the plan the codecs, so the h264/aac file is remuxed, not re-encoded
    assert plan.video is not None and plan.video.copy and plan.audio is not None and plan.audio.copy
    assert plan.expect_codecs == {"video": "h264", "audio": "aac"}
    assert "User-Agent" in media_input.headers


async def test_page_with_a_video_tag_yields_that_video_and_its_poster(
    converter: Converter, media_server: MediaServer
) -> None:
    plan = await resolve(converter, media_server.url("page/av_h264_aac.mp4.html"), Format.MP3)
    [media_input] = plan.inputs
    assert media_input.url == media_server.url("av_h264_aac.mp4")
    assert media_input.headers.get("Referer") == media_server.url("page/av_h264_aac.mp4.html")
    assert plan.title == "Test page for av_h264_aac.mp4 (1)"
    assert plan.thumbnail_url == media_server.url("thumbnail.jpg")
    assert abs(plan.duration - STANDARD_SECONDS) < DURATION_TOLERANCE


async def test_hls_playlist_is_read_by_ffmpeg_as_hls(converter: Converter, media_server: MediaServer) -> None:
    url = media_server.url("hls/index.m3u8")
    plan = await resolve(converter, url, Format.M4A)
    [media_input] = plan.inputs
    assert media_input.url == url and media_input.via is InputVia.FFMPEG
    assert media_input.hls
    assert abs(plan.duration - STANDARD_SECONDS) < DURATION_TOLERANCE


async def test_redirect_is_followed_to_the_media(converter: Converter, media_server: MediaServer) -> None:
    plan = await resolve(converter, media_server.url("redirect/audio.mp3"), Format.MP3, quality=Quality.BEST)
    assert [i.url for i in plan.inputs] == [media_server.url("audio.mp3")]
    assert plan.audio is not None and plan.audio.copy  # mp3 → mp3 at best
    assert abs(plan.duration - STANDARD_SECONDS) < DURATION_TOLERANCE


async def test_audio_only_source_converts_to_audio_but_not_to_video(
    converter: Converter, media_server: MediaServer
) -> None:
    plan = await resolve(converter, media_server.url("audio_only.m4a"), Format.MP3)
    assert plan.expect_codecs == {"audio": "mp3"}
    error = await failure(converter, media_server.url("audio_only.m4a"), Format.MP4)
    assert error.code is ErrorCode.NO_MEDIA_FOUND and "no video" in error.detail


async def test_video_only_source_converts_to_video_but_not_to_audio(
    converter: Converter, media_server: MediaServer
) -> None:
    plan = await resolve(converter, media_server.url("video_only.mp4"), Format.MP4)
    assert plan.expect_codecs == {"video": "h264"}
    error = await failure(converter, media_server.url("video_only.mp4"), Format.MP3)
    assert error.code is ErrorCode.NO_MEDIA_FOUND and "no audio" in error.detail


# --- sources that fail, each with its code


async def test_missing_page_is_media_removed_and_not_retried(
    converter: Converter, media_server: MediaServer
) -> None:
    error = await failure(converter, media_server.url("missing"))
    assert error.code is ErrorCode.MEDIA_REMOVED and "404" in error.detail
    assert error.retryable is False


async def test_page_without_media_is_no_media_found(converter: Converter, media_server: MediaServer) -> None:
    error = await failure(converter, media_server.url("empty.html"))
    assert error.code is ErrorCode.NO_MEDIA_FOUND


@pytest.mark.parametrize("name", ["not_media.bin", "not_media.mp4"])
async def test_random_bytes_served_as_media_are_no_media_found(
    converter: Converter, media_server: MediaServer, name: str
) -> None:
    # yt-dlp takes any non-HTML response for a direct link; the probe then finds no media in it
    error = await failure(converter, media_server.url(name))
    assert error.code is ErrorCode.NO_MEDIA_FOUND and "Invalid data found" in error.detail
    assert "127.0.0.1" not in error.detail and "/via/" not in error.detail, "the error names no URL"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/file.mp3"])
async def test_non_http_schemes_are_unsupported_before_any_fetch(converter: Converter, url: str) -> None:
    error = await failure(converter, url)
    assert error.code is ErrorCode.UNSUPPORTED_URL


async def test_text_that_is_not_a_url_is_an_invalid_request(converter: Converter) -> None:
    error = await failure(converter, "not a url")
    assert error.code is ErrorCode.INVALID_REQUEST


async def test_source_longer_than_the_limit_is_too_long(
    make_converter: MakeConverter, media_server: MediaServer
) -> None:
    converter = await make_converter(max_duration=STANDARD_SECONDS / 2)
    error = await failure(converter, media_server.url("audio.mp3"))
    assert error.code is ErrorCode.TOO_LONG


# --- the SSRF guard


@pytest.fixture
async def forbidden_origin(media_server: MediaServer) -> AsyncIterator[tuple[str, list[str]]]:
    """A server on 127.0.0.2 (not allow-listed) that records every path asked of it."""
    hits: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"\x00" * 16, content_type="audio/mpeg")

    app = web.Application()
    app.router.add_get("/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, FORBIDDEN_HOST, 0).start()
    try:
        yield f"http://{FORBIDDEN_HOST}:{runner.addresses[0][1]}", hits
    finally:
        await runner.cleanup()


async def test_url_on_a_forbidden_address_is_refused_before_any_fetch(
    converter: Converter, forbidden_origin: tuple[str, list[str]]
) -> None:
    base, hits = forbidden_origin
    error = await failure(converter, f"{base}/secret.mp3")
    assert error.code is ErrorCode.URL_NOT_ALLOWED
    assert hits == []


async def test_redirect_to_a_forbidden_address_is_refused_and_the_next_job_is_unaffected(
    converter: Converter, media_server: MediaServer, forbidden_origin: tuple[str, list[str]]
) -> None:
    base, hits = forbidden_origin
    app = web.Application()

    async def bounce(_: web.Request) -> web.Response:
        raise web.HTTPFound(f"{base}/secret.mp3")

    app.router.add_get("/bounce.mp3", bounce)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        error = await failure(converter, f"http://127.0.0.1:{runner.addresses[0][1]}/bounce.mp3")
    finally:
        await runner.cleanup()
    assert error.code is ErrorCode.URL_NOT_ALLOWED and FORBIDDEN_HOST not in error.detail  # no DNS oracle
    assert hits == []
    # the process's guard is shared: the refusal belongs to that job only
    plan = await resolve(converter, media_server.url("audio.mp3"))
    assert plan.inputs[0].url == media_server.url("audio.mp3")


async def test_page_whose_video_lives_on_a_forbidden_address_is_refused_at_the_probe(
    converter: Converter, forbidden_origin: tuple[str, list[str]]
) -> None:
    # yt-dlp only parses the page; the probe of the <video src> is the first fetch of 127.0.0.2
    base, hits = forbidden_origin
    app = web.Application()

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=f'<html><body><video src="{base}/secret.mp4"></video></body></html>',
                            content_type="text/html")

    app.router.add_get("/page.html", page)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        error = await failure(converter, f"http://127.0.0.1:{runner.addresses[0][1]}/page.html")
    finally:
        await runner.cleanup()
    assert error.code is ErrorCode.URL_NOT_ALLOWED and FORBIDDEN_HOST not in error.detail  # no DNS oracle
    assert hits == []


# --- extraction in warm worker processes


async def test_second_resolve_reuses_the_warm_worker_and_is_faster(
    converter: Converter, media_server: MediaServer, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = converter.pool.pids
    url = media_server.url("audio.mp3")
    started = time.perf_counter()
    await resolve(converter, url)
    first = time.perf_counter() - started
    started = time.perf_counter()
    await resolve(converter, url)
    second = time.perf_counter() - started
    assert converter.pool.pids == workers  # the same warm process served both
    with capsys.disabled():
        print(f"\n[converter] direct loopback mp3 → mp3 plan: first resolve {first:.3f} s, second {second:.3f} s")


def process_exists(pid: int) -> bool:
    """True while ``pid`` runs or waits to be reaped (a zombie still has its /proc entry)."""
    return os.path.exists(f"/proc/{pid}")


async def test_a_job_cancelled_mid_extraction_takes_its_worker_and_leaves_nothing_behind(
    make_converter: MakeConverter, media_server: MediaServer
) -> None:
    converter = await make_converter(network_timeout=2.0)
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        arrived.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 30)
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_get("/hang.mp3", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    [hanging_worker] = converter.pool.pids
    try:
        job = asyncio.create_task(converter.plan_for(request(f"http://127.0.0.1:{runner.addresses[0][1]}/hang.mp3")))
        await asyncio.wait_for(arrived.wait(), 10)
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        # the worker in the middle of the page is gone (killed and reaped), not parked in a thread
        assert hanging_worker not in converter.pool.pids
        assert not process_exists(hanging_worker)
        plan = await asyncio.wait_for(resolve(converter, media_server.url("audio.mp3")), 20)
    finally:
        release.set()
        await runner.cleanup()
    assert plan.inputs[0].url == media_server.url("audio.mp3")


def test_ytdlp_params_harden_the_youtubedl() -> None:
    params = ytdlp_params(proxy={"proxy": "http://127.0.0.1:1", "geo_verification_proxy": "http://127.0.0.1:1"},
                          network_timeout=7.0, max_bytes=123, logger=None)
    assert params["proxy"] == params["geo_verification_proxy"] == "http://127.0.0.1:1"
    assert params["noplaylist"] is True and params["extract_flat"] is False and params["skip_download"] is True
    assert params["usenetrc"] is False and params["netrc_cmd"] is None and params["cachedir"] is False
    assert params["postprocessors"] == [] and params["external_downloader"] == {}
    assert (params["socket_timeout"], params["max_filesize"]) == (7.0, 123)


def test_extraction_workers_load_no_plugins() -> None:
    # what a worker process runs at start, checked in a process of its own (plugins are per process)
    check = ("from actors.guard.extract import _Worker\n"
             "from actors.guard.extract import _Warm\n_Worker(_Warm(network_timeout=1, max_bytes=1), proxy='http://127.0.0.1:1')\n"
             "from yt_dlp import globals as g\n"
             "assert g.plugin_dirs.value == [] and g.plugin_ies.value == {} and g.plugin_pps.value == {}\n")
    subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, timeout=120)


# --- pure helpers of the shell


async def test_probe_argv_reads_the_guards_gateway_with_plain_http_only() -> None:
    async with FetchGuard(allow=ALLOW) as guard:
        url = guard.gateway_url("https://127.0.0.1:1/a.m3u8")
        argv = probe_argv(url, timeout=5, wrap_input=guard.input_args)
    assert argv[argv.index("-i") + 1] == url and url.startswith(guard.proxy_url + "/via/")
    assert "-http_proxy" not in argv
    protocols = argv[argv.index("-protocol_whitelist") + 1].split(",")
    assert set(protocols) == {"http", "tcp", "crypto"}
    assert argv.count("-protocol_whitelist") == 1


def test_blocked_error_names_no_host_or_address() -> None:
    guard = FetchGuard()
    assert guard.blocked_error() is None
    guard.blocked += [BlockedFetch("db.internal", "10.0.0.5", "private"), BlockedFetch("x", "127.0.0.3", "loopback")]
    error = guard.blocked_error()
    assert error is not None and error.code is ErrorCode.URL_NOT_ALLOWED
    assert "10.0.0.5" not in error.detail and "db.internal" not in error.detail and "private" not in error.detail


# --- through the runtime, on the in-memory bus


@pytest.fixture
async def memory_bus() -> AsyncIterator[Bus]:
    settings = settings_for()
    bus = make_bus(settings)
    await bus.start()
    yield bus
    await bus.close()


async def test_worker_publishes_media_resolved_and_reports_failures_to_the_coordinator(
    memory_bus: Bus, media_server: MediaServer
) -> None:
    actor = Converter(settings=settings_for(), bus=memory_bus)
    good = ResolveMedia(job_id="job-good-0001", request=request(media_server.url("audio.mp3")))
    bad = ResolveMedia(job_id="job-bad-00001", request=request(media_server.url("empty.html")))
    async with receiving(memory_bus, "coordinator") as coordinator, running(Worker(actor)):
        await memory_bus.publish(good)
        first = await next_message(coordinator)
        await memory_bus.publish(bad)
        second = await next_message(coordinator)
    assert isinstance(first, MediaResolved) and first.job_id == "job-good-0001"
    assert first.plan.inputs[0].url == media_server.url("audio.mp3")
    assert isinstance(second, StepFailed) and second.job_id == "job-bad-00001"
    assert second.error.code is ErrorCode.NO_MEDIA_FOUND and second.step == "resolve"
