"""Actors as separate OS processes over the test broker and S3, for end-to-end and fault tests.

``async with actor_cluster(settings, tmp_path) as cluster:`` starts nothing by itself;
``cluster.start("uploader")`` starts one ``getgoodtape run uploader`` process (its own process
group, its log in tmp_path), ``cluster.kill(child)`` SIGKILLs that group. ``cluster.run(requests)``
publishes ConvertRequested messages and waits for every final event, counting duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

from actors.bootstrap.wiring import make_bus
from actors.runtime.settings import Settings
from bus.base import Bus
from messages.types import ConvertRequested
from tests.support.events import EventLog
from tests.support.processes import Child, children, python, settings_env

#: seconds a batch of test jobs may take
BATCH_TIMEOUT = 240.0


class Cluster(EventLog):
    """Actor processes plus the test's own view of the bus."""

    def __init__(self, settings: Settings, bus: Bus, log_dir: Path, start) -> None:
        super().__init__()
        self.settings, self.bus, self.log_dir = settings, bus, log_dir
        self._start = start
        self.env = settings_env(settings)
        self.processes: dict[str, list[Child]] = defaultdict(list)

    def start(self, actor: str, **env: str) -> Child:
        """Start ``getgoodtape run <actor>`` as a new process."""
        n = len(self.processes[actor])
        child = self._start(python("-m", "actors.cli", "run", actor), env={**self.env, **env},
                            log_path=self.log_dir / f"{actor}-{n}.log")
        self.processes[actor].append(child)
        return child

    def start_all(self, **env: str) -> None:
        """One process per actor."""
        for actor in ("coordinator", "converter", "uploader", "verifier"):
            self.start(actor, **env)

    def kill(self, child: Child) -> None:
        """SIGKILL the child's process group (ffmpeg included) and reap it."""
        child.signal(signal.SIGKILL)
        child.wait(30)

    async def wait_until(self, predicate, *, timeout: float = BATCH_TIMEOUT, what: str = "condition") -> None:
        """Wait until ``predicate()`` holds, woken by each event (the actors' logs are in log_dir)."""
        await super().wait_until(predicate, timeout=timeout, what=f"{what} (logs in {self.log_dir})")

    async def publish(self, requests: list[ConvertRequested]) -> None:
        for request in requests:
            await self.bus.publish(request)

    async def run(self, requests: list[ConvertRequested], *, timeout: float = BATCH_TIMEOUT) -> None:
        """Publish and wait until each request's job has a final event."""
        await self.publish(requests)
        ids = [r.job_id for r in requests]
        await self.wait_until(lambda: all(i in self.finals for i in ids), timeout=timeout,
                              what=f"{len(ids)} jobs to finish")


@contextlib.asynccontextmanager
async def actor_cluster(settings: Settings, log_dir: Path) -> AsyncIterator[Cluster]:
    """A Cluster whose processes all stop (SIGTERM, then SIGKILL) when the block ends."""
    bus = make_bus(settings, name="tests-cluster")
    await bus.start()
    try:
        with children() as start:
            cluster = Cluster(settings, bus, log_dir, start)
            async with bus.subscribe("job.#") as events:
                collector = asyncio.create_task(cluster.collect(events))
                try:
                    yield cluster
                finally:
                    collector.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await collector
    finally:
        await bus.close()
