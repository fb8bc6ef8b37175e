"""Loopback sites that serve media the way the big sites do: bound, expiring, throttled.

``BoundSite`` hands out media URLs like YouTube's: each fetch of its page is a new resolution with
a token of its own and an ``expire=<unix time>`` in the URL's query, and a URL works only for the
"address" that resolved it, only until it expires. Everything here runs on loopback, where every
client has the same address, so the address is simulated per token: the first client to fetch a
token from byte 0 claims it; a later fetch from byte 0 is another client — another address — and
is refused with 403 (a fetch continuing from a later byte, by Range, is the claimant going on).
So the converter's probe claims the URL it resolved, and the uploader that fetches the same URL
afterwards is refused, as it would be from another host.

``throttled_origin`` serves ``bench.server``'s throttled route (a bounded Range of at most 1 MiB
at full speed, anything else slowed after its first MiB) and logs each request's Range.
"""

from __future__ import annotations

import contextlib
import html
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from actors.runtime.http import serving
from bench.server import byte_range, make_app
from tests.fixtures.media import content_type_for

_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title></head>
<body><video controls src="{src}"></video></body></html>
"""


@dataclass
class MediaFetch:
    """One media request the site answered."""

    token: str
    range: str | None
    status: int


@dataclass
class BoundSite:
    """The site: ``async with site.running(): site.page_url("audio.mp3")``.

    ``lifetime``: seconds a minted URL is valid. ``served``: how many resolutions are ever served
    (None: all); later ones are refused whoever asks — a site that refuses even fresh URLs.
    ``cut_resolutions`` / ``cut_at``: the URLs of those resolutions (1 = the first) stop working
    ``cut_at`` bytes into the file, as a URL expiring in the middle of a ranged download.
    """

    root: Path
    lifetime: float = 3600.0
    served: int | None = None
    #: resolutions whose URLs die mid-download: refused for any request from byte ``cut_at`` on
    cut_resolutions: frozenset[int] = frozenset()
    cut_at: int = 0
    #: tokens in the order their resolutions (page fetches) were made
    resolutions: list[str] = field(default_factory=list)
    fetches: list[MediaFetch] = field(default_factory=list)
    _claimed: set[str] = field(default_factory=set)
    _expires: dict[str, int] = field(default_factory=dict)
    port: int = 0

    def page_url(self, name: str) -> str:
        """The page for file ``name`` (each fetch of it resolves anew)."""
        return f"http://127.0.0.1:{self.port}/watch/{name}.html"

    def expiry(self, token: str) -> int:
        """The unix time the URLs of resolution ``token`` expire."""
        return self._expires[token]

    def refused(self) -> list[MediaFetch]:
        """The media requests the site refused."""
        return [f for f in self.fetches if f.status == 403]

    def served_tokens(self) -> list[str]:
        """Tokens whose media was served, in order of their first success."""
        return list(dict.fromkeys(f.token for f in self.fetches if f.status in (200, 206)))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[BoundSite]:
        """Serve on 127.0.0.1 (a free port) for the block."""
        app = web.Application()
        app.router.add_get("/watch/{name:.+}.html", self._page)
        app.router.add_get("/media/{token}/{name:.+}", self._media)
        async with serving(app) as port:
            self.port = port
            yield self

    def _file(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            raise web.HTTPNotFound()
        return path

    async def _page(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._file(name)
        token = secrets.token_hex(8)
        self.resolutions.append(token)
        self._expires[token] = int(time.time() + self.lifetime)
        src = f"/media/{token}/{name}?expire={self._expires[token]}&ip=simulated"
        return web.Response(text=_PAGE.format(title=html.escape(name), src=html.escape(src)), content_type="text/html")

    async def _media(self, request: web.Request) -> web.StreamResponse:
        token, name = request.match_info["token"], request.match_info["name"]
        data = self._file(name).read_bytes()
        asked = request.headers.get("Range")
        wanted = byte_range(asked, len(data))
        from_start = wanted is None or wanted[0] == 0
        resolution = self.resolutions.index(token) + 1 if token in self._expires else None
        refused = (
            resolution is None
            or time.time() > self._expires[token]  # expired
            or (self.served is not None and resolution > self.served)
            or (resolution in self.cut_resolutions and wanted is not None and wanted[0] >= self.cut_at)
            or (from_start and token in self._claimed)  # another "address" than the one that claimed it
            or (not from_start and token not in self._claimed)
        )
        if refused:
            self.fetches.append(MediaFetch(token, asked, 403))
            raise web.HTTPForbidden(text="this URL is not yours")
        self._claimed.add(token)
        headers = {"Content-Type": content_type_for(name), "Accept-Ranges": "bytes"}
        if wanted is None:
            self.fetches.append(MediaFetch(token, asked, 200))
            return web.Response(body=data, headers=headers)
        first, last = wanted
        self.fetches.append(MediaFetch(token, asked, 206))
        headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        return web.Response(status=206, body=data[first:last + 1], headers=headers)


@dataclass
class OriginLog:
    """The Range header (or None) and status of each request a throttled origin answered."""

    requests: list[tuple[str | None, int]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def throttled_origin(root: Path) -> AsyncIterator[tuple[int, OriginLog]]:
    """``bench.server`` over ``root`` on 127.0.0.1 with its request log: (port, log)."""
    app = make_app(root)
    log = OriginLog()

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        log.requests.append((request.headers.get("Range"), response.status))

    app.on_response_prepare.append(record)
    async with serving(app) as port:
        yield port, log
