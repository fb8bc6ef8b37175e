"""The upload arithmetic the coordinator (which presigns) and the uploader (which PUTs) share. Pure.

Both processes must agree on it without talking: the coordinator presigns a single PUT only for an
output that always fits the uploader's single-PUT buffer, and enough part URLs of one size for the
plan's size cap; the uploader fills exactly those buffers and parts.
"""

from __future__ import annotations

import base64
import math

from messages.types import MAX_PART_URLS

MiB = 1024 * 1024
#: S3's smallest part except the last one.
MIN_PART_SIZE = 5 * MiB
#: S3's most parts per multipart upload.
MAX_PARTS = 10_000
#: Bytes asked of the source per read: big reads keep the Python cost per byte negligible.
READ_CHUNK = 1 * MiB
#: Bytes buffered for a single PUT when the target carries no multipart upload.
SINGLE_BUFFER = 8 * MiB
#: Outputs capped (ffmpeg -fs) at most this many bytes always fit the uploader's single-PUT buffer,
#: so they get no multipart upload (a create + abort of nothing costs each small job three requests);
#: one read chunk of margin covers ffmpeg finishing its last packet past -fs.
SINGLE_PUT_MAX_BYTES = SINGLE_BUFFER - READ_CHUNK


def plan_parts(max_bytes: int, *, part_size: int, max_urls: int = MAX_PART_URLS) -> tuple[int, int]:
    """The part size and part count that cover ``max_bytes`` with at most ``max_urls`` part URLs.

    The part size is at least 5 MiB and grows (rounded up to a MiB) when ``max_urls`` parts of the
    wished size would not reach ``max_bytes``; the count never exceeds 10,000.
    """
    if max_bytes < 0 or max_urls < 1:
        raise ValueError("max_bytes must be ≥ 0 and max_urls ≥ 1")
    max_urls = min(max_urls, MAX_PARTS)
    size = max(part_size, MIN_PART_SIZE)
    count = max(1, math.ceil(max_bytes / size))
    if count > max_urls:
        size = math.ceil(math.ceil(max_bytes / max_urls) / MiB) * MiB
        count = max(1, math.ceil(max_bytes / size))
    return size, count


def content_md5(digest: bytes) -> str:
    """The Content-MD5 header value of a body with this md5 digest."""
    return base64.b64encode(digest).decode("ascii")
