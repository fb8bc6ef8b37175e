"""The old coordinator hop: a relay that receives the whole file, then uploads it again.

``python -m bench.relay`` listens on 127.0.0.1 (free port, printed as ``PORT <n>``). ``PUT /relay?to=URL``
reads the whole body into memory, as the Worker relay did, then PUTs it to ``URL`` with the same
Content-Type and answers with storage's status.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from actors.runtime.http import serving

SESSION = web.AppKey("session", aiohttp.ClientSession)


async def relay(request: web.Request) -> web.Response:
    """Receive the body whole, then upload it to ``?to=``."""
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/octet-stream")}
    async with request.app[SESSION].put(request.query["to"], data=body, headers=headers) as answer:
        await answer.read()
        return web.Response(status=answer.status)


async def _serve() -> None:
    app = web.Application(client_max_size=0)  # 0: no body size limit (the relay takes whole files)
    app.router.add_put("/relay", relay)
    async with aiohttp.ClientSession() as session:
        app[SESSION] = session
        async with serving(app) as port:
            print(f"PORT {port}", flush=True)
            await asyncio.Event().wait()  # until the benchmark terminates this process


if __name__ == "__main__":
    asyncio.run(_serve())
