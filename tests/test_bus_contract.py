"""The bus contract: the same tests on the in-memory bus and on RabbitMQ."""

from __future__ import annotations

import asyncio

import pytest

from bus.base import Bus, Delivery, Unroutable
from messages.codec import (
    H_ACTOR,
    H_ATTEMPT,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_FIRST_FAILURE,
    H_ORIGIN_EXCHANGE,
    H_ORIGIN_ROUTING_KEY,
    encode,
    envelope_for,
)
from messages.errors import Error, ErrorCode
from messages.routing import COMMANDS_EXCHANGE
from messages.types import ConvertRequested, JobCompleted, JobProgress, Stage, VerifyObject
from tests.support.buses import receiving

WAIT = 10.0


def verify(job: str) -> VerifyObject:
    return VerifyObject(job_id=job, key=f"converted/{job}.mp3", size=1, etag="e", content_type="audio/mpeg",
                        format="mp3", duration=1.0)


async def next_delivery(got: asyncio.Queue[Delivery]) -> Delivery:
    return await asyncio.wait_for(got.get(), WAIT)


async def test_command_reaches_its_actor_with_the_envelope_intact(bus: Bus) -> None:
    message = verify("job-envelope-1")
    env = await bus.publish(message)
    async with receiving(bus, "verifier") as got:
        d = await next_delivery(got)
        assert d.envelope.message_id == env.message_id
        assert d.envelope.job_id == "job-envelope-1"
        assert d.envelope.type == "verify_object"
        assert d.envelope.schema == "1.0"
        assert abs((d.envelope.created_at - env.created_at).total_seconds()) < 1.5
        assert d.body == encode(message)
        assert d.routing_key == "verify_object"
        await d.ack()


async def test_convert_requested_goes_to_the_coordinator_on_routing_key_convert(bus: Bus) -> None:
    await bus.publish(ConvertRequested(url="http://127.0.0.1/a.mp4", format="mp3", job_id="job-route-1"))
    async with receiving(bus, "coordinator") as got:
        d = await next_delivery(got)
        assert d.routing_key == "convert"
        assert d.envelope.type == "convert_requested"
        await d.ack()


async def test_unroutable_publish_raises_instead_of_vanishing(bus: Bus) -> None:
    message = verify("job-unroutable")
    with pytest.raises(Unroutable):
        await bus.publish_raw(exchange=COMMANDS_EXCHANGE, routing_key="nobody-listens-here",
                              body=encode(message), envelope=envelope_for(message))


async def test_retry_returns_the_message_to_the_same_actor_with_attempt_plus_one(bus: Bus) -> None:
    env = await bus.publish(verify("job-retry-1"))
    error = Error.of(ErrorCode.STORAGE_UNAVAILABLE, "s3 down")
    async with receiving(bus, "verifier") as got:
        first = await next_delivery(got)
        assert first.envelope.attempt == 1
        await first.retry(actor="verifier", delay=0.05, error=error)
        second = await next_delivery(got)
        assert second.envelope.message_id == env.message_id
        assert second.envelope.attempt == 2
        assert second.envelope.headers[H_ERROR_CODE] == "storage_unavailable"
        assert second.origin() == (COMMANDS_EXCHANGE, "verify_object")
        await second.ack()


async def test_dead_letter_keeps_every_diagnostic_header(bus: Bus) -> None:
    env = await bus.publish(verify("job-dead-1"))
    error = Error.of(ErrorCode.INTERNAL, "boom: the handler crashed")
    async with receiving(bus, "verifier") as got:
        d = await next_delivery(got)
        await d.dead_letter(actor="verifier", error=error)
    batch = await bus.take_dead_letters("verifier")
    try:
        assert len(batch.letters) == 1
        letter = batch.letters[0]
        headers = letter.envelope.headers
        assert letter.envelope.message_id == env.message_id
        assert letter.error_code == "internal"
        assert "boom" in letter.error_message
        assert headers[H_ACTOR] == "verifier"
        assert headers[H_ATTEMPT] == 1
        assert headers[H_ORIGIN_EXCHANGE] == COMMANDS_EXCHANGE
        assert headers[H_ORIGIN_ROUTING_KEY] == "verify_object"
        assert H_FIRST_FAILURE in headers and H_ERROR_MESSAGE in headers
        assert letter.dead_lettered_at is not None
    finally:
        await batch.close()
    again = await bus.take_dead_letters("verifier")
    assert len(again.letters) == 1, "letters not removed go back to the queue"
    await again.remove(0)
    await again.close()
    assert (await bus.take_dead_letters("verifier")).letters == []


async def test_released_message_is_redelivered_and_dead_lettered_past_the_delivery_limit(bus: Bus) -> None:
    await bus.publish(verify("job-crashloop"))
    limit = bus.topology.delivery_limit
    async with receiving(bus, "verifier") as got:
        for count in range(limit + 1):
            d = await next_delivery(got)
            assert d.delivery_count == count
            await d.release()
        # nothing more arrives: the message went to the dead-letter queue
        batch = None
        for _ in range(100):
            batch = await bus.take_dead_letters("verifier")
            if batch.letters:
                break
            await batch.close()
            await asyncio.sleep(0.05)  # the broker moves the message asynchronously
        assert batch is not None and len(batch.letters) == 1
        assert batch.letters[0].error_code == "delivery_limit"
        assert batch.letters[0].origin_routing_key == "verify_object"
        await batch.close()
        assert got.empty()


async def test_prefetch_bounds_unsettled_deliveries(bus: Bus) -> None:
    for i in range(3):
        await bus.publish(verify(f"job-prefetch-{i}"))
    async with receiving(bus, "verifier", prefetch=2) as got:
        a = await next_delivery(got)
        b = await next_delivery(got)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(got.get(), 0.5)
        await a.ack()
        c = await next_delivery(got)
        await b.ack()
        await c.ack()


async def test_events_fan_out_to_every_matching_subscriber(bus: Bus) -> None:
    progress = JobProgress(job_id="job-events-1", stage=Stage.CONVERTING, percent=50.0)
    done = JobCompleted(job_id="job-events-1", download_url="http://127.0.0.1/x", expires_at="2030-01-01T00:00:00Z",
                        key="converted/x.mp3", format="mp3", quality="192", content_type="audio/mpeg", size=1,
                        sha256="0" * 64, duration=1.0)
    async with bus.subscribe("job.#") as all_events, bus.subscribe("job.*.completed") as only_completed:
        await bus.publish(progress)
        await bus.publish(done)
        env, _ = await asyncio.wait_for(anext(all_events), WAIT)
        assert env.type == "job_progress"
        env2, _ = await asyncio.wait_for(anext(all_events), WAIT)
        assert env2.type == "job_completed"
        env3, _ = await asyncio.wait_for(anext(only_completed), WAIT)
        assert env3.type == "job_completed"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(only_completed), 0.3)


async def test_reply_to_queue_receives_the_final_event(bus: Bus) -> None:
    from messages.types import JobFailed

    queue = "test.reply.contract"
    await bus.declare_reply_queue(queue)
    message = JobFailed(job_id="job-reply-1", error=Error.of(ErrorCode.TOO_LONG), stage=Stage.PREPARING)
    await bus.reply(queue, message)
    async with bus.subscribe(queue=queue) as replies:
        env, body = await asyncio.wait_for(anext(replies), WAIT)
    assert env.type == "job_failed" and b"too_long" in body
