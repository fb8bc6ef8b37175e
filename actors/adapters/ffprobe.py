"""A small async ffprobe wrapper: what a URL or file holds (format, duration, streams).

The probe's input options (``input_args``), its error codes and its public error text are the
ones ``actors.adapters.prober`` gives the actors' in-process probes (the converter's of a direct
link, the verifier's of the stored object); ``ffprobe()`` itself runs Debian's ffprobe, in its own
process group, killed on timeout or cancel — for tests and tools, and as the reference the prober's
answers are tested against.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec

from actors.adapters.ffmpeg import child_preexec
from actors.core.ffmpeg_args import HLS_PROTOCOLS, MAX_VIDEO_PIXELS
from actors.core.plain import header_block
from actors.core.probe import ProbeResult, parse_probe_json
from actors.guard.children import child_env
from messages.errors import ErrorCode, JobError
from messages.types import HTTP_SCHEMES

#: protocols for a local path (tests, tools); user URLs never get ``file``
LOCAL_PROTOCOLS = "file,pipe"
#: most bytes of ffprobe's stderr kept for the error detail
STDERR_KEEP = 2000
#: stderr phrases meaning "reachable, but not media" rather than "could not fetch"
_NOT_MEDIA_HINTS = ("Invalid data found", "could not find codec parameters", "moov atom not found")


def input_args(
    url_or_path: str,
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    count_packets: bool = False,
    head_only: bool = False,
    wrap_input: Callable[[list[str]], list[str]] | None = None,
) -> list[str]:
    """The probe's input options for ``url_or_path`` (before ``-i``): http(s)/HLS protocols for URLs,
    ``file`` only for local paths. ``wrap_input`` rewrites them (the SSRF guard's ``input_args`` adds its proxy).

    ``count_packets`` and ``head_only`` both read in one request without seeking: the whole file, or
    only its head (the stream headers and the first packets, a few hundred KB to ~1.5 MB)."""
    scheme = urlsplit(url_or_path).scheme.lower()
    if scheme in HTTP_SCHEMES:
        args = ["-protocol_whitelist", HLS_PROTOCOLS, "-rw_timeout", str(int(timeout * 1_000_000)),
                # probing decodes a frame or two: a huge one fails instead of allocating gigabytes
                "-max_pixels", str(MAX_VIDEO_PIXELS)]
        if count_packets or head_only:
            # front to back in one request: otherwise the probe seeks to every fragment of a fragmented
            # MP4, one HTTP GET each (152 for a 5-minute video), and to the end of an Ogg file
            args += ["-seekable", "0"]
        block = header_block(headers or {})
        if block:
            args += ["-headers", block]
    elif scheme in ("", "file"):
        args = ["-protocol_whitelist", LOCAL_PROTOCOLS]
    else:
        raise JobError(ErrorCode.UNSUPPORTED_URL, f"cannot probe a {scheme!r} URL")
    return wrap_input(args) if wrap_input is not None else args


def input_options(url_or_path: str, **kwargs: Any) -> dict[str, str]:
    """``input_args`` as an options dict (``-name value`` → ``{"name": "value"}``), for the in-process prober."""
    args = input_args(url_or_path, **kwargs)
    return {name.removeprefix("-"): value for name, value in zip(args[::2], args[1::2], strict=True)}


def probe_argv(
    url_or_path: str,
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    count_packets: bool = False,
    ffprobe_bin: str = "ffprobe",
    wrap_input: Callable[[list[str]], list[str]] | None = None,
) -> list[str]:
    """The ffprobe argv for ``url_or_path``: its ``input_args``, and the JSON it prints."""
    argv = [ffprobe_bin, "-v", "error", "-print_format", "json", "-show_format", "-show_streams"]
    if count_packets:
        # reads every packet: the only duration a piped FLAC/WebM has
        argv += ["-show_entries", "packet=pts_time,duration_time"]
    args = input_args(url_or_path, timeout=timeout, headers=headers, count_packets=count_packets,
                      wrap_input=wrap_input)
    return [*argv, *args, "-i", url_or_path]


_QUERY = re.compile(r"\?[^\s'\"]*")


def failure_code(stderr: str) -> ErrorCode:
    """The error code for a failed probe, from its error text: not media → no_media_found, else media_unavailable."""
    if any(hint in stderr for hint in _NOT_MEDIA_HINTS):
        return ErrorCode.NO_MEDIA_FOUND
    return ErrorCode.MEDIA_UNAVAILABLE


def public_message(text: str) -> str:
    """A probe's error text fit for a job's error: its tail, with no URL's query string — FFmpeg names
    its input in its errors, and a presigned URL's query holds a credential and a signature."""
    return _QUERY.sub("?…", text.strip())[-STDERR_KEEP:]


async def ffprobe(
    url_or_path: str,
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    count_packets: bool = False,
    wrap_input: Callable[[list[str]], list[str]] | None = None,
    env: Mapping[str, str] | None = None,
    memory_limit: int = 0,
) -> ProbeResult:
    """Probe ``url_or_path``; raises JobError (no_media_found, media_unavailable) on failure or timeout.

    A result with no audio or video stream also raises no_media_found. ``wrap_input`` and ``env``
    route the fetch through the SSRF guard (``guard.input_args``, ``guard.subprocess_env``);
    ``memory_limit`` caps ffprobe's address space (RLIMIT_AS, ``GGT_CHILD_MEMORY_LIMIT``).
    """
    argv = probe_argv(url_or_path, timeout=timeout, headers=headers, count_packets=count_packets,
                      wrap_input=wrap_input)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else child_env(os.environ),  # never the actor's own
        start_new_session=True,  # its own process group, so a kill takes any helper with it
        preexec_fn=child_preexec(memory_limit=memory_limit),
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await proc.communicate()
    except TimeoutError:
        raise JobError(ErrorCode.MEDIA_UNAVAILABLE, f"ffprobe timed out after {timeout:.0f} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            # shielded so a cancelled caller still reaps the child
            await asyncio.shield(proc.wait())
    message = public_message(stderr.decode(errors="replace"))
    if proc.returncode != 0:
        raise JobError(failure_code(message), f"ffprobe: {message or f'exit status {proc.returncode}'}")
    try:
        result = parse_probe_json(stdout)
    except (msgspec.DecodeError, AttributeError) as exc:
        raise JobError(ErrorCode.NO_MEDIA_FOUND, f"ffprobe output unreadable: {exc}") from None
    if result.audio is None and result.video is None:
        raise JobError(ErrorCode.NO_MEDIA_FOUND, "no audio or video stream")
    return result
