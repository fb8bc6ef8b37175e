"""Tenants: an API key (or an integrator's owner on the bus) owns its jobs and nobody else sees them.

Tried as tenant B would against tenant A's jobs: over HTTP (status, events, download) and over AMQP
(a duplicate request with its own reply_to), with the same client job ids and idempotency keys.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import pytest

from actors.core.jobs import decode_record, job_id_for, store_owner
from actors.gateway.app import make_app
from actors.gateway.auth import bare_key_tenant, parse_api_keys
from bus.base import Bus
from messages.codec import decode
from messages.types import ConvertRequested, JobCompleted, JobFailed
from storage import JobStore
from tests.gateway.test_gateway import FAST, read_events, serve

ALICE_TOKEN, BOB_TOKEN = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"
KEYS = (f"alice:{ALICE_TOKEN}", f"bob:{BOB_TOKEN}")
#: seconds a reply queue is waited on for one message
REPLY_TIMEOUT = 120.0


def as_(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def tenants_gateway(pipeline):
    """The gateway on the running pipeline with two tenants' keys (no rate limit)."""
    settings = msgspec.structs.replace(pipeline.settings, rate_limit_per_minute=0, api_keys=KEYS)
    async with serve(make_app(settings, bus=pipeline.bus, storage=pipeline.storage, options=FAST)) as client:
        yield client


async def run_over_http(client, token: str, body: dict) -> tuple[str, list]:
    """Submit ``body`` as ``token``'s tenant and follow its events to the end."""
    response = await client.post("/api/convert", json=body, headers=as_(token))
    assert response.status == 202, await response.text()
    job_id = (await response.json())["job_id"]
    async with client.get(f"/api/jobs/{job_id}/events", headers=as_(token)) as stream:
        assert stream.status == 200
        return job_id, await read_events(stream)


# ----------------------------------------------------------------------------------- the keys


def test_keys_name_their_tenants_and_a_bare_token_gets_a_stable_name_that_hides_it():
    keys = parse_api_keys((f"alice:{ALICE_TOKEN}", BOB_TOKEN))
    assert [k.tenant for k in keys] == ["alice", bare_key_tenant(BOB_TOKEN)]
    assert bare_key_tenant(BOB_TOKEN) == bare_key_tenant(BOB_TOKEN) != bare_key_tenant(ALICE_TOKEN)
    assert bare_key_tenant(BOB_TOKEN).startswith("key-") and BOB_TOKEN[:8] not in bare_key_tenant(BOB_TOKEN)


@pytest.mark.parametrize("entries, problem", [
    (("alice:",), "blank token"),
    (("",), "blank token"),
    (("alice:has a space in it 0123",), "blank token"),
    (("alice:short",), "at least 16"),
    (("Alice!:" + ALICE_TOKEN,), "is not"),
    ((f"alice:{ALICE_TOKEN}", f"bob:{ALICE_TOKEN}"), "repeats a token"),
    # the service's own tenants: a named key taking one would share the CLI's or a bare key's jobs
    ((f"default:{ALICE_TOKEN}",), "reserved"),
    ((f"{bare_key_tenant(BOB_TOKEN)}:{ALICE_TOKEN}", BOB_TOKEN), "reserved"),
])
def test_blank_short_badly_named_or_repeated_keys_are_refused_without_echoing_the_token(entries, problem):
    with pytest.raises(ValueError, match=problem) as caught:
        parse_api_keys(entries)
    assert ALICE_TOKEN not in str(caught.value)


def test_derived_job_ids_are_scoped_by_owner_and_the_default_tenant_keeps_its_old_ids():
    keyed = ConvertRequested(url="https://e.com/a", format="mp3", idempotency_key="order-1")
    alice, bob = job_id_for(keyed, message_id="m", owner="alice"), job_id_for(keyed, message_id="m", owner="bob")
    assert alice != bob
    assert alice == job_id_for(keyed, message_id="other", owner="alice"), "a key keeps naming one job"
    assert job_id_for(keyed, message_id="m") == job_id_for(keyed, message_id="m", owner="default")
    assert store_owner("default") == "" and store_owner("alice") == "alice"


# ------------------------------------------------------------------------------------ over HTTP


async def test_a_job_of_tenant_a_is_invisible_to_tenant_b_over_http(tenants_gateway, pipeline, media_server):
    client = tenants_gateway
    owners: list[tuple[str, str, str]] = []

    async def note_owners(events) -> None:
        async for envelope, _ in events:
            owners.append((envelope.job_id, envelope.type, envelope.owner))

    async with pipeline.bus.subscribe("job.#") as everything:
        noting = asyncio.create_task(note_owners(everything))
        job_id, events = await run_over_http(client, ALICE_TOKEN, {"url": media_server.url("audio.mp3"),
                                                                   "format": "mp3"})
        noting.cancel()
    assert events[-1].event == "completed"
    mine = [(kind, owner) for jid, kind, owner in owners if jid == job_id]
    assert mine and all(owner == "alice" for _, owner in mine), f"every event of the job names its owner: {mine}"

    assert (await client.get(f"/api/jobs/{job_id}", headers=as_(ALICE_TOKEN))).status == 200
    unknown = await (await client.get("/api/jobs/never-was-a-job", headers=as_(BOB_TOKEN))).json()
    for path in (f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/events", f"/api/jobs/{job_id}/download"):
        response = await client.get(path, headers=as_(BOB_TOKEN), allow_redirects=False)
        assert response.status == 404, path
        body = await response.json()
        assert body == unknown, "another tenant's job looks exactly like no job"
        assert media_server.url("audio.mp3") not in str(body)
    own = await client.get(f"/api/jobs/{job_id}/download", headers=as_(ALICE_TOKEN), allow_redirects=False)
    assert own.status == 302


async def test_the_same_client_job_id_from_two_tenants_makes_two_jobs(tenants_gateway, pipeline, media_server):
    client = tenants_gateway
    body = {"url": media_server.url("audio.mp3"), "format": "mp3", "job_id": "order-000001"}
    (alice_id, alice_events), (bob_id, bob_events) = await asyncio.gather(
        run_over_http(client, ALICE_TOKEN, body), run_over_http(client, BOB_TOKEN, {**body, "format": "wav"}))
    assert alice_id == bob_id == "order-000001"
    assert alice_events[-1].event == bob_events[-1].event == "completed"
    assert alice_events[-1].data["format"] == "mp3" and bob_events[-1].data["format"] == "wav"
    assert alice_events[-1].data["key"] != bob_events[-1].data["key"]

    store = JobStore(pipeline.storage)
    records = [decode_record((await store.load("order-000001", owner=owner))[0]) for owner in ("alice", "bob")]
    assert [r.owner for r in records] == ["alice", "bob"]
    seen_by_alice = await (await client.get("/api/jobs/order-000001", headers=as_(ALICE_TOKEN))).json()
    assert seen_by_alice["result"]["key"] == records[0].key


async def test_the_same_idempotency_key_from_a_and_b_makes_two_jobs(tenants_gateway, media_server):
    client = tenants_gateway
    body = {"url": media_server.url("audio.mp3"), "format": "mp3", "idempotency_key": "order-4711"}
    (alice_id, alice_events), (bob_id, bob_events) = await asyncio.gather(
        run_over_http(client, ALICE_TOKEN, body), run_over_http(client, BOB_TOKEN, body))
    assert alice_id != bob_id
    assert alice_events[-1].event == bob_events[-1].event == "completed"
    assert alice_events[-1].data["key"] != bob_events[-1].data["key"]
    again = await client.post("/api/convert", json=body, headers=as_(ALICE_TOKEN))
    assert (await again.json())["job_id"] == alice_id, "within a tenant the key still names one job"


# ------------------------------------------------------------------------------------ over AMQP


@contextlib.asynccontextmanager
async def reply_queue(bus: Bus, name: str) -> AsyncIterator[AsyncIterator]:
    """A declared reply-to queue, read while the block runs."""
    await bus.declare_reply_queue(name)
    async with bus.subscribe(queue=name) as replies:
        yield replies


async def next_reply(replies: AsyncIterator) -> JobCompleted | JobFailed:
    envelope, body = await asyncio.wait_for(anext(replies), REPLY_TIMEOUT)
    message = decode(body, type_name_hint=envelope.type)
    assert isinstance(message, JobCompleted | JobFailed)
    return message


async def test_over_amqp_a_duplicate_request_from_another_owner_gets_nothing_of_the_job(rabbit_pipeline,
                                                                                       media_server):
    bus = rabbit_pipeline.bus
    request = ConvertRequested(url=media_server.url("audio.mp3"), format="mp3", job_id="order-amqp-0001")
    async with reply_queue(bus, "integrator.alice.replies") as alice, \
            reply_queue(bus, "integrator.bob.replies") as bob, \
            reply_queue(bus, "integrator.alice.replies2") as alice_again:
        await bus.publish(request, owner="alice", reply_to="integrator.alice.replies")
        first = await next_reply(alice)
        assert isinstance(first, JobCompleted)

        # bob sends the very same request (job id included) with his own reply_to: his is a new job of
        # his own (here one that fails at once), never a re-announce of alice's result
        await bus.publish(msgspec.structs.replace(request, url="ftp://127.0.0.1/a.mp3"), owner="bob",
                          reply_to="integrator.bob.replies")
        bobs = await next_reply(bob)
        assert isinstance(bobs, JobFailed) and bobs.error.code == "unsupported_url"
        assert first.download_url not in msgspec.json.encode(bobs).decode()

        # the owner's own duplicate with a new reply_to does get the result (the control)
        await bus.publish(request, owner="alice", reply_to="integrator.alice.replies2")
        again = await next_reply(alice_again)
        assert isinstance(again, JobCompleted) and again.key == first.key

        store = JobStore(rabbit_pipeline.storage)
        alices = decode_record((await store.load("order-amqp-0001", owner="alice"))[0])
        bobs_record = decode_record((await store.load("order-amqp-0001", owner="bob"))[0])
        assert alices.result is not None and alices.result.key == first.key
        assert bobs_record.result is None and bobs_record.error is not None
