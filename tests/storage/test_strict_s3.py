"""The strict S3 front refuses what S3, R2 and MinIO refuse, and injects faults on demand."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import pytest

from storage import Storage, StorageUnavailable, object_key
from storage.sigv4 import QuerySigner
from tests.fixtures.strict_s3 import S3Error, StrictS3, check_complete_part_sizes

MiB = 1024 * 1024
NOW = datetime(2025, 3, 9, 12, 0, tzinfo=UTC)
KEY = object_key("job-strict-01", "mp3", now=NOW)


async def chunks(*pieces: bytes) -> AsyncIterator[bytes]:
    """A body of unknown length: aiohttp sends it with chunked transfer encoding."""
    for piece in pieces:
        yield piece


def error_code(text: str) -> str:
    """The <Code> of an S3 XML error."""
    return text.split("<Code>", 1)[1].split("</Code>", 1)[0]


async def test_presigned_put_with_length_and_signed_type_passes(
    strict_storage: Storage, strict_s3: StrictS3
) -> None:
    url = await strict_storage.presign_put(KEY, content_type="audio/mpeg", expires=60)
    assert url.startswith(strict_s3.endpoint)
    async with aiohttp.ClientSession() as http:
        async with http.put(url, data=b"mp3 bytes", headers={"Content-Type": "audio/mpeg"}) as response:
            assert response.status == 200, await response.text()
        async with http.get(await strict_storage.presign_get(KEY)) as response:
            assert await response.read() == b"mp3 bytes"
    assert [(r.method, r.status, r.content_length) for r in strict_s3.requests if r.path.endswith(".mp3")][
        :1
    ] == [("PUT", 200, 9)]


async def test_chunked_put_is_refused_with_501(strict_storage: Storage) -> None:
    url = await strict_storage.presign_put(KEY, content_type="audio/mpeg", expires=60)
    async with aiohttp.ClientSession() as http:
        async with http.put(url, data=chunks(b"a", b"b"), headers={"Content-Type": "audio/mpeg"}) as response:
            assert (response.status, error_code(await response.text())) == (501, "NotImplemented")
    assert await strict_storage.head(KEY) is None


async def test_put_without_content_length_is_refused_with_411(
    strict_storage: Storage, strict_s3: StrictS3
) -> None:
    url = await strict_storage.presign_put(KEY, content_type="audio/mpeg", expires=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", int(strict_s3.endpoint.rsplit(":", 1)[1]))
    target = url.split(strict_s3.endpoint, 1)[1]
    writer.write(
        f"PUT {target} HTTP/1.1\r\nHost: {strict_s3.endpoint[7:]}\r\n"
        "Content-Type: audio/mpeg\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    body = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert status_line.split()[1] == b"411"
    assert b"<Code>MissingContentLength</Code>" in body


async def test_tampered_signature_is_refused_with_403(strict_storage: Storage) -> None:
    url = await strict_storage.presign_put(KEY, content_type="audio/mpeg", expires=60)
    signature = url.rsplit("X-Amz-Signature=", 1)[1]
    tampered = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    async with aiohttp.ClientSession() as http:
        async with http.put(tampered, data=b"x", headers={"Content-Type": "audio/mpeg"}) as response:
            assert (response.status, error_code(await response.text())) == (403, "SignatureDoesNotMatch")


async def test_another_key_under_the_same_signature_is_refused(strict_storage: Storage) -> None:
    url = await strict_storage.presign_put(KEY, content_type="audio/mpeg", expires=60)
    async with aiohttp.ClientSession() as http:
        async with http.put(
            url.replace(".mp3?", ".mp4?"), data=b"x", headers={"Content-Type": "audio/mpeg"}
        ) as response:
            assert response.status == 403


async def test_expired_url_is_refused_with_403(strict_storage: Storage, strict_s3: StrictS3) -> None:
    config = strict_storage.config
    signer = QuerySigner(
        access_key_id=config.access_key_id,
        secret_access_key=config.secret_access_key,
        region=config.region,
        expires=60,
        now=datetime(2020, 1, 1, tzinfo=UTC),
    )
    url = signer.presign("GET", f"{strict_s3.endpoint}/{config.bucket}/{KEY}", {})
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    assert (response.status, error_code(text)) == (403, "AccessDenied")
    assert "Request has expired" in text


async def test_content_type_other_than_the_signed_one_is_refused(strict_storage: Storage) -> None:
    url = await strict_storage.presign_put(KEY, content_type="audio/mpeg", expires=60)
    async with aiohttp.ClientSession() as http:
        async with http.put(url, data=b"x", headers={"Content-Type": "application/octet-stream"}) as response:
            assert (response.status, error_code(await response.text())) == (403, "SignatureDoesNotMatch")


async def test_wrong_content_md5_is_refused_and_nothing_is_stored(strict_storage: Storage) -> None:
    url = await strict_storage.presign_put(KEY, content_type="audio/mpeg", expires=60)
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    right = base64.b64encode(hashlib.md5(b"payload").digest()).decode()
    async with aiohttp.ClientSession() as http:
        headers = {"Content-Type": "audio/mpeg", "Content-MD5": wrong}
        async with http.put(url, data=b"payload", headers=headers) as response:
            assert (response.status, error_code(await response.text())) == (400, "BadDigest")
        assert await strict_storage.head(KEY) is None
        async with http.put(url, data=b"payload", headers={**headers, "Content-MD5": right}) as response:
            assert response.status == 200


async def put_parts(storage: Storage, key: str, sizes: list[int]) -> tuple[str, list[tuple[int, str]]]:
    upload_id = await storage.create_multipart(key, content_type="video/mp4")
    urls = await storage.presign_parts(key, upload_id, count=len(sizes), expires=60)
    parts = []
    async with aiohttp.ClientSession() as http:
        for number, (url, size) in enumerate(zip(urls, sizes, strict=True), start=1):
            async with http.put(url, data=bytes([number]) * size) as response:
                assert response.status == 200, await response.text()
                parts.append((number, response.headers["ETag"]))
    return upload_id, parts


async def test_complete_with_unequal_non_final_parts_is_refused_with_400(strict_storage: Storage) -> None:
    key = object_key("job-strict-02", "mp4", now=NOW)
    upload_id, parts = await put_parts(strict_storage, key, [5 * MiB, 6 * MiB, 100])
    with pytest.raises(Exception) as caught:
        await strict_storage.complete_multipart(key, upload_id, parts)
    assert "InvalidPart" in str(caught.value)
    assert await strict_storage.head(key) is None


async def test_complete_with_equal_parts_and_short_tail_passes(strict_storage: Storage) -> None:
    key = object_key("job-strict-03", "mp4", now=NOW)
    upload_id, parts = await put_parts(strict_storage, key, [5 * MiB, 5 * MiB, 10])
    etag = await strict_storage.complete_multipart(key, upload_id, parts)
    assert etag.endswith("-3")


def test_part_size_rules_match_r2_and_s3() -> None:
    check_complete_part_sizes([8 * MiB, 8 * MiB, 1])
    check_complete_part_sizes([3])
    for sizes, code in (
        ([4 * MiB, 1], "EntityTooSmall"),
        ([8 * MiB, 9 * MiB, 1], "InvalidPart"),
        ([5 * MiB, 6 * MiB], "InvalidPart"),
    ):
        with pytest.raises(S3Error) as caught:
            check_complete_part_sizes(sizes)
        assert caught.value.code == code


async def test_injected_503_answers_the_next_matching_request_only(
    strict_storage: Storage, strict_s3: StrictS3
) -> None:
    url = await strict_storage.presign_put(KEY, content_type="audio/mpeg", expires=60)
    fault = strict_s3.inject(status=503, times=1, method="PUT")
    async with aiohttp.ClientSession() as http:
        async with http.put(url, data=b"x", headers={"Content-Type": "audio/mpeg"}) as response:
            assert (response.status, error_code(await response.text())) == (503, "SlowDown")
        async with http.put(url, data=b"x", headers={"Content-Type": "audio/mpeg"}) as response:
            assert response.status == 200
    assert fault.hits == 1
    assert [r.fault for r in strict_s3.requests if r.method == "PUT" and r.path.endswith(".mp3")] == [
        "status 503",
        "",
    ]


async def test_injected_drop_closes_the_connection(strict_storage: Storage, strict_s3: StrictS3) -> None:
    url = await strict_storage.presign_put(KEY, content_type="audio/mpeg", expires=60)
    strict_s3.inject(drop=True, times=5, match=lambda seen: seen.path.endswith(".mp3"))
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.put(url, data=b"x", headers={"Content-Type": "audio/mpeg"}) as response:
                await response.read()
    # aiohttp itself may retry an idempotent PUT once on a dropped connection: every attempt was dropped
    dropped = [r for r in strict_s3.requests if r.path.endswith(".mp3")]
    assert dropped and all(r.fault == "drop" and r.status == 0 for r in dropped)


async def test_botocore_retries_through_a_single_500(strict_storage: Storage, strict_s3: StrictS3) -> None:
    strict_s3.inject(status=500, method="HEAD", match=lambda seen: seen.path.endswith(".mp3"))
    assert await strict_storage.head(KEY) is None
    assert [r.status for r in strict_s3.requests if r.method == "HEAD" and r.path.endswith(".mp3")] == [
        500,
        404,
    ]


async def test_storage_down_raises_storage_unavailable_and_recovers(
    strict_storage: Storage, strict_s3: StrictS3
) -> None:
    await strict_s3.down()
    with pytest.raises(StorageUnavailable):
        await strict_storage.head(KEY)
    await strict_s3.up()
    assert await strict_storage.head(KEY) is None


async def test_persistent_503_raises_storage_unavailable(
    strict_storage: Storage, strict_s3: StrictS3
) -> None:
    strict_s3.inject(status=503, times=10, method="HEAD")
    with pytest.raises(StorageUnavailable):
        await strict_storage.head(KEY)
