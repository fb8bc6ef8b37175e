"""The external programs the actors run, found once: ffmpeg, ffprobe, yt-dlp, its solver and JavaScript runtime.

Deno comes from PyPI (the ``deno`` package puts its binary beside this interpreter's scripts); yt-dlp
is told its path directly, so it is found whether or not the venv's bin directory is on PATH.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess

import msgspec

#: seconds a ``-version`` call may take (a hung binary must not hang the check)
VERSION_TIMEOUT = 10.0


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    """A program or package: where it is and its version; ``path`` empty when it is missing."""

    name: str
    path: str = ""
    version: str = ""


def deno_path() -> str:
    """The Deno binary: the PyPI package's, else one on PATH; empty when there is none."""
    try:
        from deno import find_deno_bin

        return find_deno_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("deno") or ""


def ytdlp_js_runtimes() -> dict[str, dict[str, str]]:
    """yt-dlp's ``js_runtimes`` option naming the Deno found here (empty: yt-dlp's own search)."""
    path = deno_path()
    return {"deno": {"path": path}} if path else {}


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=VERSION_TIMEOUT, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else ""


def version_of(line: str, name: str) -> str:
    """The version word of a ``-version`` banner (``ffmpeg version 7.1.2-0+deb13u1 …`` → ``7.1.2-0+deb13u1``)."""
    words = line.split()
    if len(words) >= 3 and words[1] == "version":
        return words[2]
    if len(words) >= 2 and words[0] == name:
        return words[1]
    return line


def program(name: str, *, path: str | None = None, flag: str = "-version") -> Tool:
    """A program found on PATH (or at ``path``) with its version; no path when it is missing or fails."""
    found = path if path is not None else shutil.which(name) or ""
    if not found:
        return Tool(name=name)
    line = _first_line([found, flag])
    return Tool(name=name, path=found, version=version_of(line, name)) if line else Tool(name=name)


def package(name: str) -> Tool:
    """An installed Python distribution and its version."""
    try:
        return Tool(name=name, path="(python package)", version=importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        return Tool(name=name)


def deno() -> Tool:
    """The JavaScript runtime yt-dlp solves challenges with."""
    path = deno_path()
    return program("deno", path=path, flag="--version") if path else Tool(name="deno")
