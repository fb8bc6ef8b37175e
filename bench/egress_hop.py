"""What the egress proxy costs: the guard's gateway fetching through it against fetching directly.

``python -m bench.egress_hop [--fetches N] [--mib M]`` — all on loopback: a small aiohttp origin, a
FetchGuard, and the recording CONNECT proxy of tests/support/egress_proxy.py. Prints, for each
path (direct, proxy), the median time of one small fetch through the gateway (a new upstream
connection each: what a job's pages, probes and segments cost) and the throughput of one M-MiB body,
with the CPU it costs per MiB (this process: origin, guard and client) — beside the same body
fetched with no guard at all, so the difference is what relaying each source byte costs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
from aiohttp import web

from actors.guard.egress import Egress
from actors.guard.proxy import FetchGuard
from actors.runtime.http import serving
from tests.support.egress_proxy import RecordingConnectProxy


async def _body(http: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """Throughput (MiB/s) and CPU per MiB (ms) of reading ``url``'s body."""
    started, cpu = time.perf_counter(), time.process_time()
    size = 0
    async with http.get(url) as answer:
        async for chunk in answer.content.iter_chunked(1 << 20):
            size += len(chunk)
    elapsed, spent = time.perf_counter() - started, time.process_time() - cpu
    return size / elapsed / (1 << 20), spent * 1000 / (size / (1 << 20))


async def _measure(origin: str, big: str, *, egress: Egress, fetches: int) -> tuple[float, float, float]:
    async with FetchGuard(allow=["127.0.0.1/32"], egress=egress) as guard, aiohttp.ClientSession() as http:
        times = []
        for _ in range(fetches):
            started = time.perf_counter()
            async with http.get(guard.gateway_url(origin)) as answer:
                await answer.read()
            times.append(time.perf_counter() - started)
        rate, cpu = await _body(http, guard.gateway_url(big))
    return statistics.median(times), rate, cpu


async def main(fetches: int, mib: int) -> None:
    """Measure both paths and print one line each."""
    body = b"\0" * (mib << 20)

    async def small_body(_: web.Request) -> web.Response:
        return web.Response(body=b"x" * 1024)

    async def big_body(_: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/small", small_body)
    app.router.add_get("/big", big_body)
    async with serving(app) as port, RecordingConnectProxy() as proxy:
        small, big = f"http://127.0.0.1:{port}/small", f"http://127.0.0.1:{port}/big"
        async with aiohttp.ClientSession() as http:
            rate, cpu = await _body(http, big)
        print(f"{'no guard':8s} {mib} MiB body {rate:.0f} MiB/s, {cpu:.2f} ms CPU per MiB")
        for name, egress in (("direct", Egress()), ("proxy", Egress(proxy.url))):
            latency, rate, cpu = await _measure(small, big, egress=egress, fetches=fetches)
            print(f"{name:8s} small fetch median {latency * 1000:.2f} ms   {mib} MiB body {rate:.0f} MiB/s, "
                  f"{cpu:.2f} ms CPU per MiB")
        print(f"tunnels opened by the proxy: {len(proxy.tunnels)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.egress_hop")
    parser.add_argument("--fetches", type=int, default=200)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(main(args.fetches, args.mib))
