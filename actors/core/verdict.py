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
    measured = probe.best_duration
    if not duration_ok(measured, message.duration):
        problems.append(f"duration {measured if measured is None else round(measured, 3)} s is not within "
                        f"2 % or 0.5 s of {message.duration:.3f} s (source cut off?)")
    return problems
