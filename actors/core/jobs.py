"""The job record and the pure decisions about it: job ids, which step a message may advance, timings.

The coordinator keeps one JobRecord per job as JSON under ``jobs/<owner>/<job id>.json`` in the
bucket (storage.JobStore; ``jobs/<job id>.json`` for the default tenant), so replicas share it and
it survives restarts. A job is named by its owner (tenant) and its job id together: the same id
from two tenants is two jobs, and nobody reads a record under another tenant's prefix. Every transition is saved
(optimistic concurrency on the record's ETag) *before* its outgoing commands are published; the
commands are kept in the record's outbox with their message ids, so a redelivered trigger
republishes exactly the same commands instead of redoing the step.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime

import msgspec

from messages.errors import Error, ErrorCode
from messages.routing import DEFAULT_TENANT
from messages.types import (
    STAGE_ORDER,
    Base,
    ConvertRequested,
    JobCompleted,
    JobFailed,
    MediaPlan,
    Stage,
    Streamed,
    UploadTarget,
)

#: namespace of job ids derived from idempotency keys or message ids (uuid5)
JOB_ID_NAMESPACE = uuid.UUID("6f1c4e1e-8f0b-4c7e-9d43-6b2f3b7a9c10")

#: stages in the order a job passes them
ORDER = STAGE_ORDER
TERMINAL = (Stage.COMPLETED, Stage.FAILED)


class OutboxEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A command the last transition published, kept to republish it identically."""

    type: str
    message_id: str
    body: bytes


class JobRecord(msgspec.Struct, kw_only=True):
    """Everything known about one job."""

    job_id: str
    request: ConvertRequested
    stage: Stage
    #: the tenant that owns the job (records written before tenants belong to the default one)
    owner: str = DEFAULT_TENANT
    created_at: datetime
    updated_at: datetime
    reply_to: str | None = None
    percent: float = 0.0
    key: str = ""
    plan: MediaPlan | None = None
    target: UploadTarget | None = None
    streamed: Streamed | None = None
    result: JobCompleted | None = None
    error: Error | None = None
    #: when each stage began (stage → ISO time)
    stage_started: dict[str, datetime] = {}
    #: the message that caused the current state, and what it published
    trigger: str = ""
    outbox: list[OutboxEntry] = []
    #: how many times a dead-lettered step of this job was replayed into it
    revivals: int = 0
    #: random part of the object key, so keys stay unguessable even for client-chosen job ids
    key_nonce: str = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(JobRecord)


def encode_record(record: JobRecord) -> bytes:
    """The record as stored."""
    return _encoder.encode(record)


def decode_record(data: bytes) -> JobRecord:
    """A stored record."""
    return _decoder.decode(data)


def job_id_for(request: ConvertRequested, *, message_id: str, owner: str = DEFAULT_TENANT) -> str:
    """The job a request belongs to within its owner: its own job id, else one derived from the
    owner and its idempotency key, else one derived from the message id (so a redelivered request
    is the same job). The default tenant derives ids as before tenants existed."""
    if request.job_id:
        return request.job_id
    scope = "" if owner == DEFAULT_TENANT else f"owner:{owner}:"
    if request.idempotency_key:
        return uuid.uuid5(JOB_ID_NAMESPACE, scope + "key:" + request.idempotency_key).hex
    return uuid.uuid5(JOB_ID_NAMESPACE, scope + "msg:" + message_id).hex


def store_owner(owner: str) -> str:
    """The owner segment of a record's key: none for the default tenant (its records keep their
    pre-tenant keys ``jobs/<job id>.json``)."""
    return "" if owner in ("", DEFAULT_TENANT) else owner


def owner_of(envelope_owner: str) -> str:
    """The tenant a message acts for: its ``ggt-owner`` header, else the default tenant."""
    return envelope_owner or DEFAULT_TENANT


def new_record(job_id: str, request: ConvertRequested, *, now: datetime, reply_to: str | None,
               owner: str = DEFAULT_TENANT) -> JobRecord:
    """A fresh record for a request just accepted."""
    return JobRecord(job_id=job_id, request=request, stage=Stage.PREPARING, created_at=now, updated_at=now,
                     reply_to=reply_to, stage_started={Stage.PREPARING.value: now},
                     key_nonce=secrets.token_hex(8), owner=owner)


def may_advance(record: JobRecord, *, expected: Stage, replayed: bool) -> bool:
    """Whether a step result that belongs to stage ``expected`` may move the job on.

    A result for an earlier or later stage is a duplicate (ignored). A job that failed with a
    retryable error is revived when the step is replayed from a dead-letter queue.
    """
    if record.stage == expected:
        return True
    return (record.stage == Stage.FAILED and replayed and record.error is not None and record.error.retryable
            and failed_stage(record) == expected)


def failed_stage(record: JobRecord) -> Stage:
    """The stage a failed job was in: the furthest non-terminal stage it started."""
    started = [Stage(s) for s in record.stage_started if Stage(s) in ORDER and Stage(s) not in TERMINAL]
    return max(started, key=ORDER.index) if started else Stage.PREPARING


def final_event(record: JobRecord) -> JobCompleted | JobFailed | None:
    """The event that announces a finished job, or None while it runs."""
    if record.stage == Stage.COMPLETED and record.result is not None:
        return record.result
    if record.stage == Stage.FAILED:
        return JobFailed(job_id=record.job_id, stage=failed_stage(record),
                         error=record.error or Error.of(ErrorCode.INTERNAL))
    return None


def enter(record: JobRecord, stage: Stage, *, now: datetime, percent: float | None = None) -> None:
    """Move the record to ``stage`` (recording when it began)."""
    record.stage = stage
    record.updated_at = now
    record.stage_started[stage.value] = now
    if percent is not None:
        record.percent = max(record.percent, percent)
    if stage != Stage.FAILED:
        record.error = None


def timings(record: JobRecord, *, now: datetime) -> dict[str, float]:
    """Seconds spent in each stage so far, and the total."""
    marks = sorted(((t, s) for s, t in record.stage_started.items()), key=lambda x: x[0])
    out: dict[str, float] = {}
    for (start, stage), (end, _) in zip(marks, [*marks[1:], (now, "")], strict=True):
        if stage in (Stage.COMPLETED.value, Stage.FAILED.value):
            continue
        out[stage] = round(out.get(stage, 0.0) + (end - start).total_seconds(), 3)
    out["total"] = round((now - record.created_at).total_seconds(), 3)
    return out


def outbox_of(messages: list[tuple[Base, str]]) -> list[OutboxEntry]:
    """Outbox entries for (message, message id) pairs."""
    from messages.codec import encode
    from messages.types import type_name

    return [OutboxEntry(type=type_name(type(m)), message_id=mid, body=encode(m)) for m, mid in messages]


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)
