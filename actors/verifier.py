"""The verifier: checks the stored object against what was streamed, then probes the media itself.

HEAD: size, ETag (md5 or md5-of-md5s) and Content-Type — the stored bytes are exactly those streamed.
Probe through a presigned GET: container, codecs, and a duration within 2 % or 0.5 s of the expected
one — which catches a source that was cut off mid-way even when ffmpeg exited cleanly. A container
that carries its duration (MP3, WAV) is probed from its header; a piped or fragmented one (MP4/M4A,
WebM, Ogg, FLAC) from its head only, its duration being what ffmpeg reported producing — read whole,
counting packets, only when that report is missing (``verdict.reads_whole``).

A verdict is retryable only when the stored object differs from what was streamed (storage's
doing); a media mismatch is deterministic. A store that does not answer (HEAD, or the probe's GET)
is no verdict at all: the step is retried as ``storage_unavailable`` and the file kept.
"""

from __future__ import annotations

import contextlib

from actors.adapters.prober import ProbePool
from actors.core.catalog import CATALOG
from actors.core.verdict import media_problems, object_problems, probe_timeout, reads_whole, stored_duration
from actors.runtime import metrics
from actors.runtime.storage import storage_config
from actors.runtime.worker import Actor, Context
from messages.errors import ErrorCode, JobError
from messages.types import Stage, Verified, VerifyObject
from storage import Storage, StorageUnavailable

#: seconds the probe's presigned GET stays valid
PROBE_URL_TTL = 900


class Verifier(Actor):
    """VerifyObject → HEAD + probe → Verified."""

    name = "verifier"
    stage = Stage.VERIFYING

    async def setup(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self.storage = await self._stack.enter_async_context(Storage(storage_config(self.settings)))
        self.probes = await self._stack.enter_async_context(ProbePool(self.settings.prefetch or self.prefetch))

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
            # spread over its fragments: their head gives container and codecs, and the duration is
            # ffmpeg's report — or, without one, the packets', counted reading the file front to back
            whole = reads_whole(message)
            try:
                probe = await self.probes.probe(
                    url, timeout=probe_timeout(message.size, self.settings.job_time_limit),
                    count_packets=whole, head_only=CATALOG[message.format].packet_counted and not whole,
                    memory_limit=self.settings.child_memory_limit)
            except JobError as exc:
                if exc.code == ErrorCode.MEDIA_UNAVAILABLE:  # storage did not serve it: try again, keep the file
                    raise JobError(ErrorCode.STORAGE_UNAVAILABLE, f"probing the stored file: {exc.detail}",
                                   retryable=True) from exc
                problems.append(f"the stored file cannot be probed: {exc.detail or exc.code}")
            else:
                problems += media_problems(probe, message)
                measured = stored_duration(probe, message) or 0.0
        metrics.verification(not problems)
        await ctx.publish(Verified(job_id=message.job_id, key=message.key, ok=not problems,
                                   problems=problems, duration=round(measured, 3), retryable=retryable))
