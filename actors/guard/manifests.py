"""What the guard hands ffmpeg instead of a playlist: every URL in it pointing back through the guard.

ffmpeg's HLS demuxer opens the URLs a playlist names with any protocol whose name begins with
``http`` (``httpproxy://`` is raw TCP to the host it names), and ``tcp`` must stay whitelisted for
http itself. So no playlist reaches ffmpeg as the site wrote it: the guard rewrites every URL ffmpeg
would open (segment lines, variant lines, and the ``URI`` attribute of any tag: keys, maps, media
renditions …) to one of its own, and refuses a playlist naming any scheme but http(s). What ffmpeg
resolves against the rewritten playlist's own URL lands on the guard too. DASH manifests are
refused outright: the converter hands DASH to yt-dlp, never to ffmpeg.

Pure functions; the parsing mirrors ffmpeg 5.1 (``ff_get_line``, ``ff_parse_key_value`` in
libavformat) so that what the guard rewrites is what ffmpeg reads.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from enum import Enum

from messages.types import HTTP_SCHEMES

#: ffmpeg's hls_probe: a playlist starts with exactly this (after any ID3v2 tags, which probing skips)
HLS_MAGIC = b"#EXTM3U"
#: ffmpeg's dash_probe looks for this (any case) before the first NUL of the probe buffer
DASH_MARKER = b"<mpd"
#: ffmpeg's line ends (ff_get_line): LF, CR, CRLF and NUL
_LINE_END = re.compile(r"\r\n|\r|\n|\x00")
#: what ffmpeg's chomp strips from a line's end (av_isspace)
_SPACE = " \t\n\v\f\r"


class BodyKind(Enum):
    """What a response body is to ffmpeg, judged from its first bytes."""

    NEED_MORE = "need_more"
    HLS = "hls"
    DASH = "dash"
    MEDIA = "media"


class ManifestRefused(ValueError):
    """A manifest names something the guard will not fetch (a scheme other than http(s))."""


def sniff_body(prefix: bytes, *, complete: bool) -> BodyKind:
    """HLS, DASH or media, as ffmpeg's probing would see ``prefix``; NEED_MORE until it can tell.

    Over-approximates on purpose: a body that might probe as a playlist is treated as one.
    """
    start = 0
    # ffmpeg's probe (and avformat_open_input) skip leading ID3v2 tags before any demuxer looks
    while prefix[start:start + 3] == b"ID3":
        if len(prefix) < start + 10:
            return BodyKind.MEDIA if complete else BodyKind.NEED_MORE
        size = 10 + _syncsafe(prefix[start + 6:start + 10]) + (10 if prefix[start + 5] & 0x10 else 0)
        start += size
        if len(prefix) <= start and not complete:
            return BodyKind.NEED_MORE
    head = prefix[start:]
    if head.startswith(HLS_MAGIC):
        return BodyKind.HLS
    if len(head) < len(HLS_MAGIC) and HLS_MAGIC.startswith(head) and not complete:
        return BodyKind.NEED_MORE
    nul = head.find(b"\x00")
    text = head if nul < 0 else head[:nul]
    if DASH_MARKER in text.lower():
        return BodyKind.DASH
    if nul < 0 and not complete:
        return BodyKind.NEED_MORE
    return BodyKind.MEDIA


def _syncsafe(data: bytes) -> int:
    value = 0
    for byte in data:
        value = (value << 7) | (byte & 0x7F)
    return value


def rewrite_hls(text: str, *, base_url: str, to_guard: Callable[[str], str]) -> str:
    """``text`` (an HLS playlist fetched from ``base_url``) with every URL ffmpeg opens replaced by
    ``to_guard(absolute_url)``; raises ManifestRefused for a URL whose scheme is not http(s)."""
    out = []
    for raw in _LINE_END.split(text):
        line = raw.rstrip(_SPACE)
        if not line:
            out.append("")
        elif line.startswith("#"):
            out.append(_rewrite_tag(line, base_url=base_url, to_guard=to_guard))
        else:
            out.append(to_guard(absolute_url(line, base_url=base_url)))
    return "\n".join(out) + "\n"


def absolute_url(reference: str, *, base_url: str) -> str:
    """``reference`` resolved against ``base_url``; raises ManifestRefused unless it is http(s)."""
    url = urllib.parse.urljoin(base_url, reference.strip(_SPACE))
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in HTTP_SCHEMES or not urllib.parse.urlsplit(url).hostname:
        raise ManifestRefused(f"a manifest names a {scheme or 'schemeless'} URL; only http(s) is fetched")
    return url


def _rewrite_tag(line: str, *, base_url: str, to_guard: Callable[[str], str]) -> str:
    name, colon, rest = line.partition(":")
    if not colon:
        return line
    attributes = parse_attributes(rest)
    if not any(key == "URI=" for key, _ in attributes):
        return line
    rebuilt = []
    for key, value in attributes:
        if key == "URI=":
            value = to_guard(absolute_url(value, base_url=base_url))
        rebuilt.append(f'{key}"{_quote(value)}"')
    return f"{name}:{','.join(rebuilt)}"


def parse_attributes(text: str) -> list[tuple[str, str]]:
    """An attribute list as ffmpeg's ``ff_parse_key_value`` reads it: ``(key + "=", value)`` pairs."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and (text[i] in _SPACE or text[i] == ","):
            i += 1
        if i >= n:
            return pairs
        eq = text.find("=", i)
        if eq < 0:
            return pairs
        key, i = text[i:eq + 1], eq + 1
        value: list[str] = []
        if i < n and text[i] == '"':
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    if i + 1 >= n:
                        break
                    value.append(text[i + 1])
                    i += 2
                else:
                    value.append(text[i])
                    i += 1
            if i < n and text[i] == '"':
                i += 1
        else:
            while i < n and not (text[i] in _SPACE or text[i] == ","):
                value.append(text[i])
                i += 1
        pairs.append((key, "".join(value)))


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
