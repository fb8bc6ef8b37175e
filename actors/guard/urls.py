"""The pre-flight check of a user's URL: scheme, credentials and literal hosts, no I/O.

It turns the obvious cases away before yt-dlp starts; the proxy in ``actors.guard.proxy`` is the
real enforcement, because only it sees the addresses that names resolve to, hop by hop.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable

from actors.guard.addresses import (
    IPNetwork,
    address_allowed,
    block_reason,
    parse_host_literal,
    parse_networks,
)
from messages.errors import ErrorCode, JobError

#: the only schemes a user's URL may use (ftp, file, data, rtmp … are refused)
ALLOWED_SCHEMES = frozenset({"http", "https"})
#: characters that different URL parsers split differently: refused rather than guessed at
AMBIGUOUS_CHARACTERS = frozenset("\\ \t\r\n\x00")


def check_url(url: str, *, allow: Iterable[str | IPNetwork] = ()) -> None:
    """Raise ``JobError(URL_NOT_ALLOWED)`` unless ``url`` is http(s), has no credentials and no forbidden literal host."""
    networks = parse_networks(allow)
    if any(ch in AMBIGUOUS_CHARACTERS or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise JobError(
            ErrorCode.URL_NOT_ALLOWED, "the URL contains whitespace, control characters or backslashes"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise JobError(ErrorCode.URL_NOT_ALLOWED, f"the URL cannot be parsed: {exc}") from None
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise JobError(
            ErrorCode.URL_NOT_ALLOWED, f"scheme {parts.scheme!r} is not allowed; use http or https"
        )
    if parts.username is not None or parts.password is not None:
        raise JobError(ErrorCode.URL_NOT_ALLOWED, "credentials in the URL are not allowed")
    host = parts.hostname
    if not host:
        raise JobError(ErrorCode.URL_NOT_ALLOWED, "the URL has no host")
    if port == 0:
        raise JobError(ErrorCode.URL_NOT_ALLOWED, "port 0 is not allowed")
    # "127.0.0.1." names the same host to most resolvers; judge it as the literal
    literal = parse_host_literal(host.removesuffix("."))
    if literal is not None and not address_allowed(literal, allow=networks):
        raise JobError(ErrorCode.URL_NOT_ALLOWED, f"host {host} is {literal}: {block_reason(literal)}")
