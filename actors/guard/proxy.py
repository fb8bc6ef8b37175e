"""The filtering HTTP proxy that every fetch for a user's URL goes through (yt-dlp and ffmpeg).

It accepts absolute-URI requests (``GET http://host/path``) and ``CONNECT host:port`` tunnels
(https), resolves the host itself, refuses with 403 + ``X-GGT-Blocked: url_not_allowed`` when any
resolved address is not allowed, and otherwise connects to the vetted address — never to the name
again, so a DNS answer cannot change between the check and the connection. Redirects and HLS
segments are new requests, so each hop is checked on its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import NamedTuple, Self

from actors.guard.addresses import IPAddress, address_allowed, block_reason, parse_networks
from messages.errors import ErrorCode, JobError

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
#: protocols ffmpeg may use for a user's input: http(s) and what they run on, through the proxy
FFMPEG_PROTOCOL_WHITELIST = "http,https,tls,tcp,httpproxy,crypto"
#: request headers meant for the proxy or for one connection, never forwarded upstream
HOP_BY_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te"})
#: environment variables that make ffmpeg (and libraries) skip a proxy for some hosts
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")

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
        return ProxyRequest(host, port, True, b"")
    if not target.lower().startswith("http://"):
        raise BadProxyRequest("only absolute http:// targets and CONNECT are served")
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
    if not any(line.partition(":")[0].lower() == "host" for line in headers):
        headers.append(f"Host: {parts.netloc.rpartition('@')[2]}")
    # one request per upstream connection: a later request on it could name another host
    headers.append("Connection: close")
    upstream = "\r\n".join([f"{method} {path} {version}", *headers, "", ""])
    return ProxyRequest(host, port, False, upstream.encode("latin-1"))


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


def merge_protocol_whitelist(args: Sequence[str], protocols: str) -> list[str]:
    """``args`` with ``protocols`` added to its ``-protocol_whitelist`` (or given one)."""
    out = list(args)
    extra = protocols.split(",")
    if "-protocol_whitelist" in out:
        at = out.index("-protocol_whitelist") + 1
        allowed = out[at].split(",")
        out[at] = ",".join([*allowed, *(p for p in extra if p not in allowed)])
        return out
    return [*out, "-protocol_whitelist", protocols]


class FetchGuard:
    """The SSRF guard of one job: a filtering proxy on loopback for yt-dlp and ffmpeg.

    ``async with FetchGuard(allow=settings.allow_networks) as guard:`` then pass
    ``guard.ytdlp_options()`` to YoutubeDL, and to ffmpeg ``guard.ffmpeg_input_args()`` before
    *every* ``-i`` (they are per-input options) with ``env=guard.subprocess_env(os.environ)``.
    After each yt-dlp or ffmpeg run — successful ones too, since ffmpeg skips HLS segments it cannot
    open — call ``guard.raise_if_blocked()``. Run yt-dlp in a thread (``asyncio.to_thread``): the
    proxy lives on this event loop. Use one guard per job so its ``blocked`` record is that job's.
    """

    def __init__(
        self,
        *,
        allow: Sequence[str] = (),
        resolve: Resolver = system_resolve,
        connect_timeout: float = CONNECT_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_tunnels: int = MAX_TUNNELS,
    ) -> None:
        self._allow = parse_networks(allow)
        self._resolve = resolve
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._max_tunnels = max_tunnels
        #: refused connections, oldest first
        self.blocked: list[BlockedFetch] = []
        self._server: asyncio.Server | None = None
        self._port = 0
        self._active = 0
        self._closing = False
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, LISTEN_HOST, 0, limit=MAX_HEAD_BYTES)
        self._port = self._server.sockets[0].getsockname()[1]
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

    @property
    def proxy_url(self) -> str:
        """``http://127.0.0.1:PORT``: the proxy every fetch for the user's URL must use."""
        return f"http://{LISTEN_HOST}:{self._port}"

    def ytdlp_options(self) -> dict[str, object]:
        """YoutubeDL params that route all of yt-dlp's HTTP (geo-bypass requests included) through the guard."""
        return {"proxy": self.proxy_url, "geo_verification_proxy": self.proxy_url}

    def ffmpeg_input_args(self) -> list[str]:
        """ffmpeg input options (place them before ``-i``): the proxy and the protocol whitelist."""
        return ["-http_proxy", self.proxy_url, "-protocol_whitelist", FFMPEG_PROTOCOL_WHITELIST]

    def input_args(self, args: Sequence[str]) -> list[str]:
        """One ffmpeg/ffprobe input's own options routed through the guard: ``-http_proxy`` added and
        ``httpproxy`` (and the guard's protocols) merged into the input's ``-protocol_whitelist``
        (ffmpeg keeps only the last value of a repeated option, so they must be one list)."""
        return ["-http_proxy", self.proxy_url, *merge_protocol_whitelist(args, FFMPEG_PROTOCOL_WHITELIST)]

    def subprocess_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """``environ`` for an ffmpeg child: proxy variables set, ``no_proxy`` removed (ffmpeg obeys it even with -http_proxy)."""
        env = {name: value for name, value in environ.items() if name not in NO_PROXY_VARIABLES}
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env[name] = self.proxy_url
        return env

    def blocked_error(self) -> JobError | None:
        """The job's error if the guard refused a connection (the first refusal), else None."""
        if not self.blocked:
            return None
        first = self.blocked[0]
        return JobError(ErrorCode.URL_NOT_ALLOWED, f"{first.host} resolves to {first.ip}: {first.reason}")

    def raise_if_blocked(self) -> None:
        """Raise ``JobError(URL_NOT_ALLOWED)`` if any connection was refused; call it after every tool run."""
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
                await self._serve(reader, writer)
            finally:
                self._active -= 1
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
            await _relay(reader, writer, upstream_reader, upstream_writer, idle=self._idle_timeout)
        finally:
            upstream_writer.close()

    async def _vet(self, host: str, port: int) -> list[IPAddress]:
        try:
            async with asyncio.timeout(self._connect_timeout):
                addresses = await self._resolve(host, port)
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: names IDNA cannot encode, NULs
            raise _Refusal(502, f"cannot resolve {host}: {exc!r}") from None
        if not addresses:
            raise _Refusal(502, f"{host} has no addresses")
        # one forbidden answer taints the name: a host mixing public and private answers is hostile
        for ip in addresses:
            if self._is_self(ip, port):
                reason = "the guard itself"
            elif not address_allowed(ip, allow=self._allow):
                reason = block_reason(ip) or "not allowed"
            else:
                continue
            self.blocked.append(BlockedFetch(host, str(ip), reason))
            log.warning("guard refused %s:%s -> %s (%s)", host, port, ip, reason)
            raise _Refusal(403, f"{host} resolves to {ip}: {reason}", blocked=True)
        return addresses

    def _is_self(self, ip: IPAddress, port: int) -> bool:
        return port == self._port and (ip.is_loopback or ip.is_unspecified)

    async def _connect(
        self, addresses: list[IPAddress], port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        failure: BaseException | None = None
        for ip in addresses[:MAX_CONNECT_ATTEMPTS]:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    # a numeric host: the vetted address itself, no second lookup of the name
                    return await asyncio.open_connection(str(ip), port, flags=socket.AI_NUMERICHOST,
                                                         limit=UPSTREAM_BUFFER)
            except (OSError, TimeoutError) as exc:
                failure = exc
        raise _Refusal(502, f"cannot connect to port {port}: {failure!r}")


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str, *, blocked: bool = False) -> None:
    body = (f"{BLOCKED_VALUE}: {reason}\n" if blocked else f"{reason}\n").encode()
    extra = f"{BLOCKED_HEADER}: {BLOCKED_VALUE}\r\n" if blocked else ""
    title = {
        400: "Bad Request",
        403: "Forbidden",
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
) -> None:
    """Copy bytes both ways until upstream is done, either side fails, or nothing moves for ``idle`` s."""
    activity = _Activity()
    async with asyncio.TaskGroup() as group:
        down = group.create_task(_pipe(upstream_reader, client_writer, activity, idle=idle, half_close=False))
        up = group.create_task(_pipe(client_reader, upstream_writer, activity, idle=idle, half_close=True))
        # the response ending ends the exchange; the request ending (EOF) only half-closes upstream
        down.add_done_callback(lambda _: up.cancel())
        up.add_done_callback(lambda task: None if _ended_cleanly(task) else down.cancel())


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
        sink.write(data)
        try:
            async with asyncio.timeout(idle):
                await sink.drain()
        except (OSError, TimeoutError):
            return "error"
