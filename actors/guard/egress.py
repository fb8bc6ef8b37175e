"""How the guard opens an upstream connection: straight to the vetted address, or through the operator's proxy.

With ``GGT_EGRESS_PROXY`` set (``http://[user:pass@]host:port`` for HTTP CONNECT,
``socks5://[user:pass@]host:port``), every connection the guard makes for a job — yt-dlp's pages
and API calls, ffprobe's and ffmpeg's media, the thumbnail — is a tunnel through that proxy, so
every fetch of a job leaves from the proxy's address (sites that bind media URLs to the address
that resolved them see one address). The SSRF rule is unchanged: the guard resolves and vets the
target itself and asks the proxy for the *vetted IP* (TLS still carries the name as SNI and Host),
so the proxy is never asked to resolve a name and cannot be used to reach an internal host. Plain
http targets are tunnelled too (one uniform path). The proxy's own address is the operator's
choice and is not vetted (it may be internal). The tunnel is python-socks' client.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.parse
from typing import Any

import aiohttp
from python_socks import ProxyError, ProxyTimeoutError, parse_proxy_url
from python_socks.async_.asyncio import Proxy

#: proxy URL schemes the guard speaks: HTTP CONNECT and SOCKS5 (the target is always an IP address)
EGRESS_SCHEMES = ("http", "socks5")


class EgressProxyInvalid(ValueError):
    """``GGT_EGRESS_PROXY`` is not a proxy URL the guard can use (the message never holds its credentials)."""


def check_egress_proxy(url: str) -> None:
    """Raise EgressProxyInvalid unless ``url`` is empty or ``http://`` / ``socks5://`` with a host and a port."""
    if not url:
        return
    parts = urllib.parse.urlsplit(url)
    shown = masked_proxy_url(url)
    if parts.scheme not in EGRESS_SCHEMES:
        raise EgressProxyInvalid(f"{shown}: the scheme must be one of {', '.join(EGRESS_SCHEMES)}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EgressProxyInvalid(f"{shown}: a proxy URL has no path, query or fragment")
    try:
        parse_proxy_url(url)
    except ValueError:
        raise EgressProxyInvalid(f"{shown}: it needs a host and a port (http://host:3128)") from None


def masked_proxy_url(url: str) -> str:
    """``url`` with its password (and user name) replaced by ``***``, for logs and ``check``."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


class Egress:
    """Opens the guard's upstream connections to vetted addresses: directly, or tunnelled through ``proxy_url``.

    ``Egress()`` connects directly; ``Egress("http://proxy:3128")`` tunnels. Validate the URL with
    ``check_egress_proxy`` at start; a bad one raises EgressProxyInvalid here too.
    """

    def __init__(self, proxy_url: str = "") -> None:
        check_egress_proxy(proxy_url)
        self.proxy_url = proxy_url

    @property
    def shown(self) -> str:
        """Where connections leave from, as logs may show it: ``direct`` or the masked proxy URL."""
        return masked_proxy_url(self.proxy_url) if self.proxy_url else "direct"

    async def open_socket(self, ip: str, port: int, *, timeout: float) -> socket.socket:
        """A connected non-blocking socket to ``ip``:``port`` (a tunnel when a proxy is set); OSError on failure."""
        if not self.proxy_url:
            raise RuntimeError("open_socket is for the proxy path; a direct connection needs no tunnel")
        try:
            sock = await Proxy.from_url(self.proxy_url).connect(dest_host=ip, dest_port=port, timeout=timeout)
        except (ProxyError, ProxyTimeoutError) as exc:  # ProxyConnectionError is an OSError already
            # the reply line says why (403, 502 …); the proxy URL (and its credentials) stays out
            raise OSError(f"the egress proxy refused a tunnel: {type(exc).__name__}: {exc}") from None
        sock.setblocking(False)
        return sock

    async def open_connection(self, ip: str, port: int, *, timeout: float,
                              limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """asyncio streams to ``ip``:``port`` (never a second lookup of a name); OSError or TimeoutError on failure."""
        async with asyncio.timeout(timeout):
            if not self.proxy_url:
                return await asyncio.open_connection(ip, port, flags=socket.AI_NUMERICHOST, limit=limit)
            sock = await self.open_socket(ip, port, timeout=timeout)
            return await asyncio.open_connection(sock=sock, limit=limit)

    def connector(self, **kwargs: Any) -> aiohttp.TCPConnector:
        """An aiohttp connector (``kwargs`` as TCPConnector's) whose connections leave through this egress."""
        if not self.proxy_url:
            return aiohttp.TCPConnector(**kwargs)
        return _TunnellingConnector(self, **kwargs)


class _TunnellingConnector(aiohttp.TCPConnector):
    """TCPConnector that reaches each resolved (vetted) address through the egress proxy.

    aiohttp resolves with the guard's vetting resolver as usual, then hands the addresses to
    ``_wrap_create_connection``; this override opens the tunnel to them instead of a direct socket,
    and TLS (with the name as SNI) runs over the tunnel (the same hook aiohttp-socks uses).
    """

    def __init__(self, egress: Egress, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._egress = egress

    async def _wrap_create_connection(self, *args: Any, addr_infos: list[Any], req: Any, timeout: Any,
                                      client_error: type[Exception] = aiohttp.ClientConnectorError,
                                      **kwargs: Any) -> Any:
        failure: OSError = OSError("no address to connect to")
        for info in addr_infos:
            ip, port = info[4][0], info[4][1]
            try:
                sock = await self._egress.open_socket(ip, port, timeout=timeout.sock_connect or 30.0)
            except OSError as exc:
                failure = exc
                continue
            try:
                return await self._loop.create_connection(*args, **kwargs, sock=sock)
            except BaseException:
                sock.close()
                raise
        raise client_error(req.connection_key, failure)
