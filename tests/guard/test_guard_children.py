"""Children start with an allow-listed environment: the service's secrets never reach ffmpeg or yt-dlp.

The processes are started exactly as the uploader starts them (``guarded_plan``, ``feeder_argv``,
``ffmpeg_argv``, ``guard.subprocess_env``) while the actor's own environment holds the secrets;
their ``/proc/<pid>/environ`` is read while they run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from actors.adapters.ffmpeg import FfmpegProcess
from actors.core.ffmpeg_args import ffmpeg_argv
from actors.guard import FetchGuard
from actors.uploader import feeder_argv, guarded_plan
from messages.types import AudioEncoding, InputVia, MediaInput, MediaPlan
from tests.fixtures.media import MediaServer

ALLOW = ("127.0.0.1/32",)
#: what the actor's environment holds in production (values made up for the test)
SECRETS = {
    "GGT_S3_SECRET_ACCESS_KEY": "s3-secret-value-0xfeed",
    "GGT_S3_ACCESS_KEY_ID": "s3-key-id-0xface",
    "GGT_BUS_KEY": "bus-key-value-0xbeef",
    "GGT_AMQP_URL": "amqp://ggt:broker-password-0xcafe@127.0.0.1:5672/",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-0xdead",
}


def environ_of(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with, from /proc."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def descendants(pid: int) -> list[int]:
    """Every running descendant of ``pid`` (children of children included)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def assert_no_secret(environ: dict[str, str]) -> None:
    text = "\n".join(f"{k}={v}" for k, v in environ.items())
    for name, value in SECRETS.items():
        assert name not in environ and value not in text, name
    assert not [name for name in environ if name.startswith("GGT_")]


async def test_ffmpeg_and_the_feeder_of_a_conversion_hold_no_secret_of_the_service(
    monkeypatch: pytest.MonkeyPatch, media_server: MediaServer
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    plan = MediaPlan(
        inputs=[MediaInput(url=media_server.url("slow/audio.mp3?rate=20000"), via=InputVia.YTDLP_PIPE)],
        audio=AudioEncoding(input=0, copy=True), format="mp3", quality="128", content_type="audio/mpeg",
        extension="mp3", duration=6, max_bytes=10**8,
    )  # fmt: skip
    async with FetchGuard(allow=ALLOW) as guard:
        guarded = guarded_plan(plan, guard)
        async with FfmpegProcess(
            ffmpeg_argv(guarded, network_timeout=10, wrap_input=guard.input_args),
            feeder_argv=feeder_argv(guarded, proxy_url=guard.proxy_url, timeout=10),
            env=guard.subprocess_env(os.environ), time_limit=60,
        ) as ff:
            # output means the feeder fetched and ffmpeg converted: both have long been exec'd
            await ff.stdout.readexactly(1)
            assert ff.feeder_pid is not None
            pids = [ff.pid, ff.feeder_pid, *descendants(ff.pid), *descendants(ff.feeder_pid)]
            environs = {pid: environ_of(pid) for pid in pids}
    assert os.environ["GGT_BUS_KEY"] == SECRETS["GGT_BUS_KEY"]  # the actor itself does hold them
    for environ in environs.values():
        assert_no_secret(environ)
    assert environs[ff.feeder_pid]["http_proxy"] == guard.proxy_url


async def test_ffmpeg_started_without_an_environment_gets_the_allow_list_not_the_actors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    argv = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i", "sine=duration=30",
            "-f", "wav", "pipe:1"]
    async with FfmpegProcess(argv, time_limit=60) as ff:
        await ff.stdout.readexactly(1)
        environ = environ_of(ff.pid)
    assert_no_secret(environ)
    assert environ["PATH"] == os.environ["PATH"]


async def test_deno_run_as_ytdlp_runs_it_cannot_open_a_socket() -> None:
    """yt-dlp runs Deno without ``--allow-net`` (and ``--no-prompt``): a site's challenge script that
    tries to fetch gets a permission error, and the listener sees nothing."""
    import asyncio

    from yt_dlp.extractor.youtube.jsc._builtin.deno import DenoJCP

    from actors.adapters.tools import deno_path
    from actors.guard.children import child_env

    deno = deno_path()
    assert deno, "Deno is part of the locked install (the deno package)"
    # the builtin solver variant: yt-dlp's base options plus these two (DenoJCP._run_js_runtime)
    options = [*DenoJCP._DENO_BASE_OPTIONS, "--no-npm", "--cached-only"]
    assert not any(o.startswith(("--allow-net", "-A", "--allow-all")) for o in options)
    connections = 0

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    script = (f"try {{ await fetch('http://127.0.0.1:{port}/'); console.log('fetched') }} "
              f"catch (e) {{ console.log('refused: ' + e.name) }}\n"
              f"try {{ await Deno.connect({{hostname: '127.0.0.1', port: {port}}}); console.log('connected') }} "
              f"catch (e) {{ console.log('refused: ' + e.name) }}\n")
    try:
        proc = await asyncio.create_subprocess_exec(
            deno, "run", *options, "-", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=child_env(os.environ))
        async with asyncio.timeout(60):
            out, err = await proc.communicate(script.encode())
    finally:
        server.close()
        await server.wait_closed()
    lines = out.decode().split()
    assert "fetched" not in lines and "connected" not in lines, (out, err)
    assert out.decode().count("refused: NotCapable") + out.decode().count("refused: PermissionDenied") == 2, (out, err)
    assert connections == 0
