"""Who may say what on the bus, tried as attackers would, on the real broker.

An integrator provisioned as documented (``getgoodtape provision integrator``) may publish requests
and read its own job's events, and the broker refuses it everything else. With the broadest
credentials (guest), a forged internal command of every type is dead-lettered unread, and a dead
letter with forged origin and counters is replayed only to the service's own destinations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiormq
import msgspec
import pytest

from actors.cli.provision import apply, integrator_commands
from bus.auth import signed
from bus.base import Bus, BusError, Topology
from bus.rabbit import RabbitBus
from bus.replay import Action, LetterFilter, replay
from messages.codec import (
    H_ATTEMPT,
    H_ERROR_CODE,
    H_MAC,
    H_ORIGIN_EXCHANGE,
    H_ORIGIN_ROUTING_KEY,
    H_OWNER,
    H_REPLAYS,
    encode,
    envelope_for,
)
from messages.errors import Error, ErrorCode
from messages.routing import (
    ACTORS,
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    REQUESTS_EXCHANGE,
    ROUTING_KEYS,
    dead_letter_queue,
    queue_name,
)
from messages.types import ConvertRequested, JobCompleted, JobProgress, Stage, VerifyObject
from tests.support.buses import dead_letters_of, receiving
from tests.support.faults import vhost_of

WAIT = 15.0
TENANT = "acme"


# ------------------------------------------------------------------------------------ fixtures


class Integrator(msgspec.Struct, frozen=True):
    url: str
    tenant: str
    user: str


@pytest.fixture
def integrator(amqp_url: str) -> Iterator[Integrator]:
    """A broker user for tenant ``acme`` made with the documented lines, in the session vhost; deleted after."""
    user = f"integrator-{TENANT}-{uuid.uuid4().hex[:8]}"  # users are broker-wide: unique per test
    password = uuid.uuid4().hex
    apply(integrator_commands(TENANT, vhost=vhost_of(amqp_url), user=user, password=password))
    parts = urlsplit(amqp_url)
    netloc = f"{quote(user)}:{password}@{parts.hostname}:{parts.port or 5672}"
    try:
        yield Integrator(url=urlunsplit(parts._replace(netloc=netloc)), tenant=TENANT, user=user)
    finally:
        subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True, timeout=60)


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


async def refused(call) -> str:
    """The broker's refusal of ``call`` (which must be refused with ACCESS_REFUSED)."""
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as caught:
        await call
    assert "ACCESS_REFUSED" in str(caught.value)
    return str(caught.value)


def request_body(job_id: str, **extra: object) -> bytes:
    return json.dumps({"type": "convert_requested", "url": "http://127.0.0.1:9/a.mp4", "format": "mp3",
                       "job_id": job_id, **extra}).encode()


# --------------------------------------------------------------------------- integrator rights


async def test_a_provisioned_integrator_publishes_requests_and_reads_only_its_own_jobs_events(
        rabbit_bus: Bus, integrator: Integrator) -> None:
    own_queue = f"integrator.{integrator.tenant}.events"
    async with connected(integrator.url) as conn, bus_sees_every_event(rabbit_bus):
        channel = await conn.channel(publisher_confirms=True)
        events = await channel.declare_queue(own_queue, exclusive=True)
        await events.bind(EVENTS_EXCHANGE, f"job.{integrator.tenant}.#")
        requests = await channel.get_exchange(REQUESTS_EXCHANGE, ensure=False)
        await requests.publish(aio_pika.Message(request_body("acme-job-0001"), content_type="application/json"),
                               routing_key=f"convert.{integrator.tenant}", mandatory=True)

        async with receiving(rabbit_bus, "coordinator") as got:
            delivery = await asyncio.wait_for(got.get(), WAIT)
            assert delivery.authenticated and delivery.envelope.owner == integrator.tenant
            await delivery.ack()
        # the service answers both tenants; another tenant's event is routed first (confirmed), so
        # had it reached the integrator's queue it would be the first message there
        await rabbit_bus.publish(JobProgress(job_id="other-job-0001", stage=Stage.PREPARING, percent=1.0),
                                 owner="other")
        await rabbit_bus.publish(JobProgress(job_id="acme-job-0001", stage=Stage.PREPARING, percent=1.0),
                                 owner=delivery.envelope.owner)
        first = await events.get(timeout=WAIT)
        assert first.routing_key == f"job.{integrator.tenant}.acme-job-0001.progress"
        await first.ack()
        assert await events.get(fail=False) is None, "nothing of another tenant is in the queue"


@contextlib.asynccontextmanager
async def bus_sees_every_event(bus: Bus) -> AsyncIterator[None]:
    """Keep every event routable (events are published mandatory) for the length of the block."""
    async with bus.subscribe("job.#"):
        yield


@pytest.mark.parametrize("attempt", [
    "publish to ggt.commands", "publish a request as another tenant", "consume a work queue",
    "consume a dead-letter queue", "bind to another tenant's events", "declare a queue not its own",
])
async def test_the_broker_refuses_an_integrator_everything_else(
        rabbit_bus: Bus, integrator: Integrator, attempt: str) -> None:
    async with connected(integrator.url) as conn:
        channel = await conn.channel(publisher_confirms=True)
        message = aio_pika.Message(encode(VerifyObject(job_id="acme-job-0002", key="converted/x.mp3", size=1,
                                                       etag="e", content_type="audio/mpeg", format="mp3",
                                                       duration=1.0)))
        if attempt == "publish to ggt.commands":
            commands = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
            await refused(commands.publish(message, routing_key="verify_object"))
        elif attempt == "publish a request as another tenant":
            requests = await channel.get_exchange(REQUESTS_EXCHANGE, ensure=False)
            await refused(requests.publish(aio_pika.Message(request_body("other-job-0002")),
                                           routing_key="convert.other"))
        elif attempt in ("consume a work queue", "consume a dead-letter queue"):
            name = queue_name("uploader") if attempt == "consume a work queue" else dead_letter_queue("uploader")
            queue = await channel.get_queue(name, ensure=False)
            await refused(queue.consume(lambda m: None))
        elif attempt == "bind to another tenant's events":
            own = await channel.declare_queue(f"integrator.{integrator.tenant}.spy", exclusive=True)
            await refused(own.bind(EVENTS_EXCHANGE, "job.other.#"))
        else:
            await refused(channel.declare_queue("sneaky-events", exclusive=True))


# ----------------------------------------------------------------- forged commands, broad rights


class Attacker:
    """A listener on loopback that records every connection made to it."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def __aenter__(self) -> Attacker:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}/loot"


def forged_bodies(job_id: str, attacker: str) -> dict[str, dict]:
    """A forged body for every internal command type, each naming ``job_id``."""
    plan = {  # read a local file (the uploader's own environment) and send it to the attacker
        "type": "media_plan", "inputs": [{"url": "file:///proc/self/environ", "via": "ffmpeg"}],
        "input_args": [["-f", "data"]], "output_args": ["-map", "0", "-c", "copy", "-f", "data"],
        "format": "mp3", "quality": "128", "content_type": "audio/mpeg", "extension": "mp3",
        "duration": 1.0, "max_bytes": 1 << 20,
    }
    error = msgspec.to_builtins(Error.of(ErrorCode.INTERNAL, "forged"))
    return {
        "resolve_media": {"job_id": job_id, "request": {"url": attacker, "format": "mp3"}},
        "media_resolved": {"job_id": job_id, "plan": plan},
        "stream_to_storage": {"job_id": job_id, "plan": plan, "time_limit": 60,
                              "target": {"key": f"converted/{job_id}.mp3", "content_type": "audio/mpeg",
                                         "put_url": attacker, "mode": "auto"}},
        "streamed": {"job_id": job_id, "key": f"converted/{job_id}.mp3", "upload_mode": "single", "size": 1,
                     "sha256": "0" * 64, "etag": "e"},
        "verify_object": {"job_id": job_id, "key": f"converted/{job_id}.mp3", "size": 1, "etag": "e",
                          "content_type": "audio/mpeg", "format": "mp3", "duration": 1.0},
        "verified": {"job_id": job_id, "key": f"converted/{job_id}.mp3", "ok": True},
        "renew_upload": {"job_id": job_id, "key": f"converted/{job_id}.mp3"},
        "step_failed": {"job_id": job_id, "step": "uploader", "error": error},
    }


async def bucket_snapshot(storage) -> dict[str, str]:
    """Every object of the bucket and its ETag."""
    found: dict[str, str] = {}
    paginator = storage.client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=storage.bucket):
        found.update({item["Key"]: item["ETag"] for item in page.get("Contents", [])})
    return found


async def test_forged_internal_commands_of_every_type_are_dead_lettered_unread(
        rabbit_pipeline, media_server) -> None:
    done = await rabbit_pipeline.run(ConvertRequested(url=media_server.url("av_h264_aac.mp4"), format="mp3"))
    assert isinstance(done, JobCompleted)
    bus = rabbit_pipeline.bus
    before = await bucket_snapshot(rabbit_pipeline.storage)
    progress_before = len(rabbit_pipeline.progress[done.job_id])
    async with Attacker() as attacker:
        bodies = forged_bodies(done.job_id, attacker.url)
        assert set(bodies) == set(ROUTING_KEYS.values()), "every internal command type is forged"
        expected: dict[str, int] = dict.fromkeys(ACTORS, 0)
        for routing_key, fields in bodies.items():
            type_ = routing_key
            body = json.dumps({"type": type_, **fields}).encode()
            # guest may write ggt.commands: the broker's line is crossed, only the MAC is left
            for mac in (None, "0" * 64):
                env = envelope_for(VerifyObject(job_id=done.job_id, key="k", size=1, etag="e",
                                                content_type="a", format="mp3", duration=1.0),
                                   headers={H_OWNER: "default", **({H_MAC: mac} if mac else {})})
                env = msgspec.structs.replace(env, type=type_)
                await bus.publish_raw(exchange=COMMANDS_EXCHANGE, routing_key=routing_key, body=body, envelope=env)
                expected[_consumer(routing_key)] += 1
        letters = []
        for actor, count in expected.items():
            letters += await dead_letters_of(bus, actor, count=count, timeout=60)
        assert len(letters) == 2 * len(bodies)
        assert {letter.error_code for letter in letters} == {"unauthenticated_message"}
        assert not any(letter.authenticated for letter in letters), "no forged letter is ever signed"
        assert attacker.connections == 0, "nothing reached the attacker"
    assert await bucket_snapshot(rabbit_pipeline.storage) == before, "no job (and no object) changed"
    assert rabbit_pipeline.final_counts[done.job_id] == 1, "the job was not announced again"
    assert len(rabbit_pipeline.progress[done.job_id]) == progress_before, "no event about the job"


def _consumer(routing_key: str) -> str:
    from messages.routing import CONSUMER

    return next(CONSUMER[cls] for cls, key in ROUTING_KEYS.items() if key == routing_key)


# ------------------------------------------------------------------------ replay with forged headers


async def plant(bus: Bus, job: str, *, origin: tuple[str, str], sign: bool, replays: int = -100,
                attempt: int = -100) -> None:
    message = VerifyObject(job_id=job, key=f"converted/{job}.mp3", size=1, etag="e", content_type="audio/mpeg",
                           format="mp3", duration=1.0)
    env = envelope_for(message, headers={
        H_ERROR_CODE: "internal", H_ORIGIN_EXCHANGE: origin[0], H_ORIGIN_ROUTING_KEY: origin[1],
        H_REPLAYS: replays, H_ATTEMPT: attempt})
    if sign:  # a captured message the service once signed, its headers rewritten by the attacker
        assert bus.keys is not None
        env = signed(bus.keys, env, encode(message))
    await bus.publish_raw(exchange=DEAD_LETTER_EXCHANGE, routing_key="verifier", body=encode(message), envelope=env)


async def test_replayed_letters_with_forged_origin_and_counters_go_only_to_the_service_and_the_cap_holds(
        rabbit_bus: Bus) -> None:
    bus = rabbit_bus
    async with bus_sees_every_event(bus):
        async with bus.subscribe("#") as leaked:  # anything replayed onto ggt.events would land here
            await bus.declare_reply_queue("integrator.acme.replies")
            await plant(bus, "forged-events1", origin=(EVENTS_EXCHANGE, "job.acme.x.completed"), sign=False)
            await plant(bus, "forged-reply01", origin=("", "integrator.acme.replies"), sign=True)
            await plant(bus, "forged-events2", origin=(EVENTS_EXCHANGE, "job.acme.x.completed"), sign=True)
            await plant(bus, "forged-tenant1", origin=(REQUESTS_EXCHANGE, "convert.victim"), sign=False)
            await plant(bus, "captured-ok01", origin=(COMMANDS_EXCHANGE, "verify_object"), sign=True)

            outcomes = await replay(bus, actor="verifier", filters=LetterFilter())
            by_job = {o.letter.envelope.job_id: o for o in outcomes}
            for job in ("forged-events1", "forged-tenant1"):
                assert by_job[job].action is Action.SKIPPED and "not written by the service" in by_job[job].reason
            for job in ("forged-reply01", "forged-events2"):
                assert by_job[job].action is Action.SKIPPED and "not one of the service's" in by_job[job].reason
            assert by_job["captured-ok01"].action is Action.REPLAYED
            assert by_job["captured-ok01"].letter.envelope.replays == 0, "a negative count reads as 0"

            replays_seen = []
            async with receiving(bus, "verifier") as got:
                for _ in range(10):  # the cap (3) must stop this loop, never the range
                    delivery = await asyncio.wait_for(got.get(), WAIT)
                    assert delivery.authenticated
                    replays_seen.append((delivery.envelope.replays, delivery.envelope.attempt))
                    await delivery.dead_letter(actor="verifier", error=Error.of(ErrorCode.INTERNAL, "again"))
                    again = await replay(bus, actor="verifier", filters=LetterFilter(job_id="captured-ok01"))
                    if again[0].action is Action.SKIPPED:
                        assert "cap 3" in again[0].reason
                        break
            assert replays_seen == [(1, 1), (2, 1), (3, 1)]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(leaked), 0.5)
        async with bus.subscribe(queue="integrator.acme.replies") as replies:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(replies), 0.5)


# ------------------------------------------------------------------------------- keys at start


async def test_a_rabbit_bus_without_a_bus_key_refuses_to_start(amqp_url: str) -> None:
    bus = RabbitBus(amqp_url, Topology(actors=ACTORS), name="tests-no-key")
    with pytest.raises(BusError, match="GGT_BUS_KEY is not set"):
        await bus.start()
    await bus.close()


async def test_a_publisher_only_client_with_integrator_rights_publishes_requests_and_no_commands(
        rabbit_bus: Bus, integrator: Integrator) -> None:
    client = RabbitBus(integrator.url, rabbit_bus.topology, name="tests-submit", publisher_only=True)
    await client.start()  # declares nothing: an integrator may not
    try:
        await client.publish(ConvertRequested(url="http://127.0.0.1:9/a.mp4", format="mp3", job_id="acme-job-0003"),
                             owner=integrator.tenant)
        with pytest.raises(BusError, match="requests only"):
            await client.publish(VerifyObject(job_id="acme-job-0003", key="k", size=1, etag="e",
                                              content_type="audio/mpeg", format="mp3", duration=1.0))
    finally:
        await client.close()
    async with receiving(rabbit_bus, "coordinator") as got:
        delivery = await asyncio.wait_for(got.get(), WAIT)
        assert delivery.authenticated and delivery.envelope.owner == integrator.tenant
        assert delivery.user_id is None
        await delivery.ack()
