"""IP-bound and expiring media URLs: plans say when they were resolved and expire; the uploader re-resolves.

The end-to-end tests use ``tests.support.sites.BoundSite``: its page hands out URLs bound to the
"address" that fetched them first (simulated per token, since all of this runs on loopback — see
that module) and expiring after a lifetime, as YouTube's are.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from actors.bootstrap.wiring import make_bus
from actors.core.freshness import (
    earliest_expiry,
    plan_expired,
    refresh_problem,
    refreshed_plan,
    stamp_resolution,
    url_expiry,
)
from actors.core.ytdlp_info import range_chunk_of
from actors.guard.extract import ExtractorPool
from bus.replay import replay
from messages.errors import ErrorCode, JobError
from messages.types import (
    MAX_RANGE_CHUNK,
    MAX_RESOLUTIONS,
    MIN_RANGE_CHUNK,
    ConvertRequested,
    InputVia,
    JobCompleted,
    JobFailed,
    MediaInput,
    MediaPlan,
)
from tests.fixtures.pipeline import memory_pipeline, pipeline_settings, running_pipeline
from tests.support.buses import dead_letters_of
from tests.support.sites import BoundSite, throttled_origin

NOW = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)
MiB = 1024 * 1024


def plan(*inputs: MediaInput, **fields: object) -> MediaPlan:
    return MediaPlan(inputs=list(inputs), format="mp3", quality="192", content_type="audio/mpeg", extension="mp3",
                     duration=6.0, max_bytes=10 * MiB, source_url="https://site.example/watch?v=1", **fields)


def media_input(url: str, format_id: str = "140", **fields: object) -> MediaInput:
    return MediaInput(url=url, kind="audio", format_id=format_id, **fields)


# ------------------------------------------------------------------------------------ pure core


def test_a_url_says_when_it_expires_the_way_youtube_cloudfront_and_s3_say_it() -> None:
    expire = int((NOW + timedelta(hours=6)).timestamp())
    googlevideo = f"https://rr1.googlevideo.com/videoplayback?expire={expire}&ip=203.0.113.9&itag=140"
    assert url_expiry(googlevideo, now=NOW) == NOW + timedelta(hours=6)
    cloudfront = f"https://d1.cloudfront.net/a.mp4?Expires={expire}&Signature=x"
    assert url_expiry(cloudfront, now=NOW) == NOW + timedelta(hours=6)
    s3 = "https://b.s3.amazonaws.com/k?X-Amz-Date=20261202T060000Z&X-Amz-Expires=3600&X-Amz-Signature=x"
    assert url_expiry(s3, now=NOW) == NOW + timedelta(hours=1)
    for silent in ("https://example.com/a.mp4", "https://example.com/a.mp4?expire=soon",
                   f"https://example.com/a.mp4?expire={int((NOW + timedelta(days=400)).timestamp())}"):
        assert url_expiry(silent, now=NOW) is None, silent
    assert earliest_expiry([googlevideo, s3, "https://example.com/x"], now=NOW) == NOW + timedelta(hours=1)


def test_a_hostile_expiry_says_nothing_instead_of_failing_the_resolve() -> None:
    # past year 9999, digits that are digits only to str.isdigit (a superscript, Arabic-Indic)
    for hostile in ("expire=999999999999", "expire=\u00b2", "Expires=\u0661\u0662\u0663",
                    "X-Amz-Date=20261202T060000Z&X-Amz-Expires=\u00b2",
                    "X-Amz-Date=99991231T235959Z&X-Amz-Expires=999999"):
        assert url_expiry(f"https://example.com/a.mp4?{hostile}", now=NOW) is None, hostile


def test_the_range_size_comes_from_the_formats_downloader_options_and_is_bounded() -> None:
    assert range_chunk_of({"downloader_options": {"http_chunk_size": 10 << 20}}) == 10 << 20  # YouTube's
    assert range_chunk_of({"downloader_options": {"http_chunk_size": 1}}) == MIN_RANGE_CHUNK
    assert range_chunk_of({"downloader_options": {"http_chunk_size": 1 << 40}}) == MAX_RANGE_CHUNK
    for none in ({}, {"downloader_options": None}, {"downloader_options": {"http_chunk_size": "10M"}},
                 {"downloader_options": {"http_chunk_size": True}}):
        assert range_chunk_of(none) == 0, none


def test_a_plan_is_stamped_with_its_resolution_and_earliest_expiry() -> None:
    soon = int((NOW + timedelta(minutes=30)).timestamp())
    stamped = stamp_resolution(plan(media_input(f"https://cdn.example/a?expire={soon}")), now=NOW)
    assert stamped.resolved_at == NOW.isoformat()
    assert datetime.fromisoformat(stamped.expires_at) == NOW + timedelta(minutes=30)
    assert not plan_expired(stamped, now=NOW)
    assert plan_expired(stamped, now=NOW + timedelta(minutes=30))
    assert not plan_expired(msgspec.structs.replace(stamped, resolutions=MAX_RESOLUTIONS), now=NOW + timedelta(days=1))
    assert stamp_resolution(plan(media_input("https://cdn.example/a")), now=NOW).expires_at == ""


def test_a_refreshed_plan_takes_the_same_formats_fresh_urls_and_keeps_every_decision() -> None:
    old = stamp_resolution(plan(media_input("https://cdn.example/old?expire=1", headers={"Cookie": "a=1"})), now=NOW)
    info = {"webpage_url": "https://site.example/watch?v=1", "formats": [
        {"format_id": "139", "url": "https://cdn.example/139", "acodec": "mp4a.40.5", "vcodec": "none"},
        {"format_id": "140", "url": "https://cdn.example/new", "acodec": "mp4a.40.2", "vcodec": "none",
         "http_headers": {"User-Agent": "UA"}, "downloader_options": {"http_chunk_size": 10 << 20}},
    ]}
    fresh = refreshed_plan(old, info, now=NOW + timedelta(hours=1))
    [refreshed] = fresh.inputs
    assert (refreshed.url, refreshed.headers, refreshed.range_chunk) == (
        "https://cdn.example/new", {"User-Agent": "UA"}, 10 << 20)
    assert fresh.resolutions == 1 and fresh.resolved_at == (NOW + timedelta(hours=1)).isoformat()
    assert refresh_problem(old, fresh) == ""
    assert "beyond its input URLs" in refresh_problem(old, msgspec.structs.replace(fresh, max_bytes=1))
    assert "not re-resolved" in refresh_problem(old, old)
    with pytest.raises(JobError) as gone:
        refreshed_plan(old, {"formats": [info["formats"][0]]}, now=NOW)
    assert gone.value.code is ErrorCode.SOURCE_REFUSED
    with pytest.raises(JobError) as hostile:
        refreshed_plan(old, {"formats": [{**info["formats"][1], "url": "file:///etc/passwd"}]}, now=NOW)
    assert hostile.value.code is ErrorCode.URL_NOT_ALLOWED


def test_a_piped_input_is_left_to_the_feeder_which_resolves_the_page_itself() -> None:
    piped = MediaInput(url="https://site.example/watch?v=1", via=InputVia.YTDLP_PIPE, format_id="137+140")
    fresh = refreshed_plan(plan(piped), {"formats": []}, now=NOW)
    assert fresh.inputs == [piped]


# ------------------------------------------------------------------------------------ end to end


async def test_a_url_bound_to_the_converters_address_is_re_resolved_by_the_uploader_and_the_job_completes(
        storage_config, storage, media_files) -> None:
    site = BoundSite(root=media_files.root)
    async with site.running(), memory_pipeline(storage_config, storage) as pipeline:
        final = await pipeline.run(ConvertRequested(url=site.page_url("audio.mp3"), format="mp3"))
        keys = await pipeline.stored_keys()
    assert isinstance(final, JobCompleted), final
    assert keys == [final.key]
    first, second = site.resolutions  # the converter's, then the uploader's own
    assert [f.token for f in site.refused()] == [first], "the uploader's fetch of the converter's URL was refused"
    assert site.served_tokens() == [first, second]


async def test_a_fresh_url_refused_too_fails_the_job_with_source_refused_after_bounded_resolutions(
        storage_config, storage, media_files) -> None:
    site = BoundSite(root=media_files.root, served=1)  # only the converter's resolution is ever served
    async with site.running(), memory_pipeline(storage_config, storage) as pipeline:
        final = await pipeline.run(ConvertRequested(url=site.page_url("audio.mp3"), format="mp3"))
        keys = await pipeline.stored_keys()
        uploads = await storage.list_multipart_uploads()
    assert isinstance(final, JobFailed) and final.error.code is ErrorCode.SOURCE_REFUSED, final
    assert not final.error.retryable
    assert len(site.resolutions) == 1 + MAX_RESOLUTIONS
    assert keys == [] and uploads == []


@pytest.fixture
def chunked_formats(monkeypatch):
    """yt-dlp's info for the loopback origins' media as YouTube's extractor gives it for its https formats:
    ``downloader_options.http_chunk_size`` (the generic extractor that reads the loopback page sets none)."""
    original = ExtractorPool.extract

    async def extract(self, url: str, *, deadline: float):
        answer = await original(self, url, deadline=deadline)
        for fmt in [answer.info or {}, *((answer.info or {}).get("formats") or [])]:
            if any(route in str(fmt.get("url") or "") for route in ("/throttled/", "/media/")):
                fmt["downloader_options"] = {"http_chunk_size": MiB}
        return answer

    monkeypatch.setattr(ExtractorPool, "extract", extract)


async def test_a_format_asking_for_ranges_is_fetched_in_ranges_from_a_throttled_origin(
        storage_config, storage, media_files, chunked_formats) -> None:
    source = media_files.make_audio_of_size(3 * MiB)
    async with throttled_origin(source.parent) as (port, log), memory_pipeline(storage_config, storage) as pipeline:
        final = await pipeline.run(ConvertRequested(url=f"http://127.0.0.1:{port}/throttled/{source.name}",
                                                    format="mp3", quality="128"))
    assert isinstance(final, JobCompleted), final
    asked = [a.removeprefix("bytes=").partition("-")[::2] if a else ("", "") for a, _ in log.requests]
    bounded = [(int(first), int(last)) for first, last in asked if last]
    first_bounded = next(i for i, (_, last) in enumerate(asked) if last)
    # before it, the converter's look at the link (yt-dlp, ffprobe: the first MiB, at full speed); from then
    # on the uploader's whole fetch is bounded ranges of at most 1 MiB covering the file: nothing is slowed
    assert all(last for _, last in asked[first_bounded:]), log.requests
    assert all(last - first + 1 <= MiB for first, last in bounded), bounded
    covered, size = 0, source.stat().st_size
    for first, last in sorted(bounded):
        assert first <= covered, f"bytes {covered}-{first - 1} never fetched"
        covered = max(covered, last + 1)
    assert covered == size


async def test_a_url_refused_mid_stream_aborts_the_upload_and_the_job_restarts_clean_with_fresh_urls(
        storage_config, storage, media_files, chunked_formats, caplog) -> None:
    caplog.set_level("INFO", logger="getgoodtape.uploader")
    source = media_files.make_audio_of_size(12 * MiB)  # wav out: multipart, the first 5 MiB part stored early
    # the converter's URL is bound to it (refused at once); the uploader's first fresh one dies 9 MiB in
    site = BoundSite(root=source.parent, cut_resolutions=frozenset({2}), cut_at=9 * MiB)
    async with site.running(), memory_pipeline(storage_config, storage) as pipeline:
        final = await pipeline.run(ConvertRequested(url=site.page_url(source.name), format="wav"))
        keys = await pipeline.stored_keys()
        uploads = await storage.list_multipart_uploads()
    assert isinstance(final, JobCompleted), final
    assert keys == [final.key] and uploads == [], "one object; the aborted upload left nothing open"
    assert final.size >= source.stat().st_size - 1024, "the whole source, not the part before the cut"
    first, second, third = site.resolutions
    assert site.served_tokens() == [first, second, third]
    assert any(f.token == second and f.status == 403 for f in site.fetches), "the cut was met mid-stream"
    assert any("upload aborted, asking for a fresh one" in r.getMessage() for r in caplog.records)


async def test_a_job_replayed_from_the_dead_letter_queue_after_its_urls_expired_completes(
        strict_s3, strict_storage, media_files, amqp_url) -> None:
    site = BoundSite(root=media_files.root, lifetime=3.0)
    settings = pipeline_settings(strict_storage.config, amqp_url=amqp_url)
    bus = make_bus(settings, name="tests")
    await bus.start()
    await bus.purge_all()  # type: ignore[attr-defined]
    # storage refuses the upload until the replay: the uploader's step is dead-lettered
    strict_s3.inject(status=503, times=10_000, method="PUT", match=lambda seen: "/converted/" in seen.path)
    try:
        async with site.running(), running_pipeline(bus, settings, strict_storage) as pipeline:
            request = ConvertRequested(url=site.page_url("audio.mp3"), format="mp3", job_id="expired-replay-0001")
            await bus.publish(request)
            [letter] = await dead_letters_of(bus, "uploader", count=1, timeout=120)
            assert letter.envelope.type == "stream_to_storage"
            await pipeline.wait_until(lambda: isinstance(pipeline.finals.get(request.job_id), JobFailed),
                                      timeout=60, what="the job to fail")
            before = len(site.resolutions)
            expires = site.expiry(site.resolutions[-1])
            # let the clock pass the expiry of every URL minted so far (time itself is what is tested here)
            await asyncio.sleep(max(0.0, expires + 1 - datetime.now(UTC).timestamp()))
            strict_s3.faults.clear()
            outcomes = await replay(bus)
            assert [o.action for o in outcomes] == ["replayed"], outcomes
            await pipeline.wait_until(lambda: isinstance(pipeline.finals.get(request.job_id), JobCompleted),
                                      timeout=120, what="the replayed job to complete")
            keys = await pipeline.stored_keys()
    finally:
        await bus.close()
    final = pipeline.finals[request.job_id]
    assert isinstance(final, JobCompleted) and keys == [final.key]
    assert len(site.resolutions) > before, "the replayed step resolved the page again"
    assert site.served_tokens()[-1] in site.resolutions[before:], "the stored file came from a fresh URL"
    assert await strict_storage.list_multipart_uploads() == []
