"""ffmpeg's argv from a plan's values: protocol whitelists, inputs, codecs, muxer flags, hardening. Pure.
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
from collections.abc import Callable

import imagesize
import msgspec

from actors.core.catalog import CATALOG, CODECS
from actors.core.plain import header_block, plain_tag, require_http_url
from actors.core.plan import COVER_BOX_PX, COVER_QSCALE, video_kbps_cap
from messages.types import (
    AudioEncoding,
    Format,
    InputVia,
    MediaInput,
    MediaPlan,
    Tags,
    VideoEncoding,
)

#: protocols ffmpeg may use for an http(s) input; ``file`` is never allowed (playlists can name it)
HTTP_PROTOCOLS = "http,https,tcp,tls,crypto"
#: protocols for an HLS input: the segments and AES keys are fetched over http(s) as well
HLS_PROTOCOLS = "hls,http,https,tcp,tls,crypto"
#: the only protocol for an input that yt-dlp writes into ffmpeg's stdin
PIPE_PROTOCOLS = "pipe"
#: longest back-off ffmpeg's HTTP reconnect may reach, seconds; keeps a dead source failing fast
RECONNECT_DELAY_MAX_S = 2

#: x264 speed/quality: veryfast keeps 720p well above real time on two cores
X264_PRESET = "veryfast"
X264_CRF = 23
#: VP9 constant-quality level; realtime deadline + cpu-used 8 is what makes VP9 bearable on 2 cores
VP9_CRF = 33
VP9_CPU_USED = 8

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
