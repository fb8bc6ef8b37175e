"""The media fixtures do what other tests rely on: real media, Range, pages yt-dlp understands, failures."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import yt_dlp

from actors.adapters.ffprobe import ffprobe
from messages.errors import ErrorCode, JobError

#: seconds any single fixture request may take
REQUEST_TIMEOUT_S = 30


@pytest.fixture
async def http():
    """An aiohttp client session that does not follow redirects on its own."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
        yield session


@pytest.mark.parametrize(
    ("name", "video", "audio"),
    [
        ("av_h264_aac.mp4", "h264", "aac"),
        ("av_vp9_opus.webm", "vp9", "opus"),
        ("audio_only.m4a", None, "aac"),
        ("audio.mp3", None, "mp3"),
        ("audio.opus", None, "opus"),
        ("audio.flac", None, "flac"),
        ("video_only.mp4", "h264", None),
        ("hls/index.m3u8", "h264", "aac"),
    ],
)
async def test_generated_sources_hold_the_codecs_their_names_promise(media_files, name, video, audio):
    probed = await ffprobe(str(media_files[name]), timeout=30)
    assert (probed.video.codec_name if probed.video else None) == video
    assert (probed.audio.codec_name if probed.audio else None) == audio


async def test_not_media_and_truncated_files_are_what_they_claim(media_files):
    for name in ("not_media.mp4", "not_media.bin"):
        with pytest.raises(JobError) as caught:
            await ffprobe(str(media_files[name]), timeout=30)
        assert caught.value.code is ErrorCode.NO_MEDIA_FOUND
        # yt-dlp's generic extractor sniffs the first 512 bytes: these must not read as a web page,
        # or the converter's tests see "Unsupported URL" instead of ffprobe's verdict
        assert not yt_dlp.utils.is_html(media_files[name].read_bytes()[:512])
    whole = media_files["av_h264_aac.mp4"].stat().st_size
    assert media_files["truncated.mp4"].stat().st_size == whole // 2


async def test_range_request_gets_206_with_exactly_those_bytes(media_server, media_files, http):
    whole = media_files["audio.mp3"].read_bytes()
    async with http.get(media_server.url("audio.mp3"), headers={"Range": "bytes=100-199"}) as response:
        body = await response.read()
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-199/{len(whole)}"
        assert response.headers["Accept-Ranges"] == "bytes"
    assert body == whole[100:200]


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("av_h264_aac.mp4", "video/mp4"),
        ("audio.opus", "audio/ogg"),
        ("hls/index.m3u8", "application/vnd.apple.mpegurl"),
    ],
)
async def test_head_answers_length_and_content_type_without_a_body(
    media_server, media_files, http, name, content_type
):
    async with http.head(media_server.url(name)) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == content_type
        assert int(response.headers["Content-Length"]) == media_files[name].stat().st_size


async def test_redirect_missing_and_empty_page(media_server, http):
    async with http.get(media_server.url("redirect/audio.mp3"), allow_redirects=False) as response:
        assert response.status == 302 and response.headers["Location"] == "/audio.mp3"
    async with http.get(media_server.url("missing")) as response:
        assert response.status == 404
    async with http.get(media_server.url("empty.html")) as response:
        assert response.status == 200 and "<video" not in await response.text()


async def test_cutoff_advertises_everything_and_delivers_half(media_server, media_files, http):
    whole = media_files["av_h264_aac.mp4"].read_bytes()
    received = bytearray()
    async with http.get(media_server.url("cutoff/av_h264_aac.mp4")) as response:
        assert int(response.headers["Content-Length"]) == len(whole)
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received += chunk
    assert bytes(received) == whole[: len(whole) // 2]


async def test_slow_route_holds_to_its_rate(media_server, media_files, http):
    size = media_files["audio.opus"].stat().st_size
    rate = size * 2  # the whole file should take about half a second
    started = time.monotonic()
    async with http.get(media_server.url(f"slow/audio.opus?rate={rate}")) as response:
        body = await response.read()
    elapsed = time.monotonic() - started
    assert len(body) == size and 0.4 <= elapsed < 5


async def test_request_log_records_method_path_range_and_status(media_server, http):
    async with http.get(media_server.url("audio.flac"), headers={"Range": "bytes=0-9"}) as response:
        await response.read()
    record = media_server.requests_for("audio.flac")[-1]
    assert (record.method, record.range, record.status) == ("GET", "bytes=0-9", 206)


def _extract(url: str) -> dict:
    options = {"quiet": True, "no_warnings": True, "socket_timeout": 10, "noplaylist": True}
    with yt_dlp.YoutubeDL(options) as ydl:
        return ydl.extract_info(url, download=False)


async def test_page_holds_a_video_that_yt_dlp_finds(media_server):
    info = await asyncio.wait_for(
        asyncio.to_thread(_extract, media_server.url("page/av_h264_aac.mp4.html")), REQUEST_TIMEOUT_S
    )
    entry = info["entries"][0] if info.get("_type") == "playlist" else info
    assert entry["url"] == media_server.url("av_h264_aac.mp4")
    assert entry["title"].startswith("Test page for av_h264_aac.mp4")
    assert entry["thumbnail"] == media_server.url("thumbnail.jpg")


async def test_empty_page_has_nothing_for_yt_dlp(media_server):
    with pytest.raises(yt_dlp.utils.DownloadError):
        await asyncio.wait_for(asyncio.to_thread(_extract, media_server.url("empty.html")), REQUEST_TIMEOUT_S)


def test_make_media_generates_and_caches_custom_sources(media_files):
    first = media_files.make_media(seconds=2, width=160, height=120, video="vp9", audio="opus", ext="webm")
    mtime = first.stat().st_mtime_ns
    again = media_files.make_media(seconds=2, width=160, height=120, video="vp9", audio="opus", ext="webm")
    assert again == first and again.stat().st_mtime_ns == mtime


def test_audio_of_a_given_size_is_that_big(media_files):
    path = media_files.make_audio_of_size(8 * 1024 * 1024)
    assert abs(path.stat().st_size - 8 * 1024 * 1024) < 200_000


async def test_probe_errors_never_carry_a_presigned_urls_query(media_server):
    from actors.adapters.ffprobe import ffprobe
    from messages.errors import JobError

    url = media_server.url("missing") + "?X-Amz-Credential=AKIDEXAMPLE&X-Amz-Signature=deadbeefsecret"
    with pytest.raises(JobError) as failure:
        await ffprobe(url, timeout=20)
    assert "deadbeefsecret" not in failure.value.detail and "AKIDEXAMPLE" not in failure.value.detail
