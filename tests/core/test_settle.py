"""The settle decision with plain values: which settlement for which ending, which code for which exception."""

from __future__ import annotations

import random

import aiohttp
import pytest

from actors.runtime.settle import (
    Ack,
    Cancelled,
    DeadLetter,
    Limits,
    Release,
    Retry,
    classify,
    refusal,
    settle,
    unauthenticated,
    undecodable,
    unreported,
)
from bus.base import BusError
from messages.errors import ErrorCode, JobError
from storage.errors import StorageMisconfigured, StorageUnavailable

LIMITS = Limits(max_attempts=3, retry_delays=(1.0, 5.0, 25.0), delivery_limit=10)


def test_a_handler_that_returned_is_acked_and_remembered() -> None:
    assert settle(None, attempt=1, limits=LIMITS) == Ack(outcome="processed", remember=True)


def test_a_permanent_failure_is_reported_and_acked_on_any_attempt() -> None:
    failure = JobError(ErrorCode.TOO_LONG, "3 h")
    for attempt in (1, 3, 7):
        assert settle(failure, attempt=attempt, limits=LIMITS) == Ack(outcome="failed", error=failure.to_error(),
                                                                       report=True)


def test_a_retryable_failure_is_retried_with_the_attempts_tier_jittered_down_by_at_most_half() -> None:
    failure = JobError(ErrorCode.STORAGE_UNAVAILABLE, "503")
    first = settle(failure, attempt=1, limits=LIMITS, rng=random.Random(7))
    second = settle(failure, attempt=2, limits=LIMITS, rng=random.Random(7))
    assert isinstance(first, Retry) and isinstance(second, Retry)
    assert first.error == failure.to_error() and first.outcome == "retried"
    assert 0.5 <= first.delay <= 1.0 and 2.5 <= second.delay <= 5.0
    assert second.delay == pytest.approx(first.delay * 5)  # same jitter draw, next tier


def test_a_retryable_failure_on_the_last_attempt_is_reported_and_dead_lettered() -> None:
    failure = JobError(ErrorCode.INTERNAL, "boom", retryable=True)
    assert settle(failure, attempt=3, limits=LIMITS) == DeadLetter(error=failure.to_error(), report=True)
    assert settle(failure, attempt=4, limits=LIMITS) == DeadLetter(error=failure.to_error(), report=True)


def test_a_cancelled_handler_is_released_and_counts_nothing() -> None:
    assert settle(Cancelled(), attempt=1, limits=LIMITS) == Release()
    assert Release().outcome is None


def test_a_failure_that_could_not_be_reported_is_dead_lettered_instead_of_acked() -> None:
    failure = JobError(ErrorCode.TOO_LONG).to_error()
    assert unreported(Ack(outcome="failed", error=failure, report=True)) == DeadLetter(error=failure)
    dead = DeadLetter(error=failure, report=True)
    assert unreported(dead) is dead  # it is dead-lettered either way
    assert unreported(Ack()) == Ack()


def test_refusals_before_the_handler_name_their_reason() -> None:
    assert unauthenticated("ggt.commands/verify_object").error.code is ErrorCode.UNAUTHENTICATED_MESSAGE
    assert "ggt.commands/verify_object" in unauthenticated("ggt.commands/verify_object").error.detail
    letter = undecodable("$.size", "Expected `int`")
    assert letter == DeadLetter(error=letter.error) and letter.error.detail == "$.size: Expected `int`"
    assert undecodable("", "not JSON").error.detail == "not JSON"


def test_a_delivery_at_the_limit_is_dead_lettered_and_reported_and_one_without_a_handler_is_not_reported() -> None:
    assert refusal(deliveries=9, has_handler=True, limits=LIMITS, actor="verifier", type_name="verify_object") is None
    crash = refusal(deliveries=10, has_handler=True, limits=LIMITS, actor="verifier", type_name="verify_object")
    assert crash is not None and crash.report and crash.error.code is ErrorCode.INTERNAL
    assert "11 times" in crash.error.detail
    stray = refusal(deliveries=0, has_handler=False, limits=LIMITS, actor="verifier", type_name="streamed")
    assert stray is not None and not stray.report and stray.error.code is ErrorCode.UNDECODABLE_MESSAGE
    assert "no handler for streamed" in stray.error.detail


@pytest.mark.parametrize(
    ("exc", "code", "retryable"),
    [
        (StorageMisconfigured("NoSuchBucket"), ErrorCode.STORAGE_MISCONFIGURED, False),
        (StorageUnavailable("503"), ErrorCode.STORAGE_UNAVAILABLE, True),
        (BaseExceptionGroup("task group", [StorageUnavailable("503")]), ErrorCode.STORAGE_UNAVAILABLE, True),
        (BusError("no confirm"), ErrorCode.INTERNAL, True),
        (aiohttp.ClientConnectionError("s3.example: refused"), ErrorCode.INTERNAL, True),  # a name is no code
        (ConnectionResetError(), ErrorCode.INTERNAL, True),
        (KeyError("bug"), ErrorCode.INTERNAL, True),
    ],
)
def test_exceptions_map_to_codes_by_the_table(exc: BaseException, code: ErrorCode, retryable: bool) -> None:
    failure = classify(exc)
    assert (failure.code, failure.retryable) == (code, retryable)


def test_a_job_error_keeps_its_own_code_and_retryability() -> None:
    failure = JobError(ErrorCode.MEDIA_UNAVAILABLE, "403", retryable=False)
    assert classify(failure) is failure
