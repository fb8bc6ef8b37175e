"""ffmpeg as a child process: its own process group, stdout as a stream, progress and errors parsed.

``FfmpegProcess`` runs an ffmpeg argv (optionally fed by a second process, yt-dlp ``-o -``, whose
stdout is ffmpeg's stdin) and guarantees that on exit, failure, cancellation or timeout the whole
process group is killed and reaped. ``classify_exit`` is the pure decision that turns an exit
status and stderr into a coded JobError.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import fcntl
import logging
import os
import re
import resource
import signal
import subprocess
from collections.abc import Callable, Sequence

from actors.core.stages import parse_progress_block
from actors.guard.children import child_env
from messages.errors import ErrorCode, JobError

log = logging.getLogger(__name__)

#: Seconds ffmpeg gets after SIGTERM to write its trailer and exit before SIGKILL.
KILL_GRACE = 2.0
#: Non-progress stderr lines kept for the error detail (ffmpeg's last words are what matter).
STDERR_TAIL_LINES = 50
#: Characters kept of one stderr line; a garbage line must not grow the tail without bound.
MAX_LINE_CHARS = 1000
#: Bytes the kernel buffers in ffmpeg's stdout pipe (Linux caps unprivileged pipes at 1 MiB):
#: a bigger pipe means fewer wake-ups per MiB for both ffmpeg and the reader.
PIPE_BYTES = 1024 * 1024
#: StreamReader buffer limit for stdout; reading pauses (and ffmpeg blocks) beyond twice this.
STDOUT_LIMIT = 512 * 1024
#: Seconds to wait for stderr readers to see EOF once the processes are gone.
STDERR_DRAIN_TIMEOUT = 2.0
#: prctl option: signal to deliver to this process when its parent dies (<linux/prctl.h>)
PR_SET_PDEATHSIG = 1
#: F_SETPIPE_SZ from <fcntl.h>; Python 3.11's fcntl module has no name for it on every build.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_PROGRESS_LINE = re.compile(r"^[a-z][a-z0-9_]*=")

#: stderr phrases that mean the input could not be fetched (best effort; ffmpeg and yt-dlp wording).
_UNAVAILABLE = re.compile(
    r"HTTP error (?:4\d\d|5\d\d)|Server returned (?:4\d\d|5\d\d|4XX|5XX)|\b403 Forbidden|\b404 Not Found"
    r"|\b410 Gone|Connection refused|Connection timed out|Connection reset|Failed to resolve hostname"
    r"|Name or service not known|No route to host|Network is unreachable|Unable to download"
    r"|Video unavailable|Private video|This video is not available",
    re.IGNORECASE,
)


# ------------------------------------------------------------------------------------ pure core


def parse_progress(lines: Sequence[str]) -> float | None:
    """The output time in seconds of one ``-progress`` block (``key=value`` lines), or None."""
    value = parse_progress_block(lines).get("out_time_s")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def classify_exit(
    returncode: int,
    stderr_tail: Sequence[str],
    *,
    size: int | None = None,
    max_bytes: int | None = None,
    feeder_failed: bool = False,
    feeder_tail: Sequence[str] = (),
) -> JobError | None:
    """The coded error for how ffmpeg (and its feeder) ended, or None when the output is good.

    ``-fs`` truncates silently with status 0, so an output of ``max_bytes`` or more is TOO_LARGE.
    """
    if size is not None and max_bytes is not None and size >= max_bytes:
        return JobError(ErrorCode.TOO_LARGE, f"output reached the {max_bytes}-byte limit (ffmpeg -fs)")
    ffmpeg_text = "\n".join(stderr_tail)
    feeder_text = "\n".join(feeder_tail)
    if returncode == 0 and not feeder_failed:
        return None
    if returncode != 0 and "File size limit" in ffmpeg_text:
        return JobError(ErrorCode.TOO_LARGE, _tail_detail(stderr_tail))
    if _UNAVAILABLE.search(ffmpeg_text) or (feeder_failed and _UNAVAILABLE.search(feeder_text)):
        return JobError(ErrorCode.MEDIA_UNAVAILABLE, _tail_detail([*feeder_tail, *stderr_tail]))
    if feeder_failed:
        return JobError(ErrorCode.MEDIA_UNAVAILABLE, "the download feeding ffmpeg failed: "
                        + _tail_detail(feeder_tail))
    how = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    return JobError(ErrorCode.CONVERSION_FAILED, f"ffmpeg {how}: {_tail_detail(stderr_tail)}")


def _tail_detail(lines: Sequence[str], *, keep: int = 10) -> str:
    """The last few stderr lines as one detail string."""
    return " | ".join(line for line in list(lines)[-keep:] if line) or "(no stderr output)"


class LineTail:
    """The last N non-progress stderr lines, plus progress blocks handed to a callback."""

    def __init__(self, *, on_block: Callable[[list[str]], None] | None) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._block: list[str] = []
        self._on_block = on_block

    def feed(self, line: str) -> None:
        """Take one stderr line: progress keys go to the current block, the rest to the tail."""
        line = line.rstrip()[:MAX_LINE_CHARS]
        if self._on_block is not None and _PROGRESS_LINE.match(line):
            self._block.append(line)
            if line.startswith("progress="):  # ffmpeg ends every block with progress=continue|end
                block, self._block = self._block, []
                self._on_block(block)
        elif line:
            self.lines.append(line)


# ------------------------------------------------------------------------------- imperative shell


class FfmpegProcess:
    """Run ffmpeg (and an optional feeder piping into its stdin), each leading a new process group.

    ``async with FfmpegProcess(argv) as ff:`` read ``ff.stdout``, then ``await ff.check(size=n)``.
    Leaving the block by any path kills the group (SIGTERM, SIGKILL after ``kill_grace``) and reaps
    it; ``time_limit`` bounds the whole block and turns expiry into JobError(TIMEOUT). ``memory_limit``
    caps ffmpeg's address space (not the feeder's); ``pass_fds`` are descriptors ffmpeg inherits.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        feeder_argv: Sequence[str] | None = None,
        max_bytes: int | None = None,
        time_limit: float | None = None,
        on_progress: Callable[[float], None] | None = None,
        kill_grace: float = KILL_GRACE,
        env: dict[str, str] | None = None,
        memory_limit: int = 0,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self._argv = list(argv)
        self._memory_limit = memory_limit
        self._pass_fds = tuple(pass_fds)
        self._feeder_argv = list(feeder_argv) if feeder_argv else None
        self._max_bytes = max_bytes
        self._time_limit = time_limit
        self._on_progress = on_progress
        self._kill_grace = kill_grace
        # never the actor's own environment: without one given, the allow-listed one (no proxy)
        self._env = env if env is not None else child_env(os.environ)
        self._proc: asyncio.subprocess.Process | None = None
        self._feeder: asyncio.subprocess.Process | None = None
        self._stdout_transport: asyncio.ReadTransport | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._tail = LineTail(on_block=self._progress_block)
        self._feeder_tail = LineTail(on_block=None)
        self._feeder_failed_early = False
        self._deadline: asyncio.Timeout | None = None
        self.stdout: asyncio.StreamReader = asyncio.StreamReader(limit=STDOUT_LIMIT)
        #: output time ffmpeg last reported, seconds
        self.out_time: float = 0.0
        #: ffmpeg's process group id (its pid); a feeder leads a group of its own, killed alongside
        self.pgid: int = 0

    # -- what callers read

    @property
    def pid(self) -> int:
        """ffmpeg's process id (also the process group id)."""
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def feeder_pid(self) -> int | None:
        """The feeder's process id, when there is a feeder."""
        return self._feeder.pid if self._feeder else None

    @property
    def stderr_tail(self) -> list[str]:
        """The last non-progress stderr lines of ffmpeg (bounded)."""
        return list(self._tail.lines)

    @property
    def feeder_stderr_tail(self) -> list[str]:
        """The last stderr lines of the feeder (bounded)."""
        return list(self._feeder_tail.lines)

    async def wait(self) -> int:
        """Wait for ffmpeg to exit and its stderr to be read; its return code."""
        assert self._proc is not None, "not started"
        returncode = await self._proc.wait()
        # A feeder that failed before ffmpeg finished cut ffmpeg's input short; one still running
        # now (or dying of a broken pipe) was only not needed any more: ffmpeg stopped at -t.
        feeder_rc = self._feeder.returncode if self._feeder is not None else None
        await self._drain_stderr(only_ffmpeg=True)
        broken_pipe = any("Broken pipe" in line for line in self._feeder_tail.lines)
        self._feeder_failed_early = feeder_rc not in (None, 0, -signal.SIGPIPE) and not broken_pipe
        return returncode

    async def check(self, *, size: int | None = None) -> None:
        """Wait for ffmpeg to exit; raise the coded JobError when it failed or hit the size cap."""
        returncode = await self.wait()
        error = classify_exit(
            returncode,
            self.stderr_tail,
            size=size,
            max_bytes=self._max_bytes,
            feeder_failed=self._feeder_failed_early,
            feeder_tail=self.feeder_stderr_tail,
        )
        if error is not None:
            raise error

    # -- lifecycle

    async def __aenter__(self) -> FfmpegProcess:
        if self._time_limit is not None:
            self._deadline = asyncio.timeout(self._time_limit)
            await self._deadline.__aenter__()
        try:
            await self._start()
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            await self._stop()
        finally:
            deadline, self._deadline = self._deadline, None
            if deadline is not None:  # always left, or it could cancel the caller later
                try:
                    await deadline.__aexit__(exc_type, exc, tb)
                except TimeoutError as timeout:
                    raise JobError(ErrorCode.TIMEOUT, f"ffmpeg ran past its {self._time_limit:g}s limit") \
                        from timeout

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        out_r, out_w = os.pipe()
        feed_r = feed_w = -1
        try:
            _grow_pipe(out_w)
            if self._feeder_argv:
                feed_r, feed_w = os.pipe()
                _grow_pipe(feed_w)
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=feed_r if self._feeder_argv else subprocess.DEVNULL,
                stdout=out_w,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own group: killpg reaches anything ffmpeg starts
                env=self._env,
                preexec_fn=child_preexec(memory_limit=self._memory_limit),
                pass_fds=self._pass_fds,
            )
            self.pgid = self._proc.pid
            if self._feeder_argv:
                self._feeder = await asyncio.create_subprocess_exec(
                    *self._feeder_argv,
                    stdin=subprocess.DEVNULL,
                    stdout=feed_w,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # a group of its own (setpgid cannot cross sessions)
                    env=self._env,
                    preexec_fn=die_with_parent,
                )
        except BaseException:
            os.close(out_r)  # nothing will read it: a failed start leaks no descriptor
            raise
        finally:
            # The children hold their own copies; ours would keep the pipes open past their exit.
            for fd in (out_w, feed_r, feed_w):
                if fd >= 0:
                    os.close(fd)
        protocol = asyncio.StreamReaderProtocol(self.stdout)
        pipe = os.fdopen(out_r, "rb", buffering=0)
        self._stdout_transport, _ = await loop.connect_read_pipe(lambda: protocol, pipe)
        assert self._proc.stderr is not None
        self._readers.append(asyncio.create_task(_read_lines(self._proc.stderr, self._tail)))
        if self._feeder is not None and self._feeder.stderr is not None:
            self._readers.append(asyncio.create_task(_read_lines(self._feeder.stderr, self._feeder_tail)))

    async def _stop(self) -> None:
        """Kill the group unless everyone has exited, reap every child, close our pipe ends."""
        if self._stdout_transport is not None:
            # Nobody reads stdout any more: closing it makes a blocked ffmpeg fail its write at once.
            self._stdout_transport.close()
        procs = [p for p in (self._proc, self._feeder) if p is not None]
        alive = any(p.returncode is None for p in procs)
        try:
            if alive:
                self._signal_groups(signal.SIGTERM)
                waiters = [asyncio.ensure_future(p.wait()) for p in procs]
                await asyncio.wait(waiters, timeout=self._kill_grace)
        finally:
            # Also on a second cancellation during the grace: SIGKILL and reap, never leave an orphan.
            if alive and any(p.returncode is None for p in procs):
                self._signal_groups(signal.SIGKILL)
            for proc in procs:
                await _reap(proc)
        await self._drain_stderr()

    def _signal_groups(self, sig: int) -> None:
        for proc in (self._proc, self._feeder):
            if proc is not None and proc.returncode is None:  # a reaped leader's pid may be reused
                _killpg(proc.pid, sig)

    async def _drain_stderr(self, *, only_ffmpeg: bool = False) -> None:
        """Wait for the stderr readers to reach EOF (the first reader is ffmpeg's)."""
        count = 1 if only_ffmpeg else len(self._readers)
        readers, self._readers = self._readers[:count], self._readers[count:]
        if not readers:
            return
        _done, pending = await asyncio.wait(readers, timeout=STDERR_DRAIN_TIMEOUT)
        for task in pending:  # a grandchild holding stderr open must not hold us
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def _progress_block(self, block: list[str]) -> None:
        out_time = parse_progress(block)
        if out_time is None:
            return
        self.out_time = out_time
        if self._on_progress is not None:
            self._on_progress(out_time)


async def _read_lines(stream: asyncio.StreamReader, tail: LineTail) -> None:
    """Feed every stderr line to ``tail`` until EOF (lines over the reader's limit are cut)."""
    while True:
        try:
            raw = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as eof:
            raw = eof.partial
            if raw:
                _feed_raw(raw, tail)
            return
        except asyncio.LimitOverrunError as overrun:
            raw = await stream.read(overrun.consumed)
        _feed_raw(raw, tail)


def _feed_raw(raw: bytes, tail: LineTail) -> None:
    for piece in raw.decode("utf-8", "replace").replace("\r", "\n").split("\n"):
        tail.feed(piece)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Wait for an exit even while being cancelled: no zombie is left behind."""
    waiter = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.shield(waiter)
    except asyncio.CancelledError:
        await asyncio.wait([waiter])  # SIGKILL was sent: the wait is short
        raise


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def die_with_parent() -> None:
    """In the child before exec: the kernel SIGKILLs it when the actor process dies (even by SIGKILL),
    so a killed uploader leaves no ffmpeg or yt-dlp behind writing into a dead upload."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def child_preexec(*, memory_limit: int = 0) -> Callable[[], None]:
    """What an ffmpeg/ffprobe child runs before exec: ``die_with_parent``, and with ``memory_limit`` > 0
    an address-space cap (RLIMIT_AS), so a decompression bomb fails its allocation instead of
    taking the machine's memory. The process-group handling is untouched (it is set up before)."""

    def preexec() -> None:
        die_with_parent()
        if memory_limit > 0:
            _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = memory_limit if hard == resource.RLIM_INFINITY else min(memory_limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

    return preexec


def _grow_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):  # the pipe works at the default size, only slower
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
