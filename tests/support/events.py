"""The events of jobs as a test sees them on ggt.events: progress, final events, duplicates."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable

from messages.codec import decode
from messages.types import JobCompleted, JobFailed, JobProgress


class EventLog:
    """Collects JobProgress and the final events; tests wait on it instead of sleeping."""

    def __init__(self) -> None:
        self.progress: dict[str, list[JobProgress]] = defaultdict(list)
        self.finals: dict[str, JobCompleted | JobFailed] = {}
        self.final_counts: Counter[str] = Counter()
        self._changed = asyncio.Event()

    async def collect(self, events: AsyncIterator) -> None:
        """Read (envelope, body) pairs from a subscription until cancelled."""
        async for envelope, body in events:
            message = decode(body, type_name_hint=envelope.type)
            if isinstance(message, JobProgress):
                self.progress[message.job_id].append(message)
            elif isinstance(message, (JobCompleted, JobFailed)):
                self.finals[message.job_id] = message
                self.final_counts[message.job_id] += 1
            self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool], *, timeout: float, what: str = "condition") -> None:
        """Wait until ``predicate()`` holds, woken by each event."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                 f"{len(self.finals)} jobs finished") from None

    async def final(self, job_id: str, *, timeout: float) -> JobCompleted | JobFailed:
        """The job's final event, once it arrives."""
        await self.wait_until(lambda: job_id in self.finals, timeout=timeout, what=f"job {job_id}")
        return self.finals[job_id]
