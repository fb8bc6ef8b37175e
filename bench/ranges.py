"""Ranged against unranged fetching from a throttling origin, through the guard's gateway.

``python -m bench.ranges [--mib 24] [--rate-kib 2048] [--chunk-mib 1]`` serves a file on loopback
from ``bench.server``'s throttled route (a bounded Range of at most 1 MiB at full speed, anything
else slowed to ``--rate-kib`` after its first MiB, as YouTube treats long single requests), then
reads it through a FetchGuard's gateway as ffmpeg would — once in one request, once with the
format's ``http_chunk_size`` (successive Range requests) — and prints the seconds and MiB/s of each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import aiohttp

from actors.guard import FetchGuard
from actors.guard.ranges import ranged_url
from actors.runtime.http import serving
from bench.server import make_app

MiB = 1024 * 1024


async def _read(url: str) -> int:
    size = 0
    async with aiohttp.ClientSession() as session, session.get(url, headers={"Range": "bytes=0-"}) as response:
        async for chunk in response.content.iter_chunked(MiB):
            size += len(chunk)
    return size


async def measure(root: Path, *, mib: int, rate: int, chunk: int) -> dict[str, float]:
    """Seconds to read ``root/source.bin`` (``mib`` MiB) unranged and ranged (``chunk`` bytes) from the
    throttled route."""
    async with serving(make_app(root)) as port, FetchGuard(allow=("127.0.0.1/32",)) as guard:
        upstream = f"http://127.0.0.1:{port}/throttled/source.bin?rate={rate}"
        figures: dict[str, float] = {}
        for name, url in (("unranged", guard.gateway_url(upstream)),
                          ("ranged", ranged_url(guard.gateway_url(upstream), chunk))):
            started = time.monotonic()
            got = await _read(url)
            if got != mib * MiB:
                raise RuntimeError(f"{name}: read {got} of {mib * MiB} bytes")
            figures[f"{name}_s"] = round(time.monotonic() - started, 2)
    return figures


def main() -> None:
    """Command-line entry point: print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=24, help="size of the source, MiB")
    parser.add_argument("--rate-kib", type=int, default=2048, help="the origin's pace beyond 1 MiB, KiB/s")
    parser.add_argument("--chunk-mib", type=int, default=1, help="http_chunk_size of the format, MiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        Path(root, "source.bin").write_bytes(os.urandom(args.mib * MiB))
        figures = asyncio.run(measure(Path(root), mib=args.mib, rate=args.rate_kib * 1024, chunk=args.chunk_mib * MiB))
    for name in ("unranged", "ranged"):
        seconds = figures[f"{name}_s"]
        print(f"{name:9} {args.mib} MiB in {seconds:6.2f} s  ({args.mib / seconds:7.1f} MiB/s)")


if __name__ == "__main__":
    main()
