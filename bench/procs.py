"""What processes cost, read from /proc: peak RSS, bytes written to disk, CPU seconds.

Two ways, one result type (``Cost``):

- a process the benchmark runs to its end (bare ffmpeg, curl) is measured exactly by ``run_measured``
  (``os.wait4``: ``ru_maxrss``, ``ru_utime + ru_stime``, ``ru_oublock`` × 512 = its write_bytes);
- a long-lived process (an actor, the relay, the original processor, the S3 server) is a ``Watched``
  root: its peak RSS counter is reset before each run (``/proc/<pid>/clear_refs``), its descendants
  (ffmpeg, curl, ffprobe) are sampled while they live, and its CPU (``utime+stime+cutime+cstime``)
  and write_bytes (which Linux adds a reaped child's to its parent's) are taken as differences —
  the CPU of descendants that outlive the run (a warm worker pool) is added from their own counters;
- the whole machine's busy CPU over a run is ``machine_cpu()`` (/proc/stat) taken as a difference,
  so what no watched process spent (the kernel, other services, idle) is measured, not guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

#: seconds between two samples of the watched processes
SAMPLE_INTERVAL = 0.02
#: writing this to clear_refs resets the peak RSS (VmHWM) of a process (proc(5))
RESET_PEAK_RSS = b"5"
#: the disk block unit of ru_oublock, bytes
BLOCK = 512
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Cost(msgspec.Struct, kw_only=True):
    """What one process (with what it ran) cost during one measured run."""

    name: str
    peak_rss: int = 0
    written: int = 0
    cpu: float = 0.0
    #: of ``cpu``, what its children spent: reaped ones (cutime + cstime) and live descendants
    children_cpu: float = 0.0
    #: peak RSS of the programs it ran during the run (ffmpeg, curl …), by program name
    children_peak_rss: dict[str, int] = {}


def _read(path: str) -> str:
    with contextlib.suppress(OSError):
        return Path(path).read_text()
    return ""


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmHWM, VmRSS), in KiB; 0 when gone."""
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def write_bytes(pid: int) -> int:
    """write_bytes of /proc/<pid>/io (reaped children included); 0 when gone."""
    for line in _read(f"/proc/{pid}/io").splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime) of /proc/<pid>/stat: the process, its reaped children; 0 when gone."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return 0.0, 0.0
    fields = [int(f) for f in text.rsplit(")", 1)[1].split()[11:15]]
    return (fields[0] + fields[1]) / CLOCK_TICKS, (fields[2] + fields[3]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of /proc/<pid>/stat: the process and its reaped children."""
    return sum(cpu_split(pid))


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot, every core (/proc/stat's first line)."""
    ticks = [int(f) for f in _read("/proc/stat").splitlines()[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / CLOCK_TICKS, idle / CLOCK_TICKS


def comm(pid: int) -> str:
    """The program name of ``pid``."""
    return _read(f"/proc/{pid}/comm").strip()


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children of all its threads, recursively)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                for child in _read(f"/proc/{parent}/task/{task}/children").split():
                    found.append(int(child))
                    stack.append(int(child))
    return found


def reset_peak_rss(pid: int) -> None:
    """Start a new peak-RSS period for ``pid`` (a process of this user)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_bytes(RESET_PEAK_RSS)


class Watched:
    """A long-lived process whose cost is measured per run (``begin`` … ``sample`` … ``end``)."""

    def __init__(self, name: str, pid: int) -> None:
        self.name, self.pid = name, pid
        self._cpu0 = (0.0, 0.0)
        self._live0: dict[int, float] = {}
        self._written0 = 0
        self._peak = 0
        self._children: dict[int, tuple[str, int]] = {}

    def begin(self) -> None:
        """Reset the counters for a new run."""
        reset_peak_rss(self.pid)
        self._cpu0, self._written0 = cpu_split(self.pid), write_bytes(self.pid)
        self._live0 = {child: cpu_seconds(child) for child in descendants(self.pid)}
        self._peak = status_kib(self.pid, "VmRSS") * 1024
        self._children = {}

    def sample(self) -> None:
        """Read the peak RSS of the process and of every live descendant."""
        self._peak = max(self._peak, status_kib(self.pid, "VmHWM") * 1024)
        for child in descendants(self.pid):
            name, peak = self._children.get(child, (comm(child), 0))
            self._children[child] = (name, max(peak, status_kib(child, "VmHWM") * 1024))

    def end(self) -> Cost:
        """The cost since ``begin``."""
        self.sample()
        by_name: dict[str, int] = {}
        for name, peak in self._children.values():
            by_name[name] = max(by_name.get(name, 0), peak)
        own, reaped = cpu_split(self.pid)
        # a descendant still alive (a pool's worker) has not been added to cutime: its own counters
        # count, less what it had spent before the run; the ones reaped since are in ``reaped``
        live = sum(cpu_seconds(child) - self._live0.get(child, 0.0) for child in descendants(self.pid))
        children = reaped - self._cpu0[1] + live
        return Cost(name=self.name, peak_rss=self._peak, written=write_bytes(self.pid) - self._written0,
                    cpu=round(own - self._cpu0[0] + children, 3), children_cpu=round(children, 3),
                    children_peak_rss=by_name)


@contextlib.asynccontextmanager
async def watching(processes: Sequence[Watched], *, sample: bool = True):
    """Sample ``processes`` every SAMPLE_INTERVAL while the block runs; yields a dict filled on exit.

    ``sample=False`` reads them only at the start and the end: CPU, write_bytes and each watched
    process's own peak RSS are exact that way; only the peaks of short-lived descendants are lost,
    and a run that measures the whole machine does not pay for a sampler walking /proc 50 times a second.
    """
    for p in processes:
        p.begin()
    costs: dict[str, Cost] = {}
    if not sample:
        try:
            yield costs
        finally:
            costs.update({p.name: p.end() for p in processes})
        return

    async def sampler() -> None:
        while True:
            for p in processes:
                p.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)  # a sampling period, not a synchronisation

    task = asyncio.create_task(sampler())
    try:
        yield costs
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        costs.update({p.name: p.end() for p in processes})


class Finished(msgspec.Struct, kw_only=True):
    """A process run to its end: exit status, wall seconds, cost, stdout."""

    returncode: int
    wall: float
    cost: Cost
    stdout: bytes = b""
    stderr: bytes = b""


def _wait_measured(argv: Sequence[str], name: str, env: Mapping[str, str] | None,
                   stdout: int | None) -> Finished:
    started = time.monotonic()
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                            env=dict(env) if env is not None else None, start_new_session=True)
    errors: list[bytes] = []
    # stderr is drained by its own thread so that neither pipe can fill and block the child
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    out = proc.stdout.read() if proc.stdout is not None else b""
    reader.join()
    err = errors[0] if errors else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    cost = Cost(name=name, peak_rss=usage.ru_maxrss * 1024, written=usage.ru_oublock * BLOCK,
                cpu=round(usage.ru_utime + usage.ru_stime, 3))
    return Finished(returncode=proc.returncode, wall=wall, cost=cost, stdout=out, stderr=err)


async def run_measured(argv: Sequence[str], *, name: str, env: Mapping[str, str] | None = None,
                       capture: bool = False) -> Finished:
    """Run ``argv`` to its end (own process group) and measure it exactly with wait4."""
    return await asyncio.to_thread(_wait_measured, argv, name, env,
                                   subprocess.PIPE if capture else subprocess.DEVNULL)
