"""The runtime as real processes on the real broker: SIGKILL, SIGTERM, dropped connections."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess

from actors.runtime.settings import Settings
from bus.base import Bus
from messages.types import VerifyObject
from tests.support.buses import dead_letters_of
from tests.support.processes import children, lines, python, settings_env, until


def verify(job: str) -> VerifyObject:
    return VerifyObject(job_id=job, key=f"converted/{job}.mp3", size=1, etag="e", content_type="audio/mpeg",
                        format="mp3", duration=1.0)


def probe_argv(log, work_seconds: float) -> list[str]:
    return python("-m", "tests.support.probe_actor", str(log), str(work_seconds))


async def test_actor_killed_mid_message_redelivers_and_completes_exactly_once(
        rabbit_bus: Bus, rabbit_settings: Settings, tmp_path):
    record = tmp_path / "record.txt"
    env = settings_env(rabbit_settings)
    await rabbit_bus.publish(verify("slow-killed1"))
    with children() as start:
        first = start(probe_argv(record, 60), env=env, log_path=tmp_path / "first.log")
        await until(lambda: any(x.startswith("started slow-killed1") for x in lines(record)), what="first start")
        first.signal(signal.SIGKILL)
        first.wait()
        start(probe_argv(record, 0), env=env, log_path=tmp_path / "second.log")
        await until(lambda: "completed slow-killed1" in lines(record), what="completion after redelivery")
    got = lines(record)
    assert sum(x.startswith("started slow-killed1") for x in got) == 2
    assert got.count("completed slow-killed1") == 1
    assert await dead_letters_of(rabbit_bus, "verifier", count=0) == []


async def test_sigterm_during_a_long_handler_redelivers_instead_of_dead_lettering(
        rabbit_bus: Bus, rabbit_settings: Settings, tmp_path):
    record = tmp_path / "record.txt"
    env = {**settings_env(rabbit_settings), "GGT_SHUTDOWN_GRACE": "0.5"}
    await rabbit_bus.publish(verify("slow-sigterm"))
    with children() as start:
        first = start(probe_argv(record, 60), env=env, log_path=tmp_path / "first.log")
        await until(lambda: any(x.startswith("started slow-sigterm") for x in lines(record)), what="start")
        first.signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 30) == 0, "graceful exit"
        assert await dead_letters_of(rabbit_bus, "verifier", count=0) == []
        start(probe_argv(record, 0), env=env, log_path=tmp_path / "second.log")
        await until(lambda: "completed slow-sigterm" in lines(record), what="completion after restart")
    assert lines(record).count("completed slow-sigterm") == 1


async def test_consumers_come_back_after_the_broker_closes_every_connection(
        rabbit_bus: Bus, rabbit_settings: Settings, tmp_path):
    record = tmp_path / "record.txt"
    env = settings_env(rabbit_settings)
    vhost = rabbit_settings.amqp_url.rsplit("/", 1)[-1] or "/"
    jobs = [f"ok-reconnect-{i:03d}" for i in range(60)]
    with children() as start:
        start(probe_argv(record, 0), env=env, log_path=tmp_path / "actor.log")
        for job in jobs[:30]:
            await rabbit_bus.publish(verify(job))
        await until(lambda: sum(x.startswith("completed") for x in lines(record)) >= 5, what="first completions")
        ctl = shutil.which("rabbitmqctl")
        assert ctl, "rabbitmqctl is needed to close connections"
        await asyncio.to_thread(subprocess.run, [ctl, "close_all_connections", "-p", vhost, "test: dropped"],
                                check=True, capture_output=True, timeout=60)
        for job in jobs[30:]:  # a publish while the connection is down waits for the reconnect
            await rabbit_bus.publish(verify(job))
        await until(lambda: all(f"completed {j}" in lines(record) for j in jobs), timeout=90,
                    what="every job completed after reconnect")
    got = lines(record)
    assert all(got.count(f"completed {j}") == 1 for j in jobs)
    assert await dead_letters_of(rabbit_bus, "verifier", count=0) == []
