"""Nothing waits forever: a followed job ends on its final event, its dead letter, silence past its time
limit, or --timeout — each with a code, a message and a non-zero exit; --json prints one object."""

from __future__ import annotations

import asyncio
import io
import json
from contextlib import redirect_stdout

from actors.cli import convert as convert_cmd
from actors.cli.convert import EXIT_TIMEOUT, Stuck, dead_letter_depths, report, wait_for_outcome
from bus.base import DeadLetter
from messages.errors import Error, ErrorCode
from messages.types import ConvertRequested, JobCompleted
from tests.fixtures.broker import test_settings as settings_for
from tests.support.buses import receiving


def request(job: str) -> ConvertRequested:
    return ConvertRequested(url="http://127.0.0.1:9/a.mp4", format="mp3", job_id=job)


async def test_a_dead_lettered_job_ends_the_wait_with_its_code_and_a_nonzero_exit(memory_bus, monkeypatch):
    monkeypatch.setattr(convert_cmd, "DEAD_LETTER_POLL_S", 0.05)
    settings = settings_for()
    async with memory_bus.subscribe("job.dead1.#") as events, receiving(memory_bus, "coordinator") as got:
        baseline = await dead_letter_depths(memory_bus)
        await memory_bus.publish(request("dead1"))
        delivery = await asyncio.wait_for(got.get(), 5)
        await delivery.dead_letter(actor="coordinator", error=Error.of(
            ErrorCode.STORAGE_MISCONFIGURED, "NoSuchBucket for bucket 'x'"))
        outcome = await wait_for_outcome(memory_bus, "dead1", events, show=False, settings=settings,
                                         timeout=30, letters_baseline=baseline)
    assert isinstance(outcome, DeadLetter) and outcome.error_code == "storage_misconfigured"
    out = io.StringIO()
    with redirect_stdout(out):
        code = report(outcome, saved=None, as_json=True)
    assert code == 1
    [line] = out.getvalue().splitlines()
    assert json.loads(line)["error"]["code"] == "storage_misconfigured"


async def test_a_silent_job_counts_as_stuck_after_its_time_limit(memory_bus, monkeypatch):
    monkeypatch.setattr(convert_cmd, "STUCK_SLACK_S", 0.1)
    settings = settings_for(job_time_limit=0.1, retry_delays=(0.1,))
    async with memory_bus.subscribe("job.quiet.#") as events:
        outcome = await wait_for_outcome(memory_bus, "quiet", events, show=False, settings=settings, timeout=30)
    assert isinstance(outcome, Stuck) and outcome.why == "stuck"
    assert report(outcome, saved=None, as_json=False) == 1


async def test_timeout_bounds_the_wait_with_exit_124(memory_bus):
    async with memory_bus.subscribe("job.slow.#") as events:
        outcome = await wait_for_outcome(memory_bus, "slow", events, show=False, settings=settings_for(),
                                         timeout=0.2)
    assert isinstance(outcome, Stuck) and outcome.why == "timeout"
    assert report(outcome, saved=None, as_json=False) == EXIT_TIMEOUT


def test_json_output_is_one_object_and_the_url_stays_off_stdout() -> None:
    done = JobCompleted(job_id="j", key="converted/j.mp3", size=1, sha256="0" * 64, duration=1.0,
                        download_url="http://127.0.0.1:1/x", expires_at="2026-01-01T00:00:00Z", title="t",
                        quality="192",
                        content_type="audio/mpeg",
                        format="mp3", timings={})
    out = io.StringIO()
    with redirect_stdout(out):
        assert report(done, saved=None, as_json=True) == 0
    [line] = out.getvalue().splitlines()
    assert json.loads(line)["download_url"] == "http://127.0.0.1:1/x"
