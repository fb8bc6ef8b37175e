"""The SSRF guard: a user's URL, and every hop it leads to, may reach only public addresses.

Operators widen this with ``GGT_ALLOW_NETWORKS`` and narrow it with ``GGT_DENY_NETWORKS`` (CIDRs);
cloud metadata addresses are refused whatever either says. The layers:

- ``addresses``: pure classification of IP addresses (and of odd host spellings such as ``127.1``);
- ``urls``: the pre-flight check of a URL, and of every URL in yt-dlp's formats (http(s) only);
- ``proxy.FetchGuard``: the enforcement, on loopback. yt-dlp uses it as its proxy; ffmpeg and
  ffprobe read only its gateway URLs, which it fetches itself — resolving the host, checking every
  address, connecting to the vetted one, following redirects hop by hop — so it sees every byte;
- ``manifests``: the HLS playlist rewriting that keeps ffmpeg on the gateway (DASH is refused);
- ``ranges``: ranged fetching for throttled origins (successive Range requests, one body for ffmpeg);
- ``feeder``: yt-dlp for piped inputs, its formats pointed at the gateway before the download;
- ``extract``: yt-dlp extraction in warm worker processes that a deadline can kill;
- ``children``: the allow-listed environment of every child process;
- ``egress``: how the guard opens an upstream connection — to the vetted address, directly or
  tunnelled through the operator's egress proxy (``GGT_EGRESS_PROXY``);
- ``cookies``, ``ytdlp_levers``: the operator's cookies file (read-only, never in a message),
  yt-dlp extractor arguments and the allow-list of plugin packages (``actors.adapters.levers`` builds them).

Why the gateway: ffmpeg's HLS and DASH demuxers open nested URLs with any protocol whose name
begins with ``http`` (``httpproxy://`` is raw TCP to any host), and ``tcp`` must stay whitelisted
for http itself, so a proxy that only sees requests cannot stop a playlist naming ``tcp://`` or
``httpproxy://``. Through the gateway, ffmpeg is never handed a URL the guard did not write: its
whitelist is ``http,tcp,crypto`` (no https, tls or httpproxy: the guard does TLS upstream), and
whatever it resolves relative to a gateway URL lands on the gateway. Tested end to end in
tests/guard/test_guard_sources.py with a recording listener on the "internal" host.

The gateway judges what ffmpeg will probe, not each response alone: a body that ends inside the
sniff window (a 3-byte ``#EX``) and is continued by ffmpeg's reconnect (``Range: bytes=3-``) is
sniffed joined with what came before, and a join that makes a playlist or manifest is refused
(``FetchGuard._judged_with_head``; tests/system/test_attack_review.py).

Residual risks, known and accepted:

- The gateway recognises playlists as ffmpeg's probe does (``#EXTM3U`` after any ID3v2 tags;
  ``<mpd`` before the first NUL within 8 MiB, above ffmpeg's 5 MB default probe size). A demuxer
  that followed URLs from some other content would need ``tcp://`` in it; no demuxer of ffmpeg
  5.1 that we know of does so for a non-http protocol (concat refuses protocols in its default safe
  mode, mov does not follow references unless asked). A network namespace per child would close
  this by construction, and is not used, for three measured reasons (docs/SECURITY.md, "Why no
  network namespace"): the compose deployment cannot create one (moby's default seccomp profile
  refuses ``unshare``/``clone`` with CLONE_NEWUSER or CLONE_NEWNET to a process without
  CAP_SYS_ADMIN, and the actors drop every capability); a new namespace has its own loopback, so
  ffmpeg there cannot reach the guard's gateway either, and bridging it would need a forwarder in
  the namespace to a Unix socket of the guard — a second relay on the media path; and the one child
  that needs no network at all (ffmpeg reading the feeder's pipe) already has ``pipe`` as its only
  protocol. Where unprivileged user namespaces work (``unshare -rn true`` succeeds on the
  development machine, 9 ms), that forwarder is the way to do it.
- The guard judges addresses, not ports or content: a public host is reachable on any port.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actors.guard.addresses import (
        address_allowed,
        block_reason,
        is_public_address,
        parse_host_literal,
        parse_networks,
    )
    from actors.guard.proxy import BLOCKED_HEADER, BLOCKED_VALUE, BlockedFetch, FetchGuard
    from actors.guard.urls import check_url

#: where each name of the package lives: loaded on first use, so a process that needs one module
#: of the guard (an extraction worker: no aiohttp) does not load them all
_HOMES = {
    "address_allowed": "addresses", "block_reason": "addresses", "is_public_address": "addresses",
    "parse_host_literal": "addresses", "parse_networks": "addresses",
    "BLOCKED_HEADER": "proxy", "BLOCKED_VALUE": "proxy", "BlockedFetch": "proxy", "FetchGuard": "proxy",
    "check_url": "urls",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


__all__ = [
    "BLOCKED_HEADER",
    "BLOCKED_VALUE",
    "BlockedFetch",
    "FetchGuard",
    "address_allowed",
    "block_reason",
    "check_url",
    "is_public_address",
    "parse_host_literal",
    "parse_networks",
]
