"""Benchmark of the uploader's data path: ffmpeg stdout → stream_to_target → a local S3.

``python -m bench.uploader [--sizes 10M,100M,1G] [--part-size 8M] [--small]``

For each size, a separate process (this module with ``--child``) runs ffmpeg and streams its output
through ``stream_to_target`` into the embedded S3 served by this process; the parent samples the
child's peak RSS (VmHWM in /proc/<pid>/status) and the disk writes (write_bytes in /proc/<pid>/io)
of the child and of its ffmpeg, then completes the upload and checks size and ETag. Goals: peak RSS
≤ 3 × part size + 64 MiB and flat across sizes; 0 bytes written to disk. Exit status 1 when missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from pathlib import Path

import msgspec

MiB = 1024 * 1024
#: Frame geometry of the generated video: raw yuv420p frames of 1280×720 are 1,382,400 bytes.
WIDTH, HEIGHT = 1280, 720
FRAME_BYTES = WIDTH * HEIGHT * 3 // 2
#: Seconds between samples of the child's /proc files.
SAMPLE_INTERVAL = 0.02
#: Memory the goal allows beyond the part buffers: interpreter, libraries, socket and pipe buffers.
RSS_ALLOWANCE = 64 * MiB
#: Most peak-RSS difference between output sizes that still counts as flat.
FLAT_TOLERANCE = 8 * MiB
#: Presigned URLs of the benchmark live this long, seconds.
EXPIRES = 3600
#: The one size of ``--small`` (CI).
SMALL_SIZES = "10M"
DEFAULT_SIZES = "10M,100M,1G"
CONTENT_TYPE = "video/x-raw"


class ChildJob(msgspec.Struct, frozen=True, kw_only=True):
    """What the parent hands the child on stdin."""

    argv: list[str]
    target: bytes  # an encoded UploadTarget
    max_bytes: int
    parts_in_flight: int


class ChildResult(msgspec.Struct, frozen=True, kw_only=True):
    """What the child prints on stdout."""

    mode: str
    size: int
    sha256: str
    etag: str
    parts: list[tuple[int, str]]
    upload_id: str
    seconds: float
    peak_buffered: int


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the table."""

    size: int
    #: seconds inside stream_to_target (ffmpeg running); wall adds the child's start-up
    seconds: float
    wall: float
    peak_rss: int
    written: int
    ffmpeg_written: int
    mode: str
    parts: int


def parse_size(text: str) -> int:
    """``10M`` → 10,000,000 bytes (decimal K/M/G; ``Mi``/``Gi`` binary)."""
    text = text.strip()
    units = {"Ki": 1024, "Mi": MiB, "Gi": 1024 * MiB, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def part_size_arg(text: str) -> int:
    """``8M`` as a part size is 8 MiB (part sizes are binary)."""
    text = text.strip()
    if text[-1:] in "KMG" and not text.endswith("i"):
        text += "i"
    return parse_size(text)


def ffmpeg_argv(size: int) -> list[str]:
    """ffmpeg producing at least ``size`` bytes of raw video on stdout (whole frames)."""
    frames = max(1, math.ceil(size / FRAME_BYTES))
    return [
        "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-nostats", "-progress", "pipe:2",
        "-f", "lavfi", "-i", f"testsrc2=size={WIDTH}x{HEIGHT}:rate=25", "-frames:v", str(frames),
        "-f", "rawvideo", "-pix_fmt", "yuv420p", "pipe:1",
    ]


# ------------------------------------------------------------------------------------- the child


async def child_main() -> None:
    """The uploader's data path on its own: ffmpeg → stream_to_target; the result on stdout."""
    import aiohttp

    from actors.adapters.ffmpeg import FfmpegProcess
    from actors.adapters.upload import stream_to_target
    from messages.types import UploadTarget

    job = msgspec.json.decode(sys.stdin.buffer.read(), type=ChildJob)
    target = msgspec.json.decode(job.target, type=UploadTarget)
    async with aiohttp.ClientSession() as session, FfmpegProcess(job.argv, max_bytes=job.max_bytes) as ff:
        result = await stream_to_target(ff.stdout, target, session=session, max_bytes=job.max_bytes,
                                        parts_in_flight=job.parts_in_flight, source_done=ff.check)
    sys.stdout.buffer.write(msgspec.json.encode(ChildResult(
        mode=result.mode, size=result.size, sha256=result.sha256, etag=result.etag,
        parts=[(p.number, p.etag) for p in result.parts], upload_id=result.upload_id,
        seconds=result.seconds, peak_buffered=result.peak_buffered,
    )))


# ------------------------------------------------------------------------------------ the parent


def _status_kib(pid: int, field: str) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _write_bytes(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError, ValueError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


class Sampler:
    """Peak RSS and disk writes of a process and its children, kept from the last samples."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0
        self.written = 0
        self.children_written: dict[int, int] = {}

    def sample(self) -> None:
        """Read the /proc files once (values only grow, so the last sample is the best)."""
        self.peak_rss = max(self.peak_rss, _status_kib(self.pid, "VmHWM") * 1024)
        self.written = max(self.written, _write_bytes(self.pid))
        for child in _children(self.pid):
            self.children_written[child] = max(self.children_written.get(child, 0), _write_bytes(child))


class S3Store:
    """The embedded S3: a real multipart upload, completed and checked by HEAD afterwards."""

    name = "embedded S3 (moto)"

    def __init__(self, storage) -> None:
        self.storage = storage

    async def prepare(self, key: str, *, max_bytes: int, part_size: int):
        """An UploadTarget for ``key`` as the coordinator would send it."""
        from actors.core.parts import plan_parts
        from messages.types import PartUpload, UploadTarget

        planned_size, count = plan_parts(max_bytes, part_size=part_size)
        upload_id = await self.storage.create_multipart(key, content_type=CONTENT_TYPE)
        return UploadTarget(
            key=key,
            content_type=CONTENT_TYPE,
            put_url=await self.storage.presign_put(key, content_type=CONTENT_TYPE, expires=EXPIRES),
            multipart=PartUpload(
                upload_id=upload_id,
                part_size=planned_size,
                part_urls=await self.storage.presign_parts(key, upload_id, count=count, expires=EXPIRES),
                abort_url=await self.storage.presign_abort(key, upload_id, expires=EXPIRES),
            ),
        )

    async def finish(self, key: str, result: ChildResult) -> None:
        """Complete the upload and check what HEAD says against what was streamed."""
        if result.mode == "multipart":
            etag = await self.storage.complete_multipart(key, result.upload_id, result.parts)
            assert etag == result.etag, (etag, result.etag)
        info = await self.storage.head(key)
        assert info is not None and info.size == result.size and info.etag == result.etag
        await self.storage.delete(key)


class NullStore:
    """A loopback sink that reads and discards every body: the uploader's own speed, no store's."""

    name = "null sink (bodies discarded)"

    def __init__(self, url: str) -> None:
        self.url = url

    @staticmethod
    async def handle(request):
        """Read the body; answer the ETag the client's Content-MD5 announces."""
        import base64

        from aiohttp import web

        while await request.content.readany():
            pass
        digest = base64.b64decode(request.headers.get("Content-MD5", ""))
        return web.Response(status=204 if request.method == "DELETE" else 200,
                            headers={"ETag": f'"{digest.hex()}"'})

    async def prepare(self, key: str, *, max_bytes: int, part_size: int):
        """A target whose every URL is this sink."""
        from actors.core.parts import plan_parts
        from messages.types import PartUpload, UploadTarget

        planned_size, count = plan_parts(max_bytes, part_size=part_size)
        return UploadTarget(
            key=key, content_type=CONTENT_TYPE, put_url=f"{self.url}/{key}",
            multipart=PartUpload(upload_id="null", part_size=planned_size,
                                 part_urls=[f"{self.url}/{key}?partNumber={n}" for n in range(1, count + 1)],
                                 abort_url=f"{self.url}/{key}?uploadId=null"),
        )

    async def finish(self, key: str, result: ChildResult) -> None:
        """Nothing was kept."""


async def run_one(store, size: int, *, part_size: int, parts_in_flight: int) -> Row:
    """Prepare a target, run the child, sample it, then let the store complete and check the upload."""
    key = f"bench/{size}.raw"
    max_bytes = size + 2 * FRAME_BYTES + part_size  # whole frames overshoot size a little
    target = await store.prepare(key, max_bytes=max_bytes, part_size=part_size)
    job = ChildJob(argv=ffmpeg_argv(size), target=msgspec.json.encode(target), max_bytes=max_bytes,
                   parts_in_flight=parts_in_flight)
    started = time.monotonic()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.uploader", "--child",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    sampler = Sampler(child.pid)
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(msgspec.json.encode(job))
    child.stdin.close()
    reading = asyncio.ensure_future(child.stdout.read())
    try:
        while not reading.done():
            sampler.sample()
            await asyncio.wait([reading], timeout=SAMPLE_INTERVAL)
        output = await reading
    finally:
        if child.returncode is None and not reading.done():
            child.kill()
        await child.wait()
    wall = time.monotonic() - started
    if child.returncode != 0:
        raise SystemExit(f"the uploader child failed with status {child.returncode}")
    result = msgspec.json.decode(output, type=ChildResult)
    await store.finish(key, result)
    return Row(size=result.size, seconds=result.seconds, wall=wall, peak_rss=sampler.peak_rss,
               written=sampler.written, ffmpeg_written=sum(sampler.children_written.values()),
               mode=result.mode, parts=len(result.parts))


def render(rows: list[Row], *, part_size: int, parts_in_flight: int) -> tuple[str, bool]:
    """The table and whether every goal was met."""
    rss_goal = 3 * part_size + RSS_ALLOWANCE
    lines = [
        f"part size {part_size // MiB} MiB, {parts_in_flight} parts in flight; "
        f"goal: peak RSS ≤ {rss_goal // MiB} MiB (3 × part + 64 MiB), flat; 0 bytes written",
        f"{'size':>13} {'mode':>9} {'parts':>5} {'seconds':>8} {'MB/s':>8} {'wall s':>7} {'peak RSS MiB':>13} "
        f"{'disk writes (uploader+ffmpeg)':>30}",
    ]
    ok = True
    for row in rows:
        written = row.written + row.ffmpeg_written
        good = row.peak_rss <= rss_goal and written == 0
        ok &= good
        lines.append(
            f"{row.size:>13,} {row.mode:>9} {row.parts:>5} {row.seconds:>8.2f} "
            f"{row.size / 1e6 / row.seconds:>8.1f} {row.wall:>7.2f} {row.peak_rss / MiB:>13.1f} {written:>30,}"
            f"{'' if good else '  ← goal missed'}"
        )
    # Outputs of fewer parts than buffers never allocate them all; flatness is judged on the others.
    full = [row.peak_rss for row in rows if row.parts > parts_in_flight + 1]
    if len(full) > 1:
        spread = max(full) - min(full)
        flat = spread <= FLAT_TOLERANCE
        ok &= flat
        lines.append(f"peak RSS spread across sizes using every buffer: {spread / MiB:.1f} MiB "
                     f"({'flat' if flat else 'NOT flat'}; tolerance {FLAT_TOLERANCE // MiB} MiB)")
    return "\n".join(lines), ok


async def bench(sizes: list[int], *, part_size: int, parts_in_flight: int, store: str) -> bool:
    """Run every size against the chosen store and print the table; True when the goals are met."""
    async with _open_store(store) as opened:
        rows = [await run_one(opened, size, part_size=part_size, parts_in_flight=parts_in_flight)
                for size in sizes]
    table, ok = render(rows, part_size=part_size, parts_in_flight=parts_in_flight)
    print(f"store: {opened.name}")
    print(table)
    return ok


@contextlib.asynccontextmanager
async def _open_store(kind: str):
    if kind == "null":
        from aiohttp import web

        from actors.runtime.http import serving

        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", NullStore.handle)
        async with serving(app) as port:
            yield NullStore(f"http://127.0.0.1:{port}")
        return
    from storage.embedded import EmbeddedS3, random_bucket_name
    from storage.s3 import Storage

    with EmbeddedS3(bucket=random_bucket_name("ggt-bench")) as s3:
        async with Storage(s3.config) as storage:
            yield S3Store(storage)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.uploader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated output sizes (10M, 1G …)")
    parser.add_argument("--part-size", default="8M", type=part_size_arg, help="multipart part size (MiB)")
    parser.add_argument("--parts-in-flight", default=2, type=int)
    parser.add_argument("--small", action="store_true", help=f"CI mode: {SMALL_SIZES} only")
    parser.add_argument("--store", choices=("s3", "null"), default="s3",
                        help="s3: the embedded S3 (default); null: a sink measuring the uploader alone")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(child_main())
        return 0
    sizes = [parse_size(s) for s in (SMALL_SIZES if args.small else args.sizes).split(",") if s.strip()]
    ok = asyncio.run(bench(sizes, part_size=args.part_size, parts_in_flight=args.parts_in_flight,
                           store=args.store))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
