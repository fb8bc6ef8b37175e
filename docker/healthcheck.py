#!/usr/bin/env python3
"""Container health probe (the image's HEALTHCHECK): exit 0 when this container's getgoodtape is healthy.

What it probes follows what the container runs, read from ``/proc`` (the ``getgoodtape run …``
process, under ``docker-init`` or as PID 1):

- the gateway: ``GET /healthz`` on ``GGT_HTTP_PORT``;
- other actors with ``GGT_METRICS_PORT`` set: ``GET /metrics`` (the process answers, its loop runs);
- otherwise: healthy while a ``getgoodtape run`` process exists (no HTTP to ask).

Settings come from the same ``GGT_*`` variables as the process itself (actors.runtime.settings).
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

#: the console script whose arguments tell what this container runs
SCRIPT_NAME = "getgoodtape"
#: seconds one probe may take; Docker's own HEALTHCHECK --timeout is the outer bound
PROBE_TIMEOUT = 3.0
#: addresses that mean "every interface": probe them through loopback
WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


def run_arguments(argv: Sequence[str]) -> list[str] | None:
    """The actor names of a ``getgoodtape run …`` command line, or None when it is not one."""
    for index, arg in enumerate(argv):
        if Path(arg).name == SCRIPT_NAME:
            rest = list(argv[index + 1 :])
            if rest[:1] == ["run"]:
                return rest[1:]
            return None
    return None


def probe_url(actors: Sequence[str], *, http_host: str, http_port: int, metrics_port: int) -> str | None:
    """The URL whose 200 means healthy for a process running ``actors``; None when there is none."""
    if "gateway" in actors:
        host = "127.0.0.1" if http_host in WILDCARD_HOSTS else http_host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{http_port}/healthz"
    if metrics_port > 0:
        return f"http://127.0.0.1:{metrics_port}/metrics"
    return None


def find_run_arguments(proc_root: Path = Path("/proc")) -> list[str] | None:
    """The actors of the first ``getgoodtape run`` process under ``proc_root``, lowest PID first."""
    pids = sorted(int(entry.name) for entry in proc_root.iterdir() if entry.name.isdigit())
    for pid in pids:
        try:
            raw = (proc_root / str(pid) / "cmdline").read_bytes()
        except OSError:  # the process ended while we looked, or is not ours to read
            continue
        argv = [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]
        actors = run_arguments(argv)
        if actors is not None:
            return actors
    return None


def answers_ok(url: str, *, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when ``url`` answers 200 within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(proc_root: Path = Path("/proc")) -> int:
    """Probe this container; 0 healthy, 1 unhealthy (Docker's HEALTHCHECK convention)."""
    from actors.runtime.settings import load_settings

    actors = find_run_arguments(proc_root)
    if actors is None:
        print(f"no `{SCRIPT_NAME} run` process in this container", file=sys.stderr)
        return 1
    settings = load_settings()
    url = probe_url(actors, http_host=settings.http_host, http_port=settings.http_port,
                    metrics_port=settings.metrics_port)
    if url is None:
        return 0
    if answers_ok(url):
        return 0
    print(f"{url} did not answer 200", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
