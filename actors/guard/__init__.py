"""The SSRF guard: a user's URL, and every hop it leads to, may reach only public addresses.

Operators widen this with ``GGT_ALLOW_NETWORKS`` (CIDRs). Three layers:

- ``addresses``: pure classification of IP addresses (and of odd host spellings such as ``127.1``);
- ``urls.check_url``: a pre-flight check (http/https only, no credentials, no forbidden literal host);
- ``proxy.FetchGuard``: the enforcement. yt-dlp (``proxy`` option) and ffmpeg (``-http_proxy``)
  send every request through a loopback proxy that resolves the host itself, checks every address
  after resolution, and connects to the vetted address. Redirects and HLS/DASH segment fetches are
  new requests, so each is checked; DNS rebinding has no window between check and connect.

Checked with ffmpeg 5.1 (tests/test_guard_proxy.py): ``-http_proxy`` covers http (absolute-URI
requests), https (the tls protocol opens a CONNECT tunnel through ``httpproxy``), redirects, and
HLS playlists and segments (the HLS demuxer hands ``http_proxy`` on to its nested requests).

Residual risks, known and accepted:

- ffmpeg skips any proxy for hosts named in a ``no_proxy`` environment variable: start it with
  ``FetchGuard.subprocess_env`` (which drops the variable).
- ``tcp`` must stay on ffmpeg's protocol whitelist (http runs on it, also to reach the proxy), so
  a demuxer that built a ``tcp://`` URL from file content would bypass the proxy. The demuxers that
  follow URLs from content (hls, dash) accept only http(s)/file/crypto/data, and the whitelist
  refuses file/data/udp/rtp/rtmp; a network namespace with only the proxy reachable would close it.
- The guard judges addresses, not ports or content: a public host is reachable on any port.
"""

from actors.guard.addresses import (
    address_allowed,
    block_reason,
    is_public_address,
    parse_host_literal,
    parse_networks,
)
from actors.guard.proxy import BLOCKED_HEADER, BLOCKED_VALUE, BlockedFetch, FetchGuard
from actors.guard.urls import check_url

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
