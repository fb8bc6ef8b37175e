"""The uploader's data path: a byte stream (ffmpeg's stdout) straight into presigned S3 uploads.

No temporary file and bounded memory: the stream is cut into fixed-size parts held in at most
``parts_in_flight + 1`` reusable buffers; while every buffer is busy the reader stops reading, so
ffmpeg blocks on its pipe. It plays by real-S3 rules: every PUT carries its exact Content-Length and
a Content-MD5, parts are equal but the last, a single PUT is used only when the whole output fits
the first buffer, and chunked transfer encoding is an explicit mode for endpoints that accept it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential
from yarl import URL

from actors.core.parts import READ_CHUNK, SINGLE_BUFFER, content_md5
from messages.errors import ErrorCode, JobError
from messages.types import PartETag, UploadMode, UploadTarget
from storage.keys import multipart_etag, strip_etag

log = logging.getLogger(__name__)

#: Bytes handed to the socket per write, so the transport never copies a whole part.
WRITE_SLICE = 256 * 1024
#: Timeouts of one PUT: connecting must be quick; a part must keep moving, however long it takes.
PUT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
#: Seconds the best-effort abort of a multipart upload may take while cleaning up.
ABORT_TIMEOUT = 10.0
#: What to tell someone whose endpoint refused a chunked PUT.
CHUNKED_HINT = ("the endpoint refuses chunked uploads (S3, R2 and MinIO do): use upload mode auto, "
                "which sends parts with a Content-Length")

_S3_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")

Mode = Literal["single", "multipart", "chunked"]


# ------------------------------------------------------------------------------------ pure core


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a PUT is retried after a network error or a 5xx: attempts, exponential backoff with jitter."""

    attempts: int = 4
    #: scale of the backoff in seconds: waits are random in [0, first_wait × 2^n], capped at max_wait
    first_wait: float = 0.25
    max_wait: float = 5.0


#: The retry policy of part and single PUTs.
DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True, kw_only=True)
class StreamResult:
    """What was stored: the uploader reports it in ``Streamed`` and the verifier checks it."""

    mode: Mode
    size: int
    sha256: str
    #: the ETag storage should report: md5 hex for a single PUT, md5-of-md5s "-N" for multipart
    etag: str
    parts: list[PartETag] = field(default_factory=list)
    upload_id: str = ""
    #: most bytes ever read from the source but not yet acknowledged by storage
    peak_buffered: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------- imperative shell


async def stream_to_target(
    source: asyncio.StreamReader,
    target: UploadTarget,
    *,
    session: aiohttp.ClientSession,
    parts_in_flight: int = 2,
    on_stored: Callable[[int], None] | None = None,
    max_bytes: int,
    source_done: Callable[[], Awaitable[None]] | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    keep_upload: Callable[[BaseException], bool] | None = None,
) -> StreamResult:
    """Stream ``source`` to ``target`` until EOF; what was stored, or a coded JobError.

    ``source_done`` is awaited at EOF before the upload is committed (before the single PUT, the
    chunked body's end, or the last part is acknowledged): raise there (e.g. ``FfmpegProcess.check``)
    to refuse a truncated output. ``on_stored`` gets the bytes acknowledged so far. On failure or
    cancellation the PUTs in flight are cancelled and the multipart upload is aborted — unless
    ``keep_upload(error)`` says a retry of the same command will reuse it.
    """
    upload = _Upload(
        source,
        target,
        session=session,
        parts_in_flight=max(1, parts_in_flight),
        on_stored=on_stored,
        max_bytes=max_bytes,
        source_done=source_done,
        retry=retry,
    )
    started = time.monotonic()
    try:
        if target.mode == UploadMode.CHUNKED:
            result = await upload.chunked()
        else:
            result = await upload.auto()
    except BaseException as exc:
        error: BaseException = exc
        if isinstance(exc, BaseExceptionGroup):
            error = _first_error(exc)
        elif isinstance(exc, aiohttp.ClientError | TimeoutError):
            error = JobError(ErrorCode.STORAGE_UNAVAILABLE, f"storage: {exc!r}")
        if keep_upload is None or not keep_upload(error):
            await upload.abort_multipart()
        if error is exc:
            raise
        raise error from exc
    if result.mode != "multipart":
        await upload.abort_multipart()  # the upload prepared for a longer output stays unused
    return dataclasses.replace(result, seconds=time.monotonic() - started)


class _BufferPool:
    """At most ``capacity`` part buffers, made on first need and reused; ``take`` waits when all are busy."""

    def __init__(self, *, capacity: int, size: int) -> None:
        self._size = size
        self._free: list[bytearray] = []
        self._available = asyncio.Semaphore(capacity)

    async def take(self) -> bytearray:
        """A free buffer; waits (and so stops the reading) while every buffer is busy."""
        await self._available.acquire()
        return self._free.pop() if self._free else bytearray(self._size)

    def give(self, buffer: bytearray) -> None:
        """Return a buffer once its part is stored (or abandoned)."""
        self._free.append(buffer)
        self._available.release()


class _ViewPayload(Payload):
    """A body from memory, written in slices so the socket transport never copies a whole part."""

    def __init__(self, view: memoryview) -> None:
        super().__init__(view, content_type=None)
        self._size = view.nbytes

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """Not meaningful for binary media; here because aiohttp's Payload demands it."""
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        """Write the body slice by slice, draining between slices."""
        view: memoryview = self._value
        for start in range(0, view.nbytes, WRITE_SLICE):
            await writer.write(view[start:start + WRITE_SLICE])

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        """Write at most ``content_length`` bytes of the body."""
        view: memoryview = self._value
        if content_length is not None:
            view = view[:content_length]
        for start in range(0, view.nbytes, WRITE_SLICE):
            await writer.write(view[start:start + WRITE_SLICE])


class _Transient(Exception):
    """A PUT failure worth retrying from memory: a network error, a timeout or a 5xx."""


class _Upload:
    """One stream's upload: counters and hashes, the part buffers, the PUTs."""

    def __init__(
        self,
        source: asyncio.StreamReader,
        target: UploadTarget,
        *,
        session: aiohttp.ClientSession,
        parts_in_flight: int,
        on_stored: Callable[[int], None] | None,
        max_bytes: int,
        source_done: Callable[[], Awaitable[None]] | None,
        retry: RetryPolicy,
    ) -> None:
        self.source = source
        self.target = target
        self.session = session
        self.parts_in_flight = parts_in_flight
        self.on_stored = on_stored
        self.max_bytes = max_bytes
        self.source_done = source_done
        self.retry = retry
        self.size = 0
        self.stored = 0
        self.peak_buffered = 0
        self.sha256 = hashlib.sha256()
        self.parts: dict[int, tuple[PartETag, bytes]] = {}
        self.committed_multipart = False
        self.aborted = False
        #: part PUTs in flight; the buffer pool (one more than this) bounds what is read ahead
        self.in_flight = asyncio.Semaphore(parts_in_flight)

    # -- reading

    def _account(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size >= self.max_bytes:  # ffmpeg -fs truncates silently: reaching the cap is failing
            raise JobError(ErrorCode.TOO_LARGE, f"output reached the {self.max_bytes}-byte limit")
        self.sha256.update(chunk)
        self.peak_buffered = max(self.peak_buffered, self.size - self.stored)

    async def _read(self, limit: int) -> bytes:
        chunk = await self.source.read(limit)
        if chunk:
            self._account(chunk)
        return chunk

    async def _fill(self, buffer: bytearray, start: int) -> tuple[int, bool]:
        """Fill ``buffer`` from offset ``start``; (bytes in it, whether the source ended)."""
        filled, capacity = start, len(buffer)
        with memoryview(buffer) as view:
            while filled < capacity:
                chunk = await self._read(min(READ_CHUNK, capacity - filled))
                if not chunk:
                    return filled, True
                view[filled:filled + len(chunk)] = chunk
                filled += len(chunk)
        return filled, False

    def _stored(self, count: int) -> None:
        self.stored += count
        if self.on_stored is not None:
            self.on_stored(self.stored)

    async def _source_done(self) -> None:
        if self.source_done is not None:
            await self.source_done()

    # -- mode auto

    async def auto(self) -> StreamResult:
        """One PUT when the output fits the first buffer, else a multipart upload."""
        multipart = self.target.multipart
        part_size = multipart.part_size if multipart else SINGLE_BUFFER
        pool = _BufferPool(capacity=self.parts_in_flight + 1, size=part_size)
        first = await pool.take()
        filled, ended = await self._fill(first, 0)
        peek = b""
        if not ended:  # a full first buffer: one more read tells whether the output ends exactly here
            peek = await self._read(min(READ_CHUNK, part_size))
            ended = not peek
        if ended:
            await self._source_done()
            return await self._single(first, filled)
        if multipart is None:
            raise JobError(ErrorCode.UPLOAD_FAILED, "the output outgrew the single-PUT buffer and the "
                           "target carries no multipart upload", retryable=False)
        async with asyncio.TaskGroup() as parts:
            parts.create_task(self._part(1, first, filled, pool))
            number, carry = 1, peek
            while True:
                buffer = await pool.take()  # backpressure: waits while parts_in_flight parts are in flight
                buffer[:len(carry)] = carry
                filled, ended = await self._fill(buffer, len(carry))
                carry = b""
                if filled == 0:
                    pool.give(buffer)
                    break
                number += 1
                if number > len(multipart.part_urls):
                    raise JobError(ErrorCode.TOO_LARGE, f"the output needs more than the "
                                   f"{len(multipart.part_urls)} parts of {part_size} bytes prepared for it")
                parts.create_task(self._part(number, buffer, filled, pool))
                if ended:
                    break
            await self._source_done()  # overlaps the last PUTs; a failure here cancels them
        ordered = [self.parts[n] for n in sorted(self.parts)]
        self.committed_multipart = True
        return StreamResult(
            mode="multipart",
            size=self.size,
            sha256=self.sha256.hexdigest(),
            etag=multipart_etag(md5.hex() for _, md5 in ordered),
            parts=[part for part, _ in ordered],
            upload_id=multipart.upload_id,
            peak_buffered=self.peak_buffered,
        )

    async def _single(self, buffer: bytearray, filled: int) -> StreamResult:
        with memoryview(buffer) as whole, whole[:filled] as body:
            md5 = await asyncio.to_thread(_md5, body)
            etag = await self._put(self.target.put_url, body, md5=md5,
                                   content_type=self.target.content_type, what="single PUT")
        _check_etag(etag, md5.hex(), what="single PUT")
        self._stored(filled)
        return StreamResult(mode="single", size=self.size, sha256=self.sha256.hexdigest(), etag=md5.hex(),
                            peak_buffered=self.peak_buffered)

    async def _part(self, number: int, buffer: bytearray, filled: int, pool: _BufferPool) -> None:
        assert self.target.multipart is not None
        try:
            with memoryview(buffer) as whole, whole[:filled] as body:
                md5 = await asyncio.to_thread(_md5, body)  # md5 runs beside the reader's sha256
                async with self.in_flight:
                    etag = await self._put(self.target.multipart.part_urls[number - 1], body, md5=md5,
                                           content_type=None, what=f"part {number}")
        finally:
            pool.give(buffer)
        _check_etag(etag, md5.hex(), what=f"part {number}")
        self.parts[number] = (PartETag(number=number, etag=etag, size=filled), md5)
        self._stored(filled)

    # -- PUTs

    async def _put(self, url: str, body: memoryview, *, md5: bytes, content_type: str | None,
                   what: str) -> str:
        """PUT ``body`` with Content-Length and Content-MD5, retried from memory; its ETag."""
        headers = {"Content-Length": str(body.nbytes), "Content-MD5": content_md5(md5)}
        if content_type is not None:
            headers["Content-Type"] = content_type  # signed into the URL: must be sent exactly
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait_random_exponential(multiplier=self.retry.first_wait, max=self.retry.max_wait),
            retry=retry_if_exception_type(_Transient),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._put_once(url, body, headers=headers, what=what)
        except _Transient as exc:
            raise JobError(ErrorCode.STORAGE_UNAVAILABLE,
                           f"{what}: {exc} (after {self.retry.attempts} attempts)") from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _put_once(self, url: str, body: memoryview, *, headers: dict[str, str], what: str) -> str:
        try:
            async with self.session.put(
                URL(url, encoded=True),  # a presigned query must reach the server byte for byte
                data=_ViewPayload(body),
                headers=headers,
                skip_auto_headers=("Content-Type",),
                timeout=PUT_TIMEOUT,
            ) as response:
                answer = await response.read()
                if response.status >= 500:
                    raise _Transient(f"HTTP {response.status} {_s3_code(answer)}")
                if response.status >= 400:
                    raise JobError(ErrorCode.UPLOAD_FAILED,
                                   f"{what}: storage refused with HTTP {response.status} {_s3_code(answer)}")
                return strip_etag(response.headers.get("ETag", ""))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc

    # -- mode chunked

    async def chunked(self) -> StreamResult:
        """One PUT with chunked transfer encoding, for endpoints that accept it (not S3, R2, MinIO)."""
        md5 = hashlib.md5()
        failure: list[BaseException] = []

        async def body() -> AsyncIterator[bytes]:
            try:
                while chunk := await self._read(READ_CHUNK):
                    md5.update(chunk)
                    yield chunk
                    self._stored(len(chunk))
                await self._source_done()  # before the last chunk: a failed ffmpeg never commits
            except BaseException as exc:
                failure.append(exc)
                raise

        try:
            async with self.session.put(
                URL(self.target.put_url, encoded=True),
                data=body(),
                headers={"Content-Type": self.target.content_type},
                chunked=True,
                timeout=PUT_TIMEOUT,
            ) as response:
                answer = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            if failure:
                raise failure[0] from exc
            raise JobError(ErrorCode.UPLOAD_FAILED, f"chunked PUT failed ({exc!r}); {CHUNKED_HINT}") from exc
        if failure:
            raise failure[0]
        if response.status >= 400:  # S3 says 501, MinIO and R2 411
            raise JobError(ErrorCode.UPLOAD_FAILED,
                           f"chunked PUT refused with HTTP {response.status} {_s3_code(answer)}; {CHUNKED_HINT}")
        etag = strip_etag(response.headers.get("ETag", ""))
        _check_etag(etag, md5.hexdigest(), what="chunked PUT")
        return StreamResult(mode="chunked", size=self.size, sha256=self.sha256.hexdigest(),
                            etag=md5.hexdigest(), peak_buffered=self.peak_buffered)

    # -- cleanup

    async def abort_multipart(self) -> None:
        """Abort the prepared multipart upload through its presigned URL; best effort, shielded."""
        multipart = self.target.multipart
        if multipart is None or self.committed_multipart or self.aborted:
            return
        self.aborted = True
        aborting = asyncio.ensure_future(_abort(self.session, multipart.abort_url))
        try:
            await asyncio.shield(aborting)
        except asyncio.CancelledError:
            await asyncio.wait([aborting])  # bounded by ABORT_TIMEOUT
            raise


async def _abort(session: aiohttp.ClientSession, abort_url: str) -> None:
    try:
        async with asyncio.timeout(ABORT_TIMEOUT), session.delete(URL(abort_url, encoded=True)) as response:
            answer = await response.read()
            if response.status >= 300 and response.status != 404:  # 404: already gone
                log.warning("abort multipart upload: HTTP %s %s", response.status, _s3_code(answer))
    except (aiohttp.ClientError, TimeoutError) as exc:
        # The bucket's lifecycle rule removes what this could not.
        log.warning("abort multipart upload failed: %r", exc)


def _md5(body: memoryview) -> bytes:
    return hashlib.md5(body).digest()


def _check_etag(etag: str, expected: str, *, what: str) -> None:
    if etag != expected:
        raise JobError(ErrorCode.UPLOAD_FAILED, f"{what}: storage answered ETag {etag!r}, "
                       f"the bytes sent have md5 {expected}")


def _s3_code(answer: bytes) -> str:
    match = _S3_CODE.search(answer[:4096])
    return match.group(1).decode("ascii", "replace") if match else ""


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a TaskGroup's failures: a coded JobError first."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if isinstance(exc, JobError):
            return exc
    for exc in leaves:
        if isinstance(exc, aiohttp.ClientError | TimeoutError):
            return JobError(ErrorCode.STORAGE_UNAVAILABLE, f"storage: {exc!r}")
    return leaves[0]
