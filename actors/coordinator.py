"""The coordinator: accepts requests, owns the job record, presigns, drives the flow, announces results.

It never touches file data: it presigns the upload for the uploader, completes the multipart
upload from the part ETags the uploader reports, and presigns the download URL.

It keeps the records of the jobs in flight it saved last (bytes and ETag), so a step that moves a
job on saves without loading it first: the save is conditional on that ETag, and when another
replica moved the job on meanwhile it conflicts, and the step runs once more on the stored record.
Every other decision — a duplicate, a redelivery, a stale or unknown step — is made on the stored
record, never on a remembered one; so is every change to storage a step makes before its save
(completing, aborting, deleting), since a save that conflicts cannot take those back.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import ClassVar, Literal

import msgspec

from actors.core.freshness import refresh_problem
from actors.core.jobs import (
    TERMINAL,
    JobRecord,
    decode_record,
    encode_record,
    enter,
    final_event,
    job_id_for,
    may_advance,
    new_record,
    outbox_of,
    owner_of,
    store_owner,
    timings,
    utcnow,
)
from actors.core.parts import SINGLE_PUT_MAX_BYTES, plan_parts
from actors.core.request import validate_request
from actors.core.stages import progress_percent
from actors.guard import check_url
from actors.runtime import metrics
from actors.runtime.storage import storage_config
from actors.runtime.worker import Actor, Context
from bus.base import Unroutable
from messages.codec import Envelope, decode, new_id, request_hints
from messages.errors import Error, ErrorCode, JobError
from messages.routing import reply_queue_allowed
from messages.types import (
    Base,
    ConvertRequested,
    JobCompleted,
    JobFailed,
    JobProgress,
    MediaPlan,
    MediaResolved,
    PartUpload,
    RenewUpload,
    ResolveMedia,
    Stage,
    StepFailed,
    Streamed,
    StreamToStorage,
    UploadMode,
    UploadTarget,
    Verified,
    VerifyObject,
    type_name,
)
from storage import JobStore, Storage, StorageUnavailable, WriteConflict, object_key
from storage.keys import download_filename

log = logging.getLogger("getgoodtape.coordinator")

#: extra validity of upload URLs beyond the job's time limit (queueing before the uploader starts)
UPLOAD_URL_SLACK_S = 600
#: job records remembered between steps (the least recently saved are forgotten first)
RECORD_CACHE_SIZE = 512

#: how the running step handler may read its job's record: "cached" (first run), "fresh" (after a
#: stale one conflicted), None outside the step handlers
_RUN: contextvars.ContextVar[Literal["cached", "fresh"] | None] = contextvars.ContextVar("record_run", default=None)
#: whether the running step works on a remembered record (not loaded from the store in this run)
_REMEMBERED: contextvars.ContextVar[bool] = contextvars.ContextVar("record_remembered", default=False)


class _StaleRecord(Exception):
    """A save on a remembered record conflicted: the stored record moved on since."""


def _step(handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """A step handler that may start from the remembered record; if its save finds the record moved
    on, it runs once more on the stored one (a real conflict then is retried as usual)."""

    @functools.wraps(handler)
    async def run(self: Coordinator, message: Base, ctx: Context) -> None:
        token, remembered = _RUN.set("cached"), _REMEMBERED.set(False)
        try:
            await handler(self, message, ctx)
        except _StaleRecord:
            _RUN.set("fresh")
            _REMEMBERED.set(False)
            await handler(self, message, ctx)
        finally:
            _RUN.reset(token)
            _REMEMBERED.reset(remembered)

    return run


def _stale_failure(record: JobRecord, message: StepFailed) -> bool:
    """Whether the command that failed is no longer the job's (the job moved past it); logs it."""
    if message.cause and message.cause not in {entry.message_id for entry in record.outbox}:
        log.info("stale failure ignored: the job has moved past the failed command",
                 extra={"job_id": record.job_id, "cause": message.cause, "stage": record.stage.value})
        return True
    return False


def _before_storage_change() -> None:
    """Called before a step changes storage ahead of its save: on a remembered record, which may be
    stale, the step runs again on the stored one first (its save could not undo the change)."""
    if _REMEMBERED.get():
        raise _StaleRecord


class Coordinator(Actor):
    """Owns every job: its record, its presigned URLs and its final event."""

    name = "coordinator"
    #: short storage calls; many jobs at once
    prefetch = 16
    #: the stage a job is in while the coordinator handles each message, for announcing a retry
    RETRY_STAGES: ClassVar[dict[type, Stage]] = {ConvertRequested: Stage.QUEUED, MediaResolved: Stage.PREPARING,
                                                 Streamed: Stage.CONVERTING, Verified: Stage.VERIFYING}

    def retry_stage(self, message: Base) -> Stage | None:
        """The job's stage while ``message`` waits for a retry (a request that cannot be recorded yet: queued)."""
        return self.RETRY_STAGES.get(type(message))

    async def setup(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self.storage = await self._stack.enter_async_context(Storage(storage_config(self.settings)))
        self.public = self.storage
        if self.settings.s3_public_endpoint:
            self.public = await self._stack.enter_async_context(
                Storage(storage_config(self.settings, public=True)))
        self.jobs = JobStore(self.storage)
        self._records: OrderedDict[tuple[str, str], tuple[bytes, str]] = OrderedDict()
        for storage in {id(s): s for s in (self.storage, self.public)}.values():
            metrics.watch_file_bytes(storage.client)  # measures that no file byte passes through here

    async def teardown(self) -> None:
        await self._stack.aclose()

    # ------------------------------------------------------------------------------ the record

    async def load(self, job_id: str, owner: str) -> tuple[JobRecord, str] | None:
        """The owner's job record and its ETag, or None (also for another owner's record)."""
        found = await self.jobs.load(job_id, owner=store_owner(owner))
        if found is None:
            self._forget(job_id, owner)
            return None
        record = decode_record(found[0])
        if record.owner != owner:  # the key says whose it is; the record must agree
            log.warning("job record of another owner ignored", extra={"job_id": job_id})
            return None
        self._remember(record, *found)
        return record, found[1]

    def _remember(self, record: JobRecord, data: bytes, etag: str) -> None:
        """Keep a job's stored bytes and ETag for its next step; a finished job's are dropped."""
        key = (record.owner, record.job_id)
        if record.stage in TERMINAL:
            self._records.pop(key, None)
            return
        self._records[key] = (data, etag)
        self._records.move_to_end(key)
        while len(self._records) > RECORD_CACHE_SIZE:
            self._records.popitem(last=False)

    def _forget(self, job_id: str, owner: str) -> None:
        self._records.pop((owner, job_id), None)

    def _remembered(self, job_id: str, owner: str) -> tuple[JobRecord, str] | None:
        """The record this coordinator saved last for the job (a fresh copy), or None."""
        found = self._records.get((owner, job_id))
        return None if found is None else (decode_record(found[0]), found[1])

    async def _commit(self, record: JobRecord, etag: str | None, ctx: Context, commands: list[Base]) -> None:
        """Save the transition, then publish its commands (kept in the outbox for redeliveries)."""
        record.trigger = ctx.envelope.message_id
        record.outbox = outbox_of([(c, new_id()) for c in commands])
        data = encode_record(record)
        try:
            saved = await self.jobs.save(record.job_id, data, etag=etag, owner=store_owner(record.owner))
        except WriteConflict as exc:
            self._forget(record.job_id, record.owner)
            if _RUN.get() == "cached":
                raise _StaleRecord from exc
            raise JobError(ErrorCode.INTERNAL, "job record changed concurrently; retrying", retryable=True) from exc
        except StorageUnavailable as exc:
            self._forget(record.job_id, record.owner)
            raise JobError(ErrorCode.STORAGE_UNAVAILABLE, str(exc)) from exc
        self._remember(record, data, saved)
        await self._publish_outbox(record)

    async def _publish_outbox(self, record: JobRecord) -> None:
        for entry in record.outbox:
            message = decode(entry.body, type_name_hint=entry.type)
            from messages.codec import envelope_for

            await self.bus.publish(message, envelope=envelope_for(message, message_id=entry.message_id),
                                   owner=record.owner)
        if record.stage in TERMINAL:
            await self._announce(record)

    async def _redelivered(self, record: JobRecord, ctx: Context) -> bool:
        """True (after republishing its effects) when this message already made the current state."""
        if record.trigger and record.trigger == ctx.envelope.message_id:
            log.info("redelivered trigger: republishing its commands", extra={"stage": record.stage.value})
            await self._publish_outbox(record)
            return True
        return False

    async def _progress(self, record: JobRecord, stage: Stage, fraction: float, detail: str = "") -> None:
        percent = progress_percent(stage, fraction)
        await self.bus.publish(JobProgress(job_id=record.job_id, stage=stage, percent=percent, detail=detail),
                               owner=record.owner)

    async def _announce(self, record: JobRecord) -> None:
        """Publish the final event on ggt.events, and to the requester's reply-to queue."""
        final = final_event(record)
        if final is None:
            return
        await self.bus.publish(final, owner=record.owner)
        await self._reply(record.owner, record.reply_to, final)

    async def _reply(self, owner: str, queue: str | None, final: Base) -> None:
        """Send a final event to the requester's ``reply_to`` too — only to a queue of its owner's
        (``reply_queue_allowed``): the service may write every queue, a tenant may not aim it at another's."""
        if not queue:
            return
        if not reply_queue_allowed(owner, queue):
            log.warning("reply-to queue outside its owner's namespace refused; final event only on ggt.events",
                        extra={"reply_to": queue})
            return
        try:
            await self.bus.reply(queue, final, owner=owner)
        except Unroutable:  # the requester's queue is gone: ggt.events still has the event
            log.warning("reply-to queue does not exist; final event only on ggt.events", extra={"reply_to": queue})

    # ---------------------------------------------------------------------------- the handlers

    async def convert(self, message: ConvertRequested, ctx: Context) -> None:
        """A new request: validate, create the job (or recognise a duplicate), ask for a plan."""
        owner = owner_of(ctx.envelope.owner)
        job_id = job_id_for(message, message_id=ctx.envelope.message_id, owner=owner)
        reply_to = message.reply_to or ctx.reply_to
        reply_error = None
        if reply_to is not None and not reply_queue_allowed(owner, reply_to):
            reply_error = Error.of(ErrorCode.INVALID_REQUEST, f"reply_to: not a queue of tenant {owner} "
                                   f"(integrator.{owner}.…)")
            reply_to = None  # the answer goes to the owner's events only
        # only this owner's records are looked at: another tenant's job of the same id is not a duplicate
        found = await self._record_for(job_id, owner, quiet=True)
        if found is not None:
            record, _ = found
            if await self._redelivered(record, ctx):
                return  # this very request created the job; its commands are published again
            log.info("duplicate request: same job", extra={"job_id": job_id, "stage": record.stage.value})
            if record.stage in TERMINAL and reply_to:
                await self._announce(msgspec.structs.replace(record, reply_to=reply_to))
            return
        now = utcnow()
        record = new_record(job_id, message, now=now, reply_to=reply_to, owner=owner)
        error = reply_error or validate_request(message, max_duration=self.settings.max_duration)
        if error is None:
            try:
                check_url(message.url, allow=self.settings.allow_networks, deny=self.settings.deny_networks)
            except JobError as exc:
                error = exc.to_error()
        if error is not None:
            enter(record, Stage.FAILED, now=now)
            record.error = error
            await self._commit(record, None, ctx, [])
            return
        await self._commit(record, None, ctx, [ResolveMedia(job_id=job_id, request=message)])
        await self._progress(record, Stage.PREPARING, 0.1, "resolving the media")

    @_step
    async def media_resolved(self, message: MediaResolved, ctx: Context) -> None:
        """The plan is ready: presign the upload and hand the job to an uploader."""
        found = await self._advancing(message.job_id, Stage.PREPARING, ctx)
        if found is None:
            return
        record, etag = found
        plan = message.plan
        record.key = record.key or object_key(record.job_id, plan.extension, now=record.created_at,
                                              nonce=record.key_nonce)
        record.plan = plan
        await self._hand_to_uploader(record, etag, ctx, renewals=0)

    @_step
    async def renew_upload(self, message: RenewUpload, ctx: Context) -> None:
        """An uploader got a stale target (a replayed or expired command): presign a fresh upload and
        hand the job over again — which revives a job that failed for a retryable reason."""
        found = await self._advancing(message.job_id, Stage.CONVERTING, ctx)
        if found is None:
            return
        record, etag = found
        if record.plan is None or message.key != record.key:
            raise JobError(ErrorCode.UPLOAD_FAILED, f"renewal for {message.key}, but the job stores {record.key}")
        if message.plan is not None:  # the uploader re-resolved the inputs: only their URLs may change
            problem = refresh_problem(record.plan, message.plan)
            if problem:
                raise JobError(ErrorCode.INTERNAL, f"renewal with a re-resolved plan refused: {problem}",
                               retryable=False)
            record.plan = message.plan
        if record.stage == Stage.FAILED:
            record.revivals += 1
        old = record.target.multipart if record.target is not None else None
        if old is not None:  # the stale upload, if the uploader did not abort it already
            _before_storage_change()
            with contextlib.suppress(StorageUnavailable):
                await self.storage.abort_multipart(record.key, old.upload_id)
        await self._hand_to_uploader(record, etag, ctx, renewals=ctx.envelope.replays)

    async def _hand_to_uploader(self, record: JobRecord, etag: str, ctx: Context, *, renewals: int) -> None:
        """Presign the upload for the record's plan and send StreamToStorage."""
        assert record.plan is not None
        record.target = await metrics.counted_presign("upload", self._prepare_upload(record.key, record.plan))
        enter(record, Stage.CONVERTING, now=utcnow(), percent=progress_percent(Stage.CONVERTING, 0))
        command = StreamToStorage(job_id=record.job_id, plan=record.plan, target=record.target,
                                  time_limit=self.settings.job_time_limit, renewals=renewals)
        try:
            await self._commit(record, etag, ctx, [command])
        except BaseException:
            if record.target.multipart is not None:  # never recorded: nobody else would abort it
                with contextlib.suppress(Exception):
                    await self.storage.abort_multipart(record.key, record.target.multipart.upload_id)
            raise
        await self._progress(record, Stage.CONVERTING, 0.0, "converting and uploading")

    @_step
    async def streamed(self, message: Streamed, ctx: Context) -> None:
        """Every byte is stored: complete the multipart upload and ask for verification."""
        found = await self._advancing(message.job_id, Stage.CONVERTING, ctx)
        if found is None:
            return
        record, etag = found
        assert record.plan is not None and record.target is not None
        if message.key != record.key:
            raise JobError(ErrorCode.UPLOAD_FAILED, f"uploader stored {message.key}, expected {record.key}")
        multipart = record.target.multipart
        if message.upload_mode == "multipart" or multipart is not None:
            _before_storage_change()
        if message.upload_mode == "multipart":
            await self._storage_call(self.storage.complete_multipart(
                record.key, message.upload_id, [(p.number, p.etag) for p in message.parts]))
        elif multipart is not None:  # the uploader aborts it too; make sure nothing stays open
            await self._storage_call(self.storage.abort_multipart(record.key, multipart.upload_id))
        record.streamed = message
        enter(record, Stage.VERIFYING, now=utcnow(), percent=progress_percent(Stage.VERIFYING, 0))
        plan = record.plan
        command = VerifyObject(job_id=record.job_id, key=record.key, size=message.size, etag=message.etag,
                               content_type=plan.content_type, format=plan.format,
                               # an unknown source duration (0): what ffmpeg reported producing
                               duration=plan.duration or message.duration,
                               expect_codecs=plan.expect_codecs, produced=message.duration)
        await self._commit(record, etag, ctx, [command])
        await self._progress(record, Stage.VERIFYING, 0.0, "verifying the stored file")

    @_step
    async def verified(self, message: Verified, ctx: Context) -> None:
        """The verdict: presign the download and complete the job, or delete the object and fail it."""
        found = await self._advancing(message.job_id, Stage.VERIFYING, ctx)
        if found is None:
            return
        record, etag = found
        if not message.ok:
            failed = JobError(ErrorCode.VERIFICATION_FAILED, "; ".join(message.problems), retryable=message.retryable)
            await self._fail(record, etag, ctx, failed.to_error(), clean_up=True)
            return
        assert record.plan is not None and record.streamed is not None
        now = utcnow()
        enter(record, Stage.FINISHING, now=now)
        ttl = self.settings.download_url_ttl
        url = await metrics.counted_presign("download", self.public.presign_get(
            record.key, expires=ttl,
            filename=download_filename(record.plan.title, record.plan.extension, record.job_id)))
        enter(record, Stage.COMPLETED, now=now, percent=100.0)
        record.result = JobCompleted(
            job_id=record.job_id, download_url=url, expires_at=(now + timedelta(seconds=ttl)).isoformat(),
            key=record.key, format=record.plan.format, quality=record.plan.quality,
            content_type=record.plan.content_type, size=record.streamed.size, sha256=record.streamed.sha256,
            duration=message.duration or record.plan.duration, title=record.plan.title,
            timings=timings(record, now=now),
        )
        await self._commit(record, etag, ctx, [])
        metrics.job_timings(record.plan.format.value, record.result.timings)
        if record.target is not None and record.target.multipart is not None:
            await self._sweep_uploads(record)  # without a multipart upload there is nothing to sweep

    async def step_failed(self, message: StepFailed, ctx: Context) -> None:
        """A step failed: clean up and fail the job (announced even for a job never recorded)."""
        owner = owner_of(ctx.envelope.owner)
        found = await self._record_for(message.job_id, owner)
        if found is None:
            final = JobFailed(job_id=message.job_id, error=message.error, stage=Stage.PREPARING)
            await self.bus.publish(final, owner=owner)
            await self._reply(owner, ctx.reply_to, final)
            return
        record, etag = found
        if await self._redelivered(record, ctx) or record.stage in TERMINAL or _stale_failure(record, message):
            return
        await self._fail(record, etag, ctx, message.error)

    async def on_failure(self, message: Base | None, error: Error, ctx: Context) -> None:
        """The coordinator's own step failed: fail the job directly (no StepFailed to itself)."""
        owner = owner_of(ctx.envelope.owner)
        job_id = getattr(message, "job_id", None) or ctx.envelope.job_id
        if isinstance(message, ConvertRequested):
            job_id = job_id_for(message, message_id=ctx.envelope.message_id, owner=owner)
        if not job_id:
            return
        found = await self._record_for(job_id, owner)
        if found is None:
            final = JobFailed(job_id=job_id, error=error, stage=Stage.PREPARING)
            await self.bus.publish(final, owner=owner)
            await self._reply(owner, getattr(message, "reply_to", None) or ctx.reply_to, final)
            return
        record, etag = found
        # a StepFailed that could not be recorded (dead-lettered) may have been overtaken meanwhile —
        # the failed command replayed and the job renewed: its failure is then no longer the job's
        if record.stage not in TERMINAL and not (isinstance(message, StepFailed) and _stale_failure(record, message)):
            await self._fail(record, etag, ctx, error)

    async def on_undecodable(self, body: bytes, envelope: Envelope, error: Error, ctx: Context) -> None:
        """A request that cannot become a job is still answered: when it names a job id that has no
        record, JobFailed (invalid_request, naming the field) goes to that job's events and reply-to."""
        hints = request_hints(body) if envelope.type == type_name(ConvertRequested) else None
        if hints is None or await self._record_for(hints.job_id, owner_of(ctx.owner), quiet=True) is not None:
            return  # an existing job is never touched by a message that proves nothing
        final = JobFailed(job_id=hints.job_id, error=Error.of(ErrorCode.INVALID_REQUEST, error.detail),
                          stage=Stage.PREPARING)
        await self.bus.publish(final, owner=ctx.owner)
        await self._reply(owner_of(ctx.owner), hints.reply_to or ctx.reply_to, final)

    # ------------------------------------------------------------------------------- helpers

    async def _advancing(self, job_id: str, expected: Stage, ctx: Context) -> tuple[JobRecord, str] | None:
        """The record and ETag when this step result may move the job on from ``expected``; None for
        an unknown job, a duplicate, or a redelivered trigger (whose commands are republished).

        The remembered record is used only when it lets the step advance (its save is conditional on
        its ETag, so a stale one conflicts and the step runs again); to ignore or republish, the
        stored record decides."""
        owner = owner_of(ctx.envelope.owner)
        remembered = self._remembered(job_id, owner) if _RUN.get() == "cached" else None
        if remembered is not None and remembered[0].trigger != ctx.envelope.message_id and may_advance(
                remembered[0], expected=expected, replayed=ctx.envelope.replays > 0):
            _REMEMBERED.set(True)
            return remembered
        found = await self._record_for(job_id, owner)
        if found is None:
            return None
        record, _ = found
        if await self._redelivered(record, ctx) or not may_advance(
                record, expected=expected, replayed=ctx.envelope.replays > 0):
            return None
        return found

    async def _record_for(self, job_id: str, owner: str, *, quiet: bool = False) -> tuple[JobRecord, str] | None:
        try:
            found = await self.load(job_id, owner)
        except StorageUnavailable as exc:
            raise JobError(ErrorCode.STORAGE_UNAVAILABLE, str(exc)) from exc
        if found is None and not quiet:
            log.warning("message for an unknown job ignored", extra={"job_id": job_id})
        return found

    async def _storage_call(self, call):
        try:
            return await call
        except StorageUnavailable as exc:
            raise JobError(ErrorCode.STORAGE_UNAVAILABLE, str(exc)) from exc

    async def _prepare_upload(self, key: str, plan: MediaPlan) -> UploadTarget:
        """Presigned URLs covering the plan's maximum size: a single PUT, parts and an abort."""
        expires = int(self.settings.job_time_limit + UPLOAD_URL_SLACK_S)
        mode = UploadMode(self.settings.upload_mode)
        put_url = await self.storage.presign_put(key, content_type=plan.content_type, expires=expires)
        multipart = None
        if mode == UploadMode.AUTO and plan.max_bytes > SINGLE_PUT_MAX_BYTES:
            part_size, count = plan_parts(plan.max_bytes, part_size=self.settings.part_size)
            upload_id = await self._storage_call(self.storage.create_multipart(key, content_type=plan.content_type))
            multipart = PartUpload(
                upload_id=upload_id, part_size=part_size,
                part_urls=await self.storage.presign_parts(key, upload_id, count=count, expires=expires),
                abort_url=await self.storage.presign_abort(key, upload_id, expires=expires),
            )
        return UploadTarget(key=key, content_type=plan.content_type, put_url=put_url, mode=mode,
                            multipart=multipart,
                            expires_at=(utcnow() + timedelta(seconds=expires)).isoformat())

    async def _fail(self, record: JobRecord, etag: str, ctx: Context, error: Error, *,
                    clean_up: bool | None = None) -> None:
        """Record and announce the failure. A permanent failure (or ``clean_up``) also aborts the open
        upload and deletes what is stored; a retryable one keeps them, since an operator's replay of
        the dead-lettered step can revive the job (the sweep at completion, or the bucket's lifecycle
        rule, removes what stays)."""
        target = record.target
        if target is not None and (not error.retryable if clean_up is None else clean_up):
            _before_storage_change()
            with contextlib.suppress(StorageUnavailable):
                if target.multipart is not None:
                    await self.storage.abort_multipart(record.key, target.multipart.upload_id)
                await self.storage.delete(record.key)
        enter(record, Stage.FAILED, now=utcnow())
        record.error = error
        await self._commit(record, etag, ctx, [])

    async def _sweep_uploads(self, record: JobRecord) -> None:
        """Abort any multipart upload of this job's key left by a crash between create and save."""
        with contextlib.suppress(StorageUnavailable):
            for upload in await self.storage.list_multipart_uploads(prefix=record.key):
                if upload.key == record.key:
                    await self.storage.abort_multipart(upload.key, upload.upload_id)


