"""The operator's first day: a configuration mistake fails fast and says why.

Storage answers that mean configuration map to ``storage_misconfigured`` (not retried); ``getgoodtape
check`` reports each mistake with its fix; actors and ``convert`` refuse to start on one. Storage is
the strict S3 front on loopback (it checks signatures as real stores do); the broker is the test broker.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from actors.cli.check import (
    Status,
    broker_failure,
    check_settings,
    exit_status,
    needs,
    redact_url,
    run_checks,
    skew_check,
)
from actors.runtime.settings import load_settings
from actors.runtime.worker import Actor
from messages.errors import ERRORS, ErrorCode
from storage.embedded import EmbeddedS3, random_bucket_name
from storage.errors import StorageMisconfigured
from storage.s3 import Storage, StorageConfig, storage_failure
from tests.fixtures.broker import TEST_BUS_KEY
from tests.fixtures.strict_s3 import StrictS3

ROOT = Path(__file__).resolve().parents[2]
#: the acceptance bound: a misconfigured process ends within this many seconds
EXIT_WITHIN_S = 30.0


# ------------------------------------------------------------------------- the pure mapping


@pytest.mark.parametrize(("code", "status"), [
    ("NoSuchBucket", 404), ("AccessDenied", 403), ("InvalidAccessKeyId", 403),
    ("SignatureDoesNotMatch", 403), ("AuthorizationHeaderMalformed", 400), ("PermanentRedirect", 301),
])
def test_answers_that_mean_configuration_are_misconfigured(code: str, status: int) -> None:
    kind, hint = storage_failure(code, status)
    assert kind == "misconfigured"
    assert "GGT_S3_" in hint or "bucket" in hint


@pytest.mark.parametrize(("code", "status"), [("InternalError", 500), ("SlowDown", 503), ("ServiceUnavailable", 503)])
def test_outages_stay_unavailable(code: str, status: int) -> None:
    assert storage_failure(code, status)[0] == "unavailable"


def test_a_missing_key_or_a_lost_condition_is_left_to_the_caller() -> None:
    assert storage_failure("NoSuchKey", 404) is None
    assert storage_failure("404", 404) is None  # HEAD of a missing object
    assert storage_failure("PreconditionFailed", 412) is None


def test_bare_statuses_of_a_bucket_call_speak_about_the_bucket() -> None:
    assert storage_failure("404", 404, bucket_call=True)[0] == "misconfigured"
    assert storage_failure("403", 403, bucket_call=True)[0] == "misconfigured"
    assert storage_failure("301", 301, bucket_call=True)[0] == "misconfigured"


def test_storage_misconfigured_is_its_own_code_and_not_retried() -> None:
    assert ErrorCode.STORAGE_MISCONFIGURED == "storage_misconfigured"
    assert ERRORS[ErrorCode.STORAGE_MISCONFIGURED].retryable is False
    assert ERRORS[ErrorCode.STORAGE_UNAVAILABLE].retryable is True


def test_the_runtime_classifies_a_misconfigured_store_as_not_retryable() -> None:
    error = Actor.classify(None, StorageMisconfigured("NoSuchBucket for bucket 'b'"))  # type: ignore[arg-type]
    assert error.code == ErrorCode.STORAGE_MISCONFIGURED and not error.retryable


def test_clock_skew_warns_then_fails() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert skew_check(format_datetime(now - timedelta(seconds=3), usegmt=True), now=now).status is Status.OK
    assert skew_check(format_datetime(now - timedelta(minutes=5), usegmt=True), now=now).status is Status.WARN
    assert skew_check(format_datetime(now + timedelta(minutes=20), usegmt=True), now=now).status is Status.FAIL


def test_broker_failures_name_the_problem_and_hide_the_password() -> None:
    url = "amqp://svc:s3cret@127.0.0.1:5672/"
    assert "s3cret" not in redact_url(url)
    refused = broker_failure(Exception("ACCESS_REFUSED - Login was refused"), url)
    assert refused.status is Status.FAIL and "refused user 'svc'" in refused.detail and "s3cret" not in refused.detail
    assert "unreachable" in broker_failure(ConnectionRefusedError(111, "refused"), url).detail


def test_each_role_checks_only_what_it_needs() -> None:
    assert needs("uploader") == {"broker", "ffmpeg"}
    assert "storage-write" not in needs("converter") | needs("uploader")
    assert needs("coordinator") >= {"broker", "storage-write"}


def test_the_programs_are_reported_with_their_versions_and_a_missing_one_fails_with_its_fix(monkeypatch) -> None:
    from actors.adapters import tools
    from actors.cli import check as check_cmd

    found = {r.what: r for r in check_cmd.check_programs({"ffmpeg", "ffprobe", "yt-dlp"})}
    assert set(found) == {"ffmpeg", "ffprobe", "yt-dlp", "yt-dlp JS solver (yt-dlp-ejs)", "JavaScript runtime (deno)"}
    assert all(r.status is Status.OK for r in found.values()), found
    assert found["yt-dlp"].detail == tools.package("yt-dlp").version
    assert found["ffmpeg"].detail.split()[0] == tools.program("ffmpeg").version != ""
    monkeypatch.setattr(tools, "program", lambda name, **_: tools.Tool(name=name))  # nothing on PATH
    [missing] = check_cmd.check_programs({"ffmpeg"})
    assert missing.status is Status.FAIL and "install ffmpeg" in missing.fix


def test_settings_that_cannot_work_fail_the_check() -> None:
    bad = load_settings({"GGT_DELIVERY_LIMIT": "0", "GGT_DOWNLOAD_URL_TTL": str(8 * 24 * 3600)})
    failed = {r.what for r in check_settings(bad, ["coordinator"]) if r.status is Status.FAIL}
    assert failed == {"setting GGT_DELIVERY_LIMIT", "setting GGT_DOWNLOAD_URL_TTL"}
    assert check_settings(load_settings({}), ["coordinator"]) == []


def test_uploader_or_converter_holding_storage_credentials_is_warned() -> None:
    holding = load_settings({"GGT_S3_ACCESS_KEY_ID": "k", "GGT_S3_SECRET_ACCESS_KEY": "s"})
    for role in ("uploader", "converter"):
        [warning] = check_settings(holding, [role])
        assert warning.status is Status.WARN and "GGT_S3_SECRET_ACCESS_KEY" in warning.fix
    assert check_settings(holding, ["coordinator"]) == []


# ------------------------------------------------------------------- against loopback stores


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def strict_bucket(strict_s3: StrictS3, moto_s3: EmbeddedS3) -> AsyncIterator[StorageConfig]:
    """A fresh bucket behind the strict front (signatures checked)."""
    import msgspec

    from tests.fixtures.s3 import fresh_bucket

    config = msgspec.structs.replace(moto_s3.config, endpoint=strict_s3.endpoint,
                                     bucket=random_bucket_name("ggt-check"))
    async with fresh_bucket(config):
        yield config


def storage_env(config: StorageConfig, **changes: str) -> dict[str, str]:
    env = {"GGT_S3_ENDPOINT": config.endpoint, "GGT_S3_BUCKET": config.bucket, "GGT_S3_REGION": config.region,
           "GGT_S3_ACCESS_KEY_ID": config.access_key_id, "GGT_S3_SECRET_ACCESS_KEY": config.secret_access_key}
    env.update(changes)
    return env


MISTAKES = {
    "missing bucket": ({"GGT_S3_BUCKET": "ggt-no-such-bucket"}, "ggt-no-such-bucket", "GGT_S3_BUCKET"),
    "wrong secret": ({"GGT_S3_SECRET_ACCESS_KEY": "wrong"}, "SignatureDoesNotMatch", "GGT_S3_SECRET_ACCESS_KEY"),
    "refused connection": ({"GGT_S3_ENDPOINT": "closed"}, "unreachable", "GGT_S3_ENDPOINT"),
}


def mistaken(config: StorageConfig, mistake: str) -> dict[str, str]:
    changes = dict(MISTAKES[mistake][0])
    if changes.get("GGT_S3_ENDPOINT") == "closed":
        changes["GGT_S3_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    return storage_env(config, **changes)


async def test_check_passes_on_a_good_store_with_conditional_writes_and_presigned_urls(strict_bucket, strict_s3):
    settings = load_settings(storage_env(strict_bucket))
    results = await run_checks(settings, ["coordinator"])
    by_what = {r.what: r for r in results}
    assert exit_status(results) == 0, results
    for what in ("storage bucket", "conditional writes", "presigned PUT", "presigned GET", "storage clock"):
        assert by_what[what].status is Status.OK, by_what[what]
    # the probe objects are gone again
    async with Storage(strict_bucket) as storage:
        listed = await storage.client.list_objects_v2(Bucket=strict_bucket.bucket, Prefix="check/")
        assert not listed.get("Contents")


async def test_a_store_that_ignores_if_none_match_is_reported(strict_bucket, monkeypatch):
    from storage import s3

    original = s3.Storage.put_json

    async def ignoring(self, key, data, *, if_match=None, if_none_match=False):
        return await original(self, key, data)  # the conditions never reach the store

    monkeypatch.setattr(s3.Storage, "put_json", ignoring)
    results = await run_checks(load_settings(storage_env(strict_bucket)), ["coordinator"])
    cond = next(r for r in results if r.what == "conditional writes")
    assert cond.status is Status.FAIL and "If-None-Match" in cond.detail and "job records" in cond.fix


@pytest.mark.parametrize("mistake", list(MISTAKES))
async def test_check_reports_each_storage_mistake_with_its_fix(strict_bucket, mistake):
    _, named, fix_names = MISTAKES[mistake]
    results = await run_checks(load_settings(mistaken(strict_bucket, mistake)), ["coordinator"])
    failed = [r for r in results if r.status is Status.FAIL]
    assert exit_status(results) == 1 and failed
    assert named in failed[0].detail, failed[0]
    assert fix_names in failed[0].fix, failed[0]


async def test_misconfigured_storage_raises_storage_misconfigured_naming_bucket_and_endpoint(strict_bucket):
    import msgspec

    wrong = msgspec.structs.replace(strict_bucket, secret_access_key="wrong")
    async with Storage(wrong) as storage:
        with pytest.raises(StorageMisconfigured) as raised:
            await storage.get_json("jobs/x.json")
    text = str(raised.value)
    assert strict_bucket.bucket in text and strict_bucket.endpoint in text and "GGT_S3_SECRET_ACCESS_KEY" in text


async def test_check_reports_a_broker_that_refuses_the_user(amqp_url):
    bad = amqp_url.replace("guest:guest@", "guest:wrong@")
    results = await run_checks(load_settings({"GGT_AMQP_URL": bad, "GGT_BUS_KEY": TEST_BUS_KEY}), ["uploader"])
    broker = next(r for r in results if r.what == "broker")
    assert broker.status is Status.FAIL and "refused user 'guest'" in broker.detail and "wrong" not in broker.detail


async def test_check_passes_on_the_test_broker(amqp_url):
    from tests.fixtures.broker import _local_vhost
    from tests.fixtures.broker import test_settings as settings_for

    # a vhost of its own: other tests declare the session's queues with arguments of their own
    vhost = await asyncio.to_thread(_local_vhost, f"ggt-check-{uuid.uuid4().hex[:8]}")
    url = amqp_url.rsplit("/", 1)[0] + f"/{vhost}" if vhost else amqp_url
    try:
        # the first check declares the topology; the second finds it with the same arguments
        for _ in range(2):
            results = await run_checks(settings_for(amqp_url=url), ["uploader"])
            assert next(r for r in results if r.what.startswith("broker")).status is Status.OK, results
    finally:
        if vhost:
            await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "delete_vhost", vhost],
                                    capture_output=True, timeout=60)


# --------------------------------------------------------------- processes refuse to start


async def run_cli(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``getgoodtape ARGS`` with ``env`` on top of a clean GGT_-free environment; bounded wait."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GGT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors.cli", *args, cwd=ROOT, env={**base, "GGT_BUS_KEY": TEST_BUS_KEY, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(EXIT_WITHIN_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"getgoodtape {' '.join(args)} did not end within {EXIT_WITHIN_S:.0f} s") from None
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.parametrize("mistake", list(MISTAKES))
@pytest.mark.parametrize("command", [["run", "coordinator"], ["run", "verifier"],
                                     ["convert", "http://127.0.0.1:9/a.mp4", "-f", "mp3"]])
async def test_a_process_with_a_storage_mistake_exits_nonzero_saying_why(strict_bucket, amqp_url, mistake, command):
    env = mistaken(strict_bucket, mistake)
    if command[0] == "run":
        env["GGT_AMQP_URL"] = amqp_url
    code, _, err = await run_cli(command, env)
    assert code != 0
    assert MISTAKES[mistake][1] in err, err
    assert MISTAKES[mistake][2] in err, err


@pytest.mark.parametrize("command", [["run", "coordinator"], ["run", "verifier"], ["run", "uploader"],
                                     ["convert", "http://127.0.0.1:9/a.mp4", "-f", "mp3"]])
async def test_a_process_whose_broker_refuses_the_user_exits_nonzero_saying_why(strict_bucket, amqp_url, command):
    env = {**storage_env(strict_bucket), "GGT_AMQP_URL": amqp_url.replace("guest:guest@", "guest:wrong@")}
    code, _, err = await run_cli(command, env)
    assert code != 0
    assert "broker refused user 'guest'" in err, err


async def test_check_command_prints_one_json_object_per_line_and_fails_on_a_mistake(strict_bucket):
    import json

    code, out, _ = await run_cli(["check", "--role", "coordinator", "--json"], mistaken(strict_bucket, "wrong secret"))
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows and all(set(row) == {"what", "status", "detail", "fix"} for row in rows)
    assert any(row["status"] == "fail" and "SignatureDoesNotMatch" in row["detail"] for row in rows)
