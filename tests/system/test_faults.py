"""Fault injection: the real broker, actors as separate processes, faults injected mid-flight.

Each test names the fault it injects and what must hold afterwards, and records what it measured
(tests/support/faults.py ``record_figure``); docs/RELIABILITY.md tabulates those figures.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from actors.core.stages import progress_percent
from bus.base import BusError
from bus.replay import list_letters, replay
from messages.errors import ErrorCode
from messages.routing import ROUTING_KEYS
from messages.types import ConvertRequested, JobCompleted, JobFailed, JobProgress, Stage, VerifyObject
from tests.fixtures.pipeline import pipeline_settings
from tests.support.cluster import actor_cluster
from tests.support.faults import (
    CommandTap,
    Stopwatch,
    alive,
    descendants,
    keys_per_job,
    latest_stage,
    per_job_sources,
    publish_plain,
    rabbitmqctl,
    record_figure,
    restart_broker_app,
    stored_keys,
    vhost_of,
    wait_for_records,
    wait_settled,
)
from tests.support.processes import until

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


async def test_an_event_subscription_rides_out_the_broker_closing_its_connections(amqp_url, rabbit_bus):
    """What the gateway's SSE streams, the CLI's wait and the test cluster's collector stand on."""
    vhost = vhost_of(amqp_url)

    def progress(n: int) -> JobProgress:
        return JobProgress(job_id=f"ride-out-{n:04d}", stage=Stage.CONVERTING, percent=float(n % 100))

    async def arrives(events, n: int, within: float) -> bool:
        """Publish event n and read until it comes (True) or ``within`` seconds pass (False)."""
        try:
            await rabbit_bus.publish(progress(n))
        except BusError:
            return False  # the bus is still reconnecting: the caller tries the next event
        try:
            async with asyncio.timeout(within):
                while True:
                    envelope, _ = await anext(events)
                    if envelope.job_id == progress(n).job_id:
                        return True
        except TimeoutError:
            return False

    async with rabbit_bus.subscribe("job.#") as events:
        assert await arrives(events, 0, within=10.0)
        # a transient subscription holds nothing unacked at the broker: no ack can fail mid-restart
        consumers = await rabbitmqctl("list_consumers", "-p", vhost, "ack_required", "-q", "--no-table-headers")
        assert consumers.split() == ["false"], "the one consumer in the test's vhost acks nothing"
        await rabbitmqctl("close_all_connections", "-p", vhost, "fault injected by the test")
        # events published while the queue is gone are lost to it (it is transient by design); the
        # subscription must come back by itself and carry the next events, raising nothing meanwhile
        n = 1
        async with asyncio.timeout(60):
            while not await arrives(events, n, within=1.0):
                n += 1
        assert await arrives(events, n + 1, within=10.0)


async def test_a_publish_while_the_connection_is_down_waits_for_the_reconnect_and_lands(amqp_url, rabbit_bus):
    """Raising at once made every caller's retry a busy loop that starved the reconnect it waited for."""
    vhost = vhost_of(amqp_url)
    await rabbitmqctl("close_all_connections", "-p", vhost, "fault injected by the test")
    await until(lambda: rabbit_bus._channel.is_closed, what="the client seeing its channel closed")
    await rabbit_bus.publish(VerifyObject(job_id="down-then-up", key="converted/down-then-up.mp3", size=1,
                                          etag="e", content_type="audio/mpeg", format="mp3", duration=1.0))
    deliveries = rabbit_bus.deliveries("verifier", prefetch=1)
    async with asyncio.timeout(30):
        delivery = await anext(deliveries)
    assert (delivery.envelope.job_id, delivery.authenticated) == ("down-then-up", True)
    await delivery.ack()
    await deliveries.aclose()


async def test_broker_restart_mid_flight_loses_and_duplicates_no_job(
        storage_config, storage, amqp_url, rabbit_bus, media_server, media_files, tmp_path):
    settings = pipeline_settings(storage_config, amqp_url=amqp_url)
    requests = slow_requests(media_server, media_files, "broker")
    ids = [r.job_id for r in requests]
    clock = Stopwatch()
    async with actor_cluster(settings, tmp_path) as cluster:
        cluster.start_all(GGT_PREFETCH=FAULT_PREFETCH)
        pids = [p.pid for ps in cluster.processes.values() for p in ps]
        await cluster.publish(requests)
        await cluster.wait_until(lambda: IN_FLIGHT["uploader"](cluster), timeout=RECOVERY_TIMEOUT,
                                 what="conversions in flight")
        in_flight = len(cluster.progress) - len(cluster.finals)
        restarted_at = clock()
        # the test's own event queue is exclusive and dies with the broker: from here on the job
        # records in storage say how each job ended
        down_for = await restart_broker_app(amqp_url)
        after_restart = Stopwatch()
        records = await wait_for_records(storage, ids, timeout=RECOVERY_TIMEOUT)
        recovered = after_restart()
        survivors = [pid for pid in pids if alive(pid)]
        final_events = dict(cluster.final_counts)
    keys = await stored_keys(storage)
    open_uploads = await storage.list_multipart_uploads()
    letters = await list_letters(rabbit_bus)
    stages = Counter(r.stage.value for r in records.values())
    fetches = fetches_per_job(media_server, requests)
    record_figure(tmp_path, "broker restart", jobs=JOBS, jobs_started_at_restart=in_flight,
                  restarted_at_s=restarted_at, broker_down_s=down_for,
                  seconds_to_finish_after_restart=recovered, total_s=clock(), stages=dict(stages),
                  stored_objects=len(keys), open_uploads=len(open_uploads), dead_letters=len(letters),
                  actor_processes_alive=f"{len(survivors)}/{len(pids)}",
                  jobs_refetched=sum(f > min(fetches) for f in fetches),
                  # the test's own subscription is restored by its robust connection, when it is
                  final_events_seen=sum(final_events.values()), jobs_with_final_event=len(final_events))
    assert stages == {Stage.COMPLETED.value: JOBS}, "none lost: every job completed"
    assert len(keys) == JOBS and set(keys_per_job(keys).values()) == {1}, "none duplicated: one object per job"
    assert sorted(keys) == sorted(r.key for r in records.values())
    assert open_uploads == [] and letters == []
    assert survivors == pids, "the actors rode out the restart without being restarted"


#: the storage outage, seconds: the injected fault itself (waiting it out is the scenario)
OUTAGE_S = 30.0
#: retry policies for the outage: (tiers, attempts). "retries outlast it": a step's fifth attempt
#: comes ~37 s after its first failure, past the outage. "dead letter, then replay": steps exhaust
#: their attempts within a second, are dead-lettered, and the replay after the outage revives the jobs.
OUTAGE_POLICIES = {
    "retries_outlast_the_outage": ((2.0, 5.0, 10.0, 20.0), 5),
    "dead_letter_then_replay": ((0.05, 0.2, 0.5), 3),
}


@pytest.mark.parametrize("policy", list(OUTAGE_POLICIES))
async def test_storage_unreachable_for_30s_jobs_retry_or_dead_letter_and_complete_after_replay(
        policy, strict_s3, strict_storage, amqp_url, rabbit_bus, media_server, media_files, tmp_path):
    # the actors reach storage through the strict front, and so do the URLs the coordinator presigns
    delays, attempts = OUTAGE_POLICIES[policy]
    settings = pipeline_settings(strict_storage.config, amqp_url=amqp_url, retry_delays=delays,
                                 max_attempts=attempts)
    requests = slow_requests(media_server, media_files, "outage")
    ids = [r.job_id for r in requests]
    clock = Stopwatch()
    async with actor_cluster(settings, tmp_path) as cluster:
        cluster.start_all(GGT_PREFETCH=FAULT_PREFETCH)
        pids = [p.pid for ps in cluster.processes.values() for p in ps]
        await cluster.publish(requests)
        await cluster.wait_until(lambda: IN_FLIGHT["uploader"](cluster), timeout=RECOVERY_TIMEOUT,
                                 what="conversions in flight")
        in_flight = len(cluster.progress) - len(cluster.finals)
        await strict_s3.down()
        down_at = clock()
        await asyncio.sleep(OUTAGE_S)  # the fault: storage stays unreachable this long
        await strict_s3.up()
        after_outage = Stopwatch()
        refused = sum(1 for r in strict_s3.requests if r.fault == "down")
        records, letters = await wait_settled(strict_storage, rabbit_bus, ids, timeout=RECOVERY_TIMEOUT)
        settled = after_outage()
        completed_by_retry = sum(r.stage == Stage.COMPLETED for r in records.values())
        lettered_jobs = {letter.envelope.job_id for letter in letters}
        codes = Counter(f"{letter.actor}:{letter.error_code}" for letter in letters)
        outcomes = await replay(rabbit_bus)
        records = await wait_for_records(strict_storage, ids, timeout=RECOVERY_TIMEOUT, stages=(Stage.COMPLETED,))
        # a coordinator step still retrying at the first replay may be dead-lettered after it (its job
        # went on without it: the failure it carries is stale); the operator replays what is left
        outcomes += await replay(rabbit_bus)
        records = await wait_for_records(strict_storage, ids, timeout=RECOVERY_TIMEOUT, stages=(Stage.COMPLETED,))
        recovered = after_outage()
        survivors = [pid for pid in pids if alive(pid)]
    keys = await stored_keys(strict_storage)
    open_uploads = await strict_storage.list_multipart_uploads()
    left = await list_letters(rabbit_bus)
    record_figure(tmp_path, f"storage unreachable ({policy})", jobs=JOBS, jobs_started_at_outage=in_flight,
                  down_at_s=down_at, outage_s=OUTAGE_S, requests_dropped_while_down=refused,
                  completed_by_retries=completed_by_retry, dead_lettered_jobs=len(lettered_jobs),
                  dead_letters=dict(codes), replayed=len(outcomes),
                  seconds_to_settle_after_outage=settled, seconds_to_finish_after_outage=recovered,
                  total_s=clock(), stored_objects=len(keys), open_uploads=len(open_uploads),
                  letters_left=len(left), actor_processes_alive=f"{len(survivors)}/{len(pids)}")
    assert all(letter.error_code for letter in letters), "every dead letter carries its reason"
    assert all(r.stage == Stage.COMPLETED for r in records.values()) and len(records) == JOBS
    assert len(keys) == JOBS and set(keys_per_job(keys).values()) == {1}, "one stored object per job"
    assert open_uploads == [] and left == []


#: routing keys the garbage goes to: every actor's queue gets its share
GARBAGE_KEYS = ("convert.default", "resolve_media", "stream_to_storage", "verify_object", "streamed")
#: the four kinds of bad message, 25 of each
BAD_KINDS = ("malformed", "unknown_type", "invalid_field", "oversized")


def bad_message(kind: str, i: int) -> tuple[str, bytes, dict[str, object]]:
    """(routing key, body, properties) of the i-th bad message of ``kind``, as a careless publisher sends it."""
    key = GARBAGE_KEYS[i % len(GARBAGE_KEYS)]
    props: dict[str, object] = {"content_type": "application/json", "message_id": f"bad-{kind}-{i:03d}"}
    if kind == "malformed":
        return key, b'{"url": "http://127.0.0.1/x.mp3", "format": ', props
    if kind == "unknown_type":
        body = json.dumps({"type": "launch_rockets", "target": "moon"}).encode()
        return key, body, {**props, "type": "launch_rockets"}
    if kind == "invalid_field":
        return key, json.dumps({"url": 42, "format": "gif", "quality": "potato"}).encode(), props
    padding = "x" * (1024 * 1024 + 1)  # one byte past the 1 MiB body limit
    body = json.dumps({"url": "http://127.0.0.1/a.mp3", "format": "mp3", "job_id": f"huge-{i}", "pad": padding})
    return key, body.encode(), props


def good_message(url: str, fmt: str, job_id: str) -> tuple[str, bytes, dict[str, object]]:
    """A ConvertRequested written by hand, the way another system publishes it (docs/MESSAGES.md)."""
    body = json.dumps({"type": "convert_requested", "url": url, "format": fmt, "job_id": job_id}).encode()
    return "convert.default", body, {"content_type": "application/json", "type": "convert_requested",
                                     "message_id": f"good-{job_id}"}


async def test_hundred_bad_messages_are_dead_lettered_with_reasons_and_twenty_good_jobs_complete(
        storage_config, storage, amqp_url, rabbit_bus, media_server, tmp_path):
    settings = pipeline_settings(storage_config, amqp_url=amqp_url)
    sources = ["av_h264_aac.mp4", "audio.mp3", "av_vp9_opus.webm", "audio_only.m4a"]
    good = [good_message(media_server.url(sources[i % 4]), ("mp3", "m4a", "opus", "flac", "wav")[i % 5],
                         f"mixed-{i:04d}") for i in range(JOBS)]
    bad = [bad_message(kind, i) for kind in BAD_KINDS for i in range(25)]
    # interleave: four bad messages before each good one
    mixed = [m for pair in zip([bad[i::JOBS] for i in range(JOBS)], good, strict=True) for m in [*pair[0], pair[1]]]
    assert len(mixed) == len(bad) + len(good)
    clock = Stopwatch()
    async with actor_cluster(settings, tmp_path) as cluster:
        cluster.start_all()
        pids = {actor: ps[0].pid for actor, ps in cluster.processes.items()}
        await publish_plain(amqp_url, mixed)
        ids = [f"mixed-{i:04d}" for i in range(JOBS)]
        await cluster.wait_until(lambda: all(i in cluster.finals for i in ids), timeout=RECOVERY_TIMEOUT,
                                 what="the 20 good jobs")
        good_done = clock()

        async def dead_lettered() -> int:
            depths = await rabbit_bus.queue_depths()
            return sum(n for name, n in depths.items() if name.endswith(".dlq"))

        async with asyncio.timeout(RECOVERY_TIMEOUT):
            while await dead_lettered() < len(bad):  # noqa: ASYNC110 — the broker's state
                await asyncio.sleep(0.2)
        letters = await list_letters(rabbit_bus)
        survivors = {actor: pid for actor, pid in pids.items() if alive(pid)}
        processes = sum(len(ps) for ps in cluster.processes.values())
    finals = cluster.finals
    record_figure(tmp_path, "bad messages", bad_messages=len(bad), good_jobs=JOBS,
                  good_completed=sum(isinstance(finals[i], JobCompleted) for i in ids),
                  seconds_for_good_jobs=good_done, dead_letters=len(letters),
                  letters_by_actor=dict(Counter(letter.actor for letter in letters)),
                  letter_codes=dict(Counter(letter.error_code for letter in letters)),
                  actor_processes_alive=f"{len(survivors)}/{len(pids)}", processes_started=processes)
    assert all(isinstance(finals[i], JobCompleted) for i in ids), {i: finals[i] for i in ids}
    assert sorted(letter.envelope.message_id for letter in letters) == sorted(str(p["message_id"]) for _, _, p in bad)
    # garbage on the public exchange cannot be decoded; on ggt.commands it carries no MAC and is not read
    expected = {str(p["message_id"]): "undecodable_message" if key.startswith("convert.") else "unauthenticated_message"
                for key, _, p in bad}
    assert {letter.envelope.message_id: letter.error_code for letter in letters} == expected
    assert all(letter.error_message for letter in letters), "each letter says why"
    assert survivors == pids and processes == 4, "no actor restarted"


async def test_every_command_delivered_twice_has_its_effect_once(
        storage_config, storage, amqp_url, rabbit_bus, media_server, media_files, tmp_path):
    settings = pipeline_settings(storage_config, amqp_url=amqp_url)
    source = media_files["audio.mp3"]
    ids = [f"twice-{i:04d}" for i in range(JOBS)]
    paths = per_job_sources(media_files, source, ["twice-reference", *ids], folder="faults/twice")
    requests = [ConvertRequested(url=media_server.url(paths[j]), format=("mp3", "wav")[i % 2], job_id=j)
                for i, j in enumerate(ids)]
    clock = Stopwatch()
    async with actor_cluster(settings, tmp_path) as cluster:
        cluster.start_all()
        # a job with every message delivered once: how often a job fetches its source
        reference = ConvertRequested(url=media_server.url(paths["twice-reference"]), format="mp3",
                                     job_id="twice-reference")
        await cluster.run([reference])
        fetches_once = len(media_server.requests_for(paths["twice-reference"]))
        async with CommandTap(amqp_url, ROUTING_KEYS.values(), double=True) as tap:
            await cluster.run(requests)
            seen = list(tap.seen)
            copies = dict(tap.copies)
    keys = await stored_keys(storage)
    fetches = [len(media_server.requests_for(paths[j])) for j in ids]
    finals = cluster.finals
    record_figure(tmp_path, "every command twice", jobs=JOBS, copies_by_type=copies,
                  commands_seen=len(seen), fetches_per_job_once=fetches_once,
                  fetches_per_job_doubled=[min(fetches), max(fetches)], stored_objects=len(keys),
                  final_events_max_per_job=max(cluster.final_counts[j] for j in ids), total_s=clock())
    assert all(isinstance(finals[j], JobCompleted) for j in ids)
    assert set(copies) >= {"convert_requested", "resolve_media", "media_resolved", "stream_to_storage",
                           "streamed", "verify_object", "verified"}, copies
    assert all(copies[t] == JOBS for t in copies), "each job's commands were each delivered twice"
    assert all(cluster.final_counts[j] == 1 for j in ids), "one JobCompleted per job"
    assert set(fetches) == {fetches_once}, "no step fetched the source a second time (no second conversion)"
    assert len(keys) == JOBS + 1 and set(keys_per_job(keys).values()) == {1}, "one stored object per job"


#: the uploader's time limit in the time-limit scenario, seconds
SHORT_TIME_LIMIT = 5.0
#: bytes per second of the never-ending source: its 30 s take ~30 s to arrive, far past the limit
CRAWL_RATE = 16 * 1024


async def test_job_past_its_time_limit_kills_ffmpeg_and_fails_once_with_timeout(
        storage_config, storage, amqp_url, rabbit_bus, media_server, media_files, tmp_path):
    settings = pipeline_settings(storage_config, amqp_url=amqp_url, job_time_limit=SHORT_TIME_LIMIT)
    source = media_files.make_media(seconds=SLOW_SOURCE_SECONDS, video=None, audio="mp3", ext="mp3")
    paths = per_job_sources(media_files, source, ["limit-0001"], folder="faults/limit")
    request = ConvertRequested(url=media_server.url(f"slow/{paths['limit-0001']}?rate={CRAWL_RATE}"),
                               format="mp3", job_id="limit-0001")
    sentinel = ConvertRequested(url=media_server.url("audio.mp3"), format="mp3", job_id="limit-after")
    clock = Stopwatch()
    async with actor_cluster(settings, tmp_path) as cluster, \
            CommandTap(amqp_url, ["stream_to_storage"]) as tap:
        cluster.start_all()
        uploader = cluster.processes["uploader"][0]
        await cluster.publish([request])

        def ffmpeg_running() -> list[int]:
            return [pid for pid, name in descendants(uploader.pid) if name == "ffmpeg"]

        await until(lambda: bool(ffmpeg_running()), timeout=60, what="the uploader's ffmpeg to start")
        ffmpeg_pids = ffmpeg_running()
        await cluster.wait_until(lambda: request.job_id in cluster.finals, timeout=60, what="the final event")
        failed_after = clock()
        await until(lambda: not ffmpeg_running() and not any(alive(p) for p in ffmpeg_pids), timeout=10,
                    what="ffmpeg to be gone")
        # a job behind it on the same queues finishes: a looping redelivery would have come first
        await cluster.run([sentinel])
        streams = [s for s in tap.seen if s[3] == request.job_id and s[1] == "stream_to_storage"]
        fetches = len(media_server.requests_for(f"slow/{paths['limit-0001']}"))
        final = cluster.finals[request.job_id]
        final_count = cluster.final_counts[request.job_id]
        uploader_alive = alive(uploader.pid)
    record_figure(tmp_path, "time limit", time_limit_s=SHORT_TIME_LIMIT, failed_after_s=failed_after,
                  error_code=str(getattr(getattr(final, "error", None), "code", "")),
                  ffmpeg_left=len(ffmpeg_running()), stream_commands=len(streams), source_fetches=fetches,
                  final_events=final_count, uploader_alive=uploader_alive)
    assert isinstance(final, JobFailed) and final.error.code == ErrorCode.TIMEOUT, final
    assert final_count == 1 and len(streams) == 1, "no loop: one StreamToStorage, one final event"
    assert isinstance(cluster.finals[sentinel.job_id], JobCompleted)
    assert uploader_alive, "the uploader process survives its job's time limit"
