"""The probe worker: FFmpeg's libraries (PyAV) loaded once, each probe in a fresh ``fork()`` of its own.

Run as ``python -m actors.adapters.probe_worker`` by ``actors.adapters.prober.ProbePool``; it imports
PyAV, msgspec and the standard library, nothing of the project, so it starts in ~0.1 s and stays
small. It is single-threaded, which makes ``fork()`` safe: per request the child

- takes the request's environment (the guard's proxy variables, nothing of the actor's own), an
  address-space cap (RLIMIT_AS), an alarm past the timeout, and dies with the worker;
- opens the URL with the request's input options (protocol whitelist, headers, timeouts: the same
  as ffprobe's), reads the stream headers — and, with ``count_packets``, every packet, front to back;
- writes ffprobe's JSON shape (``-show_format -show_streams``) to a pipe and ``_exit``s.

Hostile media is parsed in that child alone, as it was in an ffprobe process: a crash, a hang or a
bomb ends the child, and the worker reports it and serves the next request.

Wire: each frame is a 4-byte big-endian length and a msgpack ``ProbeRequest`` / ``ProbeAnswer``; the
worker first writes one answer with ``ok=True`` when it is ready.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import struct
import sys
from fractions import Fraction
from typing import Any, BinaryIO

import msgspec

#: an answer longer than this is refused (a probe's JSON is a few KiB; packets are summed, not listed)
MAX_ANSWER_BYTES = 16 * 1024 * 1024
#: seconds the child may outlive its timeout before its alarm kills it (the pool kills sooner)
ALARM_GRACE = 5
_PR_SET_PDEATHSIG = 1
_HEADER = struct.Struct(">I")


class ProbeRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One probe: ``url`` opened with ``options`` (ffprobe's input options, without the dash)."""

    url: str
    options: dict[str, str] = {}
    timeout: float
    count_packets: bool = False
    #: RLIMIT_AS of the child, bytes (0: none)
    memory_limit: int = 0
    #: the child's whole environment (the proxy variables of the job's guard)
    environment: dict[str, str] = {}


class ProbeAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """ffprobe's JSON for the input when ``ok``, else what failed (FFmpeg's own error text)."""

    ok: bool
    json: bytes = b""
    error: str = ""


def write_frame(out: BinaryIO, data: bytes) -> None:
    """One frame: length, then ``data``."""
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def read_frame(source: BinaryIO, *, limit: int) -> bytes | None:
    """The next frame's bytes, or None at end of input; a frame over ``limit`` is an error."""
    header = source.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    if size > limit:
        raise ValueError(f"a frame of {size} bytes is over the limit of {limit}")
    data = source.read(size)
    if len(data) < size:
        return None
    return data


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _stream_json(stream: Any) -> dict[str, Any]:
    """One stream in ffprobe's ``-show_streams`` shape (the fields ``actors.core.probe`` reads)."""
    context = stream.codec_context
    cover = bool(stream.disposition & stream.disposition.attached_pic)
    entry: dict[str, Any] = {"index": stream.index, "codec_type": stream.type,
                             "codec_name": context.codec.canonical_name if context.codec else "",
                             "disposition": {"attached_pic": int(cover)}, "tags": dict(stream.metadata)}
    if stream.type == "video":
        entry.update(width=context.width, height=context.height)
    elif stream.type == "audio":
        entry.update(sample_rate=context.sample_rate, channels=context.channels)
    if context.bit_rate:
        entry["bit_rate"] = str(context.bit_rate)
    duration = _seconds(stream.duration, stream.time_base)
    if duration is not None:
        entry["duration"] = f"{duration:.6f}"
    return entry


def probe_json(request: ProbeRequest) -> bytes:
    """ffprobe's ``-show_format -show_streams`` JSON for ``request.url`` (plus one ``packets`` entry: the
    end of the last packet, when ``count_packets``). Raises PyAV's errors (``av.FFmpegError``)."""
    import av  # the worker imported it already; the import here keeps the module importable without it

    # tags are the source's bytes: one that is not UTF-8 gets U+FFFD, as ffprobe prints it, not an error
    with av.open(request.url, options=dict(request.options), timeout=request.timeout,
                 metadata_errors="replace") as container:
        streams = [_stream_json(s) for s in container.streams]
        fmt: dict[str, Any] = {"format_name": container.format.name, "tags": dict(container.metadata)}
        if container.duration is not None:
            fmt["duration"] = f"{container.duration / av.time_base:.6f}"
        if container.bit_rate:
            fmt["bit_rate"] = str(container.bit_rate)
        size = container.size
        if size and size > 0:
            fmt["size"] = str(size)
        result: dict[str, Any] = {"format": fmt, "streams": streams}
        if request.count_packets:
            end: float | None = None
            for packet in container.demux():
                start = _seconds(packet.pts, packet.time_base)
                if start is None:
                    continue
                stop = start + (_seconds(packet.duration, packet.time_base) or 0.0)
                end = stop if end is None else max(end, stop)
            result["packets"] = [] if end is None else [{"pts_time": f"{end:.6f}", "duration_time": "0"}]
    return msgspec.json.encode(result)


def _child(request: ProbeRequest, answer_fd: int) -> None:
    """In the forked child: confine, probe, write the answer, never return."""
    status = 1
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.alarm(int(request.timeout) + ALARM_GRACE)
        if request.memory_limit > 0:
            _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = request.memory_limit if hard == resource.RLIM_INFINITY else min(request.memory_limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        os.environ.clear()  # FFmpeg's http protocol reads http_proxy / no_proxy from here
        os.environ.update(request.environment)
        try:
            answer = ProbeAnswer(ok=True, json=probe_json(request))
        except MemoryError:
            answer = ProbeAnswer(ok=False, error="Cannot allocate memory (the probe's memory limit)")
        except Exception as exc:  # FFmpeg's errors (their text without the URL), and PyAV's
            text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            answer = ProbeAnswer(ok=False, error=text)
        with os.fdopen(answer_fd, "wb") as out:
            out.write(msgspec.msgpack.encode(answer))
        status = 0
    finally:
        os._exit(status)


def _serve_one(request: ProbeRequest) -> ProbeAnswer:
    """Fork a child for ``request`` and collect its answer, or say how it ended without one."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, measured by the pool's tests
        os.close(read_fd)
        _child(request, write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as source:
        data = source.read(MAX_ANSWER_BYTES + 1)
    if len(data) > MAX_ANSWER_BYTES:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if len(data) > MAX_ANSWER_BYTES:
        return ProbeAnswer(ok=False, error=f"the probe's answer is over {MAX_ANSWER_BYTES} bytes")
    if os.WIFSIGNALED(status):
        signal_number = os.WTERMSIG(status)
        return ProbeAnswer(ok=False, error=f"the probe ended without an answer (killed by signal {signal_number})")
    try:
        return msgspec.msgpack.decode(data, type=ProbeAnswer)
    except msgspec.DecodeError:
        return ProbeAnswer(ok=False, error=f"the probe ended without an answer (exit status {os.WEXITSTATUS(status)})")


def main() -> None:
    """Serve probe requests from stdin until it closes."""
    import av  # loaded once, shared by every forked child

    with contextlib.suppress(ImportError):
        av.logging.set_level(None)  # the answer carries the error; FFmpeg's log would only fill stderr
    source, out = sys.stdin.buffer, sys.stdout.buffer
    decoder = msgspec.msgpack.Decoder(ProbeRequest)
    write_frame(out, msgspec.msgpack.encode(ProbeAnswer(ok=True)))
    while (frame := read_frame(source, limit=MAX_ANSWER_BYTES)) is not None:
        write_frame(out, msgspec.msgpack.encode(_serve_one(decoder.decode(frame))))


if __name__ == "__main__":
    main()
