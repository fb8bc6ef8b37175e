"""The conversion-planning core: pure tests with plain values, then real ffmpeg runs over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from pathlib import Path

import msgspec
import pytest

from actors.adapters.ffmpeg import LineTail
from actors.adapters.ffprobe import ffprobe, probe_argv
from actors.core.ffmpeg_args import (
    HLS_PROTOCOLS,
    HTTP_PROTOCOLS,
    MAX_COVER_PIXELS,
    MAX_VIDEO_PIXELS,
    CoverInput,
    ImageDemuxer,
    cover_demuxer,
    ffmpeg_argv,
    output_args,
)
from actors.core.plan import (
    SAFETY_MARGIN,
    SLACK_BYTES,
    SOURCE_BYTES_PER_SECOND,
    SOURCE_SLACK_BYTES,
    Limits,
    plan_media,
    source_budget,
)
from actors.core.probe import parse_probe_json
from actors.core.request import allowed_qualities, default_quality, validate_request
from actors.core.source import SourceInfo, SourceInput, codec_name
from actors.core.stages import (
    STAGE_SPANS,
    MonotonicProgress,
    check_output_duration,
    parse_progress_block,
    progress_percent,
)
from actors.uploader import memory_file
from messages.errors import ErrorCode, JobError
from messages.types import ConvertRequested, Format, InputVia, MediaPlan, Quality, Stage

MiB = 1024 * 1024
NETWORK_TIMEOUT = 30
LIMITS = Limits(max_duration=4 * 3600, max_output_bytes=4 * 1024 * MiB, )
AUDIO_FORMATS = [f for f in Format if not f.is_video]
VIDEO_FORMATS = [f for f in Format if f.is_video]


def request(fmt: Format, quality: Quality | None = None, **kw) -> ConvertRequested:
    """A request for the page at example.org."""
    return ConvertRequested(url="https://example.org/watch?v=1", format=fmt, quality=quality, **kw)


def source(**kw) -> SourceInfo:
    """A 10-minute 720p H.264/AAC source unless told otherwise."""
    defaults: dict = dict(
        inputs=[SourceInput(url="https://cdn.example.org/v.mp4", headers={"User-Agent": "UA/1"})],
        duration=600.0,
        title="A Song",
        artist="The Band",
        upload_date="20240131",
        webpage_url="https://example.org/watch?v=1",
        thumbnail_url="https://cdn.example.org/t.jpg",
        audio_codec="aac",
        video_codec="h264",
        height=720,
        abr=128.0,
        vbr=2000.0,
    )
    defaults.update(kw)
    return SourceInfo(**defaults)


def plan(fmt: Format, quality: Quality | None = None, *, src: SourceInfo | None = None, limits=LIMITS, **req):
    """plan_media for ``fmt`` with the default source."""
    return plan_media(request=request(fmt, quality, **req), source=src or source(), limits=limits)


def argv_of(p: MediaPlan, **kw) -> list[str]:
    """ffmpeg's argv for ``p`` as the uploader builds it (30 s network timeout)."""
    return ffmpeg_argv(p, network_timeout=NETWORK_TIMEOUT, **kw)


def out(p: MediaPlan) -> list[str]:
    """The options after the inputs, with the cover mapped when the plan has one."""
    return output_args(p, with_cover=p.thumbnail_url is not None)


def inp(p: MediaPlan, **kw) -> list[list[str]]:
    """The options before each ``-i`` of the argv, one list per input."""
    argv = argv_of(p, **kw)
    ends = [i for i, a in enumerate(argv) if a == "-i"]
    starts = [argv.index("-progress") + 2] + [i + 2 for i in ends]
    return [argv[start:end] for start, end in zip(starts[: len(ends)], ends, strict=True)]


def opt(args: list[str], flag: str) -> str | None:
    """The value after ``flag`` in ``args`` (the last occurrence), or None."""
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
    return values[-1] if values else None


# --------------------------------------------------------------------------------- qualities, requests


def test_every_format_offers_best_and_its_default_is_allowed():
    for fmt in Format:
        assert Quality.BEST in allowed_qualities(fmt)
        assert default_quality(fmt) in allowed_qualities(fmt)


def test_qualities_follow_the_issue_text():
    assert allowed_qualities(Format.MP3) == (Quality.K128, Quality.K192, Quality.K320, Quality.BEST)
    assert default_quality(Format.MP3) is Quality.K192
    assert default_quality(Format.M4A) is Quality.K192
    assert default_quality(Format.OPUS) is Quality.K128
    assert Quality.K64 in allowed_qualities(Format.OPUS) and Quality.K160 in allowed_qualities(Format.OPUS)
    assert allowed_qualities(Format.FLAC) == allowed_qualities(Format.WAV) == (Quality.BEST,)
    assert default_quality(Format.MP4) is default_quality(Format.WEBM) is Quality.P720


def test_valid_request_has_no_problem():
    assert validate_request(request(Format.MP3, Quality.K320, start=5, end=65), max_duration=3600) is None


@pytest.mark.parametrize(
    ("fmt", "quality"), [(Format.MP3, Quality.P720), (Format.MP4, Quality.K192), (Format.FLAC, Quality.K320)]
)
def test_quality_that_does_not_fit_the_format_is_an_invalid_request(fmt, quality):
    error = validate_request(request(fmt, quality), max_duration=3600)
    assert error is not None and error.code is ErrorCode.INVALID_REQUEST
    assert "quality" in error.detail


@pytest.mark.parametrize(("start", "end"), [(10, 10), (10, 5), (None, 0)])
def test_end_not_after_start_is_an_invalid_request(start, end):
    error = validate_request(request(Format.MP3, start=start, end=end), max_duration=3600)
    assert error is not None and error.code is ErrorCode.INVALID_REQUEST and "end" in error.detail


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("file:///etc/passwd", ErrorCode.UNSUPPORTED_URL),
        ("ftp://example.org/a.mp3", ErrorCode.UNSUPPORTED_URL),
        ("data:audio/mp3;base64,AAAA", ErrorCode.UNSUPPORTED_URL),
        ("example.org/a.mp3", ErrorCode.INVALID_REQUEST),
        ("/etc/passwd", ErrorCode.INVALID_REQUEST),
        ("http:///a.mp3", ErrorCode.INVALID_REQUEST),
    ],
)
def test_url_that_is_not_http_is_refused_with_a_code(url, code):
    req = ConvertRequested(url=url, format=Format.MP3)
    error = validate_request(req, max_duration=3600)
    assert error is not None and error.code is code


def test_clip_longer_than_the_limit_is_too_long_before_any_fetch():
    error = validate_request(request(Format.MP3, start=0, end=7200), max_duration=3600)
    assert error is not None and error.code is ErrorCode.TOO_LONG


# ------------------------------------------------------------------------------- plans per format


@pytest.mark.parametrize(
    ("fmt", "quality"), [(f, q) for f in Format for q in allowed_qualities(f)], ids=lambda v: str(v)
)
def test_every_format_and_quality_plans_a_bounded_pipe_output(fmt, quality):
    p = plan(fmt, quality)
    args = out(p)
    assert p.format is fmt and p.quality is quality
    assert args[-2:] == ["-f", {"m4a": "ipod"}.get(fmt.value, fmt.value)]
    assert int(opt(args, "-fs")) == p.max_bytes <= LIMITS.max_output_bytes
    assert p.estimated_bytes > 0 and p.max_bytes >= p.estimated_bytes
    assert p.duration == 600
    assert p.extension == fmt.value
    assert p.expect_codecs["audio"] == {"mp3": "mp3", "m4a": "aac", "opus": "opus", "flac": "flac", "wav": "pcm_s16le",
                                        "mp4": "aac", "webm": "opus"}[fmt.value]  # fmt: skip
    if fmt.is_video:
        assert p.expect_codecs["video"] == {"mp4": "h264", "webm": "vp9"}[fmt.value]
        assert "0:V:0" in args  # never a cover picture as the video
    argv = argv_of(p)
    assert argv[-1] == "pipe:1" and "pipe:1" not in out(p)


def test_content_types_match_the_formats():
    expected = {
        Format.MP3: "audio/mpeg", Format.M4A: "audio/mp4", Format.OPUS: "audio/ogg", Format.FLAC: "audio/flac",
        Format.WAV: "audio/wav", Format.MP4: "video/mp4", Format.WEBM: "video/webm",
    }  # fmt: skip
    assert {fmt: plan(fmt).content_type for fmt in Format} == expected


@pytest.mark.parametrize("quality", [Quality.K128, Quality.K192, Quality.K320])
def test_mp3_is_constant_bitrate_lame(quality):
    args = out(plan(Format.MP3, quality))
    assert opt(args, "-c:a") == "libmp3lame" and opt(args, "-b:a") == f"{quality.value}k"
    assert "-q:a" not in args and "-abr" not in args


def test_mp3_best_keeps_an_mp3_source_and_encodes_anything_else_at_320():
    assert opt(out(plan(Format.MP3, Quality.BEST, src=source(audio_codec="mp3"))), "-c:a") == "copy"
    args = out(plan(Format.MP3, Quality.BEST, src=source(audio_codec="opus")))
    assert opt(args, "-c:a") == "libmp3lame" and opt(args, "-b:a") == "320k"


@pytest.mark.parametrize(
    ("fmt", "copyable", "other"),
    [
        (Format.M4A, "mp4a.40.2", "opus"),
        (Format.OPUS, "opus", "aac"),
        (Format.FLAC, "flac", "aac"),
        (Format.MP3, "mp3", "vorbis"),
    ],
)
def test_best_copies_source_audio_the_container_allows(fmt, copyable, other):
    assert opt(out(plan(fmt, Quality.BEST, src=source(audio_codec=copyable))), "-c:a") == "copy"
    assert opt(out(plan(fmt, Quality.BEST, src=source(audio_codec=other))), "-c:a") != "copy"


def test_copied_aac_into_mp4_gets_the_adts_filter_for_hls_sources():
    assert opt(out(plan(Format.M4A, Quality.BEST)), "-bsf:a") == "aac_adtstoasc"
    assert opt(out(plan(Format.MP4, Quality.P720)), "-bsf:a") == "aac_adtstoasc"


def test_m4a_is_fragmented_with_a_fragment_duration():
    args = out(plan(Format.M4A))
    assert opt(args, "-movflags") == "+frag_keyframe+empty_moov+default_base_moof"
    assert opt(args, "-frag_duration") == "1000000"
    assert opt(args, "-c:a") == "aac" and opt(args, "-b:a") == "192k"


def test_opus_goes_into_ogg_and_wav_is_16_bit_pcm():
    opus = out(plan(Format.OPUS, Quality.K96))
    assert (opt(opus, "-c:a"), opt(opus, "-b:a"), opt(opus, "-f")) == ("libopus", "96k", "opus")
    assert opt(out(plan(Format.WAV)), "-c:a") == "pcm_s16le"


def test_mp4_remuxes_h264_aac_within_the_height_limit():
    p = plan(Format.MP4, Quality.P720, src=source(height=720))
    assert opt(out(p), "-c:v") == "copy" and opt(out(p), "-c:a") == "copy"
    assert opt(out(p), "-movflags") == "+frag_keyframe+empty_moov+default_base_moof"
    assert "-vf" not in out(p)


def test_mp4_transcodes_a_source_taller_than_the_limit_without_upscaling():
    args = out(plan(Format.MP4, Quality.P480, src=source(height=1080)))
    assert opt(args, "-c:v") == "libx264" and opt(args, "-preset") == "veryfast" and opt(args, "-crf")
    assert opt(args, "-vf") == "scale=-2:'2*trunc(min(ih,480)/2)'"
    assert opt(args, "-maxrate") and opt(args, "-pix_fmt") == "yuv420p"


def test_unknown_height_or_wrong_codec_is_transcoded():
    assert opt(out(plan(Format.MP4, Quality.P720, src=source(height=None))), "-c:v") == "libx264"
    args = out(plan(
        Format.MP4, Quality.BEST, src=source(video_codec="vp09.00.40.08", audio_codec="opus")
    ))
    assert opt(args, "-c:v") == "libx264" and opt(args, "-c:a") == "aac"


def test_best_video_remuxes_any_height_of_a_fitting_codec():
    assert opt(out(plan(Format.MP4, Quality.BEST, src=source(height=2160))), "-c:v") == "copy"


def test_a_clip_with_a_start_encodes_every_stream_so_it_starts_on_time():
    args = out(plan(Format.MP4, Quality.P720, start=30, end=60))
    assert opt(args, "-c:v") == "libx264" and opt(args, "-c:a") == "aac"
    assert (
        opt(out(plan(Format.MP3, Quality.BEST, src=source(audio_codec="mp3"), start=30)), "-c:a")
        == "libmp3lame"
    )


def test_webm_is_realtime_vp9_with_opus():
    args = out(plan(Format.WEBM, Quality.P360))
    assert opt(args, "-c:v") == "libvpx-vp9" and opt(args, "-deadline") == "realtime"
    assert opt(args, "-cpu-used") == "8" and opt(args, "-row-mt") == "1"
    assert opt(args, "-c:a") == "libopus"
    vp9_opus = source(video_codec="vp9", audio_codec="opus", height=360)
    assert opt(out(plan(Format.WEBM, Quality.P360, src=vp9_opus)), "-c:v") == "copy"


def test_unclipped_webm_has_no_time_cap_because_it_would_become_the_header_duration():
    assert "-t" not in out(plan(Format.WEBM))
    assert opt(out(plan(Format.WEBM, end=30)), "-t") == "30.000"


# ------------------------------------------------------------------------------------- inputs


def test_each_input_is_hardened_and_seeks_before_it_is_opened():
    p = plan(Format.MP3, start=12.5, embed_thumbnail=False)
    args = inp(p)[0]
    assert opt(args, "-protocol_whitelist") == HTTP_PROTOCOLS and "file" not in HTTP_PROTOCOLS.split(",")
    assert opt(args, "-rw_timeout") == str(30 * 1_000_000)
    assert opt(args, "-reconnect") == "1" and opt(args, "-ss") == "12.500"
    assert opt(args, "-headers") == "User-Agent: UA/1\r\n"
    argv = argv_of(p)
    assert argv.index("-ss") < argv.index("-i") and argv[argv.index("-i") + 1] == p.inputs[0].url


def test_header_values_cannot_inject_extra_headers():
    src = source(inputs=[SourceInput(url="https://a.example/x", headers={"Cookie": "a=1\r\nX-Evil: 1"})])
    assert opt(inp(plan(Format.MP3, src=src))[0], "-headers") == "Cookie: a=1X-Evil: 1\r\n"


def test_hls_input_gets_the_hls_whitelist_without_file():
    src = source(inputs=[SourceInput(url="https://a.example/master.m3u8", protocol="m3u8_native")])
    args = inp(plan(Format.MP4, src=src))[0]
    assert opt(args, "-protocol_whitelist") == HLS_PROTOCOLS and "file" not in HLS_PROTOCOLS


def test_ytdlp_pipe_input_reads_stdin_with_only_the_pipe_protocol():
    src = source(inputs=[SourceInput(url="https://example.org/watch?v=1", via=InputVia.YTDLP_PIPE)])
    p = plan(Format.MP3, src=src, embed_thumbnail=False)
    assert opt(inp(p)[0], "-protocol_whitelist") == "pipe"
    assert p.inputs[0].url == "https://example.org/watch?v=1"  # the uploader hands it to yt-dlp
    argv = argv_of(p)
    assert argv[argv.index("-i") + 1] == "pipe:0"


def test_separate_video_and_audio_inputs_are_both_mapped_and_seeked():
    src = source(
        inputs=[
            SourceInput(url="https://a.example/v.mp4", kind="video"),
            SourceInput(url="https://a.example/a.m4a", kind="audio"),
        ]
    )
    p = plan(Format.MP4, Quality.P720, src=src, start=3)
    assert [i.kind for i in p.inputs] == ["video", "audio"]
    assert "0:V:0" in out(p) and "1:a:0" in out(p)
    assert all(opt(a, "-ss") == "3.000" for a in inp(p))
    audio_only = plan(Format.MP3, src=src, embed_thumbnail=False)
    assert [i.kind for i in audio_only.inputs] == ["audio"] and "0:a:0" in out(audio_only)


def test_global_flags_and_progress_come_first_and_stdin_is_never_read_as_keys():
    argv = argv_of(plan(Format.MP3), progress_fd="pipe:3")
    assert argv[:7] == ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-nostats", "-progress"]
    assert argv[7] == "pipe:3"


# ------------------------------------------------------------------------------ metadata, cover


def test_metadata_tags_carry_title_artist_date_and_source_url():
    args = out(plan(Format.M4A))
    tags = [args[i + 1] for i, a in enumerate(args) if a == "-metadata"]
    assert tags == [
        "title=A Song",
        "artist=The Band",
        "date=2024-01-31",
        "comment=https://example.org/watch?v=1",
    ]
    assert opt(args, "-map_metadata") == "-1"


def test_no_metadata_when_not_asked_and_source_tags_are_dropped_anyway():
    args = out(plan(Format.M4A, embed_metadata=False))
    assert "-metadata" not in args and opt(args, "-map_metadata") == "-1"


def test_mp3_embeds_the_thumbnail_as_a_small_attached_picture():
    p = plan(Format.MP3)
    assert p.thumbnail_url == "https://cdn.example.org/t.jpg" and len(p.inputs) == 1
    cover = CoverInput(fd=7, demuxer=ImageDemuxer.JPEG)
    argv = argv_of(p, cover=cover)
    # the picture is read from the uploader's descriptor with a forced image demuxer and a pixel cap
    cover_opts = inp(p, cover=cover)[-1]
    assert argv[argv.index("pipe:7") - 1] == "-i" and p.thumbnail_url not in argv
    assert opt(cover_opts, "-f") == "jpeg_pipe" and opt(cover_opts, "-protocol_whitelist") == "pipe"
    assert int(opt(cover_opts, "-max_pixels")) == MAX_COVER_PIXELS and "-ss" not in cover_opts
    args = out(p)
    assert "1:v:0" in args and opt(args, "-disposition:v") == "attached_pic" and opt(args, "-c:v") == "mjpeg"
    assert opt(args, "-flush_packets") == "0"  # keeps the ID3 tag patchable on a pipe
    assert "1:v:0" not in argv_of(p)  # without a fetched picture there is no cover input at all


def test_m4a_and_unasked_formats_skip_cover_art():
    assert plan(Format.M4A).thumbnail_url is None  # a fragmented m4a on a pipe cannot carry one
    assert plan(Format.MP3, embed_thumbnail=False).thumbnail_url is None
    assert plan(Format.MP3, src=source(thumbnail_url=None)).thumbnail_url is None


# ------------------------------------------------------------------------------------ limits


def test_source_longer_than_the_limit_is_too_long():
    with pytest.raises(JobError) as caught:
        plan(Format.MP3, src=source(duration=5 * 3600))
    assert caught.value.code is ErrorCode.TOO_LONG


def test_a_clip_of_a_long_source_fits_the_limit():
    p = plan(Format.MP3, src=source(duration=5 * 3600), start=100, end=400)
    assert p.duration == 300 and opt(out(p), "-t") == "300.000"


def test_end_past_the_source_is_clipped_to_the_source_and_start_past_it_is_refused():
    assert plan(Format.MP3, start=590, end=700).duration == 10
    with pytest.raises(JobError) as caught:
        plan(Format.MP3, start=600)
    assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_the_media_budget_is_the_seconds_read_at_100_mbit_plus_slack_and_never_above_the_setting():
    whole = plan(Format.MP3)  # 600 s, capped at 600 × 1.05 + 5 s by -t
    seconds = whole.max_seconds if whole.max_seconds is not None else whole.duration
    expected = math.ceil(seconds * SOURCE_BYTES_PER_SECOND) + SOURCE_SLACK_BYTES
    assert source_budget(whole, max_source_bytes=10**12) == expected
    assert source_budget(whole, max_source_bytes=MiB) == MiB
    clip = plan(Format.MP3, start=500, end=510)  # reading reaches 510 s into the source
    assert source_budget(clip, max_source_bytes=10**12) >= 510 * SOURCE_BYTES_PER_SECOND
    unknown = msgspec.structs.replace(whole, duration=0, max_seconds=None)
    assert source_budget(unknown, max_source_bytes=7 * MiB) == 7 * MiB  # only the setting bounds it


def test_every_input_and_the_probe_are_bounded_in_pixels():
    for p in (plan(Format.MP4, Quality.P720), plan(Format.MP3)):
        for options in inp(p):
            assert int(opt(options, "-max_pixels")) == MAX_VIDEO_PIXELS
    argv = probe_argv("https://cdn.example.org/v.mp4", timeout=5)
    assert int(argv[argv.index("-max_pixels") + 1]) == MAX_VIDEO_PIXELS and argv.index("-max_pixels") < argv.index("-i")


def test_output_estimated_above_the_size_limit_is_too_large():
    small = Limits(max_duration=4 * 3600, max_output_bytes=50 * MiB, )
    with pytest.raises(JobError) as caught:
        plan(Format.WAV, limits=small)  # 600 s of 48 kHz stereo PCM ≈ 110 MiB
    assert caught.value.code is ErrorCode.TOO_LARGE
    assert plan(Format.MP3, Quality.K128, limits=small).max_bytes <= 50 * MiB


def test_live_sources_are_refused():
    with pytest.raises(JobError) as caught:
        plan(Format.MP3, src=source(is_live=True))
    assert caught.value.code is ErrorCode.LIVE_NOT_SUPPORTED


def test_audio_format_without_audio_and_video_format_without_video_find_no_media():
    for fmt, src in [(Format.MP3, source(has_audio=False)), (Format.MP4, source(has_video=False))]:
        with pytest.raises(JobError) as caught:
            plan(fmt, src=src)
        assert caught.value.code is ErrorCode.NO_MEDIA_FOUND
    video_only = plan(Format.MP4, src=source(has_audio=False))
    assert video_only.expect_codecs == {"video": "h264"} and "0:a:0" not in out(video_only)


def test_cbr_estimate_and_max_bytes_follow_the_documented_formula():
    p = plan(Format.MP3, Quality.K192, embed_thumbnail=False)
    assert p.estimated_bytes == 192_000 // 8 * 600
    assert p.max_bytes == math.ceil(p.estimated_bytes * SAFETY_MARGIN) + SLACK_BYTES
    assert opt(out(p), "-t") == f"{600 * 1.05 + 5:.3f}"


def test_unknown_duration_plans_zero_and_caps_at_the_limits():
    p = plan(Format.MP3, src=source(duration=None))
    assert p.duration == 0 and p.estimated_bytes == 0
    assert p.max_bytes == LIMITS.max_output_bytes and opt(out(p), "-t") == f"{LIMITS.max_duration:.3f}"


# ------------------------------------------------------------------------------------ progress


@pytest.mark.parametrize(
    ("stage", "fraction", "percent"),
    [
        (Stage.PREPARING, 0, 0),
        (Stage.PREPARING, 1, 35),
        (Stage.CONVERTING, 0.5, 57.5),
        (Stage.CONVERTING, 2.0, 80),
        (Stage.CONVERTING, -1, 35),
        (Stage.VERIFYING, 0, 80),
        (Stage.FINISHING, 1, 100),
        (Stage.COMPLETED, 0, 100),
        (Stage.CONVERTING, float("nan"), 35),
    ],
)
def test_progress_stages_map_onto_the_original_percent_bands(stage, fraction, percent):
    assert progress_percent(stage, fraction) == percent


def test_progress_never_goes_backwards():
    tracker = MonotonicProgress()
    assert tracker.update(Stage.CONVERTING, 0.5) == 57.5
    assert tracker.update(Stage.CONVERTING, 0.4) is None
    assert tracker.update(Stage.PREPARING, 1.0) is None
    assert tracker.update(Stage.VERIFYING, 0.0) == 80


def test_progress_block_reads_microseconds_from_out_time_ms_and_handles_na():
    block = parse_progress_block(["frame=10", "out_time_ms=2500000", "out_time=00:00:02.500000", "total_size=1000",
                                  "progress=continue"])  # fmt: skip
    assert block["out_time_s"] == 2.5 and block["total_size"] == 1000 and block["end"] is False
    assert parse_progress_block(["out_time_us=N/A", "out_time=N/A", "progress=end"])["out_time_s"] is None
    assert parse_progress_block(["out_time=01:02:03.500000", "progress=end"])["out_time_s"] == 3723.5
    assert (
        parse_progress_block(["out_time_us=-9223372036854775807", "progress=continue"])["out_time_s"] is None
    )


def test_output_ending_early_is_a_conversion_failure():
    assert check_output_duration(599.5, 600) is None
    assert check_output_duration(5.2, 6) is None
    assert check_output_duration(3.0, 6).code is ErrorCode.CONVERSION_FAILED
    assert check_output_duration(None, 6).code is ErrorCode.CONVERSION_FAILED
    assert check_output_duration(None, 0) is None  # unknown duration: nothing to compare


def test_yt_dlp_codec_names_become_ffprobe_names():
    assert [codec_name(n) for n in ("avc1.64001F", "mp4a.40.2", "vp09.00.40.08", "av01.0.08M.08", "opus", "none")] == [
        "h264", "aac", "vp9", "av1", "opus", None,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------- probe


def test_probe_json_is_parsed_and_cover_pictures_are_not_video():
    result = parse_probe_json(
        b'{"streams": [{"index": 0, "codec_type": "audio", "codec_name": "mp3", "sample_rate": "44100"},'
        b' {"index": 1, "codec_type": "video", "codec_name": "mjpeg", "disposition": {"attached_pic": 1}}],'
        b' "format": {"format_name": "mp3", "duration": "5.04", "tags": {"TITLE": "x"}}}'
    )
    assert result.audio.sample_rate == 44100 and result.video is None and result.duration == 5.04
    assert result.tags == {"title": "x"}


def test_probe_whitelists_file_only_for_local_paths():
    remote = opt(probe_argv("https://a.example/x.mp4", timeout=5), "-protocol_whitelist")
    assert remote == HLS_PROTOCOLS and "file" not in remote.split(",")
    assert "file" in opt(probe_argv("/tmp/x.mp4", timeout=5), "-protocol_whitelist").split(",")
    with pytest.raises(JobError):
        probe_argv("ftp://a.example/x.mp4", timeout=5)


# ============================================================ real ffmpeg over loopback (media_server)

#: what the converter would have learned about each served fixture
SERVED = {
    "av_h264_aac.mp4": dict(audio_codec="aac", video_codec="h264", height=240),
    "av_vp9_opus.webm": dict(audio_codec="opus", video_codec="vp9", height=240),
    "audio.mp3": dict(audio_codec="mp3", has_video=False),
    "audio.opus": dict(audio_codec="opus", has_video=False),
    "audio_only.m4a": dict(audio_codec="aac", has_video=False),
    "hls/index.m3u8": dict(audio_codec="aac", video_codec="h264", height=240),
}
#: seconds ffmpeg may take for one tiny conversion
CONVERT_TIMEOUT_S = 60


def served_source(server, name: str, **kw) -> SourceInfo:
    """SourceInfo for a fixture file on the media server (6 s, tiny)."""
    fields = dict(SERVED[name], title="Loopback Tone", artist="GetGoodTape", upload_date="20240131",
                  webpage_url=server.url(f"page/{name}.html"))  # fmt: skip
    fields.update(kw)
    protocol = "m3u8_native" if name.endswith(".m3u8") else "http"
    return SourceInfo(inputs=[SourceInput(url=server.url(name), protocol=protocol)], duration=6.0, **fields)


async def run_plan(p: MediaPlan, tmp_path: Path, *, cover: bytes | None = None) -> tuple[Path, list[dict]]:
    """Run ``ffmpeg_argv(p)`` with stdout into memory (``cover`` as the picture it reads from a
    memory file, as the uploader hands it over); write the bytes to tmp_path for probing."""
    with contextlib.ExitStack() as files:
        cover_input = None
        if cover is not None:
            demuxer = cover_demuxer(cover)
            assert isinstance(demuxer, ImageDemuxer), demuxer
            cover_input = CoverInput(fd=files.enter_context(memory_file(cover)), demuxer=demuxer)
        proc = await asyncio.create_subprocess_exec(
            *argv_of(p, cover=cover_input),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            pass_fds=(cover_input.fd,) if cover_input else (),
        )
        async with asyncio.timeout(CONVERT_TIMEOUT_S):
            stdout, stderr = await proc.communicate()
    blocks: list[dict] = []
    tail = LineTail(on_block=lambda lines: blocks.append(parse_progress_block(lines)))  # the uploader's reader
    for line in stderr.decode(errors="replace").splitlines():
        tail.feed(line)
    assert proc.returncode == 0, list(tail.lines)
    assert 0 < len(stdout) <= p.max_bytes
    out = tmp_path / f"out.{p.extension}"
    out.write_bytes(stdout)
    return out, blocks


def assert_duration(actual: float | None, expected: float) -> None:
    """Within 2 % or 0.5 s, whichever is looser."""
    assert actual is not None and abs(actual - expected) <= max(0.5, 0.02 * expected), (actual, expected)


async def convert_and_probe(server, tmp_path, name, fmt, quality=None, *, src_kw=None, cover=None, **req):
    """Plan, run, probe: the probe result, the plan and the progress blocks."""
    src = served_source(server, name, **(src_kw or {}))
    p = plan_media(request=request(fmt, quality, **req), source=src, limits=LIMITS)
    out, blocks = await run_plan(p, tmp_path, cover=cover)
    probed = await ffprobe(str(out), timeout=30, count_packets=True)
    for kind, codec in p.expect_codecs.items():
        stream = probed.first(kind)
        assert stream is not None and stream.codec_name == codec, (kind, probed.streams)
    assert_duration(probed.best_duration, p.duration)
    return probed, p, blocks


@pytest.mark.parametrize(
    ("name", "fmt", "quality"),
    [
        ("av_h264_aac.mp4", Format.MP3, Quality.K192),
        ("av_vp9_opus.webm", Format.M4A, Quality.K128),
        ("av_h264_aac.mp4", Format.OPUS, Quality.K96),
        ("audio.opus", Format.OPUS, Quality.BEST),
        ("audio.mp3", Format.FLAC, Quality.BEST),
        ("audio_only.m4a", Format.WAV, Quality.BEST),
        ("av_h264_aac.mp4", Format.MP4, Quality.P720),
        ("av_vp9_opus.webm", Format.MP4, Quality.P360),
        ("av_h264_aac.mp4", Format.WEBM, Quality.P360),
        ("hls/index.m3u8", Format.MP4, Quality.BEST),
    ],
    ids=lambda v: str(v),
)
async def test_real_conversion_over_loopback_has_the_planned_codecs_and_duration(
    media_server, tmp_path, name, fmt, quality
):
    _, p, blocks = await convert_and_probe(media_server, tmp_path, name, fmt, quality, embed_thumbnail=False)
    assert blocks and blocks[-1]["end"] is True
    assert_duration(blocks[-1]["out_time_s"], p.duration)


async def test_remux_copies_and_transcode_from_webm_encodes(media_server, tmp_path):
    _, remux, _ = await convert_and_probe(media_server, tmp_path, "av_h264_aac.mp4", Format.MP4, Quality.P720)
    assert opt(out(remux), "-c:v") == "copy"
    _, transcode, _ = await convert_and_probe(
        media_server, tmp_path, "av_vp9_opus.webm", Format.MP4, Quality.P720
    )
    assert opt(out(transcode), "-c:v") == "libx264"


async def test_clip_start_and_end_give_the_clipped_duration(media_server, tmp_path):
    _, p, _ = await convert_and_probe(
        media_server, tmp_path, "av_h264_aac.mp4", Format.MP4, Quality.P360, start=1.5, end=4.5
    )
    assert p.duration == 3.0
    audio, _, _ = await convert_and_probe(media_server, tmp_path, "audio.mp3", Format.MP3, start=2, end=5)
    assert_duration(audio.duration, 3.0)


async def test_metadata_tags_are_in_the_output(media_server, tmp_path):
    for fmt in (Format.MP3, Format.M4A, Format.OPUS):
        probed, _, _ = await convert_and_probe(
            media_server, tmp_path, "audio.mp3", fmt, embed_thumbnail=False
        )
        assert probed.tag("title") == "Loopback Tone" and probed.tag("artist") == "GetGoodTape", fmt
        assert probed.tag("comment") == media_server.url("page/audio.mp3.html"), fmt
        assert (probed.tag("date") or "").startswith("2024"), fmt


async def test_mp3_cover_art_is_an_attached_picture_and_keeps_the_duration_right(media_server, tmp_path):
    src_kw = {"thumbnail_url": media_server.url("thumbnail.jpg")}
    probed, p, _ = await convert_and_probe(
        media_server, tmp_path, "av_h264_aac.mp4", Format.MP3, src_kw=src_kw,
        cover=media_server.root.joinpath("thumbnail.jpg").read_bytes(),
    )
    pictures = [s for s in probed.streams if s.attached_pic]
    assert (
        len(pictures) == 1
        and pictures[0].codec_name == "mjpeg"
        and max(pictures[0].width, pictures[0].height) <= 300
    )
    assert probed.tags.get("title") == "Loopback Tone"
    assert_duration(probed.duration, p.duration)  # an unpatched ID3 size would count the picture as audio


async def test_probe_over_http_reads_a_served_file_and_codes_failures(media_server):
    result = await ffprobe(media_server.url("av_h264_aac.mp4"), timeout=10)
    assert result.video.codec_name == "h264" and result.audio.codec_name == "aac"
    assert_duration(result.duration, 6.0)
    with pytest.raises(JobError) as not_media:
        await ffprobe(media_server.url("not_media.mp4"), timeout=10)
    assert not_media.value.code is ErrorCode.NO_MEDIA_FOUND
    with pytest.raises(JobError) as missing:
        await ffprobe(media_server.url("missing"), timeout=10)
    assert missing.value.code is ErrorCode.MEDIA_UNAVAILABLE


async def test_probe_of_a_stalled_source_times_out_with_a_code(media_server):
    with pytest.raises(JobError) as caught:
        await ffprobe(media_server.url("slow/av_h264_aac.mp4?rate=200"), timeout=1.0)
    assert caught.value.code is ErrorCode.MEDIA_UNAVAILABLE and "timed out" in caught.value.detail


async def test_source_cut_off_mid_stream_is_caught_by_the_output_time_check(media_server, tmp_path):
    src = served_source(media_server, "av_h264_aac.mp4")
    src = msgspec.structs.replace(src, inputs=[SourceInput(url=media_server.url("cutoff/av_h264_aac.mp4"))])
    p = plan_media(request=request(Format.MP3), source=src, limits=LIMITS)
    _, blocks = await run_plan(p, tmp_path)  # ffmpeg itself exits 0 with half the audio
    error = check_output_duration(blocks[-1]["out_time_s"], p.duration)
    assert error is not None and error.code is ErrorCode.CONVERSION_FAILED
    assert any(
        r.path == "/cutoff/av_h264_aac.mp4" and r.range for r in media_server.requests
    )  # it did try to resume


def test_progress_spans_follow_the_one_stage_order_without_gaps_or_overlaps():
    from messages.types import STAGE_ORDER

    assert tuple(STAGE_SPANS) == STAGE_ORDER
    spans = [STAGE_SPANS[stage] for stage in STAGE_ORDER[1:]]
    assert spans[0][0] == 0.0 and spans[-1] == (100.0, 100.0)
    assert all(last == following[0] for (_, last), following in itertools.pairwise(spans))


def test_the_catalog_has_one_consistent_row_per_output_format():
    from actors.core.catalog import CATALOG
    from actors.core.ffmpeg_args import _muxer_args

    assert set(CATALOG) == set(Format)
    for fmt, spec in CATALOG.items():
        assert spec.default_quality in spec.qualities and spec.extension == fmt.value
        assert spec.codecs.audio in spec.codecs.audio_copyable and spec.containers
        assert _muxer_args(fmt) == [*spec.pipe_args, "-f", spec.muxer]
