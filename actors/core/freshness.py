"""Resolved media URLs go stale: when they expire, and the plan with freshly resolved ones. Pure, no I/O.

Big sites hand out media URLs bound to the address that resolved them and valid for hours
(YouTube's ``googlevideo`` URLs carry ``expire=<unix time>`` and ``ip=<address>`` in their query;
yt-dlp exposes no expiry field of its own, so the URL is where the site says it). A plan records
when its inputs were resolved and, where a URL says, when the earliest expires
(``stamp_resolution``). The uploader re-resolves a plan whose URLs have expired (``plan_expired``)
or were refused, and ``refreshed_plan`` swaps in the new URLs of *the same formats*: every other
decision of the plan (codecs, caps, part URLs presigned for its size) stays as the converter made it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec

from actors.core.plain import plain_headers, require_http_url
from actors.core.plan import checked_plan
from actors.core.ytdlp_info import playable_formats, range_chunk_of, request_headers, single_entry
from actors.guard.urls import refuse_unfetchable
from messages.errors import ErrorCode, JobError
from messages.types import MAX_RESOLUTIONS, InputVia, MediaInput, MediaPlan

#: a plan whose URLs expire within this many seconds is re-resolved before ffmpeg starts
EXPIRY_MARGIN_S = 15.0
#: query parameters that carry a URL's expiry as unix seconds: YouTube's ``expire``, CloudFront's ``Expires``
EXPIRY_PARAMETERS = ("expire", "Expires")
#: latest expiry believed (a URL saying year 3000 is treated as saying nothing)
MAX_EXPIRY = timedelta(days=30)


def url_expiry(url: str, *, now: datetime) -> datetime | None:
    """When ``url`` stops working, where it says so in its query (``expire=`` / ``Expires=`` unix seconds,
    or a presigned S3 URL's ``X-Amz-Date`` + ``X-Amz-Expires``); None when it does not, or says nonsense."""
    try:
        query = dict(parse_qsl(urlsplit(url).query))
    except ValueError:
        return None
    found: datetime | None = None
    for name in EXPIRY_PARAMETERS:
        value = query.get(name, "")
        if _unix_digits(value) and len(value) <= 12:
            try:
                found = datetime.fromtimestamp(int(value), UTC)
            except (OverflowError, OSError, ValueError):  # past year 9999: nonsense, says nothing
                return None
            break
    if found is None and _unix_digits(query.get("X-Amz-Expires", "")):
        try:
            signed = datetime.strptime(query.get("X-Amz-Date", ""), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            return None
        try:
            found = signed + timedelta(seconds=min(int(query["X-Amz-Expires"]), 7 * 24 * 3600))
        except OverflowError:  # signed in year 9999: nonsense, says nothing
            return None
    if found is None or found > now + MAX_EXPIRY:
        return None
    return found


def _unix_digits(value: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also says yes to ``²`` and ``١``, which ``int`` then refuses or reads."""
    return value.isascii() and value.isdigit()


def earliest_expiry(urls: Iterable[str], *, now: datetime) -> datetime | None:
    """The first moment any of ``urls`` expires, or None when none says."""
    expiries = [e for e in (url_expiry(u, now=now) for u in urls) if e is not None]
    return min(expiries) if expiries else None


def stamp_resolution(plan: MediaPlan, *, now: datetime) -> MediaPlan:
    """``plan`` with ``resolved_at`` = now and ``expires_at`` = the earliest expiry its fetched URLs state."""
    fetched = [i.url for i in plan.inputs if i.via is InputVia.FFMPEG]
    expires = earliest_expiry(fetched, now=now)
    return msgspec.structs.replace(plan, resolved_at=now.isoformat(),
                                   expires_at=expires.isoformat() if expires else "")


def plan_expired(plan: MediaPlan, *, now: datetime, margin: float = EXPIRY_MARGIN_S) -> bool:
    """Whether the plan's URLs expire (or did) within ``margin`` seconds of ``now`` and can be re-resolved."""
    if not plan.expires_at or plan.source_url is None or plan.resolutions >= MAX_RESOLUTIONS:
        return False
    return datetime.fromisoformat(plan.expires_at) <= now + timedelta(seconds=margin)


def may_reresolve(plan: MediaPlan) -> bool:
    """Whether the plan can be resolved once more (it names its page and has resolutions left)."""
    return plan.source_url is not None and plan.resolutions < MAX_RESOLUTIONS


def refreshed_plan(plan: MediaPlan, info: Mapping[str, Any], *, now: datetime) -> MediaPlan:
    """``plan`` with each input ffmpeg fetches pointed at the fresh URL (and headers, Range size) of the
    same yt-dlp format in ``info``, stamped and counted as one more resolution.

    Raises ``source_refused`` when a format of the plan is no longer offered, ``url_not_allowed``
    for a non-http(s) URL.
    """
    refuse_unfetchable(info)
    entry = single_entry(info, allow_playlist=True)
    by_id = {str(f.get("format_id")): f for f in playable_formats(entry) if f.get("format_id") is not None}
    inputs: list[MediaInput] = []
    for media_input in plan.inputs:
        if media_input.via is InputVia.YTDLP_PIPE:  # the feeder resolves the page itself when it runs
            inputs.append(media_input)
            continue
        fmt = by_id.get(media_input.format_id)
        if fmt is None:
            raise JobError(ErrorCode.SOURCE_REFUSED,
                           f"format {media_input.format_id or '(unnamed)'!r} is no longer offered by the page")
        url = require_http_url(str(fmt.get("url") or ""), what="input URL")
        inputs.append(msgspec.structs.replace(media_input, url=url, headers=plain_headers(request_headers(fmt)),
                                              range_chunk=range_chunk_of(fmt)))
    fresh = msgspec.structs.replace(plan, inputs=inputs, resolutions=plan.resolutions + 1)
    return checked_plan(stamp_resolution(fresh, now=now))


#: fields a re-resolution changes, of the plan and of each input; everything else must stay as planned
_FRESH_PLAN_FIELDS = frozenset({"inputs", "resolved_at", "expires_at", "resolutions"})
_FRESH_INPUT_FIELDS = frozenset({"url", "headers", "range_chunk"})


def refresh_problem(old: MediaPlan, new: MediaPlan) -> str:
    """Why ``new`` is not ``old`` re-resolved (empty when it is): only input URLs, headers and Range sizes,
    and the resolution stamps may differ, and the count of resolutions must grow."""
    if new.resolutions <= old.resolutions:
        return "the plan was not re-resolved"
    if len(new.inputs) != len(old.inputs):
        return "the plan's inputs changed"
    before, after = msgspec.structs.asdict(old), msgspec.structs.asdict(new)
    if any(before[name] != after[name] for name in before if name not in _FRESH_PLAN_FIELDS):
        return "the plan changed beyond its input URLs"
    for was, now in zip(old.inputs, new.inputs, strict=True):
        was_fields, now_fields = msgspec.structs.asdict(was), msgspec.structs.asdict(now)
        if any(was_fields[name] != now_fields[name] for name in was_fields if name not in _FRESH_INPUT_FIELDS):
            return "an input changed beyond its URL"
    return ""
