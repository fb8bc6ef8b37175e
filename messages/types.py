"""Every message of the flow, as frozen msgspec Structs tagged by ``type``.

The wire contract *is* these types: the JSON Schema (``getgoodtape schema``) is generated from
them. Public messages: ConvertRequested (in), JobProgress / JobCompleted / JobFailed (out).
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from messages.errors import Error

# ---------------------------------------------------------------------------------------- scalars

#: A job id's characters, the one home of the rule (match it whole, e.g. ``re.fullmatch``); storage/keys.py
#: repeats it because storage imports no project package, and tests/edges/test_messages.py checks the two agree.
JOB_ID_SHAPE = r"[A-Za-z0-9][A-Za-z0-9_-]{7,63}"
#: A job id: client-supplied or generated; safe in object keys, routing keys and URLs.
#: ``$(?!\n)``: a bare ``$`` also matches before a trailing newline, which would let "id\n" through.
JobId = Annotated[str, msgspec.Meta(pattern="^" + JOB_ID_SHAPE + r"$(?!\n)", description="job id")]
#: A tenant (an API key's or an integrator broker user's owner name); one routing-key word.
TenantId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$(?!\n)", description="tenant id")]
#: A source URL as the user gave it; the scheme is checked by the coordinator, the host by the guard.
SourceUrl = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, description="media or page URL")]
#: A presigned URL handed to an actor that holds no credentials.
SignedUrl = Annotated[str, msgspec.Meta(min_length=8, max_length=8192)]
ObjectKey = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
ShortText = Annotated[str, msgspec.Meta(max_length=1024)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=7 * 24 * 3600)]
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
ByteCount = Annotated[int, msgspec.Meta(ge=0)]
#: A queue name to send the final event to (AMQP reply-to convention, default exchange).
ReplyTo = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.:-]+$(?!\n)")]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]

#: The URL schemes a user's URL and every URL a plan names may use; the one home of the http(s)
#: rule (``HttpUrl`` below says the same as a pattern).
HTTP_SCHEMES = frozenset({"http", "https"})
#: (These internal patterns end in ``\Z``: ``$`` would also accept a trailing newline.)
#: An http(s) URL: the only kind of input a plan may name (no file:, pipe:, concat:, data:, subfile: …);
#: no whitespace, control characters or backslashes, which URL parsers split differently.
HttpUrl = Annotated[
    str, msgspec.Meta(min_length=8, max_length=8192, pattern=r"^[Hh][Tt][Tt][Pp][Ss]?://[^\x00-\x20\x7f\\]+\Z")
]
#: An HTTP header name (an RFC 9110 token) and value (no CR, LF or other control characters).
HeaderName = Annotated[str, msgspec.Meta(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}\Z")]
HeaderValue = Annotated[str, msgspec.Meta(max_length=8192, pattern=r"^[^\x00-\x08\x0a-\x1f\x7f]*\Z")]
#: Most headers one input may carry.
MAX_HEADERS = 32
Headers = Annotated[dict[HeaderName, HeaderValue], msgspec.Meta(max_length=MAX_HEADERS)]
#: A metadata tag's text: plain characters only (no control characters), bounded.
TagText = Annotated[str, msgspec.Meta(max_length=1024, pattern=r"^[^\x00-\x1f\x7f]*\Z")]
#: A bitrate in kbit/s and a picture height in pixels, bounded to what any output can use.
Kbps = Annotated[int, msgspec.Meta(ge=8, le=200_000)]
Height = Annotated[int, msgspec.Meta(ge=16, le=8640)]
#: A yt-dlp format selector such as ``137+140`` or ``hls-1080p``: never an option.
FormatSelector = Annotated[str, msgspec.Meta(max_length=256, pattern=r"^(?:[A-Za-z0-9_.+/=:][A-Za-z0-9_.+/=:-]*)?\Z")]

#: Most part URLs one StreamToStorage may carry; the part size grows to fit the size cap instead.
MAX_PART_URLS = 256
#: Bounds of the Range size the guard fetches an input in (yt-dlp's ``http_chunk_size``; YouTube asks 10 MiB)
MIN_RANGE_CHUNK = 256 * 1024
MAX_RANGE_CHUNK = 256 * 1024 * 1024
#: Bytes of one Range request upstream; 0 fetches the input in one request
RangeChunk = Annotated[int, msgspec.Meta(ge=0, le=MAX_RANGE_CHUNK)]
#: Most times one plan's inputs are re-resolved (refused or expired URLs) before the job fails
MAX_RESOLUTIONS = 2
#: A point in time, ISO 8601 with its offset (``2026-12-02T06:30:00+00:00``), or "" for unknown
Timestamp = Annotated[str, msgspec.Meta(max_length=40, pattern=r"^(\d{4}-\d\d-\d\dT[0-9:.]+(?:Z|[+-]\d\d:\d\d))?\Z")]


class Format(enum.StrEnum):
    """Output formats."""

    MP3 = "mp3"
    M4A = "m4a"
    OPUS = "opus"
    FLAC = "flac"
    WAV = "wav"
    MP4 = "mp4"
    WEBM = "webm"

    @property
    def is_video(self) -> bool:
        """Whether the output carries a video stream."""
        return self in (Format.MP4, Format.WEBM)


class Quality(enum.StrEnum):
    """Audio bitrates in kbit/s, video maximum heights in pixels, or ``best``.

    Which values fit which format is decided by ``actors.core.request.allowed_qualities``.
    """

    K64 = "64"
    K96 = "96"
    K128 = "128"
    K160 = "160"
    K192 = "192"
    K256 = "256"
    K320 = "320"
    P360 = "360"
    P480 = "480"
    P720 = "720"
    P1080 = "1080"
    BEST = "best"


class Stage(enum.StrEnum):
    """Where a job is: the stages follow in this order, and failed may follow any. Progress: preparing
    0–35 %, converting (and uploading) 35–80 %, verifying 80–95 %, finishing 95–100 %."""

    QUEUED = "queued"
    PREPARING = "preparing"
    CONVERTING = "converting"
    VERIFYING = "verifying"
    FINISHING = "finishing"
    COMPLETED = "completed"
    FAILED = "failed"


#: the stages in the order a job passes them (the one home of that order); ``failed`` can follow any
STAGE_ORDER: tuple[Stage, ...] = (Stage.QUEUED, Stage.PREPARING, Stage.CONVERTING, Stage.VERIFYING,
                                  Stage.FINISHING, Stage.COMPLETED)


class UploadMode(enum.StrEnum):
    """How the uploader sends ffmpeg's output to storage."""

    #: one PUT with Content-Length when the output fits the first part buffer, else multipart
    AUTO = "auto"
    #: one PUT with chunked transfer encoding; refused by S3, R2 and MinIO
    CHUNKED = "chunked"


class InputVia(enum.StrEnum):
    """How ffmpeg reads an input."""

    #: ffmpeg opens the URL itself (http(s), HLS)
    FFMPEG = "ffmpeg"
    #: yt-dlp downloads and writes into a pipe feeding ffmpeg's stdin (fragmented DASH etc.)
    YTDLP_PIPE = "ytdlp_pipe"


class Base(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Common base: frozen, keyword-only, tagged by ``type`` with the snake-case name.

    Unknown fields are ignored so that a newer minor version (which only adds optional fields) still
    decodes; wrong types, missing fields and unknown types are refused.
    """


# ------------------------------------------------------------------------------------ public: in


class ConvertRequested(Base, tag="convert_requested"):
    """Convert the media at ``url`` into ``format`` and store it; the one message other systems send.

    Publish to exchange ``ggt.requests`` with routing key ``convert.<tenant>``; see docs/MESSAGES.md.
    """

    url: SourceUrl
    format: Format
    #: bitrate (kbit/s) for audio, maximum height for video, or best; default depends on the format
    quality: Quality | None = None
    #: client-chosen job id; a second request with the same id is the same job
    job_id: JobId | None = None
    #: alternative to job_id: requests with the same key are the same job
    idempotency_key: IdempotencyKey | None = None
    #: clip start and end, in seconds of the source
    start: Seconds | None = None
    end: Seconds | None = None
    #: write title / artist / date / source URL tags into the file
    embed_metadata: bool = True
    #: embed the source's thumbnail as cover art (mp3, m4a)
    embed_thumbnail: bool = True
    #: also publish the final JobCompleted / JobFailed to this queue (default exchange)
    reply_to: ReplyTo | None = None
    #: download a playlist's first entry instead of refusing playlist URLs
    allow_playlist: bool = False


# ----------------------------------------------------------------------------------- public: out


class JobProgress(Base, tag="job_progress"):
    """Progress of one job, at most twice a second per job."""

    job_id: JobId
    stage: Stage
    percent: Percent
    detail: ShortText = ""
    bytes_stored: ByteCount = 0


class JobCompleted(Base, tag="job_completed"):
    """The job's file is stored and verified; ``download_url`` is valid until ``expires_at``."""

    job_id: JobId
    download_url: SignedUrl
    expires_at: str
    key: ObjectKey
    format: Format
    quality: Quality
    content_type: str
    size: ByteCount
    sha256: Sha256Hex
    duration: Seconds
    title: ShortText = ""
    #: seconds spent in each stage (preparing, converting, verifying, finishing, total)
    timings: dict[str, float] = {}


class JobFailed(Base, tag="job_failed"):
    """The job failed; ``error.code`` says why, ``error.retryable`` whether trying again can help."""

    job_id: JobId
    error: Error
    stage: Stage


# ------------------------------------------------------------------------------------ internal


class MediaInput(Base, tag="media_input"):
    """One input of the plan: an http(s) URL ffmpeg opens, or a page yt-dlp feeds into ffmpeg's stdin."""

    url: HttpUrl
    via: InputVia = InputVia.FFMPEG
    #: HTTP headers yt-dlp says the site needs (User-Agent, Cookie, Referer …)
    headers: Headers = {}
    #: what ffmpeg should take from this input
    kind: Annotated[str, msgspec.Meta(pattern=r"^(av|audio|video)$")] = "av"
    #: yt-dlp format selector: for a piped input the feeder's ``-f`` (e.g. "137+140"); for an ffmpeg
    #: input the format whose URL this is, so a re-resolution finds the same format again
    format_id: FormatSelector = ""
    #: ffmpeg reads this input as an HLS playlist (segments and keys over http(s) too)
    hls: bool = False
    #: the guard fetches this input in Range requests of this many bytes (the site's
    #: ``downloader_options.http_chunk_size``: it throttles long single requests); 0 = one request
    range_chunk: RangeChunk = 0


class AudioEncoding(Base, tag="audio_encoding"):
    """How the audio stream is written: copied, or encoded with the format's encoder at ``kbps``."""

    #: index into the plan's inputs
    input: Annotated[int, msgspec.Meta(ge=0, le=1)]
    copy: bool = False
    #: CBR bitrate of the encoder; None for lossless formats (FLAC, WAV) and copies
    kbps: Kbps | None = None


class VideoEncoding(Base, tag="video_encoding"):
    """How the video stream is written: copied, or encoded with the format's encoder, scaled and capped."""

    #: index into the plan's inputs
    input: Annotated[int, msgspec.Meta(ge=0, le=1)]
    copy: bool = False
    #: scale down to at most this height (never up); None keeps the source's height
    max_height: Height | None = None
    #: bitrate cap of the encoder
    kbps: Kbps | None = None


class Tags(Base, tag="tags"):
    """Metadata written into the output, as plain values."""

    title: TagText = ""
    artist: TagText = ""
    #: YYYY-MM-DD when known
    date: TagText = ""
    #: the source URL
    comment: TagText = ""


class MediaPlan(Base, tag="media_plan"):
    """What the converter decided, as typed values; the uploader builds ffmpeg's argv from it itself."""

    inputs: Annotated[list[MediaInput], msgspec.Meta(min_length=1, max_length=2)]
    format: Format
    quality: Quality
    content_type: str
    extension: str
    #: duration the output should have, in seconds; 0 when the source's is unknown
    duration: Seconds
    #: the most bytes this output may have (ffmpeg -fs); part URLs are presigned to cover it
    max_bytes: ByteCount
    audio: AudioEncoding | None = None
    video: VideoEncoding | None = None
    #: where reading starts in the source (ffmpeg -ss before each input), seconds
    start: Seconds = 0
    #: the most seconds of output (ffmpeg -t); None leaves the bound to -fs and the time limit
    max_seconds: Seconds | None = None
    #: tags to write; None writes none (the source's own tags are never copied)
    tags: Tags | None = None
    estimated_bytes: ByteCount = 0
    title: ShortText = ""
    #: codec names ffprobe should find in the output, e.g. {"audio": "mp3"}
    expect_codecs: dict[str, str] = {}
    #: cover art to embed (mp3): fetched by the uploader within a byte and pixel budget
    thumbnail_url: HttpUrl | None = None
    #: the page the inputs were resolved from, re-resolved when their URLs are refused or expired
    source_url: HttpUrl | None = None
    #: when the inputs' URLs were resolved, and when the earliest of them expires ("" if the site does not say)
    resolved_at: Timestamp = ""
    expires_at: Timestamp = ""
    #: how many times the inputs were re-resolved (bounded by MAX_RESOLUTIONS)
    resolutions: Annotated[int, msgspec.Meta(ge=0, le=MAX_RESOLUTIONS)] = 0


class PartUpload(Base, tag="part_upload"):
    """A presigned multipart upload: the uploader PUTs parts 1..N to ``part_urls``."""

    upload_id: str
    part_size: ByteCount
    part_urls: Annotated[list[SignedUrl], msgspec.Meta(max_length=MAX_PART_URLS)]
    #: presigned AbortMultipartUpload, used by the uploader when it fails or is cancelled
    abort_url: SignedUrl


class UploadTarget(Base, tag="upload_target"):
    """Where the uploader puts the output, all through presigned URLs."""

    key: ObjectKey
    content_type: str
    #: presigned single PUT (Content-Type signed): used when the output fits one part buffer
    put_url: SignedUrl
    mode: UploadMode = UploadMode.AUTO
    multipart: PartUpload | None = None
    #: URLs stop working at this time (ISO 8601)
    expires_at: str = ""


class PartETag(Base, tag="part_etag"):
    """One stored part."""

    number: Annotated[int, msgspec.Meta(ge=1, le=10000)]
    etag: str
    size: ByteCount


class ResolveMedia(Base, tag="resolve_media"):
    """Coordinator → converter: resolve ``request.url`` with yt-dlp and plan the conversion."""

    job_id: JobId
    request: ConvertRequested


class MediaResolved(Base, tag="media_resolved"):
    """Converter → coordinator: the plan."""

    job_id: JobId
    plan: MediaPlan


class StreamToStorage(Base, tag="stream_to_storage"):
    """Coordinator → uploader: run the plan and stream ffmpeg's output to ``target``."""

    job_id: JobId
    plan: MediaPlan
    target: UploadTarget
    #: seconds of the job's time limit left for this step
    time_limit: Seconds
    #: how many replays this target was issued for; a replayed copy with more replays asks for fresh URLs
    renewals: Annotated[int, msgspec.Meta(ge=0)] = 0


class Streamed(Base, tag="streamed"):
    """Uploader → coordinator: every byte is in storage (parts not yet completed for multipart)."""

    job_id: JobId
    key: ObjectKey
    upload_mode: Annotated[str, msgspec.Meta(pattern=r"^(single|multipart|chunked)$")]
    size: ByteCount
    sha256: Sha256Hex
    #: the ETag storage should report: md5 hex for one PUT, md5-of-md5s "-N" for multipart
    etag: str
    parts: Annotated[list[PartETag], msgspec.Meta(max_length=10000)] = []
    upload_id: str = ""
    #: the output duration ffmpeg reported, seconds
    duration: Seconds = 0
    seconds: Seconds = 0


class VerifyObject(Base, tag="verify_object"):
    """Coordinator → verifier: check the stored object against what was streamed."""

    job_id: JobId
    key: ObjectKey
    size: ByteCount
    etag: str
    content_type: str
    format: Format
    #: the duration the output must have: the plan's, or (source length unknown) ffmpeg's report
    duration: Seconds
    expect_codecs: dict[str, str] = {}
    #: the output duration ffmpeg reported producing (Streamed.duration); 0 = not reported
    produced: Seconds = 0


class Verified(Base, tag="verified"):
    """Verifier → coordinator: the verdict; ``problems`` is empty when the object is good."""

    job_id: JobId
    key: ObjectKey
    ok: bool
    problems: list[ShortText] = []
    duration: Seconds = 0
    #: whether a fresh run could get another verdict: the object differs from what was streamed
    #: (size, ETag, missing: storage lost or changed bytes); never for a media mismatch (container,
    #: codec, duration against what ffmpeg reported producing), which every run repeats
    retryable: bool = False


class RenewUpload(Base, tag="renew_upload"):
    """Uploader → coordinator: the upload URLs it got are stale (a replayed or expired command), or the
    upload was aborted after the source refused its URLs mid-stream; send fresh ones (for ``plan``, if given)."""

    job_id: JobId
    key: ObjectKey
    reason: ShortText = ""
    #: the job's plan with freshly resolved input URLs, when the old ones were refused mid-stream
    plan: MediaPlan | None = None


class StepFailed(Base, tag="step_failed"):
    """Any actor → coordinator: a step failed with a coded error."""

    job_id: JobId
    step: Annotated[str, msgspec.Meta(max_length=64)]
    error: Error
    #: message id of the command whose step failed; a failure of a command the job has moved past is stale
    cause: Annotated[str, msgspec.Meta(max_length=128)] = ""


#: Every message type, for the one decoder of the union.
Message = (
    ConvertRequested
    | ResolveMedia
    | MediaResolved
    | StreamToStorage
    | Streamed
    | VerifyObject
    | Verified
    | RenewUpload
    | StepFailed
    | JobProgress
    | JobCompleted
    | JobFailed
)

MESSAGE_TYPES: tuple[type[Base], ...] = (
    ConvertRequested,
    ResolveMedia,
    MediaResolved,
    StreamToStorage,
    Streamed,
    VerifyObject,
    Verified,
    RenewUpload,
    StepFailed,
    JobProgress,
    JobCompleted,
    JobFailed,
)

PUBLIC_IN: tuple[type[Base], ...] = (ConvertRequested,)
PUBLIC_OUT: tuple[type[Base], ...] = (JobProgress, JobCompleted, JobFailed)


def type_name(message_type: type[Base]) -> str:
    """The ``type`` tag of a message class (also the AMQP ``type`` property)."""
    return message_type.__struct_config__.tag  # type: ignore[return-value]


TYPES_BY_NAME: dict[str, type[Base]] = {type_name(t): t for t in MESSAGE_TYPES}
