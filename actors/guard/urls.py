"""The pre-flight check of a user's URL: scheme, credentials and literal hosts, no I/O.

It turns the obvious cases away before yt-dlp starts; the proxy in ``actors.guard.proxy`` is the
real enforcement, because only it sees the addresses that names resolve to, hop by hop.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import yarl

from actors.guard.addresses import (
    IPNetwork,
    denial_reason,
    parse_host_literal,
    parse_networks,
)
from messages.errors import ErrorCode, JobError
from messages.types import HTTP_SCHEMES

#: characters that different URL parsers split differently: refused rather than guessed at
AMBIGUOUS_CHARACTERS = frozenset("\\ \t\r\n\x00")


#: what a caller is told when the guard refuses an address: never which address or why (that
#: would make the guard an oracle for internal names); the log keeps the detail
SAFE_REFUSAL = "the URL, or one it leads to, points at an address that is not allowed"


def check_url(url: str, *, allow: Iterable[str | IPNetwork] = (), deny: Iterable[str | IPNetwork] = ()) -> None:
    """Raise ``JobError(UNSUPPORTED_URL)`` unless ``url`` is http(s), ``JobError(URL_NOT_ALLOWED)`` for
    credentials or a forbidden literal host."""
    networks = parse_networks(allow)
    denied = parse_networks(deny)
    if any(ch in AMBIGUOUS_CHARACTERS or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise JobError(
            ErrorCode.URL_NOT_ALLOWED, "the URL contains whitespace, control characters or backslashes"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise JobError(ErrorCode.URL_NOT_ALLOWED, f"the URL cannot be parsed: {exc}") from None
    if parts.scheme.lower() not in HTTP_SCHEMES:  # the request gate's code (planning.validate_request)
        raise JobError(
            ErrorCode.UNSUPPORTED_URL, f"scheme {parts.scheme!r} is not supported; use http or https"
        )
    if parts.username is not None or parts.password is not None:
        raise JobError(ErrorCode.URL_NOT_ALLOWED, "credentials in the URL are not allowed")
    host = parts.hostname
    if not host:
        raise JobError(ErrorCode.URL_NOT_ALLOWED, "the URL has no host")
    if port == 0:
        raise JobError(ErrorCode.URL_NOT_ALLOWED, "port 0 is not allowed")
    # "127.0.0.1." names the same host to most resolvers; judge it as the literal
    # and judged as the client will spell it: ``１２７.０.０.２`` or ``127.0.0.²`` normalise to 127.0.0.2
    for spelling in {host, connect_host(url)}:
        literal = parse_host_literal(spelling.removesuffix("."))
        if literal is not None and denial_reason(literal, allow=networks, deny=denied) is not None:
            raise JobError(ErrorCode.URL_NOT_ALLOWED, SAFE_REFUSAL)


def connect_host(url: str) -> str:
    """The host aiohttp will connect to for ``url`` ("" when it has none or cannot be read).

    Not urllib's ``hostname``: yarl normalises a host (IDNA, NFKC), so ``１２７.０.０.２``, ``127。0。0。2``
    or ``127.0.0.²`` reach aiohttp as the literal ``127.0.0.2`` — which aiohttp connects to without
    asking the vetting resolver. The guard decides on this spelling, the one that is used.
    """
    try:
        return yarl.URL(url).raw_host or ""
    except (ValueError, UnicodeError):
        return ""


#: the keys of a yt-dlp format (or info dict) that name something a downloader fetches
FORMAT_URL_KEYS = ("url", "manifest_url", "fragment_base_url")


def format_urls(fmt: Mapping[str, Any]) -> list[str]:
    """Every URL a downloader may fetch for one yt-dlp format: its url, manifest, fragment base and fragments."""
    urls = [str(fmt[key]) for key in FORMAT_URL_KEYS if fmt.get(key)]
    for fragment in fmt.get("fragments") or ():
        if isinstance(fragment, Mapping):
            if fragment.get("url"):
                urls.append(str(fragment["url"]))
            path = str(fragment.get("path") or "")
            if urllib.parse.urlsplit(path).scheme:  # an absolute path replaces the fragment base
                urls.append(path)
    return urls


#: a URL written inside another one (``…/httpproxy://10.0.0.5/…``)
_EMBEDDED_URL = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]*)://")


def fetchable(fmt: Mapping[str, Any]) -> bool:
    """True when every URL of ``fmt`` is http(s) and embeds no URL of another scheme.

    The second half: yt-dlp's MPD parser prefixes a BaseURL that is not http(s) with the manifest's
    own base, so ``httpproxy://10.0.0.5/`` arrives as a path; what the page meant is refused."""
    for url in format_urls(fmt):
        if urllib.parse.urlsplit(url).scheme.lower() not in HTTP_SCHEMES:
            return False
        inner = url.split("://", 1)[1]
        if any(scheme.lower() not in HTTP_SCHEMES for scheme in _EMBEDDED_URL.findall(inner)):
            return False
    return True


def refuse_unfetchable(info: Mapping[str, Any]) -> None:
    """Raise ``url_not_allowed`` when any format of yt-dlp's info (entries included) names a URL
    whose scheme is not http(s): a source offering ``tcp://`` or ``httpproxy://`` media is hostile."""
    candidates: list[Mapping[str, Any]] = [{key: info[key] for key in FORMAT_URL_KEYS if key in info}]
    for key in ("formats", "requested_formats"):
        candidates += [f for f in info.get(key) or () if isinstance(f, Mapping)]
    if not all(fetchable(f) for f in candidates):
        raise JobError(ErrorCode.URL_NOT_ALLOWED, "the source names media URLs of schemes other than http(s)")
    for entry in info.get("entries") or ():
        if isinstance(entry, Mapping):
            refuse_unfetchable(entry)
