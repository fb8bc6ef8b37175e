"""A job whose step was dead-lettered during a storage outage completes after an operator's replay."""

from __future__ import annotations

from bus.replay import list_letters, replay
from messages.types import ConvertRequested, JobCompleted, Stage
from tests.fixtures.pipeline import memory_pipeline
from tests.support.buses import dead_letters_of

#: bytes per second of the slow source: the conversion lasts a few seconds, long enough to cut storage
SLOW_RATE = 40_000


async def test_a_job_dead_lettered_in_an_outage_completes_after_a_replay(strict_s3, strict_storage, media_server):
    request = ConvertRequested(url=media_server.url(f"slow/av_h264_aac.mp4?rate={SLOW_RATE}"), format="mp3",
                               job_id="revive-job-0001")
    async with memory_pipeline(strict_storage.config, strict_storage) as pipeline:
        await pipeline.bus.publish(request)
        await pipeline.wait_until(
            lambda: any(e.stage == Stage.CONVERTING for e in pipeline.progress[request.job_id]),
            timeout=60, what="the conversion to start")
        await strict_s3.down()
        [letter] = await dead_letters_of(pipeline.bus, "uploader", count=1, timeout=120)
        assert letter.error_code == "storage_unavailable" and letter.envelope.type == "stream_to_storage"
        await strict_s3.up()
        outcomes = await replay(pipeline.bus)
        assert outcomes and all(o.action == "replayed" for o in outcomes), outcomes
        await pipeline.wait_until(lambda: isinstance(pipeline.finals.get(request.job_id), JobCompleted),
                                  timeout=120, what="the revived job to complete")
        assert await list_letters(pipeline.bus) == []
        keys = await pipeline.stored_keys()
    final = pipeline.finals[request.job_id]
    assert isinstance(final, JobCompleted) and keys == [final.key]
    assert await strict_storage.list_multipart_uploads() == [], "the stale upload was aborted"
    assert pipeline.final_counts[request.job_id] <= 2, "at most a retryable JobFailed, then JobCompleted"


async def test_a_request_whose_first_command_was_not_published_is_resumed_by_its_retry(
        storage_config, storage, media_server, monkeypatch):
    from bus.base import BusError
    from bus.memory import MemoryBus

    original = MemoryBus.publish_raw
    refused = []

    async def refuse_first_resolve(self, **kw):
        if kw["routing_key"] == "resolve_media" and not refused:
            refused.append(kw["envelope"].message_id)
            raise BusError("broker dropped the publish")
        return await original(self, **kw)

    monkeypatch.setattr(MemoryBus, "publish_raw", refuse_first_resolve)
    async with memory_pipeline(storage_config, storage) as pipeline:
        final = await pipeline.run(ConvertRequested(url=media_server.url("audio.mp3"), format="mp3",
                                                    job_id="resume-job-0001"))
    assert refused, "the first ResolveMedia publish failed after the job was recorded"
    assert isinstance(final, JobCompleted)
