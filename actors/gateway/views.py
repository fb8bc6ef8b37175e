"""What the API answers, as msgspec Structs: the responses are encoded from these and the OpenAPI
document's schemas are generated from them (never written by hand)."""

from __future__ import annotations

from datetime import datetime

import msgspec

from messages.errors import Error
from messages.types import JobCompleted, Stage


class Links(msgspec.Struct, frozen=True, kw_only=True):
    """Where to follow an accepted job."""

    self: str
    events: str
    download: str


class Accepted(msgspec.Struct, frozen=True, kw_only=True):
    """202 to POST /api/convert: the job id (given or generated) and its links."""

    job_id: str
    links: Links


class JobView(msgspec.Struct, frozen=True, kw_only=True):
    """A job as GET /api/jobs/{id} shows it, read from the coordinator's job record."""

    job_id: str
    stage: Stage
    percent: float
    format: str
    url: str
    created_at: datetime | None = None
    updated_at: datetime | None = None
    result: JobCompleted | None = None
    error: Error | None = None
    links: Links | None = None


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    """A failure: a stable code, a human message, and where it applies."""

    code: str
    message: str
    field: str | None = None
    detail: str | None = None
    retryable: bool | None = None


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """Every error answer."""

    error: ErrorDetail


class FormatStatsView(msgspec.Struct, frozen=True, kw_only=True):
    """Stored files of one format."""

    objects: int
    bytes: int


class StorageView(msgspec.Struct, frozen=True, kw_only=True):
    """What is in the bucket now: converted files by format and open multipart uploads."""

    objects: int
    bytes: int
    by_format: dict[str, FormatStatsView]
    open_uploads: int


class Rates(msgspec.Struct, frozen=True, kw_only=True):
    """The original design note's key figures; null until there is a sample (see docs/API.md)."""

    presigned_url_success_rate: float | None
    direct_upload_success_rate: float | None
    verification_pass_rate: float | None
    average_processing_seconds: float | None


class Counts(msgspec.Struct, frozen=True, kw_only=True):
    """The numerators and denominators behind the rates, since ``since``."""

    since: datetime
    jobs_seen: int
    completed: int
    failed: int
    failed_by_code: dict[str, int]
    presign_attempts: int
    presign_failures: int
    upload_attempts: int
    upload_failures: int
    verifications: int
    verification_failures: int
    completed_by_format: dict[str, int]
    average_seconds_by_format: dict[str, float]


class DataPath(msgspec.Struct, frozen=True, kw_only=True):
    """Where file bytes went: straight to storage, and (measured) none through the coordinator."""

    #: ggt_coordinator_file_bytes_total, when a coordinator runs in the gateway's process; else null
    coordinator_file_bytes: int | None
    #: ggt_bytes_streamed_total, when an uploader runs in the gateway's process; else null
    uploader_bytes_streamed: int | None
    #: sum of JobCompleted.size the gateway saw
    completed_bytes: int
    #: actors running in the gateway's own process (their counters are readable here)
    actors_in_process: list[str]


class StatsView(msgspec.Struct, frozen=True, kw_only=True):
    """GET /api/storage/stats."""

    storage: StorageView
    rates: Rates
    counts: Counts
    data_path: DataPath
    queues: dict[str, int]


class FormatInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One output format and the qualities it accepts."""

    format: str
    video: bool
    qualities: list[str]
    default_quality: str


class Formats(msgspec.Struct, frozen=True, kw_only=True):
    """GET /api/formats."""

    formats: list[FormatInfo]


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """GET /healthz and /readyz."""

    status: str
    checks: dict[str, str] = {}
