"""Throttled origins: the guard's gateway fetches an input in Range requests and hands ffmpeg one body."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from actors.guard import FetchGuard
from actors.guard.ranges import (
    ContentRange,
    Span,
    chunk_problem,
    chunk_range,
    parse_content_range,
    parse_range,
    range_chunk_in,
    ranged_url,
)
from actors.runtime.http import serving
from bench.server import byte_range
from messages.types import MAX_RANGE_CHUNK, MIN_RANGE_CHUNK
from tests.support.sites import throttled_origin

MiB = 1024 * 1024
TEST_ALLOW = ("127.0.0.1/32",)


# ------------------------------------------------------------------------------------ pure core


def test_a_client_range_is_a_single_bytes_span_and_no_range_is_the_whole_body() -> None:
    assert parse_range(None) == Span(0, None)
    assert parse_range("bytes=0-") == Span(0, None)
    assert parse_range("bytes=100-199") == Span(100, 199)
    for unusable in ("bytes=-500", "bytes=0-1,5-9", "bytes=9-1", "items=0-1", "bytes=x-"):
        assert parse_range(unusable) is None, unusable


def test_content_range_is_parsed_and_nonsense_refused() -> None:
    assert parse_content_range("bytes 0-99/1000") == ContentRange(0, 99, 1000)
    assert parse_content_range("bytes 5-9/*") == ContentRange(5, 9, None)
    for bad in (None, "", "bytes 9-5/100", "bytes 0-100/100", "bytes */100", "0-9/10"):
        assert parse_content_range(bad) is None, bad


def test_the_next_chunk_stays_within_the_chunk_size_the_asked_span_and_the_total() -> None:
    assert chunk_range(0, chunk=MiB, span=Span(0, None), total=None) == f"bytes=0-{MiB - 1}"
    assert chunk_range(MiB, chunk=MiB, span=Span(0, None), total=MiB + 10) == f"bytes={MiB}-{MiB + 9}"
    assert chunk_range(100, chunk=MiB, span=Span(100, 199), total=None) == "bytes=100-199"


def test_a_chunk_must_start_where_asked_end_within_it_and_keep_the_total() -> None:
    assert chunk_problem(ContentRange(0, 9, 100), position=0, asked_last=9, total=None) == ""
    assert chunk_problem(ContentRange(0, 4, 100), position=0, asked_last=9, total=100) == ""  # short: resumed
    assert "starts at" in chunk_problem(ContentRange(5, 9, 100), position=0, asked_last=9, total=100)
    assert "beyond" in chunk_problem(ContentRange(0, 19, 100), position=0, asked_last=9, total=100)
    assert "total changed" in chunk_problem(ContentRange(10, 19, 200), position=10, asked_last=19, total=100)
    assert "Content-Range" in chunk_problem(None, position=0, asked_last=9, total=100)


def test_the_chunk_size_travels_in_the_gateway_url_and_is_bounded() -> None:
    base = "http://127.0.0.1:1/via/abc/file.mp4"
    assert ranged_url(base, 0) == base
    assert range_chunk_in(ranged_url(base, 10 * MiB)[len("http://127.0.0.1:1"):]) == 10 * MiB
    assert range_chunk_in("/via/abc/f?range_chunk=1") == MIN_RANGE_CHUNK
    assert range_chunk_in(f"/via/abc/f?range_chunk={10 * MAX_RANGE_CHUNK}") == MAX_RANGE_CHUNK
    assert range_chunk_in("/via/abc/f?range_chunk=-5") == 0
    assert range_chunk_in("/via/abc/f") == 0


# ------------------------------------------------------------------------------------ the gateway


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers or {}) as response:
        return response.status, dict(response.headers), await response.read()


@pytest.fixture
def big_file(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * (3 * MiB // 256 + 123))  # not a multiple of the chunk size
    return path


async def test_a_throttled_origin_is_fetched_in_bounded_ranges_and_ffmpeg_gets_one_body(big_file) -> None:
    data = big_file.read_bytes()
    async with throttled_origin(big_file.parent) as (port, log), FetchGuard(allow=TEST_ALLOW) as guard:
        url = ranged_url(guard.gateway_url(f"http://127.0.0.1:{port}/throttled/big.bin"), MiB)
        status, headers, body = await _get(url, {"Range": "bytes=0-"})  # what ffmpeg sends first
    assert body == data
    assert status == 206 and headers["Content-Range"] == f"bytes 0-{len(data) - 1}/{len(data)}"
    assert int(headers["Content-Length"]) == len(data)
    ranges = [r for r, _ in log.requests]
    assert len(ranges) == -(-len(data) // MiB), ranges
    for asked in ranges:  # every request a bounded range within the origin's full-speed burst
        first, last = byte_range(asked, len(data)) or (0, -1)
        assert asked.endswith(str(last)) and last - first + 1 <= MiB, asked
    assert guard.blocked == [] and guard.failures == []


async def test_a_seek_asks_from_its_byte_and_a_plain_get_gets_200(big_file) -> None:
    data = big_file.read_bytes()
    async with throttled_origin(big_file.parent) as (port, _log), FetchGuard(allow=TEST_ALLOW) as guard:
        url = ranged_url(guard.gateway_url(f"http://127.0.0.1:{port}/throttled/big.bin"), MiB)
        status, headers, body = await _get(url, {"Range": f"bytes={MiB + 7}-"})
        assert status == 206 and body == data[MiB + 7:]
        assert headers["Content-Range"] == f"bytes {MiB + 7}-{len(data) - 1}/{len(data)}"
        status, _, body = await _get(url)
        assert status == 200 and body == data


async def test_a_server_that_ignores_range_is_relayed_whole(media_server, media_files) -> None:
    data = media_files["audio.mp3"].read_bytes()
    async with FetchGuard(allow=TEST_ALLOW) as guard:
        url = ranged_url(guard.gateway_url(media_server.url("unsized/audio.mp3")), MIN_RANGE_CHUNK)
        status, _, body = await _get(url, {"Range": "bytes=0-"})
    assert status == 200 and body == data


async def test_short_reads_are_resumed_from_the_last_byte_received(big_file) -> None:
    data = big_file.read_bytes()
    served: list[str] = []

    async def stingy(request: web.Request) -> web.StreamResponse:
        """Promises the range asked, sends at most 100 KiB of it, then drops the connection."""
        first, last = byte_range(request.headers.get("Range"), len(data)) or (0, len(data) - 1)
        served.append(request.headers.get("Range", ""))
        response = web.StreamResponse(status=206, headers={
            "Content-Range": f"bytes {first}-{last}/{len(data)}", "Content-Length": str(last - first + 1)})
        await response.prepare(request)
        await response.write(data[first:min(last + 1, first + 100 * 1024)])
        assert request.transport is not None
        request.transport.close()
        return response

    app = web.Application()
    app.router.add_get("/stingy", stingy)
    async with serving(app) as port, FetchGuard(allow=TEST_ALLOW) as guard:
        status, _, body = await _get(ranged_url(guard.gateway_url(f"http://127.0.0.1:{port}/stingy"), MiB))
    assert status == 200 and body == data
    assert len(served) >= len(data) // (100 * 1024)


async def test_a_chunk_that_does_not_continue_the_body_ends_it_early(big_file) -> None:
    data = big_file.read_bytes()

    async def shifty(request: web.Request) -> web.StreamResponse:
        """The first chunk as asked; later ones claim to start elsewhere."""
        first, last = byte_range(request.headers.get("Range"), len(data)) or (0, len(data) - 1)
        start = first if first == 0 else first + 1
        return web.Response(status=206, body=data[start:last + 1],
                            headers={"Content-Range": f"bytes {start}-{last}/{len(data)}"})

    app = web.Application()
    app.router.add_get("/shifty", shifty)
    async with serving(app) as port, FetchGuard(allow=TEST_ALLOW) as guard:
        url = ranged_url(guard.gateway_url(f"http://127.0.0.1:{port}/shifty"), MiB)
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            with pytest.raises(aiohttp.ClientPayloadError):  # Content-Length promised more: a short body
                await response.read()


async def test_the_media_budget_counts_every_chunk(big_file) -> None:
    async with throttled_origin(big_file.parent) as (port, _log), \
            FetchGuard(allow=TEST_ALLOW, media_budget=2 * MiB) as guard:
        url = ranged_url(guard.gateway_url(f"http://127.0.0.1:{port}/throttled/big.bin"), MiB)
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    assert [e.code.value for e in guard.failures] == ["source_too_large"]


async def test_a_refused_ranged_fetch_is_recorded_for_a_re_resolution(tmp_path) -> None:
    async def gone(request: web.Request) -> web.Response:
        return web.Response(status=403, text="expired")

    app = web.Application()
    app.router.add_get("/gone", gone)
    async with serving(app) as port, FetchGuard(allow=TEST_ALLOW) as guard:
        status, _, _ = await _get(ranged_url(guard.gateway_url(f"http://127.0.0.1:{port}/gone"), MiB))
    assert status == 403 and guard.refused == [403] and guard.blocked == []
