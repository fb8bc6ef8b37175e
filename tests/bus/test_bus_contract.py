"""The bus contract: the same tests on the in-memory bus and on RabbitMQ."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from bus.auth import BusKeys, signed
from bus.base import Bus, Delivery, Unroutable
from messages.codec import (
    H_ACTOR,
    H_ATTEMPT,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_FIRST_FAILURE,
    H_MAC,
    H_ORIGIN_EXCHANGE,
    H_ORIGIN_ROUTING_KEY,
    H_OWNER,
    H_REPLAYS,
    encode,
    envelope_for,
)
from messages.errors import Error, ErrorCode
from messages.routing import COMMANDS_EXCHANGE, REQUESTS_EXCHANGE
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
        assert d.envelope.schema == "1.1"
        assert abs((d.envelope.created_at - env.created_at).total_seconds()) < 1.5
        assert d.body == encode(message)
        assert d.routing_key == "verify_object"
        await d.ack()


async def test_convert_requested_goes_to_the_coordinator_through_the_public_exchange(bus: Bus) -> None:
    await bus.publish(ConvertRequested(url="http://127.0.0.1/a.mp4", format="mp3", job_id="job-route-1"))
    async with receiving(bus, "coordinator") as got:
        d = await next_delivery(got)
        assert (d.exchange, d.routing_key) == (REQUESTS_EXCHANGE, "convert.default")
        assert d.envelope.type == "convert_requested"
        assert d.authenticated and d.envelope.owner == "default"
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
        assert second.authenticated, "a retry copy keeps a valid MAC"
        assert second.origin() == (COMMANDS_EXCHANGE, "actor.verifier"), "the origin is the real delivery"
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
    async with bus.subscribe("job.#") as all_events, bus.subscribe("job.*.*.completed") as only_completed:
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


# ------------------------------------------------------------------------- trust on the bus

FORGED_HEADERS: dict[str, str | int] = {
    H_OWNER: "victim", H_ATTEMPT: -5, H_REPLAYS: -3, H_MAC: "0" * 64,
    H_ORIGIN_EXCHANGE: "ggt.events", H_ORIGIN_ROUTING_KEY: "job.victim.x.completed",
}


async def test_a_public_request_is_owned_by_its_routing_key_and_loses_every_forged_header(bus: Bus) -> None:
    request = ConvertRequested(url="http://127.0.0.1/a.mp4", format="mp3", job_id="job-public-1")
    forged = msgspec.structs.replace(envelope_for(request, headers=FORGED_HEADERS), type="stream_to_storage")
    await bus.publish_raw(exchange=REQUESTS_EXCHANGE, routing_key="convert.acme", body=encode(request),
                          envelope=forged)
    async with receiving(bus, "coordinator") as got:
        d = await next_delivery(got)
        assert d.authenticated
        assert d.envelope.headers == {H_OWNER: "acme"}, "the owner is the routing key's, nothing else survives"
        assert d.envelope.type == "convert_requested", "the public exchange carries requests only"
        assert (d.envelope.attempt, d.envelope.replays) == (1, 0)
        await d.ack()


async def test_a_request_without_a_message_id_gets_the_same_id_on_every_delivery(memory_bus: Bus) -> None:
    # memory only: aiormq stamps a random message id on every publish, so over RabbitMQ a message
    # without one can only come from another client; ``admit`` (shared by both buses) derives it
    bus = memory_bus
    request = ConvertRequested(url="http://127.0.0.1/a.mp4", format="mp3")
    bare = msgspec.structs.replace(envelope_for(request), message_id="")
    for key in ("convert.acme", "convert.acme", "convert.other"):
        await bus.publish_raw(exchange=REQUESTS_EXCHANGE, routing_key=key, body=encode(request), envelope=bare)
    async with receiving(bus, "coordinator") as got:
        ids = []
        for _ in range(3):
            d = await next_delivery(got)
            ids.append(d.envelope.message_id)
            await d.ack()
    assert ids[0] == ids[1] and len(ids[0]) == 32, "the same body from the same owner is the same message"
    assert ids[2] != ids[0], "another tenant's identical body is another message"


async def test_a_request_on_a_routing_key_naming_no_valid_tenant_is_not_authenticated(bus: Bus) -> None:
    request = ConvertRequested(url="http://127.0.0.1/a.mp4", format="mp3", job_id="job-badtenant")
    await bus.publish_raw(exchange=REQUESTS_EXCHANGE, routing_key="convert.Not_A_Tenant!", body=encode(request),
                          envelope=envelope_for(request))
    async with receiving(bus, "coordinator") as got:
        d = await next_delivery(got)
        assert not d.authenticated and d.envelope.owner == ""
        await d.ack()


async def test_a_signed_command_is_authenticated_and_carries_its_owner(bus: Bus) -> None:
    env = await bus.publish(verify("job-signed-1"), owner="acme")
    assert H_MAC in env.headers
    async with receiving(bus, "verifier") as got:
        d = await next_delivery(got)
        assert d.authenticated and d.envelope.owner == "acme"
        await d.ack()


@pytest.mark.parametrize("forgery", ["no mac", "wrong mac", "other key", "owner changed", "body changed"])
async def test_a_command_without_a_valid_mac_is_unauthenticated_and_stripped(bus: Bus, forgery: str) -> None:
    message = verify("job-forged-1")
    body = encode(message)
    env = envelope_for(message, headers={H_OWNER: "acme", H_REPLAYS: 2})
    assert bus.keys is not None
    if forgery == "wrong mac":
        env = msgspec.structs.replace(env, headers={**env.headers, H_MAC: "0" * 64})
    elif forgery == "other key":
        env = signed(BusKeys.random(), env, body)
    elif forgery == "owner changed":
        env = signed(bus.keys, env, body)
        env = msgspec.structs.replace(env, headers={**env.headers, H_OWNER: "victim"})
    elif forgery == "body changed":
        env = signed(bus.keys, env, body)
        body = encode(verify("job-forged-2"))
    await bus.publish_raw(exchange=COMMANDS_EXCHANGE, routing_key="verify_object", body=body, envelope=env)
    async with receiving(bus, "verifier") as got:
        d = await next_delivery(got)
        assert not d.authenticated
        assert d.envelope.headers == {}, "no ggt-* header of an unauthenticated message is believed"
        await d.dead_letter(actor="verifier", error=Error.of(ErrorCode.UNAUTHENTICATED_MESSAGE))
    batch = await bus.take_dead_letters("verifier")
    try:
        (letter,) = batch.letters
        assert not letter.authenticated and H_MAC not in letter.envelope.headers, "dead-lettering never signs it"
        assert (letter.origin_exchange, letter.origin_routing_key) == (COMMANDS_EXCHANGE, "verify_object")
    finally:
        for index in range(len(batch.letters)):
            await batch.remove(index)
        await batch.close()


async def test_a_dead_lettered_public_request_is_signed_with_its_owner(bus: Bus) -> None:
    request = ConvertRequested(url="http://127.0.0.1/a.mp4", format="mp3", job_id="job-pubdead")
    await bus.publish(request, owner="acme")
    async with receiving(bus, "coordinator") as got:
        d = await next_delivery(got)
        await d.dead_letter(actor="coordinator", error=Error.of(ErrorCode.INTERNAL, "x"))
    batch = await bus.take_dead_letters("coordinator")
    try:
        (letter,) = batch.letters
        assert letter.authenticated and letter.envelope.owner == "acme"
        assert (letter.origin_exchange, letter.origin_routing_key) == (REQUESTS_EXCHANGE, "convert.acme")
    finally:
        await batch.remove(0)
        await batch.close()


async def test_events_are_routed_by_their_owner(bus: Bus) -> None:
    mine = JobProgress(job_id="job-owned-1", stage=Stage.CONVERTING, percent=10.0)
    theirs = JobProgress(job_id="job-owned-2", stage=Stage.CONVERTING, percent=20.0)
    async with bus.subscribe("job.acme.#") as acme, bus.subscribe("job.other.#") as other:
        await bus.publish(theirs, owner="other")
        await bus.publish(mine, owner="acme")
        env, _ = await asyncio.wait_for(anext(acme), WAIT)
        assert env.job_id == "job-owned-1" and env.owner == "acme"
        env, _ = await asyncio.wait_for(anext(other), WAIT)
        assert env.job_id == "job-owned-2" and env.owner == "other"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(acme), 0.3)


async def test_a_request_published_without_a_schema_header_keeps_a_valid_mac_through_its_retry(
        rabbit_bus: Bus, amqp_url: str) -> None:
    # ggt-schema is optional for an integrator (docs/MESSAGES.md): publish as one, with a bare client
    import aio_pika

    request = ConvertRequested(url="http://127.0.0.1/a.mp4", format="mp3", job_id="job-no-schema")
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(REQUESTS_EXCHANGE)
        await exchange.publish(aio_pika.Message(encode(request), content_type="application/json"),
                               routing_key="convert.acme")
    async with receiving(rabbit_bus, "coordinator") as got:
        first = await next_delivery(got)
        assert first.authenticated and first.envelope.owner == "acme"
        await first.retry(actor="coordinator", delay=0.05, error=Error.of(ErrorCode.STORAGE_UNAVAILABLE))
        second = await next_delivery(got)
        assert second.envelope.attempt == 2
        assert second.authenticated, "the retry copy's MAC covers the schema it is published with"
        assert second.envelope.owner == "acme"
        await second.ack()


async def test_an_oversized_message_is_dead_lettered_as_its_head_and_fingerprint_not_whole(bus: Bus) -> None:
    import hashlib

    from messages.codec import DEAD_LETTER_KEEP_BYTES, H_BODY_BYTES, H_BODY_SHA256, MAX_BODY_BYTES

    request = ConvertRequested(url="http://127.0.0.1/a.mp4", format="mp3", job_id="job-oversized")
    body = encode(request)[:-1] + b', "padding": "' + b"x" * (2 * MAX_BODY_BYTES) + b'"}'
    await bus.publish_raw(exchange=REQUESTS_EXCHANGE, routing_key="convert.acme", body=body,
                          envelope=envelope_for(request))
    async with receiving(bus, "coordinator") as got:
        d = await next_delivery(got)
        assert len(d.body) == len(body)
        await d.dead_letter(actor="coordinator", error=Error.of(ErrorCode.UNDECODABLE_MESSAGE, "too big"))
    batch = await bus.take_dead_letters("coordinator")
    try:
        (letter,) = batch.letters
        assert letter.body == body[:DEAD_LETTER_KEEP_BYTES]
        assert int(letter.envelope.headers[H_BODY_BYTES]) == len(body)
        assert letter.envelope.headers[H_BODY_SHA256] == hashlib.sha256(body).hexdigest()
        assert not letter.authenticated, "a cut body is never signed: it cannot be replayed as the original"
        assert letter.error_code == "undecodable_message"
    finally:
        await batch.remove(0)
        await batch.close()
