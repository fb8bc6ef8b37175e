"""A test actor on the verifier's queue whose behaviour the job id chooses.

Job id prefixes: ``ok`` succeeds; ``flaky<N>`` fails transiently on its first N attempts;
``fatal`` fails permanently (too_long); ``always`` fails transiently forever; ``slow`` works for
``work_seconds``. Its side effect ("completed <job>") is written once per job, checked before
writing — idempotent on (job id, step) as the real actors are.

Run as a process: ``python -m tests.support.probe_actor LOGFILE WORK_SECONDS`` with ``GGT_*``.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

from actors.bootstrap.wiring import make_bus
from actors.runtime.logs import setup_logging
from actors.runtime.settings import load_settings
from actors.runtime.worker import Actor, Context, Worker
from messages.errors import ErrorCode, JobError
from messages.types import Verified, VerifyObject


class ProbeActor(Actor):
    """Handles VerifyObject by the rules in the module docstring and records what it did."""

    name = "verifier"

    def __init__(self, *, log_path: Path | None = None, work_seconds: float = 0.0, **kw) -> None:
        super().__init__(**kw)
        self.log_path = log_path
        self.work_seconds = work_seconds
        self.lines: list[str] = []
        self.changed = asyncio.Event()

    def record(self, line: str) -> None:
        self.lines.append(line)
        self.changed.set()
        if self.log_path:
            with self.log_path.open("a") as f:
                f.write(line + "\n")

    def completed(self, job_id: str) -> bool:
        lines = self.log_path.read_text().splitlines() if self.log_path and self.log_path.exists() else self.lines
        return f"completed {job_id}" in lines

    async def wait_for(self, predicate, timeout: float = 15.0) -> None:
        """Wait until ``predicate(lines)`` holds."""
        async with asyncio.timeout(timeout):
            while not predicate(self.lines):
                self.changed.clear()
                await self.changed.wait()

    async def verify(self, message: VerifyObject, ctx: Context) -> None:
        job = message.job_id
        self.record(f"started {job} attempt={ctx.attempt}")
        if m := re.match(r"flaky(\d+)", job):
            if ctx.attempt <= int(m.group(1)):
                raise JobError(ErrorCode.STORAGE_UNAVAILABLE, f"flaky attempt {ctx.attempt}")
        elif job.startswith("always"):
            raise ConnectionError("storage keeps refusing")
        elif job.startswith("fatal"):
            raise JobError(ErrorCode.TOO_LONG, "3 hours is too long")
        elif job.startswith("slow"):
            await asyncio.sleep(self.work_seconds)  # the work itself, not synchronisation
        if not self.completed(job):
            await ctx.publish(Verified(job_id=job, key=message.key, ok=True))
            self.record(f"completed {job}")


async def main(log_path: str, work_seconds: float) -> None:
    settings = load_settings()
    setup_logging(settings.log_level)
    bus = make_bus(settings, name="probe")
    await bus.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    worker = Worker(ProbeActor(settings=settings, bus=bus, log_path=Path(log_path), work_seconds=work_seconds))
    try:
        await worker.run(stopping)
    finally:
        await bus.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
