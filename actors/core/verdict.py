"""The verifier's verdict as values: what is wrong with a stored object and with its media. Pure."""

from __future__ import annotations

from typing import Protocol

from actors.core.catalog import CATALOG
from actors.core.probe import ProbeResult
from messages.types import VerifyObject
from storage.keys import strip_etag


class StoredObject(Protocol):
    """What a HEAD of the stored object says (``storage.ObjectInfo`` has these)."""

    size: int
    etag: str
    content_type: str


#: relative and absolute duration tolerance: within 2 % or 0.5 s of the expected duration
DURATION_TOLERANCE = 0.02
DURATION_TOLERANCE_S = 0.5
#: the slowest read of a stored file the probe allows for (bytes per second)
PROBE_BYTES_PER_S = 5 * 1024 * 1024


def probe_timeout(size: int, limit: float) -> float:
    """Seconds the probe of a stored file may take: a minute plus a second per PROBE_BYTES_PER_S bytes
    (counting packets reads the whole file), within the step's time limit."""
    return min(limit, 60.0 + size / PROBE_BYTES_PER_S)


def object_problems(head: StoredObject | None, message: VerifyObject) -> list[str]:
    """What is wrong with the stored object's metadata (empty when nothing is)."""
    if head is None:
        return ["the object is missing from storage"]
    problems = []
    if head.size != message.size:
        problems.append(f"size {head.size} differs from the {message.size} bytes streamed")
    if strip_etag(head.etag) != strip_etag(message.etag):
        problems.append(f"ETag {head.etag} differs from the {message.etag} computed while streaming")
    if head.content_type.split(";")[0].strip() != message.content_type:
        problems.append(f"Content-Type {head.content_type!r} is not {message.content_type!r}")
    return problems


def duration_ok(measured: float | None, expected: float) -> bool:
    """Whether ``measured`` is within 2 % or 0.5 s of ``expected``."""
    if measured is None:
        return False
    return abs(measured - expected) <= max(DURATION_TOLERANCE * expected, DURATION_TOLERANCE_S)


def reads_whole(message: VerifyObject) -> bool:
    """Whether the probe reads the stored file front to back, counting its packets.

    Only a piped container whose duration only its packets tell (CATALOG's ``packet_counted``: MP4 and
    M4A fragments, WebM, Ogg, FLAC) needs the whole file for a duration, and only when ffmpeg did not
    report what it produced: the stored bytes are those streamed (size and ETag, exact), so ffmpeg's
    report stands for their duration and the head (container, codecs) is all that is left to read."""
    return CATALOG[message.format].packet_counted and message.produced <= 0


def stored_duration(probe: ProbeResult, message: VerifyObject) -> float | None:
    """The stored file's duration: its packets' end when counted, its header's for a container that
    carries one, else (a head read of a piped container) what ffmpeg reported producing."""
    if probe.packet_duration is None and CATALOG[message.format].packet_counted:
        return message.produced or None  # the head of a fragmented or piped file tells no total
    return probe.best_duration


def media_problems(probe: ProbeResult, message: VerifyObject) -> list[str]:
    """What is wrong with the media: container, codecs, duration (empty when nothing is)."""
    problems = []
    if not any(name in probe.format_name for name in CATALOG[message.format].containers):
        problems.append(f"container {probe.format_name!r} is not {message.format}")
    for kind, codec in message.expect_codecs.items():
        stream = probe.first(kind)
        if stream is None:
            problems.append(f"no {kind} stream (expected {codec})")
        elif stream.codec_name != codec:
            problems.append(f"{kind} codec {stream.codec_name!r} is not {codec!r}")
    measured = stored_duration(probe, message)
    if not duration_ok(measured, message.duration):
        problems.append(f"duration {measured if measured is None else round(measured, 3)} s is not within "
                        f"2 % or 0.5 s of {message.duration:.3f} s (source cut off?)")
    elif message.produced > 0 and not duration_ok(message.produced, message.duration):
        problems.append(f"ffmpeg reported producing a duration of {message.produced:.3f} s, not within "
                        f"2 % or 0.5 s of {message.duration:.3f} s (source cut off?)")
    return problems
