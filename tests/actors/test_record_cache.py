"""The coordinator remembers the records it saved: a job's steps save without loading, and a record
another replica moved on is never acted on — a stale step is decided on the stored record, a stale
ETag conflicts and the step runs again on the stored one."""

from __future__ import annotations

import pytest

from actors.coordinator import Coordinator
from actors.core.jobs import decode_record, encode_record
from actors.runtime import metrics
from messages.types import ConvertRequested, JobCompleted, Stage
from storage import JobStore, WriteConflict

#: seconds a job of a 1-second clip may take here before the test fails (a lost step hangs the job)
JOB_TIMEOUT = 60.0


def retried() -> float:
    """The coordinator's messages sent through a retry tier so far (any code)."""
    return sum(sample.value for metric in metrics.RETRIED.collect() for sample in metric.samples
               if sample.name.endswith("_total") and sample.labels.get("actor") == "coordinator")


@pytest.fixture
def store_calls(monkeypatch) -> dict[str, int]:
    """Counts of JobStore.load / save calls and of the conflicts saves met, across every JobStore."""
    calls = {"load": 0, "save": 0, "conflict": 0}
    load, save = JobStore.load, JobStore.save

    async def counted_load(self, *args, **kwargs):
        calls["load"] += 1
        return await load(self, *args, **kwargs)

    async def counted_save(self, *args, **kwargs):
        calls["save"] += 1
        try:
            return await save(self, *args, **kwargs)
        except WriteConflict:
            calls["conflict"] += 1
            raise

    monkeypatch.setattr(JobStore, "load", counted_load)
    monkeypatch.setattr(JobStore, "save", counted_save)
    return calls


async def test_a_jobs_steps_save_its_record_without_loading_it_again(store_calls, pipeline, media_server):
    final = await pipeline.run(ConvertRequested(url=media_server.url("audio.mp3"), format="mp3"),
                               timeout=JOB_TIMEOUT)
    assert isinstance(final, JobCompleted), final
    # the request's duplicate check is the only load; every step saves on the ETag it saved last
    assert store_calls == {"load": 1, "save": 4, "conflict": 0}


async def test_a_step_the_remembered_record_would_ignore_is_decided_on_the_stored_one(
        monkeypatch, store_calls, pipeline, media_server):
    # another replica handled MediaResolved: this coordinator still remembers the job as preparing
    remember = Coordinator._remember
    first: dict[str, tuple[bytes, str]] = {}

    def remember_an_older_state(self, record, data, etag):
        remember(self, record, data, etag)
        first.setdefault(record.job_id, (data, etag))
        if record.stage == Stage.CONVERTING:
            self._records[(record.owner, record.job_id)] = first[record.job_id]

    monkeypatch.setattr(Coordinator, "_remember", remember_an_older_state)
    final = await pipeline.run(ConvertRequested(url=media_server.url("audio.mp3"), format="mp3"),
                               timeout=JOB_TIMEOUT)
    assert isinstance(final, JobCompleted), "Streamed must not be ignored for the remembered stage"
    assert store_calls["load"] == 2 and store_calls["conflict"] == 0, store_calls


async def test_a_save_on_an_etag_another_replica_replaced_runs_the_step_again(
        monkeypatch, store_calls, pipeline, media_server):
    # another replica rewrote the record while it was converting (same stage, new ETag)
    save = JobStore.save
    rewritten: set[str] = set()

    async def save_then_rewrite(self, job_id, data, *, etag, owner=""):
        saved = await save(self, job_id, data, etag=etag, owner=owner)
        record = decode_record(data)
        if record.stage == Stage.CONVERTING and job_id not in rewritten:
            rewritten.add(job_id)
            record.percent += 1.0
            await save(self, job_id, encode_record(record), etag=saved, owner=owner)
        return saved

    monkeypatch.setattr(JobStore, "save", save_then_rewrite)
    conflicts = 0
    commit = Coordinator._commit

    async def counted_commit(self, *args, **kwargs):
        nonlocal conflicts
        try:
            return await commit(self, *args, **kwargs)
        except Exception:
            conflicts += 1
            raise

    monkeypatch.setattr(Coordinator, "_commit", counted_commit)
    retried_before = retried()
    final = await pipeline.run(ConvertRequested(url=media_server.url("audio.mp3"), format="mp3"),
                               timeout=JOB_TIMEOUT)
    assert isinstance(final, JobCompleted), final
    assert conflicts == 1, "the Streamed step's save on the remembered ETag conflicted once"
    assert store_calls["load"] == 2, "…and the step ran again on the stored record"
    assert retried() == retried_before, "at once, not through a retry tier"


async def test_a_failed_verdict_on_a_remembered_record_another_replica_completed_deletes_nothing(
        monkeypatch, pipeline, media_server):
    import asyncio

    from messages.types import Verified

    remember = Coordinator._remember

    def stays_verifying(self, record, data, etag):
        # another replica saved FINISHING and COMPLETED: this one still remembers VERIFYING
        if record.stage not in (Stage.FINISHING, Stage.COMPLETED):
            remember(self, record, data, etag)

    monkeypatch.setattr(Coordinator, "_remember", stays_verifying)
    final = await pipeline.run(ConvertRequested(url=media_server.url("audio.mp3"), format="mp3"),
                               timeout=JOB_TIMEOUT)
    assert isinstance(final, JobCompleted), final
    loaded: list[tuple[bytes, str] | None] = []
    reloaded = asyncio.Event()
    load = JobStore.load

    async def seen_load(self, *args, **kwargs):
        found = await load(self, *args, **kwargs)
        loaded.append(found)
        reloaded.set()
        return found

    monkeypatch.setattr(JobStore, "load", seen_load)
    # a duplicate verdict (a redelivered VerifyObject verified again, failing): deleting the object is
    # a change its save could not undo, so the step first runs again on the stored record
    await pipeline.bus.publish(Verified(job_id=final.job_id, key=final.key, ok=False,
                                        problems=["ETag differs"], retryable=True))
    async with asyncio.timeout(JOB_TIMEOUT):
        await reloaded.wait()
    assert decode_record(loaded[-1][0]).stage == Stage.COMPLETED
    assert await pipeline.storage.head(final.key) is not None  # the completed job's file is still there


async def test_a_dead_lettered_failure_the_job_went_on_without_fails_nothing_and_a_current_one_does(
        storage_config, storage):
    from types import SimpleNamespace

    from actors.core.jobs import owner_of
    from messages.errors import Error, ErrorCode
    from messages.types import StepFailed
    from tests.actors.test_plan_boundary import started
    from tests.fixtures.pipeline import pipeline_settings

    published: list = []

    def ctx(message_id: str) -> SimpleNamespace:
        async def publish(message, **_: object) -> None:
            published.append(message)

        envelope = SimpleNamespace(message_id=message_id, owner="", replays=0, attempt=3, job_id="")
        return SimpleNamespace(envelope=envelope, reply_to=None, owner="", attempt=3, publish=publish)

    async with started(Coordinator, pipeline_settings(storage_config)) as coordinator:
        coordinator.bus.publish = ctx("").publish  # the job's commands and events, kept here
        await coordinator.convert(ConvertRequested(url="http://127.0.0.1:9/a.mp3", format="mp3", job_id="late-0001"),
                                  ctx("request-1"))
        record, _ = await coordinator.load("late-0001", owner_of(""))
        [current] = [entry.message_id for entry in record.outbox]  # the ResolveMedia in flight
        down = Error.of(ErrorCode.STORAGE_UNAVAILABLE, "storage unreachable")
        # the StepFailed of a command the job no longer waits for: dead-lettered late, its failure is stale
        stale = StepFailed(job_id="late-0001", step="stream", error=down, cause="an-earlier-command")
        await coordinator.on_failure(stale, down, ctx("failure-1"))
        assert (await coordinator.load("late-0001", owner_of("")))[0].stage is Stage.PREPARING
        # the same for the command the job does wait for: that failure is the job's
        now = StepFailed(job_id="late-0001", step="resolve", error=down, cause=current)
        await coordinator.on_failure(now, down, ctx("failure-2"))
        failed = (await coordinator.load("late-0001", owner_of("")))[0]
        assert failed.stage is Stage.FAILED and failed.error.code is ErrorCode.STORAGE_UNAVAILABLE
