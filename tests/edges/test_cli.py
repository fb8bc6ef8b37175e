"""The command line as a user runs it: the main job offline, its errors, and submit --follow."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from actors.adapters.ffprobe import ffprobe
from tests.fixtures.broker import TEST_BUS_KEY
from tests.fixtures.pipeline import pipeline_settings
from tests.support.cluster import actor_cluster
from tests.support.processes import ROOT, settings_env


async def getgoodtape(*args: str, env: dict[str, str] | None = None, cwd=None) -> tuple[int, str, str]:
    """Run ``getgoodtape ARGS`` as a separate process with only ``env``'s GGT_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GGT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors.cli", *args, cwd=cwd or ROOT,
        env={**clean, **(env or {}), "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    return proc.returncode, out.decode(), err.decode()


async def test_convert_a_local_file_with_nothing_configured_saves_a_verified_mp3(media_files, tmp_path):
    output = tmp_path / "talk.mp3"
    code, out, err = await getgoodtape("convert", str(media_files["av_h264_aac.mp4"]), "-f", "mp3", "-q", "128",
                                       "-o", str(output))
    assert code == 0, err
    assert out.strip().startswith("http://127.0.0.1:"), "the download URL is printed on stdout"
    assert "done converted/" in err and "preparing" in err
    probe = await ffprobe(str(output), timeout=30)
    assert probe.audio.codec_name == "mp3" and abs(probe.best_duration - 6) < 0.5


async def test_convert_prints_the_error_code_and_fails_for_a_bad_source(tmp_path):
    code, _, err = await getgoodtape("convert", "ftp://127.0.0.1/a.mp4", "-f", "mp3", cwd=tmp_path)
    assert code == 1
    assert "unsupported_url" in err
    assert list(tmp_path.iterdir()) == [], "nothing is saved"


async def test_convert_refuses_a_quality_that_does_not_fit_the_format():
    code, _, err = await getgoodtape("convert", "https://example.com/a.mp4", "-f", "mp3", "-q", "720")
    assert code == 1 and "invalid_request" in err and "quality" in err


async def test_submit_follow_publishes_to_a_running_deployment_and_follows_the_job(
        storage_config, storage, amqp_url, media_server, rabbit_bus, tmp_path):
    settings = pipeline_settings(storage_config, amqp_url=amqp_url)
    async with actor_cluster(settings, tmp_path) as cluster:
        cluster.start_all()
        code, out, err = await getgoodtape("submit", media_server.url("audio.mp3"), "-f", "opus", "--follow",
                                           "--json", env=settings_env(settings))
    assert code == 0, err
    assert '"type":"job_completed"' in out and '"format":"opus"' in out


async def test_submit_without_a_broker_configured_says_what_to_set():
    code, _, err = await getgoodtape("submit", "https://example.com/a.mp4", "-f", "mp3")
    assert code == 2 and "GGT_AMQP_URL" in err


async def test_run_all_with_nothing_configured_starts_on_embedded_services_and_stops_on_sigterm(tmp_path):
    import signal

    clean = {k: v for k, v in os.environ.items() if not k.startswith("GGT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors.cli", "run", "all", cwd=ROOT, env={**clean, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    seen = []
    async with asyncio.timeout(60):
        while not any("actors running" in line for line in seen):
            line = (await proc.stderr.readline()).decode()
            assert line, f"exited early: {seen}"
            seen.append(line)
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0


async def test_a_separate_coordinator_without_storage_configured_says_what_to_set(amqp_url):
    code, _, err = await getgoodtape("run", "coordinator", env={"GGT_AMQP_URL": amqp_url, "GGT_BUS_KEY": TEST_BUS_KEY})
    assert code != 0 and "GGT_S3_ENDPOINT" in err


async def test_an_actor_on_rabbitmq_without_a_bus_key_refuses_to_start_saying_so(amqp_url):
    code, _, err = await getgoodtape("run", "converter", env={"GGT_AMQP_URL": amqp_url})
    assert code != 0 and "GGT_BUS_KEY is not set" in err and "Traceback" not in err


async def test_convert_refuses_a_local_file_on_a_shared_broker(media_files, amqp_url):
    code, _, err = await getgoodtape("convert", str(media_files["audio.mp3"]), "-f", "mp3",
                                     env={"GGT_AMQP_URL": amqp_url})
    assert code == 2 and "in-memory bus" in err


def test_error_details_are_printed_as_plain_text_markup_and_all(capsys):
    from actors.cli.convert import report
    from messages.errors import Error, ErrorCode
    from messages.types import JobFailed, Stage

    hostile = "server said [/b] and [red]oops[/red] [link=http://x]y[/link]"
    failed = JobFailed(job_id="job-00000001", stage=Stage.CONVERTING,
                       error=Error.of(ErrorCode.CONVERSION_FAILED, hostile))
    assert report(failed, saved=None, as_json=False) == 1
    err = " ".join(capsys.readouterr().err.split())  # rich may wrap long lines
    assert hostile in err


#: what `getgoodtape --help` and `--version` must not load (each is a few hundred ms of start-up)
HEAVY_MODULES = ("yt_dlp", "moto", "werkzeug", "aiohttp", "aio_pika", "rich", "aiobotocore")


def modules_loaded_by_parsing(*argv: str) -> set[str]:
    """The HEAVY_MODULES a fresh interpreter has loaded after `getgoodtape ARGV` parsed its arguments."""
    script = ("import sys, actors.cli as cli\n"
              "argv = sys.argv[1:]\n"
              "try:\n"
              "    cli.build_parser(only=cli.command_of(argv)).parse_args(argv)\n"
              "except SystemExit as exc:\n"
              "    assert exc.code == 0, exc.code\n"
              f"print(' '.join(m for m in {HEAVY_MODULES!r} if m in sys.modules), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=True)
    return set(result.stderr.splitlines()[-1].split()) if result.stderr.strip() else set()


def test_help_and_version_load_none_of_the_heavy_libraries():
    assert modules_loaded_by_parsing("--version") == set()
    assert modules_loaded_by_parsing("--help") == set()
    assert modules_loaded_by_parsing("provision", "service") == set()


def test_convert_on_its_own_loads_neither_ytdlp_nor_the_embedded_s3_nor_aio_pika_to_parse():
    # yt-dlp runs in the converter's extraction workers, moto only when the embedded S3 starts,
    # aio-pika only when GGT_AMQP_URL names a broker
    loaded = modules_loaded_by_parsing("convert", "https://example.com/a.mp4", "-f", "mp3")
    assert loaded & {"yt_dlp", "moto", "werkzeug", "aio_pika"} == set()
    assert "rich" in loaded, "the command's own module was loaded (its progress bar)"
