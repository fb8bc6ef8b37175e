"""The actor runtime's failure policy, on both buses."""

from __future__ import annotations

import asyncio
import random

import pytest

from actors.core.stages import progress_percent
from actors.runtime import metrics
from actors.runtime.worker import Worker
from bus.base import Bus
from messages.codec import H_ATTEMPT, H_ORIGIN_ROUTING_KEY, H_RETRY_DELAY_MS, decode, encode, envelope_for
from messages.errors import ErrorCode
from messages.routing import COMMANDS_EXCHANGE
from messages.types import JobProgress, Stage, StepFailed, Verified, VerifyObject
from tests.fixtures.broker import bus_settings_of
from tests.support.buses import dead_letters_of, next_message, publish_signed, receiving, running
from tests.support.probe_actor import ProbeActor


def verify(job: str) -> VerifyObject:
    return VerifyObject(job_id=job, key=f"converted/{job}.mp3", size=1, etag="e", content_type="audio/mpeg",
                        format="mp3", duration=1.0)


def probe(bus: Bus, bus_settings, **kw) -> ProbeActor:
    return ProbeActor(settings=bus_settings_of(bus, bus_settings), bus=bus, **kw)


#: undecodable bodies naming job bad-job-0001, and the field the dead letter must name (if any)
UNDECODABLE = {
    "a wrong field": (b'{"type":"verify_object","job_id":"bad-job-0001","size":"many"}', ("$.key", "$.size")),
    # RecursionError out of the decoder must be a decode error too, not a crash redelivered to the limit
    "JSON nested 50,000 deep": (b'{"type":"verify_object","job_id":"bad-job-0001","x":' + b"[" * 50_000
                                + b"]" * 50_000 + b"}", ()),
}


@pytest.mark.parametrize("case", list(UNDECODABLE))
async def test_undecodable_message_is_dead_lettered_at_once_touching_no_job_and_the_next_is_processed(
        bus, bus_settings, case):
    body, fields = UNDECODABLE[case]
    actor = probe(bus, bus_settings)
    bad = await publish_signed(bus, routing_key="verify_object", envelope=envelope_for(verify("bad-job-0001")),
                               body=body)
    await bus.publish(verify("ok-job-0001"))
    async with running(Worker(actor)), receiving(bus, "coordinator") as coordinator:
        await actor.wait_for(lambda lines: "completed ok-job-0001" in lines)
        reported = await next_message(coordinator)
        [letter] = await dead_letters_of(bus, "verifier", count=1)
        assert coordinator.empty(), "the job the undecodable envelope names is not failed"
    assert letter.error_code == "undecodable_message"
    assert not fields or any(field in letter.error_message for field in fields), letter.error_message
    assert letter.envelope.message_id == bad.message_id
    assert letter.envelope.attempt == 1, "dead-lettered on its first delivery, never retried"
    assert not any("bad-job-0001" in line for line in actor.lines), "the handler never saw it"
    assert isinstance(reported, Verified) and reported.job_id == "ok-job-0001"


async def test_a_retried_step_announces_its_wait_to_the_jobs_followers(bus, bus_settings):
    class Announcing(ProbeActor):
        stage = Stage.VERIFYING

    actor = Announcing(settings=bus_settings_of(bus, bus_settings), bus=bus)
    async with bus.subscribe("job.#") as events:
        await bus.publish(verify("flaky2-job02"))
        async with running(Worker(actor, rng=random.Random(7))):
            await actor.wait_for(lambda lines: "completed flaky2-job02" in lines)
            notices = []
            async with asyncio.timeout(10):
                async for envelope, body in events:
                    message = decode(body, type_name_hint=envelope.type)
                    if isinstance(message, JobProgress) and message.job_id == "flaky2-job02":
                        notices.append(message)
                    if len(notices) == 2:
                        break
    retries = bus_settings.max_attempts - 1
    assert [n.detail.split(" in ")[0] for n in notices] == [
        f"storage unavailable, retry 1/{retries}", f"storage unavailable, retry 2/{retries}"]
    assert all(n.stage is Stage.VERIFYING and n.percent == progress_percent(Stage.VERIFYING, 0) for n in notices)


async def test_forged_command_without_a_mac_is_dead_lettered_unread_and_counted(bus, bus_settings):
    actor = probe(bus, bus_settings)
    before = metrics.UNAUTHENTICATED.labels("verifier")._value.get()
    forged = verify("forged-job01")
    await bus.publish_raw(exchange=COMMANDS_EXCHANGE, routing_key="verify_object", body=encode(forged),
                          envelope=envelope_for(forged))
    await bus.publish(verify("ok-job-0002"))
    async with running(Worker(actor)), receiving(bus, "coordinator") as coordinator:
        await actor.wait_for(lambda lines: "completed ok-job-0002" in lines)
        reported = await next_message(coordinator)
        [letter] = await dead_letters_of(bus, "verifier", count=1)
        assert coordinator.empty(), "nothing is reported about the job a forged command names"
    assert letter.error_code == "unauthenticated_message"
    assert not any("forged-job01" in line for line in actor.lines), "the handler never saw it"
    assert isinstance(reported, Verified) and reported.job_id == "ok-job-0002"
    assert metrics.UNAUTHENTICATED.labels("verifier")._value.get() == before + 1


async def test_message_of_a_newer_major_schema_is_dead_lettered_naming_the_version(bus, bus_settings):
    actor = probe(bus, bus_settings)
    message = verify("ok-newschema1")
    env = envelope_for(message)
    from msgspec.structs import replace

    await publish_signed(bus, routing_key="verify_object", body=encode(message), envelope=replace(env, schema="2.0"))
    async with running(Worker(actor)):
        [letter] = await dead_letters_of(bus, "verifier", count=1)
    assert letter.error_code == "undecodable_message"
    assert "newer" in letter.error_message and "ggt-schema" in letter.error_message


async def test_transient_failure_is_retried_with_growing_delays_then_succeeds(bus, bus_settings):
    actor = probe(bus, bus_settings)
    await bus.publish(verify("flaky2-job01"))
    seen_headers: list[dict] = []
    worker = Worker(actor, rng=random.Random(7))
    original = actor.verify

    async def spy(message, ctx):
        seen_headers.append(dict(ctx.envelope.headers))
        await original(message, ctx)

    worker._handlers[VerifyObject] = spy
    async with running(worker):
        await actor.wait_for(lambda lines: "completed flaky2-job01" in lines)
    attempts = [int(h.get(H_ATTEMPT, 1)) for h in seen_headers]
    delays = [int(h[H_RETRY_DELAY_MS]) for h in seen_headers[1:]]
    assert attempts == [1, 2, 3]
    assert delays[0] < delays[1], f"delays must grow: {delays}"
    assert seen_headers[-1][H_ORIGIN_ROUTING_KEY] == "actor.verifier", "the origin is the delivery retried"
    assert (await dead_letters_of(bus, "verifier", count=0)) == []


async def test_failure_that_persists_is_dead_lettered_after_the_last_attempt_with_every_header(bus, bus_settings):
    actor = probe(bus, bus_settings)
    env = await bus.publish(verify("always-fail1"))
    async with running(Worker(actor)), receiving(bus, "coordinator") as coordinator:
        [letter] = await dead_letters_of(bus, "verifier", count=1)
        failed = await next_message(coordinator)
    assert sum(line.startswith("started always-fail1") for line in actor.lines) == bus_settings.max_attempts
    assert letter.envelope.message_id == env.message_id
    assert letter.error_code == "internal" and "storage keeps refusing" in letter.error_message
    headers = letter.envelope.headers
    assert headers[H_ATTEMPT] == bus_settings.max_attempts
    assert headers["ggt-actor"] == "verifier"
    assert letter.origin_exchange == COMMANDS_EXCHANGE and letter.origin_routing_key == "actor.verifier"
    assert "ggt-first-failure" in headers and letter.dead_lettered_at is not None
    assert isinstance(failed, StepFailed) and failed.error.retryable


async def test_permanent_failure_reports_the_job_failed_without_retrying(bus, bus_settings):
    actor = probe(bus, bus_settings)
    await bus.publish(verify("fatal-job001"))
    async with running(Worker(actor)), receiving(bus, "coordinator") as coordinator:
        failed = await next_message(coordinator)
    assert isinstance(failed, StepFailed) and failed.error.code == ErrorCode.TOO_LONG
    assert not failed.error.retryable
    assert [line for line in actor.lines if line.startswith("started")] == ["started fatal-job001 attempt=1"]
    assert await dead_letters_of(bus, "verifier", count=0) == []


async def test_time_limit_stops_the_handler_and_fails_the_step_with_timeout(bus, bus_settings):
    actor = probe(bus, bus_settings.__class__(**{**_d(bus_settings), "job_time_limit": 0.3}), work_seconds=60)
    await bus.publish(verify("slow-limit01"))
    async with running(Worker(actor)), receiving(bus, "coordinator") as coordinator:
        failed = await next_message(coordinator)
    assert isinstance(failed, StepFailed) and failed.error.code == ErrorCode.TIMEOUT
    assert "completed slow-limit01" not in actor.lines
    assert len([line for line in actor.lines if line.startswith("started")]) == 1, "a timeout never loops"


async def test_shutdown_releases_in_flight_work_and_it_completes_after_restart(bus, bus_settings):
    settings = bus_settings.__class__(**{**_d(bus_settings), "shutdown_grace": 0.2})
    first = probe(bus, settings, work_seconds=60)
    await bus.publish(verify("slow-shutdwn"))
    async with running(Worker(first)):
        await first.wait_for(lambda lines: any(line.startswith("started slow-shutdwn") for line in lines))
    assert await dead_letters_of(bus, "verifier", count=0) == []
    second = probe(bus, settings, work_seconds=0)
    async with running(Worker(second)):
        await second.wait_for(lambda lines: "completed slow-shutdwn" in lines)
    assert "completed slow-shutdwn" not in first.lines


async def test_duplicate_of_finished_work_is_dropped(bus, bus_settings):
    actor = probe(bus, bus_settings)
    message = verify("ok-duplicate")
    env = envelope_for(message)
    async with running(Worker(actor)):
        for _ in range(2):
            await bus.publish(message, envelope=env)
        await bus.publish(verify("ok-after-dup"))
        await actor.wait_for(lambda lines: "completed ok-after-dup" in lines)
    assert sum(line.startswith("started ok-duplicate") for line in actor.lines) == 1


def _d(settings):
    import msgspec

    return msgspec.structs.asdict(settings)


async def test_a_delivery_that_cannot_be_settled_is_released_and_redelivered(memory_bus, bus_settings,
                                                                            monkeypatch):
    from bus.memory import MemoryDelivery

    bus = memory_bus
    actor = probe(bus, bus_settings)
    original = MemoryDelivery._publish_copy
    failures = []

    async def flaky_copy(self, *args, **kwargs):
        if not failures:
            failures.append(1)
            raise ConnectionError("broker dropped the retry publish")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(MemoryDelivery, "_publish_copy", flaky_copy)
    await bus.publish(verify("flaky1-settle"))
    async with running(Worker(actor)):
        await actor.wait_for(lambda lines: "completed flaky1-settle" in lines)
    assert failures == [1]
    assert sum(line.startswith("started flaky1-settle") for line in actor.lines) == 3


async def test_a_message_that_keeps_killing_its_consumer_is_dead_lettered_and_reported_at_the_limit(
        memory_bus, bus_settings):
    from tests.support.buses import receiving as collect

    await memory_bus.publish(verify("ok-crashloop"))
    async with collect(memory_bus, "verifier") as got:
        for _ in range(bus_settings.delivery_limit):  # each time the consumer "dies" holding it
            await (await asyncio.wait_for(got.get(), 5)).release()
    actor = probe(memory_bus, bus_settings)
    async with running(Worker(actor)), receiving(memory_bus, "coordinator") as coordinator:
        failed = await next_message(coordinator)
        [letter] = await dead_letters_of(memory_bus, "verifier", count=1)
    assert actor.lines == [], "the last delivery is not handed to the handler"
    assert isinstance(failed, StepFailed) and failed.error.code == ErrorCode.INTERNAL
    assert "without being settled" in letter.error_message
