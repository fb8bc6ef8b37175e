"""stream_to_target: a real process's stdout into presigned S3 uploads, held to real-S3 rules.

Unless a test is about plain moto, uploads go through the strict front (tests/fixtures/strict_s3.py),
which refuses what S3, R2 and MinIO refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from actors.adapters.ffmpeg import FfmpegProcess
from actors.adapters.upload import (
    RetryPolicy,
    StreamResult,
    stream_to_target,
)
from actors.core.parts import MIN_PART_SIZE, plan_parts
from actors.runtime.http import serving
from messages.errors import ErrorCode, JobError
from messages.types import MAX_PART_URLS, PartUpload, UploadMode, UploadTarget
from storage.s3 import Storage

MiB = 1024 * 1024
#: Part size of these tests: S3's minimum, so that even mid-size outputs need several parts.
PART = 5 * MiB
#: Seconds any single wait in these tests may take before the test fails instead of hanging.
WAIT = 60.0
#: Presigned URLs of these tests live this long, seconds.
EXPIRES = 900
#: Fast retries: the tests' faults are one-off.
QUICK_RETRY = RetryPolicy(attempts=4, first_wait=0.05, max_wait=0.2)
CONTENT_TYPE = "audio/mpeg"

#: A producer process: writes N deterministic bytes (every MiB distinct) to stdout and their sha256
#: to stderr, so the expected digest is computed by another process than the one under test.
GENERATOR = r"""
import hashlib, random, sys
size, seed = int(sys.argv[1]), int(sys.argv[2])
base = random.Random(seed).randbytes(1 << 20)
digest, out, index = hashlib.sha256(), sys.stdout.buffer, 0
while size > 0:
    turn = (index * 7919) % len(base)
    block = (base[turn:] + base[:turn])[:size]
    out.write(block)
    digest.update(block)
    size -= len(block)
    index += 1
out.flush()
sys.stderr.write("sha256 " + digest.hexdigest() + "\n")
"""


def generator_argv(size: int, *, seed: int = 7) -> list[str]:
    """argv of the generator process for ``size`` bytes."""
    return [sys.executable, "-c", GENERATOR, str(size), str(seed)]


def endless_ffmpeg() -> list[str]:
    """ffmpeg argv: raw video on stdout, never ending."""
    return ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "lavfi",
            "-i", "testsrc2=size=640x360:rate=25", "-f", "rawvideo", "-pix_fmt", "yuv420p", "pipe:1"]


def generator_sha256(proc: FfmpegProcess) -> str:
    """The digest the generator wrote to stderr."""
    line = next(line for line in proc.stderr_tail if line.startswith("sha256 "))
    return line.removeprefix("sha256 ")


async def prepare_target(
    storage: Storage,
    key: str,
    *,
    max_bytes: int,
    part_size: int = PART,
    part_expires: int = EXPIRES,
    mode: UploadMode = UploadMode.AUTO,
) -> UploadTarget:
    """What the coordinator sends the uploader: a single-PUT URL plus a presigned multipart upload."""
    size, count = plan_parts(max_bytes, part_size=part_size)
    upload_id = await storage.create_multipart(key, content_type=CONTENT_TYPE)
    return UploadTarget(
        key=key,
        content_type=CONTENT_TYPE,
        put_url=await storage.presign_put(key, content_type=CONTENT_TYPE, expires=EXPIRES),
        mode=mode,
        multipart=PartUpload(
            upload_id=upload_id,
            part_size=size,
            part_urls=await storage.presign_parts(key, upload_id, count=count, expires=part_expires),
            abort_url=await storage.presign_abort(key, upload_id, expires=EXPIRES),
        ),
    )


async def commit(storage: Storage, key: str, result: StreamResult) -> None:
    """Complete a multipart result as the coordinator does (nothing to do for single/chunked)."""
    if result.mode == "multipart":
        etag = await storage.complete_multipart(key, result.upload_id, [(p.number, p.etag) for p in result.parts])
        assert etag == result.etag


async def stored_sha256(storage: Storage, session: aiohttp.ClientSession, key: str) -> tuple[int, str]:
    """Size and sha256 of the stored object, read back streaming through a presigned GET."""
    url = await storage.presign_get(key, expires=EXPIRES)
    digest, size = hashlib.sha256(), 0
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        async for chunk in response.content.iter_chunked(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


async def assert_nothing_left(storage: Storage, key: str) -> None:
    """No object at ``key`` and no open multipart upload: a failure never looks like a file."""
    assert await storage.head(key) is None
    assert await storage.list_multipart_uploads() == []


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The uploader's HTTP session."""
    async with aiohttp.ClientSession() as opened:
        yield opened


async def upload_generated(
    storage: Storage,
    session: aiohttp.ClientSession,
    size: int,
    *,
    key: str = "converted/out.mp3",
    parts_in_flight: int = 2,
    retry: RetryPolicy = QUICK_RETRY,
) -> tuple[StreamResult, str]:
    """Stream ``size`` generated bytes to ``key`` and commit; the result and the generator's sha256."""
    target = await prepare_target(storage, key, max_bytes=size + PART)
    async with FfmpegProcess(generator_argv(size)) as producer:
        result = await asyncio.wait_for(
            stream_to_target(producer.stdout, target, session=session, max_bytes=size + PART,
                             parts_in_flight=parts_in_flight, source_done=producer.check, retry=retry),
            WAIT * 4,
        )
        expected = generator_sha256(producer)
    await commit(storage, key, result)
    return result, expected


# ------------------------------------------------------------------------------------ pure core


def test_plan_parts_keeps_the_wished_part_size_when_the_urls_suffice():
    assert plan_parts(100 * MiB, part_size=8 * MiB) == (8 * MiB, 13)


def test_plan_parts_never_goes_below_s3s_minimum_part_size():
    assert plan_parts(1000, part_size=1 * MiB) == (MIN_PART_SIZE, 1)


def test_plan_parts_grows_the_part_size_to_cover_max_bytes_with_the_url_budget():
    size, count = plan_parts(4 * 1024 * MiB, part_size=8 * MiB)
    assert count <= MAX_PART_URLS and size * count >= 4 * 1024 * MiB
    assert size % MiB == 0 and size == 16 * MiB


def test_plan_parts_never_exceeds_ten_thousand_parts():
    size, count = plan_parts(5 * 1024**4, part_size=5 * MiB, max_urls=50_000)
    assert count <= 10_000 and size * count >= 5 * 1024**4


# ------------------------------------------------------------------------ sizes, byte for byte


@pytest.mark.parametrize(
    ("size", "mode", "parts"),
    [
        (0, "single", 0),
        (1000, "single", 0),
        (PART - 1, "single", 0),
        (PART, "single", 0),
        (PART + 1, "multipart", 2),
        (100_000_000, "multipart", 20),
    ],
    ids=["empty", "1KB", "5MiB-1", "5MiB", "5MiB+1", "100MB"],
)
async def test_output_is_stored_byte_exact_through_the_strict_front(
    strict_storage: Storage, session: aiohttp.ClientSession, size: int, mode: str, parts: int
):
    result, expected = await upload_generated(strict_storage, session, size)
    assert (result.mode, result.size, len(result.parts)) == (mode, size, parts)
    assert result.sha256 == expected
    assert await stored_sha256(strict_storage, session, "converted/out.mp3") == (size, expected)
    info = await strict_storage.head("converted/out.mp3")
    assert info is not None and info.etag == result.etag and info.content_type == CONTENT_TYPE
    assert await strict_storage.list_multipart_uploads() == []  # the unused upload of a single PUT is aborted
    if mode == "multipart":
        assert {p.size for p in result.parts[:-1]} == {PART}  # equal parts, as R2 demands


@pytest.mark.slow
async def test_one_gigabyte_is_stored_byte_exact(strict_storage: Storage, session: aiohttp.ClientSession):
    size = 1_000_000_000
    result, expected = await upload_generated(strict_storage, session, size, parts_in_flight=3)
    assert result.mode == "multipart" and result.size == size and result.sha256 == expected
    assert result.peak_buffered <= 4 * PART
    assert await stored_sha256(strict_storage, session, "converted/out.mp3") == (size, expected)


async def test_ffmpeg_output_is_stored_and_matches_what_ffmpeg_wrote(
    strict_storage: Storage, session: aiohttp.ClientSession
):
    argv = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-progress", "pipe:2", "-f", "lavfi",
            "-i", "sine=frequency=440:duration=20", "-c:a", "libmp3lame", "-b:a", "128k", "-f", "mp3", "pipe:1"]
    target = await prepare_target(strict_storage, "converted/tone.mp3", max_bytes=50 * MiB)
    progress: list[float] = []
    async with FfmpegProcess(argv, on_progress=progress.append, max_bytes=50 * MiB) as ff:
        result = await stream_to_target(ff.stdout, target, session=session, max_bytes=50 * MiB,
                                        source_done=ff.check)
    assert result.mode == "single" and 300_000 < result.size < 400_000
    assert progress[-1] == pytest.approx(20.0, abs=0.2)
    assert await stored_sha256(strict_storage, session, "converted/tone.mp3") == (result.size, result.sha256)


# ------------------------------------------------------------------------------- chunked mode


async def test_chunked_mode_is_refused_by_the_strict_front_with_a_hint_to_use_auto(
    strict_storage: Storage, session: aiohttp.ClientSession
):
    key = "converted/chunked.mp3"
    target = await prepare_target(strict_storage, key, max_bytes=50 * MiB, mode=UploadMode.CHUNKED)
    async with FfmpegProcess(generator_argv(3 * MiB)) as producer:
        with pytest.raises(JobError) as failure:
            await stream_to_target(producer.stdout, target, session=session, max_bytes=50 * MiB,
                                   source_done=producer.check)
    assert failure.value.code is ErrorCode.UPLOAD_FAILED
    assert "mode auto" in failure.value.detail
    await assert_nothing_left(strict_storage, key)


async def test_chunked_mode_is_accepted_by_plain_moto(plain_s3_storage: Storage, session: aiohttp.ClientSession):
    key = "converted/chunked.mp3"
    size = 12 * MiB + 5
    target = await prepare_target(plain_s3_storage, key, max_bytes=50 * MiB, mode=UploadMode.CHUNKED)
    async with FfmpegProcess(generator_argv(size)) as producer:
        result = await stream_to_target(producer.stdout, target, session=session, max_bytes=50 * MiB,
                                        source_done=producer.check)
        expected = generator_sha256(producer)
    assert (result.mode, result.size, result.sha256) == ("chunked", size, expected)
    assert await stored_sha256(plain_s3_storage, session, key) == (size, expected)
    assert await plain_s3_storage.list_multipart_uploads() == []


async def test_chunked_mode_with_a_failing_producer_leaves_no_object(
    plain_s3_storage: Storage, session: aiohttp.ClientSession
):
    key = "converted/chunked-broken.mp3"
    dies = [sys.executable, "-c", "import os, sys; sys.stdout.buffer.write(os.urandom(3 << 20)); "
            "sys.stdout.flush(); sys.exit(1)"]
    target = await prepare_target(plain_s3_storage, key, max_bytes=50 * MiB, mode=UploadMode.CHUNKED)
    async with FfmpegProcess(dies) as producer:
        with pytest.raises(JobError) as failure:
            await stream_to_target(producer.stdout, target, session=session, max_bytes=50 * MiB,
                                   source_done=producer.check)
    assert failure.value.code is ErrorCode.CONVERSION_FAILED
    await assert_nothing_left(plain_s3_storage, key)


# ------------------------------------------------------------------------------- backpressure


class SlowStore:
    """A loopback store that answers each PUT late, and records how many PUTs were in flight at once."""

    def __init__(self, *, latency: float) -> None:
        self.latency = latency
        self.in_flight = 0
        self.most_in_flight = 0
        self.bodies: dict[str, bytes] = {}
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        """PUT stores the body (checking Content-Length and Content-MD5), DELETE forgets the upload."""
        if request.method == "DELETE":
            return web.Response(status=204)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            assert request.content_length is not None and "Content-MD5" in request.headers
            body = await request.read()
            await asyncio.sleep(self.latency)  # the store is slow; no test waits on this
            self.bodies[request.query.get("partNumber", "single")] = body
            return web.Response(status=200, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        finally:
            self.in_flight -= 1

    def target(self, *, parts: int) -> UploadTarget:
        """A target whose URLs all point at this store."""
        return UploadTarget(
            key="converted/slow.bin", content_type=CONTENT_TYPE, put_url=f"{self.url}/single?sig=x",
            multipart=PartUpload(upload_id="u1", part_size=PART,
                                 part_urls=[f"{self.url}/part?partNumber={n}" for n in range(1, parts + 1)],
                                 abort_url=f"{self.url}/abort?uploadId=u1"),
        )


@pytest.fixture
async def slow_store() -> AsyncIterator[SlowStore]:
    """A SlowStore served on 127.0.0.1."""
    store = SlowStore(latency=0.15)
    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", store.handle)
    async with serving(app) as port:
        store.url = f"http://127.0.0.1:{port}"
        yield store


@pytest.mark.parametrize("parts_in_flight", [1, 2, 3])
async def test_a_slow_store_blocks_the_producer_and_memory_stays_bounded(
    slow_store: SlowStore, session: aiohttp.ClientSession, parts_in_flight: int
):
    size = 16 * PART + 123
    stored: list[int] = []
    async with FfmpegProcess(generator_argv(size)) as producer:
        result = await stream_to_target(producer.stdout, slow_store.target(parts=20), session=session,
                                        max_bytes=30 * PART, parts_in_flight=parts_in_flight,
                                        on_stored=stored.append, source_done=producer.check)
        expected = generator_sha256(producer)
    # bytes read from the producer but not yet acknowledged never exceed the part buffers …
    assert result.peak_buffered <= (parts_in_flight + 1) * PART
    # … and the producer really did outrun the store (otherwise the bound proves nothing)
    assert result.peak_buffered > parts_in_flight * PART
    assert slow_store.most_in_flight == parts_in_flight
    assert stored == sorted(stored) and stored[-1] == size
    joined = b"".join(slow_store.bodies[str(n)] for n in range(1, len(result.parts) + 1))
    assert hashlib.sha256(joined).hexdigest() == expected == result.sha256


# -------------------------------------------------------------------------------------- faults


async def test_a_5xx_on_a_part_is_retried_from_memory_and_the_object_is_correct(
    strict_s3, strict_storage: Storage, session: aiohttp.ClientSession
):
    fault = strict_s3.inject(status=503, times=2, method="PUT", match=lambda seen: seen.query.get("partNumber") == "2")
    size = 3 * PART + 17
    result, expected = await upload_generated(strict_storage, session, size)
    assert fault.hits == 2
    assert result.sha256 == expected
    assert await stored_sha256(strict_storage, session, "converted/out.mp3") == (size, expected)


async def test_a_dropped_connection_on_a_part_is_retried(
    strict_s3, strict_storage: Storage, session: aiohttp.ClientSession
):
    fault = strict_s3.inject(drop=True, method="PUT", match=lambda seen: seen.query.get("partNumber") == "1")
    size = 2 * PART + 1
    _result, expected = await upload_generated(strict_storage, session, size)
    assert fault.hits == 1
    assert await stored_sha256(strict_storage, session, "converted/out.mp3") == (size, expected)


async def test_persistent_5xx_ends_in_storage_unavailable_and_the_upload_is_aborted(
    strict_s3, strict_storage: Storage, session: aiohttp.ClientSession
):
    strict_s3.inject(status=500, times=100, method="PUT")
    with pytest.raises(JobError) as failure:
        await upload_generated(strict_storage, session, 3 * PART)
    assert failure.value.code is ErrorCode.STORAGE_UNAVAILABLE and failure.value.retryable
    await assert_nothing_left(strict_storage, "converted/out.mp3")


async def test_an_expired_part_url_fails_the_upload_without_retrying_and_leaves_no_open_upload(
    strict_s3, strict_storage: Storage, session: aiohttp.ClientSession
):
    key = "converted/expired.mp3"
    # X-Amz-Expires=0: expired the moment it is made, no clock games and no sleep
    target = await prepare_target(strict_storage, key, max_bytes=50 * MiB, part_expires=0)
    async with FfmpegProcess(generator_argv(3 * PART)) as producer:
        with pytest.raises(JobError) as failure:
            await stream_to_target(producer.stdout, target, session=session, max_bytes=50 * MiB,
                                   source_done=producer.check, retry=QUICK_RETRY)
    assert failure.value.code is ErrorCode.UPLOAD_FAILED and failure.value.retryable
    assert "403" in failure.value.detail
    tried = [seen.query["partNumber"] for seen in strict_s3.requests if "partNumber" in seen.query]
    assert tried and len(tried) == len(set(tried))  # a 403 is final: no part was sent twice
    await assert_nothing_left(strict_storage, key)


async def test_unreachable_storage_ends_in_a_coded_failure(
    strict_s3, strict_storage: Storage, session: aiohttp.ClientSession
):
    key = "converted/down.mp3"
    target = await prepare_target(strict_storage, key, max_bytes=50 * MiB)
    await strict_s3.down()
    try:
        async with FfmpegProcess(generator_argv(2 * PART)) as producer:
            with pytest.raises(JobError) as failure:
                await stream_to_target(producer.stdout, target, session=session, max_bytes=50 * MiB,
                                       source_done=producer.check, retry=QUICK_RETRY)
    finally:
        await strict_s3.up()
    assert failure.value.code is ErrorCode.STORAGE_UNAVAILABLE and failure.value.retryable
    assert await strict_storage.head(key) is None


async def test_more_parts_than_urls_is_too_large_and_aborted(
    strict_storage: Storage, session: aiohttp.ClientSession
):
    key = "converted/big.mp3"
    target = await prepare_target(strict_storage, key, max_bytes=2 * PART)  # two part URLs
    async with FfmpegProcess(generator_argv(3 * PART)) as producer:
        with pytest.raises(JobError) as failure:
            await stream_to_target(producer.stdout, target, session=session, max_bytes=10 * PART,
                                   source_done=producer.check)
    assert failure.value.code is ErrorCode.TOO_LARGE
    await assert_nothing_left(strict_storage, key)


async def test_output_reaching_max_bytes_is_too_large_not_a_truncated_object(
    strict_storage: Storage, session: aiohttp.ClientSession
):
    key = "converted/capped.mp3"
    target = await prepare_target(strict_storage, key, max_bytes=2 * MiB)
    async with FfmpegProcess(generator_argv(2 * MiB)) as producer:  # exactly the cap, as -fs leaves it
        with pytest.raises(JobError) as failure:
            await stream_to_target(producer.stdout, target, session=session, max_bytes=2 * MiB,
                                   source_done=producer.check)
    assert failure.value.code is ErrorCode.TOO_LARGE
    await assert_nothing_left(strict_storage, key)


async def test_a_failing_producer_never_leaves_an_object_that_looks_complete(
    strict_storage: Storage, session: aiohttp.ClientSession
):
    key = "converted/broken.mp3"
    dies = [sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'x' * 4000); sys.stdout.flush(); "
            "sys.stderr.write('Invalid data found when processing input\\n'); sys.exit(1)"]
    target = await prepare_target(strict_storage, key, max_bytes=50 * MiB)
    async with FfmpegProcess(dies) as producer:
        with pytest.raises(JobError) as failure:
            await stream_to_target(producer.stdout, target, session=session, max_bytes=50 * MiB,
                                   source_done=producer.check)
    assert failure.value.code is ErrorCode.CONVERSION_FAILED
    await assert_nothing_left(strict_storage, key)


async def test_a_producer_failing_after_several_parts_leaves_nothing(
    strict_storage: Storage, session: aiohttp.ClientSession
):
    key = "converted/broken-late.mp3"
    dies_late = [sys.executable, "-c", "import os, sys; sys.stdout.buffer.write(os.urandom(12 << 20)); "
                 "sys.stdout.flush(); sys.exit(2)"]
    target = await prepare_target(strict_storage, key, max_bytes=50 * MiB)
    async with FfmpegProcess(dies_late) as producer:
        with pytest.raises(JobError) as failure:
            await stream_to_target(producer.stdout, target, session=session, max_bytes=50 * MiB,
                                   source_done=producer.check)
    assert failure.value.code is ErrorCode.CONVERSION_FAILED
    await assert_nothing_left(strict_storage, key)


async def test_cancellation_mid_stream_kills_ffmpeg_and_aborts_the_upload(
    strict_storage: Storage, session: aiohttp.ClientSession
):
    key = "converted/cancelled.raw"
    target = await prepare_target(strict_storage, key, max_bytes=2000 * MiB)
    first_part_stored = asyncio.Event()
    pgid = 0

    async def upload() -> None:
        nonlocal pgid
        async with FfmpegProcess(endless_ffmpeg()) as ff:
            pgid = ff.pgid
            await stream_to_target(ff.stdout, target, session=session, max_bytes=2000 * MiB,
                                   on_stored=lambda _: first_part_stored.set(), source_done=ff.check)

    task = asyncio.create_task(upload())
    await asyncio.wait_for(first_part_stored.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # no process of the group is left, not even a zombie
    await assert_nothing_left(strict_storage, key)


async def test_a_wrong_etag_from_storage_is_an_upload_failure(session: aiohttp.ClientSession):
    async def liar(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200, headers={"ETag": '"00000000000000000000000000000000"'})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", liar)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    target = UploadTarget(key="k", content_type=CONTENT_TYPE, put_url=f"{url}/single",
                          multipart=PartUpload(upload_id="u", part_size=PART, part_urls=[f"{url}/p1"],
                                               abort_url=f"{url}/abort"))
    try:
        async with FfmpegProcess(generator_argv(1000)) as producer:
            with pytest.raises(JobError) as failure:
                await stream_to_target(producer.stdout, target, session=session, max_bytes=PART,
                                       source_done=producer.check)
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
    assert failure.value.code is ErrorCode.UPLOAD_FAILED and "ETag" in failure.value.detail
