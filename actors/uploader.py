"""The uploader: runs the plan's ffmpeg and streams its stdout into the presigned upload.

It holds no storage credentials — only the URLs in StreamToStorage — and writes nothing to disk.
Every fetch ffmpeg makes for the user's URL goes through the job's SSRF guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import aiohttp
import msgspec

from actors.adapters.ffmpeg import FfmpegProcess
from actors.adapters.levers import Levers
from actors.adapters.upload import StreamResult, stream_to_target
from actors.core.ffmpeg_args import CoverInput, ImageDemuxer, cover_demuxer, ffmpeg_argv
from actors.core.freshness import may_reresolve, plan_expired, refreshed_plan
from actors.core.plain import require_http_url
from actors.core.plan import source_budget
from actors.core.stages import MonotonicProgress, check_output_duration, converting_fraction
from actors.core.target import stale_target, target_problem
from actors.guard import FetchGuard, check_url
from actors.guard.extract import FEEDER_LEVERS_VARIABLE, ExtractorPool, WorkerLevers, extracted_info
from actors.guard.proxy import PAGE_BUDGET
from actors.guard.ranges import ranged_url
from actors.runtime import metrics
from actors.runtime.settings import Settings
from actors.runtime.worker import Actor, Context
from messages.errors import ErrorCode, JobError
from messages.types import (
    InputVia,
    JobProgress,
    MediaPlan,
    RenewUpload,
    Stage,
    Streamed,
    StreamToStorage,
)

#: at most this many progress events per second per job
PROGRESS_PER_SECOND = 2.0
#: connections kept open per storage host
CONNECTIONS_PER_HOST = 16


#: redirects the thumbnail fetch may follow (each hop goes through the guard)
THUMBNAIL_REDIRECTS = 3
def check_plan_urls(plan: MediaPlan, settings: Settings) -> None:
    """Every URL of the plan checked again where it is used: http(s) only, no credentials, no
    forbidden literal host (``check_url``); raises ``JobError(URL_NOT_ALLOWED)``."""
    for url in [*(i.url for i in plan.inputs), *([plan.thumbnail_url] if plan.thumbnail_url else [])]:
        require_http_url(url, what="plan URL")
        check_url(url, allow=settings.allow_networks, deny=settings.deny_networks)


def guarded_plan(plan: MediaPlan, guard: FetchGuard) -> MediaPlan:
    """The plan with every input ffmpeg fetches itself turned into a URL of ``guard``'s gateway
    (raises ``url_not_allowed`` for an input that is not http(s)): ffmpeg learns no other host."""
    inputs = []
    for media_input in plan.inputs:
        if media_input.via is InputVia.YTDLP_PIPE:
            guard.gateway_url(media_input.url)  # the feeder's page URL is http(s) too, or nothing runs
            inputs.append(media_input)
        else:
            # a throttled origin's input is fetched by the gateway in Range requests (actors.guard.ranges)
            url = ranged_url(guard.gateway_url(media_input.url), media_input.range_chunk)
            inputs.append(msgspec.structs.replace(media_input, url=url))
    return msgspec.structs.replace(plan, inputs=inputs)


def feeder_argv(plan: MediaPlan, *, proxy_url: str, timeout: float) -> list[str] | None:
    """The feeder (``actors.guard.feeder``: yt-dlp to stdout, every URL it fetches, and every URL the
    ffmpeg it merges with opens, through the guard) for the one piped input."""
    piped = [i for i in plan.inputs if i.via is InputVia.YTDLP_PIPE]
    if not piped:
        return None
    source = piped[0]
    require_http_url(source.url, what="input URL")
    argv = [sys.executable, "-m", "actors.guard.feeder", "--proxy", proxy_url,
            "--socket-timeout", str(int(timeout))]
    if source.format_id:
        argv += ["-f", source.format_id]
    for name, value in source.headers.items():
        argv += ["--add-header", f"{name}:{value}"]
    return [*argv, "--", source.url]


class InputRefused(Exception):
    """The source refused a media URL of the plan (HTTP 403/410): expired, or bound to another address."""

    def __init__(self, status: int, *, stored: int) -> None:
        super().__init__(f"the source answered HTTP {status}")
        self.status = status
        #: bytes of the refused attempt already in storage
        self.stored = stored


@contextlib.contextmanager
def _unwrapped(kind: type[Exception]) -> Iterator[None]:
    """Let an exception of ``kind`` out of a TaskGroup's exception group as itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        found = next((e for e in group.exceptions if isinstance(e, kind)), None)
        if found is not None:
            raise found from found.__cause__
        raise


def feeder_env(env: dict[str, str], levers: WorkerLevers) -> dict[str, str]:
    """``env`` plus the operator's levers for the feeder's yt-dlp, as JSON in an environment variable
    (readable by the same user only, unlike argv; no cookie value in it, only the file's path)."""
    return {**env, FEEDER_LEVERS_VARIABLE: msgspec.json.encode(levers).decode()}


def keep_for_retry(error: BaseException, *, attempt: int, max_attempts: int) -> bool:
    """Whether a failed stream leaves its multipart upload open: yes when the same command comes
    back — a retryable error before the last attempt, or a shutdown (the message is redelivered) —
    so the retry re-PUTs its parts there; no for a final failure (the coordinator aborts what a
    permanent failure leaves, and a replay asks for a fresh upload)."""
    if isinstance(error, asyncio.CancelledError):
        return True
    return isinstance(error, JobError) and error.retryable and attempt < max_attempts


async def source_complete(ff: FfmpegProcess, plan: MediaPlan, guard: FetchGuard) -> None:
    """At EOF, before the upload is committed: ffmpeg exited well (``ff.check``), the guard cut no
    fetch (a budget or deadline it enforced ends an input early, and ffmpeg takes that for the end)
    and the output is as long as planned — ffmpeg exits 0 on a source cut off mid-way."""
    await ff.check()
    guard.raise_if_blocked()
    error = check_output_duration(ff.out_time, plan.duration)
    if error is not None:
        raise JobError(error.code, error.detail)


async def fetch_thumbnail(session: aiohttp.ClientSession, url: str, *, proxy: str, max_bytes: int,
                          timeout: float) -> bytes | str:
    """The thumbnail's bytes, fetched through the guard's ``proxy`` and at most ``max_bytes`` long,
    or why it was not (an oversized or failed thumbnail leaves the cover out; the job goes on)."""
    try:
        async with session.get(url, proxy=proxy, max_redirects=THUMBNAIL_REDIRECTS,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                return f"HTTP {response.status}"
            if response.content_length is not None and response.content_length > max_bytes:
                return f"{response.content_length} bytes; the limit is {max_bytes}"
            data = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                data += chunk
                if len(data) > max_bytes:
                    return f"more than {max_bytes} bytes"
            return bytes(data)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return f"fetch failed ({type(exc).__name__})"


@contextlib.contextmanager
def memory_file(data: bytes) -> Iterator[int]:
    """``data`` in an anonymous in-memory file (memfd, never on disk), positioned at 0, for a child to read."""
    fd = os.memfd_create("ggt-thumbnail", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


class Uploader(Actor):
    """StreamToStorage → ffmpeg → presigned PUTs → Streamed."""

    name = "uploader"
    stage = Stage.CONVERTING
    #: each message runs ffmpeg and holds part buffers
    prefetch = 2

    async def setup(self) -> None:
        self.levers = Levers.open(self.settings)
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit_per_host=CONNECTIONS_PER_HOST),
            auto_decompress=False,
        )
        #: yt-dlp for re-resolving refused or expired URLs, started on first need and closed at teardown
        self._stack = contextlib.AsyncExitStack()
        self._pool: ExtractorPool | None = None
        self._pool_lock = asyncio.Lock()

    async def teardown(self) -> None:
        await self._stack.aclose()
        await self.http.close()
        self.levers.close()

    def time_limit(self, message) -> float:
        """The step's own limit (what the coordinator gave it), never above the configured one."""
        limit = self.settings.job_time_limit
        return min(limit, message.time_limit) if isinstance(message, StreamToStorage) and message.time_limit else limit

    async def stream(self, message: StreamToStorage, ctx: Context) -> None:
        """Run the plan and stream its output into storage; report what was stored."""
        forbidden = target_problem(message.target, self.settings)
        if forbidden is not None:  # before any byte (or abort) is sent anywhere
            raise forbidden
        stale = stale_target(message, replays=ctx.envelope.replays, now=datetime.now(UTC))
        if stale:
            await ctx.publish(RenewUpload(job_id=message.job_id, key=message.target.key, reason=stale))
            return
        started = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.time_limit(message)
        plan = message.plan
        if plan_expired(plan, now=datetime.now(UTC)):  # a replay hours later: the site said when they die
            plan = await self._reresolve(plan, deadline=deadline, why=f"its URLs expire at {plan.expires_at}")
        progress = _ProgressReporter(ctx, message.job_id, plan.duration)
        while True:
            try:
                result = await self._stream_plan(plan, message, ctx, progress, deadline=deadline)
                break
            except InputRefused as refused:
                if not may_reresolve(plan):
                    raise JobError(ErrorCode.SOURCE_REFUSED,
                                   f"the source answered HTTP {refused.status} for its media URLs after "
                                   f"{plan.resolutions} re-resolution(s)") from None
                fresh = await self._reresolve(plan, deadline=deadline, why=f"HTTP {refused.status} from the source")
                if refused.stored:
                    # parts of the refused attempt are stored (and the upload aborted): a clean start needs
                    # a fresh upload, which the coordinator presigns for the re-resolved plan
                    self.log.info("source refused mid-stream: upload aborted, asking for a fresh one",
                                  extra={"stored": refused.stored})
                    await ctx.publish(RenewUpload(job_id=message.job_id, key=message.target.key, plan=fresh,
                                                  reason=f"source refused its URLs after {refused.stored} bytes"))
                    return
                plan = fresh  # nothing reached storage: the same upload takes the fresh attempt from byte 0
        await ctx.publish(Streamed(
            job_id=message.job_id, key=message.target.key, upload_mode=result.mode, size=result.size,
            sha256=result.sha256, etag=result.etag, parts=result.parts, upload_id=result.upload_id,
            # an unknown source duration (plan 0) is verified against what ffmpeg reported producing
            duration=progress.out_time or plan.duration, seconds=round(time.monotonic() - started, 3),
        ))

    async def _stream_plan(self, plan: MediaPlan, message: StreamToStorage, ctx: Context,
                           progress: _ProgressReporter, *, deadline: float) -> StreamResult:
        """One run of ``plan``'s ffmpeg into the command's upload; ``InputRefused`` when it failed because
        the source refused a media URL (403/410), every other failure as it is."""
        check_plan_urls(plan, self.settings)  # before ffmpeg starts, whatever the converter checked
        progress.bytes = 0
        async with self.levers.guard(idle_timeout=self.settings.network_timeout,
                                     media_budget=source_budget(
                                         plan, max_source_bytes=self.settings.max_source_bytes)) as guard:
            guard.set_deadline(deadline)
            guarded = guarded_plan(plan, guard)

            def keep_upload(error: BaseException) -> bool:
                # a refusal before any byte was stored is run again into the same upload right away
                return (bool(guard.refused) and progress.bytes == 0) or keep_for_retry(
                    error, attempt=ctx.attempt, max_attempts=self.settings.max_attempts)

            with contextlib.ExitStack() as files, _unwrapped(InputRefused):  # the cover lives as long as ffmpeg
                cover = await self._cover(guarded, guard, files)
                async with asyncio.TaskGroup() as group:
                    reporter = group.create_task(progress.run())
                    try:
                        async with FfmpegProcess(
                            ffmpeg_argv(guarded, network_timeout=self.settings.network_timeout,
                                        wrap_input=guard.input_args, cover=cover),
                            feeder_argv=feeder_argv(guarded, proxy_url=guard.proxy_url,
                                                    timeout=self.settings.network_timeout),
                            max_bytes=guarded.max_bytes,
                            on_progress=progress.update,
                            env=feeder_env(guard.subprocess_env(os.environ), self.levers.worker_levers()),
                            memory_limit=self.settings.child_memory_limit,
                            pass_fds=(cover.fd,) if cover is not None else (),
                        ) as ff:
                            try:
                                result = await metrics.counted_upload(stream_to_target(
                                    ff.stdout, message.target, session=self.http,
                                    parts_in_flight=self.settings.parts_in_flight,
                                    max_bytes=guarded.max_bytes,
                                    source_done=lambda: source_complete(ff, guarded, guard),
                                    on_stored=progress.stored, keep_upload=keep_upload,
                                ), format=guarded.format.value)
                            except Exception as exc:
                                guard.raise_if_blocked()  # a refused fetch explains the failure best
                                if guard.refused:
                                    raise InputRefused(guard.refused[0], stored=progress.bytes) from exc
                                raise
                        guard.raise_if_blocked()
                    finally:
                        reporter.cancel()
        return result

    async def _reresolve(self, plan: MediaPlan, *, deadline: float, why: str) -> MediaPlan:
        """``plan`` with its inputs resolved again from its page, here (so the URLs are bound to this
        host's address), through a guard of its own; raises the coded error of a failed resolution."""
        assert plan.source_url is not None
        self.log.info("re-resolving the plan's media URLs",
                      extra={"reason": why, "resolutions": plan.resolutions})
        async with self._pool_lock:
            if self._pool is None:  # started on first need: most jobs never re-resolve
                self._pool = await self._stack.enter_async_context(ExtractorPool(
                    size=1, network_timeout=self.settings.network_timeout,
                    max_bytes=self.settings.max_output_bytes,
                    make_guard=lambda: self.levers.guard(idle_timeout=self.settings.network_timeout,
                                                         page_budget=PAGE_BUDGET),
                    levers=self.levers.worker_levers()))
        info = await extracted_info(self._pool, plan.source_url, deadline=deadline)
        return refreshed_plan(plan, info, now=datetime.now(UTC))

    async def _cover(self, plan: MediaPlan, guard: FetchGuard, files: contextlib.ExitStack) -> CoverInput | None:
        """The plan's thumbnail fetched within its byte budget and checked (format, pixels), in a
        memory file ffmpeg reads with a forced image demuxer; None leaves the cover out."""
        if plan.thumbnail_url is None:
            return None
        data = await fetch_thumbnail(self.http, plan.thumbnail_url, proxy=guard.proxy_url,
                                     max_bytes=self.settings.max_thumbnail_bytes,
                                     timeout=self.settings.network_timeout)
        demuxer = cover_demuxer(data) if isinstance(data, bytes) else data
        if not isinstance(demuxer, ImageDemuxer):
            self.log.info("cover art left out", extra={"reason": demuxer})
            return None
        return CoverInput(fd=files.enter_context(memory_file(data)), demuxer=demuxer)  # type: ignore[arg-type]


class _ProgressReporter:
    """Publishes the job's converting progress, at most PROGRESS_PER_SECOND times a second."""

    def __init__(self, ctx: Context, job_id: str, duration: float) -> None:
        self.ctx, self.job_id, self.duration = ctx, job_id, duration
        self.out_time = 0.0
        self.bytes = 0
        self._monotonic = MonotonicProgress()
        self._changed = asyncio.Event()

    def update(self, out_time: float) -> None:
        self.out_time = out_time
        self._changed.set()

    def stored(self, size: int) -> None:
        self.bytes = size

    async def run(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            percent = self._monotonic.update(Stage.CONVERTING, converting_fraction(self.out_time, self.duration))
            if percent is not None:
                with contextlib.suppress(Exception):  # progress is best effort; the job goes on
                    await self.ctx.bus.publish(JobProgress(job_id=self.job_id, stage=Stage.CONVERTING,
                                                           percent=percent, bytes_stored=self.bytes),
                                               owner=self.ctx.envelope.owner)  # the job's tenant sees it
            await asyncio.sleep(1.0 / PROGRESS_PER_SECOND)  # the rate limit itself
