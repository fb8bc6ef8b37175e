"""The operator's levers, end to end on loopback: egress proxy, cookies file, yt-dlp plugins and
extractor arguments, and their validation at start and in ``getgoodtape check``.

The test site is a MediaServer (tests/fixtures/media.py) on 127.0.0.1 that also records the
client port of every request (so a request that came through the recording CONNECT proxy of
tests/support/egress_proxy.py can be told from a direct one) and serves a page and media that
answer 403 without the session cookie.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import ipaddress
import logging
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import yt_dlp
from aiohttp import web

from actors.adapters.levers import Levers, LeversInvalid, lever_problems
from actors.guard.egress import EgressProxyInvalid, check_egress_proxy, masked_proxy_url
from actors.guard.extract import ExtractorPool
from actors.guard.proxy import PAGE_BUDGET
from actors.runtime.settings import load_settings
from messages.types import ConvertRequested, JobCompleted
from tests.fixtures.broker import test_settings as settings_for
from tests.fixtures.media import MediaLibrary, MediaServer
from tests.fixtures.pipeline import memory_pipeline
from tests.support.egress_proxy import RecordingConnectProxy, RecordingSocks5Proxy

#: the session cookie the test site wants; its value must appear nowhere but on the wire to the site
COOKIE_NAME = "ggt_session"
COOKIE_VALUE = "s3cr3t-" + hashlib.sha256(b"ggt cookie").hexdigest()[:24]
#: where the fixture plugin packages live (a directory laid out as site-packages)
PLUGIN_SITE = Path(__file__).resolve().parents[1] / "fixtures" / "ytdlp_plugin_site"
#: seconds an extraction may take in these tests
EXTRACT_TIMEOUT = 60.0

_COOKIE_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Members only</title></head>
<body><video controls src="/members/{name}" poster="/thumbnail.jpg"></video></body></html>
"""


class LeverSite(MediaServer):
    """The media server, plus: the client port of each request, and ``/members/…`` routes that need the cookie."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        #: (path, client port, Cookie header, status) of every request, oldest first
        self.seen: list[tuple[str, int, str, int]] = []

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/members/page/{name}.html", self._members_page)
        router.add_get("/members/{name}", self._members_file)

    async def _log_response(self, request: web.Request, response: web.StreamResponse) -> None:
        await super()._log_response(request, response)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append((request.path, peer[1] if peer else 0, request.headers.get("Cookie", ""), response.status))

    def _has_cookie(self, request: web.Request) -> bool:
        return request.cookies.get(COOKIE_NAME) == COOKIE_VALUE

    async def _members_page(self, request: web.Request) -> web.StreamResponse:
        if not self._has_cookie(request):
            raise web.HTTPForbidden(text="sign in")
        name = html.escape(request.match_info["name"])
        return web.Response(text=_COOKIE_PAGE.format(name=name), content_type="text/html")

    async def _members_file(self, request: web.Request) -> web.StreamResponse:
        if not self._has_cookie(request):
            raise web.HTTPForbidden(text="sign in")
        return await self._file(request)


@pytest.fixture
async def site(media_files: MediaLibrary) -> AsyncIterator[LeverSite]:
    """The lever site on 127.0.0.1, in this test's loop."""
    server = LeverSite(media_files.root)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def egress_proxy() -> AsyncIterator[RecordingConnectProxy]:
    """The recording CONNECT proxy on 127.0.0.1."""
    async with RecordingConnectProxy() as proxy:
        yield proxy


def cookies_file(directory: Path) -> Path:
    """A Netscape cookies file holding the site's session cookie for 127.0.0.1, read-only."""
    path = directory / "cookies.txt"
    path.write_text("# Netscape HTTP Cookie File\n"
                    f"127.0.0.1\tFALSE\t/\tFALSE\t0\t{COOKIE_NAME}\t{COOKIE_VALUE}\n")
    path.chmod(0o400)
    return path


# --- the egress proxy


async def test_every_connection_of_a_job_leaves_through_the_egress_proxy(storage_config, storage, site,
                                                                         egress_proxy):
    async with memory_pipeline(storage_config, storage, egress_proxy=egress_proxy.url) as pipeline:
        final = await pipeline.run(ConvertRequested(url=site.url("page/av_h264_aac.mp4.html"), format="mp3"))
    assert isinstance(final, JobCompleted), final
    tunnelled = {tunnel.upstream_port for tunnel in egress_proxy.tunnels}
    paths = {path for path, _, _, _ in site.seen}
    # extraction (the page), probing and media (the file), the thumbnail: all of them were fetched …
    assert {"/page/av_h264_aac.mp4.html", "/av_h264_aac.mp4", "/thumbnail.jpg"} <= paths, paths
    # … and every request the site saw came over a connection the proxy opened
    assert all(port in tunnelled for _, port, _, _ in site.seen), (site.seen, egress_proxy.tunnels)
    # the guard asked for the vetted address, never for a name the proxy would resolve
    assert {tunnel.target for tunnel in egress_proxy.tunnels} == {f"127.0.0.1:{site.port}"}


async def test_without_the_setting_no_connection_goes_through_the_proxy(storage_config, storage, site,
                                                                         egress_proxy):
    async with memory_pipeline(storage_config, storage) as pipeline:
        final = await pipeline.run(ConvertRequested(url=site.url("page/av_h264_aac.mp4.html"), format="mp3"))
    assert isinstance(final, JobCompleted), final
    assert site.seen and egress_proxy.tunnels == []


async def test_the_egress_proxy_gets_its_credentials_and_still_cannot_reach_a_forbidden_host(media_files):
    from actors.guard.egress import Egress
    from actors.guard.proxy import FetchGuard

    async with RecordingConnectProxy(require_auth=("ggt", "pa:ss")) as proxy:
        url = proxy.url.replace("pa:ss", "pa%3Ass")
        async with FetchGuard(allow=["127.0.0.1/32"], deny=["127.0.0.3/32"], egress=Egress(url)) as guard:
            reader, writer = await asyncio.open_connection("127.0.0.1", int(guard.proxy_url.rpartition(":")[2]))
            writer.write(b"GET http://127.0.0.3:9/x HTTP/1.1\r\nHost: 127.0.0.3:9\r\n\r\n")
            answer = await reader.read()
            writer.close()
            server = MediaServer(media_files.root)
            await server.start()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", int(guard.proxy_url.rpartition(":")[2]))
                writer.write(f"GET {server.url('audio.mp3')} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                fetched = await reader.read()
                writer.close()
            finally:
                await server.stop()
    assert answer.startswith(b"HTTP/1.1 403") and b"url_not_allowed" in answer
    assert fetched.startswith(b"HTTP/1.1 200")
    # the refused host was never asked of the proxy; the allowed one was, with the credentials
    assert [tunnel.target for tunnel in proxy.tunnels] == [f"127.0.0.1:{server.port}"]
    assert proxy.tunnels[0].authorization.startswith("Basic ")


def test_egress_proxy_urls_are_checked_and_their_credentials_masked():
    check_egress_proxy("")
    check_egress_proxy("http://proxy.internal:3128")
    check_egress_proxy("socks5://user:secret@10.0.0.5:1080")
    for bad in ("proxy:3128", "https://proxy:3128", "http://proxy", "http://u:secret@proxy:3128/path",
                "ftp://proxy:21"):
        with pytest.raises(EgressProxyInvalid) as refused:
            check_egress_proxy(bad)
        assert "secret" not in str(refused.value)
    assert masked_proxy_url("http://user:secret@proxy:3128") == "http://***@proxy:3128"


# --- the cookies file


async def test_the_cookies_file_reaches_the_site_and_no_log_message_or_event(storage_config, storage, site,
                                                                             tmp_path, caplog):
    path = cookies_file(tmp_path)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    published: list[bytes] = []
    caplog.set_level(logging.DEBUG)
    async with memory_pipeline(storage_config, storage, cookies_file=str(path)) as pipeline:
        publish_raw = pipeline.bus.publish_raw

        async def recording(**kwargs):
            published.append(kwargs["body"] + msgspec.json.encode(kwargs["envelope"], enc_hook=str))
            return await publish_raw(**kwargs)

        pipeline.bus.publish_raw = recording
        final = await pipeline.run(ConvertRequested(url=site.url("members/page/av_h264_aac.mp4.html"),
                                                    format="mp3"))
        events = [*pipeline.progress.get(final.job_id, []), final]
    assert isinstance(final, JobCompleted), final
    with_cookie = {path for path, _, cookie, _ in site.seen if f"{COOKIE_NAME}={COOKIE_VALUE}" in cookie}
    # extraction read the page with it, probing and the uploader's ffmpeg read the media with it
    assert "/members/page/av_h264_aac.mp4.html" in with_cookie
    media = [(cookie, status) for p, _, cookie, status in site.seen if p == "/members/av_h264_aac.mp4"]
    assert len(media) >= 2 and all(COOKIE_VALUE in cookie and status in (200, 206) for cookie, status in media)
    # the value travelled in no message (commands, events, what a dead letter would hold), no log record
    assert published and not [body for body in published if COOKIE_VALUE.encode() in body]
    assert not [event for event in events if COOKIE_VALUE in msgspec.json.encode(event).decode()]
    assert not [r for r in caplog.records if COOKIE_VALUE in r.getMessage()]
    # and the operator's file is as it was
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


async def test_without_the_cookies_file_the_members_page_is_refused(storage_config, storage, site):
    async with memory_pipeline(storage_config, storage) as pipeline:
        final = await pipeline.run(ConvertRequested(url=site.url("members/page/av_h264_aac.mp4.html"),
                                                    format="mp3"))
    assert not isinstance(final, JobCompleted)
    assert [(cookie, status) for _, _, cookie, status in site.seen] == [("", 403)]


# --- plugins and extractor arguments


async def extract_with(levers: Levers, url: str):
    """yt-dlp's answer for ``url`` from a one-worker pool with ``levers``."""
    async with ExtractorPool(size=1, make_guard=lambda: levers.guard(page_budget=PAGE_BUDGET),
                             network_timeout=5.0, max_bytes=1 << 20, levers=levers.worker_levers()) as pool:
        return await pool.extract(url, deadline=asyncio.get_running_loop().time() + EXTRACT_TIMEOUT)


async def test_only_the_named_plugin_package_loads(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_SITE))
    levers = Levers.open(settings_for(allow_networks=("127.0.0.1/32",), ytdlp_plugins=("ggt-fixture-plugin",)))
    try:
        named = await extract_with(levers, "http://127.0.0.1:9/ggt-fixture/clip1")
        unnamed = await extract_with(levers, "http://127.0.0.1:9/ggt-other/clip2")
    finally:
        levers.close()
    assert named.info is not None and named.info["extractor_key"] == "GgtFixture", named
    # the other package is installed beside it (same yt_dlp_plugins namespace) but was not named
    assert unnamed.info is None or unnamed.info.get("extractor_key") != "GgtOther", unnamed


async def test_no_plugin_loads_when_none_is_named(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_SITE))
    levers = Levers.open(settings_for(allow_networks=("127.0.0.1/32",)))
    answer = await extract_with(levers, "http://127.0.0.1:9/ggt-fixture/clip1")
    assert answer.info is None or answer.info.get("extractor_key") != "GgtFixture", answer


def test_extractor_args_are_parsed_by_ytdlp_and_reach_the_workers():
    settings = settings_for(
        ytdlp_extractor_args="youtube:player_client=web,tv;po_token=web.gvs+AB/c= generic:impersonate")
    levers = Levers.open(settings)
    assert levers.worker_levers().extractor_args == {
        "youtube": {"player_client": ["web", "tv"], "po_token": ["web.gvs+AB/c="]},
        "generic": {"impersonate": [""]},
    }


# --- validation


@pytest.mark.parametrize(("setting", "value", "says"), [
    ("GGT_EGRESS_PROXY", "https://u:secret-pw@proxy:3128", "scheme"),
    ("GGT_EGRESS_PROXY", "http://proxy", "host and a port"),
    ("GGT_COOKIES_FILE", "/nonexistent/cookies.txt", "not a readable file"),
    ("GGT_YTDLP_EXTRACTOR_ARGS", "youtube-po_token=secret-pw", "entry 1 is not IE_KEY:ARGS"),
    ("GGT_YTDLP_PLUGINS", "not-installed-ggt-plugin", "is not installed"),
    ("GGT_YTDLP_PLUGINS", "bad name!", "not a package name"),
    ("GGT_YTDLP_PLUGINS", "msgspec", "holds no yt_dlp_plugins modules"),
    ("GGT_ALLOW_NETWORKS", "10.0.0.1/8", "is not a network"),  # host bits set: failed every job before
    ("GGT_ALLOW_NETWORKS", "10.0.0.0/8,0.0.0.0/0", "allow every IPv4 address"),
    ("GGT_ALLOW_NETWORKS", "::/0", "allow every IPv6 address"),
    ("GGT_ALLOW_NETWORKS", "0.0.0.0/1,128.0.0.0/1", "allow every IPv4 address"),  # /0 in two halves
    ("GGT_DENY_NETWORKS", "not-a-network", "is not a network"),
])
def test_bad_lever_settings_are_refused_at_start_with_a_clear_message(setting, value, says):
    settings = load_settings({setting: value})
    problems = lever_problems(settings)
    assert [name for name, _ in problems] == [setting] and says in problems[0][1], problems
    with pytest.raises(LeversInvalid) as refused:
        Levers.open(settings)
    assert setting in str(refused.value) and "secret" not in str(refused.value)


def test_a_cookies_file_that_is_not_netscape_format_is_refused_without_its_content(tmp_path):
    path = tmp_path / "cookies.json"
    path.write_text('[{"name": "sid", "value": "secret-value"}]\n')
    problems = lever_problems(load_settings({"GGT_COOKIES_FILE": str(path)}))
    assert problems and "Netscape" in problems[0][1] and "secret" not in problems[0][1]
    broken = tmp_path / "broken.txt"
    broken.write_text("# Netscape HTTP Cookie File\nexample.com\tTRUE\t/\tsecret-value\n")
    problems = lever_problems(load_settings({"GGT_COOKIES_FILE": str(broken)}))
    assert problems and "no cookies" in problems[0][1] and "secret" not in problems[0][1]


async def test_check_shows_the_levers_without_their_secrets(tmp_path, egress_proxy):
    from actors.cli.check import Status, check_levers

    path = cookies_file(tmp_path)
    proxy = egress_proxy.url.replace("http://", "http://ggt:pa55word-secret@")
    shown = await check_levers(load_settings({
        "GGT_EGRESS_PROXY": proxy, "GGT_COOKIES_FILE": str(path),
        "GGT_YTDLP_EXTRACTOR_ARGS": "youtube:player_client=web;po_token=web.gvs+secret-token",
    }))
    text = msgspec.json.encode(shown).decode()
    assert [check.status for check in shown] == [Status.OK] * 4, shown
    assert f"127.0.0.1:{egress_proxy.port}" in text and "player_client, po_token" in text
    assert "secret" not in text and COOKIE_VALUE not in text
    refused = await check_levers(load_settings({"GGT_EGRESS_PROXY": "http://ggt:secret@127.0.0.1:1"}))
    assert [check.status for check in refused] == [Status.FAIL, Status.OK] and "secret" not in refused[0].detail


@pytest.fixture
def named_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate (and key) for the name ``media.test`` only."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=media.test", "-addext", "subjectAltName=DNS:media.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_https_through_the_egress_proxy_tunnels_to_the_vetted_ip_with_the_name_in_tls(named_certificate,
                                                                                          egress_proxy):
    import aiohttp

    from actors.guard.egress import Egress
    from actors.guard.proxy import FetchGuard

    cert, key = named_certificate
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.host}")

    served = web.Application()
    served.router.add_get("/hello", hello)
    runner = web.AppRunner(served)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def resolve(host: str, port: int):
        return [ipaddress.ip_address("127.0.0.1")] if host == "media.test" else []

    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        port = runner.addresses[0][1]
        trusting = ssl.create_default_context(cafile=str(cert))
        async with FetchGuard(allow=["127.0.0.1/32"], resolve=resolve, tls=trusting,
                              egress=Egress(egress_proxy.url)) as guard, aiohttp.ClientSession() as http:
            async with http.get(guard.gateway_url(f"https://media.test:{port}/hello")) as answer:
                text = await answer.text()
    finally:
        await runner.cleanup()
    # the certificate of the name was verified over the tunnel, which went to the vetted address
    assert text == f"hello media.test:{port}"
    assert [tunnel.target for tunnel in egress_proxy.tunnels] == [f"127.0.0.1:{port}"]


async def test_a_socks5_egress_proxy_carries_the_guards_fetches_to_the_vetted_ip(site):
    import aiohttp

    from actors.guard.egress import Egress
    from actors.guard.proxy import FetchGuard

    async def resolve(host: str, port: int):
        return [ipaddress.ip_address("127.0.0.1")] if host == "media.test" else []

    async with RecordingSocks5Proxy() as proxy:
        async with FetchGuard(allow=["127.0.0.1/32"], resolve=resolve, egress=Egress(proxy.url)) as guard, \
                aiohttp.ClientSession() as http:
            async with http.get(guard.gateway_url(f"http://media.test:{site.port}/audio.mp3")) as answer:
                body = await answer.read()
    assert answer.status == 200 and body == (site.root / "audio.mp3").read_bytes()
    assert [tunnel.target for tunnel in proxy.tunnels] == [f"127.0.0.1:{site.port}"]
    assert [port for path, port, _, _ in site.seen if path == "/audio.mp3"] == [proxy.tunnels[0].upstream_port]


async def test_an_uploader_with_a_bad_egress_proxy_refuses_to_start_saying_which_setting(amqp_url):
    from tests.edges.test_cli import getgoodtape
    from tests.fixtures.broker import TEST_BUS_KEY

    code, _, err = await getgoodtape("run", "uploader", env={
        "GGT_AMQP_URL": amqp_url, "GGT_BUS_KEY": TEST_BUS_KEY, "GGT_EGRESS_PROXY": "https://ggt:secret-pw@proxy"})
    assert code != 0 and "setting GGT_EGRESS_PROXY" in err and "http, socks5" in err, err
    assert "secret-pw" not in err and "Traceback" not in err


def test_the_operators_cookies_are_stripped_from_the_info_by_name_and_the_sites_own_stay():
    from actors.guard.cookies import strip_from_info

    info = {"formats": [{"url": "https://media.test/a", "http_headers": {"Cookie": "sid=refreshed; lang=en"},
                         "cookies": "sid=refreshed; Domain=.media.test; Path=/; Secure; lang=en; Domain=.media.test"}],
            "cookies": "sid=old; Domain=.media.test"}
    stripped = strip_from_info(info, frozenset({"sid"}))
    assert stripped["formats"][0]["cookies"] == "lang=en; Domain=.media.test"
    assert stripped["formats"][0]["http_headers"] == {"Cookie": "lang=en"}
    assert "cookies" not in stripped


def test_the_operators_cookies_are_stripped_from_every_playlist_entry_too():
    """yt-dlp fills the operator's cookies into each entry's formats; a request with allow_playlist
    plans from the first entry, so a cookie left there would travel in MediaResolved."""
    import http.cookiejar

    from actors.core.ytdlp_info import request_headers, single_entry
    from actors.guard.cookies import cookie_names, strip_from_info

    secret = "OPERATOR-SESSION-SECRET"
    cookie = http.cookiejar.Cookie(
        version=0, name="SID", value=secret, port=None, port_specified=False, domain=".media.test",
        domain_specified=True, domain_initial_dot=True, path="/", path_specified=True, secure=True,
        expires=4102444800, discard=False, comment=None, comment_url=None, rest={})
    video = {"id": "v1", "title": "v1", "extractor": "generic", "extractor_key": "Generic",
             "webpage_url": "https://media.test/v1",
             "formats": [{"format_id": "f", "url": "https://media.test/v1.mp4", "ext": "mp4"}]}
    nested = {"_type": "playlist", "id": "inner", "title": "inner", "extractor": "generic",
              "extractor_key": "Generic", "webpage_url": "https://media.test/inner", "entries": [video]}
    playlist = {**nested, "id": "outer", "entries": [dict(video), nested]}
    with yt_dlp.YoutubeDL({"quiet": True, "no_warnings": True, "simulate": True}) as ydl:
        ydl.cookiejar.set_cookie(cookie)
        info = ydl.sanitize_info(ydl.process_ie_result(playlist, download=False))
        names = cookie_names(ydl.cookiejar)
    assert secret in str(info), "yt-dlp put the cookie into the entries (else this test proves nothing)"
    cleaned = strip_from_info(info, names)
    assert secret not in str(cleaned)
    entry = single_entry(cleaned, allow_playlist=True)
    assert "Cookie" not in request_headers(entry["formats"][0])
