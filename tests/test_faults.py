"""Fault injection: the real broker, actors as separate processes, faults injected mid-flight.

Each test names the fault it injects and what must hold afterwards, and records what it measured
(tests/support/faults.py ``record_figure``); docs/RELIABILITY.md tabulates those figures.
"""

from __future__ import annotations

import pytest

from actors.planning import progress_percent
from messages.types import ConvertRequested, JobCompleted, Stage
from tests.fixtures.pipeline import pipeline_settings
from tests.support.cluster import actor_cluster
from tests.support.faults import (
    Stopwatch,
    keys_per_job,
    latest_stage,
    per_job_sources,
    record_figure,
    stored_keys,
)

pytestmark = pytest.mark.slow

#: jobs in flight in every scenario
JOBS = 20
#: seconds of the slow scenarios' source: long enough to be killed mid-way, 5.5 MiB as wav (multipart)
SLOW_SOURCE_SECONDS = 30
#: bytes per second the media server sends a slow source at (~4 s per fetch of the 30 s mp3)
SLOW_RATE = 128 * 1024
#: messages each actor process holds at once: all of a wave of jobs are in flight together
FAULT_PREFETCH = "10"
#: seconds a scenario's jobs may take after the fault
RECOVERY_TIMEOUT = 180.0
#: percent reported when the uploader has not yet said anything about the conversion
CONVERTING_START = progress_percent(Stage.CONVERTING, 0.0)


def slow_requests(media_server, media_files, prefix: str) -> list[ConvertRequested]:
    """JOBS requests for slow sources, one source file per job; half to wav (multipart), half to mp3."""
    source = media_files.make_media(seconds=SLOW_SOURCE_SECONDS, video=None, audio="mp3", ext="mp3")
    job_ids = [f"{prefix}-{i:04d}" for i in range(JOBS)]
    paths = per_job_sources(media_files, source, job_ids, folder=f"faults/{prefix}")
    return [
        ConvertRequested(url=media_server.url(f"slow/{paths[job_id]}?rate={SLOW_RATE}"),
                         format="wav" if i % 2 else "mp3", job_id=job_id)
        for i, job_id in enumerate(job_ids)
    ]


def fetches_per_job(media_server, requests: list[ConvertRequested]) -> list[int]:
    """How often each job's own source was fetched (resolving, probing, converting, redone work)."""
    return [len(media_server.requests_for(r.url.split("/", 3)[3].split("?")[0])) for r in requests]


def in_stage(cluster, stage: Stage, *, started: bool = False) -> list[str]:
    """Jobs not yet final whose last progress is ``stage`` (``started``: the uploader reported output)."""
    jobs = []
    for job_id, events in cluster.progress.items():
        if job_id in cluster.finals or latest_stage(events) != stage:
            continue
        if started and events[-1].percent <= CONVERTING_START:
            continue
        jobs.append(job_id)
    return jobs


#: what "work in flight" looks like for each actor, read from the progress events
IN_FLIGHT = {
    # the converter has planned some jobs and still holds others
    "converter": lambda c: bool(in_stage(c, Stage.CONVERTING)) and len(in_stage(c, Stage.PREPARING)) >= 4,
    # ffmpeg is running for several jobs
    "uploader": lambda c: len(in_stage(c, Stage.CONVERTING, started=True)) >= 4,
    # jobs are being verified while others still stream
    "verifier": lambda c: bool(in_stage(c, Stage.VERIFYING)) and len(in_stage(c, Stage.CONVERTING)) >= 4,
    # the coordinator is between steps for many jobs at once
    "coordinator": lambda c: bool(in_stage(c, Stage.VERIFYING)) and len(in_stage(c, Stage.CONVERTING)) >= 4,
}
#: the stage whose work the actor is doing
STAGE_OF = {"converter": Stage.PREPARING, "uploader": Stage.CONVERTING, "verifier": Stage.VERIFYING,
            "coordinator": Stage.VERIFYING}


@pytest.mark.parametrize("actor", ["converter", "uploader", "verifier", "coordinator"])
async def test_sigkill_mid_job_every_job_completes_once_with_no_open_upload(
        actor, storage_config, storage, amqp_url, rabbit_bus, media_server, media_files, tmp_path):
    settings = pipeline_settings(storage_config, amqp_url=amqp_url)
    requests = slow_requests(media_server, media_files, f"kill-{actor}")
    clock = Stopwatch()
    async with actor_cluster(settings, tmp_path) as cluster:
        cluster.start_all(GGT_PREFETCH=FAULT_PREFETCH)
        await cluster.publish(requests)
        await cluster.wait_until(lambda: IN_FLIGHT[actor](cluster), timeout=RECOVERY_TIMEOUT,
                                 what=f"{actor} work in flight")
        in_flight = len(in_stage(cluster, STAGE_OF[actor]))
        killed_at = clock()
        victim = cluster.processes[actor][0]
        cluster.kill(victim)
        cluster.start(actor, GGT_PREFETCH=FAULT_PREFETCH)
        after_kill = Stopwatch()
        ids = [r.job_id for r in requests]
        await cluster.wait_until(lambda: all(i in cluster.finals for i in ids), timeout=RECOVERY_TIMEOUT,
                                 what=f"{JOBS} jobs to finish after the {actor} was killed")
        recovered = after_kill()
        final_counts = dict(cluster.final_counts)
    finals = cluster.finals
    keys = await stored_keys(storage)
    open_uploads = await storage.list_multipart_uploads()
    fetches = fetches_per_job(media_server, requests)
    record_figure(tmp_path, f"sigkill {actor}", jobs=JOBS, jobs_in_stage_at_kill=in_flight, killed_at_s=killed_at,
                  seconds_to_finish_after_kill=recovered, total_s=clock(),
                  completed=sum(isinstance(f, JobCompleted) for f in finals.values()),
                  stored_objects=len(keys), open_uploads=len(open_uploads),
                  final_events_max_per_job=max(final_counts.values()),
                  source_fetches_total=sum(fetches), source_fetches_per_job=[min(fetches), max(fetches)],
                  jobs_refetched=sum(f > min(fetches) for f in fetches))
    assert {type(f) for f in finals.values()} == {JobCompleted}, {j: f for j, f in finals.items()
                                                                   if not isinstance(f, JobCompleted)}
    assert len(keys) == JOBS and set(keys_per_job(keys).values()) == {1}, "exactly one stored object per job"
    assert sorted(keys) == sorted(f.key for f in finals.values())
    assert open_uploads == [], "no multipart upload left open"
