"""The four actors as four separate OS processes over the real RabbitMQ and S3."""

from __future__ import annotations

from messages.types import ConvertRequested, JobCompleted
from tests.fixtures.pipeline import pipeline_settings
from tests.support.cluster import actor_cluster


async def test_four_actor_processes_complete_twenty_jobs(storage_config, storage, amqp_url, media_server,
                                                         rabbit_bus, tmp_path):
    settings = pipeline_settings(storage_config, amqp_url=amqp_url)
    sources = ["av_h264_aac.mp4", "audio.mp3", "av_vp9_opus.webm", "audio_only.m4a"]
    formats = ["mp3", "m4a", "opus", "flac", "wav"]
    requests = [
        ConvertRequested(url=media_server.url(sources[i % 4]), format=formats[i % 5], job_id=f"procs-{i:04d}")
        for i in range(20)
    ]
    async with actor_cluster(settings, tmp_path) as cluster:
        cluster.start_all()
        await cluster.run(requests)
        assert {type(f) for f in cluster.finals.values()} == {JobCompleted}, cluster.finals
        assert all(count == 1 for count in cluster.final_counts.values())
        assert len({p.pid for ps in cluster.processes.values() for p in ps}) == 4
    keys = sorted(f.key for f in cluster.finals.values())
    paginator = storage.client.get_paginator("list_objects_v2")
    stored = []
    async for page in paginator.paginate(Bucket=storage.bucket, Prefix="converted/"):
        stored += [item["Key"] for item in page.get("Contents", [])]
    assert sorted(stored) == keys, "exactly one stored object per job"
    assert await storage.list_multipart_uploads() == []
