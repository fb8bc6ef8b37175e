"""Child processes for tests: started in their own process group, stopped only by their PID/group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import msgspec

from actors.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def settings_env(settings: Settings) -> dict[str, str]:
    """``GGT_*`` variables that reproduce ``settings`` in a child process."""
    env: dict[str, str] = {}
    for key, value in msgspec.structs.asdict(settings).items():
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env["GGT_" + key.upper()] = str(value)
    return env


class Child:
    """A child process in its own session (process group); killed by group, never by name."""

    def __init__(self, argv: list[str], *, env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group (ffmpeg children included)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL the group if it lingers."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        self.signal(signal.SIGKILL)  # leftovers of the group (none expected)
        self._log.close()


@contextlib.contextmanager
def children() -> Iterator[Callable[..., Child]]:
    """A factory of Child processes, all stopped when the block ends."""
    started: list[Child] = []

    def start(argv: list[str], *, env: Mapping[str, str], log_path: Path) -> Child:
        child = Child(argv, env=env, log_path=log_path)
        started.append(child)
        return child

    try:
        yield start
    finally:
        for child in started:
            child.stop()


def python(*args: str) -> list[str]:
    """argv running this interpreter."""
    return [sys.executable, *args]


async def until(predicate: Callable[[], bool], *, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds (for state outside this process: files, queues)."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 — state of another process
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def lines(path: Path) -> list[str]:
    """The lines of a file written by a child (empty when it does not exist yet)."""
    return path.read_text().splitlines() if path.exists() else []
