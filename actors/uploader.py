"""The uploader: runs the plan's ffmpeg and streams its stdout into the presigned upload.

It holds no storage credentials — only the URLs in StreamToStorage — and writes nothing to disk.
Every fetch ffmpeg makes for the user's URL goes through the job's SSRF guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import msgspec

from actors import metrics
from actors.ffmpeg import FfmpegProcess
from actors.guard import FetchGuard
from actors.planning import MonotonicProgress, converting_fraction, ffmpeg_argv
from actors.runtime import Actor, Context
from actors.streaming import stream_to_target
from messages.errors import JobError
from messages.types import InputVia, JobProgress, MediaPlan, RenewUpload, Stage, Streamed, StreamToStorage

#: at most this many progress events per second per job
PROGRESS_PER_SECOND = 2.0
#: connections kept open per storage host
CONNECTIONS_PER_HOST = 16


def guarded_plan(plan: MediaPlan, guard: FetchGuard) -> MediaPlan:
    """The plan with every input ffmpeg fetches itself routed through ``guard``."""
    input_args = [
        args if media_input.via is InputVia.YTDLP_PIPE else guard.input_args(args)
        for media_input, args in zip(plan.inputs, plan.input_args, strict=True)
    ]
    return msgspec.structs.replace(plan, input_args=input_args)


def feeder_argv(plan: MediaPlan, *, proxy_url: str, timeout: float) -> list[str] | None:
    """yt-dlp writing the one piped input to stdout, through the guard, with no config or plugins."""
    piped = [i for i in plan.inputs if i.via is InputVia.YTDLP_PIPE]
    if not piped:
        return None
    source = piped[0]
    argv = ["yt-dlp", "--ignore-config", "--no-plugin-dirs", "--no-playlist", "--quiet", "--no-warnings",
            "--proxy", proxy_url, "--socket-timeout", str(int(timeout)), "--no-part", "--no-cache-dir",
            "-o", "-"]
    if source.format_id:
        argv += ["-f", source.format_id]
    for name, value in source.headers.items():
        argv += ["--add-header", f"{name}:{value}"]
    return [*argv, "--", source.url]


def keep_for_retry(error: BaseException, *, attempt: int, max_attempts: int) -> bool:
    """Whether a failed stream leaves its multipart upload open: yes when the same command comes
    back — a retryable error before the last attempt, or a shutdown (the message is redelivered) —
    so the retry re-PUTs its parts there; no for a final failure (the coordinator aborts what a
    permanent failure leaves, and a replay asks for a fresh upload)."""
    if isinstance(error, asyncio.CancelledError):
        return True
    return isinstance(error, JobError) and error.retryable and attempt < max_attempts


def stale_target(message: StreamToStorage, *, replays: int, now: datetime) -> str:
    """Why the command's upload URLs cannot be used (empty when they can): a replayed copy whose
    upload may have been aborted meanwhile, or URLs that expire before the step could finish."""
    if replays > message.renewals:
        return f"replayed command (replay {replays}): the upload it names may be gone"
    if message.target.expires_at:
        expires = datetime.fromisoformat(message.target.expires_at)
        if expires < now + timedelta(seconds=message.time_limit):
            return f"upload URLs expire at {message.target.expires_at}, before the step could finish"
    return ""


class Uploader(Actor):
    """StreamToStorage → ffmpeg → presigned PUTs → Streamed."""

    name = "uploader"
    #: each message runs ffmpeg and holds part buffers
    prefetch = 2

    async def setup(self) -> None:
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit_per_host=CONNECTIONS_PER_HOST),
            auto_decompress=False,
        )

    async def teardown(self) -> None:
        await self.http.close()

    def time_limit(self, message) -> float:
        """The step's own limit (what the coordinator gave it), never above the configured one."""
        limit = self.settings.job_time_limit
        return min(limit, message.time_limit) if isinstance(message, StreamToStorage) and message.time_limit else limit

    async def stream(self, message: StreamToStorage, ctx: Context) -> None:
        """Run the plan and stream its output into storage; report what was stored."""
        stale = stale_target(message, replays=ctx.envelope.replays, now=datetime.now(UTC))
        if stale:
            await ctx.publish(RenewUpload(job_id=message.job_id, key=message.target.key, reason=stale))
            return
        started = time.monotonic()
        progress = _ProgressReporter(ctx, message.job_id, message.plan.duration)
        async with FetchGuard(allow=self.settings.allow_networks,
                              idle_timeout=self.settings.network_timeout) as guard:
            plan = guarded_plan(message.plan, guard)
            async with asyncio.TaskGroup() as group:
                reporter = group.create_task(progress.run())
                try:
                    async with FfmpegProcess(
                        ffmpeg_argv(plan),
                        feeder_argv=feeder_argv(plan, proxy_url=guard.proxy_url,
                                                timeout=self.settings.network_timeout),
                        max_bytes=plan.max_bytes,
                        on_progress=progress.update,
                        env=guard.subprocess_env(dict(os.environ)),
                    ) as ff:
                        try:
                            result = await metrics.counted_upload(stream_to_target(
                                ff.stdout, message.target, session=self.http,
                                parts_in_flight=self.settings.parts_in_flight,
                                max_bytes=plan.max_bytes, source_done=ff.check, on_stored=progress.stored,
                                keep_upload=lambda error: keep_for_retry(
                                    error, attempt=ctx.attempt, max_attempts=self.settings.max_attempts),
                            ), format=plan.format.value)
                        except Exception:
                            guard.raise_if_blocked()  # a refused fetch explains the failure best
                            raise
                    guard.raise_if_blocked()
                finally:
                    reporter.cancel()
        await ctx.publish(Streamed(
            job_id=message.job_id, key=message.target.key, upload_mode=result.mode, size=result.size,
            sha256=result.sha256, etag=result.etag, parts=result.parts, upload_id=result.upload_id,
            duration=progress.out_time or plan.duration, seconds=round(time.monotonic() - started, 3),
        ))


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
                                                           percent=percent, bytes_stored=self.bytes))
            await asyncio.sleep(1.0 / PROGRESS_PER_SECOND)  # the rate limit itself
