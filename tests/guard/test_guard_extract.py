"""Extraction that can be stopped: a page that drips or weighs 200 MB costs only its own job.

Loopback only. The converter runs with a short job time limit; the hostile pages are served by a
small aiohttp app on 127.0.0.1 (allow-listed by the test configuration).
"""

from __future__ import annotations

import asyncio
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from actors.guard import extract
from messages.errors import ErrorCode, JobError
from tests.actors import test_converter
from tests.actors.test_converter import MakeConverter, request
from tests.fixtures.media import MediaServer

#: the converter tests' fixture: started Converters with the test settings, torn down after
make_converter = test_converter.make_converter
#: the job time limit of these tests, seconds
SHORT_LIMIT = 4.0
#: size of the huge page
HUGE_PAGE_BYTES = 200 * 1024 * 1024


class HostilePages:
    """``/drip.html`` sends one byte a second forever; ``/huge.html`` sends 200 MB of HTML fast."""

    def __init__(self) -> None:
        self.drip_started = asyncio.Event()
        self.base = ""

    async def drip(self, http_request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        await response.prepare(http_request)
        self.drip_started.set()
        while True:  # until the guard closes the connection
            await response.write(b"<")
            await asyncio.sleep(1.0)  # the attack's pace, not synchronisation

    async def huge(self, http_request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/html",
                                               "Content-Length": str(HUGE_PAGE_BYTES)})
        await response.prepare(http_request)
        chunk = b"<p>" + b"a" * (1024 * 1024 - 3)
        for _ in range(HUGE_PAGE_BYTES // len(chunk)):
            await response.write(chunk)
        return response


@pytest.fixture
async def pages() -> AsyncIterator[HostilePages]:
    hostile = HostilePages()
    app = web.Application()
    app.router.add_get("/drip.html", hostile.drip)
    app.router.add_get("/huge.html", hostile.huge)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    hostile.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield hostile
    finally:
        await runner.cleanup()


def child_pids(parent: int | None = None) -> set[int]:
    """Running (or unreaped) children of ``parent`` (this process by default)."""
    me = str(parent or os.getpid())
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if stat.rpartition(")")[2].split()[1] == me:
                found.add(int(entry.name))
    return found


def process_exists(pid: int) -> bool:
    """True while ``pid`` runs or waits to be reaped (a zombie still has its /proc entry)."""
    return os.path.exists(f"/proc/{pid}")


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def ours(threads: list[threading.Thread]) -> set[str]:
    """Thread names, without the event loop's own: its resolver pool (getaddrinfo) and its child
    watchers (one ``asyncio-waitpid-N`` per live child, counted against the children instead)."""
    return {t.name for t in threads if not t.name.startswith(("asyncio_", "asyncio-waitpid"))}


def child_watchers() -> int:
    """Threads waiting for a child process to exit."""
    return sum(t.name.startswith("asyncio-waitpid") for t in threading.enumerate())


async def test_a_dripping_page_fails_at_its_limit_while_the_next_job_completes_and_leaves_nothing(
    make_converter: MakeConverter, pages: HostilePages, media_server: MediaServer
) -> None:
    converter = await make_converter(job_time_limit=SHORT_LIMIT, prefetch=2)
    threads_before = ours(threading.enumerate())
    dripping = asyncio.create_task(converter.plan_for(request(f"{pages.base}/drip.html")))
    await asyncio.wait_for(pages.drip_started.wait(), 30)
    [drip_worker] = converter.pool.pids  # the one warm worker is busy with the page
    plan = await asyncio.wait_for(converter.plan_for(request(media_server.url("audio.mp3"))), 30)
    assert plan.inputs[0].url == media_server.url("audio.mp3")
    assert not dripping.done()  # the normal job did not wait for the dripping one's limit
    with pytest.raises(JobError) as caught:
        await asyncio.wait_for(dripping, SHORT_LIMIT + 30)
    assert caught.value.code is ErrorCode.TIMEOUT
    # no thread, no process of the stopped job: its worker is killed and reaped (by the zygote's kernel
    # auto-reap: its /proc entry is gone), and what is left are the zygote's warm workers only
    assert drip_worker not in converter.pool.pids and not process_exists(drip_worker)
    assert child_pids() <= {converter.pool.zygote_pid} | set(converter.probes.pids)
    assert child_pids(converter.pool.zygote_pid) == set(converter.pool.pids)
    assert ours(threading.enumerate()) == threads_before
    assert child_watchers() <= len(child_pids())


async def test_a_burst_of_quick_extractions_queues_for_the_warm_worker_instead_of_starting_more(
    make_converter: MakeConverter, media_server: MediaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(extract, "GROW_AFTER_S", 60.0)  # longer than any job of the burst waits
    converter = await make_converter(prefetch=4)
    url = media_server.url("audio.mp3")
    plans = await asyncio.wait_for(asyncio.gather(*(converter.plan_for(request(url)) for _ in range(6))), 50)
    assert [plan.inputs[0].url for plan in plans] == [url] * 6
    assert len(converter.pool.pids) == 1  # one warm worker served all six; none paid a start


async def test_a_job_waiting_behind_a_slow_page_gets_a_worker_of_its_own(
    make_converter: MakeConverter, pages: HostilePages, media_server: MediaServer
) -> None:
    converter = await make_converter(job_time_limit=SHORT_LIMIT, prefetch=2)
    dripping = asyncio.create_task(converter.plan_for(request(f"{pages.base}/drip.html")))
    await asyncio.wait_for(pages.drip_started.wait(), 30)
    plan = await asyncio.wait_for(converter.plan_for(request(media_server.url("audio.mp3"))), 30)
    assert plan.inputs[0].url == media_server.url("audio.mp3")
    assert not dripping.done() and len(converter.pool.pids) == 2  # the pool grew for the waiting job
    with pytest.raises(JobError):
        await asyncio.wait_for(dripping, SHORT_LIMIT + 30)


async def test_a_worker_that_cannot_start_fails_the_job_that_asked_for_it_at_once(
    pages: HostilePages, media_server: MediaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from actors.guard import FetchGuard

    async with extract.ExtractorPool(
            size=2, network_timeout=30.0, max_bytes=10**8,
            make_guard=lambda: FetchGuard(allow=("127.0.0.1/32",), idle_timeout=30.0)) as pool:
        loop = asyncio.get_running_loop()
        dripping = asyncio.create_task(pool.extract(f"{pages.base}/drip.html", deadline=loop.time() + 60))
        await asyncio.wait_for(pages.drip_started.wait(), 30)  # the one warm worker is busy

        async def cannot_start() -> None:
            raise RuntimeError("extraction worker did not start (fork: ENOMEM)")

        monkeypatch.setattr(pool, "_start", cannot_start)
        with pytest.raises(RuntimeError, match="did not start"):  # not a timeout a minute later
            await pool.extract(media_server.url("audio.mp3"), deadline=loop.time() + 60)
        assert pool._growing == 0
        dripping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dripping


async def test_a_200_mb_page_fails_with_a_code_and_memory_stays_bounded(
    make_converter: MakeConverter, pages: HostilePages, capsys: pytest.CaptureFixture[str]
) -> None:
    converter = await make_converter(job_time_limit=60.0)
    [worker] = converter.pool.pids
    before_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with pytest.raises(JobError) as caught:
        await converter.plan_for(request(f"{pages.base}/huge.html"))
    assert caught.value.code is ErrorCode.TOO_LARGE
    converter_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mib = peak_rss_mib(worker)
    with capsys.disabled():
        print(f"\n[guard] 200 MB page: converter peak RSS {before_mib:.0f} → {converter_mib:.0f} MiB, "
              f"extraction worker peak RSS {worker_mib:.0f} MiB")
    # the page budget (16 MiB) stops the read long before 200 MB reach either process
    assert converter_mib - before_mib < 100
    assert worker_mib < 300


# --- the zygote the workers are forked from


def _pool(size: int = 2) -> extract.ExtractorPool:
    from actors.guard import FetchGuard

    return extract.ExtractorPool(size=size, network_timeout=30.0, max_bytes=10**8,
                                 make_guard=lambda: FetchGuard(allow=("127.0.0.1/32",), idle_timeout=30.0))


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait on each process's pidfd until it ends (at most ``timeout`` in all); the ones still running."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue  # already gone
    try:
        left = dict(fds)
        end = time.monotonic() + timeout
        while left and time.monotonic() < end:
            ready, _, _ = select.select(list(left), [], [], max(0.0, end - time.monotonic()))
            for fd in ready:
                left.pop(fd)
        return sorted(left.values())
    finally:
        for fd in fds:
            os.close(fd)


async def test_workers_are_forks_of_a_zygote_that_loads_no_aiohttp_and_a_new_one_is_a_fork(
        media_server: MediaServer) -> None:
    async with _pool() as pool:
        zygote = pool.zygote_pid
        [first] = pool.pids
        assert child_pids(zygote) == {first}
        # the zygote (and so every worker) never loaded aiohttp's parser: the guard's side stays in the pool
        assert "aiohttp" not in _maps(zygote) and "aiohttp" not in _maps(first)
        loop = asyncio.get_running_loop()
        answer = await pool.extract(media_server.url("audio.mp3"), deadline=loop.time() + 30)
        assert answer.error is None and answer.info is not None
        second = await pool._start()  # what growing or replacing does
        try:
            assert pool.zygote_pid == zygote and child_pids(zygote) == {first, second.pid}
            assert second.pid not in child_pids()  # not this process's child: the zygote's fork
        finally:
            pool._all.discard(second)
            await second.kill()
        assert not process_exists(second.pid) and child_pids(zygote) == {first}


async def test_a_dead_zygote_is_started_again_and_the_next_job_gets_a_live_worker(media_server: MediaServer) -> None:
    async with _pool() as pool:
        zygote, [worker] = pool.zygote_pid, pool.pids
        os.killpg(zygote, signal.SIGKILL)  # a process group this test's pool started
        assert _wait_gone([zygote, worker], 30) == []  # its worker died with it (PDEATHSIG)
        loop = asyncio.get_running_loop()
        answer = await pool.extract(media_server.url("audio.mp3"), deadline=loop.time() + 60)
        assert answer.error is None and answer.info is not None
        assert pool.zygote_pid not in (None, zygote) and worker not in pool.pids
        assert child_pids(pool.zygote_pid) == set(pool.pids)


def test_a_killed_pool_owner_leaves_no_zygote_and_no_worker() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c",
         "import asyncio, sys\n"
         "from tests.guard.test_guard_extract import _pool\n"
         "async def main():\n"
         "    async with _pool() as pool:\n"
         "        await pool._start()\n"
         "        print(pool.zygote_pid, *pool.pids, flush=True)\n"
         "        sys.stdin.readline()\n"
         "asyncio.run(main())\n"],
        cwd=Path(__file__).resolve().parents[2], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        pids = [int(pid) for pid in owner.stdout.readline().split()]
        assert len(pids) == 3, pids  # the zygote and two workers
        owner.send_signal(signal.SIGKILL)  # no cleanup runs: only the kernel's death signals
        owner.wait(timeout=30)
        assert _wait_gone(pids, 30) == []
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
