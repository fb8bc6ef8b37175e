"""The plan: request + source + limits → a typed ``MediaPlan`` (or a coded error). Pure, no I/O.

No ffmpeg argument crosses the wire: the plan holds values; ``actors.core.ffmpeg_args`` turns them
into the exact argv in the uploader.
"""

from __future__ import annotations

import math

import msgspec

from actors.core.catalog import CODECS, MUXERS
from actors.core.plain import (
    FORMAT_SELECTOR,
    MAX_TAG_CHARS,
    http_url_problem,
    plain_headers,
    plain_tag,
    require_http_url,
)
from actors.core.request import allowed_qualities, resolved_quality
from actors.core.source import SourceInfo, SourceInput, codec_name
from actors.runtime.settings import Settings
from messages.errors import ErrorCode, JobError
from messages.types import (
    AudioEncoding,
    ConvertRequested,
    Format,
    InputVia,
    MediaInput,
    MediaPlan,
    Quality,
    Tags,
    VideoEncoding,
)

MiB = 1024 * 1024

#: video bitrate cap at 720p, kbit/s; other heights scale with the pixel count (height²)
VIDEO_KBPS_AT_720 = 3000
#: floor for the video bitrate cap, kbit/s (tiny sources still need a sane ceiling)
VIDEO_KBPS_MIN = 500
#: the audio track of an mp4 (AAC) and of a webm (Opus), kbit/s
MP4_AUDIO_KBPS = 192
WEBM_AUDIO_KBPS = 128

#: cover art is scaled into this box and re-encoded as a small JPEG, so the ID3 tag fits ffmpeg's buffer
COVER_BOX_PX = 300
#: mjpeg quantiser for the cover (2 best … 31 worst); 5 keeps a 300 px picture at ~10–15 KiB
COVER_QSCALE = 5
#: bytes the cover art may add to the output estimate
COVER_ALLOWANCE_BYTES = 64 * 1024

#: max_bytes = estimate × SAFETY_MARGIN + SLACK_BYTES (capped at the limit); covers VBR and muxing overhead
SAFETY_MARGIN = 1.25
SLACK_BYTES = 2 * MiB
#: the cap ``-t`` puts on an unclipped source: its duration × this + CAP_SLACK_S (a source may lie)
DURATION_CAP_FACTOR = 1.05
DURATION_CAP_SLACK_S = 5.0
#: FLAC output relative to 16-bit PCM (music compresses to 50–70 %; noise hardly at all → generous)
FLAC_RATIO = 0.75
#: sample rate and channels assumed for PCM/FLAC estimates when the source does not say
DEFAULT_SAMPLE_RATE = 48_000
DEFAULT_CHANNELS = 2

class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """The limits a plan must respect."""

    max_duration: float
    max_output_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The limits configured in ``settings``."""
        return cls(
            max_duration=settings.max_duration,
            max_output_bytes=settings.max_output_bytes,
        )


#: media bytes a job may fetch per second of source it reads: 100 Mbit/s, above what sites serve
#: even for 4K (YouTube's 2160p60 runs at 20–50 Mbit/s), so only a padded or lying source meets it
SOURCE_BYTES_PER_SECOND = 100_000_000 // 8
#: bytes on top of that: container headers and indexes, a seek's re-read
SOURCE_SLACK_BYTES = 32 * MiB


def source_budget(plan: MediaPlan, *, max_source_bytes: int) -> int:
    """The most media bytes the job of ``plan`` may fetch, all inputs and segments together (the
    guard's media budget): the seconds it reads (start + output seconds) at SOURCE_BYTES_PER_SECOND
    plus SOURCE_SLACK_BYTES, never above ``max_source_bytes`` — which alone bounds an unknown duration."""
    seconds = plan.max_seconds if plan.max_seconds is not None else plan.duration
    if not seconds:
        return max_source_bytes
    return min(max_source_bytes, math.ceil((plan.start + seconds) * SOURCE_BYTES_PER_SECOND) + SOURCE_SLACK_BYTES)




def video_kbps_cap(height: int | None) -> int:
    """Video bitrate ceiling for an output ``height`` pixels high, kbit/s (scales with pixel count)."""
    h = height or 1080
    return max(VIDEO_KBPS_MIN, round(VIDEO_KBPS_AT_720 * (h / 720) ** 2))


def max_height(quality: Quality) -> int | None:
    """The height limit a video quality sets; None for best."""
    return None if quality is Quality.BEST else int(quality.value)


def _fail(code: ErrorCode, detail: str) -> JobError:
    return JobError(code, detail)


def _clip(request: ConvertRequested, source: SourceInfo, limits: Limits) -> tuple[float, float | None]:
    """(start, expected duration or None when unknown) after clipping; raises coded errors."""
    start = request.start or 0.0
    known = source.duration if source.duration and source.duration > 0 else None
    if known is not None and start >= known:
        raise _fail(
            ErrorCode.INVALID_REQUEST, f"start: {start} is not before the source's end ({known:.1f} s)"
        )
    end = request.end
    if known is not None:
        end = known if end is None else min(end, known)
    duration = None if end is None else end - start
    if duration is not None and duration > limits.max_duration:
        raise _fail(
            ErrorCode.TOO_LONG,
            f"the output would last {duration:.0f} s; the limit is {limits.max_duration:.0f} s",
        )
    return start, duration


def _pick_input(inputs: list[SourceInput], kind: str) -> int | None:
    """Index of the input to take ``kind`` ("audio"/"video") from: a dedicated one first, else an av one."""
    for wanted in (kind, "av"):
        for index, source_input in enumerate(inputs):
            if source_input.kind == wanted:
                return index
    return None



def _tag_date(upload_date: str) -> str:
    """yt-dlp's YYYYMMDD as YYYY-MM-DD (what ID3v2, MP4 and Vorbis comments expect)."""
    if len(upload_date) == 8 and upload_date.isdigit():
        return f"{upload_date[:4]}-{upload_date[4:6]}-{upload_date[6:]}"
    return upload_date


def plan_tags(*, request: ConvertRequested, source: SourceInfo) -> Tags | None:
    """The tags to write (title, artist, date, the source URL as comment), or None when not asked for."""
    if not request.embed_metadata:
        return None
    return Tags(
        title=plain_tag(source.title),
        artist=plain_tag(source.artist),
        date=plain_tag(_tag_date(source.upload_date)),
        comment=plain_tag(source.webpage_url or request.url),
    )


def _media_input(source_input: SourceInput) -> MediaInput:
    """The plan's input for one source input: its URL checked, headers and format selector plain."""
    url = require_http_url(source_input.url, what="input URL")
    format_id = source_input.format_id
    if not FORMAT_SELECTOR.fullmatch(format_id):
        if source_input.via is InputVia.YTDLP_PIPE:
            raise _fail(ErrorCode.NO_MEDIA_FOUND, f"format selector {format_id[:64]!r} is not usable")
        format_id = ""  # an ffmpeg input only loses the chance to be re-resolved
    hls = source_input.via is InputVia.FFMPEG and source_input.is_hls
    # a yt-dlp pipe input keeps its page/format URL: the uploader hands it to yt-dlp, ffmpeg reads pipe:0
    return MediaInput(url=url, via=source_input.via, headers=plain_headers(source_input.headers),
                      kind=source_input.kind, format_id=format_id, hls=hls,
                      range_chunk=0 if hls else source_input.range_chunk)


def _audio_plan(
    fmt: Format, quality: Quality, source: SourceInfo, *, input_index: int, clipped: bool
) -> tuple[AudioEncoding, float | None]:
    """(how the audio stream is written, estimated kbit/s or None when unknown).

    A clip with a start is always encoded: copied packets from before the seek point would be kept
    (a fragmented MP4 has no edit list to hide them), making the output longer than asked.
    """
    codecs = CODECS[fmt]
    source_codec = None if clipped else codec_name(source.audio_codec)
    copyable = source_codec in codecs.audio_copyable
    if fmt.is_video:
        if copyable:
            return AudioEncoding(input=input_index, copy=True), source.abr
        kbps = MP4_AUDIO_KBPS if fmt is Format.MP4 else WEBM_AUDIO_KBPS
        return AudioEncoding(input=input_index, kbps=kbps), float(kbps)
    if fmt in (Format.FLAC, Format.WAV):
        return AudioEncoding(input=input_index, copy=copyable), None
    if quality is Quality.BEST and copyable:
        return AudioEncoding(input=input_index, copy=True), source.abr if source.abr else float(_top_kbps(fmt))
    kbps = _top_kbps(fmt) if quality is Quality.BEST else int(quality.value)
    return AudioEncoding(input=input_index, kbps=kbps), float(kbps)


def _top_kbps(fmt: Format) -> int:
    """The highest bitrate ``fmt`` offers (used for best when the source cannot be copied)."""
    return max(int(q.value) for q in allowed_qualities(fmt) if q is not Quality.BEST)


def _pcm_kbps(source: SourceInfo) -> float:
    rate = source.sample_rate or DEFAULT_SAMPLE_RATE
    channels = source.channels or DEFAULT_CHANNELS
    return rate * channels * 16 / 1000


def _video_plan(
    fmt: Format, quality: Quality, source: SourceInfo, *, input_index: int, clipped: bool
) -> tuple[VideoEncoding, float | None]:
    """(how the video stream is written, estimated kbit/s or None).

    The video is copied when its codec fits the container, its known height is within the limit
    (or quality is best) and no start is cut (a copy can only start at a keyframe); otherwise it is
    transcoded with a bitrate cap, which also makes the size estimate an upper bound.
    """
    codecs = CODECS[fmt]
    limit = max_height(quality)
    source_codec = codec_name(source.video_codec)
    height_fits = limit is None or (source.height is not None and source.height <= limit)
    if source_codec in codecs.video_copyable and height_fits and not clipped:
        known = source.vbr or (source.tbr - (source.abr or 0) if source.tbr else None)
        if not known and source.height:
            # unknown bitrate of a copied stream: assume twice what we would encode at that height
            known = 2 * video_kbps_cap(source.height)
        return VideoEncoding(input=input_index, copy=True), known
    out_height = limit if source.height is None else min(source.height, limit or source.height)
    cap = video_kbps_cap(out_height)
    return VideoEncoding(input=input_index, max_height=limit, kbps=cap), float(cap)


def estimate_max_bytes(estimated_bytes: int | None, *, limit: int) -> int:
    """The ``-fs`` cap: ``estimate × SAFETY_MARGIN + SLACK_BYTES``, never above ``limit``; ``limit`` if unknown."""
    if estimated_bytes is None:
        return limit
    return min(limit, math.ceil(estimated_bytes * SAFETY_MARGIN) + SLACK_BYTES)


def checked_plan(plan: MediaPlan) -> MediaPlan:
    """``plan`` validated against its own types (msgspec checks patterns and bounds only when decoding):
    the converter sends nothing the uploader would refuse. Raises ``JobError`` (url_not_allowed for an
    input that is not http(s), no_media_found for anything else)."""
    for media_input in plan.inputs:
        require_http_url(media_input.url, what="input URL")
    if plan.thumbnail_url is not None:
        require_http_url(plan.thumbnail_url, what="thumbnail URL")
    try:
        return msgspec.convert(msgspec.to_builtins(plan), MediaPlan)
    except msgspec.ValidationError as exc:
        raise _fail(ErrorCode.NO_MEDIA_FOUND, f"the source cannot be planned: {exc}") from None


def plan_media(*, request: ConvertRequested, source: SourceInfo, limits: Limits) -> MediaPlan:
    """The plan for converting ``source`` as ``request`` asks, within ``limits``.

    Raises JobError with live_not_supported, no_media_found, too_long, too_large, invalid_request or
    url_not_allowed (an input or thumbnail that is not http(s)).
    Size estimate (kbit/s × duration / 8): CBR audio at its bitrate, copied streams at the source's
    bitrate, transcoded video at its bitrate cap, WAV at 16-bit PCM, FLAC at ``FLAC_RATIO`` of that;
    ``max_bytes`` = estimate × ``SAFETY_MARGIN`` + ``SLACK_BYTES``, capped at ``limits.max_output_bytes``
    (the cap itself when the estimate is unknown). An unknown duration plans with duration 0 and caps
    the output at ``limits.max_duration``.
    """
    fmt = request.format
    quality = resolved_quality(request)
    if quality not in allowed_qualities(fmt):
        raise _fail(ErrorCode.INVALID_REQUEST, f"quality: {quality.value} does not fit {fmt.value}")
    if source.is_live:
        raise _fail(ErrorCode.LIVE_NOT_SUPPORTED, "the source is a live stream")
    if not source.inputs:
        raise _fail(ErrorCode.NO_MEDIA_FOUND, "the source has no playable stream")
    audio_index = _pick_input(source.inputs, "audio") if source.has_audio else None
    video_index = _pick_input(source.inputs, "video") if fmt.is_video and source.has_video else None
    if fmt.is_video and video_index is None:
        raise _fail(ErrorCode.NO_MEDIA_FOUND, f"no video stream to put into {fmt.value}")
    if not fmt.is_video and audio_index is None:
        raise _fail(ErrorCode.NO_MEDIA_FOUND, f"no audio stream to put into {fmt.value}")

    start, duration = _clip(request, source, limits)
    used = sorted({i for i in (audio_index, video_index) if i is not None})
    input_of = {old: new for new, old in enumerate(used)}

    expect: dict[str, str] = {}
    kbps_total: float | None = 0.0
    codecs = CODECS[fmt]
    video = audio = None
    if video_index is not None:
        video, video_kbps = _video_plan(fmt, quality, source, input_index=input_of[video_index], clipped=start > 0)
        expect["video"] = codecs.video
        kbps_total = None if video_kbps is None else kbps_total + video_kbps
    if audio_index is not None:
        audio, audio_kbps = _audio_plan(fmt, quality, source, input_index=input_of[audio_index], clipped=start > 0)
        expect["audio"] = codecs.audio
        if fmt in (Format.WAV, Format.FLAC):
            audio_kbps = _pcm_kbps(source) * (FLAC_RATIO if fmt is Format.FLAC else 1.0)
        if audio_kbps is None and fmt.is_video:
            audio_kbps = float(MP4_AUDIO_KBPS)
        kbps_total = None if kbps_total is None or audio_kbps is None else kbps_total + audio_kbps

    media_inputs = [_media_input(source.inputs[i]) for i in used]
    cover = bool(request.embed_thumbnail and source.thumbnail_url and fmt is Format.MP3)
    thumbnail_url = require_http_url(source.thumbnail_url, what="thumbnail URL") if cover else None  # type: ignore[arg-type]

    cap: float | None
    if duration is None:
        cap = limits.max_duration
    elif request.end is not None:
        cap = duration
    elif fmt is Format.WEBM:
        # the WebM muxer writes -t into the header as the duration on a pipe; -fs and the job's time
        # limit bound an unclipped WebM instead
        cap = None
    else:
        cap = min(limits.max_duration, duration * DURATION_CAP_FACTOR + DURATION_CAP_SLACK_S)
    estimated: int | None = None
    if kbps_total is not None and duration is not None:
        estimated = math.ceil(kbps_total * 1000 / 8 * duration) + (COVER_ALLOWANCE_BYTES if cover else 0)
        if estimated > limits.max_output_bytes:
            raise _fail(
                ErrorCode.TOO_LARGE,
                f"the output would be about {estimated / MiB:.0f} MiB; the limit is "
                f"{limits.max_output_bytes / MiB:.0f} MiB",
            )
    max_bytes = estimate_max_bytes(estimated, limit=limits.max_output_bytes)

    muxer = MUXERS[fmt]
    return checked_plan(MediaPlan(
        inputs=media_inputs,
        format=fmt,
        quality=quality,
        content_type=muxer.content_type,
        extension=muxer.extension,
        duration=round(duration, 3) if duration is not None else 0.0,
        max_bytes=max_bytes,
        audio=audio,
        video=video,
        start=round(start, 3),
        max_seconds=round(cap, 3) if cap is not None else None,
        tags=plan_tags(request=request, source=source),
        estimated_bytes=estimated or 0,
        title=source.title[:MAX_TAG_CHARS],
        expect_codecs=expect,
        thumbnail_url=thumbnail_url,
        source_url=source.webpage_url if http_url_problem(source.webpage_url or "") is None else None,
    ))
