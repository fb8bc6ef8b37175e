"""The filtering HTTP proxy that every fetch for a user's URL goes through (yt-dlp and ffmpeg).

Two doors, one vetting:

- the proxy door, for yt-dlp: absolute-URI requests (``GET http://host/path``) and ``CONNECT
  host:port`` tunnels (https). yt-dlp parses what it fetches in Python and opens http(s) only;
- the gateway door, for ffmpeg and ffprobe: ``GET http://127.0.0.1:PORT/via/<url>`` where
  ``<url>`` is the upstream http(s) URL, base64url-encoded. The guard fetches it itself (TLS
  included, redirects followed hop by hop, http(s) targets only), so it sees every byte: a playlist
  is rewritten so each URL in it is a gateway URL again (``actors.guard.manifests``), a DASH
  manifest is refused, media is relayed within the job's budget and deadline. ffmpeg gets no proxy
  and a whitelist of ``http,tcp,crypto``: the only host it ever learns is the guard.

Either door resolves the host itself, refuses with 403 + ``X-GGT-Blocked: url_not_allowed`` when
any resolved address is not allowed, and otherwise connects to the vetted address — never to the
name again, so a DNS answer cannot change between the check and the connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import socket
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import NamedTuple, Self

import aiohttp
import yarl
from aiohttp.abc import AbstractCookieJar, AbstractResolver, ResolveResult

from actors.guard.addresses import IPAddress, denial_reason, parse_networks
from actors.guard.children import child_env
from actors.guard.egress import Egress
from actors.guard.manifests import BodyKind, ManifestRefused, rewrite_hls, sniff_body
from actors.guard.ranges import RangedRelay, Span, chunk_range, parse_range, range_chunk_in
from actors.guard.urls import SAFE_REFUSAL, connect_host
from messages.errors import ErrorCode, JobError
from messages.types import HTTP_SCHEMES

log = logging.getLogger(__name__)

#: where the proxy listens: loopback only, a random free port
LISTEN_HOST = "127.0.0.1"
#: header (and value) on every refusal, so a caller can tell "blocked" from "the site said 403"
BLOCKED_HEADER = "X-GGT-Blocked"
BLOCKED_VALUE = "url_not_allowed"
#: largest request head accepted (request line + headers); real clients send a few hundred bytes
MAX_HEAD_BYTES = 64 * 1024
#: seconds a client has to send its request head
HEAD_TIMEOUT = 10.0
#: seconds to resolve a host and to connect to one of its addresses
CONNECT_TIMEOUT = 10.0
#: seconds a relayed connection may carry no bytes in either direction before it is closed
IDLE_TIMEOUT = 30.0
#: connections relayed at once; more are answered 503 instead of piling up
MAX_TUNNELS = 64
#: addresses of one host tried before giving up (each bounded by CONNECT_TIMEOUT)
MAX_CONNECT_ATTEMPTS = 3
#: bytes read per relay step
RELAY_CHUNK = 1024 * 1024
#: read buffer of an upstream connection: media flows this way, so big reads mean few loop turns per MiB
UPSTREAM_BUFFER = 1024 * 1024
#: protocols ffmpeg may use for a user's input: plain http to the guard's gateway (and tcp under it),
#: crypto for AES-128 HLS segments. No https, tls or httpproxy: the guard does TLS upstream
FFMPEG_PROTOCOL_WHITELIST = "http,tcp,crypto"
#: path of the gateway door: ``/via/<base64url of the upstream URL>``
GATEWAY_PATH = "/via/"
#: redirects the gateway follows for one request, each hop vetted
MAX_REDIRECTS = 10
#: largest playlist or manifest the gateway reads (and bytes it scans to tell one from media:
#: above ffmpeg's default 5 MB probe size, so no playlist hides behind a longer text)
MANIFEST_BUDGET = 8 * 1024 * 1024
#: memory for short bodies a continuation may extend (``FetchGuard._judged_with_head``), per guard
SHORT_HEADS_BUDGET = 2 * MANIFEST_BUDGET
#: largest response relayed to yt-dlp through the proxy door in the converter (pages, manifests, API
#: answers); a page of hundreds of MB fails instead of being parsed whole
PAGE_BUDGET = 16 * 1024 * 1024
#: response headers the gateway hands ffmpeg (the rest describe the upstream connection, not the body)
RELAYED_HEADERS = ("content-type", "content-length", "content-range", "accept-ranges", "last-modified",
                   "etag", "set-cookie", "content-disposition", "icy-metaint", "icy-name")
#: redirect statuses the gateway follows itself (ffmpeg never sees a Location)
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: statuses of a media fetch meaning "this URL is no longer yours" (expired, bound to another address)
REFUSED_STATUSES = frozenset({403, 410})
#: request headers that hold credentials for one origin: dropped when a redirect leaves it (as browsers
#: drop Authorization; a plan's Cookie header was computed for the input's site)
ORIGIN_BOUND_HEADERS = frozenset({"cookie", "authorization"})
#: request headers meant for the proxy or for one connection, never forwarded upstream
HOP_BY_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te"})

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


class BlockedFetch(NamedTuple):
    """One refused connection: the host asked for, the address it resolved to, and why."""

    host: str
    ip: str
    reason: str


class ProxyRequest(NamedTuple):
    """A parsed request head: where to connect, and (for plain http) the head to send there."""

    host: str
    port: int
    tunnel: bool
    upstream_head: bytes
    method: str = "GET"
    #: path and query of the target (``/via/…`` for the gateway door)
    path: str = ""
    #: end-to-end header lines as sent (hop-by-hop ones dropped)
    headers: tuple[str, ...] = ()


class BadProxyRequest(ValueError):
    """The request head is not something this proxy serves."""


def parse_proxy_request(head: bytes) -> ProxyRequest:
    """Parse a request head sent to the proxy; raise BadProxyRequest for anything else."""
    lines = head.decode("latin-1").split("\r\n")
    request_line, header_lines = lines[0], [line for line in lines[1:] if line]
    try:
        method, target, version = request_line.split(" ")
    except ValueError:
        raise BadProxyRequest(f"malformed request line {request_line[:200]!r}") from None
    if not version.startswith("HTTP/1."):
        raise BadProxyRequest(f"unsupported version {version[:20]!r}")
    if method.upper() == "CONNECT":
        host, port = _split_authority(target, default_port=None)
        return ProxyRequest(host, port, True, b"", method="CONNECT")
    origin_form = target.startswith(GATEWAY_PATH)
    if origin_form:
        # origin-form: a request to the guard itself (the gateway door); port 0 marks it
        target = f"http://{LISTEN_HOST}:1{target}"
    if not target.lower().startswith("http://"):
        raise BadProxyRequest("only absolute http:// targets, gateway paths and CONNECT are served")
    parts = urllib.parse.urlsplit(target)
    host, port = _split_authority(parts.netloc.rpartition("@")[2], default_port=80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = []
    for line in header_lines:
        name, colon, _ = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadProxyRequest(f"malformed header line {line[:200]!r}")
        if name.lower() not in HOP_BY_HOP_HEADERS:
            headers.append(line)
    end_to_end = tuple(headers)
    if not any(line.partition(":")[0].lower() == "host" for line in headers):
        headers.append(f"Host: {parts.netloc.rpartition('@')[2]}")
    # one request per upstream connection: a later request on it could name another host
    headers.append("Connection: close")
    upstream = "\r\n".join([f"{method} {path} {version}", *headers, "", ""])
    return ProxyRequest(host, 0 if origin_form else port, False, upstream.encode("latin-1"),
                        method=method.upper(), path=path, headers=end_to_end)


def gateway_path(url: str, *, bare: bool = False) -> str:
    """The gateway path that stands for upstream ``url``: ``/via/<base64url>/<its file name>``.

    The name is only for ffmpeg, whose HLS demuxer judges a segment by its URL's extension.
    ``bare`` (``/via/<base64url>.bare/…``, a mark outside base64url's alphabet): fetch it without the
    client's Cookie and Authorization — a playlist entry on another origin than the playlist's, which
    ffmpeg would otherwise send the input's credentials to.
    """
    name = _UNSAFE_NAME.sub("", urllib.parse.urlsplit(url).path.rpartition("/")[2])[-MAX_NAME:] or "_"
    token = base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")
    return f"{GATEWAY_PATH}{token}{BARE_MARK if bare else ''}/{name}"


#: the mark of a gateway path fetched without credentials (see gateway_path)
BARE_MARK = ".bare"


def gateway_bare(path: str) -> bool:
    """Whether a gateway path asks for a fetch without the client's credentials."""
    return _gateway_token(path).endswith(BARE_MARK)


def _gateway_token(path: str) -> str:
    """The ``<base64url>[.bare]`` part of a gateway path."""
    return path[len(GATEWAY_PATH):].partition("?")[0].partition("/")[0]


#: characters kept of an upstream file name in a gateway path
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
#: characters kept of an upstream file name in a gateway path
MAX_NAME = 64


def gateway_target(path: str) -> str | None:
    """The upstream URL a gateway path stands for, or None when ``path`` is not one."""
    if not path.startswith(GATEWAY_PATH):
        return None
    token = _gateway_token(path).removesuffix(BARE_MARK)
    try:
        url = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError):
        return None
    return url or None


def _split_authority(authority: str, *, default_port: int | None) -> tuple[str, int]:
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else rest
    elif authority.count(":") == 1:
        host, _, port_text = authority.partition(":")
    else:
        host, port_text = authority, ""
    if not port_text and default_port is not None:
        port_text = str(default_port)
    if not host or not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadProxyRequest(f"bad host or port in {authority[:200]!r}")
    return host, int(port_text)


async def system_resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for ``host``, in its order, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip not in addresses:
            addresses.append(ip)
    return addresses


class _Refusal(Exception):
    def __init__(self, status: int, reason: str, *, blocked: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.blocked = blocked


class FetchGuard:
    """The SSRF guard of one job: a filtering proxy and gateway on loopback for yt-dlp and ffmpeg.

    ``async with FetchGuard(allow=settings.allow_networks, deny=settings.deny_networks) as guard:``
    then pass ``guard.ytdlp_options()`` to yt-dlp; give ffmpeg ``guard.gateway_url(url)`` as each
    input, ``guard.input_args(args)`` as its options and ``env=guard.subprocess_env(os.environ)``.
    After each yt-dlp or ffmpeg run — successful ones too, since ffmpeg skips HLS segments it cannot
    open — call ``guard.raise_if_blocked()``. Use one guard per job so its record is that job's.
    """

    def __init__(
        self,
        *,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        resolve: Resolver = system_resolve,
        connect_timeout: float = CONNECT_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_tunnels: int = MAX_TUNNELS,
        page_budget: int | None = None,
        media_budget: int | None = None,
        tls: ssl.SSLContext | bool = True,
        egress: Egress | None = None,
        cookies: AbstractCookieJar | None = None,
    ) -> None:
        self._allow = parse_networks(allow)
        self._deny = parse_networks(deny)
        self._resolve = resolve
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._max_tunnels = max_tunnels
        self._page_budget = page_budget
        #: media bytes of the whole job: every gateway input and segment, and (in a guard without a
        #: page budget: the uploader's, whose proxy door carries the feeder's downloads) every proxied byte
        self._media = ByteBudget(media_budget)
        self._tls = tls
        #: how upstream connections are opened (directly, or through the operator's egress proxy)
        self._egress = egress or Egress()
        #: the operator's cookies (read-only), added to the gateway's fetches they match
        self._cookies = cookies
        self._deadline: float | None = None
        #: refused connections, oldest first
        self.blocked: list[BlockedFetch] = []
        #: budgets and deadlines that ended a connection, oldest first
        self.failures: list[JobError] = []
        #: statuses of gateway fetches the origin refused (403/410: an expired or address-bound URL), oldest first
        self.refused: list[int] = []
        self._server: asyncio.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port = 0
        self._active = 0
        self._closing = False
        self._handlers: set[asyncio.Task[None]] = set()
        #: bodies the gateway judged media only because they ended inside the sniff window, by URL: a
        #: continuation (a Range from where one ended, as ffmpeg's reconnect asks) is judged with them
        self._short_heads: dict[str, bytes] = {}
        self._short_head_bytes = 0
        self._unjudged: set[str] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, LISTEN_HOST, 0, limit=MAX_HEAD_BYTES)
        self._port = self._server.sockets[0].getsockname()[1]
        self._session = aiohttp.ClientSession(
            connector=self._egress.connector(resolver=_VettingResolver(self), use_dns_cache=False,
                                             force_close=True, limit=0, ssl=self._tls),
            auto_decompress=False,
            trust_env=False,  # no proxy or netrc from the environment: the guard is the last hop
            # ffmpeg's Cookie header (the site's cookies) is sent as is; the operator's cookies join it
            cookie_jar=self._cookies if self._cookies is not None else aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout,
                                          sock_read=self._idle_timeout),
            skip_auto_headers=("User-Agent",),
            read_bufsize=UPSTREAM_BUFFER,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True
        assert self._server is not None
        self._server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._server.wait_closed()
        if self._session is not None:
            await self._session.close()

    def set_deadline(self, deadline: float | None) -> None:
        """The event-loop time (``loop.time()``) at which every connection of this job is closed."""
        self._deadline = deadline

    @property
    def proxy_url(self) -> str:
        """``http://127.0.0.1:PORT``: the proxy every fetch for the user's URL must use."""
        return f"http://{LISTEN_HOST}:{self._port}"

    def gateway_url(self, url: str) -> str:
        """The guard's own URL that fetches ``url`` for ffmpeg; raises ``JobError(URL_NOT_ALLOWED)`` unless http(s)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in HTTP_SCHEMES or not parts.hostname:
            self.blocked.append(BlockedFetch(parts.hostname or "", "", f"scheme {parts.scheme!r}"))
            log.warning("guard refused an input of scheme %r", parts.scheme)
            raise JobError(ErrorCode.URL_NOT_ALLOWED, "only http(s) inputs are fetched")
        return self.proxy_url + gateway_path(url)

    def ytdlp_options(self) -> dict[str, object]:
        """YoutubeDL params that route all of yt-dlp's HTTP (geo-bypass requests included) through the guard."""
        return {"proxy": self.proxy_url, "geo_verification_proxy": self.proxy_url}

    def ffmpeg_input_args(self) -> list[str]:
        """ffmpeg input options (place them before ``-i`` of a gateway URL): the protocol whitelist."""
        return ["-protocol_whitelist", FFMPEG_PROTOCOL_WHITELIST]

    def input_args(self, args: Sequence[str]) -> list[str]:
        """One ffmpeg/ffprobe input's own options for a gateway URL: its ``-protocol_whitelist``
        replaced by the guard's (plain http to the guard only), a proxy option removed."""
        out = list(args)
        if "-http_proxy" in out:
            at = out.index("-http_proxy")
            del out[at:at + 2]
        if "-protocol_whitelist" in out:
            out[out.index("-protocol_whitelist") + 1] = FFMPEG_PROTOCOL_WHITELIST
            return out
        return [*out, "-protocol_whitelist", FFMPEG_PROTOCOL_WHITELIST]

    def subprocess_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The allow-listed environment for a child that fetches through this guard (``children.child_env``)."""
        return child_env(environ, proxy_url=self.proxy_url)

    def blocked_error(self) -> JobError | None:
        """The job's error: ``url_not_allowed`` if the guard refused a fetch, else the first budget or
        deadline it enforced, else None. The message names no host or address (the log does)."""
        if self.blocked:
            return JobError(ErrorCode.URL_NOT_ALLOWED, SAFE_REFUSAL)
        return self.failures[0] if self.failures else None

    def raise_if_blocked(self) -> None:
        """Raise the job's error (``blocked_error``) if there is one; call it after every tool run."""
        error = self.blocked_error()
        if error is not None:
            raise error

    # --- the imperative shell: one task per client connection

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closing or task is None:
            writer.close()
            return
        self._handlers.add(task)
        try:
            if self._active >= self._max_tunnels:
                await _answer(writer, 503, "too many connections through the guard")
                return
            self._active += 1
            try:
                async with asyncio.timeout_at(self._deadline):
                    await self._serve(reader, writer)
            finally:
                self._active -= 1
        except TimeoutError:
            self.failures.append(JobError(ErrorCode.TIMEOUT, "the job's deadline passed while fetching"))
            log.warning("guard closed a connection at the job's deadline")
        except asyncio.CancelledError:
            # the guard's own exit cancels what is still relaying (a gateway fetch whose reader has
            # gone is only noticed at its next write); any other cancellation goes on up
            if not self._closing:
                raise
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to tell anyone
        except Exception:
            log.exception("guard failed serving a connection")
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            request = parse_proxy_request(head)
        except asyncio.LimitOverrunError:
            await _answer(writer, 431, "request head too large")
            return
        except TimeoutError:
            await _answer(writer, 408, "request head not received in time")
            return
        except BadProxyRequest as exc:
            await _answer(writer, 400, str(exc))
            return
        if not request.tunnel and (request.port == 0 or self._is_self_name(request.host, request.port)):
            target = gateway_target(request.path)
            if target is None:
                await _answer(writer, 404, "not a gateway path")
            else:
                await self._gateway(request, target, writer)
            return
        try:
            addresses = await self._vet(request.host, request.port)
            upstream_reader, upstream_writer = await self._connect(addresses, request.port)
        except _Refusal as refusal:
            await _answer(writer, refusal.status, refusal.reason, blocked=refusal.blocked)
            return
        try:
            if request.tunnel:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream_writer.write(request.upstream_head)
            page = self._page_budget is not None
            ended = await _relay(reader, writer, upstream_reader, upstream_writer, idle=self._idle_timeout,
                                 budget=ByteBudget(self._page_budget) if page else self._media)
            if ended == "budget":
                if page:
                    self._over_budget(f"a response passed the {self._page_budget}-byte budget for pages")
                else:
                    self._over_media_budget()
        finally:
            upstream_writer.close()

    def _over_budget(self, detail: str, code: ErrorCode = ErrorCode.TOO_LARGE) -> None:
        self.failures.append(JobError(code, detail))
        log.warning("guard closed a connection: %s", detail)

    def _over_media_budget(self) -> None:
        self._over_budget(f"the job's inputs passed its {self._media.limit}-byte budget for media",
                          ErrorCode.SOURCE_TOO_LARGE)

    async def _vet(self, host: str, port: int) -> list[IPAddress]:
        try:
            async with asyncio.timeout(self._connect_timeout):
                addresses = await self._resolve(host, port)
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: names IDNA cannot encode, NULs
            log.info("guard could not resolve %s: %r", host, exc)
            raise _Refusal(502, "cannot resolve the host") from None
        if not addresses:
            raise _Refusal(502, "the host has no addresses")
        # one forbidden answer taints the name: a host mixing public and private answers is hostile
        for ip in addresses:
            if self._is_self(ip, port):
                reason: str | None = "the guard itself"
            else:
                reason = denial_reason(ip, allow=self._allow, deny=self._deny)
            if reason is None:
                continue
            self._refuse(host, str(ip), reason)
            raise _Refusal(403, SAFE_REFUSAL, blocked=True)
        return addresses

    def _refuse(self, host: str, ip: str, reason: str) -> None:
        self.blocked.append(BlockedFetch(host, ip, reason))
        log.warning("guard refused %s -> %s (%s)", host, ip or "-", reason)

    def _is_self(self, ip: IPAddress, port: int) -> bool:
        return port == self._port and (ip.is_loopback or ip.is_unspecified)

    def _is_self_name(self, host: str, port: int) -> bool:
        return port == self._port and host in (LISTEN_HOST, "localhost")

    async def _connect(
        self, addresses: list[IPAddress], port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        failure: BaseException | None = None
        for ip in addresses[:MAX_CONNECT_ATTEMPTS]:
            try:
                # the vetted address itself, no second lookup of the name (through the egress proxy if set)
                return await self._egress.open_connection(str(ip), port, timeout=self._connect_timeout,
                                                          limit=UPSTREAM_BUFFER)
            except (OSError, TimeoutError) as exc:
                failure = exc
        log.info("guard could not connect to port %s: %r", port, failure)
        raise _Refusal(502, f"cannot connect to port {port}")

    # --- the gateway door: the guard fetches for ffmpeg and sees every byte

    async def _gateway(self, request: ProxyRequest, url: str, writer: asyncio.StreamWriter) -> None:
        if request.method not in ("GET", "HEAD"):
            await _answer(writer, 405, "only GET and HEAD are served")
            return
        headers = _forwarded_headers(request.headers)
        bare = gateway_bare(request.path)
        if bare:
            headers = _without_credentials(headers)
        chunk = range_chunk_in(request.path) if request.method == "GET" else 0
        asked = next((v for k, v in headers.items() if k.lower() == "range"), None)
        span = parse_range(asked) if chunk else None
        if span is not None:  # a throttled origin: the first of successive Range requests (actors.guard.ranges)
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
            headers["Range"] = chunk_range(span.first, chunk=chunk, span=span, total=None)
        asked_origin = _origin_of(url)
        try:
            response, url = await self._fetch(request.method, url, headers)
        except _Refusal as refusal:
            await _answer(writer, refusal.status, refusal.reason, blocked=refusal.blocked)
            return
        if _origin_of(url) != asked_origin:  # the next Range requests go to the redirect's target
            headers = _without_credentials(headers)
        async with response:
            if request.method == "HEAD":
                await _write_head(writer, response, length=None)
                return
            prefix, kind = await self._sniff(response)
            judged = self._judged_with_head(url, parse_range(asked) if asked else None, prefix, kind)
            if judged is None:
                self._refuse(response.url.host or "", "", "a manifest split across responses")
                await _answer(writer, 403, SAFE_REFUSAL, blocked=True)
            elif kind is BodyKind.DASH or (kind is BodyKind.HLS and span is not None):
                self._refuse(response.url.host or "", "", f"a {kind.name} manifest handed to ffmpeg")
                await _answer(writer, 403, SAFE_REFUSAL, blocked=True)
            elif kind is BodyKind.HLS:
                await self._serve_playlist(response, url, prefix, writer, bare=bare)
            elif span is not None:
                fetched_url = url

                async def open_range(value: str) -> aiohttp.ClientResponse:
                    answer, _ = await self._fetch("GET", fetched_url, {**headers, "Range": value})
                    return answer

                relay = RangedRelay(open_range=open_range, chunk=chunk, writer=writer, idle=self._idle_timeout,
                                    spend=self._media.spend, over_budget=self._over_media_budget,
                                    passthrough=lambda answer, data: self._relay_media(answer, data, writer))
                await relay.serve(response, prefix, span=span, asked=asked is not None)
            else:
                await self._relay_media(response, prefix, writer)

    async def _fetch(self, method: str, url: str,
                     headers: dict[str, str]) -> tuple[aiohttp.ClientResponse, str]:
        """The upstream response for ``url`` after redirects (each hop vetted, http(s) only)."""
        assert self._session is not None
        for _hop in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            host = connect_host(url)
            if parts.scheme.lower() not in HTTP_SCHEMES or not host:
                self._refuse(parts.hostname or "", "", f"scheme {parts.scheme!r} or host in a redirect or input")
                raise _Refusal(403, SAFE_REFUSAL, blocked=True)
            if _is_ip_literal(host):  # aiohttp connects to literals without asking the resolver
                await self._vet(host, parts.port or (443 if parts.scheme.lower() == "https" else 80))
            refused_before = len(self.blocked)
            try:
                response = await self._session.request(method, url, headers=headers, allow_redirects=False)
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                if len(self.blocked) > refused_before:
                    raise _Refusal(403, SAFE_REFUSAL, blocked=True) from None
                log.info("gateway fetch failed: %r", exc)
                raise _Refusal(502, "the upstream fetch failed") from None
            location = response.headers.get("Location")
            if response.status not in REDIRECT_STATUSES or location is None:
                if response.status in REFUSED_STATUSES:  # the URL is no longer ours: the caller may re-resolve
                    self.refused.append(response.status)
                return response, url
            response.release()
            origin = _origin_of(url)
            url = urllib.parse.urljoin(url, location)
            if _origin_of(url) != origin:  # credentials are for the origin they were given for
                headers = _without_credentials(headers)
            if response.status == 303:
                method = "GET"
        raise _Refusal(502, "too many redirects")

    def _judged_with_head(self, url: str, span: Span | None, prefix: bytes, kind: BodyKind) -> BodyKind | None:
        """``kind`` of a response, judged together with the earlier short body it continues.

        A body that ends inside the sniff window (``#EX``) is media on its own; ffmpeg's reconnect then
        asks for the rest from where it ended (``TM3U…``) and probes the two as one stream. So a short
        body is remembered, and a response from exactly its end is sniffed after it: None when the
        two make a manifest, or cannot be judged (the memory for short bodies spent): refused.
        """
        start = span.first if span is not None else 0
        if start and url in self._unjudged:
            return None
        head = self._short_heads.get(url) if start else None
        body = prefix
        if head is not None and len(head) == start:
            body = head + prefix
            if sniff_body(body, complete=True) is not BodyKind.MEDIA:
                self._unjudged.add(url)  # and every later continuation of it, ffmpeg's retries included
                return None
        ended = (kind is BodyKind.MEDIA and len(body) < MANIFEST_BUDGET
                 and sniff_body(body, complete=False) is BodyKind.NEED_MORE)
        if ended and body is not head:
            previous = self._short_heads.pop(url, b"")
            self._short_head_bytes -= len(previous)
            if self._short_head_bytes + len(body) > SHORT_HEADS_BUDGET:
                self._unjudged.add(url)
            else:
                self._short_heads[url] = body
                self._short_head_bytes += len(body)
        return kind

    async def _sniff(self, response: aiohttp.ClientResponse) -> tuple[bytes, BodyKind]:
        """The body's first bytes, read until they tell a playlist from media (bounded)."""
        prefix = b""
        while True:
            chunk = await response.content.read(RELAY_CHUNK)
            complete = not chunk or len(prefix) + len(chunk) >= MANIFEST_BUDGET
            prefix += chunk
            kind = sniff_body(prefix, complete=complete)
            if kind is not BodyKind.NEED_MORE:
                return prefix, kind

    async def _serve_playlist(self, response: aiohttp.ClientResponse, url: str, prefix: bytes,
                              writer: asyncio.StreamWriter, *, bare: bool) -> None:
        body = prefix
        while len(body) <= MANIFEST_BUDGET:
            chunk = await response.content.read(RELAY_CHUNK)
            if not chunk:
                break
            body += chunk
        if len(body) > MANIFEST_BUDGET:
            self._over_budget(f"a playlist passed the {MANIFEST_BUDGET}-byte budget")
            await _answer(writer, 502, "playlist too large")
            return
        try:
            # latin-1 keeps every byte as it was; the URLs the guard writes are ASCII
            # an entry on another origin (or listed by a playlist fetched bare) is fetched bare:
            # ffmpeg sends the input's Cookie with every request, the gateway only to its origin
            origin = _origin_of(url)
            text = rewrite_hls(body.decode("latin-1"), base_url=url, to_guard=lambda target: self.proxy_url
                               + gateway_path(target, bare=bare or _origin_of(target) != origin))
        except ManifestRefused as exc:
            self._refuse(response.url.host or "", "", str(exc))
            await _answer(writer, 403, SAFE_REFUSAL, blocked=True)
            return
        data = text.encode("latin-1")
        writer.write(
            (f"HTTP/1.1 {response.status} OK\r\nContent-Type: application/vnd.apple.mpegurl\r\n"
             f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
        )
        await writer.drain()

    async def _relay_media(self, response: aiohttp.ClientResponse, prefix: bytes,
                           writer: asyncio.StreamWriter) -> None:
        await _write_head(writer, response, length=response.headers.get("Content-Length"))
        chunk = prefix
        while chunk:
            if not self._media.spend(len(chunk)):
                self._over_media_budget()
                return
            writer.write(chunk)
            async with asyncio.timeout(self._idle_timeout):
                await writer.drain()
            chunk = await response.content.read(RELAY_CHUNK)


class ByteBudget:
    """Bytes one kind of response may carry; shared by every connection it covers (None: unbounded)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def spend(self, count: int) -> bool:
        """Count ``count`` more bytes; False once the total passes the limit."""
        self.used += count
        return self.limit is None or self.used <= self.limit


class _VettingResolver(AbstractResolver):
    """aiohttp's resolver for the gateway: the guard's vetting, so aiohttp connects only to vetted addresses."""

    def __init__(self, guard: FetchGuard) -> None:
        self._guard = guard

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        try:
            addresses = await self._guard._vet(host, port)
        except _Refusal as refusal:
            raise OSError(refusal.reason) from None
        return [
            ResolveResult(hostname=host, host=str(ip), port=port,
                          family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                          proto=0, flags=socket.AI_NUMERICHOST)
            for ip in addresses[:MAX_CONNECT_ATTEMPTS]
        ]

    async def close(self) -> None:
        """Nothing to release."""


def _without_credentials(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in ORIGIN_BOUND_HEADERS}


def _origin_of(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) as the connection will use them, for comparing two hops."""
    try:
        parsed = yarl.URL(url)
        return parsed.scheme, parsed.raw_host or "", parsed.port
    except (ValueError, UnicodeError):
        return "", "", None


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _forwarded_headers(lines: Sequence[str]) -> dict[str, str]:
    """ffmpeg's request headers to send upstream: not Host (aiohttp writes the upstream's) and no
    content coding, so the guard reads playlists as they are."""
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name.lower() in ("host", "accept-encoding", "content-length", "transfer-encoding"):
            continue
        headers[name.strip()] = value.strip()
    headers["Accept-Encoding"] = "identity"
    return headers


async def _write_head(writer: asyncio.StreamWriter, response: aiohttp.ClientResponse, *,
                      length: str | None) -> None:
    lines = [f"HTTP/1.1 {response.status} {response.reason or 'OK'}"]
    for name in RELAYED_HEADERS:
        if name == "content-length":
            if length is not None:
                lines.append(f"Content-Length: {length}")
            continue
        lines.extend(f"{name}: {value}" for value in response.headers.getall(name, ()))
    if response.headers.get("Content-Encoding") and response.headers["Content-Encoding"] != "identity":
        lines.append(f"Content-Encoding: {response.headers['Content-Encoding']}")
    lines += ["Connection: close", "", ""]
    writer.write("\r\n".join(lines).encode("latin-1", "replace"))
    await writer.drain()


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str, *, blocked: bool = False) -> None:
    body = (f"{BLOCKED_VALUE}: {reason}\n" if blocked else f"{reason}\n").encode()
    extra = f"{BLOCKED_HEADER}: {BLOCKED_VALUE}\r\n" if blocked else ""
    title = {
        400: "Bad Request",
        403: "Forbidden",
        404: "Not Found",
        405: "Method Not Allowed",
        408: "Request Timeout",
        431: "Request Header Fields Too Large",
        502: "Bad Gateway",
        503: "Service Unavailable",
    }.get(status, "Error")
    writer.write(
        (
            f"HTTP/1.1 {status} {title}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + body
    )
    await writer.drain()


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
    *,
    idle: float,
    budget: ByteBudget | None = None,
) -> str:
    """Copy bytes both ways until upstream is done, either side fails, nothing moves for ``idle`` s,
    or more than ``budget`` bytes came down; how the downstream ended ("eof", "budget" …)."""
    activity = _Activity()
    async with asyncio.TaskGroup() as group:
        down = group.create_task(_pipe(upstream_reader, client_writer, activity, idle=idle, half_close=False,
                                       budget=budget))
        up = group.create_task(_pipe(client_reader, upstream_writer, activity, idle=idle, half_close=True))
        # the response ending ends the exchange; the request ending (EOF) only half-closes upstream
        down.add_done_callback(lambda _: up.cancel())
        up.add_done_callback(lambda task: None if _ended_cleanly(task) else down.cancel())
    return "cancelled" if down.cancelled() else down.result()


def _ended_cleanly(task: asyncio.Task[str]) -> bool:
    return not task.cancelled() and task.exception() is None and task.result() == "eof"


class _Activity:
    def __init__(self) -> None:
        self.last = asyncio.get_running_loop().time()


async def _pipe(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    activity: _Activity,
    *,
    idle: float,
    half_close: bool,
    budget: ByteBudget | None = None,
) -> str:
    loop = asyncio.get_running_loop()
    while True:
        remaining = activity.last + idle - loop.time()
        if remaining <= 0:
            return "idle"
        try:
            async with asyncio.timeout(remaining):
                data = await source.read(RELAY_CHUNK)
        except TimeoutError:
            continue  # the other direction may have moved meanwhile; re-check the shared clock
        except OSError:
            return "error"
        if not data:
            if half_close and sink.can_write_eof():
                try:
                    sink.write_eof()
                except OSError:
                    return "error"
            return "eof"
        activity.last = loop.time()
        if budget is not None and not budget.spend(len(data)):
            return "budget"
        sink.write(data)
        try:
            async with asyncio.timeout(idle):
                await sink.drain()
        except (OSError, TimeoutError):
            return "error"
