"""The output formats, one row each: muxer, MIME type, extension, codecs, qualities, pipe flags. Pure.

Adding an output format is one ``Format`` member (messages/types.py) and one row of ``CATALOG``.
"""

from __future__ import annotations

import msgspec

from messages.types import (
    Format,
    Quality,
)

#: fragmented MP4 so the file can be written to a pipe (moov first, moof per fragment)
FRAGMENTED_MOVFLAGS = "+frag_keyframe+empty_moov+default_base_moof"
#: audio-only m4a has no video keyframes to cut fragments at: cut one per second of audio (µs)
M4A_FRAG_DURATION_US = 1_000_000


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
