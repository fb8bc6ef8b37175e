"""Queue settings an operator may change: a changed delivery limit takes effect on the next start,
on the real broker, without deleting a queue or failing the start."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

from actors.bootstrap.wiring import make_bus
from actors.cli.check import Status, check_broker
from actors.runtime.worker import Worker
from messages.types import VerifyObject
from tests.fixtures.broker import _local_vhost
from tests.fixtures.broker import test_settings as settings_for
from tests.support.buses import dead_letters_of, receiving, running
from tests.support.probe_actor import ProbeActor


@pytest.fixture
def fresh_vhost_url(amqp_url: str):
    """The test broker on a vhost of its own (queues start absent), else the session's vhost."""
    name = _local_vhost(f"ggt-qsettings-{uuid.uuid4().hex[:8]}")
    if name is None:
        yield amqp_url
        return
    yield urlunsplit(urlsplit(amqp_url)._replace(path=f"/{name}"))
    subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60, check=False)


async def test_a_changed_delivery_limit_takes_effect_on_the_next_start(fresh_vhost_url: str) -> None:
    first = settings_for(amqp_url=fresh_vhost_url, delivery_limit=5)
    bus = make_bus(first, name="first-start")
    await bus.start()
    await bus.close()

    changed = settings_for(amqp_url=fresh_vhost_url, delivery_limit=2)
    bus = make_bus(changed, name="second-start")
    await bus.start()  # refused with PRECONDITION_FAILED before: every actor failed to start
    try:
        assert any("ggt.verifier" in note for note in bus.topology_notes), bus.topology_notes
        job = f"limit-{uuid.uuid4().hex[:8]}"
        await bus.publish(VerifyObject(job_id=job, key=f"converted/{job}.mp3", size=1, etag="e",
                                       content_type="audio/mpeg", format="mp3", duration=1.0))
        async with receiving(bus, "verifier") as got:
            for _ in range(changed.delivery_limit):  # a consumer "dies" holding it, twice
                await (await asyncio.wait_for(got.get(), 10)).release()
        actor = ProbeActor(settings=changed, bus=bus)
        async with running(Worker(actor)):
            [letter] = await dead_letters_of(bus, "verifier", count=1)
        # the new limit (2) is in force, not the queue's first one (5): with 5 the handler would have
        # run this delivery; with 2 it is dead-lettered unhandled, by the actors, with its job reported
        assert actor.lines == []
        assert letter.envelope.job_id == job and "without being settled" in letter.error_message
    finally:
        await bus.close()


async def test_check_warns_when_a_queue_keeps_its_first_arguments(fresh_vhost_url: str) -> None:
    bus = make_bus(settings_for(amqp_url=fresh_vhost_url, delivery_limit=7), name="older-deployment")
    await bus.start()
    await bus.close()
    result = await check_broker(settings_for(amqp_url=fresh_vhost_url, delivery_limit=4))
    assert result.status is Status.WARN and "other arguments" in result.detail
    assert (await check_broker(settings_for(amqp_url=fresh_vhost_url, delivery_limit=7))).status is Status.OK
