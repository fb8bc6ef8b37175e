"""The SSRF guard end to end, on loopback only: 127.0.0.1 is allow-listed, 127.0.0.2 is forbidden.

Both addresses are loopback on Linux, so every byte of these tests stays on this machine; the
forbidden origin counts its requests to prove that none reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yt_dlp
from aiohttp import web

from actors.guard import BLOCKED_HEADER, BLOCKED_VALUE, FetchGuard
from actors.guard.addresses import IPAddress
from messages.errors import ErrorCode, JobError

ALLOWED_HOST = "127.0.0.1"
FORBIDDEN_HOST = "127.0.0.2"
#: the test configuration: only 127.0.0.1 may be reached (so 127.0.0.2 plays "internal network")
TEST_ALLOW = ["127.0.0.1/32"]
#: seconds any single ffmpeg or yt-dlp run may take here before the test fails
TOOL_TIMEOUT = 20.0


@dataclass
class Origin:
    """A small web server on one loopback address, recording the paths it was asked for."""

    base: str
    hits: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 s tone as mp3 and as an HLS playlist with half-second segments, made by ffmpeg."""
    folder = tmp_path_factory.mktemp("guard-media")
    tone = ["-f", "lavfi", "-i", "sine=frequency=440:duration=2"]
    quiet = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y"]
    subprocess.run([*quiet, *tone, "-c:a", "libmp3lame", "-b:a", "64k", str(folder / "tone.mp3")], check=True)
    subprocess.run(
        [*quiet, *tone, "-c:a", "aac", "-f", "hls", "-hls_time", "0.5", "-hls_list_size", "0",
         "-hls_segment_filename", str(folder / "seg%d.ts"), str(folder / "list.m3u8")],
        check=True,
    )  # fmt: skip
    return folder


Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start aiohttp apps on a loopback host (port 0 = any free port); all stop after the test."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, host: str, port: int = 0) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, host, port).start()
        return f"http://{host}:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def media_app(origin: Origin, media: Path) -> web.Application:
    """Serves /hello and the media files, recording each request path on ``origin``."""

    @web.middleware
    async def record(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        origin.hits.append(request.path)
        return await handler(request)

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text=f"hello from {origin.base}")

    async def media_file(request: web.Request) -> web.FileResponse:
        return web.FileResponse(media / request.match_info["name"])

    app = web.Application(middlewares=[record])
    app.router.add_get("/hello", hello)
    app.router.add_get("/media/{name}", media_file)
    return app


@pytest.fixture
async def forbidden(serve: Serve, media_dir: Path) -> Origin:
    """The origin on 127.0.0.2, standing in for an internal service the guard must protect."""
    origin = Origin("")
    origin.base = await serve(media_app(origin, media_dir), FORBIDDEN_HOST)
    return origin


@pytest.fixture
async def allowed(serve: Serve, media_dir: Path, forbidden: Origin) -> Origin:
    """The origin on 127.0.0.1 (allow-listed): media, a redirect and playlists that point at ``forbidden``."""
    origin = Origin("")
    app = media_app(origin, media_dir)
    playlist = (media_dir / "list.m3u8").read_text()

    async def to_forbidden(_: web.Request) -> web.Response:
        raise web.HTTPFound(f"{forbidden.base}/media/tone.mp3")

    async def hls(request: web.Request) -> web.Response:
        # "remote": every segment lives on the forbidden origin; "mixed": all but the first
        lines, first_seen = [], False
        for line in playlist.splitlines():
            if line.startswith("seg"):
                remote = request.match_info["kind"] == "remote" or first_seen
                lines.append(f"{forbidden.base if remote else origin.base}/media/{line}")
                first_seen = True
            else:
                lines.append(line)
        return web.Response(text="\n".join(lines) + "\n", content_type="application/vnd.apple.mpegurl")

    app.router.add_get("/to-forbidden", to_forbidden)
    app.router.add_get("/hls/{kind}.m3u8", hls)
    origin.base = await serve(app, ALLOWED_HOST)
    return origin


@pytest.fixture
async def guard() -> AsyncIterator[FetchGuard]:
    """The guard as configured for these tests: 127.0.0.1 allowed, everything else internal forbidden."""
    async with FetchGuard(allow=TEST_ALLOW) as running:
        yield running


async def run_ffmpeg(
    guard: FetchGuard, url: str, *, environ: dict[str, str] | None = None
) -> tuple[int, str]:
    """Read ``url`` with ffmpeg through the guard's gateway (decode to null); return exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        "ffmpeg", "-nostdin", "-loglevel", "warning", "-rw_timeout", "10000000",
        *guard.ffmpeg_input_args(), "-i", guard.gateway_url(url), "-f", "null", "-",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env=guard.subprocess_env(os.environ if environ is None else environ),
    )  # fmt: skip
    try:
        async with asyncio.timeout(TOOL_TIMEOUT):
            _, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, stderr.decode(errors="replace")


async def run_ytdlp(guard: FetchGuard, action: Callable[[yt_dlp.YoutubeDL], object]) -> object:
    """Run ``action`` on a YoutubeDL routed through the guard, in a thread (the proxy needs this loop)."""
    options = {
        "quiet": True,
        "no_warnings": True,
        "socket_timeout": 10,
        "retries": 0,
        **guard.ytdlp_options(),
    }

    def call() -> object:
        with yt_dlp.YoutubeDL(options) as ydl:
            return action(ydl)

    async with asyncio.timeout(TOOL_TIMEOUT):
        return await asyncio.to_thread(call)


async def fetch_through(guard: FetchGuard, url: str) -> tuple[int, dict[str, str], str]:
    """GET ``url`` with aiohttp through the guard's proxy: status, headers, body."""
    async with aiohttp.ClientSession() as session, session.get(url, proxy=guard.proxy_url) as response:
        return response.status, dict(response.headers), await response.text()


# --- plain fetches


async def test_fetch_to_an_allow_listed_address_goes_through(guard: FetchGuard, allowed: Origin) -> None:
    status, _, body = await fetch_through(guard, f"{allowed.base}/hello")
    assert (status, body) == (200, f"hello from {allowed.base}")
    assert guard.blocked == []


async def test_fetch_to_a_forbidden_address_is_refused_and_recorded(
    guard: FetchGuard, forbidden: Origin
) -> None:
    status, headers, body = await fetch_through(guard, f"{forbidden.base}/hello")
    assert status == 403
    assert headers[BLOCKED_HEADER] == BLOCKED_VALUE
    assert body.startswith(BLOCKED_VALUE)
    assert [(b.host, b.ip) for b in guard.blocked] == [(FORBIDDEN_HOST, FORBIDDEN_HOST)]
    assert forbidden.hits == []
    with pytest.raises(JobError) as caught:
        guard.raise_if_blocked()
    assert caught.value.code is ErrorCode.URL_NOT_ALLOWED


async def test_a_name_is_judged_by_the_address_it_resolves_to(allowed: Origin) -> None:
    # nothing allow-listed: "localhost" passes any name check, but resolves to loopback
    async with FetchGuard(allow=[]) as strict:
        status, headers, _ = await fetch_through(strict, f"http://localhost:{allowed.port}/hello")
    assert status == 403 and headers[BLOCKED_HEADER] == BLOCKED_VALUE
    assert {b.host for b in strict.blocked} == {"localhost"}
    assert {b.ip for b in strict.blocked} <= {"127.0.0.1", "::1"}
    assert allowed.hits == []


async def test_a_name_with_any_forbidden_answer_is_refused_whole(allowed: Origin, forbidden: Origin) -> None:
    async def mixed(host: str, port: int) -> list[IPAddress]:
        from ipaddress import ip_address

        return [ip_address(ALLOWED_HOST), ip_address(FORBIDDEN_HOST)]

    async with FetchGuard(allow=TEST_ALLOW, resolve=mixed) as mixed_guard:
        status, _, _ = await fetch_through(mixed_guard, f"http://media.test:{allowed.port}/hello")
    assert status == 403
    assert allowed.hits == [] and forbidden.hits == []


async def test_the_proxy_connects_to_the_vetted_address_not_the_name_again(
    serve: Serve, media_dir: Path
) -> None:
    # DNS rebinding: the name answers "allowed" once, "forbidden" ever after, both on the same port
    allowed_origin = Origin("")
    allowed_origin.base = await serve(media_app(allowed_origin, media_dir), ALLOWED_HOST)
    forbidden_origin = Origin("")
    forbidden_origin.base = await serve(
        media_app(forbidden_origin, media_dir), FORBIDDEN_HOST, allowed_origin.port
    )
    answers: list[str] = []

    async def rebinding(host: str, port: int) -> list[IPAddress]:
        from ipaddress import ip_address

        answers.append(ALLOWED_HOST if not answers else FORBIDDEN_HOST)
        return [ip_address(answers[-1])]

    async with FetchGuard(allow=TEST_ALLOW, resolve=rebinding) as rebinding_guard:
        status, _, body = await fetch_through(
            rebinding_guard, f"http://rebind.test:{allowed_origin.port}/hello"
        )
    assert (status, body) == (200, f"hello from {allowed_origin.base}")
    assert answers == [ALLOWED_HOST]
    assert forbidden_origin.hits == []


# --- redirects


async def test_ytdlp_urlopen_redirect_to_a_forbidden_address_is_refused(
    guard: FetchGuard, allowed: Origin, forbidden: Origin
) -> None:
    with pytest.raises(yt_dlp.networking.exceptions.HTTPError) as caught:
        await run_ytdlp(guard, lambda ydl: ydl.urlopen(f"{allowed.base}/to-forbidden").read())
    assert caught.value.status == 403
    assert allowed.hits == ["/to-forbidden"]
    assert forbidden.hits == []
    assert [b.ip for b in guard.blocked] == [FORBIDDEN_HOST]


async def test_ytdlp_generic_extractor_redirect_to_a_forbidden_address_is_refused(
    guard: FetchGuard, allowed: Origin, forbidden: Origin
) -> None:
    with pytest.raises(yt_dlp.utils.DownloadError):
        await run_ytdlp(guard, lambda ydl: ydl.extract_info(f"{allowed.base}/to-forbidden", download=False))
    assert forbidden.hits == []
    assert FORBIDDEN_HOST in {b.ip for b in guard.blocked}
    with pytest.raises(JobError) as caught:
        guard.raise_if_blocked()
    assert caught.value.code is ErrorCode.URL_NOT_ALLOWED


async def test_ytdlp_resolves_an_allowed_direct_link_through_the_guard(
    guard: FetchGuard, allowed: Origin
) -> None:
    info = await run_ytdlp(
        guard, lambda ydl: ydl.extract_info(f"{allowed.base}/media/tone.mp3", download=False)
    )
    assert isinstance(info, dict) and info["url"] == f"{allowed.base}/media/tone.mp3"
    assert "/media/tone.mp3" in allowed.hits
    assert guard.blocked == []


async def test_ffmpeg_reads_an_allowed_url_through_the_guard(guard: FetchGuard, allowed: Origin) -> None:
    code, stderr = await run_ffmpeg(guard, f"{allowed.base}/media/tone.mp3")
    assert code == 0, stderr
    assert allowed.hits == ["/media/tone.mp3"]


async def test_ffmpeg_redirect_to_a_forbidden_address_is_refused(
    guard: FetchGuard, allowed: Origin, forbidden: Origin
) -> None:
    code, stderr = await run_ffmpeg(guard, f"{allowed.base}/to-forbidden")
    assert code != 0
    assert "403" in stderr
    assert forbidden.hits == []
    assert [b.ip for b in guard.blocked] == [FORBIDDEN_HOST]


async def test_no_proxy_in_the_environment_cannot_steer_ffmpeg_around_the_guard(
    guard: FetchGuard, forbidden: Origin
) -> None:
    # ffmpeg honours no_proxy even with -http_proxy; subprocess_env must take it away
    environ = {**os.environ, "no_proxy": FORBIDDEN_HOST, "NO_PROXY": "*"}
    code, _ = await run_ffmpeg(guard, f"{forbidden.base}/media/tone.mp3", environ=environ)
    assert code != 0
    assert forbidden.hits == []
    assert [b.ip for b in guard.blocked] == [FORBIDDEN_HOST]


# --- https (CONNECT tunnels)


async def test_ffmpeg_https_to_a_forbidden_address_is_refused_at_connect(
    guard: FetchGuard, forbidden: Origin
) -> None:
    code, _ = await run_ffmpeg(guard, f"https://{FORBIDDEN_HOST}:{forbidden.port}/media/tone.mp3")
    assert code != 0
    assert [b.ip for b in guard.blocked] == [FORBIDDEN_HOST]
    assert forbidden.hits == []


async def test_ytdlp_https_to_a_forbidden_address_is_refused_at_connect(
    guard: FetchGuard, forbidden: Origin
) -> None:
    with pytest.raises(yt_dlp.networking.exceptions.RequestError):
        await run_ytdlp(
            guard, lambda ydl: ydl.urlopen(f"https://{FORBIDDEN_HOST}:{forbidden.port}/hello").read()
        )
    assert [b.ip for b in guard.blocked] == [FORBIDDEN_HOST]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway self-signed certificate and key for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("guard-tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_ffmpeg_https_to_an_allowed_address_is_fetched_by_the_guard_over_verified_tls(
    media_dir: Path, tls_files: tuple[Path, Path]
) -> None:
    origin = Origin("")
    runner = web.AppRunner(media_app(origin, media_dir))
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    try:
        await web.TCPSite(runner, ALLOWED_HOST, 0, ssl_context=context).start()
        port = runner.addresses[0][1]
        # the guard speaks TLS upstream and verifies the certificate (ffmpeg 5.1 would not)
        trusting = ssl.create_default_context(cafile=str(tls_files[0]))
        async with FetchGuard(allow=TEST_ALLOW, tls=trusting) as guard:
            code, stderr = await run_ffmpeg(guard, f"https://{ALLOWED_HOST}:{port}/media/tone.mp3")
        async with FetchGuard(allow=TEST_ALLOW) as untrusting:
            refused, _ = await run_ffmpeg(untrusting, f"https://{ALLOWED_HOST}:{port}/media/tone.mp3")
    finally:
        await runner.cleanup()
    assert code == 0, stderr
    assert refused != 0  # an unverifiable certificate is not fetched
    assert origin.hits == ["/media/tone.mp3"]


# --- HLS: playlist and segments are separate fetches


async def test_ffmpeg_reads_an_allowed_hls_playlist_and_its_segments(
    guard: FetchGuard, allowed: Origin
) -> None:
    code, stderr = await run_ffmpeg(guard, f"{allowed.base}/media/list.m3u8")
    assert code == 0, stderr
    assert "/media/seg0.ts" in allowed.hits


async def test_hls_segments_on_a_forbidden_address_make_ffmpeg_fail_and_are_recorded(
    guard: FetchGuard, allowed: Origin, forbidden: Origin
) -> None:
    code, _ = await run_ffmpeg(guard, f"{allowed.base}/hls/remote.m3u8")
    assert code != 0
    assert allowed.hits == ["/hls/remote.m3u8"]
    assert forbidden.hits == []
    assert guard.blocked and {b.ip for b in guard.blocked} == {FORBIDDEN_HOST}
    error = guard.blocked_error()
    assert error is not None and error.code is ErrorCode.URL_NOT_ALLOWED


async def test_hls_with_some_forbidden_segments_is_caught_even_if_ffmpeg_carries_on(
    guard: FetchGuard, allowed: Origin, forbidden: Origin
) -> None:
    # ffmpeg skips segments it cannot open, so the exit code alone can miss the block
    await run_ffmpeg(guard, f"{allowed.base}/hls/mixed.m3u8")
    assert forbidden.hits == []
    with pytest.raises(JobError) as caught:
        guard.raise_if_blocked()
    assert caught.value.code is ErrorCode.URL_NOT_ALLOWED


# --- bounds


async def connect_raw(
    guard: FetchGuard, target: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Open a CONNECT tunnel by hand; return the streams and the proxy's response head."""
    host, port = guard.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


async def test_connect_tunnel_to_an_allowed_address_carries_plain_bytes(
    guard: FetchGuard, allowed: Origin
) -> None:
    reader, writer, head = await connect_raw(guard, f"{ALLOWED_HOST}:{allowed.port}")
    try:
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            response = await reader.read()
    finally:
        writer.close()
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(f"hello from {allowed.base}".encode())


async def test_tunnels_beyond_the_limit_are_turned_away(allowed: Origin) -> None:
    async with FetchGuard(allow=TEST_ALLOW, max_tunnels=1) as small:
        _, first, head = await connect_raw(small, f"{ALLOWED_HOST}:{allowed.port}")
        try:
            assert head.startswith(b"HTTP/1.1 200")
            _, second, refused = await connect_raw(small, f"{ALLOWED_HOST}:{allowed.port}")
            second.close()
        finally:
            first.close()
    assert refused.startswith(b"HTTP/1.1 503")


async def test_an_idle_tunnel_is_closed_by_the_guard(allowed: Origin) -> None:
    async with FetchGuard(allow=TEST_ALLOW, idle_timeout=0.3) as impatient:
        reader, writer, head = await connect_raw(impatient, f"{ALLOWED_HOST}:{allowed.port}")
        try:
            assert head.startswith(b"HTTP/1.1 200")
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # EOF: the guard hung up on the silent tunnel
        finally:
            writer.close()


async def test_a_name_that_cannot_be_resolved_gets_502_and_the_guard_keeps_serving(allowed: Origin) -> None:
    async def unencodable(host: str, port: int) -> list[IPAddress]:
        raise UnicodeError("label too long")  # what getaddrinfo raises for an over-long IDNA label

    async with FetchGuard(allow=TEST_ALLOW, resolve=unencodable) as broken_dns:
        status, _, _ = await fetch_through(broken_dns, f"http://{'a' * 70}.test/")
        assert status == 502
        allowed_status, _, _ = await fetch_through(broken_dns, f"{allowed.base}/hello")
    assert allowed_status == 502  # still answering, and still never guessing an address
    assert broken_dns.blocked == []


async def test_a_request_the_proxy_does_not_serve_gets_400(guard: FetchGuard) -> None:
    host, port = guard.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /not-absolute HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            response = await reader.read()
    finally:
        writer.close()
    assert response.startswith(b"HTTP/1.1 400")
    assert guard.blocked == []


# --- the job's media budget: every input and segment together


def segment_sizes(media_dir: Path) -> list[int]:
    """Bytes of each HLS segment of the test playlist."""
    return [path.stat().st_size for path in sorted(media_dir.glob("seg*.ts"))]


async def test_hls_segments_that_each_fit_but_together_pass_the_media_budget_fail_source_too_large(
    allowed: Origin, media_dir: Path
) -> None:
    sizes = segment_sizes(media_dir)
    assert len(sizes) >= 3
    budget = max(sizes) + 1  # any one segment fits; the job's segments together do not
    async with FetchGuard(allow=TEST_ALLOW, media_budget=budget) as budgeted:
        await run_ffmpeg(budgeted, f"{allowed.base}/media/list.m3u8")
        error = budgeted.blocked_error()
    assert error is not None and error.code is ErrorCode.SOURCE_TOO_LARGE, error
    assert str(budget) in error.detail


async def test_an_input_exactly_at_the_media_budget_is_relayed_whole(allowed: Origin, media_dir: Path) -> None:
    size = (media_dir / "tone.mp3").stat().st_size
    async with FetchGuard(allow=TEST_ALLOW, media_budget=size) as budgeted:
        code, stderr = await run_ffmpeg(budgeted, f"{allowed.base}/media/tone.mp3")
        error = budgeted.blocked_error()
    assert code == 0 and error is None, stderr


async def test_the_proxy_door_of_a_guard_without_a_page_budget_counts_against_the_media_budget(
    allowed: Origin, media_dir: Path
) -> None:
    # the uploader's guard: its proxy door carries the feeder's yt-dlp downloads (DASH fragments)
    size = (media_dir / "tone.mp3").stat().st_size
    async with FetchGuard(allow=TEST_ALLOW, media_budget=size // 2) as budgeted:
        with contextlib.suppress(aiohttp.ClientError):  # cut off mid-body, or before the head
            await fetch_through(budgeted, f"{allowed.base}/media/tone.mp3")
        error = budgeted.blocked_error()
    assert error is not None and error.code is ErrorCode.SOURCE_TOO_LARGE


async def test_the_callers_error_names_no_internal_host_while_the_log_keeps_it(
    guard: FetchGuard, allowed: Origin, forbidden: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="actors.guard.proxy"):
        await run_ffmpeg(guard, f"{allowed.base}/to-forbidden")
    error = guard.blocked_error()
    assert error is not None and error.code is ErrorCode.URL_NOT_ALLOWED
    assert FORBIDDEN_HOST not in error.detail and str(forbidden.port) not in error.detail
    assert FORBIDDEN_HOST in caplog.text and "loopback" in caplog.text  # the operator still learns where and why


# --- the job's deadline: every connection closed when it passes


async def test_the_jobs_deadline_closes_a_live_tunnel_and_fails_the_job_with_timeout(allowed: Origin) -> None:
    async with FetchGuard(allow=TEST_ALLOW) as guard:  # idle timeout 30 s: only the deadline can end it
        guard.set_deadline(asyncio.get_running_loop().time() + 0.5)
        reader, writer, head = await connect_raw(guard, f"{ALLOWED_HOST}:{allowed.port}")
        try:
            assert head.startswith(b"HTTP/1.1 200")
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # EOF at the deadline, long before the idle timeout
        finally:
            writer.close()
        error = guard.blocked_error()
    assert error is not None and error.code is ErrorCode.TIMEOUT


# --- a forbidden address spelled so that only the client's normalisation reveals it

#: 127.0.0.2 as yarl (and so aiohttp) reads them: fullwidth digits, ideographic full stops, circled
#: digits, a superscript two (a playlist is read as latin-1, where ``²`` is one byte)
UNICODE_SPELLINGS = ["１２７.０.０.２", "127。0。0。2", "①②⑦.0.0.2", "127.0.0.\u00b2"]


async def gateway_get(url: str) -> tuple[int, bytes]:
    """GET a gateway URL as ffmpeg does: plain HTTP to the guard's loopback door."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


@pytest.mark.parametrize("spelling", UNICODE_SPELLINGS)
async def test_a_gateway_input_spelling_a_forbidden_address_in_unicode_digits_is_refused(
        guard: FetchGuard, forbidden: Origin, spelling: str) -> None:
    status, body = await gateway_get(guard.gateway_url(f"http://{spelling}:{forbidden.port}/media/tone.mp3"))
    assert status == 403 and b"not allowed" in body
    assert forbidden.hits == []
    assert [b.ip for b in guard.blocked] == [FORBIDDEN_HOST]


async def test_a_redirect_to_a_unicode_spelled_forbidden_address_is_refused(
        serve: Serve, guard: FetchGuard, forbidden: Origin) -> None:
    # the allowed origin answers with a UTF-8 Location, as any hostile page may
    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        location = f"http://１２７.０.０.２:{forbidden.port}/media/tone.mp3".encode()
        writer.write(b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hostile, ALLOWED_HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        status, _ = await gateway_get(guard.gateway_url(f"http://{ALLOWED_HOST}:{port}/song.mp3"))
    finally:
        server.close()
        await server.wait_closed()
    assert status == 403
    assert forbidden.hits == []
    with pytest.raises(JobError) as refused:
        guard.raise_if_blocked()
    assert refused.value.code is ErrorCode.URL_NOT_ALLOWED


async def test_hls_segments_and_keys_on_a_latin1_superscript_spelling_are_refused(
        serve: Serve, guard: FetchGuard, forbidden: Origin) -> None:
    port = forbidden.port
    playlist = (f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n"
                f"#EXT-X-KEY:METHOD=AES-128,URI=\"http://127.0.0.\u00b2:{port}/media/key\"\n"
                f"#EXTINF:1,\nhttp://127.0.0.\u00b2:{port}/media/seg0.ts\n#EXT-X-ENDLIST\n")

    async def hls(_: web.Request) -> web.Response:
        return web.Response(body=playlist.encode("latin-1"), content_type="application/vnd.apple.mpegurl")

    app = web.Application()
    app.router.add_get("/list.m3u8", hls)
    base = await serve(app, ALLOWED_HOST)
    status, body = await gateway_get(guard.gateway_url(f"{base}/list.m3u8"))
    if status == 200:  # rewritten to gateway URLs: what ffmpeg fetches next must be refused too
        text = body.decode("latin-1")
        urls = [line.split('URI="')[1].rstrip('"') if "URI=" in line else line
                for line in text.splitlines() if "/via/" in line]
        assert len(urls) == 2
        assert [(await gateway_get(url))[0] for url in urls] == [403, 403]
    else:
        assert status == 403
    assert forbidden.hits == []
    assert guard.blocked


def test_the_pre_flight_check_reads_the_host_as_the_client_will() -> None:
    from actors.guard.urls import check_url

    for spelling in [*UNICODE_SPELLINGS, "169.\u00b254.169.\u00b254"]:
        with pytest.raises(JobError) as refused:
            check_url(f"http://{spelling}/x", allow=TEST_ALLOW)
        assert refused.value.code is ErrorCode.URL_NOT_ALLOWED, spelling
    check_url("http://xn--mnchen-3ya.de/", allow=TEST_ALLOW)
    check_url("http://münchen.de/", allow=TEST_ALLOW)  # an IDN name is a name, judged when it resolves


async def test_a_redirect_to_another_origin_carries_no_cookie_or_authorization(serve: Serve) -> None:
    # both origins are allow-listed loopback addresses: only the headers are in question here
    seen: dict[str, list[tuple[str | None, str | None]]] = {"same": [], "other": []}

    def recorder(where: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            seen[where].append((request.headers.get("Cookie"), request.headers.get("Authorization")))
            return web.Response(body=b"\x00" * 64, content_type="application/octet-stream")
        return handler

    other = web.Application()
    other.router.add_get("/x", recorder("other"))
    other_base = await serve(other, "127.0.0.3")

    async def away(_: web.Request) -> web.Response:
        raise web.HTTPFound(f"{other_base}/x")

    async def home(_: web.Request) -> web.Response:
        raise web.HTTPFound("/here")

    first = web.Application()
    first.router.add_get("/away.mp4", away)
    first.router.add_get("/home.mp4", home)
    first.router.add_get("/here", recorder("same"))
    base = await serve(first, ALLOWED_HOST)
    secret = {"Cookie": "SID=site-session", "Authorization": "Bearer site-token"}
    async with FetchGuard(allow=[*TEST_ALLOW, "127.0.0.3/32"]) as guard, aiohttp.ClientSession() as session:
        for path in ("/home.mp4", "/away.mp4"):
            async with session.get(guard.gateway_url(f"{base}{path}"), headers=secret) as response:
                assert response.status == 200
                await response.read()
    assert seen["same"] == [("SID=site-session", "Bearer site-token")]  # a same-origin hop keeps them
    assert seen["other"] == [(None, None)]


async def test_ffmpeg_sends_its_cookie_only_to_the_playlists_origin_not_to_segments_elsewhere(
        serve: Serve, media_dir: Path) -> None:
    # ffmpeg repeats -headers on every request of an input; the guard keeps them to the playlist's origin
    seen: dict[str, list[str | None]] = {"home": [], "other": []}

    def segments(where: str) -> web.Application:
        async def segment(request: web.Request) -> web.FileResponse:
            seen[where].append(request.headers.get("Cookie"))
            return web.FileResponse(media_dir / request.match_info["name"])
        app = web.Application()
        app.router.add_get("/media/{name}", segment)
        return app

    other_base = await serve(segments("other"), "127.0.0.3")
    home = segments("home")
    lines = (media_dir / "list.m3u8").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("seg"))

    async def playlist(_: web.Request) -> web.Response:
        # the first segment on the playlist's own origin, every other one on another host
        text = "\n".join(f"/media/{line}" if i == first else f"{other_base}/media/{line}" if line.startswith("seg")
                         else line for i, line in enumerate(lines))
        return web.Response(text=text + "\n", content_type="application/vnd.apple.mpegurl")

    home.router.add_get("/list.m3u8", playlist)
    base = await serve(home, ALLOWED_HOST)
    async with FetchGuard(allow=[*TEST_ALLOW, "127.0.0.3/32"]) as guard:
        process = await asyncio.create_subprocess_exec(
            "ffmpeg", "-nostdin", "-loglevel", "error", *guard.ffmpeg_input_args(),
            "-headers", "Cookie: SID=site-session\r\n", "-i", guard.gateway_url(f"{base}/list.m3u8"),
            "-f", "null", "-", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=guard.subprocess_env(os.environ))
        async with asyncio.timeout(TOOL_TIMEOUT):
            _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode(errors="replace")
    assert seen["home"] == ["SID=site-session"]
    assert seen["other"] and set(seen["other"]) == {None}, seen
