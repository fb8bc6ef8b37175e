"""The benchmark's media server, a process of its own: files by Range, unthrottled or rate-limited.

``python -m bench.server ROOT`` listens on 127.0.0.1 (a free port, printed as ``PORT <n>``) and serves
``/<file>`` (sendfile), ``/slow/<file>?rate=BYTES_PER_S`` (read from disk in chunks and paced to
the rate) and ``/throttled/<file>?burst=B&rate=R`` (a bounded Range of at most B bytes at full speed,
anything else paced to R after its first B bytes: an origin like YouTube that slows long requests).
Both honour a single ``Range: bytes=a-b``. Unlike the test fixture's slow route it never
holds a file in memory, so a 250 MB source at 20 MB/s costs nothing but time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from aiohttp import web

from actors.runtime.http import serving

#: bytes read from disk and written per step of the paced route
CHUNK = 256 * 1024
CONTENT_TYPES = {".mp4": "video/mp4", ".m4a": "audio/mp4", ".mp3": "audio/mpeg"}

#: bytes the throttled route serves at full speed per request, and its pace beyond them (bytes/s)
THROTTLE_BURST = 1024 * 1024
THROTTLE_RATE = 256 * 1024

ROOT = web.AppKey("root", Path)


def byte_range(header: str | None, total: int) -> tuple[int, int] | None:
    """(first, last) of a single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range, or None for the whole file."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first_s, _, last_s = header[6:].strip().partition("-")
    try:
        if not first_s:
            return max(0, total - int(last_s)), total - 1
        first, last = int(first_s), int(last_s) if last_s else total - 1
    except ValueError:
        return None
    if first >= total or last < first:
        return None
    return first, min(last, total - 1)


def _path(request: web.Request) -> Path:
    root = request.app[ROOT]
    path = (root / request.match_info["name"]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise web.HTTPNotFound()
    return path


async def serve_file(request: web.Request) -> web.StreamResponse:
    """The file at full speed (aiohttp's FileResponse: sendfile, Range, HEAD)."""
    path = _path(request)
    return web.FileResponse(path, headers={"Content-Type": CONTENT_TYPES.get(path.suffix, "application/octet-stream")})


async def serve_slow(request: web.Request) -> web.StreamResponse:
    """The file paced to ``?rate=`` bytes per second, Range honoured."""
    return await _serve_paced(request, rate=max(1, int(request.query.get("rate", "20000000"))), free_bytes=0)


async def serve_throttled(request: web.Request) -> web.StreamResponse:
    """A throttling origin, as YouTube treats long single requests: a bounded ``Range`` of at most
    ``?burst=`` bytes (default THROTTLE_BURST) comes at full speed; any other request gets its first
    ``burst`` bytes at full speed and the rest paced to ``?rate=`` bytes per second."""
    path = _path(request)
    burst = max(1, int(request.query.get("burst", str(THROTTLE_BURST))))
    rate = max(1, int(request.query.get("rate", str(THROTTLE_RATE))))
    wanted = byte_range(request.headers.get("Range"), path.stat().st_size)
    bounded = wanted is not None and request.headers.get("Range", "").strip()[-1:].isdigit()
    free = burst if not (bounded and wanted and wanted[1] - wanted[0] + 1 <= burst) else None
    return await _serve_paced(request, rate=rate, free_bytes=free)


async def _serve_paced(request: web.Request, *, rate: int, free_bytes: int | None) -> web.StreamResponse:
    """The file (Range honoured): the first ``free_bytes`` at full speed, the rest paced to ``rate``
    bytes per second; ``free_bytes`` None sends everything at full speed."""
    path = _path(request)
    total = path.stat().st_size
    wanted = byte_range(request.headers.get("Range"), total)
    first, last = wanted if wanted else (0, total - 1)
    headers = {"Content-Type": CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
               "Accept-Ranges": "bytes", "Content-Length": str(last - first + 1)}
    if wanted:
        headers["Content-Range"] = f"bytes {first}-{last}/{total}"
    response = web.StreamResponse(status=206 if wanted else 200, headers=headers)
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    started, sent = time.monotonic(), 0
    try:
        with path.open("rb") as f:
            f.seek(first)
            while sent < last - first + 1:
                piece = f.read(min(CHUNK, last - first + 1 - sent))
                if not piece:
                    break
                await response.write(piece)
                sent += len(piece)
                if free_bytes is None or sent <= free_bytes:
                    started = time.monotonic()  # the pace starts once the free bytes are out
                    continue
                ahead = (sent - free_bytes) / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)  # pacing the server to the rate
        await response.write_eof()
    except ConnectionResetError:  # the client stopped reading (a probe takes the start and goes)
        pass
    return response


def make_app(root: Path) -> web.Application:
    """The server's routes over ``root``."""
    app = web.Application()
    app[ROOT] = root.resolve()
    app.router.add_route("GET", "/slow/{name:.+}", serve_slow)
    app.router.add_route("HEAD", "/slow/{name:.+}", serve_slow)
    app.router.add_route("GET", "/throttled/{name:.+}", serve_throttled)
    app.router.add_get("/{name:.+}", serve_file)
    return app


async def _serve(root: Path) -> None:
    async with serving(make_app(root)) as port:
        print(f"PORT {port}", flush=True)
        await asyncio.Event().wait()  # until the benchmark terminates this process


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    asyncio.run(_serve(args.root))


if __name__ == "__main__":
    main()
