"""Nothing executable crosses the wire, cover-art bombs stay small, unknown durations complete.

A StreamToStorage names *what* (typed values); the uploader builds every ffmpeg argument itself and
sends bytes only to the configured storage. Attacks are tried as attacks: on loopback, with a
listener that proves nothing reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import msgspec
import psutil
import pytest

from actors.adapters.ffprobe import ffprobe
from actors.bootstrap.wiring import topology
from actors.core.ffmpeg_args import ImageDemuxer as Demuxer
from actors.core.ffmpeg_args import cover_demuxer, ffmpeg_argv
from actors.core.plan import Limits, plan_media
from actors.core.source import SourceInfo, SourceInput
from actors.core.target import upload_url_allowed
from actors.uploader import Uploader, check_plan_urls, feeder_argv
from bus.memory import MemoryBus
from messages.errors import ErrorCode, JobError
from messages.types import (
    ConvertRequested,
    Format,
    InputVia,
    JobCompleted,
    JobFailed,
    MediaInput,
    MediaPlan,
    PartUpload,
    StreamToStorage,
    UploadTarget,
    VerifyObject,
)
from tests.fixtures.broker import test_settings as settings_for
from tests.fixtures.media import run_ffmpeg

LIMITS = Limits(max_duration=3600, max_output_bytes=1024**3)
ENDPOINT = "http://127.0.0.1:9000"
BUCKET = "ggt-media"
KEY = "converted/2026/12/job-00000001-0123456789abcdef.mp3"
SETTINGS = settings_for(s3_endpoint=ENDPOINT, s3_bucket=BUCKET, s3_path_style=True)
#: the pixels of the cover-art bomb: a few hundred KB of PNG that decode to 432 MB of RGB
BOMB_SIDE = 12_000
#: the whole convert command, children included, must stay below this (issue #12)
PEAK_LIMIT_BYTES = 300 * 1024 * 1024

#: inputs that would make ffmpeg read a local file, a descriptor, raw TCP or a second option
NOT_HTTP = [
    "file:///etc/passwd",
    "/etc/passwd",
    "concat:http://a.example/x|file:///etc/passwd",
    "pipe:0",
    "fd:3",
    "subfile:,,start,0,end,0,,:/etc/passwd",
    "data:text/plain;base64,AAAA",
    "httpproxy://127.0.0.2:80/",
    "tcp://127.0.0.2:80",
    "http://a.example/x -i /etc/passwd",
    "http://a.example/x\n",
]


def good_plan(url: str = "https://cdn.example.org/a.mp4", **source) -> MediaPlan:
    """The converter's mp3 plan for a 6 s H.264/AAC source at ``url``."""
    fields = dict(inputs=[SourceInput(url=url)], duration=6.0, audio_codec="aac", video_codec="h264",
                  height=240, thumbnail_url="https://cdn.example.org/t.jpg", title="A Song")
    fields.update(source)
    return plan_media(request=ConvertRequested(url="https://example.org/p", format=Format.MP3),
                      source=SourceInfo(**fields), limits=LIMITS)


def command(plan: MediaPlan, **target) -> StreamToStorage:
    """A StreamToStorage for ``plan`` to the configured bucket (``target`` overrides its fields)."""
    fields = dict(key=KEY, content_type="audio/mpeg", put_url=f"{ENDPOINT}/{BUCKET}/{KEY}?X-Amz-Signature=1")
    fields.update(target)
    return StreamToStorage(job_id="job-00000001", plan=plan, target=UploadTarget(**fields), time_limit=60)


def on_the_wire(message: StreamToStorage, change) -> dict:
    """``message`` as JSON builtins after ``change(builtins)``: what a forger could publish."""
    data = msgspec.to_builtins(message)
    change(data)
    return data


def decodes(data: dict) -> bool:
    """Whether the uploader's decoder would accept ``data`` as a StreamToStorage."""
    try:
        msgspec.convert(data, StreamToStorage)
    except msgspec.ValidationError:
        return False
    return True


# ---------------------------------------------------------------------------- a local file


@pytest.mark.parametrize("url", NOT_HTTP)
def test_a_plan_cannot_name_a_local_file_on_the_wire_where_it_is_made_or_where_it_is_used(url):
    message = command(good_plan())
    assert decodes(on_the_wire(message, lambda d: None))
    assert not decodes(on_the_wire(message, lambda d: d["plan"]["inputs"][0].update(url=url)))
    assert not decodes(on_the_wire(message, lambda d: d["plan"].update(thumbnail_url=url)))
    # where it is made: the converter's plan refuses such an input or thumbnail
    for source in ({"inputs": [SourceInput(url=url)]}, {"thumbnail_url": url}):
        with pytest.raises(JobError) as made:
            good_plan(**source)
        assert made.value.code is ErrorCode.URL_NOT_ALLOWED
    # where it is used: a plan that never went through a decoder still builds no argv
    forged = msgspec.structs.replace(message.plan, inputs=[MediaInput(url=url)])
    for use in (lambda: ffmpeg_argv(forged, network_timeout=5), lambda: check_plan_urls(forged, SETTINGS),
                lambda: feeder_argv(
                    msgspec.structs.replace(forged, inputs=[MediaInput(url=url, via=InputVia.YTDLP_PIPE)]),
                    proxy_url="http://127.0.0.1:1", timeout=5)):
        with pytest.raises(JobError) as used:
            use()
        assert used.value.code is ErrorCode.URL_NOT_ALLOWED


def test_the_uploader_checks_a_plans_urls_against_the_deny_list_too():
    plan = msgspec.structs.replace(command(good_plan()).plan, inputs=[MediaInput(url="http://10.1.2.3/a.mp4")])
    allowing = settings_for(allow_networks=("10.0.0.0/8",))
    check_plan_urls(plan, allowing)  # allowed: nothing raised
    with pytest.raises(JobError) as denied:
        check_plan_urls(plan, settings_for(allow_networks=("10.0.0.0/8",), deny_networks=("10.1.0.0/16",)))
    assert denied.value.code is ErrorCode.URL_NOT_ALLOWED


def test_headers_tags_and_format_selectors_cannot_carry_lines_or_options():
    message = command(good_plan())
    for change in (
        lambda d: d["plan"]["inputs"][0].update(headers={"Cookie": "a=1\r\nHost: internal"}),
        lambda d: d["plan"]["inputs"][0].update(headers={"X-A:": "1"}),
        lambda d: d["plan"]["inputs"][0].update(headers={f"X-{i}": "1" for i in range(33)}),
        lambda d: d["plan"]["inputs"][0].update(format_id="--exec=id"),
        lambda d: d["plan"]["tags"].update(title="a\nb"),
        lambda d: d["plan"]["audio"].update(kbps=10**9),
        lambda d: d["plan"].update(start=-1),
    ):
        assert not decodes(on_the_wire(message, change))
    # the converter turns a hostile page's values into plain ones instead of failing the job
    plan = good_plan(inputs=[SourceInput(url="https://a.example/x",
                                         headers={"Cookie": "a=1\r\nX-Evil: 1", "Bad Name": "x"})],
                     title="Song\n-i /etc/passwd")
    assert plan.inputs[0].headers == {"Cookie": "a=1X-Evil: 1"}
    argv = ffmpeg_argv(plan, network_timeout=5)
    assert argv.count("-i") == 1 and "title=Song -i /etc/passwd" in argv


def test_a_plan_cannot_add_a_second_output_or_raw_arguments():
    message = command(good_plan())

    def smuggle(data):
        data["plan"]["output_args"] = ["-y", "/tmp/stolen.mp3"]
        data["plan"]["input_args"] = [["-f", "concat", "-safe", "0", "-i", "/etc/passwd"]]

    decoded = msgspec.convert(on_the_wire(message, smuggle), StreamToStorage)  # unknown fields are ignored
    argv = ffmpeg_argv(decoded.plan, network_timeout=5)
    assert argv == ffmpeg_argv(message.plan, network_timeout=5)
    assert argv[-1] == "pipe:1" and argv.count("pipe:1") == 1
    assert not any(arg.startswith("/") or "concat" in arg or "stolen" in arg for arg in argv)
    inputs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-i"]
    assert inputs == ["https://cdn.example.org/a.mp4"]


# ------------------------------------------------------------------------ a foreign destination


def test_upload_urls_are_allowed_only_for_the_configured_endpoint_bucket_and_prefix():
    ok = f"{ENDPOINT}/{BUCKET}/{KEY}?X-Amz-Signature=abc"
    assert upload_url_allowed(ok, SETTINGS, key=KEY)
    assert upload_url_allowed(f"{ENDPOINT}/{BUCKET}/{KEY}?uploadId=1&partNumber=2", SETTINGS, key=KEY)
    assert upload_url_allowed(f"http://127.0.0.1:80/{BUCKET}/{KEY}", settings_for(
        s3_endpoint="http://127.0.0.1", s3_bucket=BUCKET), key=KEY)
    refused = [
        f"http://127.0.0.1:9001/{BUCKET}/{KEY}",  # another port (an attacker's listener)
        f"http://127.0.0.2:9000/{BUCKET}/{KEY}",  # another host
        f"https://127.0.0.1:9000/{BUCKET}/{KEY}",  # another scheme
        f"{ENDPOINT}/other-bucket/{KEY}",
        f"{ENDPOINT}/{BUCKET}/jobs/job-00000001.json",  # a job record, not a converted file
        f"{ENDPOINT}/{BUCKET}/converted/2026/12/other.mp3",  # not this command's key
        f"http://user:pw@127.0.0.1:9000/{BUCKET}/{KEY}",
        f"file:///{BUCKET}/{KEY}",
        "not a url",
    ]
    for url in refused:
        assert not upload_url_allowed(url, SETTINGS, key=KEY), url
    assert not upload_url_allowed(ok, settings_for(s3_endpoint=""), key=KEY)  # no endpoint known: nothing
    assert not upload_url_allowed(f"{ENDPOINT}/{BUCKET}/jobs/x", SETTINGS, key="jobs/x")
    assert not upload_url_allowed(f"{ENDPOINT}/{BUCKET}/converted/../jobs/x", SETTINGS, key="converted/../jobs/x")
    virtual = settings_for(s3_endpoint="https://s3.example.org", s3_bucket=BUCKET, s3_path_style=False)
    assert upload_url_allowed(f"https://{BUCKET}.s3.example.org/{KEY}", virtual, key=KEY)
    assert not upload_url_allowed(f"https://evil.s3.example.org/{KEY}", virtual, key=KEY)


class Listener:
    """A loopback TCP server that records every connection (and answers nothing useful)."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            await reader.read(1024)
            writer.write(b"HTTP/1.1 500 Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def started(actor_class, settings):
    """An actor of ``actor_class`` (set up, torn down) on a throw-away in-memory bus."""
    actor = actor_class(settings=settings, bus=MemoryBus(topology(settings)))
    await actor.setup()
    try:
        yield actor
    finally:
        await actor.teardown()


@contextlib.asynccontextmanager
async def uploader(**settings):
    """An Uploader with the test settings (``settings`` override them)."""
    merged = {"s3_endpoint": ENDPOINT, "s3_bucket": BUCKET, "allow_networks": ("127.0.0.1/32",),
              "network_timeout": 5.0, **settings}
    async with started(Uploader, settings_for(**merged)) as actor:
        yield actor


def handler_context(published: list) -> SimpleNamespace:
    """What the uploader's handler reads of its context: a first, unreplayed delivery; publishes recorded."""

    async def publish(message) -> None:
        published.append(message)

    return SimpleNamespace(envelope=SimpleNamespace(replays=0), attempt=1, publish=publish,
                           bus=SimpleNamespace(publish=publish))


async def test_a_foreign_destination_gets_not_one_connection(media_server):
    plan = good_plan(url=media_server.url("av_h264_aac.mp4"), thumbnail_url=None)
    async with Listener() as attacker:
        foreign = f"http://127.0.0.1:{attacker.port}/{BUCKET}/{KEY}"
        forged = [
            command(plan, put_url=foreign),
            command(plan, multipart=PartUpload(upload_id="u", part_size=5 * 1024 * 1024,
                                               part_urls=[f"{ENDPOINT}/{BUCKET}/{KEY}?partNumber=1", foreign],
                                               abort_url=f"{ENDPOINT}/{BUCKET}/{KEY}?uploadId=u")),
            command(plan, multipart=PartUpload(upload_id="u", part_size=5 * 1024 * 1024,
                                               part_urls=[f"{ENDPOINT}/{BUCKET}/{KEY}?partNumber=1"],
                                               abort_url=foreign)),
        ]
        published: list = []
        async with uploader() as actor:
            for message in forged:
                with pytest.raises(JobError) as refused:
                    await actor.stream(message, handler_context(published))
                assert refused.value.code is ErrorCode.FORBIDDEN_DESTINATION and not refused.value.retryable
        assert attacker.connections == 0 and published == []
        # the control: were the attacker's port the configured endpoint, ffmpeg's bytes would reach it
        async with uploader(s3_endpoint=f"http://127.0.0.1:{attacker.port}") as actor:
            with pytest.raises((JobError, ExceptionGroup)):  # the listener answers 500 to every PUT
                await actor.stream(forged[0], handler_context(published))
        assert attacker.connections >= 1


# ------------------------------------------------------------------------------- cover-art bombs


@pytest.fixture(scope="session")
def bomb_png(media_files):
    """A 12000×12000 PNG (~450 KB) in the media library, served as ``bomb.png``."""
    return media_files._cached("bomb.png", lambda target: run_ffmpeg([
        "-f", "lavfi", "-i", f"color=c=blue:s={BOMB_SIDE}x{BOMB_SIDE}", "-frames:v", "1", "-pix_fmt", "rgb24",
        "-f", "image2", "-c:v", "png", str(target)]))


def picture(tmp_path, ext: str, codec: str) -> bytes:
    """A 64×48 picture encoded with ``codec``."""
    target = tmp_path / f"p.{ext}"
    run_ffmpeg(["-f", "lavfi", "-i", "color=c=red:s=64x48", "-frames:v", "1", "-c:v", codec, "-f", "image2",
                str(target)])
    return target.read_bytes()


def test_a_cover_is_read_with_a_forced_image_demuxer_and_a_bomb_is_refused_by_its_header(tmp_path, bomb_png):
    assert cover_demuxer(picture(tmp_path, "jpg", "mjpeg")) is Demuxer.JPEG
    assert cover_demuxer(picture(tmp_path, "png", "png")) is Demuxer.PNG
    assert cover_demuxer(picture(tmp_path, "webp", "libwebp")) is Demuxer.WEBP
    bomb = bomb_png.read_bytes()
    assert len(bomb) < 2 * 1024 * 1024  # small on the wire: only the pixel check catches it
    refusal = cover_demuxer(bomb[:64])  # the header alone decides
    assert isinstance(refusal, str) and f"{BOMB_SIDE}×{BOMB_SIDE}" in refusal
    for not_a_picture in (b"<html><body>hi</body></html>", b"#EXTM3U\n#EXT-X-KEY:URI=file:///etc/passwd\n",
                          b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, b""):
        assert not isinstance(cover_demuxer(not_a_picture), Demuxer)


async def test_a_page_whose_thumbnail_is_a_pixel_bomb_converts_to_mp3_without_the_cover(
        pipeline, media_server, bomb_png):
    page = media_server.url("page/av_h264_aac.mp4.html?poster=bomb.png")
    final = await pipeline.run(ConvertRequested(url=page, format="mp3"))
    assert isinstance(final, JobCompleted), final
    probed = await ffprobe(final.download_url, timeout=30)
    assert not any(s.attached_pic for s in probed.streams)
    assert media_server.requests_for("bomb.png"), "the thumbnail was fetched and refused, not skipped"


async def test_an_oversized_thumbnail_is_cut_off_at_its_byte_budget(storage_config, storage, media_server,
                                                                   bomb_png):
    from tests.fixtures.pipeline import memory_pipeline

    async with memory_pipeline(storage_config, storage, max_thumbnail_bytes=64 * 1024) as small_budget:
        page = media_server.url("page/av_h264_aac.mp4.html?poster=bomb.png")
        final = await small_budget.run(ConvertRequested(url=page, format="mp3"))
    assert isinstance(final, JobCompleted), final
    probed = await ffprobe(final.download_url, timeout=30)
    assert not any(s.attached_pic for s in probed.streams)


def _tree_pss(root: psutil.Process) -> int:
    """Proportional set size of ``root`` and every descendant alive now: memory they use, shared
    libraries counted once between them (a sum of RSS would count ffmpeg's and ffprobe's twice)."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_full_info().pss
    return total


def test_the_whole_convert_command_stays_under_300_mib_with_a_pixel_bomb_thumbnail(
        media_server, bomb_png, tmp_path):
    page = media_server.url("page/av_h264_aac.mp4.html?poster=bomb.png")
    env = {**os.environ, "GGT_ALLOW_NETWORKS": "127.0.0.1/32", "GGT_S3_ENDPOINT": "", "GGT_AMQP_URL": ""}
    with (tmp_path / "stderr.txt").open("wb") as stderr_file:
        proc = subprocess.Popen([sys.executable, "-m", "actors.cli", "convert", page, "-f", "mp3", "--json",
                                 "-o", str(tmp_path / "out.mp3")], env=env, stdout=subprocess.PIPE,
                                stderr=stderr_file)
    peak = 0
    done = threading.Event()

    def sample() -> None:  # the sum over the tree, every few ms, until the command exits
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                peak = max(peak, _tree_pss(root))
            done.wait(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        stdout = proc.stdout.read()  # until the command closes it (it exits; pytest's timeout bounds it)
        proc.wait()
    finally:
        done.set()
        sampler.join()
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    [final] = [msgspec.json.decode(line) for line in stdout.splitlines() if line.startswith(b'{"type"')]
    assert final["type"] == "job_completed", final
    # (ru_maxrss is no measure here: a child forked from a large pytest process starts with its size)
    print(f"\n[bomb] convert with a {BOMB_SIDE}×{BOMB_SIDE} thumbnail: tree peak {peak / 2**20:.0f} MiB "
          "(sampled PSS sum over the command and its children)")
    assert 0 < peak < PEAK_LIMIT_BYTES


# ----------------------------------------------------------------------------- unknown durations


async def test_a_complete_aac_stream_served_without_a_length_converts_verifies_and_decodes_to_its_length(
        pipeline, media_server, media_files):
    source = media_files.make_media(seconds=8, video=None, audio="aac", ext="aac", name="unsized_tone.aac")
    url = media_server.url(f"unsized/{source.name}")
    probed_source = await ffprobe(url, timeout=30)
    assert probed_source.duration is None  # nobody can know the length up front
    for fmt in ("mp3", "m4a"):
        final = await pipeline.run(ConvertRequested(url=url, format=fmt))
        assert isinstance(final, JobCompleted), final
        assert abs(final.duration - 8) <= 0.5, final.duration
        decoded = await ffprobe(final.download_url, timeout=30, count_packets=fmt == "m4a")
        assert abs(decoded.best_duration - 8) <= 0.5, (fmt, decoded.best_duration)


# ----------------------------------------------------- verdicts: deterministic or worth a retry


@contextlib.asynccontextmanager
async def verifier_on(storage_config):
    """A Verifier on the test bucket."""
    from actors.verifier import Verifier
    from tests.fixtures.pipeline import pipeline_settings

    async with started(Verifier, pipeline_settings(storage_config)) as actor:
        yield actor


async def stored_mp3(storage, media_files) -> VerifyObject:
    """audio.mp3 (6 s) stored under a converted/ key, and the VerifyObject that matches it exactly."""
    import hashlib

    data = media_files.path("audio.mp3").read_bytes()
    key = "converted/2026/12/job-00000001-verdicts.mp3"
    await storage.client.put_object(Bucket=storage.bucket, Key=key, Body=data, ContentType="audio/mpeg")
    return VerifyObject(job_id="job-00000001", key=key, size=len(data), etag=hashlib.md5(data).hexdigest(),
                        content_type="audio/mpeg", format=Format.MP3, duration=6.0,
                        expect_codecs={"audio": "mp3"})


async def test_a_media_mismatch_is_a_verdict_no_retry_can_change_and_lost_bytes_one_it_can(
        storage_config, storage, media_files):
    exact = await stored_mp3(storage, media_files)
    published: list = []
    async with verifier_on(storage_config) as actor:
        for message in (exact,
                        msgspec.structs.replace(exact, duration=60.0),  # not what ffmpeg reported producing
                        msgspec.structs.replace(exact, format=Format.FLAC, content_type="audio/mpeg"),
                        msgspec.structs.replace(exact, size=exact.size + 1)):  # storage holds other bytes
            await actor.verify(message, handler_context(published))
    good, long, container, lost = published
    assert good.ok and not good.problems
    assert not long.ok and not long.retryable and "duration" in long.problems[0]
    assert not container.ok and not container.retryable and "container" in container.problems[0]
    assert not lost.ok and lost.retryable and "size" in lost.problems[0]


async def stored_fragmented_m4a(storage, tmp_path, *, seconds: int, keep: float = 1.0) -> VerifyObject:
    """A fragmented M4A made with the catalog's pipe arguments (as the uploader's ffmpeg writes it),
    its first ``keep`` fraction stored, and the VerifyObject of exactly those bytes (plan: ``seconds``)."""
    import hashlib

    from actors.core.catalog import CATALOG

    path = tmp_path / "fragments.m4a"
    run_ffmpeg(["-f", "lavfi", "-i", f"sine=f=440:duration={seconds}", "-c:a", "aac",
                *CATALOG[Format.M4A].pipe_args, "-f", CATALOG[Format.M4A].muxer, str(path)])
    data = path.read_bytes()[:int(path.stat().st_size * keep)]
    key = f"converted/2026/12/job-00000001-{int(keep * 100)}.m4a"
    await storage.client.put_object(Bucket=storage.bucket, Key=key, Body=data, ContentType="audio/mp4")
    return VerifyObject(job_id="job-00000001", key=key, size=len(data), etag=hashlib.md5(data).hexdigest(),
                        content_type="audio/mp4", format=Format.M4A, duration=float(seconds),
                        expect_codecs={"audio": "aac"})


async def test_a_fragmented_output_is_verified_from_its_head_on_ffmpegs_report_and_read_whole_without_one(
        storage_config, storage, tmp_path):
    whole = await stored_fragmented_m4a(storage, tmp_path, seconds=20)
    half = await stored_fragmented_m4a(storage, tmp_path, seconds=20, keep=0.5)
    published: list = []
    readings: list[tuple[bool, bool]] = []
    async with verifier_on(storage_config) as actor:
        probe = actor.probes.probe

        async def recorded(url, **options):
            readings.append((options["count_packets"], options["head_only"]))
            return await probe(url, **options)

        actor.probes.probe = recorded
        for message in (msgspec.structs.replace(whole, produced=20.0),  # the uploader's report
                        msgspec.structs.replace(whole, produced=0),  # no report: packets counted
                        msgspec.structs.replace(half, produced=0),  # stored bytes cut after 10 s
                        msgspec.structs.replace(whole, produced=9.0)):  # ffmpeg produced 9 of 20 s
            await actor.verify(message, handler_context(published))
    head, counted, cut, short = published
    assert readings == [(False, True), (True, False), (True, False), (False, True)]
    assert head.ok and head.duration == 20.0, head.problems
    assert counted.ok and abs(counted.duration - 20.0) <= 0.1, counted.problems
    assert not cut.ok and not cut.retryable and "cut off" in cut.problems[0], cut.problems
    assert not short.ok and "cut off" in short.problems[0], short.problems


async def test_a_store_that_does_not_answer_is_no_verdict_but_a_retried_storage_unavailable(
        storage_config, storage, media_files):
    from storage import StorageUnavailable

    message = await stored_mp3(storage, media_files)
    published: list = []
    async with verifier_on(storage_config) as actor:
        async def unreachable(key: str):
            raise StorageUnavailable("connect timeout to the store")

        actor.storage.head = unreachable
        with pytest.raises(JobError) as caught:
            await actor.verify(message, handler_context(published))
    assert caught.value.code is ErrorCode.STORAGE_UNAVAILABLE and caught.value.retryable
    assert published == []  # no verdict, so the object is not deleted
    assert await storage.head(message.key) is not None


async def test_a_job_failing_verification_on_its_media_is_announced_not_retryable(
        pipeline, media_server, monkeypatch):
    import actors.core.verdict

    monkeypatch.setattr(actors.core.verdict, "duration_ok", lambda measured, expected: False)
    final = await pipeline.run(ConvertRequested(url=media_server.url("audio.mp3"), format="mp3"))
    assert isinstance(final, JobFailed) and final.error.code is ErrorCode.VERIFICATION_FAILED, final
    assert final.error.retryable is False
    assert await pipeline.stored_keys() == []  # the file was deleted
