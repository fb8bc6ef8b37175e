"""Reproducible installs: the hashed locks match pyproject.toml, production leaves the embedded S3 out,
and a missing embedded S3 says exactly what to install."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"


def locked(name: str) -> dict[str, str]:
    """package → version pinned in requirements/<name>.txt (every pin carries hashes)."""
    text = (LOCKS / f"{name}.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", text, flags=re.M))
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.strip())
    for block in blocks:
        assert "--hash=sha256:" in block, f"{name}.txt pins without a hash: {block.splitlines()[0]}"
    return {k.lower().replace("_", "-"): v for k, v in pins.items()}


def direct(*extras: str) -> set[str]:
    """Names of pyproject's direct dependencies (plus those of ``extras``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += [s for s in project["optional-dependencies"][extra] if not s.startswith("getgoodtape")]
    return {re.split(r"[\[<>=!~; ]", s, maxsplit=1)[0].lower() for s in specs}


@pytest.mark.parametrize(("lock", "extras"), [("runtime", ()), ("local", ("local",)), ("test", ("local", "test"))])
def test_every_direct_dependency_is_locked_with_hashes(lock: str, extras: tuple[str, ...]) -> None:
    pins = locked(lock)
    missing = direct(*extras) - set(pins)
    assert not missing, f"requirements/{lock}.txt lacks {missing}: run scripts/lock"


def test_the_production_lock_leaves_the_embedded_s3_and_test_tools_out() -> None:
    pins = locked("runtime")
    for name in ("moto", "werkzeug", "pytest", "ruff"):
        assert name not in pins, name
    assert {"yt-dlp", "yt-dlp-ejs", "deno"} <= set(pins)  # every install can solve JavaScript challenges


def test_the_lower_bounds_are_the_ones_the_code_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["local"]
    assert "yt-dlp[default]>=2025.03.21" in specs  # yt_dlp.globals, --no-plugin-dirs
    assert "aiobotocore>=2.18" in specs  # request_checksum_calculation
    assert "moto[s3]>=5.2.4" in specs  # moto.core.request.Request.raw_url


def test_without_the_local_extra_the_zero_config_path_says_what_to_install(tmp_path: Path) -> None:
    # a process where moto cannot be imported, as in a production image
    blocker = tmp_path / "moto"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('not installed', name='moto')\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from actors.bootstrap.wiring import new_embedded_s3\n"
            "new_embedded_s3(bucket='b')")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, check=False)
    assert result.returncode != 0
    assert "pip install 'getgoodtape[local]'" in result.stderr, result.stderr
    assert "GGT_S3_ENDPOINT" in result.stderr


def test_yt_dlp_finds_the_pip_installed_deno_without_it_on_path() -> None:
    code = ("import yt_dlp\nfrom actors.adapters.tools import ytdlp_js_runtimes\n"
            "ydl = yt_dlp.YoutubeDL({'quiet': True, 'js_runtimes': ytdlp_js_runtimes()})\n"
            "info = ydl._js_runtimes['deno'].info\nprint(info.version if info else 'missing')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() not in ("", "missing"), result.stdout
