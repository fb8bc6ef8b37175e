"""ProbePool: ffprobe's answers and error codes from warm PyAV workers, each probe in a fresh child.

Every answer is checked against Debian's ffprobe on the same URL (the reference the actors used
before); the hostile cases — a hang, a cancel, a crash, a bomb's allocation, a proxy that must see
every request — are run as such on loopback.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from actors.adapters.ffprobe import ffprobe, input_options
from actors.adapters.prober import ProbePool
from actors.core.ffmpeg_args import HLS_PROTOCOLS, MAX_VIDEO_PIXELS
from actors.core.probe import ProbeResult
from actors.runtime.http import serving
from messages.errors import ErrorCode, JobError
from tests.support.processes import until

TIMEOUT = 20.0
#: seconds of difference allowed between the prober's and ffprobe's durations (the same libraries,
#: but Debian's and PyAV's FFmpeg releases differ)
DURATION_SLACK = 0.06
PROBED = ["av_h264_aac.mp4", "av_vp9_opus.webm", "audio_only.m4a", "audio.mp3", "audio.opus", "audio.flac",
          "video_only.mp4", "hls/index.m3u8"]


@pytest.fixture
async def pool() -> AsyncIterator[ProbePool]:
    async with ProbePool(size=2) as probes:
        yield probes


def children_of(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux's /proc view)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def gone(pid: int) -> bool:
    """True when ``pid`` is no process at all (reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def summary(result: ProbeResult) -> tuple:
    """What the actors read of a probe: container, and each stream's kind, codec, size and cover flag."""
    streams = tuple((s.codec_type, s.codec_name, s.width, s.height, s.sample_rate, s.channels, s.attached_pic)
                    for s in result.streams)
    return result.format_name, streams


@pytest.mark.parametrize("count_packets", [False, True], ids=["headers", "packets"])
@pytest.mark.parametrize("name", PROBED)
async def test_the_prober_answers_what_ffprobe_answers(pool, media_server, name, count_packets):
    url = media_server.url(name)
    ours = await pool.probe(url, timeout=TIMEOUT, count_packets=count_packets)
    reference = await ffprobe(url, timeout=TIMEOUT, count_packets=count_packets)
    assert summary(ours) == summary(reference)
    assert ours.best_duration == pytest.approx(reference.best_duration, abs=DURATION_SLACK)
    if count_packets:
        assert ours.packet_duration is not None


async def test_the_cover_picture_of_an_mp3_is_a_cover_not_a_video(pool, media_files, tmp_path):
    covered = tmp_path / "covered.mp3"
    process = await asyncio.create_subprocess_exec(
        "ffmpeg", "-v", "error", "-i", str(media_files["audio.mp3"]), "-i", str(media_files["thumbnail.jpg"]),
        "-map", "0:a", "-map", "1:v", "-c", "copy", "-disposition:v", "attached_pic", str(covered))
    assert await process.wait() == 0
    result = await pool.probe(str(covered), timeout=TIMEOUT)
    assert [s.attached_pic for s in result.streams] == [False, True]
    assert result.video is None and result.audio is not None
    assert summary(result) == summary(await ffprobe(str(covered), timeout=TIMEOUT))


@pytest.mark.parametrize(("path", "code"), [
    ("not_media.bin", ErrorCode.NO_MEDIA_FOUND),
    ("not_media.mp4", ErrorCode.NO_MEDIA_FOUND),
    ("missing", ErrorCode.MEDIA_UNAVAILABLE),
])
async def test_failures_get_ffprobes_error_codes(pool, media_server, path, code):
    url = media_server.url(path)
    with pytest.raises(JobError) as ours:
        await pool.probe(url, timeout=TIMEOUT)
    with pytest.raises(JobError) as reference:
        await ffprobe(url, timeout=TIMEOUT)
    assert ours.value.code is reference.value.code is code


async def test_a_non_http_url_is_refused_before_any_worker_sees_it(pool):
    with pytest.raises(JobError) as caught:
        await pool.probe("gopher://127.0.0.1:9/x", timeout=TIMEOUT)
    assert caught.value.code is ErrorCode.UNSUPPORTED_URL


async def test_an_error_never_carries_the_urls_query(pool, media_server):
    with pytest.raises(JobError) as caught:
        await pool.probe(media_server.url("missing") + "?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA", timeout=TIMEOUT)
    assert "s3cr3t" not in str(caught.value) and "AKIA" not in str(caught.value)


async def test_a_probe_that_hangs_times_out_and_its_worker_and_child_are_killed(pool, media_server):
    (worker,) = await pool.worker_pids()
    with pytest.raises(JobError) as caught:
        await pool.probe(media_server.url("slow/av_h264_aac.mp4?rate=1"), timeout=1.0)
    assert caught.value.code is ErrorCode.MEDIA_UNAVAILABLE and "timed out" in caught.value.detail
    assert gone(worker), "the hung probe's worker was killed and reaped"
    result = await pool.probe(media_server.url("audio.mp3"), timeout=TIMEOUT)  # a fresh worker serves on
    assert result.audio is not None and (await pool.worker_pids()) != [worker]


async def test_a_cancelled_probe_leaves_no_process(pool, media_server):
    (worker,) = await pool.worker_pids()
    task = asyncio.create_task(pool.probe(media_server.url("slow/av_h264_aac.mp4?rate=1"), timeout=TIMEOUT))
    await until(lambda: len(children_of(worker)) == 1, what="the probe's child started")
    (child,) = children_of(worker)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gone(worker)
    await until(lambda: gone(child), what="the orphaned child died with its worker's group")


async def test_a_child_that_crashes_fails_its_probe_alone_and_the_worker_serves_on(pool, media_server):
    (worker,) = await pool.worker_pids()
    task = asyncio.create_task(pool.probe(media_server.url("slow/av_h264_aac.mp4?rate=1"), timeout=TIMEOUT))
    await until(lambda: len(children_of(worker)) == 1, what="the probe's child started")
    (child,) = children_of(worker)
    os.kill(child, signal.SIGSEGV)  # what a parser bug does to the process parsing hostile media
    with pytest.raises(JobError) as caught:
        await task
    assert caught.value.code is ErrorCode.MEDIA_UNAVAILABLE and f"signal {signal.SIGSEGV.value}" in caught.value.detail
    assert (await pool.probe(media_server.url("audio.mp3"), timeout=TIMEOUT)).audio is not None
    assert await pool.worker_pids() == [worker], "the same worker served the next probe"


async def test_each_probe_runs_in_a_fresh_child(pool, media_server):
    (worker,) = await pool.worker_pids()
    seen = []
    for _ in range(3):
        task = asyncio.create_task(pool.probe(media_server.url("slow/audio.mp3?rate=200000"), timeout=TIMEOUT))
        await until(lambda t=task: len(children_of(worker)) == 1 or t.done(), what="the probe's child started")
        seen += children_of(worker)
        await task
    assert len(seen) == len(set(seen)) >= 2, seen


async def test_the_memory_limit_fails_the_probe_not_the_worker(pool, media_server):
    (worker,) = await pool.worker_pids()
    with pytest.raises(JobError) as caught:
        # below what the worker has mapped already: the child's first allocation fails
        await pool.probe(media_server.url("av_h264_aac.mp4"), timeout=TIMEOUT, memory_limit=16 * 1024 * 1024)
    assert caught.value.code is ErrorCode.MEDIA_UNAVAILABLE
    assert (await pool.probe(media_server.url("audio.mp3"), timeout=TIMEOUT)).audio is not None
    assert await pool.worker_pids() == [worker]


async def test_probes_run_side_by_side_up_to_the_pool_size(media_server):
    async with ProbePool(size=2) as two:
        slow = [asyncio.create_task(two.probe(media_server.url("slow/audio.mp3?rate=100000"), timeout=TIMEOUT))
                for _ in range(2)]
        await until(lambda: len(two._idle) == 0 and two._warming is None, what="both probes took a worker")
        results = await asyncio.gather(*slow)
        assert all(r.audio is not None for r in results)
        assert len(await two.worker_pids()) == 2


@pytest.fixture
async def forward_proxy(media_server) -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback HTTP forward proxy that records each request's target and serves it from the media
    server (whatever host was asked for); its URL and the recorded targets."""
    seen: list[str] = []

    async def forward(request: web.Request) -> web.Response:
        seen.append(str(request.url))
        async with session.get(media_server.url(request.path_qs)) as upstream:
            return web.Response(status=upstream.status, body=await upstream.read(),
                                headers={"Content-Type": upstream.headers.get("Content-Type", "")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    async with aiohttp.ClientSession() as session, serving(app) as port:
        yield f"http://127.0.0.1:{port}", seen


async def test_every_fetch_of_a_proxied_hls_probe_goes_through_the_proxy(pool, forward_proxy):
    proxy, seen = forward_proxy
    # the target is an address where nothing listens: only the proxy can have answered
    target = "http://127.0.0.9:9"
    result = await pool.probe(f"{target}/hls/index.m3u8", timeout=TIMEOUT, count_packets=True,
                              environment={"http_proxy": proxy})
    assert result.audio is not None
    assert seen[0] == f"{target}/hls/index.m3u8"
    segments = [s for s in seen if s.endswith(".ts")]
    assert segments and all(s.startswith(f"{target}/hls/seg") for s in segments), seen


async def test_the_input_options_are_ffprobes_own():
    options = input_options("http://127.0.0.1:9/a.mp4", timeout=3.0, headers={"Referer": "http://x/"},
                            count_packets=True)
    assert options["protocol_whitelist"] == HLS_PROTOCOLS and options["max_pixels"] == str(MAX_VIDEO_PIXELS)
    assert options["rw_timeout"] == "3000000" and options["seekable"] == "0"
    assert options["headers"].startswith("Referer: http://x/")
    assert input_options("/tmp/a.mp4", timeout=3.0) == {"protocol_whitelist": "file,pipe"}


async def test_tags_that_are_not_utf8_are_replaced_as_ffprobe_does_not_a_failure(pool, tmp_path):
    tagged = tmp_path / "latin1.m4a"
    comment = os.fsdecode(b"caf\xe9 \xff\xfe")  # raw bytes in the tag, not UTF-8
    process = await asyncio.create_subprocess_exec(
        "ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=d=2", "-c:a", "aac", "-metadata", f"comment={comment}",
        str(tagged))
    assert await process.wait() == 0
    ours = await pool.probe(str(tagged), timeout=TIMEOUT)
    reference = await ffprobe(str(tagged), timeout=TIMEOUT)
    assert summary(ours) == summary(reference)
    assert ours.best_duration == pytest.approx(reference.best_duration, abs=DURATION_SLACK)
    assert "\ufffd" in (ours.tag("comment") or "")
