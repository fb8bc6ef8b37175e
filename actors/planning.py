"""The conversion-planning core: which ffmpeg arguments for which request. Pure functions, no I/O.

The converter learns what the source is (yt-dlp, ffprobe) and fills a ``SourceInfo``;
``plan_media`` turns request + source + limits into a typed ``MediaPlan`` (or a coded error) —
no ffmpeg argument crosses the wire; ``ffmpeg_argv`` builds the exact argv the uploader runs from
the plan's values. Progress math lives here too.

Facts this module builds on (checked with ffmpeg 5.1, see tests/test_planning.py):

- mp4/m4a on a pipe must be fragmented; audio-only m4a also needs ``-frag_duration``, otherwise
  ffmpeg holds the whole file until the end. A fragmented m4a cannot carry cover art (the
  picture track comes out as an unreadable video track), so cover art is mp3-only.
- mp3 on a pipe: the ID3v2 tag size is patched by seeking back; that only works while the tag is
  still in ffmpeg's 32 KiB output buffer. ``-flush_packets 0`` keeps it there, and the cover is
  scaled down and re-encoded small so the tag fits.
- VBR mp3 on a pipe has no Xing header, so mp3 is CBR (``-b:a``).
- FLAC and WebM on a pipe carry no duration; the verifier has to count packets.
"""

from __future__ import annotations

import enum
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import urlsplit

import imagesize
import msgspec

from actors.settings import Settings
from messages.errors import Error, ErrorCode, JobError
from messages.types import (
    HTTP_SCHEMES,
    MAX_HEADERS,
    AudioEncoding,
    ConvertRequested,
    Format,
    InputVia,
    JobProgress,
    MediaInput,
    MediaPlan,
    Quality,
    Stage,
    Tags,
    VideoEncoding,
)

# ------------------------------------------------------------------------------------- constants

MiB = 1024 * 1024

#: protocols ffmpeg may use for an http(s) input; ``file`` is never allowed (playlists can name it)
HTTP_PROTOCOLS = "http,https,tcp,tls,crypto"
#: protocols for an HLS input: the segments and AES keys are fetched over http(s) as well
HLS_PROTOCOLS = "hls,http,https,tcp,tls,crypto"
#: the only protocol for an input that yt-dlp writes into ffmpeg's stdin
PIPE_PROTOCOLS = "pipe"
#: longest back-off ffmpeg's HTTP reconnect may reach, seconds; keeps a dead source failing fast
RECONNECT_DELAY_MAX_S = 2

#: fragmented MP4 so the file can be written to a pipe (moov first, moof per fragment)
FRAGMENTED_MOVFLAGS = "+frag_keyframe+empty_moov+default_base_moof"
#: audio-only m4a has no video keyframes to cut fragments at: cut one per second of audio (µs)
M4A_FRAG_DURATION_US = 1_000_000

#: x264 speed/quality: veryfast keeps 720p well above real time on two cores
X264_PRESET = "veryfast"
X264_CRF = 23
#: VP9 constant-quality level; realtime deadline + cpu-used 8 is what makes VP9 bearable on 2 cores
VP9_CRF = 33
VP9_CPU_USED = 8
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

#: longest text written into a metadata tag
MAX_TAG_CHARS = 1024


class Codecs(msgspec.Struct, frozen=True):
    """The codecs of one output format: ffprobe names, the encoder, and what may be stream-copied."""

    audio: str
    audio_encoder: str
    #: source audio codecs that go into this container unchanged when quality is best
    audio_copyable: frozenset[str]
    video: str = ""
    video_encoder: str = ""
    video_copyable: frozenset[str] = frozenset()


class FormatSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the service knows about one output format; adding a format is one ``CATALOG`` row."""

    #: ffmpeg muxer (``-f``), MIME type of the stored object, file extension
    muxer: str
    content_type: str
    extension: str
    #: qualities a request may ask for, and the one it gets when it names none
    qualities: tuple[Quality, ...]
    default_quality: Quality
    codecs: Codecs
    #: ffprobe's format_name of a stored file contains one of these (the verifier checks it)
    containers: tuple[str, ...]
    #: the duration of a piped file is measured by counting packets (no usable duration header)
    packet_counted: bool = False
    #: muxer options for writing to a pipe, before ``-f <muxer>``
    pipe_args: tuple[str, ...] = ()


_AUDIO_KBPS = (Quality.K128, Quality.K192)
_HEIGHTS = (Quality.P360, Quality.P480, Quality.P720, Quality.P1080, Quality.BEST)
#: mp4/m4a on a pipe must be fragmented; audio-only m4a also needs -frag_duration (else ffmpeg holds it all)
_FRAGMENTED = ("-movflags", FRAGMENTED_MOVFLAGS)

#: the output formats, one row each
CATALOG: dict[Format, FormatSpec] = {
    Format.MP3: FormatSpec(
        muxer="mp3", content_type="audio/mpeg", extension="mp3",
        qualities=(*_AUDIO_KBPS, Quality.K320, Quality.BEST), default_quality=Quality.K192,
        codecs=Codecs("mp3", "libmp3lame", frozenset({"mp3"})), containers=("mp3",),
        # keep the ID3v2 tag in ffmpeg's buffer until its size is patched (a pipe cannot seek back)
        pipe_args=("-id3v2_version", "3", "-flush_packets", "0")),
    Format.M4A: FormatSpec(
        muxer="ipod", content_type="audio/mp4", extension="m4a",
        qualities=(*_AUDIO_KBPS, Quality.K256, Quality.BEST), default_quality=Quality.K192,
        codecs=Codecs("aac", "aac", frozenset({"aac"})), containers=("mp4", "m4a", "mov"), packet_counted=True,
        pipe_args=(*_FRAGMENTED, "-frag_duration", str(M4A_FRAG_DURATION_US))),
    Format.OPUS: FormatSpec(
        muxer="opus", content_type="audio/ogg", extension="opus",
        qualities=(Quality.K64, Quality.K96, Quality.K128, Quality.K160, Quality.BEST), default_quality=Quality.K128,
        codecs=Codecs("opus", "libopus", frozenset({"opus"})), containers=("ogg",), packet_counted=True),
    Format.FLAC: FormatSpec(
        muxer="flac", content_type="audio/flac", extension="flac",
        qualities=(Quality.BEST,), default_quality=Quality.BEST,
        codecs=Codecs("flac", "flac", frozenset({"flac"})), containers=("flac",), packet_counted=True),
    Format.WAV: FormatSpec(
        muxer="wav", content_type="audio/wav", extension="wav",
        qualities=(Quality.BEST,), default_quality=Quality.BEST,
        codecs=Codecs("pcm_s16le", "pcm_s16le", frozenset({"pcm_s16le"})), containers=("wav",)),
    Format.MP4: FormatSpec(
        muxer="mp4", content_type="video/mp4", extension="mp4",
        qualities=_HEIGHTS, default_quality=Quality.P720,
        codecs=Codecs("aac", "aac", frozenset({"aac"}), "h264", "libx264", frozenset({"h264"})),
        containers=("mp4", "mov"), packet_counted=True, pipe_args=_FRAGMENTED),
    Format.WEBM: FormatSpec(
        muxer="webm", content_type="video/webm", extension="webm",
        qualities=_HEIGHTS, default_quality=Quality.P720,
        codecs=Codecs("opus", "libopus", frozenset({"opus"}), "vp9", "libvpx-vp9", frozenset({"vp9"})),
        containers=("webm", "matroska"), packet_counted=True),
}


class Muxer(msgspec.Struct, frozen=True):
    """How one output format is written: ffmpeg muxer, MIME type, file extension."""

    name: str
    content_type: str
    extension: str


#: views of CATALOG by column, for the code that reads one column
MUXERS: dict[Format, Muxer] = {f: Muxer(s.muxer, s.content_type, s.extension) for f, s in CATALOG.items()}
ALLOWED_QUALITIES: dict[Format, tuple[Quality, ...]] = {f: s.qualities for f, s in CATALOG.items()}
DEFAULT_QUALITY: dict[Format, Quality] = {f: s.default_quality for f, s in CATALOG.items()}
CODECS: dict[Format, Codecs] = {f: s.codecs for f, s in CATALOG.items()}

# --------------------------------------------------------------------------------- source, limits


class SourceInput(msgspec.Struct, frozen=True, kw_only=True):
    """One stream source the converter found: a URL ffmpeg opens, or a yt-dlp pipe."""

    url: str
    headers: dict[str, str] = {}
    #: what this input carries: "av", "audio" or "video"
    kind: str = "av"
    via: InputVia = InputVia.FFMPEG
    #: yt-dlp's protocol name (https, http, m3u8_native, m3u8 …); m3u8* selects the HLS whitelist
    protocol: str = "https"
    #: yt-dlp format selector: of a piped input ("137+140", the feeder's ``-f``), or the format an ffmpeg input is
    format_id: str = ""
    #: bytes per Range request the guard fetches this input in (the format's http_chunk_size); 0 = one request
    range_chunk: int = 0

    @property
    def is_hls(self) -> bool:
        """Whether ffmpeg reads this input as an HLS playlist."""
        return self.protocol.startswith("m3u8") or urlsplit(self.url).path.endswith(".m3u8")


class SourceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the converter learned about the source from yt-dlp and ffprobe.

    Codec names are ffprobe's (h264, vp9, aac, opus, mp3 …): pass yt-dlp's through ``codec_name``.
    ``None`` means unknown; ``has_audio`` / ``has_video`` say whether such a stream exists at all.
    Bitrates are kbit/s.
    """

    inputs: list[SourceInput]
    duration: float | None = None
    is_live: bool = False
    title: str = ""
    artist: str = ""
    #: yt-dlp's upload_date, YYYYMMDD (or already YYYY-MM-DD)
    upload_date: str = ""
    webpage_url: str = ""
    thumbnail_url: str | None = None
    has_audio: bool = True
    has_video: bool = True
    audio_codec: str | None = None
    video_codec: str | None = None
    height: int | None = None
    sample_rate: int | None = None
    channels: int | None = None
    tbr: float | None = None
    abr: float | None = None
    vbr: float | None = None


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


# ----------------------------------------------------------------------------------- qualities


def allowed_qualities(fmt: Format) -> tuple[Quality, ...]:
    """The qualities ``fmt`` accepts: bitrates for lossy audio, maximum heights for video, best."""
    return ALLOWED_QUALITIES[fmt]


def default_quality(fmt: Format) -> Quality:
    """The quality used when a request names none."""
    return DEFAULT_QUALITY[fmt]


def resolved_quality(request: ConvertRequested) -> Quality:
    """The request's quality, or the format's default."""
    return request.quality if request.quality is not None else default_quality(request.format)


def validate_request(req: ConvertRequested, *, max_duration: float) -> Error | None:
    """The first problem with ``req`` that needs no network to find, or None.

    URL: no scheme or no host (``example.com/x``, ``http:///x``) is ``invalid_request``; a scheme other
    than http/https (``file://``, ``ftp://``, ``data:``) is ``unsupported_url``. Quality not fitting the
    format and ``end <= start`` are ``invalid_request``; a clip longer than ``max_duration`` is ``too_long``.
    """
    try:
        parts = urlsplit(req.url.strip())
    except ValueError as exc:
        return Error.of(ErrorCode.INVALID_REQUEST, f"url: not a URL ({exc})")
    scheme = parts.scheme.lower()
    if not scheme:
        return Error.of(ErrorCode.INVALID_REQUEST, "url: no scheme; use an http(s) URL")
    if scheme not in HTTP_SCHEMES:
        return Error.of(ErrorCode.UNSUPPORTED_URL, f"url: scheme {scheme!r} is not supported; use http(s)")
    if not parts.hostname:
        return Error.of(ErrorCode.INVALID_REQUEST, "url: no host")
    if req.quality is not None and req.quality not in allowed_qualities(req.format):
        allowed = ", ".join(q.value for q in allowed_qualities(req.format))
        return Error.of(
            ErrorCode.INVALID_REQUEST,
            f"quality: {req.quality.value} does not fit {req.format.value}; allowed: {allowed}",
        )
    start = req.start or 0.0
    if req.end is not None and req.end <= start:
        return Error.of(ErrorCode.INVALID_REQUEST, f"end: {req.end} is not after start {start}")
    if req.end is not None and req.end - start > max_duration:
        return Error.of(
            ErrorCode.TOO_LONG, f"the clip lasts {req.end - start:.0f} s; the limit is {max_duration:.0f} s"
        )
    return None


# ---------------------------------------------------------------------------------- codec names

_CODEC_PREFIXES: tuple[tuple[str, str], ...] = (
    ("avc", "h264"),
    ("h264", "h264"),
    ("hev", "hevc"),
    ("hvc", "hevc"),
    ("h265", "hevc"),
    ("vp09", "vp9"),
    ("vp9", "vp9"),
    ("vp8", "vp8"),
    ("av01", "av1"),
    ("av1", "av1"),
    ("mp4a.40.34", "mp3"),
    ("mp4a.6b", "mp3"),
    ("mp4a", "aac"),
    ("aac", "aac"),
    ("opus", "opus"),
    ("vorbis", "vorbis"),
    ("mp3", "mp3"),
    ("flac", "flac"),
    ("ac-3", "ac3"),
    ("ec-3", "eac3"),
)


def codec_name(name: str | None) -> str | None:
    """ffprobe's name for a codec named by yt-dlp (``avc1.64001F`` → h264, ``mp4a.40.2`` → aac).

    ``none`` and unknown names give None; names already in ffprobe's spelling pass through.
    """
    if not name:
        return None
    lowered = name.strip().lower()
    if lowered in ("none", "unknown"):
        return None
    for prefix, canonical in _CODEC_PREFIXES:
        if lowered.startswith(prefix):
            return canonical
    return lowered


# ------------------------------------------------------------------------------------- planning


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


# ----------------------------------------------------------------------- plain values for the plan

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
_FORMAT_SELECTOR = re.compile(r"(?:[A-Za-z0-9_.+/=:][A-Za-z0-9_.+/=:-]*)?")
#: longest header value kept (a site's cookies can be long; ffmpeg and yt-dlp get it as one value)
MAX_HEADER_VALUE_CHARS = 8192


def http_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a plan input (only http(s) with a host, no whitespace or control
    characters: no file:, pipe:, concat:, subfile:, data: or bare paths), or None when it can."""
    if _CONTROL.search(url) or any(ch in url for ch in " \\"):
        return "the URL contains whitespace, control characters or backslashes"
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"the URL cannot be parsed ({exc})"
    if parts.scheme.lower() not in HTTP_SCHEMES:
        return f"scheme {parts.scheme or '(none)'!r} is not allowed; plan inputs are http(s) only"
    if not parts.hostname:
        return "the URL has no host"
    return None


def require_http_url(url: str, *, what: str) -> str:
    """``url`` when it may be a plan input; raises ``JobError(URL_NOT_ALLOWED)`` naming ``what`` otherwise."""
    problem = http_url_problem(url)
    if problem is not None:
        raise _fail(ErrorCode.URL_NOT_ALLOWED, f"{what}: {problem}")
    return url


def plain_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a plan may carry: names that are HTTP tokens, values without control characters
    (CR/LF would inject headers), at most ``MAX_HEADERS`` of them; the rest are dropped."""
    clean: dict[str, str] = {}
    for name, value in headers.items():
        if len(clean) == MAX_HEADERS or not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            continue
        text = _CONTROL.sub("", str(value).replace("\t", " "))[:MAX_HEADER_VALUE_CHARS]
        clean[name] = text
    return clean


def header_block(headers: Mapping[str, str]) -> str:
    """HTTP headers as ffmpeg's ``-headers`` value (``plain_headers`` applied: no injected lines)."""
    return "".join(f"{name}: {value}\r\n" for name, value in plain_headers(headers).items())


def plain_tag(text: str) -> str:
    """A tag value as plain text: control characters become spaces, trimmed, at most MAX_TAG_CHARS."""
    return _CONTROL.sub(" ", text).strip()[:MAX_TAG_CHARS].strip()


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
    if not _FORMAT_SELECTOR.fullmatch(format_id):
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


# ----------------------------------------------------------------------------------- ffmpeg argv

#: flags before the inputs: quiet except errors, no keyboard on stdin, machine-readable progress
GLOBAL_FLAGS = ("-hide_banner", "-nostdin", "-loglevel", "error", "-nostats")
#: most pixels a decoded video frame of an input may have (8K UHD): a bigger frame fails to decode
#: instead of allocating gigabytes (ffmpeg's ``-max_pixels``, also used while probing the streams)
MAX_VIDEO_PIXELS = 7680 * 4320
#: most pixels a cover picture may have: it is scaled to COVER_BOX_PX anyway
MAX_COVER_PIXELS = 4096 * 4096


class ImageDemuxer(enum.StrEnum):
    """The image demuxers a cover picture may be read with (forced: never ffmpeg's probing)."""

    JPEG = "jpeg_pipe"
    PNG = "png_pipe"
    WEBP = "webp_pipe"


#: leading bytes of each accepted picture format
_IMAGE_SIGNATURES: tuple[tuple[bytes, ImageDemuxer], ...] = (
    (b"\xff\xd8\xff", ImageDemuxer.JPEG),
    (b"\x89PNG\r\n\x1a\n", ImageDemuxer.PNG),
)


class CoverInput(msgspec.Struct, frozen=True, kw_only=True):
    """The cover picture as ffmpeg reads it: from an open descriptor, with a forced image demuxer."""

    fd: int
    demuxer: ImageDemuxer


def cover_demuxer(data: bytes, *, max_pixels: int = MAX_COVER_PIXELS) -> ImageDemuxer | str:
    """The demuxer for a fetched cover picture (JPEG, PNG or WebP within ``max_pixels``), or why it is refused.

    Reads only the header (``imagesize``): a picture that decodes to more pixels is refused before
    ffmpeg allocates anything for it.
    """
    demuxer = next((d for sig, d in _IMAGE_SIGNATURES if data.startswith(sig)), None)
    if demuxer is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        demuxer = ImageDemuxer.WEBP
    if demuxer is None:
        return "not a JPEG, PNG or WebP picture"
    try:
        info = imagesize.get_info(io.BytesIO(data), dpi=False, colors=False, exif_rotation=False, channels=False)
    except Exception as exc:  # a hostile header may break the reader in any way: it is refused, not fatal
        return f"unreadable picture header ({type(exc).__name__})"
    if info.width <= 0 or info.height <= 0:
        return "unreadable picture header"
    if info.width * info.height > max_pixels:
        return f"the picture is {info.width}×{info.height} pixels; the limit is {max_pixels} pixels"
    return demuxer


def _input_args(media_input: MediaInput, *, start: float, network_timeout: float) -> list[str]:
    """Options before ``-i`` for one media input: protocol whitelist, timeouts, reconnect, headers, seek, pixels."""
    if media_input.via is InputVia.YTDLP_PIPE:
        args = ["-protocol_whitelist", PIPE_PROTOCOLS]
    else:
        timeout_us = str(int(network_timeout * 1_000_000))
        if media_input.hls:
            args = ["-protocol_whitelist", HLS_PROTOCOLS, "-rw_timeout", timeout_us]
        else:
            args = [
                "-protocol_whitelist", HTTP_PROTOCOLS,
                "-rw_timeout", timeout_us,
                # resume a dropped connection with a Range request; never at EOF (that can loop forever)
                "-reconnect", "1",
                "-reconnect_on_network_error", "1",
                "-reconnect_delay_max", str(RECONNECT_DELAY_MAX_S),
            ]  # fmt: skip
        headers = header_block(media_input.headers)
        if headers:
            args += ["-headers", headers]
    args += ["-max_pixels", str(MAX_VIDEO_PIXELS)]
    if start > 0:
        # before -i: a fast seek (by byte range over http) instead of decoding up to start
        args += ["-ss", _seconds(start)]
    return args


def _video_args(fmt: Format, video: VideoEncoding) -> list[str]:
    """Codec and filter options for the video stream."""
    if video.copy:
        return ["-c:v", "copy"]
    if video.max_height is None:
        scale = "scale=-2:'2*trunc(ih/2)'"
    else:
        # never upscale; keep both sides even (yuv420p needs it), width follows the aspect ratio
        scale = f"scale=-2:'2*trunc(min(ih,{video.max_height})/2)'"
    args = ["-vf", scale, "-pix_fmt", "yuv420p"]
    cap = video.kbps or video_kbps_cap(video.max_height)
    if fmt is Format.MP4:
        return [
            *args, "-c:v", "libx264", "-preset", X264_PRESET, "-crf", str(X264_CRF),
            "-maxrate", f"{cap}k", "-bufsize", f"{2 * cap}k",
        ]  # fmt: skip
    return [
        *args, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", str(VP9_CPU_USED),
        "-row-mt", "1", "-crf", str(VP9_CRF), "-b:v", f"{cap}k",
    ]  # fmt: skip


def _audio_args(fmt: Format, audio: AudioEncoding) -> list[str]:
    """Codec options for the audio stream; mp3 is CBR (``-b:a``, no ``-q:a``): a piped VBR mp3
    misreports its duration."""
    if audio.copy:
        # AAC from MPEG-TS/HLS is ADTS-framed; MP4 wants it without (the filter passes other AAC through)
        return ["-c:a", "copy", *(["-bsf:a", "aac_adtstoasc"] if fmt in (Format.MP4, Format.M4A) else [])]
    args = ["-c:a", CODECS[fmt].audio_encoder]
    if audio.kbps is not None and fmt not in (Format.FLAC, Format.WAV):
        args += ["-b:a", f"{audio.kbps}k"]
    return args


def _cover_args(cover_index: int) -> list[str]:
    """The cover picture: scaled into COVER_BOX_PX, one small JPEG frame, attached as the front cover."""
    return [
        "-map", f"{cover_index}:v:0",
        "-c:v", "mjpeg", "-q:v", str(COVER_QSCALE),
        "-filter:v", f"scale=w='min({COVER_BOX_PX},iw)':h='min({COVER_BOX_PX},ih)'"
        ":force_original_aspect_ratio=decrease",
        "-frames:v", "1",
        "-disposition:v", "attached_pic",
        "-metadata:s:v", "title=Album cover", "-metadata:s:v", "comment=Cover (front)",
    ]  # fmt: skip


def metadata_args(tags: Tags | None) -> list[str]:
    """``-map_metadata -1`` (the source's tags and chapters never pass) and a ``-metadata`` per tag."""
    args = ["-map_metadata", "-1", "-map_chapters", "-1"]
    for key, value in msgspec.structs.asdict(tags).items() if tags is not None else ():
        value = plain_tag(value)
        if value:
            args += ["-metadata", f"{key}={value}"]
    return args


def _muxer_args(fmt: Format) -> list[str]:
    """Muxer options for writing ``fmt`` to a pipe, ending with ``-f <muxer>``."""
    return [*CATALOG[fmt].pipe_args, "-f", CATALOG[fmt].muxer]


def ffmpeg_argv(
    plan: MediaPlan,
    *,
    network_timeout: float,
    wrap_input: Callable[[list[str]], list[str]] | None = None,
    cover: CoverInput | None = None,
    progress_fd: str = "pipe:2",
    ffmpeg: str = "ffmpeg",
) -> list[str]:
    """ffmpeg's whole argv for ``plan``, built here from its typed values: global flags, each input,
    the maps, codecs, tags, caps and muxer options, and the one output ``pipe:1``.

    Every URL is checked again (http(s) only; raises ``JobError(URL_NOT_ALLOWED)``). ``wrap_input``
    rewrites the options of each input ffmpeg fetches itself (the SSRF guard's ``input_args``).
    ``cover`` is the plan's thumbnail, already fetched and checked (``cover_demuxer``); without it
    no cover is written. Progress (key=value blocks, see ``parse_progress_block``) goes to
    ``progress_fd``, by default stderr, mixed with error lines.
    """
    argv = [ffmpeg, *GLOBAL_FLAGS, "-progress", progress_fd]
    for media_input in plan.inputs:
        url = require_http_url(media_input.url, what="input URL")
        args = _input_args(media_input, start=plan.start, network_timeout=network_timeout)
        if media_input.via is InputVia.YTDLP_PIPE:
            url = "pipe:0"
        elif wrap_input is not None:
            args = wrap_input(args)
        argv += [*args, "-i", url]
    if cover is not None and plan.thumbnail_url is not None:
        argv += ["-protocol_whitelist", PIPE_PROTOCOLS, "-f", cover.demuxer.value,
                 "-max_pixels", str(MAX_COVER_PIXELS), "-i", f"pipe:{int(cover.fd)}"]
    return [*argv, *output_args(plan, with_cover=cover is not None), "pipe:1"]


def output_args(plan: MediaPlan, *, with_cover: bool = False) -> list[str]:
    """The options after the inputs (no output name): maps, codecs, cover, tags, ``-t``, ``-fs``, muxer.

    ``with_cover`` maps the input after the plan's own as the cover (when the plan has a thumbnail).
    """
    output: list[str] = []
    if plan.video is not None:
        output += ["-map", f"{plan.video.input}:V:0"]
    if plan.audio is not None:
        output += ["-map", f"{plan.audio.input}:a:0"]
    if plan.video is not None:
        output += _video_args(plan.format, plan.video)
    if plan.audio is not None:
        output += _audio_args(plan.format, plan.audio)
    if with_cover and plan.thumbnail_url is not None:
        output += _cover_args(len(plan.inputs))
    output += metadata_args(plan.tags)
    if plan.max_seconds is not None:
        output += ["-t", _seconds(plan.max_seconds)]
    output += ["-fs", str(plan.max_bytes), *_muxer_args(plan.format)]
    return output


def _seconds(value: float) -> str:
    return f"{value:.3f}"


# -------------------------------------------------------------------------------------- progress

#: (first, last) percent of each stage; converting is driven by ffmpeg's output time
STAGE_SPANS: dict[Stage, tuple[float, float]] = {
    Stage.QUEUED: (0.0, 0.0),
    Stage.PREPARING: (0.0, 35.0),
    Stage.CONVERTING: (35.0, 80.0),
    Stage.VERIFYING: (80.0, 95.0),
    Stage.FINISHING: (95.0, 100.0),
    Stage.COMPLETED: (100.0, 100.0),
}


def progress_percent(stage: Stage, fraction: float) -> float:
    """Overall percent for ``fraction`` (0..1, clamped) of ``stage``; a failed job reports 0 here."""
    first, last = STAGE_SPANS.get(stage, (0.0, 0.0))
    clamped = min(1.0, max(0.0, fraction)) if math.isfinite(fraction) else 0.0
    return round(first + (last - first) * clamped, 2)


def retry_progress(job_id: str, stage: Stage, *, code: str, attempt: int, retries: int, delay: float) -> JobProgress:
    """The progress event that says a step is waiting to be retried ("storage unavailable, retry 2/4
    in 25 s"), at the start of ``stage``: a follower sees the wait instead of a frozen percent."""
    detail = f"{code.replace('_', ' ')}, retry {attempt}/{retries} in {delay:.0f} s"
    return JobProgress(job_id=job_id, stage=stage, percent=progress_percent(stage, 0.0), detail=detail)


def converting_fraction(out_time_s: float | None, duration: float) -> float:
    """How far converting is: ffmpeg's output time over the expected duration (0 when unknown)."""
    if out_time_s is None or duration <= 0:
        return 0.0
    return min(1.0, max(0.0, out_time_s / duration))


#: how much shorter than planned an output may end before it counts as cut off (seconds, fraction)
SHORT_OUTPUT_SLACK_S = 1.0
SHORT_OUTPUT_SLACK_FRACTION = 0.02


def check_output_duration(out_time_s: float | None, expected: float) -> Error | None:
    """conversion_failed when ffmpeg's final output time falls short of the planned duration, else None.

    ffmpeg exits 0 on a source cut off mid-stream (it treats the short read as the end), so the
    uploader checks the last ``-progress`` block with this before it reports success. An unknown
    expected duration (0) passes.
    """
    if expected <= 0:
        return None
    slack = max(SHORT_OUTPUT_SLACK_S, SHORT_OUTPUT_SLACK_FRACTION * expected)
    if out_time_s is None or out_time_s < expected - slack:
        got = "no output time" if out_time_s is None else f"{out_time_s:.1f} s"
        return Error.of(
            ErrorCode.CONVERSION_FAILED, f"the output ends early: {got} of {expected:.1f} s (source cut off?)"
        )
    return None


class MonotonicProgress:
    """Keeps reported progress from going backwards; ``update`` says whether there is news to send."""

    def __init__(self) -> None:
        self.percent = 0.0

    def update(self, stage: Stage, fraction: float) -> float | None:
        """The new percent if it is higher than the last one reported, else None."""
        percent = progress_percent(stage, fraction)
        if percent <= self.percent:
            return None
        self.percent = percent
        return percent


def _parse_clock(value: str) -> float | None:
    """``HH:MM:SS.micro`` as seconds; None for N/A or garbage."""
    try:
        hours, minutes, seconds = value.strip().split(":")
        total = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None
    return total if total >= 0 else None


def parse_progress_block(lines: Iterable[str]) -> dict[str, str | float | int | bool | None]:
    """One ``-progress`` block (key=value lines) as a dict; lines without ``=`` are ignored.

    Adds ``out_time_s`` (seconds or None: from out_time_us, else out_time_ms — which ffmpeg also
    writes in microseconds — else out_time), ``total_size`` as int when known, and ``end``
    (True once ``progress=end``).
    """
    raw: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.strip().partition("=")
        if sep and key and " " not in key:
            raw[key.strip()] = value.strip()
    block: dict[str, str | float | int | bool | None] = dict(raw)
    out_time_s: float | None = None
    for key in ("out_time_us", "out_time_ms"):
        try:
            micros = int(raw[key])
        except (KeyError, ValueError):
            continue
        if micros >= 0:
            out_time_s = micros / 1_000_000
            break
    if out_time_s is None and "out_time" in raw:
        out_time_s = _parse_clock(raw["out_time"])
    block["out_time_s"] = out_time_s
    try:
        block["total_size"] = int(raw["total_size"])
    except (KeyError, ValueError):
        block["total_size"] = None
    block["end"] = raw.get("progress") == "end"
    return block

