"""The verifier: checks the stored object against what was streamed, then probes the media itself.

HEAD: size, ETag (md5 or md5-of-md5s) and Content-Type. Probe through a presigned GET: container,
codecs, and a duration within 2 % or 0.5 s of the expected one — which catches a source that was
cut off mid-way even when ffmpeg exited cleanly.

A verdict is retryable only when the stored object differs from what was streamed (storage's
doing); a media mismatch is deterministic. A store that does not answer (HEAD, or the probe's GET)
is no verdict at all: the step is retried as ``storage_unavailable`` and the file kept.
"""

from __future__ import annotations

import contextlib

from actors.adapters.ffprobe import ffprobe
from actors.core.catalog import CATALOG
from actors.core.probe import ProbeResult
from actors.runtime import metrics
from actors.runtime.storage import storage_config
from actors.runtime.worker import Actor, Context
from messages.errors import ErrorCode, JobError
from messages.types import Stage, Verified, VerifyObject
from storage import ObjectInfo, Storage, StorageUnavailable
from storage.keys import strip_etag

#: relative and absolute duration tolerance: within 2 % or 0.5 s of the expected duration
DURATION_TOLERANCE = 0.02
DURATION_TOLERANCE_S = 0.5
#: the slowest read of a stored file the probe allows for (bytes per second)
PROBE_BYTES_PER_S = 5 * 1024 * 1024
#: seconds the probe's presigned GET stays valid
PROBE_URL_TTL = 900


def probe_timeout(size: int, limit: float) -> float:
    """Seconds the probe of a stored file may take: a minute plus a second per PROBE_BYTES_PER_S bytes
    (counting packets reads the whole file), within the step's time limit."""
    return min(limit, 60.0 + size / PROBE_BYTES_PER_S)


def object_problems(head: ObjectInfo | None, message: VerifyObject) -> list[str]:
    """What is wrong with the stored object's metadata (empty when nothing is)."""
    if head is None:
        return ["the object is missing from storage"]
    problems = []
    if head.size != message.size:
        problems.append(f"size {head.size} differs from the {message.size} bytes streamed")
    if strip_etag(head.etag) != strip_etag(message.etag):
        problems.append(f"ETag {head.etag} differs from the {message.etag} computed while streaming")
    if head.content_type.split(";")[0].strip() != message.content_type:
        problems.append(f"Content-Type {head.content_type!r} is not {message.content_type!r}")
    return problems


def duration_ok(measured: float | None, expected: float) -> bool:
    """Whether ``measured`` is within 2 % or 0.5 s of ``expected``."""
    if measured is None:
        return False
    return abs(measured - expected) <= max(DURATION_TOLERANCE * expected, DURATION_TOLERANCE_S)


def media_problems(probe: ProbeResult, message: VerifyObject) -> list[str]:
    """What is wrong with the media: container, codecs, duration (empty when nothing is)."""
    problems = []
    if not any(name in probe.format_name for name in CATALOG[message.format].containers):
        problems.append(f"container {probe.format_name!r} is not {message.format}")
    for kind, codec in message.expect_codecs.items():
        stream = probe.first(kind)
        if stream is None:
            problems.append(f"no {kind} stream (expected {codec})")
        elif stream.codec_name != codec:
            problems.append(f"{kind} codec {stream.codec_name!r} is not {codec!r}")
    measured = probe.best_duration
    if not duration_ok(measured, message.duration):
        problems.append(f"duration {measured if measured is None else round(measured, 3)} s is not within "
                        f"2 % or 0.5 s of {message.duration:.3f} s (source cut off?)")
    return problems


class Verifier(Actor):
    """VerifyObject → HEAD + probe → Verified."""

    name = "verifier"
    stage = Stage.VERIFYING

    async def setup(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self.storage = await self._stack.enter_async_context(Storage(storage_config(self.settings)))

    async def teardown(self) -> None:
        await self._stack.aclose()

    async def verify(self, message: VerifyObject, ctx: Context) -> None:
        """Check the object and publish the verdict."""
        try:
            head = await self.storage.head(message.key)
        except StorageUnavailable as exc:
            raise JobError(ErrorCode.STORAGE_UNAVAILABLE, str(exc)) from exc
        problems = object_problems(head, message)
        # the stored bytes are not the streamed ones: storage's doing, so a fresh run may succeed;
        # what the media problems below find (and an unreadable file) every run finds again
        retryable = bool(problems)
        measured = 0.0
        if not problems:
            url = await self.storage.presign_get(message.key, expires=PROBE_URL_TTL)
            # piped FLAC, WebM and Ogg carry no duration in their headers, and a fragmented MP4's is
            # spread over its fragments: count the packets, reading the file once front to back
            count = CATALOG[message.format].packet_counted
            try:
                probe = await ffprobe(url, timeout=probe_timeout(message.size, self.settings.job_time_limit),
                                      count_packets=count, memory_limit=self.settings.child_memory_limit)
            except JobError as exc:
                if exc.code == ErrorCode.MEDIA_UNAVAILABLE:  # storage did not serve it: try again, keep the file
                    raise JobError(ErrorCode.STORAGE_UNAVAILABLE, f"probing the stored file: {exc.detail}",
                                   retryable=True) from exc
                problems.append(f"the stored file cannot be probed: {exc.detail or exc.code}")
            else:
                problems += media_problems(probe, message)
                measured = probe.best_duration or 0.0
        metrics.verification(not problems)
        await ctx.publish(Verified(job_id=message.job_id, key=message.key, ok=not problems,
                                   problems=problems, duration=round(measured, 3), retryable=retryable))
