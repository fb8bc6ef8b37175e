"""Plain values: what may cross from a user's page into a plan and ffmpeg's argv. Pure.

One http(s) rule (``http_url_problem``, code ``url_not_allowed``), HTTP header names and values
without injected lines, tag text without control characters, yt-dlp format selectors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from messages.errors import ErrorCode, JobError
from messages.types import (
    HTTP_SCHEMES,
    MAX_HEADERS,
)

#: longest text written into a metadata tag
MAX_TAG_CHARS = 1024



CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
FORMAT_SELECTOR = re.compile(r"(?:[A-Za-z0-9_.+/=:][A-Za-z0-9_.+/=:-]*)?")
#: longest header value kept (a site's cookies can be long; ffmpeg and yt-dlp get it as one value)
MAX_HEADER_VALUE_CHARS = 8192


def http_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a plan input (only http(s) with a host, no whitespace or control
    characters: no file:, pipe:, concat:, subfile:, data: or bare paths), or None when it can."""
    if CONTROL_CHARS.search(url) or any(ch in url for ch in " \\"):
        return "the URL contains whitespace, control characters or backslashes"
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"the URL cannot be parsed ({exc})"
    if parts.scheme.lower() not in HTTP_SCHEMES:
        return f"scheme {parts.scheme or '(none)'!r} is not allowed; plan inputs are http(s) only"
    if not parts.hostname:
        return "the URL has no host"
    return None


def require_http_url(url: str, *, what: str) -> str:
    """``url`` when it may be a plan input; raises ``JobError(URL_NOT_ALLOWED)`` naming ``what`` otherwise."""
    problem = http_url_problem(url)
    if problem is not None:
        raise JobError(ErrorCode.URL_NOT_ALLOWED, f"{what}: {problem}")
    return url


def plain_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a plan may carry: names that are HTTP tokens, values without control characters
    (CR/LF would inject headers), at most ``MAX_HEADERS`` of them; the rest are dropped."""
    clean: dict[str, str] = {}
    for name, value in headers.items():
        if len(clean) == MAX_HEADERS or not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            continue
        text = CONTROL_CHARS.sub("", str(value).replace("\t", " "))[:MAX_HEADER_VALUE_CHARS]
        clean[name] = text
    return clean


def header_block(headers: Mapping[str, str]) -> str:
    """HTTP headers as ffmpeg's ``-headers`` value (``plain_headers`` applied: no injected lines)."""
    return "".join(f"{name}: {value}\r\n" for name, value in plain_headers(headers).items())


def plain_tag(text: str) -> str:
    """A tag value as plain text: control characters become spaces, trimmed, at most MAX_TAG_CHARS."""
    return CONTROL_CHARS.sub(" ", text).strip()[:MAX_TAG_CHARS].strip()
