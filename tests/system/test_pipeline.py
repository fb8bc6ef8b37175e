"""The pipeline end to end in one process: every format, the options, and bad inputs.

Sources are generated with ffmpeg and served on loopback; each stored file is decoded again here
(ffprobe through its download URL) and checked for codec and duration.
"""

from __future__ import annotations

import re

import pytest

from actors.adapters.ffprobe import ffprobe
from messages.errors import ErrorCode
from messages.types import ConvertRequested, JobCompleted, JobFailed, Stage
from tests.fixtures.media import STANDARD_SECONDS
from tests.fixtures.pipeline import memory_pipeline

TOLERANCE = max(0.02 * STANDARD_SECONDS, 0.5)


async def completed(pipeline, media_server, path: str, fmt: str, **options) -> JobCompleted:
    final = await pipeline.run(ConvertRequested(url=media_server.url(path), format=fmt, **options))
    assert isinstance(final, JobCompleted), final
    return final


async def probe_download(final: JobCompleted):
    return await ffprobe(final.download_url, timeout=60, count_packets=final.format in ("flac", "webm", "opus"))


@pytest.mark.parametrize(
    ("source", "fmt", "quality", "codecs"),
    [
        ("av_h264_aac.mp4", "mp3", "192", {"audio": "mp3"}),
        ("av_h264_aac.mp4", "mp3", "320", {"audio": "mp3"}),
        ("av_h264_aac.mp4", "m4a", "128", {"audio": "aac"}),
        ("av_vp9_opus.webm", "opus", "96", {"audio": "opus"}),
        ("audio.mp3", "flac", None, {"audio": "flac"}),
        ("audio_only.m4a", "wav", None, {"audio": "pcm_s16le"}),
        ("audio_only.m4a", "m4a", "best", {"audio": "aac"}),
        ("av_h264_aac.mp4", "mp4", "720", {"video": "h264", "audio": "aac"}),
        ("av_vp9_opus.webm", "mp4", "360", {"video": "h264", "audio": "aac"}),
        ("av_h264_aac.mp4", "webm", "480", {"video": "vp9", "audio": "opus"}),
    ],
)
async def test_every_format_is_stored_verified_and_decodes_with_its_codec(
        pipeline, media_server, source, fmt, quality, codecs):
    final = await completed(pipeline, media_server, source, fmt, quality=quality)
    probe = await probe_download(final)
    for kind, codec in codecs.items():
        assert probe.first(kind) is not None and probe.first(kind).codec_name == codec
    assert abs(probe.best_duration - STANDARD_SECONDS) <= TOLERANCE
    assert re.fullmatch(rf"converted/\d{{4}}/\d{{2}}/{final.job_id}-[0-9a-f]{{16}}\.{fmt}", final.key), final.key
    head = await pipeline.storage.head(final.key)
    assert head is not None and head.size == final.size
    assert set(final.timings) >= {"preparing", "converting", "verifying", "total"}


async def test_progress_runs_through_the_stages_and_never_goes_back(pipeline, media_server):
    final = await completed(pipeline, media_server, "av_h264_aac.mp4", "mp3")
    events = pipeline.progress[final.job_id]
    stages = [e.stage for e in events]
    assert stages[0] == Stage.PREPARING and Stage.CONVERTING in stages and Stage.VERIFYING in stages
    percents = [e.percent for e in events]
    assert percents == sorted(percents)
    converting = [e.percent for e in events if e.stage == Stage.CONVERTING]
    assert all(35 <= p <= 80 for p in converting)


async def test_a_clip_is_cut_to_start_and_end(pipeline, media_server):
    final = await completed(pipeline, media_server, "av_h264_aac.mp4", "mp3", start=1.0, end=4.0)
    probe = await probe_download(final)
    assert abs(probe.best_duration - 3.0) <= 0.5


async def test_metadata_tags_are_written_into_the_file(pipeline, media_server):
    final = await completed(pipeline, media_server, "av_h264_aac.mp4", "mp3")
    probe = await probe_download(final)
    assert probe.tag("title")
    assert media_server.url("av_h264_aac.mp4").split("/")[2] in (probe.tag("comment") or probe.tag("purl") or "")


@pytest.mark.parametrize("route", ["page/av_h264_aac.mp4.html", "redirect/av_h264_aac.mp4", "hls/index.m3u8"])
async def test_pages_redirects_and_hls_playlists_are_resolved(pipeline, media_server, route):
    final = await completed(pipeline, media_server, route, "m4a")
    probe = await probe_download(final)
    assert probe.audio is not None and probe.audio.codec_name == "aac"


async def test_video_only_source_to_audio_format_fails_with_no_media_found(pipeline, media_server):
    final = await pipeline.run(ConvertRequested(url=media_server.url("video_only.mp4"), format="mp3"))
    assert isinstance(final, JobFailed) and final.error.code == ErrorCode.NO_MEDIA_FOUND


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("not a url", ErrorCode.INVALID_REQUEST),
        ("file:///etc/passwd", ErrorCode.UNSUPPORTED_URL),
        ("ftp://127.0.0.1/a.mp4", ErrorCode.UNSUPPORTED_URL),
        ("{server}/empty.html", ErrorCode.NO_MEDIA_FOUND),
        ("{server}/missing", ErrorCode.MEDIA_REMOVED),
        ("{server}/not_media.mp4", ErrorCode.NO_MEDIA_FOUND),
        ("http://127.0.0.2:9/a.mp4", ErrorCode.URL_NOT_ALLOWED),
    ],
)
async def test_bad_inputs_fail_with_their_own_code_and_leave_nothing_behind(pipeline, media_server, url, code):
    url = url.format(server=media_server.url("").rstrip("/"))
    final = await pipeline.run(ConvertRequested(url=url, format="mp3"))
    assert isinstance(final, JobFailed), final
    assert final.error.code == code, final.error
    assert final.error.message and (final.error.detail or code == ErrorCode.INVALID_REQUEST)
    assert await pipeline.stored_keys() == []
    assert await pipeline.storage.list_multipart_uploads() == []


async def test_a_source_longer_than_the_limit_fails_with_too_long(storage_config, storage, media_server):
    async with memory_pipeline(storage_config, storage, max_duration=4.0) as pipeline:
        whole = await pipeline.run(ConvertRequested(url=media_server.url("av_h264_aac.mp4"), format="mp3"))
        clip = await pipeline.run(ConvertRequested(url=media_server.url("av_h264_aac.mp4"), format="mp3",
                                                   start=0.0, end=5.0))
        assert await pipeline.stored_keys() == []
    assert isinstance(whole, JobFailed) and whole.error.code == ErrorCode.TOO_LONG
    assert isinstance(clip, JobFailed) and clip.error.code == ErrorCode.TOO_LONG


async def test_a_source_past_the_jobs_media_budget_fails_source_too_large_and_stores_nothing(
        storage_config, storage, media_server, media_files):
    size = media_files.path("av_h264_aac.mp4").stat().st_size
    async with memory_pipeline(storage_config, storage, max_source_bytes=size // 2) as pipeline:
        # the uploader's guard cuts ffmpeg's input at the budget; that is not taken for the source's end
        final = await pipeline.run(ConvertRequested(url=media_server.url("av_h264_aac.mp4"), format="wav"))
        assert await pipeline.stored_keys() == []
        assert await pipeline.storage.list_multipart_uploads() == []
    assert isinstance(final, JobFailed) and final.error.code == ErrorCode.SOURCE_TOO_LARGE, final
    assert final.stage == Stage.CONVERTING and not final.error.retryable
    assert str(size // 2) in final.error.detail


async def test_a_source_cut_off_mid_stream_never_completes_as_good(pipeline, media_server):
    final = await pipeline.run(ConvertRequested(url=media_server.url("cutoff/av_h264_aac.mp4"), format="mp3"))
    assert isinstance(final, JobFailed), "a cut-off source must not look complete"
    assert final.error.code in (ErrorCode.VERIFICATION_FAILED, ErrorCode.MEDIA_UNAVAILABLE,
                                ErrorCode.CONVERSION_FAILED)
    assert await pipeline.stored_keys() == []
    assert await pipeline.storage.list_multipart_uploads() == []


async def test_a_source_cut_off_half_way_fails_in_the_uploader_before_anything_is_stored(pipeline, media_server):
    final = await pipeline.run(ConvertRequested(url=media_server.url("cutoff/av_h264_aac.mp4"), format="wav"))
    assert isinstance(final, JobFailed) and final.error.code == ErrorCode.CONVERSION_FAILED, final
    assert final.stage == Stage.CONVERTING and "ends early" in final.error.detail
    assert await pipeline.stored_keys() == []  # the single PUT was never sent
    assert await pipeline.storage.list_multipart_uploads() == []


async def test_a_repeated_request_with_the_same_job_id_is_the_same_job(pipeline, media_server):
    request = ConvertRequested(url=media_server.url("audio.mp3"), format="mp3", job_id="same-job-0001")
    first = await pipeline.run(request)
    assert isinstance(first, JobCompleted)
    await pipeline.bus.publish(request)
    await pipeline.bus.publish(ConvertRequested(url=media_server.url("audio.mp3"), format="mp3",
                                                job_id="after-dup-0001"))
    await pipeline.wait("after-dup-0001")
    assert await pipeline.stored_keys() == sorted([first.key, pipeline.finals["after-dup-0001"].key])
    assert [e for e in pipeline.progress["same-job-0001"] if e.stage == Stage.PREPARING][1:] == [], \
        "the duplicate started no second conversion"


async def test_cover_art_from_the_pages_thumbnail_is_embedded_into_mp3(pipeline, media_server):
    final = await completed(pipeline, media_server, "page/av_h264_aac.mp4.html", "mp3")
    probe = await probe_download(final)
    pictures = [s for s in probe.streams if s.attached_pic]
    assert len(pictures) == 1 and pictures[0].codec_name == "mjpeg"
    assert probe.audio.codec_name == "mp3"
