"""What the converter learned about a source, as values: its inputs, its streams, codec names. Pure."""

from __future__ import annotations

from urllib.parse import urlsplit

import msgspec

from messages.types import (
    InputVia,
)


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
