"""Ranged fetching for throttled origins: successive Range requests upstream, one body downstream.

Some origins serve a long single request slowly and a short one at full speed (YouTube throttles
requests beyond about 10 MB; yt-dlp's extractor says so with the format's
``downloader_options.http_chunk_size``, and its http downloader then asks ``Range: bytes=a-b`` one
chunk after another — yt_dlp/downloader/http.py). The plan carries that size per input
(``MediaInput.range_chunk``); the uploader writes it into the input's gateway URL
(``ranged_url``), and the guard's gateway fetches the body chunk by chunk, each request vetted
and redirected like any other, and streams the chunks to ffmpeg as one response, so ffmpeg needs
to know nothing about it.

Rules, as yt-dlp's downloader has them: each chunk must come back 206 with a Content-Range that
starts where it was asked and ends within it, of the same total; a chunk that ends early (a short
read) is resumed from its last byte; a server that answers the first chunk with 200 ignores Range,
and its whole body is relayed as it is. Anything else ends the body early: ffmpeg sees a short read.
The job's byte budget counts every chunk; the job's deadline bounds the whole exchange.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import aiohttp

from messages.types import MAX_RANGE_CHUNK, MIN_RANGE_CHUNK

log = logging.getLogger(__name__)

#: query parameter of a gateway URL that asks for ranged fetching, in bytes per request
RANGE_CHUNK_PARAM = "range_chunk"
#: bytes read from an upstream chunk per step
READ_STEP = 1024 * 1024
#: short reads in a row (a chunk that ended before its Content-Range without a byte of progress) before giving up
MAX_SHORT_READS = 3

_RANGE = re.compile(r"bytes=(\d{1,18})-(\d{0,18})\Z")
_CONTENT_RANGE = re.compile(r"bytes (\d{1,18})-(\d{1,18})/(\d{1,18}|\*)\Z")


class Span(NamedTuple):
    """The bytes a client asked for: ``first`` to ``last`` inclusive (``last`` None: to the end)."""

    first: int
    last: int | None


class ContentRange(NamedTuple):
    """A 206 answer's ``Content-Range``: first and last byte, and the total (None when ``*``)."""

    first: int
    last: int
    total: int | None


def ranged_url(gateway_url: str, chunk: int) -> str:
    """``gateway_url`` asking the gateway to fetch in Range requests of ``chunk`` bytes (unchanged for 0)."""
    if chunk <= 0:
        return gateway_url
    return f"{gateway_url}?{urllib.parse.urlencode({RANGE_CHUNK_PARAM: chunk})}"


def range_chunk_in(path: str) -> int:
    """The Range size a gateway request path asks for, within MIN_RANGE_CHUNK..MAX_RANGE_CHUNK; 0 for none."""
    query = urllib.parse.urlsplit(path).query
    value = urllib.parse.parse_qs(query).get(RANGE_CHUNK_PARAM, [""])[0]
    if not value.isascii() or not value.isdigit() or len(value) > 12 or int(value) <= 0:
        return 0
    return max(MIN_RANGE_CHUNK, min(MAX_RANGE_CHUNK, int(value)))


def parse_range(value: str | None) -> Span | None:
    """A client's single ``Range: bytes=a-`` / ``bytes=a-b`` (none: the whole body from 0); None for any
    other form (suffix or multiple ranges), which the gateway passes through unranged."""
    if value is None:
        return Span(0, None)
    match = _RANGE.fullmatch(value.strip())
    if match is None:
        return None
    first, last = int(match[1]), int(match[2]) if match[2] else None
    if last is not None and last < first:
        return None
    return Span(first, last)


def parse_content_range(value: str | None) -> ContentRange | None:
    """``bytes a-b/total`` (or ``/*``) as numbers; None when absent or malformed."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        return None
    first, last = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if last < first or (total is not None and last >= total):
        return None
    return ContentRange(first, last, total)


def chunk_range(position: int, *, chunk: int, span: Span, total: int | None) -> str:
    """The ``Range`` value of the next request: ``chunk`` bytes from ``position``, within the span and the total."""
    last = position + chunk - 1
    if span.last is not None:
        last = min(last, span.last)
    if total is not None:
        last = min(last, total - 1)
    return f"bytes={position}-{last}"


def chunk_problem(answer: ContentRange | None, *, position: int, asked_last: int, total: int | None) -> str:
    """Why a 206 chunk cannot continue the body (empty when it can): its Content-Range must start at
    ``position``, end within what was asked, and keep the total of the first chunk."""
    if answer is None:
        return "a 206 answer without a valid Content-Range"
    if answer.first != position:
        return f"the chunk starts at byte {answer.first}, not {position}"
    if answer.last > asked_last:
        return f"the chunk ends at byte {answer.last}, beyond the {asked_last} asked"
    if total is not None and answer.total is not None and answer.total != total:
        return f"the total changed from {total} to {answer.total} bytes"
    return ""


def downstream_head(*, span: Span, asked: bool, total: int | None, content_type: str | None) -> bytes:
    """The response head ffmpeg gets for a ranged body: 206 with Content-Range when it asked a range, else 200."""
    last = span.last if span.last is not None else (total - 1 if total is not None else None)
    if total is not None and last is not None:
        last = min(last, total - 1)
    lines = [f"HTTP/1.1 {'206 Partial Content' if asked else '200 OK'}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if last is not None:
        lines.append(f"Content-Length: {last - span.first + 1}")
    if asked:
        lines.append(f"Content-Range: bytes {span.first}-{last if last is not None else ''}/{total or '*'}")
    lines += ["Accept-Ranges: bytes", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1", "replace")


OpenRange = Callable[[str], Awaitable[aiohttp.ClientResponse]]


class RangedRelay:
    """Streams one body to ``writer`` from successive Range requests of ``chunk`` bytes.

    ``open_range(range_value)`` makes one vetted upstream request (the guard's fetch) and returns
    its response; ``passthrough(response, prefix)`` relays a response as it is (a server that ignored
    Range, or an error status); ``spend(count)`` counts bytes against the job's media budget (False
    once it is spent) and ``over_budget()`` records the budget that ended the body.
    """

    def __init__(self, *, open_range: OpenRange, chunk: int, writer: asyncio.StreamWriter, idle: float,
                 spend: Callable[[int], bool], passthrough: Callable[[aiohttp.ClientResponse, bytes], Awaitable[None]],
                 over_budget: Callable[[], None]) -> None:
        self._open = open_range
        self._chunk = chunk
        self._writer = writer
        self._idle = idle
        self._spend = spend
        self._passthrough = passthrough
        self._over_budget = over_budget
        #: upstream requests made for this body (the first one included)
        self.requests = 1

    async def serve(self, first: aiohttp.ClientResponse, prefix: bytes, *, span: Span, asked: bool) -> None:
        """Relay ``first`` (the answer to the first chunk, ``prefix`` already read from it) and the chunks after it."""
        if first.status != 206:  # 200: the server ignores Range; anything else: its answer, as it is
            await self._passthrough(first, prefix)
            return
        answer = parse_content_range(first.headers.get("Content-Range"))
        asked_last = _asked_last(span, span.first, self._chunk, None)
        problem = chunk_problem(answer, position=span.first, asked_last=asked_last, total=None)
        if problem or answer is None:
            log.info("gateway: ranged fetch refused: %s", problem)
            await self._passthrough(first, prefix)  # not what was asked: ffmpeg judges the answer itself
            return
        total = answer.total
        self._writer.write(downstream_head(span=span, asked=asked, total=total,
                                           content_type=first.headers.get("Content-Type")))
        position = await self._body(first, prefix, answer)
        if position is None:
            return
        short_reads = 0 if position > answer.last else 1
        while not _done(position, span=span, total=total, answer_last=answer.last, asked_last=asked_last):
            if short_reads >= MAX_SHORT_READS:
                log.info("gateway: ranged fetch gave up after %d short reads at byte %d", short_reads, position)
                return
            value = chunk_range(position, chunk=self._chunk, span=span, total=total)
            asked_last = int(value.rpartition("-")[2])
            self.requests += 1
            response = await self._open(value)
            async with response:
                answer_or_none = parse_content_range(response.headers.get("Content-Range"))
                problem = ("" if response.status == 206 else f"HTTP {response.status} for a later chunk") or \
                    chunk_problem(answer_or_none, position=position, asked_last=asked_last, total=total)
                if problem or answer_or_none is None:
                    log.info("gateway: ranged fetch ended early at byte %d: %s", position, problem)
                    return
                answer = answer_or_none
                total = total if total is not None else answer.total
                reached = await self._body(response, b"", answer)
            if reached is None:
                return
            short_reads = short_reads + 1 if reached == position else 0
            position = reached

    async def _body(self, response: aiohttp.ClientResponse, prefix: bytes, answer: ContentRange) -> int | None:
        """Relay one chunk's body; the next byte position (short reads stop early), None when the body must end."""
        position = answer.first
        data = prefix
        while True:
            if data:
                data = data[: answer.last + 1 - position]  # never more than the chunk promised
                if not self._spend(len(data)):
                    self._over_budget()
                    return None
                self._writer.write(data)
                async with asyncio.timeout(self._idle):
                    await self._writer.drain()
                position += len(data)
                if position > answer.last:
                    return position
            try:
                data = await response.content.read(READ_STEP)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # cut off: the next request resumes
                log.info("gateway: a chunk was cut off at byte %d: %r", position, exc)
                return position
            if not data:
                return position


def _asked_last(span: Span, position: int, chunk: int, total: int | None) -> int:
    return int(chunk_range(position, chunk=chunk, span=span, total=total).rpartition("-")[2])


def _done(position: int, *, span: Span, total: int | None, answer_last: int, asked_last: int) -> bool:
    """Whether the body is complete at ``position``: past the span's end, the total, or (total unknown)
    a chunk that came back shorter than asked."""
    if span.last is not None and position > span.last:
        return True
    if total is not None:
        return position >= total
    return position > answer_last and answer_last < asked_last
