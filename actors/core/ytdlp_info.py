"""What yt-dlp said, as our values: the format(s) to take, the SourceInfo, the error code. Pure, no I/O.

The converter hands in yt-dlp's info dict (``extract_info(download=False)``, processed) and gets a
``SourceInfo`` for ``actors.core.plan.plan_media``. yt-dlp's conventions this module builds on:

- ``formats`` is sorted worst → best; ``vcodec``/``acodec`` ``"none"`` means "no such stream",
  a missing value means "unknown" (direct links from the generic extractor say nothing);
- each format carries the ``http_headers`` it needs and, when the site set cookies, ``cookies`` in
  a Set-Cookie-like form (``a=1; Domain=.x; Path=/; b=2 …``) that becomes our ``Cookie`` header;
- ``thumbnails`` is sorted worst → best.

What ffprobe later learns about a direct link goes in through ``with_probe``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import msgspec

from actors.core.catalog import CODECS
from actors.core.plan import max_height
from actors.core.probe import ProbeResult
from actors.core.request import resolved_quality
from actors.core.source import SourceInfo, SourceInput, codec_name
from messages.errors import ErrorCode, JobError
from messages.types import HTTP_SCHEMES, MAX_RANGE_CHUNK, MIN_RANGE_CHUNK, ConvertRequested, Format, InputVia, Quality

#: yt-dlp protocols ffmpeg reads by itself; every other one (DASH, ISM, F4M, RTMP …) goes through a yt-dlp pipe
FFMPEG_PROTOCOLS = frozenset({"http", "https", "m3u8", "m3u8_native"})
#: yt-dlp's ``live_status`` values we refuse: on air, not yet on air, or ended but still being processed
LIVE_STATUSES = frozenset({"is_live", "is_upcoming", "post_live"})
#: attribute names inside yt-dlp's ``cookies`` string; everything else there is a ``name=value`` cookie
COOKIE_ATTRIBUTES = frozenset({"domain", "path", "secure", "expires", "version", "max-age", "httponly",
                               "samesite", "comment", "discard", "port"})

Info = Mapping[str, Any]


class Chosen(NamedTuple):
    """One yt-dlp format taken as an input, and what ffmpeg should take from it (av, audio, video)."""

    format: Info
    kind: str


# ----------------------------------------------------------------------------------- small facts


def has_stream(fmt: Info, key: str) -> bool | None:
    """Whether format ``fmt`` has the stream named by ``key`` (``acodec``/``vcodec``): True, False, or None
    if unknown."""
    value = fmt.get(key)
    if value is None:
        return None
    return str(value).lower() != "none"


def kind_of(fmt: Info) -> str:
    """What a format carries: "audio" (video is none), "video" (audio is none), "av" (both or unknown), "" (neither)."""
    audio, video = has_stream(fmt, "acodec"), has_stream(fmt, "vcodec")
    if audio is False and video is False:
        return ""  # storyboards, images
    if video is False and audio is not False:
        return "audio"
    if audio is False and video is not False:
        return "video"
    return "av"


def protocol_of(fmt: Info) -> str:
    """yt-dlp's protocol for ``fmt``, or the URL's scheme when yt-dlp names none."""
    protocol = fmt.get("protocol")
    if protocol:
        return str(protocol)
    return urlsplit(str(fmt.get("url") or "")).scheme.lower() or "https"


def input_via(protocol: str) -> InputVia:
    """How ffmpeg reads a format of ``protocol``: http(s) and HLS itself, anything else from a yt-dlp pipe."""
    return InputVia.FFMPEG if protocol in FFMPEG_PROTOCOLS else InputVia.YTDLP_PIPE


def range_chunk_of(fmt: Info) -> int:
    """The Range size yt-dlp's format asks for (``downloader_options.http_chunk_size``, e.g. YouTube's
    10 MiB for its https formats), within MIN_RANGE_CHUNK..MAX_RANGE_CHUNK; 0 when it asks none."""
    options = fmt.get("downloader_options")
    size = options.get("http_chunk_size") if isinstance(options, Mapping) else None
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        return 0
    return max(MIN_RANGE_CHUNK, min(MAX_RANGE_CHUNK, size))


def cookie_header(cookies: str | None) -> str:
    """yt-dlp's ``cookies`` field (``a=1; Domain=.x; Path=/; Secure; b=2``) as a ``Cookie`` value (``a=1; b=2``)."""
    if not cookies:
        return ""
    pairs = []
    for token in cookies.split(";"):
        name, sep, value = token.strip().partition("=")
        if sep and name and name.lower() not in COOKIE_ATTRIBUTES:
            pairs.append(f"{name}={value}")
    return "; ".join(pairs)


def request_headers(fmt: Info) -> dict[str, str]:
    """The HTTP headers a fetch of ``fmt`` needs: yt-dlp's ``http_headers`` plus its cookies as ``Cookie``."""
    headers = {str(k): str(v) for k, v in (fmt.get("http_headers") or {}).items() if v is not None}
    cookie = cookie_header(fmt.get("cookies"))
    if cookie:
        headers["Cookie"] = cookie
    return headers


def is_live(info: Info) -> bool:
    """Whether the source is a live stream (on air, upcoming, or not yet processed after the broadcast)."""
    return bool(info.get("is_live")) or info.get("live_status") in LIVE_STATUSES


def best_thumbnail(info: Info) -> str | None:
    """The best http(s) thumbnail: the last usable one of ``thumbnails`` (sorted worst → best), else ``thumbnail``."""
    candidates = [t.get("url") for t in info.get("thumbnails") or [] if isinstance(t, Mapping)]
    candidates.append(info.get("thumbnail"))
    for url in reversed([c for c in candidates if c]):
        if urlsplit(str(url)).scheme.lower() in HTTP_SCHEMES:
            return str(url)
    return None


def single_entry(info: Info, *, allow_playlist: bool) -> Info:
    """The one video ``info`` describes; a playlist gives its first entry when allowed, else ``invalid_request``."""
    seen = 0
    while info.get("_type") in ("playlist", "multi_video"):
        if not allow_playlist:
            raise JobError(
                ErrorCode.INVALID_REQUEST,
                "url: this is a playlist; set allow_playlist to convert its first entry",
            )
        entries = [e for e in info.get("entries") or [] if e]
        seen += 1
        if not entries or seen > 3:  # nested playlists deeper than this are not worth following
            raise JobError(ErrorCode.NO_MEDIA_FOUND, "the playlist has no entries")
        info = entries[0]
    return info


def playable_formats(info: Info) -> list[Info]:
    """The formats worth considering, worst → best: with a URL, not DRM-protected, not storyboards/images."""
    formats = info.get("formats") or ([info] if info.get("url") else [])
    usable = []
    for fmt in formats:
        if not fmt.get("url") or fmt.get("has_drm"):
            continue
        if has_stream(fmt, "acodec") is False and has_stream(fmt, "vcodec") is False:
            continue  # storyboards (mhtml) and images: neither audio nor video
        usable.append(fmt)
    return usable


# ------------------------------------------------------------------------------------- selection


def _number(fmt: Info, *keys: str) -> float:
    for key in keys:
        value = fmt.get(key)
        if isinstance(value, int | float) and value > 0:
            return float(value)
    return 0.0


def _audio_rank(fmt: Info, index: int, *, prefer_codec: set[str]) -> tuple[int, float, int]:
    fits = 1 if codec_name(fmt.get("acodec")) in prefer_codec else 0
    return (fits, _number(fmt, "abr", "tbr"), index)


def _height_rank(fmt: Info, limit: int | None) -> tuple[int, int]:
    """Best first: the tallest within the limit, then unknown heights, then the shortest above the limit."""
    height = fmt.get("height")
    if not isinstance(height, int) or height <= 0:
        return (1, 0)
    if limit is None or height <= limit:
        return (2, height)
    return (0, -height)


def _video_rank(fmt: Info, index: int, *, limit: int | None, codec: str) -> tuple[int, int, int, float, int]:
    bucket, height = _height_rank(fmt, limit)
    fits = 1 if codec_name(fmt.get("vcodec")) == codec else 0
    return (bucket, height, fits, _number(fmt, "vbr", "tbr"), index)


def _best(candidates: Sequence[tuple[int, Info]], rank) -> tuple[Any, Info] | None:  # type: ignore[no-untyped-def]
    """(rank, format) of the highest-ranked candidate, or None."""
    ranked = [(rank(fmt, index), fmt) for index, fmt in candidates]
    return max(ranked, key=lambda pair: pair[0]) if ranked else None


def select_formats(formats: Sequence[Info], *, fmt: Format, quality: Quality) -> list[Chosen]:
    """The formats to take for output ``fmt`` at ``quality`` (``formats`` sorted worst → best as yt-dlp gives them).

    Audio outputs: the best audio-only format (at quality best, one whose codec can be copied into
    ``fmt`` first), else the best format with audio. Video outputs: the best video within the height
    limit (codec fitting the container first: h264 for mp4, vp9 for webm) plus the best audio, or the
    best combined format when it is at least as good; unknown heights rank below fitting known ones.
    Empty when nothing fits; at most one input needs a yt-dlp pipe (ffmpeg has one stdin).
    """
    indexed = list(enumerate(formats))
    audio_only = [(i, f) for i, f in indexed if kind_of(f) == "audio"]
    video_only = [(i, f) for i, f in indexed if kind_of(f) == "video"]
    combined = [(i, f) for i, f in indexed if kind_of(f) == "av"]
    codecs = CODECS[fmt]

    if not fmt.is_video:
        prefer = set(codecs.audio_copyable) if quality is Quality.BEST else set()
        audio = _best(audio_only, lambda f, i: _audio_rank(f, i, prefer_codec=prefer))
        if audio is not None:
            return [Chosen(audio[1], "audio")]
        with_audio = [(i, f) for i, f in combined if has_stream(f, "acodec") is not False]
        best = _best(with_audio, lambda f, i: (i,))
        if best is not None:
            return [Chosen(best[1], "av")]
        # only video: hand it on, the plan refuses it with a clear message
        video = _best(video_only, lambda f, i: (i,))
        return [Chosen(video[1], "video")] if video else []

    limit = max_height(quality)
    rank_video = lambda f, i: _video_rank(f, i, limit=limit, codec=codecs.video)  # noqa: E731
    video = _best(video_only, rank_video)
    both = _best(combined, rank_video)
    audio = _best(audio_only, lambda f, i: _audio_rank(f, i, prefer_codec={CODECS[fmt].audio}))
    if video is not None and audio is not None and (both is None or video[0][:3] >= both[0][:3]):
        chosen = [Chosen(video[1], "video"), Chosen(audio[1], "audio")]
    elif both is not None:
        chosen = [Chosen(both[1], "av")]
    elif video is not None:
        chosen = [Chosen(video[1], "video")]
    elif audio is not None:
        chosen = [Chosen(audio[1], "audio")]  # no video at all: the plan refuses it with a clear message
    else:
        chosen = []
    return chosen


# ---------------------------------------------------------------------------------- SourceInfo


def _input(chosen: Chosen, *, page_url: str) -> SourceInput:
    protocol = protocol_of(chosen.format)
    via = input_via(protocol)
    # a piped input is fetched by yt-dlp again, from the page; ffmpeg reads it from stdin
    url = str(chosen.format["url"]) if via is InputVia.FFMPEG else page_url
    # an ffmpeg input keeps its format id too: a re-resolution of the page finds the same format by it
    format_id = str(chosen.format.get("format_id") or "")
    # the site's hint for throttled origins: fetch in Range requests of this size (plain http(s) only)
    range_chunk = range_chunk_of(chosen.format) if via is InputVia.FFMPEG and protocol in ("http", "https") else 0
    return SourceInput(url=url, headers=request_headers(chosen.format), kind=chosen.kind, via=via, protocol=protocol,
                       format_id=format_id, range_chunk=range_chunk)


def _inputs(chosen: list[Chosen], *, page_url: str) -> list[SourceInput]:
    inputs = [_input(c, page_url=page_url) for c in chosen]
    piped = [i for i in inputs if i.via is InputVia.YTDLP_PIPE]
    if len(piped) > 1:
        # ffmpeg has one stdin: let yt-dlp fetch (and merge) everything into that one pipe
        headers = {k: v for i in piped for k, v in i.headers.items()}
        merged = SourceInput(url=page_url, headers=headers, kind="av", via=InputVia.YTDLP_PIPE,
                             protocol=piped[0].protocol, format_id="+".join(i.format_id for i in piped if i.format_id))
        inputs = [merged, *(i for i in inputs if i.via is InputVia.FFMPEG)]
    return inputs


def _artist(info: Info) -> str:
    artists = info.get("artists")
    if isinstance(artists, list) and artists:
        return ", ".join(str(a) for a in artists if a)
    for key in ("artist", "creator", "uploader", "channel"):
        if info.get(key):
            return str(info[key])
    return ""


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) and value > 0 else None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


def source_info(info: Info, request: ConvertRequested) -> SourceInfo:
    """What the source is and which inputs to read, from yt-dlp's info dict, for ``request``.

    Raises JobError: ``invalid_request`` for a playlist without ``allow_playlist``,
    ``live_not_supported`` for a live or upcoming stream, ``no_media_found`` when there is no format.
    """
    info = single_entry(info, allow_playlist=request.allow_playlist)
    if is_live(info):
        raise JobError(ErrorCode.LIVE_NOT_SUPPORTED, f"live_status={info.get('live_status') or 'is_live'}")
    formats = playable_formats(info)
    if not formats:
        raise JobError(ErrorCode.NO_MEDIA_FOUND, "yt-dlp found no playable format")
    chosen = select_formats(formats, fmt=request.format, quality=resolved_quality(request))
    if not chosen:
        raise JobError(ErrorCode.NO_MEDIA_FOUND, "no format carries audio or video")
    page_url = str(info.get("webpage_url") or info.get("original_url") or request.url)

    audio_fmt = next((c.format for c in chosen if c.kind in ("audio", "av")), None)
    video_fmt = next((c.format for c in chosen if c.kind in ("video", "av")), None)
    # does any format of the source have the stream at all? (unknown counts as "maybe": the probe decides)
    has_audio = any(has_stream(f, "acodec") is not False for f in formats)
    has_video = any(has_stream(f, "vcodec") is not False for f in formats)
    abr = _float(audio_fmt.get("abr")) if audio_fmt else None
    if abr is None and audio_fmt is not None and kind_of(audio_fmt) == "audio":
        abr = _float(audio_fmt.get("tbr"))
    vbr = _float(video_fmt.get("vbr")) if video_fmt else None
    if vbr is None and video_fmt is not None and kind_of(video_fmt) == "video":
        vbr = _float(video_fmt.get("tbr"))
    tbrs = [_float(c.format.get("tbr")) for c in chosen]
    tbr = sum(t for t in tbrs if t) if all(tbrs) else None
    return SourceInfo(
        inputs=_inputs(chosen, page_url=page_url),
        duration=_float(info.get("duration")),
        is_live=False,
        title=str(info.get("title") or info.get("fulltitle") or ""),
        artist=_artist(info),
        upload_date=str(info.get("upload_date") or ""),
        webpage_url=page_url,
        thumbnail_url=best_thumbnail(info),
        has_audio=has_audio,
        has_video=has_video,
        audio_codec=codec_name(audio_fmt.get("acodec")) if audio_fmt else None,
        video_codec=codec_name(video_fmt.get("vcodec")) if video_fmt else None,
        height=_int(video_fmt.get("height")) if video_fmt else None,
        sample_rate=_int(audio_fmt.get("asr")) if audio_fmt else None,
        channels=_int(audio_fmt.get("audio_channels")) if audio_fmt else None,
        tbr=tbr,
        abr=abr,
        vbr=vbr,
    )


# ------------------------------------------------------------------------------------ the probe


def probe_target(source: SourceInfo) -> SourceInput | None:
    """The input to probe with ffprobe, or None when yt-dlp said enough.

    Probed: the first input ffmpeg reads itself, when the duration is unknown (direct links) or
    when it is the only input and yt-dlp knows neither of its codecs (generic HLS, pages' <video>).
    """
    target = next((i for i in source.inputs if i.via is InputVia.FFMPEG), None)
    if target is None:
        return None
    codecs_unknown = source.audio_codec is None and source.video_codec is None
    if source.duration is None or (len(source.inputs) == 1 and codecs_unknown):
        return target
    return None


def with_probe(source: SourceInfo, probe: ProbeResult) -> SourceInfo:
    """``source`` completed with what ffprobe found: duration, codecs, height, bitrates where yt-dlp had none.

    For a single input the probe also decides which streams exist (yt-dlp guesses from the extension).
    """
    audio, video = probe.audio, probe.video
    changes: dict[str, object] = {
        "duration": source.duration or probe.best_duration,
        "audio_codec": source.audio_codec or (audio.codec_name if audio else None) or None,
        "video_codec": source.video_codec or (video.codec_name if video else None) or None,
        "height": source.height or (video.height if video else None),
        "sample_rate": source.sample_rate or (audio.sample_rate if audio else None),
        "channels": source.channels or (audio.channels if audio else None),
        "abr": source.abr or (audio.bit_rate / 1000 if audio and audio.bit_rate else None),
        "vbr": source.vbr or (video.bit_rate / 1000 if video and video.bit_rate else None),
        "tbr": source.tbr or (probe.bit_rate / 1000 if probe.bit_rate else None),
    }
    if len(source.inputs) == 1:
        changes["has_audio"] = audio is not None
        changes["has_video"] = video is not None
        if audio is None:
            changes["audio_codec"] = None
        if video is None:
            changes["video_codec"] = None
    return msgspec.structs.replace(source, **changes)


# ---------------------------------------------------------------------------------- yt-dlp errors

#: (phrases, code, retryable), first match wins; matched case-insensitively against yt-dlp's message
_ERROR_RULES: tuple[tuple[tuple[str, ...], ErrorCode, bool], ...] = (
    (("file:// urls are disabled", "no suitable extractor"), ErrorCode.UNSUPPORTED_URL, False),
    (("live event will begin", "live event is scheduled", "live event has not yet started", "premieres in",
      "premiere will begin"), ErrorCode.LIVE_NOT_SUPPORTED, False),
    # a bot check first: YouTube's text starts "Sign in to confirm you're not a bot", which must not
    # read as "sign in" (login_required); its fix is cookies or a PO token, not a retry
    (("not a bot", "captcha"), ErrorCode.BOT_CHECK, False),
    (("http error 429", "too many requests", "rate-limited", "rate limit", "try again later"),
     ErrorCode.RATE_LIMITED, True),
    # passing trouble: a refused or dropped connection may work on a later try
    (("timed out", "timeout", "connection refused", "connection reset", "temporary failure in name resolution",
      "name or service not known", "nodename nor servname", "network is unreachable", "unable to connect",
      "remote end closed", "incompleteread", "incomplete read", "a network error has occurred",
      "http error 5", "tunnel connection failed"),
     ErrorCode.MEDIA_UNAVAILABLE, True),
    (("members-only", "members only", "channel's members", "join this channel"), ErrorCode.MEMBERS_ONLY, False),
    (("confirm your age", "age-restricted", "age restricted", "inappropriate for some users"),
     ErrorCode.AGE_RESTRICTED, False),
    (("not available in your country", "not made this video available in your country", "geo restriction",
      "geo restricted", "geo-restricted", "not available from your location"), ErrorCode.GEO_BLOCKED, False),
    (("private video", "this video is private", "sign in", "registered users", "login details are needed",
      "login required", "http error 401"), ErrorCode.LOGIN_REQUIRED, False),
    (("http error 404", "http error 410", "has been removed", "been terminated", "no longer available",
      "this video does not exist", "copyright"), ErrorCode.MEDIA_REMOVED, False),
    (("http error 403", "not currently live", "is offline", "video unavailable"), ErrorCode.MEDIA_UNAVAILABLE, False),
    (("no video formats found", "requested format is not available", "drm protected",
      "no media found", "no formats"), ErrorCode.NO_MEDIA_FOUND, False),
)


def ytdlp_error(message: str, *, by_generic: bool) -> JobError:
    """The coded error for a yt-dlp failure ``message`` (a DownloadError's text).

    "Unsupported URL" from the generic extractor (``by_generic``) means it fetched the page and found
    no media: ``no_media_found``; from a site's extractor it is ``unsupported_url``. Access failures get
    the code of what the user (or operator) can do about them: ``bot_check``, ``rate_limited`` (429,
    retryable), ``members_only``, ``age_restricted``, ``geo_blocked``, ``login_required`` (private),
    ``media_removed`` (404/410, deleted); timeouts, refused connections and 5xx → ``media_unavailable``
    (retryable); upcoming or on-air → ``live_not_supported``. Anything else is ``media_unavailable``,
    retryable (sites change; yt-dlp often copes on a later try).
    """
    detail = message.removeprefix("ERROR: ").strip()
    lowered = detail.lower()
    if "unsupported url" in lowered:
        return JobError(ErrorCode.NO_MEDIA_FOUND if by_generic else ErrorCode.UNSUPPORTED_URL, detail)
    for phrases, code, retryable in _ERROR_RULES:
        if any(phrase in lowered for phrase in phrases):
            return JobError(code, detail, retryable=retryable)
    return JobError(ErrorCode.MEDIA_UNAVAILABLE, detail, retryable=True)
