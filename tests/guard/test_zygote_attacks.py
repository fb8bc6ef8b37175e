"""Attack tests for the extraction zygote and pool (actors/guard/extract.py).

Loopback only. A test-only yt-dlp plugin (written into tmp_path and loaded through the operator's
plugin lever, so it is imported in the zygote and so in every worker) plays the hostile page /
unlucky extractor: it reports the worker's state, mutates process-global yt-dlp state, starts a
long-lived child as yt-dlp starts Deno, dies on its own, blocks on a FIFO the test controls, or
answers a huge info dict. It also carries one fault injection: while a named file exists, the
zygote's os.fork fails with EAGAIN (what a pids cgroup limit or RLIMIT_NPROC gives).

Every process a test causes is stopped by its pid (recorded through a FIFO) or dies with the
test's pool; nothing is killed by name. Synchronisation is by FIFOs, pidfds and events, never sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.guard import extract
from actors.guard.children import INHERITED, INHERITED_PREFIXES
from tests.guard.test_guard_extract import _wait_gone, child_pids

PLUGIN = r'''
import gc, json, os, random, select, signal, subprocess, sys, threading
from yt_dlp.extractor.common import InfoExtractor
from yt_dlp.utils import Popen
from yt_dlp.utils.networking import std_headers

FAULT = {fault!r}
_real_fork = os.fork


def _fork():
    if os.path.exists(FAULT):  # the fault injection: fork fails as under a pids limit
        raise BlockingIOError(11, "Resource temporarily unavailable")
    return _real_fork()


os.fork = _fork

_YDL = sys.modules["yt_dlp.YoutubeDL"].YoutubeDL
_real_init = _YDL.__init__


def _init(self, *args, **kwargs):  # a worker that dies between its pid record and READY
    if os.path.exists(FAULT + ".init"):
        os.kill(os.getpid(), signal.SIGKILL)
    _real_init(self, *args, **kwargs)


_YDL.__init__ = _init


def _fds():
    found = {{}}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[name] = os.readlink(f"/proc/self/fd/{{name}}")
        except OSError:
            pass
    return found


def _sigign():
    for line in open("/proc/self/status"):
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    return 0


class GgtAttackIE(InfoExtractor):
    _VALID_URL = r"http://127\.0\.0\.1:\d+/ggt-attack/(?P<id>\w+)"

    def _real_extract(self, url):
        cmd = self._match_id(url)
        arg = url.partition("?")[2]
        data = {{}}
        if cmd == "state":
            done = subprocess.run(["ffmpeg", "-version"], capture_output=True)  # a wait, as yt-dlp does
            data = {{"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
                    "sigchld_ignored": bool(_sigign() & (1 << (signal.SIGCHLD - 1))),
                    "ffmpeg_rc": done.returncode, "fds": _fds(), "env": sorted(os.environ),
                    "random": random.random(), "hash": hash("ggt-attack"), "threads": threading.active_count(),
                    "mark": std_headers.get("X-Ggt-Mark"),
                    "cookies": sorted(c.name for c in self._downloader.cookiejar),
                    "aiohttp": "aiohttp" in sys.modules}}
        elif cmd == "mark":  # what a yt-dlp extractor does with its class-level _HEADERS/_TOKEN caches
            std_headers["X-Ggt-Mark"] = arg
            self._set_cookie("127.0.0.1", "ggt_site_cookie", arg)
        elif cmd == "wait":  # blocks until the test writes a line into the FIFO ``arg``
            with open(arg, "rb") as fifo:
                fifo.readline()
        elif cmd in ("child", "childdie"):  # a long-lived child, as yt-dlp runs Deno
            child = Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
            with open(arg, "w") as fifo:
                fifo.write(f"{{os.getpid()}} {{child.pid}}\n")
            if cmd == "childdie":  # the worker dies on its own (the OOM killer, a crash in a C extension)
                os.kill(os.getpid(), signal.SIGKILL)
            select.select([], [], [])  # a page that never ends
        elif cmd == "big":
            data = {{"big": "x" * int(arg)}}
        return {{"id": cmd, "title": "ggt attack", "url": "http://127.0.0.1:9/a.mp3", "ext": "mp3",
                "vcodec": "none", "description": json.dumps(data)}}
'''

def _proc_file(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


def _set(fault: Path, *, on: bool) -> None:
    """Switch a fault file of the plugin on or off."""
    if on:
        fault.touch()
    else:
        fault.unlink()


#: the dead port the plugin's URLs name (the plugin never fetches)
BASE = "http://127.0.0.1:9/ggt-attack"


class Harness:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.fault = root / "fork-fails"
        plugins = root / "plugins"
        module = plugins / "ggt_attack_pkg" / "yt_dlp_plugins" / "extractor" / "ggt_attack.py"
        module.parent.mkdir(parents=True)
        module.write_text(PLUGIN.format(fault=str(self.fault)))
        self.plugin_dir = str(plugins)
        self._fifos = 0

    def fifo(self) -> str:
        self._fifos += 1
        path = self.root / f"fifo{self._fifos}"
        os.mkfifo(path)
        return str(path)

    def pool(self, *, size: int = 2, warm: int = 1, environ: dict[str, str] | None = None) -> extract.ExtractorPool:
        from actors.guard import FetchGuard

        return extract.ExtractorPool(
            size=size, warm=warm, network_timeout=30.0, max_bytes=10**8, environ=environ,
            levers=extract.WorkerLevers(plugin_dir=self.plugin_dir),
            make_guard=lambda: FetchGuard(allow=("127.0.0.1/32",), idle_timeout=30.0))


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


class Stray:
    """Processes a test caused (the plugin's ``sleep`` children), held by pidfd from the moment they
    are named (they are alive then), and SIGKILLed through it at the end: never a reused pid."""

    def __init__(self) -> None:
        self.pidfds: list[int] = []

    def add(self, pid: int) -> None:
        self.pidfds.append(os.pidfd_open(pid))

    def close(self) -> None:
        for fd in self.pidfds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)


@pytest.fixture
def stray() -> Iterator[Stray]:
    held = Stray()
    yield held
    held.close()


def deadline(seconds: float = 60.0) -> float:
    return asyncio.get_running_loop().time() + seconds


def state(answer: extract.ExtractAnswer) -> dict[str, Any]:
    assert answer.error is None, answer.error
    assert answer.info is not None
    return json.loads(answer.info["description"])


async def read_fifo_line(path: str) -> str:
    def read() -> str:
        with open(path) as fifo:
            return fifo.readline()

    return await asyncio.to_thread(read)


async def open_fifo_writer(path: str) -> int:
    """The write end of FIFO ``path``: returns once the worker opened it for reading (it is in the plugin)."""
    return await asyncio.to_thread(os.open, path, os.O_WRONLY)


def own_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- what held (or is documented here): the zygote and a fresh worker are pristine


async def test_a_worker_is_a_pristine_fork_with_the_allow_listed_environment_and_minimal_fds(
        harness: Harness) -> None:
    secrets = {"PATH": os.environ["PATH"], "HOME": "/root", "LANG": "C.UTF-8",
               "GGT_S3_SECRET_KEY": "s3cr3t", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "GGT_BUS_KEY": "k3y",
               "GGT_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/", "http_proxy": "http://127.0.0.1:1",
               "NO_PROXY": "*", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    async with harness.pool(size=2, environ=secrets) as pool:
        zygote = pool.zygote_pid
        assert zygote is not None
        zygote_env = _proc_file(zygote, "environ")
        assert b"s3cr3t" not in zygote_env and b"k3y" not in zygote_env and b"guest" not in zygote_env
        assert b"s3cr3t" not in _proc_file(zygote, "cmdline")
        first = state(await pool.extract(f"{BASE}/state", deadline=deadline()))
        assert set(first["env"]) <= INHERITED | {n for n in first["env"] if n.startswith(INHERITED_PREFIXES)}
        # a worker holds stdin/stdout/stderr, its conversation socket and nothing else (no control socket,
        # no other worker's socket, no file of the warm-up); ffmpeg's -version wait works (SIGCHLD is SIG_DFL)
        assert not first["sigchld_ignored"] and first["ffmpeg_rc"] == 0
        extra = {fd: target for fd, target in first["fds"].items() if int(fd) > 2}
        assert len([t for t in extra.values() if t.startswith("socket:")]) == 1, extra
        assert first["pgid"] == first["pid"] == first["sid"] and first["ppid"] == zygote
        assert first["threads"] == 1 and not first["aiohttp"]
        # the zygote ignores SIGCHLD (its children are reaped by the kernel) and runs one thread
        status = _proc_file(zygote, "status").decode()
        sigign = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        assert sigign & (1 << (signal.SIGCHLD - 1))
        assert "Threads:\t1" in status
        # a second worker: another fork, reseeded random (os.register_at_fork) -- but the same str hash
        # seed as every other worker and the zygote (informational: PYTHONHASHSEED is per exec)
        pool._idle.put_nowait(await pool._start())
        busy = await open_and_block(pool, harness)  # occupy the first worker so the second answers
        try:
            second = state(await pool.extract(f"{BASE}/state", deadline=deadline()))
        finally:
            await busy.release()
        assert second["pid"] != first["pid"]
        assert second["random"] != first["random"]
        assert second["hash"] == first["hash"]


class Blocked:
    def __init__(self, task: asyncio.Task[extract.ExtractAnswer], fd: int) -> None:
        self.task, self.fd = task, fd

    async def release(self) -> extract.ExtractAnswer:
        with contextlib.suppress(BrokenPipeError):
            os.write(self.fd, b"go\n")
        os.close(self.fd)
        return await self.task


async def open_and_block(pool: extract.ExtractorPool, harness: Harness, seconds: float = 60.0) -> Blocked:
    """A job that sits in its worker until released (the worker is busy meanwhile)."""
    fifo = harness.fifo()
    task = asyncio.create_task(pool.extract(f"{BASE}/wait?{fifo}", deadline=deadline(seconds)))
    fd = await open_fifo_writer(fifo)
    return Blocked(task, fd)


async def test_a_jobs_site_cookies_do_not_reach_the_next_job_and_a_fresh_fork_starts_clean(
        harness: Harness) -> None:
    """Cookies are cleared per job. Process-global yt-dlp state a job's extractor set (a class-level
    token or _HEADERS cache, std_headers) does reach later jobs of the same worker, as it did before
    the zygote (docs/SECURITY.md, known limits); a fresh fork of the zygote starts without it."""
    async with harness.pool(size=1) as pool:
        await pool.extract(f"{BASE}/mark?job-A-secret", deadline=deadline())
        later = state(await pool.extract(f"{BASE}/state", deadline=deadline()))
        assert later["cookies"] == []  # the site's cookie of job A is gone
        # replace the worker (a deadline kill) and ask a fresh fork
        with pytest.raises(TimeoutError):
            fifo = harness.fifo()
            await pool.extract(f"{BASE}/wait?{fifo}", deadline=deadline(0.5))
        fresh = state(await pool.extract(f"{BASE}/state", deadline=deadline()))
        assert fresh["pid"] != later["pid"] and fresh["mark"] is None  # the zygote stayed pristine


# --- orphans: the worker's children (Deno) when the worker is killed, dies alone, or the pool owner dies


async def start_child_job(pool: extract.ExtractorPool, harness: Harness, cmd: str, stray: Stray,
                          seconds: float = 60.0) -> tuple[asyncio.Task[extract.ExtractAnswer], int, int]:
    fifo = harness.fifo()
    task = asyncio.create_task(pool.extract(f"{BASE}/{cmd}?{fifo}", deadline=deadline(seconds)))
    worker, child = map(int, (await read_fifo_line(fifo)).split())
    stray.add(child)
    return task, worker, child


async def test_a_killed_worker_takes_its_deno_like_child_with_it(harness: Harness, stray: Stray) -> None:
    """Held: at the deadline the worker's group is killed, its child too, and nothing is left unreaped."""
    async with harness.pool(size=1) as pool:
        task, worker, child = await start_child_job(pool, harness, "child", stray, seconds=3.0)
        status = _proc_file(child, "status").decode()
        sigign = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        assert not sigign & (1 << (signal.SIGCHLD - 1))  # the worker's children see SIGCHLD at its default
        with pytest.raises(TimeoutError):
            await task
        assert _wait_gone([worker, child], 10) == []
        assert child_pids(pool.zygote_pid) == set(pool.pids)


async def test_a_worker_that_dies_on_its_own_leaves_its_child_running(harness: Harness, stray: Stray) -> None:
    """The worker SIGKILLed by something else (OOM killer, a crash) while yt-dlp's Deno runs: the pool
    sees its pidfd readable, so ``_Process.kill`` skips ``killpg`` -- and the child in its group lives on."""
    async with harness.pool(size=1) as pool:
        task, worker, child = await start_child_job(pool, harness, "childdie", stray)
        with pytest.raises(ConnectionError):
            await task
        assert _wait_gone([worker], 10) == []
        assert os.getpgid(child) == worker  # still in the dead worker's process group, reparented away
        assert _wait_gone([child], 2) == [], "the dead worker's child was never killed (orphan)"


def test_a_sigkilled_pool_owner_leaves_the_workers_child_running(harness: Harness, stray: Stray) -> None:
    """The converter SIGKILLed mid-extraction: zygote and worker die by PDEATHSIG, the worker's child does not."""
    fifo = harness.fifo()
    owner = subprocess.Popen(
        [sys.executable, "-c",
         "import asyncio, sys\n"
         "from pathlib import Path\n"
         "from tests.guard.test_zygote_attacks import Harness, BASE, deadline\n"
         "async def main():\n"
         f"    harness = Harness.__new__(Harness); harness.plugin_dir = {harness.plugin_dir!r}\n"
         "    async with harness.pool(size=1) as pool:\n"
         "        print(pool.zygote_pid, flush=True)\n"
         f"        await pool.extract(f'{{BASE}}/child?{fifo}', deadline=deadline(600))\n"
         "asyncio.run(main())\n"],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        zygote = int(owner.stdout.readline())
        with open(fifo) as line:
            worker, child = map(int, line.readline().split())
        stray.add(child)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
        assert _wait_gone([zygote, worker], 30) == []  # held: PDEATHSIG
        assert _wait_gone([child], 2) == [], "the worker's child outlived the converter, zygote and worker"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


# --- select() on a pidfd: FD_SETSIZE


@contextlib.contextmanager
def fds_above(limit: int) -> Iterator[None]:
    """Fill this process's descriptor table so every new descriptor is numbered above ``limit``
    (a converter or uploader with many connections open: the guard's, ffmpeg's pipes, S3's, the bus)."""
    null = os.open(os.devnull, os.O_RDONLY)
    held = [null]
    try:
        while True:
            fd = os.dup(null)
            if fd > limit:
                os.close(fd)
                break
            held.append(fd)
        yield
    finally:
        for fd in held:
            os.close(fd)


async def test_a_pool_whose_pidfds_are_numbered_above_1023_still_serves_jobs(harness: Harness) -> None:
    """``_Process.ended`` is ``select.select([pidfd], ...)``: ValueError for a descriptor >= FD_SETSIZE
    (1024). Then every job fails at ``worker.ended`` and leaks the worker it took (not idle, not
    killed), and ``kill()`` raises before it signals anything (the worker keeps running, its guard closed)."""
    with fds_above(1100):
        async with harness.pool(size=1) as pool:
            outcomes = []
            for _ in range(2):
                try:
                    answer = await pool.extract(f"{BASE}/state", deadline=deadline(5))
                    outcomes.append("ok" if answer.error is None else answer.error.code)
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
            leaked = [w for w in pool._all if w not in pool._idle._queue]
            pids = pool.pids
            with contextlib.suppress(ValueError):  # the pool's own close trips over the same select()
                await pool.__aexit__(None, None, None)
            pool._all.clear()
        assert outcomes == ["ok", "ok"], (outcomes, f"{len(leaked)} worker(s) taken and never returned", pids)


# --- the pool's bookkeeping under cancellation


async def test_a_job_cancelled_as_a_worker_comes_free_does_not_lose_that_worker(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_first_idle`` gets from the idle queue in a task of its own; when the job is cancelled (its
    deadline, a shutdown) in the loop iteration where that get completed, ``getting.cancel()`` in
    its ``finally`` is a no-op on a finished task and the worker it got is dropped: still in
    ``_all`` (counted against ``size``), never idle again. Each such race costs the pool a worker
    for good; ``size`` of them and every later job waits out its deadline."""
    monkeypatch.setattr(extract, "GROW_AFTER_S", 0.0)
    async with harness.pool(size=2) as pool:
        busy = await open_and_block(pool, harness)  # job A holds the one worker
        hung = asyncio.Event()

        async def slow_start() -> extract._Process:  # the grown worker is not there yet (a fork takes ~45 ms)
            await hung.wait()
            raise AssertionError("not reached")

        monkeypatch.setattr(pool, "_start", slow_start)
        job_b = asyncio.create_task(pool.extract(f"{BASE}/state", deadline=deadline()))
        for _ in range(100):  # until B waits in _first_idle (its getter is queued)
            if pool._growing == 1 and pool._idle._getters:
                break
            await asyncio.sleep(0)
        assert pool._growing == 1 and pool._idle._getters
        real_put = pool._idle.put_nowait

        def put_then_cancel_b(worker: extract._Process) -> None:  # A's worker comes free as B's deadline fires
            real_put(worker)
            job_b.cancel()

        monkeypatch.setattr(pool._idle, "put_nowait", put_then_cancel_b)
        answer = await busy.release()
        assert answer.error is None
        await asyncio.wait([job_b])
        assert job_b.cancelled()
        monkeypatch.setattr(pool._idle, "put_nowait", real_put)
        for task in list(pool._replacing):
            task.cancel()
        await asyncio.wait(list(pool._replacing) or [asyncio.sleep(0)])
        assert len(pool._all) == 1
        assert pool._idle.qsize() == 1, "job A's worker was dropped: in _all, alive, never idle again"


# --- the zygote: one failed fork, a death the pool has not noticed yet


async def test_one_failed_fork_in_the_zygote_fails_only_the_start_that_asked(harness: Harness) -> None:
    """``os.fork()`` in ``zygote_main`` is unguarded: EAGAIN (a pids limit: Deno, ffmpeg and the
    probes of other jobs count against it) ends the zygote with a traceback, so every worker dies
    by PDEATHSIG -- including the busy ones, whose jobs fail mid-page -- and the next start pays a
    new zygote (~0.9 s of CPU)."""
    async with harness.pool(size=2) as pool:
        zygote = pool.zygote_pid
        busy = await open_and_block(pool, harness)  # job A runs in the warm worker
        harness.fault.touch()
        try:
            with pytest.raises(RuntimeError, match="did not start"):
                await pool._start()  # what growing for job B does
        finally:
            harness.fault.unlink()
        [warm_worker] = [w.pid for w in pool._all]
        try:  # the zygote serves requests in order: a fork that works now proves it survived
            pool._idle.put_nowait(await pool._start())
            zygote_survived = pool.zygote_pid == zygote
        except (RuntimeError, OSError):  # EOF on its socket, or EPIPE on the zygote's
            zygote_survived = False
            assert _wait_gone([zygote, warm_worker], 30) == []  # it is gone, and the busy worker with it
        try:
            answer = await busy.release()
            outcome = "ok" if answer.error is None else answer.error.code
        except Exception as exc:
            outcome = type(exc).__name__
        assert (zygote_survived, outcome) == (True, "ok")


async def test_a_zygote_death_not_yet_reaped_by_asyncio_does_not_fail_the_start(harness: Harness) -> None:
    """``_Zygote.alive`` is ``proc.returncode is None``, which asyncio's child watcher sets a loop
    iteration (or more) after the death. A start inside that window sends its request into a dead
    socket and fails the job with a raw BrokenPipeError (a JobError INTERNAL, retried) instead of
    restarting the zygote."""
    async with harness.pool(size=2) as pool:
        zygote, [worker] = pool.zygote_pid, pool.pids
        assert zygote is not None
        os.killpg(zygote, signal.SIGKILL)  # the process group this test's pool started
        assert _wait_gone([zygote, worker], 30) == []  # blocking: asyncio has not run its watcher callback
        started = await pool._start()
        pool._idle.put_nowait(started)


async def test_closing_the_pool_while_a_job_runs_kills_each_worker_once(harness: Harness) -> None:
    """``_Process.kill`` is not idempotent: it closes its pidfd in ``finally``. ``__aexit__`` kills
    every worker in ``_all``; a job still running in one of them then fails and kills it again --
    ``select()`` on the closed number (EBADF), or, once the number is reused by a new descriptor
    (a socket of another job), a ``pidfd_send_signal``/``os.close`` on that descriptor."""
    pool = harness.pool(size=1)
    await pool.__aenter__()
    busy = await open_and_block(pool, harness)
    number = next(iter(pool._all)).pidfd
    await pool.__aexit__(None, None, None)
    os.close(busy.fd)
    done, _ = await asyncio.wait([busy.task], timeout=10)
    assert done, f"the job never ended (its second kill waits on descriptor {number}, closed and reused)"
    error = busy.task.exception()
    assert isinstance(error, ConnectionError), repr(error)  # its worker ended; not EBADF from a second kill


# --- leaks per job, per replacement, per cancelled start


class Guards:
    """The pool's make_guard, recording every guard it made."""

    def __init__(self) -> None:
        from actors.guard import FetchGuard

        self.made: list[Any] = []
        self._cls = FetchGuard

    def __call__(self) -> Any:
        guard = self._cls(allow=("127.0.0.1/32",), idle_timeout=30.0)
        self.made.append(guard)
        return guard

    def open(self) -> list[Any]:
        return [g for g in self.made if g._server is not None and g._server.is_serving()]


def zombies_of(parent: int) -> list[int]:
    found = []
    for pid in child_pids(parent):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                found.append(pid)
    return found


async def settle(pool: extract.ExtractorPool) -> None:
    """Wait until the pool's replacements have started (or failed)."""
    while pool._replacing:
        await asyncio.wait(list(pool._replacing))


async def test_jobs_kills_replacements_and_a_dead_worker_leak_no_descriptor_process_or_guard(
        harness: Harness, stray: Stray, monkeypatch: pytest.MonkeyPatch) -> None:
    guards = Guards()
    pool = harness.pool(size=2)
    monkeypatch.setattr(pool, "_make_guard", guards)
    async with pool:
        zygote = pool.zygote_pid
        assert zygote is not None
        mine, theirs = own_fds(), fd_count(zygote)
        for _ in range(3):
            assert (await pool.extract(f"{BASE}/state", deadline=deadline())).error is None
        for _ in range(2):  # a page that never ends: killed at the deadline, replaced
            with pytest.raises(TimeoutError):
                await pool.extract(f"{BASE}/wait?{harness.fifo()}", deadline=deadline(0.3))
            await settle(pool)
        task, _worker, _child = await start_child_job(pool, harness, "childdie", stray)
        with pytest.raises(ConnectionError):
            await task
        await settle(pool)
        busy = await open_and_block(pool, harness)  # cancelled mid-page
        busy.task.cancel()
        await asyncio.wait([busy.task])
        os.close(busy.fd)
        await settle(pool)
        assert (await pool.extract(f"{BASE}/state", deadline=deadline())).error is None
        # as many descriptors as before (the replaced workers' pidfds and sockets are renumbered)
        assert len(own_fds()) - len(stray.pidfds) == len(mine)
        assert fd_count(zygote) == theirs
        assert child_pids(zygote) == set(pool.pids) and zombies_of(zygote) == []
        assert len(guards.open()) == len(pool.pids)


@pytest.mark.parametrize("where", ["waiting for the pid record", "after the fork, before READY"])
async def test_a_start_cancelled_midway_leaves_no_worker_descriptor_or_guard(
        harness: Harness, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    guards = Guards()
    pool = harness.pool(size=2)
    monkeypatch.setattr(pool, "_make_guard", guards)
    async with pool:
        zygote = pool.zygote_pid
        assert zygote is not None
        mine, before = len(own_fds()), child_pids(zygote)
        reached = asyncio.Event()
        forked: list[int] = []
        if where == "waiting for the pid record":
            real_readable = extract._readable

            async def spy(fd: int) -> None:
                reached.set()
                await real_readable(fd)

            monkeypatch.setattr(extract, "_readable", spy)
        else:
            real_fork = extract._Zygote.fork

            async def fork_spy(self: extract._Zygote, proxy: str) -> tuple[int, int, socket.socket]:
                result = await real_fork(self, proxy)
                forked.append(result[0])
                reached.set()
                return result

            monkeypatch.setattr(extract._Zygote, "fork", fork_spy)
        starting = asyncio.create_task(pool._start())
        await reached.wait()
        starting.cancel()
        await asyncio.wait([starting])
        monkeypatch.undo()
        # the zygote serves requests in order: once a later start is through, the cancelled one was forked
        probe = await pool._start()
        pool._all.discard(probe)
        await probe.kill()
        # whatever the zygote forked for it exits (EPIPE on its socket) or was killed: wait on its pidfd
        assert _wait_gone(sorted((child_pids(zygote) - before) | set(forked)), 30) == []
        assert child_pids(zygote) == before and zombies_of(zygote) == []
        assert len(own_fds()) == mine
        assert len(guards.open()) == len(pool.pids) == 1


async def test_a_worker_dying_idle_or_before_ready_costs_only_the_start_that_made_it(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held: a worker SIGKILLed while idle is passed over; one dying between its pid record and
    READY fails the start (and the job waiting for it) at once; the pool serves the next job."""
    async with harness.pool(size=3) as pool:
        [idle] = pool.pids
        os.kill(idle, signal.SIGKILL)  # a worker this test's pool started
        assert _wait_gone([idle], 30) == []
        assert (await pool.extract(f"{BASE}/state", deadline=deadline())).error is None
        assert idle not in pool.pids
        await settle(pool)
        monkeypatch.setattr(extract, "GROW_AFTER_S", 0.0)
        blocked = [await open_and_block(pool, harness) for _ in pool.pids]  # every worker busy
        assert len(pool.pids) < 3
        _set(Path(str(harness.fault) + ".init"), on=True)
        try:
            with pytest.raises(RuntimeError, match="did not start"):
                await pool.extract(f"{BASE}/state", deadline=deadline())
        finally:
            _set(Path(str(harness.fault) + ".init"), on=False)
        assert pool._growing == 0
        for busy in blocked:
            assert (await busy.release()).error is None
        assert (await pool.extract(f"{BASE}/state", deadline=deadline())).error is None
        assert child_pids(pool.zygote_pid) == set(pool.pids) and zombies_of(pool.zygote_pid) == []


async def test_a_huge_info_dict_fails_its_job_with_a_code(harness: Harness) -> None:
    """A page whose info dict serialises past MAX_ANSWER_BYTES (a 16 MiB manifest of tiny variants
    does): ``readline`` raises ValueError, which reaches the converter raw (classified INTERNAL,
    retryable: the hostile page is retried max_attempts times). Pre-existing, not new here."""
    from actors.guard.extract import extracted_info
    from messages.errors import JobError

    async with harness.pool(size=1) as pool:
        with pytest.raises(JobError):
            await extracted_info(pool, f"{BASE}/big?{extract.MAX_ANSWER_BYTES + 1024}", deadline=deadline())


async def test_a_zygote_that_stops_answering_is_replaced_and_the_start_succeeds(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zygote that is alive but does not fork (SIGSTOPped by an operator's debugger, stuck in
    fork under memory pressure): the fork's record does not come within FORK_TIMEOUT, so the zygote
    is killed and replaced, and the start that found it stuck is served by the new one."""
    monkeypatch.setattr(extract, "FORK_TIMEOUT", 0.5)
    async with harness.pool(size=3) as pool:
        zygote = pool.zygote_pid
        assert zygote is not None
        stopped = os.pidfd_open(zygote)  # held from here: the signals below reach this process only
        try:
            signal.pidfd_send_signal(stopped, signal.SIGSTOP)  # the zygote this test's pool started
            worker = await pool._start()
            pool._idle.put_nowait(worker)
            assert pool.zygote_pid not in (None, zygote)
            assert child_pids(pool.zygote_pid) == {worker.pid}
            assert _wait_gone([zygote], 30) == []  # the stuck one was killed, not left stopped
        finally:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(stopped, signal.SIGCONT)
            os.close(stopped)
