"""Run actors in this process until SIGTERM/SIGINT: one Worker per actor on one bus connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Sequence

from actors import metrics
from actors.registry import actor_class
from actors.runtime import Actor, Worker
from actors.settings import Settings
from actors.wiring import make_bus
from bus.base import Bus

log = logging.getLogger("getgoodtape.serve")


def install_stop_signals(stopping: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stopping`` (graceful shutdown) instead of killing the loop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)


@contextlib.asynccontextmanager
async def workers(names: Sequence[str], *, settings: Settings, bus: Bus, stopping: asyncio.Event,
                  **deps: object) -> AsyncIterator[list[Worker]]:
    """Start a Worker per actor name in tasks owned by this block; on exit stop them gracefully."""
    built: list[Worker] = []
    for name in names:
        cls = actor_class(name)
        actor: Actor = cls(settings=settings, bus=bus, **deps)  # type: ignore[arg-type]
        built.append(Worker(actor))
    async with asyncio.TaskGroup() as group:
        for worker in built:
            group.create_task(worker.run(stopping))
        try:
            yield built
        finally:
            stopping.set()


async def serve(names: Sequence[str], settings: Settings) -> None:
    """Run the named actors until a stop signal; the process's main loop for ``getgoodtape run``."""
    stopping = asyncio.Event()
    install_stop_signals(stopping)
    bus = make_bus(settings, name="+".join(names))
    await bus.start()
    deps: dict[str, object] = {}
    try:
        async with metrics.exposed(settings, bus), \
                workers(names, settings=settings, bus=bus, stopping=stopping, **deps):
            log.info("actors running", extra={"actors": ",".join(names)})
            await stopping.wait()
            log.info("stop signal: finishing in-flight work", extra={"grace": settings.shutdown_grace})
    finally:
        await bus.close()
