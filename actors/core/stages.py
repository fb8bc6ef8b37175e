"""The job's stages as progress: spans per stage, ffmpeg's ``-progress`` blocks, the cut-off check. Pure."""

from __future__ import annotations

import math
from collections.abc import Iterable

from messages.errors import Error, ErrorCode
from messages.types import (
    JobProgress,
    Stage,
)

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
