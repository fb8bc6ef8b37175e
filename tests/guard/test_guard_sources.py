"""Hostile sources tried as an attacker's public page would: nested URLs of every protocol, keys,
variants, DASH BaseURLs and redirect chains aimed at the internal host.

Loopback only: the sources live on 127.0.0.1 (allow-listed by the test configuration); 127.0.0.2
plays the internal network, where a recording listener counts every TCP connection it accepts.
Each source is tried twice — as a converter job, and as the uploader's ffmpeg reads an input
through the guard's gateway — and in every case the listener sees nothing and the job fails with
``url_not_allowed``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from actors.guard import FetchGuard
from actors.guard.feeder import EXIT_NOT_ALLOWED
from messages.errors import ErrorCode
from tests.actors import test_converter
from tests.actors.test_converter import ALLOW, MakeConverter, failure
from tests.fixtures.media import MediaLibrary, MediaServer

#: the converter tests' fixture: started Converters with the test settings, torn down after
make_converter = test_converter.make_converter

INTERNAL_HOST = "127.0.0.2"
#: seconds an ffmpeg run may take here before the test fails
TOOL_TIMEOUT = 30.0


@dataclass
class Listener:
    """A TCP listener on the internal host that records every connection it accepts."""

    port: int = 0
    connections: list[tuple[str, int]] = field(default_factory=list)


@pytest.fixture
async def internal() -> AsyncIterator[Listener]:
    """The recording listener on 127.0.0.2 (any free port)."""
    listener = Listener()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        listener.connections.append(writer.get_extra_info("peername"))
        writer.close()

    server = await asyncio.start_server(accept, INTERNAL_HOST, 0)
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()


def hls_media(first_segment: str, second: str, *, key: str = "") -> str:
    """A VOD media playlist: one real segment, then ``second`` (``key`` adds an EXT-X-KEY line first)."""
    key_line = f'#EXT-X-KEY:METHOD=AES-128,URI="{key}"\n' if key else ""
    return (f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n{key_line}"
            f"#EXTINF:2.0,\n{first_segment}\n#EXTINF:2.0,\n{second}\n#EXT-X-ENDLIST\n")


def hls_master(good_variant: str, best_variant: str) -> str:
    """A master playlist whose highest-bandwidth variant is ``best_variant``."""
    return ("#EXTM3U\n"
            f'#EXT-X-STREAM-INF:BANDWIDTH=200000,CODECS="avc1.42c01e,mp4a.40.2"\n{good_variant}\n'
            f'#EXT-X-STREAM-INF:BANDWIDTH=9000000,CODECS="avc1.42c01e,mp4a.40.2"\n{best_variant}\n')


def dash_needing_merge(base_url: str) -> str:
    """An MPD with separate video and audio representations under one BaseURL (yt-dlp merges them)."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" mediaPresentationDuration="PT6S"
     profiles="urn:mpeg:dash:profile:isoff-on-demand:2011" minBufferTime="PT2S">
  <BaseURL>{base_url}</BaseURL>
  <Period>
    <AdaptationSet mimeType="video/mp4" contentType="video">
      <Representation id="v1" bandwidth="900000" codecs="avc1.42c01e" width="320" height="240">
        <BaseURL>video.mp4</BaseURL>
        <SegmentBase indexRange="0-100"><Initialization range="0-50"/></SegmentBase>
      </Representation>
    </AdaptationSet>
    <AdaptationSet mimeType="audio/mp4" contentType="audio">
      <Representation id="a1" bandwidth="64000" codecs="mp4a.40.2" audioSamplingRate="44100">
        <BaseURL>audio.m4a</BaseURL>
        <SegmentBase indexRange="0-100"><Initialization range="0-50"/></SegmentBase>
      </Representation>
    </AdaptationSet>
  </Period>
</MPD>
"""


@dataclass
class Source:
    """One hostile source: the path the job is given, and what the attacker's server answers."""

    path: str
    routes: dict[str, tuple[str, str]]  # path → (content type, body); a body "→URL" is a 302 to URL


M3U8 = "application/vnd.apple.mpegurl"

#: name → how to build the source from (good segment URL, good media playlist URL, internal host:port)
SOURCES: dict[str, Callable[[str, str, str], Source]] = {
    "hls segment httpproxy://": lambda seg, _, bad: Source(
        "/a.m3u8", {"/a.m3u8": (M3U8, hls_media(seg, f"httpproxy://{bad}/s1.ts"))}),
    "hls segment tcp://": lambda seg, _, bad: Source(
        "/a.m3u8", {"/a.m3u8": (M3U8, hls_media(seg, f"tcp://{bad}/s1.ts"))}),
    "hls segment crypto+tcp://": lambda seg, _, bad: Source(
        "/a.m3u8", {"/a.m3u8": (M3U8, hls_media(seg, f"crypto+tcp://{bad}/s1.ts"))}),
    "hls key on the internal host": lambda seg, _, bad: Source(
        "/a.m3u8", {"/a.m3u8": (M3U8, hls_media(seg, seg, key=f"http://{bad}/key.bin"))}),
    "master best variant tcp://": lambda _, good, bad: Source(
        "/m.m3u8", {"/m.m3u8": (M3U8, hls_master(good, f"tcp://{bad}/best.m3u8"))}),
    "master best variant httpproxy://": lambda _, good, bad: Source(
        "/m.m3u8", {"/m.m3u8": (M3U8, hls_master(good, f"httpproxy://{bad}/best.m3u8"))}),
    "dash merge with httpproxy:// BaseURL": lambda _, __, bad: Source(
        "/d.mpd", {"/d.mpd": ("application/dash+xml", dash_needing_merge(f"httpproxy://{bad}/"))}),
    "redirect chain to the internal host": lambda _, __, bad: Source(
        "/r1.mp3", {"/r1.mp3": ("", "→/r2.mp3"), "/r2.mp3": ("", f"→http://{bad}/secret.mp3")}),
}


@pytest.fixture
async def attacker(media_files: MediaLibrary, media_server: MediaServer,
                   internal: Listener) -> AsyncIterator[Callable[[str], str]]:
    """The attacker's public server on 127.0.0.1: ``url_for(name)`` serves SOURCES[name], returns its URL."""
    media_files.path("hls/index.m3u8")  # the real segments the playlists start with
    routes: dict[str, tuple[str, str]] = {}

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path not in routes:
            raise web.HTTPNotFound()
        content_type, body = routes[request.path]
        if body.startswith("→"):
            raise web.HTTPFound(body[1:])
        return web.Response(body=body.encode(), content_type=content_type)

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    good_media = "/good.m3u8"
    seg = media_server.url("hls/seg0.ts")
    routes[good_media] = (M3U8, hls_media(seg, media_server.url("hls/seg1.ts")))

    def url_for(name: str) -> str:
        source = SOURCES[name](seg, base + good_media, f"{INTERNAL_HOST}:{internal.port}")
        routes.update(source.routes)
        return base + source.path

    try:
        yield url_for
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("name", list(SOURCES))
async def test_hostile_source_fails_the_converter_job_with_no_connection_to_the_internal_host(
    name: str, attacker: Callable[[str], str], internal: Listener, make_converter: MakeConverter
) -> None:
    converter = await make_converter()
    error = await failure(converter, attacker(name))
    assert error.code is ErrorCode.URL_NOT_ALLOWED, error
    assert internal.connections == []
    assert str(internal.port) not in error.detail and INTERNAL_HOST not in error.detail


@pytest.mark.parametrize("name", list(SOURCES))
async def test_hostile_source_read_by_ffmpeg_through_the_gateway_reaches_no_internal_host(
    name: str, attacker: Callable[[str], str], internal: Listener
) -> None:
    url = attacker(name)
    async with FetchGuard(allow=ALLOW) as guard:
        # as the uploader runs it: the gateway URL as input, the guard's whitelist, no proxy
        process = await asyncio.create_subprocess_exec(
            "ffmpeg", "-nostdin", "-loglevel", "error", "-rw_timeout", "10000000",
            *guard.input_args(["-protocol_whitelist", "hls,http,https,tcp,tls,crypto"]),
            "-i", guard.gateway_url(url), "-f", "null", "-",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=guard.subprocess_env({"PATH": "/usr/bin:/bin"}),
        )  # fmt: skip
        async with asyncio.timeout(TOOL_TIMEOUT):
            _, stderr = await process.communicate()
        error = guard.blocked_error()
    assert error is not None and error.code is ErrorCode.URL_NOT_ALLOWED, stderr.decode(errors="replace")
    assert internal.connections == []


async def run_feeder(guard: FetchGuard, url: str, format_id: str = "") -> tuple[int, bytes, str]:
    """The uploader's feeder for ``url`` through ``guard``: exit status, stdout, stderr."""
    plan_input = ["-f", format_id] if format_id else []
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors.guard.feeder", "--proxy", guard.proxy_url, "--socket-timeout", "10",
        *plan_input, "--", url,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=guard.subprocess_env(os.environ),
    )  # fmt: skip
    async with asyncio.timeout(TOOL_TIMEOUT):
        stdout, stderr = await process.communicate()
    return process.returncode or 0, stdout, stderr.decode(errors="replace")


@pytest.mark.parametrize("name", list(SOURCES))
async def test_hostile_source_fed_by_ytdlp_reaches_no_internal_host(
    name: str, attacker: Callable[[str], str], internal: Listener
) -> None:
    async with FetchGuard(allow=ALLOW) as guard:
        code, _, stderr = await run_feeder(guard, attacker(name), "bestvideo+bestaudio/best")
        error = guard.blocked_error()
    assert code != 0
    assert code == EXIT_NOT_ALLOWED or (error is not None and error.code is ErrorCode.URL_NOT_ALLOWED), stderr
    assert internal.connections == []


async def test_the_feeder_streams_an_allowed_source_through_the_gateway(
    media_files: MediaLibrary, media_server: MediaServer
) -> None:
    async with FetchGuard(allow=ALLOW) as guard:
        code, stdout, stderr = await run_feeder(guard, media_server.url("audio.mp3"))
        error = guard.blocked_error()
    assert code == 0 and error is None, stderr
    assert stdout == media_files.path("audio.mp3").read_bytes()
    # yt-dlp asked for the file through the gateway, which fetched it (the only request the server saw)
    assert media_server.requests_for("audio.mp3")


async def test_the_feeder_stops_at_the_jobs_media_budget_with_source_too_large(
    media_files: MediaLibrary, media_server: MediaServer
) -> None:
    size = media_files.path("audio.mp3").stat().st_size
    async with FetchGuard(allow=ALLOW, media_budget=size // 2) as guard:
        _, stdout, stderr = await run_feeder(guard, media_server.url("audio.mp3"))
        error = guard.blocked_error()
    assert error is not None and error.code is ErrorCode.SOURCE_TOO_LARGE, stderr
    assert len(stdout) <= size // 2
