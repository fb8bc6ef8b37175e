"""FfmpegProcess: ffmpeg in its own process group, killed and reaped on every way out; coded failures."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from actors.adapters.ffmpeg import STDERR_TAIL_LINES, FfmpegProcess, classify_exit, parse_progress
from actors.runtime.http import serving
from messages.errors import ErrorCode, JobError

#: Seconds any single wait in these tests may take before the test fails instead of hanging.
WAIT = 20.0

FFMPEG = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-nostats", "-progress", "pipe:2"]


def sine_mp3(seconds: float, *, extra: tuple[str, ...] = ()) -> list[str]:
    """ffmpeg argv: a sine tone of ``seconds`` as CBR mp3 on stdout."""
    return [*FFMPEG, "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
            *extra, "-c:a", "libmp3lame", "-b:a", "128k", "-f", "mp3", "pipe:1"]


def endless_video() -> list[str]:
    """ffmpeg argv: raw video on stdout that never ends."""
    return [*FFMPEG, "-re", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
            "-f", "rawvideo", "-pix_fmt", "yuv420p", "pipe:1"]


def group_gone(pgid: int) -> bool:
    """True when no process (not even a zombie) is left in the process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def drain(reader: asyncio.StreamReader) -> int:
    """Read a stream to EOF; the byte count."""
    total = 0
    while chunk := await reader.read(1 << 20):
        total += len(chunk)
    return total


@pytest.fixture
async def http_404() -> AsyncIterator[str]:
    """A loopback HTTP server answering 404 to everything; its base URL."""

    async def not_found(_request: web.Request) -> web.Response:
        return web.Response(status=404, text="gone")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", not_found)
    async with serving(app) as port:
        yield f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------------------------ pure core


def test_progress_block_gives_output_seconds():
    block = ["total_size=102027", "out_time_us=6348821", "out_time=00:00:06.348821", "progress=end"]
    assert parse_progress(block) == pytest.approx(6.348821)
    assert parse_progress(["out_time=N/A", "progress=continue"]) is None


def test_classify_clean_exit_is_no_error():
    assert classify_exit(0, ["some warning"], size=10, max_bytes=100) is None


def test_classify_output_reaching_the_size_cap_is_too_large_even_with_status_zero():
    error = classify_exit(0, [], size=100, max_bytes=100)
    assert error is not None and error.code is ErrorCode.TOO_LARGE


def test_classify_http_errors_reading_the_input_are_media_unavailable():
    for line in ("http://x/a.mp3: Server returned 404 Not Found",
                 "[https @ 0x1] HTTP error 403 Forbidden",
                 "[tcp @ 0x1] Connection to tcp://127.0.0.1:9 failed: Connection refused"):
        error = classify_exit(1, [line])
        assert error is not None and error.code is ErrorCode.MEDIA_UNAVAILABLE, line


def test_classify_other_failures_are_conversion_failed_with_the_stderr_tail():
    error = classify_exit(1, ["Invalid data found when processing input"])
    assert error is not None and error.code is ErrorCode.CONVERSION_FAILED
    assert "Invalid data found" in error.detail


def test_classify_a_failed_feeder_is_media_unavailable_even_when_ffmpeg_exits_cleanly():
    error = classify_exit(0, [], feeder_failed=True, feeder_tail=["ERROR: unable to download video data"])
    assert error is not None and error.code is ErrorCode.MEDIA_UNAVAILABLE


# ------------------------------------------------------------------------------- real processes


async def test_ffmpeg_output_is_read_from_stdout_and_progress_is_reported():
    seen: list[float] = []
    async with FfmpegProcess(sine_mp3(3), on_progress=seen.append) as ff:
        size = await asyncio.wait_for(drain(ff.stdout), WAIT)
        await ff.check(size=size)
        pgid = ff.pgid
    assert size > 40_000  # 3 s of 128 kbit/s
    assert seen and seen[-1] == pytest.approx(3.0, abs=0.2)
    assert seen == sorted(seen)
    assert group_gone(pgid)


async def test_ffmpeg_runs_in_its_own_process_group():
    async with FfmpegProcess(endless_video()) as ff:
        assert os.getpgid(ff.pid) == ff.pid == ff.pgid
        assert os.getpgid(ff.pid) != os.getpgid(0)
        await ff.stdout.readexactly(1000)


async def test_leaving_the_block_kills_and_reaps_the_whole_group():
    async with FfmpegProcess(endless_video()) as ff:
        await ff.stdout.readexactly(1000)
        pid = ff.pid
    assert group_gone(pid)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_cancelling_the_reader_kills_ffmpeg_and_leaves_no_zombie():
    started = asyncio.Event()
    pgid = 0

    async def run() -> None:
        nonlocal pgid
        async with FfmpegProcess(endless_video()) as ff:
            pgid = ff.pgid
            await ff.stdout.readexactly(1000)
            started.set()
            await drain(ff.stdout)

    task = asyncio.create_task(run())
    await asyncio.wait_for(started.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert group_gone(pgid)


async def test_sigterm_ignoring_child_is_killed_after_the_grace():
    ignore_term = [sys.executable, "-c",
                   "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(600)"]
    async with FfmpegProcess(ignore_term, kill_grace=0.2) as proc:
        assert await asyncio.wait_for(proc.stdout.readline(), WAIT) == b"ready\n"
        pgid = proc.pgid
    assert group_gone(pgid)


async def test_feeder_pipes_into_ffmpeg_in_a_process_group_of_its_own():
    feeder = sine_mp3(2)  # plays yt-dlp -o -: a process writing media to its stdout
    converter = [*FFMPEG, "-f", "mp3", "-i", "pipe:0", "-c:a", "pcm_s16le", "-f", "wav", "pipe:1"]
    async with FfmpegProcess(converter, feeder_argv=feeder) as ff:
        assert ff.feeder_pid is not None
        assert os.getpgid(ff.feeder_pid) == ff.feeder_pid != os.getpgid(0)
        size = await asyncio.wait_for(drain(ff.stdout), WAIT)
        await ff.check(size=size)
    assert size > 2 * 44_100 * 2  # ~2 s of 16-bit PCM (mono sine, 44.1 kHz)
    assert group_gone(ff.pgid)
    assert group_gone(ff.feeder_pid)


async def test_cancellation_kills_the_feeder_too():
    feeder = [*FFMPEG, "-re", "-f", "lavfi", "-i", "sine=frequency=440", "-f", "s16le", "pipe:1"]
    converter = [*FFMPEG, "-f", "s16le", "-ar", "44100", "-ac", "1", "-i", "pipe:0", "-f", "s16le", "pipe:1"]
    async with FfmpegProcess(converter, feeder_argv=feeder) as ff:
        await asyncio.wait_for(ff.stdout.readexactly(1000), WAIT)
        feeder_pid = ff.feeder_pid
        assert feeder_pid is not None
    assert group_gone(ff.pgid)
    assert group_gone(feeder_pid)
    with pytest.raises(ProcessLookupError):
        os.kill(feeder_pid, 0)


async def test_a_failing_feeder_fails_the_output_as_media_unavailable():
    feeder = [sys.executable, "-c", "import sys; sys.stderr.write('ERROR: HTTP Error 403: Forbidden\\n'); "
              "sys.exit(1)"]
    converter = [*FFMPEG, "-f", "s16le", "-ar", "44100", "-ac", "1", "-i", "pipe:0", "-f", "s16le", "pipe:1"]
    async with FfmpegProcess(converter, feeder_argv=feeder) as ff:
        size = await asyncio.wait_for(drain(ff.stdout), WAIT)
        with pytest.raises(JobError) as failure:
            await ff.check(size=size)
    assert failure.value.code is ErrorCode.MEDIA_UNAVAILABLE


async def test_nonzero_exit_is_conversion_failed_with_the_stderr_tail():
    argv = [*FFMPEG, "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "no_such_codec", "-f", "mp3", "pipe:1"]
    async with FfmpegProcess(argv) as ff:
        await asyncio.wait_for(drain(ff.stdout), WAIT)
        with pytest.raises(JobError) as failure:
            await ff.check()
    assert failure.value.code is ErrorCode.CONVERSION_FAILED
    assert "no_such_codec" in failure.value.detail


async def test_input_answering_404_is_media_unavailable(http_404: str):
    argv = [*FFMPEG, "-i", f"{http_404}/missing.mp3", "-f", "mp3", "pipe:1"]
    async with FfmpegProcess(argv) as ff:
        await asyncio.wait_for(drain(ff.stdout), WAIT)
        with pytest.raises(JobError) as failure:
            await ff.check()
    assert failure.value.code is ErrorCode.MEDIA_UNAVAILABLE
    assert "404" in failure.value.detail


async def test_output_cut_by_fs_is_too_large_not_a_silently_truncated_file():
    limit = 50_000
    async with FfmpegProcess(sine_mp3(30, extra=("-fs", str(limit))), max_bytes=limit) as ff:
        size = await asyncio.wait_for(drain(ff.stdout), WAIT)
        assert await ff.wait() == 0  # ffmpeg itself calls a -fs cut a success
        with pytest.raises(JobError) as failure:
            await ff.check(size=size)
    assert failure.value.code is ErrorCode.TOO_LARGE


async def test_time_limit_kills_ffmpeg_and_raises_timeout():
    pgid = 0
    with pytest.raises(JobError) as failure:
        async with FfmpegProcess(endless_video(), time_limit=0.5) as ff:
            pgid = ff.pgid
            await drain(ff.stdout)
    assert failure.value.code is ErrorCode.TIMEOUT
    assert group_gone(pgid)


async def test_stderr_tail_is_bounded_and_keeps_the_last_lines():
    noisy = [sys.executable, "-c",
             "import sys\nfor i in range(5000): sys.stderr.write(f'line {i}\\n')\nsys.exit(3)"]
    async with FfmpegProcess(noisy) as proc:
        assert await asyncio.wait_for(proc.wait(), WAIT) == 3
        tail = proc.stderr_tail
    assert len(tail) == STDERR_TAIL_LINES
    assert tail[-1] == "line 4999"


async def test_signal_death_is_reported_as_conversion_failed():
    async with FfmpegProcess(endless_video()) as ff:
        await ff.stdout.readexactly(1000)
        os.kill(ff.pid, signal.SIGSEGV)
        with pytest.raises(JobError) as failure:
            await asyncio.wait_for(ff.check(), WAIT)
    assert failure.value.code is ErrorCode.CONVERSION_FAILED
    assert "signal" in failure.value.detail


async def test_ffmpeg_dies_with_an_actor_killed_by_sigkill(tmp_path):
    from tests.support.processes import ROOT, until

    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.ffmpeg_holder", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        start_new_session=True)
    ffmpeg_pid = int((await asyncio.wait_for(holder.stdout.readline(), 30)).strip())
    assert _alive(ffmpeg_pid)
    holder.send_signal(signal.SIGKILL)
    await holder.wait()
    await until(lambda: not _alive(ffmpeg_pid), timeout=10, what="ffmpeg to die with its parent")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_failed_start_leaks_no_file_descriptor():
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        async with FfmpegProcess(["/nonexistent/ffmpeg", "-version"]):
            pass
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_child_gets_the_memory_limit_as_its_address_space_cap():
    import resource
    import subprocess

    from actors.adapters.ffmpeg import child_preexec

    limit = 512 * 1024 * 1024
    probe = "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"
    capped = subprocess.run([sys.executable, "-c", probe], preexec_fn=child_preexec(memory_limit=limit),
                            capture_output=True, text=True, check=True, timeout=30)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    assert int(capped.stdout) == (limit if hard == resource.RLIM_INFINITY else min(limit, hard))
    # and a child that asks for more than its cap fails its allocation instead of growing
    greedy = subprocess.run([sys.executable, "-c", "bytearray(1024 * 1024 * 1024)"],
                            preexec_fn=child_preexec(memory_limit=limit), capture_output=True, text=True, timeout=30)
    assert greedy.returncode != 0 and "MemoryError" in greedy.stderr
