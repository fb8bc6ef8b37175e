"""The benchmark's services, each its own process: media server, embedded S3, relay, original processor.

Every process is started in its own session (process group) and stopped by that group only.
RabbitMQ gets a fresh vhost for the run (deleted afterwards).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: seconds a service has to say it is ready
READY_TIMEOUT = 60.0
#: seconds SIGTERM waits before SIGKILL
STOP_TIMEOUT = 20.0


class Service:
    """A child process in its own process group, with its stdout as a pipe."""

    def __init__(self, name: str, argv: list[str], *, env: Mapping[str, str] | None = None,
                 log: Path | None = None, stdin: bool = False) -> None:
        self.name = name
        self._log = log.open("ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self._log, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.proc.pid

    def read_line(self, *, timeout: float = READY_TIMEOUT) -> str:
        """The next stdout line (a service's ready line or a reply)."""
        assert self.proc.stdout is not None
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"{self.name}: no answer within {timeout:.0f} s")
        line = self.proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"{self.name} exited with status {self.proc.wait()}")
        return line.strip()

    def wait_for(self, prefix: str) -> str:
        """Read lines until one starts with ``prefix``; return it."""
        while not (line := self.read_line()).startswith(prefix):
            pass
        return line

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it if it lingers."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def python(*args: str) -> list[str]:
    """argv running this interpreter."""
    return [sys.executable, *args]


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rabbit_vhost() -> Iterator[str]:
    """A fresh vhost on the local broker for this run (guest may use it); deleted afterwards."""
    ctl = shutil.which("rabbitmqctl")
    if not ctl:
        raise SystemExit("rabbitmqctl not found: the benchmark needs the local RabbitMQ")
    name = f"ggt-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run([ctl, "add_vhost", name], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run([ctl, "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True,
                       capture_output=True, timeout=60)
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        subprocess.run([ctl, "delete_vhost", name], capture_output=True, timeout=120)


def broker_pid() -> int:
    """The OS process id of the local RabbitMQ node (its Erlang VM), 0 when it cannot be told.

    Read only to account for the broker's CPU during a run; the benchmark never signals it.
    """
    done = subprocess.run(["rabbitmqctl", "eval", "list_to_integer(os:getpid())."],
                          capture_output=True, text=True, timeout=60)
    text = done.stdout.strip()
    return int(text) if done.returncode == 0 and text.isdigit() else 0


def queue_consumers(vhost: str) -> dict[str, int]:
    """Consumers per queue of ``vhost`` (rabbitmqctl)."""
    done = subprocess.run(["rabbitmqctl", "list_queues", "-q", "-p", vhost, "name", "consumers"],
                          capture_output=True, text=True, timeout=60)
    counts: dict[str, int] = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def versions() -> dict[str, str]:
    """The machine and the versions of what the benchmark runs."""
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    ffmpeg = " ".join(subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split()[:3])
    rabbit = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True, timeout=60).stdout.strip()
    curl = " ".join(subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split()[:2])
    import yt_dlp

    return {"nproc": str(os.cpu_count()), "cpu": cpu, "ram_gib": f"{mem / 1024 / 1024:.1f}",
            "kernel": platform.release(), "python": platform.python_version(), "ffmpeg": ffmpeg,
            "rabbitmq": rabbit, "curl": curl, "yt_dlp": yt_dlp.version.__version__}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]
