"""What ffprobe's JSON says about a URL or file, as values (format, duration, streams, packets). Pure."""

from __future__ import annotations

import msgspec


class ProbeStream(msgspec.Struct, frozen=True, kw_only=True):
    """One stream as ffprobe sees it."""

    index: int
    codec_type: str = ""
    codec_name: str = ""
    width: int | None = None
    height: int | None = None
    sample_rate: int | None = None
    channels: int | None = None
    bit_rate: int | None = None
    duration: float | None = None
    #: an embedded cover picture, not a video
    attached_pic: bool = False
    #: stream tags, keys lower-cased (Ogg keeps its Vorbis comments here)
    tags: dict[str, str] = {}


class ProbeResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a media file holds; ``duration`` is None when the container does not say (piped FLAC, WebM)."""

    format_name: str
    duration: float | None
    size: int | None = None
    bit_rate: int | None = None
    streams: list[ProbeStream] = []
    tags: dict[str, str] = {}
    #: end of the last packet, seconds; only filled when probed with ``count_packets=True``
    packet_duration: float | None = None

    def first(self, codec_type: str) -> ProbeStream | None:
        """The first stream of ``codec_type`` ("audio" or "video"); cover pictures are not video."""
        for stream in self.streams:
            if stream.codec_type == codec_type and not stream.attached_pic:
                return stream
        return None

    @property
    def audio(self) -> ProbeStream | None:
        """The first audio stream."""
        return self.first("audio")

    @property
    def video(self) -> ProbeStream | None:
        """The first video stream that is not a cover picture."""
        return self.first("video")

    def tag(self, name: str) -> str | None:
        """Tag ``name`` (case-insensitive) from the container, else from the first stream that has it."""
        key = name.lower()
        if key in self.tags:
            return self.tags[key]
        for stream in self.streams:
            if key in stream.tags:
                return stream.tags[key]
        return None

    @property
    def best_duration(self) -> float | None:
        """The packets' end when they were counted (exact, and the only duration a piped stream has),
        else the container's duration, else the longest stream's."""
        if self.packet_duration is not None:
            return self.packet_duration
        if self.duration:
            return self.duration
        streams = [s.duration for s in self.streams if s.duration]
        return max(streams) if streams else self.packet_duration


def _number(value: object, kind: type[int] | type[float]) -> int | float | None:
    try:
        return kind(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _tags(section: dict) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in (section.get("tags") or {}).items()}


def parse_probe_json(data: bytes | str) -> ProbeResult:
    """ffprobe's ``-print_format json`` output as a ProbeResult (pure; tested with plain values)."""
    raw = msgspec.json.decode(data)
    fmt = raw.get("format") or {}
    streams = [
        ProbeStream(
            index=int(s.get("index", i)),
            codec_type=s.get("codec_type", ""),
            codec_name=s.get("codec_name", ""),
            width=_number(s.get("width"), int),  # type: ignore[arg-type]
            height=_number(s.get("height"), int),  # type: ignore[arg-type]
            sample_rate=_number(s.get("sample_rate"), int),  # type: ignore[arg-type]
            channels=_number(s.get("channels"), int),  # type: ignore[arg-type]
            bit_rate=_number(s.get("bit_rate"), int),  # type: ignore[arg-type]
            duration=_number(s.get("duration"), float),  # type: ignore[arg-type]
            attached_pic=bool((s.get("disposition") or {}).get("attached_pic")),
            tags=_tags(s),
        )
        for i, s in enumerate(raw.get("streams") or [])
    ]
    packet_end: float | None = None
    for packet in raw.get("packets") or []:
        pts = _number(packet.get("pts_time"), float)
        if pts is None:
            continue
        end = pts + (_number(packet.get("duration_time"), float) or 0.0)
        packet_end = end if packet_end is None else max(packet_end, end)
    return ProbeResult(
        format_name=fmt.get("format_name", ""),
        duration=_number(fmt.get("duration"), float),  # type: ignore[arg-type]
        size=_number(fmt.get("size"), int),  # type: ignore[arg-type]
        bit_rate=_number(fmt.get("bit_rate"), int),  # type: ignore[arg-type]
        streams=streams,
        tags=_tags(fmt),
        packet_duration=packet_end,
    )
