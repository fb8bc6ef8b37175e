"""The actors' prober: ffprobe's answers from warm workers that hold FFmpeg's libraries (PyAV).

An ffprobe start costs ~0.1–0.3 s (Debian's build loads 215 shared libraries) and the converter and
the verifier each ran one per job. ``ProbePool`` keeps up to ``size`` workers
(``actors.adapters.probe_worker``), each serving one probe at a time in a fresh fork of itself, so a
probe costs the fetch and the parse (~20 ms on loopback). What a probe may do is what an ffprobe
run could: the same input options (``ffprobe.input_options``: protocol whitelist, timeouts, pixel
cap, headers, the guard's proxy), the same environment rule, an address-space cap, its own process
— and the same answers: ffprobe's JSON shape, read by ``parse_probe_json``, and its error codes.

A timeout or a cancel kills the worker's process group (the probe's child with it); the next probe
starts a fresh worker. A worker that crashes takes only the probe it was running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping

import msgspec

from actors.adapters.ffmpeg import child_preexec
from actors.adapters.ffprobe import failure_code, input_options, public_message
from actors.adapters.probe_worker import MAX_ANSWER_BYTES, ProbeAnswer, ProbeRequest
from actors.core.probe import ProbeResult, parse_probe_json
from actors.guard.children import child_env
from messages.errors import ErrorCode, JobError

#: seconds a new worker may take to import PyAV and say it is ready
START_TIMEOUT = 30.0
#: glibc's per-thread malloc arenas are useless to a single-threaded worker, and cost memory
_WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}
_HEADER_BYTES = 4


class _Worker:
    """One probe worker process (its own process group) and its framed pipe."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._decoder = msgspec.msgpack.Decoder(ProbeAnswer)

    @classmethod
    async def start(cls) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "actors.adapters.probe_worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env={**child_env(os.environ), **_WORKER_ENV},  # never the actor's own
            start_new_session=True,  # its own group: a kill takes the probe's child with it
            preexec_fn=child_preexec(),
        )
        worker = cls(proc)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                ready = await worker._answer()
        except BaseException:
            await worker.kill()
            raise
        if ready is None or not ready.ok:
            await worker.kill()
            raise JobError(ErrorCode.INTERNAL, "the probe worker did not start")
        return worker

    async def ask(self, request: ProbeRequest) -> ProbeAnswer | None:
        """Send ``request``; its answer, or None when the worker ended first."""
        assert self.proc.stdin is not None
        data = msgspec.msgpack.encode(request)
        self.proc.stdin.write(len(data).to_bytes(_HEADER_BYTES, "big") + data)
        await self.proc.stdin.drain()
        return await self._answer()

    async def _answer(self) -> ProbeAnswer | None:
        assert self.proc.stdout is not None
        try:
            size = int.from_bytes(await self.proc.stdout.readexactly(_HEADER_BYTES), "big")
            if size > MAX_ANSWER_BYTES:
                return None
            return self._decoder.decode(await self.proc.stdout.readexactly(size))
        except (asyncio.IncompleteReadError, msgspec.DecodeError):
            return None

    async def kill(self) -> None:
        """Kill the worker's process group and reap the worker (shielded: a cancelled caller still reaps)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        await asyncio.shield(self.proc.wait())

    async def close(self) -> None:
        """End of input: the worker exits; killed if it does not within a second."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(1.0):
                await self.proc.wait()
        except TimeoutError:
            await self.kill()


class ProbePool:
    """Up to ``size`` probes at once, each in a warm worker's fresh child.

    ``async with`` starts one worker in the background (off the caller's start-up path); the first
    probe waits for it, later ones start more workers as they need them, up to ``size``.
    """

    def __init__(self, size: int = 1) -> None:
        self._slots = asyncio.Semaphore(max(1, size))
        self._idle: list[_Worker] = []
        self._warming: asyncio.Task[_Worker] | None = None
        self._live: set[_Worker] = set()

    async def __aenter__(self) -> ProbePool:
        self._warming = asyncio.create_task(self._start())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        warming, self._warming = self._warming, None
        if warming is not None:
            warming.cancel()
            with contextlib.suppress(BaseException):
                self._idle.append(await warming)
        idle, self._idle = self._idle, []
        await asyncio.gather(*(w.close() for w in idle))
        self._live.clear()

    @property
    def pids(self) -> list[int]:
        """The process ids of the pool's workers, idle or probing (not one still starting)."""
        return [w.proc.pid for w in self._live]

    async def _start(self) -> _Worker:
        worker = await _Worker.start()
        self._live.add(worker)
        return worker

    async def _take(self) -> _Worker:
        """An idle worker, the one warming up, or a new one."""
        if self._idle:
            return self._idle.pop()
        warming, self._warming = self._warming, None
        if warming is not None:
            with contextlib.suppress(Exception):  # it failed to start: try once more, below
                return await warming
        return await self._start()

    async def worker_pids(self) -> list[int]:
        """The idle workers' PIDs, once the warming one has started (tests and the operator's view)."""
        if self._warming is not None:
            self._idle.append(await self._take())
        return [w.proc.pid for w in self._idle]

    async def probe(
        self,
        url_or_path: str,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        count_packets: bool = False,
        head_only: bool = False,
        wrap_input: Callable[[list[str]], list[str]] | None = None,
        environment: Mapping[str, str] | None = None,
        memory_limit: int = 0,
    ) -> ProbeResult:
        """What ``url_or_path`` holds, as ``ffprobe.ffprobe`` answers it; raises the same coded JobErrors
        (no_media_found, media_unavailable, unsupported_url). ``wrap_input`` and ``environment`` route the
        fetch through the SSRF guard (``guard.input_args``, ``guard.subprocess_env``)."""
        request = ProbeRequest(
            url=url_or_path, timeout=timeout, count_packets=count_packets, memory_limit=memory_limit,
            options=input_options(url_or_path, timeout=timeout, headers=headers, count_packets=count_packets,
                                  head_only=head_only, wrap_input=wrap_input),
            environment=dict(environment) if environment is not None else child_env(os.environ),
        )
        async with self._slots:
            worker = await self._take()
            answer: ProbeAnswer | None = None
            try:
                async with asyncio.timeout(timeout):
                    answer = await worker.ask(request)
            except TimeoutError:
                raise JobError(ErrorCode.MEDIA_UNAVAILABLE, f"the probe timed out after {timeout:.0f} s") from None
            finally:
                if answer is not None:
                    self._idle.append(worker)
                else:
                    self._live.discard(worker)
                    await worker.kill()
        return _result(answer)


def _result(answer: ProbeAnswer | None) -> ProbeResult:
    """The probe's answer as a ProbeResult, or its coded JobError."""
    if answer is None:
        raise JobError(ErrorCode.MEDIA_UNAVAILABLE, "probe: the probe worker ended without an answer")
    if not answer.ok:
        message = public_message(answer.error)
        raise JobError(failure_code(message), f"probe: {message}")
    try:
        result = parse_probe_json(answer.json)
    except (msgspec.DecodeError, AttributeError) as exc:
        raise JobError(ErrorCode.NO_MEDIA_FOUND, f"probe output unreadable: {exc}") from None
    if result.audio is None and result.video is None:
        raise JobError(ErrorCode.NO_MEDIA_FOUND, "no audio or video stream")
    return result
