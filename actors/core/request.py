"""The one gate a convert request passes (coordinator and converter): quality for the format, clip. Pure."""

from __future__ import annotations

from urllib.parse import urlsplit

from actors.core.catalog import ALLOWED_QUALITIES, DEFAULT_QUALITY
from messages.errors import Error, ErrorCode
from messages.types import (
    HTTP_SCHEMES,
    ConvertRequested,
    Format,
    Quality,
)


def allowed_qualities(fmt: Format) -> tuple[Quality, ...]:
    """The qualities ``fmt`` accepts: bitrates for lossy audio, maximum heights for video, best."""
    return ALLOWED_QUALITIES[fmt]


def default_quality(fmt: Format) -> Quality:
    """The quality used when a request names none."""
    return DEFAULT_QUALITY[fmt]


def resolved_quality(request: ConvertRequested) -> Quality:
    """The request's quality, or the format's default."""
    return request.quality if request.quality is not None else default_quality(request.format)


def validate_request(req: ConvertRequested, *, max_duration: float) -> Error | None:
    """The first problem with ``req`` that needs no network to find, or None.

    URL: no scheme or no host (``example.com/x``, ``http:///x``) is ``invalid_request``; a scheme other
    than http/https (``file://``, ``ftp://``, ``data:``) is ``unsupported_url``. Quality not fitting the
    format and ``end <= start`` are ``invalid_request``; a clip longer than ``max_duration`` is ``too_long``.
    """
    try:
        parts = urlsplit(req.url.strip())
    except ValueError as exc:
        return Error.of(ErrorCode.INVALID_REQUEST, f"url: not a URL ({exc})")
    scheme = parts.scheme.lower()
    if not scheme:
        return Error.of(ErrorCode.INVALID_REQUEST, "url: no scheme; use an http(s) URL")
    if scheme not in HTTP_SCHEMES:
        return Error.of(ErrorCode.UNSUPPORTED_URL, f"url: scheme {scheme!r} is not supported; use http(s)")
    if not parts.hostname:
        return Error.of(ErrorCode.INVALID_REQUEST, "url: no host")
    if req.quality is not None and req.quality not in allowed_qualities(req.format):
        allowed = ", ".join(q.value for q in allowed_qualities(req.format))
        return Error.of(
            ErrorCode.INVALID_REQUEST,
            f"quality: {req.quality.value} does not fit {req.format.value}; allowed: {allowed}",
        )
    start = req.start or 0.0
    if req.end is not None and req.end <= start:
        return Error.of(ErrorCode.INVALID_REQUEST, f"end: {req.end} is not after start {start}")
    if req.end is not None and req.end - start > max_duration:
        return Error.of(
            ErrorCode.TOO_LONG, f"the clip lasts {req.end - start:.0f} s; the limit is {max_duration:.0f} s"
        )
    return None
