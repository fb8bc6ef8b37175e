"""The gateway's own view of job outcomes, counted from the events on ``job.#`` (pure: no I/O).

The gateway is its own process, so it cannot read the actors' counters; every JobProgress,
JobCompleted and JobFailed reaches it, though, and the four figures of the original design note
follow from which stages jobs reached and the codes they failed with (definitions in docs/API.md).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from datetime import datetime

from messages.errors import ErrorCode
from messages.types import STAGE_ORDER, Base, JobCompleted, JobFailed, JobProgress, Stage

#: jobs whose furthest stage is remembered (older ones are forgotten first); bounds the memory
MAX_TRACKED_JOBS = 20_000
#: a job failing in preparing with these codes failed while the coordinator presigned its upload
PRESIGN_FAILURE_CODES = frozenset({ErrorCode.STORAGE_UNAVAILABLE})
#: a job failing in converting with these codes failed in the upload itself (not in ffmpeg or the source)
UPLOAD_FAILURE_CODES = frozenset({ErrorCode.UPLOAD_FAILED, ErrorCode.STORAGE_UNAVAILABLE})

_CONVERTING, _VERIFYING, _FINAL = 1, 2, 4
#: progress stages at or past converting / verifying (completed is counted by its final event)
_CONVERTING_OR_LATER = STAGE_ORDER[STAGE_ORDER.index(Stage.CONVERTING):-1]
_VERIFYING_OR_LATER = STAGE_ORDER[STAGE_ORDER.index(Stage.VERIFYING):-1]


class OutcomeTracker:
    """Counts what jobs reached; feed it every event with ``observe``."""

    def __init__(self, *, since: datetime, max_jobs: int = MAX_TRACKED_JOBS) -> None:
        self.since = since
        self._max_jobs = max_jobs
        self._jobs: OrderedDict[str, int] = OrderedDict()
        self.presign_ok = self.presign_failed = 0
        self.upload_ok = self.upload_failed = 0
        self.verified_ok = self.verified_failed = 0
        self.completed = self.failed = 0
        self.failed_by_code: Counter[str] = Counter()
        self.completed_by_format: Counter[str] = Counter()
        self.seconds_by_format: Counter[str] = Counter()
        self.completed_bytes = 0

    @property
    def jobs_seen(self) -> int:
        """Jobs this tracker remembers (at most ``max_jobs``)."""
        return len(self._jobs)

    def observe(self, message: Base) -> None:
        """Account one event; duplicates (a final event announced twice) change nothing."""
        if isinstance(message, JobProgress):
            if message.stage in _CONVERTING_OR_LATER:
                self._reach(message.job_id, _CONVERTING)
            if message.stage in _VERIFYING_OR_LATER:
                self._reach(message.job_id, _VERIFYING)
        elif isinstance(message, JobCompleted):
            self._reach(message.job_id, _CONVERTING | _VERIFYING)
            if self._reach(message.job_id, _FINAL):
                self.completed += 1
                self.verified_ok += 1
                self.completed_by_format[message.format.value] += 1
                self.seconds_by_format[message.format.value] += message.timings.get("total", 0.0)
                self.completed_bytes += message.size
        elif isinstance(message, JobFailed):
            self._reach(message.job_id, _reached_before(message.stage))
            if not self._reach(message.job_id, _FINAL):
                return
            self.failed += 1
            code = message.error.code
            self.failed_by_code[str(code)] += 1
            if message.stage == Stage.PREPARING and code in PRESIGN_FAILURE_CODES:
                self.presign_failed += 1
            elif message.stage == Stage.CONVERTING and code in UPLOAD_FAILURE_CODES:
                self.upload_failed += 1
            elif code == ErrorCode.VERIFICATION_FAILED:
                self.verified_failed += 1

    def _reach(self, job_id: str, flags: int) -> bool:
        """Mark ``flags`` reached for the job; True when one of them is new."""
        before = self._jobs.get(job_id, 0)
        self._jobs[job_id] = after = before | flags
        self._jobs.move_to_end(job_id)
        while len(self._jobs) > self._max_jobs:
            self._jobs.popitem(last=False)
        new = after & ~before
        if new & _CONVERTING:
            self.presign_ok += 1
        if new & _VERIFYING:
            self.upload_ok += 1
        return bool(new)

    def rates(self) -> dict[str, float | None]:
        """The four figures; None where there is no sample yet."""
        return {
            "presigned_url_success_rate": ratio(self.presign_ok, self.presign_ok + self.presign_failed),
            "direct_upload_success_rate": ratio(self.upload_ok, self.upload_ok + self.upload_failed),
            "verification_pass_rate": ratio(self.verified_ok, self.verified_ok + self.verified_failed),
            "average_processing_seconds": (round(sum(self.seconds_by_format.values()) / self.completed, 3)
                                           if self.completed else None),
        }

    def counts(self) -> dict[str, object]:
        """The numerators and denominators behind ``rates``."""
        return {
            "since": self.since, "jobs_seen": self.jobs_seen, "completed": self.completed, "failed": self.failed,
            "failed_by_code": dict(self.failed_by_code),
            "presign_attempts": self.presign_ok + self.presign_failed, "presign_failures": self.presign_failed,
            "upload_attempts": self.upload_ok + self.upload_failed, "upload_failures": self.upload_failed,
            "verifications": self.verified_ok + self.verified_failed,
            "verification_failures": self.verified_failed,
            "completed_by_format": dict(self.completed_by_format),
            "average_seconds_by_format": {f: round(self.seconds_by_format[f] / n, 3)
                                          for f, n in self.completed_by_format.items() if n},
        }


def _reached_before(stage: Stage) -> int:
    """What a job that failed in ``stage`` must have got past."""
    if stage in _VERIFYING_OR_LATER:
        return _CONVERTING | _VERIFYING
    return _CONVERTING if stage == Stage.CONVERTING else 0


def ratio(part: int, whole: int) -> float | None:
    """``part / whole`` rounded to four places, or None when ``whole`` is 0."""
    return round(part / whole, 4) if whole else None
