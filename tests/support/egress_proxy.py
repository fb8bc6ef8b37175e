"""Recording egress proxies on loopback (HTTP CONNECT, and a minimal SOCKS5), as the guard's tests see them.

``async with RecordingConnectProxy() as proxy:`` then ``GGT_EGRESS_PROXY=proxy.url``. Each tunnel
is recorded with the target it was asked for, the first line of the request sent through it when
that is plain http, and the local port of the proxy's own connection to the target (so a test site
can tell a tunnelled request from a direct one). ``require_auth`` makes it answer 407 unless the
client sends those Basic credentials. ``RecordingSocks5Proxy`` does the same for SOCKS5 (no
authentication, CONNECT to an IPv4 address or a name; ``url`` is ``socks5://127.0.0.1:PORT``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field
from typing import Self

#: bytes copied per step
CHUNK = 256 * 1024


@dataclass
class Tunnel:
    """One CONNECT the proxy served."""

    target: str
    #: the proxy's local port towards the target (what the target sees as the client's port)
    upstream_port: int = 0
    #: the first line inside the tunnel ("GET /page HTTP/1.1"), or "" for TLS or nothing
    first_line: str = ""
    #: the Proxy-Authorization header the client sent ("" when none)
    authorization: str = ""


@dataclass
class RecordingConnectProxy:
    """The proxy; ``tunnels`` lists every CONNECT, oldest first."""

    require_auth: tuple[str, str] | None = None
    tunnels: list[Tunnel] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (with the credentials when it requires them)."""
        auth = f"{self.require_auth[0]}:{self.require_auth[1]}@" if self.require_auth else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            opened = await self._open(reader, writer)
            if opened is not None:
                async with asyncio.TaskGroup() as group:
                    group.create_task(_copy(reader, opened[1]))
                    group.create_task(_copy(opened[0], writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            # only __aexit__ cancels a handler; ending quietly keeps asyncio's stream callback from
            # reporting the cancellation as an error
            return
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(OSError):
                writer.close()

    async def _open(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The proxy's handshake: record the tunnel, connect to its target; None when refused."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {name.strip().lower(): value.strip()
                   for name, _, value in (line.partition(":") for line in lines[1:] if line)}
        tunnel = Tunnel(target=target, authorization=headers.get("proxy-authorization", ""))
        self.tunnels.append(tunnel)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return None
        if self.require_auth is not None:
            expected = "Basic " + base64.b64encode(":".join(self.require_auth).encode()).decode()
            if tunnel.authorization != expected:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                return None
        host, _, port = target.rpartition(":")
        try:
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return None
        tunnel.upstream_port = up_writer.get_extra_info("sockname")[1]
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        first = await reader.read(CHUNK)
        if first[:1].isalpha():
            tunnel.first_line = first.split(b"\r\n", 1)[0].decode("latin-1")
        up_writer.write(first)
        return up_reader, up_writer


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except OSError:
        sink.close()


class RecordingSocks5Proxy(RecordingConnectProxy):
    """A SOCKS5 proxy (RFC 1928: no authentication, CONNECT only); ``tunnels`` as the CONNECT proxy's."""

    @property
    def url(self) -> str:
        """``socks5://127.0.0.1:PORT``."""
        return f"socks5://127.0.0.1:{self.port}"

    async def _open(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        _version, methods = await reader.readexactly(2)
        await reader.readexactly(methods)
        writer.write(b"\x05\x00")  # no authentication
        _version, command, _reserved, kind = await reader.readexactly(4)
        if kind == 1:
            host = ".".join(str(b) for b in await reader.readexactly(4))
        elif kind == 3:
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
        else:
            writer.write(b"\x05\x08\x00\x01" + bytes(6))  # address type not supported
            return None
        port = int.from_bytes(await reader.readexactly(2), "big")
        tunnel = Tunnel(target=f"{host}:{port}")
        self.tunnels.append(tunnel)
        if command != 1:
            writer.write(b"\x05\x07\x00\x01" + bytes(6))  # command not supported
            return None
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.write(b"\x05\x05\x00\x01" + bytes(6))  # connection refused
            return None
        tunnel.upstream_port = up_writer.get_extra_info("sockname")[1]
        writer.write(b"\x05\x00\x00\x01" + bytes(6))
        await writer.drain()
        return up_reader, up_writer
