"""How a delivery is settled: pure decisions the Worker (``actors/runtime/worker.py``) applies.

Three questions, each a function of plain values:

- ``classify``: which coded error an exception means (a table, ``ERROR_TABLE``, not a guess);
- ``unauthenticated``, ``undecodable``, ``refusal``: whether a delivery may reach its handler at
  all (a MAC, a decodable body, a live delivery count, a handler for its type), and the dead letter
  it becomes when it may not;
- ``settle``: what to do with the delivery after its handler ran (or did not):
  ``Ack`` | ``Retry(delay)`` | ``DeadLetter`` | ``Release``.

The Worker applies the answer: it reports the job's failure when told to, settles the delivery
and records the one metric the answer names (``Settlement.outcome``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import msgspec

from bus.base import retry_delay
from messages.errors import Error, ErrorCode, JobError
from storage.errors import StorageMisconfigured, StorageUnavailable

#: the outcome label of ``getgoodtape_messages_*`` metrics; None records nothing (a duplicate, a release)
Outcome = Literal["processed", "failed", "retried", "dead_lettered"] | None


# ------------------------------------------------------------------------------- what failed


#: exception type → (code, retryable), the first matching row wins: what an exception a handler did
#: not turn into a JobError means. Everything not listed — a broker or network error, a bug — is
#: ``internal`` and retryable: a few attempts cost little, and the dead letter keeps it for a replay.
ERROR_TABLE: tuple[tuple[type[BaseException], ErrorCode, bool], ...] = (
    (StorageMisconfigured, ErrorCode.STORAGE_MISCONFIGURED, False),  # the settings are wrong: retrying cannot help
    (StorageUnavailable, ErrorCode.STORAGE_UNAVAILABLE, True),
)


def classify(exc: BaseException) -> JobError:
    """The coded error ``exc`` means: a JobError as it is, anything else by ``ERROR_TABLE``."""
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return classify(exc.exceptions[0])  # a TaskGroup wraps the one error that ended it
    detail = f"{type(exc).__name__}: {exc}"
    for types, code, retryable in ERROR_TABLE:
        if isinstance(exc, types):
            return JobError(code, detail, retryable=retryable)
    return JobError(ErrorCode.INTERNAL, detail, retryable=True)


# --------------------------------------------------------------------------- what to do about it


class Ack(msgspec.Struct, frozen=True, kw_only=True):
    """Done with the delivery. ``report``: tell the job about ``error`` first (a failed step)."""

    outcome: Outcome = "processed"
    error: Error | None = None
    report: bool = False
    #: remember the message id, so a redelivered copy is dropped as a duplicate
    remember: bool = True


class Retry(msgspec.Struct, frozen=True, kw_only=True):
    """A delayed copy through the retry tier holding ``delay`` seconds, attempt + 1; then ack."""

    delay: float
    error: Error
    outcome: Outcome = "retried"


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """Into the actor's dead-letter queue with ``error``. ``report``: tell the job first."""

    error: Error
    report: bool = False
    outcome: Outcome = "dead_lettered"


class Release(msgspec.Struct, frozen=True, kw_only=True):
    """Give the delivery back unsettled: it is delivered again (shutdown), never dead-lettered."""

    outcome: Outcome = None


Settlement = Ack | Retry | DeadLetter | Release


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """The settings ``settle`` reads (``GGT_MAX_ATTEMPTS``, ``GGT_RETRY_DELAYS``, ``GGT_DELIVERY_LIMIT``)."""

    max_attempts: int
    retry_delays: Sequence[float]
    delivery_limit: int


class Cancelled(msgspec.Struct, frozen=True):
    """The handler was cancelled (shutdown)."""


#: what a handler's run ended with: None (it returned), a coded failure, or a cancellation
Ending = JobError | Cancelled | None


def unauthenticated(where: str) -> DeadLetter:
    """A delivery without a valid MAC: nobody who holds the key sent it, so nothing it says is acted
    on — not even the job it names — and it is dead-lettered unread."""
    return DeadLetter(error=Error.of(ErrorCode.UNAUTHENTICATED_MESSAGE,
                                     f"no valid MAC on a message delivered from {where}"))


def undecodable(field: str, reason: str) -> DeadLetter:
    """A body that cannot be decoded is permanent: a dead letter at once, naming the field; no job touched."""
    return DeadLetter(error=Error.of(ErrorCode.UNDECODABLE_MESSAGE, f"{field}: {reason}" if field else reason))


def refusal(*, deliveries: int, has_handler: bool, limits: Limits, actor: str, type_name: str) -> DeadLetter | None:
    """Why a decoded message must not reach a handler, as the dead letter it becomes, or None.

    A delivery count at the limit: the broker would dead-letter the message after this delivery
    without a word to the job — a process died on it every time — so it ends here, reported.
    """
    if deliveries >= limits.delivery_limit:
        return DeadLetter(report=True, error=Error.of(
            ErrorCode.INTERNAL,
            f"delivered {deliveries + 1} times without being settled (the handling process kept dying)"))
    if not has_handler:
        return DeadLetter(error=Error.of(ErrorCode.UNDECODABLE_MESSAGE,
                                         f"actor {actor} has no handler for {type_name}"))
    return None


def settle(ending: Ending, *, attempt: int, limits: Limits, rng: random.Random | None = None) -> Settlement:
    """What to do with a delivery whose handler ended with ``ending`` on attempt ``attempt`` (1-based).

    - returned → ack;
    - a permanent failure (the time limit included) → report the job's failure, ack;
    - a retryable failure before the last attempt → a delayed retry (``retry_delay`` of the attempt);
    - a retryable failure on the last attempt → report the job's failure, dead letter;
    - cancelled (shutdown) → release.
    """
    if ending is None:
        return Ack()
    if isinstance(ending, Cancelled):
        return Release()
    error = ending.to_error()
    if not ending.retryable:
        return Ack(outcome="failed", error=error, report=True)
    if attempt < limits.max_attempts:
        return Retry(delay=retry_delay(attempt, limits.retry_delays, rng=rng), error=error)
    return DeadLetter(error=error, report=True)


def unreported(settlement: Settlement) -> Settlement:
    """What ``settlement`` becomes when reporting the job's failure failed (storage or broker down):
    an ack would lose the failure, so the message is dead-lettered for a replay instead."""
    if isinstance(settlement, Ack) and settlement.report and settlement.error is not None:
        return DeadLetter(error=settlement.error)
    return settlement
