"""Storage against the session's S3: presigned round-trips, multipart, abort, stats, job records."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime

import aiohttp
import pytest

from storage import JobStore, Storage, StorageUnavailable, WriteConflict, multipart_etag, object_key
from storage.s3 import StorageConfig
from tests.fixtures.s3 import open_test_storage

MiB = 1024 * 1024
#: The smallest part S3 accepts except the last one.
MIN_PART = 5 * MiB
NOW = datetime(2025, 3, 9, 12, 0, tzinfo=UTC)


async def put_parts(
    http: aiohttp.ClientSession, urls: list[str], bodies: list[bytes]
) -> list[tuple[int, str]]:
    """PUT each body to its part URL; returns (part number, etag) pairs."""
    parts = []
    for number, (url, body) in enumerate(zip(urls, bodies, strict=False), start=1):
        async with http.put(url, data=body) as response:
            assert response.status == 200, await response.text()
            parts.append((number, response.headers["ETag"].strip('"')))
    return parts


async def test_presigned_put_then_presigned_get_returns_the_same_bytes(storage: Storage) -> None:
    key = object_key("job-0000001", "mp3", now=NOW)
    put_url = await storage.presign_put(key, content_type="audio/mpeg", expires=300)
    async with aiohttp.ClientSession() as http:
        async with http.put(put_url, data=b"ID3 fake mp3", headers={"Content-Type": "audio/mpeg"}) as put:
            assert put.status == 200
        async with http.get(await storage.presign_get(key)) as get:
            assert get.status == 200
            assert await get.read() == b"ID3 fake mp3"
    info = await storage.head(key)
    assert info is not None
    assert (info.size, info.content_type) == (12, "audio/mpeg")
    assert info.etag == hashlib.md5(b"ID3 fake mp3").hexdigest()


async def test_multipart_upload_through_presigned_parts_has_md5_of_md5s_etag(storage: Storage) -> None:
    key = object_key("job-0000002", "mp4", now=NOW)
    upload_id = await storage.create_multipart(key, content_type="video/mp4")
    urls = await storage.presign_parts(key, upload_id, count=3, expires=300)
    bodies = [b"a" * MIN_PART, b"b" * MIN_PART, b"tail"]
    async with aiohttp.ClientSession() as http:
        parts = await put_parts(http, urls, bodies)
    etag = await storage.complete_multipart(key, upload_id, parts)
    expected = hashlib.md5(b"".join(hashlib.md5(body).digest() for body in bodies)).hexdigest() + "-3"
    assert etag == expected == multipart_etag(e for _, e in parts)
    info = await storage.head(key)
    assert info is not None and info.size == 2 * MIN_PART + 4 and info.etag == expected


async def test_completing_twice_is_taken_as_done(storage: Storage) -> None:
    key = object_key("job-0000003", "m4a", now=NOW)
    upload_id = await storage.create_multipart(key, content_type="audio/mp4")
    [url] = await storage.presign_parts(key, upload_id, count=1, expires=300)
    async with aiohttp.ClientSession() as http:
        parts = await put_parts(http, [url], [b"only part"])
    first = await storage.complete_multipart(key, upload_id, parts)
    assert await storage.complete_multipart(key, upload_id, parts) == first


async def test_abort_leaves_no_upload_and_no_parts(storage: Storage) -> None:
    key = object_key("job-0000004", "webm", now=NOW)
    upload_id = await storage.create_multipart(key, content_type="video/webm")
    [url] = await storage.presign_parts(key, upload_id, count=1, expires=300)
    async with aiohttp.ClientSession() as http:
        await put_parts(http, [url], [b"x" * 1000])
    assert [u.upload_id for u in await storage.list_multipart_uploads()] == [upload_id]
    await storage.abort_multipart(key, upload_id)
    assert await storage.list_multipart_uploads() == []
    await storage.abort_multipart(key, upload_id)  # aborting again is clean, not an error
    assert await storage.head(key) is None


async def test_presigned_abort_works_without_credentials(storage: Storage) -> None:
    key = object_key("job-0000005", "opus", now=NOW)
    upload_id = await storage.create_multipart(key, content_type="audio/ogg")
    abort_url = await storage.presign_abort(key, upload_id, expires=300)
    async with aiohttp.ClientSession() as http, http.delete(abort_url) as response:
        assert response.status == 204
    assert await storage.list_multipart_uploads() == []


async def test_download_offers_a_friendly_unicode_filename(storage: Storage) -> None:
    key = object_key("job-0000006", "mp3", now=NOW)
    await storage.put_json(key, b"data")
    url = await storage.presign_get(key, filename="Café – “live”.mp3")
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        disposition = response.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="Cafe')
    assert "filename*=UTF-8''Caf%C3%A9%20%E2%80%93%20%E2%80%9Clive%E2%80%9D.mp3" in disposition


async def test_stats_count_objects_and_bytes_by_format_and_open_uploads(storage: Storage) -> None:
    for job_id, extension, size in (
        ("job-0000007", "mp3", 10),
        ("job-0000008", "mp3", 5),
        ("job-0000009", "flac", 7),
    ):
        await storage.put_json(object_key(job_id, extension, now=NOW), b"x" * size)
    await storage.put_json("jobs/job-0000007.json", b"{}")  # not a converted file
    await storage.create_multipart(object_key("job-0000010", "wav", now=NOW), content_type="audio/wav")
    stats = await storage.stats()
    assert (stats.objects, stats.bytes, stats.open_uploads) == (3, 22, 1)
    assert {name: (s.objects, s.bytes) for name, s in stats.by_format.items()} == {
        "mp3": (2, 15),
        "flac": (1, 7),
    }


async def test_presigning_256_part_urls_takes_well_under_100_ms(storage: Storage) -> None:
    await storage.presign_parts("converted/warm-up", "upload", count=1, expires=60)
    started = time.perf_counter()
    urls = await storage.presign_parts("converted/2025/03/job-0000011.mp4", "upload", count=256, expires=3600)
    elapsed = time.perf_counter() - started
    assert len(set(urls)) == 256 and "partNumber=256" in urls[-1]
    assert elapsed < 0.05


async def test_job_store_creates_once_and_refuses_stale_writes(storage: Storage) -> None:
    jobs = JobStore(storage)
    assert await jobs.load("job-0000012") is None
    first = await jobs.save("job-0000012", b'{"stage":"queued"}', etag=None)
    with pytest.raises(WriteConflict):
        await jobs.save("job-0000012", b'{"stage":"queued"}', etag=None)
    second = await jobs.save("job-0000012", b'{"stage":"preparing"}', etag=first)
    with pytest.raises(WriteConflict):
        await jobs.save("job-0000012", b'{"stage":"converting"}', etag=first)
    assert await jobs.load("job-0000012") == (b'{"stage":"preparing"}', second)


async def test_unreachable_storage_raises_storage_unavailable(unused_tcp_port: int) -> None:
    config = StorageConfig(
        endpoint=f"http://127.0.0.1:{unused_tcp_port}",
        region="us-east-1",
        bucket="nothing-here",
        access_key_id="k",
        secret_access_key="s",
    )
    async with open_test_storage(config) as storage:
        with pytest.raises(StorageUnavailable):
            await storage.head("converted/2025/03/job-0000013.mp3")


async def test_concurrent_saves_of_one_version_let_exactly_one_writer_win(storage: Storage) -> None:
    jobs = JobStore(storage)
    etag = await jobs.save("job-0000014", b'{"n":0}', etag=None)

    async def attempt(n: int) -> bool:
        try:
            await jobs.save("job-0000014", b'{"n":%d}' % n, etag=etag)
        except WriteConflict:
            return False
        return True

    outcomes = await asyncio.gather(*(attempt(n) for n in range(1, 11)))
    assert outcomes.count(True) == 1
    loaded = await jobs.load("job-0000014")
    assert loaded is not None and loaded[0] == b'{"n":%d}' % (outcomes.index(True) + 1)
