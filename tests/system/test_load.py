"""Load: 200 jobs published at once by another system, actors as separate processes (two uploaders).

The publisher is a plain AMQP client writing JSON by hand, as docs/MESSAGES.md tells other systems
to. The sources are 1–2 s clips generated with ffmpeg, so the run measures the pipeline's own
overhead per job. ``GGT_LOAD_JOBS`` runs it with more jobs on demand (the figure lands in
``$GGT_RELIABILITY_FIGURES`` like the fault suite's).
"""

from __future__ import annotations

import json
import os

import pytest

from messages.types import JobCompleted
from tests.fixtures.pipeline import pipeline_settings
from tests.support.cluster import actor_cluster
from tests.support.faults import (
    Stopwatch,
    keys_per_job,
    peak_rss_kib,
    publish_plain,
    record_figure,
    stored_keys,
)

pytestmark = pytest.mark.slow

#: jobs published at once (GGT_LOAD_JOBS overrides, for bigger runs on demand)
LOAD_JOBS = int(os.environ.get("GGT_LOAD_JOBS", "200"))
#: seconds the whole batch may take on a 2-core machine
LOAD_TIMEOUT = 300.0
#: uploader processes: the conversion is the costly step
UPLOADERS = 2
#: (seconds, audio codec, extension) of the small generated sources, and the formats asked for
CLIPS = ((1, "aac", "m4a"), (2, "mp3", "mp3"), (2, "opus", "opus"))
FORMATS = ("mp3", "m4a", "opus", "wav")


def convert_message(url: str, fmt: str, job_id: str) -> tuple[str, bytes, dict[str, object]]:
    """A ConvertRequested as another system writes it: a dict dumped to JSON, AMQP properties by hand."""
    body = json.dumps({"type": "convert_requested", "url": url, "format": fmt, "job_id": job_id}).encode()
    return "convert.default", body, {"content_type": "application/json", "type": "convert_requested",
                                     "message_id": f"load-msg-{job_id}"}


async def test_two_hundred_jobs_published_at_once_all_complete(
        storage_config, storage, amqp_url, rabbit_bus, media_server, media_files, tmp_path):
    settings = pipeline_settings(storage_config, amqp_url=amqp_url)
    clips = [media_files.make_media(seconds=s, video=None, audio=codec, ext=ext) for s, codec, ext in CLIPS]
    urls = [media_server.url(clip.name) for clip in clips]
    ids = [f"load-{i:05d}" for i in range(LOAD_JOBS)]
    messages = [convert_message(urls[i % len(urls)], FORMATS[i % len(FORMATS)], job_id)
                for i, job_id in enumerate(ids)]
    async with actor_cluster(settings, tmp_path) as cluster:
        cluster.start("coordinator")
        cluster.start("converter")
        for _ in range(UPLOADERS):
            cluster.start("uploader")
        cluster.start("verifier")
        clock = Stopwatch()
        await publish_plain(amqp_url, messages)
        published = clock()
        await cluster.wait_until(lambda: all(i in cluster.finals for i in ids), timeout=LOAD_TIMEOUT,
                                 what=f"{LOAD_JOBS} jobs to finish")
        finished = clock()
        # VmHWM is the peak so far: read while the processes still run
        peaks = {f"{actor}-{n}": peak_rss_kib(child.pid)
                 for actor, children in cluster.processes.items() for n, child in enumerate(children)}
    keys = await stored_keys(storage)
    completed = sum(isinstance(cluster.finals[i], JobCompleted) for i in ids)
    record_figure(tmp_path, "load", jobs=LOAD_JOBS, uploaders=UPLOADERS, publish_s=published,
                  seconds_to_complete=finished, jobs_per_second=round(LOAD_JOBS / finished, 2),
                  completed=completed, stored_objects=len(keys),
                  peak_rss_mib={name: round(kib / 1024, 1) for name, kib in peaks.items() if kib})
    assert completed == LOAD_JOBS, {i: cluster.finals[i] for i in ids
                                    if not isinstance(cluster.finals[i], JobCompleted)}
    assert len(keys) == LOAD_JOBS and set(keys_per_job(keys).values()) == {1}, "none lost, none duplicated"
    assert all(cluster.final_counts[i] == 1 for i in ids)
    assert all(peaks.values()), "every actor process was alive at the end"
