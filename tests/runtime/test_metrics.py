"""The product's metrics move when the actors do, and an actor process serves them."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter

from actors.bootstrap.wiring import topology
from actors.runtime import metrics
from bus.memory import MemoryBus
from messages.types import ConvertRequested, JobCompleted, JobFailed
from tests.fixtures.broker import test_settings as settings_for_tests

ACTORS = ("coordinator", "converter", "uploader", "verifier")


@pytest.fixture
async def memory_bus() -> AsyncIterator[MemoryBus]:
    """A started in-memory bus."""
    bus = MemoryBus(topology(settings_for_tests()))
    await bus.start()
    yield bus
    await bus.close()


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def settled(actor: str, *, timeout: float = 10.0) -> None:
    """Wait until ``actor`` has nothing in flight (a condition polled under a timeout)."""
    async with asyncio.timeout(timeout):
        # the registry has no change notification to wait on
        while metrics.value("ggt_jobs_in_flight", {"actor": actor}) > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def snapshot() -> dict[str, float]:
    """The figures these tests watch, read from the one registry."""
    return {
        "presign_upload": metrics.value("ggt_presign_attempts_total", {"kind": "upload"}),
        "presign_download": metrics.value("ggt_presign_attempts_total", {"kind": "download"}),
        "presign_failures": metrics.total("ggt_presign_failures_total"),
        "uploads": metrics.value("ggt_direct_upload_attempts_total", {"format": "mp3"}),
        "upload_failures": metrics.total("ggt_direct_upload_failures_total"),
        "bytes_streamed": metrics.value("ggt_bytes_streamed_total", {"format": "mp3"}),
        "verified": metrics.value("ggt_verifications_total", {"outcome": "passed"}),
        "total_seconds_count": metrics.value("ggt_job_stage_seconds_count", {"format": "mp3", "stage": "total"}),
        "coordinator_bytes": metrics.total("ggt_coordinator_file_bytes_total"),
        **{f"processed_{a}": metrics.value("ggt_messages_processed_total", {"actor": a}) for a in ACTORS},
        "converter_failed": metrics.total("ggt_messages_failed_total", actor="converter"),
    }


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


async def test_a_completed_job_moves_every_counter_and_no_file_byte_passes_the_coordinator(pipeline, media_server):
    before = snapshot()
    final = await pipeline.run(ConvertRequested(url=media_server.url("audio.mp3"), format="mp3"))
    assert isinstance(final, JobCompleted), final
    # the final event goes out before the coordinator's handler returns and acks: wait for that
    await settled("coordinator")
    delta = moved(before, snapshot())
    assert delta["presign_upload"] == 1 and delta["presign_download"] == 1 and delta["presign_failures"] == 0
    assert delta["uploads"] == 1 and delta["upload_failures"] == 0
    assert delta["bytes_streamed"] == final.size > 0
    assert delta["verified"] == 1
    assert delta["total_seconds_count"] == 1
    # coordinator: convert, media_resolved, streamed, verified; the others one message each
    assert delta["processed_coordinator"] == 4
    assert delta["processed_converter"] == delta["processed_uploader"] == delta["processed_verifier"] == 1
    assert delta["coordinator_bytes"] == 0
    assert metrics.actors_here() == set(ACTORS)
    assert all(metrics.value("ggt_jobs_in_flight", {"actor": a}) == 0 for a in ACTORS)


async def test_a_source_that_is_not_media_counts_as_a_failed_step_of_the_converter(pipeline, media_server):
    before = snapshot()
    final = await pipeline.run(ConvertRequested(url=media_server.url("not_media.mp4"), format="mp3"))
    assert isinstance(final, JobFailed)
    delta = moved(before, snapshot())
    assert delta["converter_failed"] == 1 and delta["uploads"] == 0 and delta["presign_upload"] == 0


async def test_the_coordinator_byte_counter_measures_file_bytes_through_a_watched_client(storage):
    # a private counter of the same shape: the product's own must keep reading 0 for the other tests
    registry = CollectorRegistry()
    counter = Counter("ggt_coordinator_file_bytes", "test copy", ["direction"], registry=registry)
    metrics.watch_file_bytes(storage.client, counter=counter)
    data = b"x" * 12_345
    await storage.client.put_object(Bucket=storage.bucket, Key="converted/2024/01/01/relay.mp3", Body=data)
    response = await storage.client.get_object(Bucket=storage.bucket, Key="converted/2024/01/01/relay.mp3")
    async with response["Body"] as body:
        await body.read()
    await storage.client.put_object(Bucket=storage.bucket, Key="jobs/not-a-file.json", Body=b"{}")
    # a multipart upload: the part's bytes count, the create and complete requests' XML does not
    key, part = "converted/2024/01/01/parts.mp3", b"y" * 1_000
    upload = await storage.client.create_multipart_upload(Bucket=storage.bucket, Key=key)
    answer = await storage.client.upload_part(Bucket=storage.bucket, Key=key, UploadId=upload["UploadId"],
                                              PartNumber=1, Body=part)
    await storage.client.complete_multipart_upload(
        Bucket=storage.bucket, Key=key, UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": answer["ETag"]}]})
    assert registry.get_sample_value("ggt_coordinator_file_bytes_total", {"direction": "sent"}) == len(data) + len(part)
    assert registry.get_sample_value("ggt_coordinator_file_bytes_total", {"direction": "received"}) == len(data)


async def test_an_actor_process_serves_its_metrics_on_the_metrics_port(memory_bus):
    off = msgspec.structs.replace(settings_for_tests(), http_host="127.0.0.1", metrics_port=0)
    async with metrics.exposed(off, memory_bus) as port:
        assert port is None, "port 0 means no metrics server"
    on = msgspec.structs.replace(off, metrics_port=free_port())
    async with metrics.exposed(on, memory_bus) as port, aiohttp.ClientSession() as http:
        assert port == on.metrics_port
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    assert "# TYPE ggt_messages_processed_total counter" in text
    assert 'ggt_queue_depth{queue="ggt.uploader"} 0.0' in text
