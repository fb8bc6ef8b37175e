"""The command line as a user runs it: the main job offline, its errors, and submit --follow."""

from __future__ import annotations

import asyncio
import os
import sys

from actors.probe import ffprobe
from tests.fixtures.pipeline import pipeline_settings
from tests.support.cluster import actor_cluster
from tests.support.processes import ROOT, settings_env


async def getgoodtape(*args: str, env: dict[str, str] | None = None, cwd=None) -> tuple[int, str, str]:
    """Run ``getgoodtape ARGS`` as a separate process with only ``env``'s GGT_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GGT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors.cli", *args, cwd=cwd or ROOT, env={**clean, **(env or {}), "PYTHONPATH": str(ROOT)},
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
    code, _, err = await getgoodtape("run", "coordinator", env={"GGT_AMQP_URL": amqp_url})
    assert code != 0 and "GGT_S3_ENDPOINT" in err


async def test_convert_refuses_a_local_file_on_a_shared_broker(media_files, amqp_url):
    code, _, err = await getgoodtape("convert", str(media_files["audio.mp3"]), "-f", "mp3",
                                     env={"GGT_AMQP_URL": amqp_url})
    assert code == 2 and "in-memory bus" in err
