"""The SSRF guard's decisions as pure functions: addresses, host spellings, URLs. No connection is made."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from actors.core.request import validate_request
from actors.guard import (
    address_allowed,
    block_reason,
    check_url,
    is_public_address,
    parse_host_literal,
    parse_networks,
)
from actors.guard.addresses import denial_reason
from actors.guard.children import child_env
from actors.guard.manifests import BodyKind, ManifestRefused, parse_attributes, rewrite_hls, sniff_body
from actors.guard.proxy import (
    BadProxyRequest,
    FetchGuard,
    gateway_path,
    gateway_target,
    parse_proxy_request,
)
from actors.guard.urls import SAFE_REFUSAL, fetchable, refuse_unfetchable
from messages.errors import ErrorCode, JobError
from messages.types import ConvertRequested

FORBIDDEN = [
    "127.0.0.1",
    "127.255.255.254",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",  # AWS/GCP/Azure metadata
    "169.254.0.1",
    "100.64.0.1",  # CGNAT
    "100.127.255.255",
    "0.0.0.0",
    "0.1.2.3",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "198.18.0.1",
    "198.19.255.255",
    "192.0.2.10",
    "198.51.100.7",
    "203.0.113.9",
    "192.0.0.8",
    "::1",
    "::",
    "fe80::1",
    "fd00:ec2::254",  # AWS metadata over IPv6
    "fc00::1",
    "fec0::1",
    "ff02::1",
    "::ffff:10.0.0.1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",  # IPv4-compatible
    "::8.8.8.8",  # IPv4-compatible is deprecated, so refused whatever it embeds
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b:1::808:808",  # local-use NAT64
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001:db8::1",
    "2001:2::1",
    "100::1",
    "4000::1",  # outside 2000::/3
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "100.63.255.255",  # just below CGNAT
    "100.128.0.0",  # just above CGNAT
    "172.32.0.1",  # just above 172.16/12
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    "2002:808:808::1",  # 6to4 of 8.8.8.8
]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_internal_and_special_addresses_are_not_public(address: str) -> None:
    assert not is_public_address(address)
    assert block_reason(address)
    assert not address_allowed(address, allow=())


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(address)
    assert address_allowed(address, allow=())


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("168.63.129.16", "cloud metadata (Azure WireServer)"),
        ("100.100.100.200", "cloud metadata (Alibaba)"),
        ("169.254.1.1", "link-local (cloud metadata)"),
        ("100.64.0.1", "shared address space (CGNAT)"),
        ("::ffff:10.0.0.1", "IPv4-mapped private"),
        ("64:ff9b::7f00:1", "NAT64 loopback"),
        ("2002:c0a8:101::1", "6to4 private"),
        ("2001::1", "Teredo"),
        ("fd00:ec2::254", "cloud metadata (AWS IPv6)"),
        ("fd00:ec3::254", "unique-local"),
        ("::ffff:168.63.129.16", "IPv4-mapped cloud metadata (Azure WireServer)"),
    ],
)
def test_block_reason_names_the_range(address: str, reason: str) -> None:
    assert block_reason(address) == reason


def test_allow_listing_a_network_lifts_the_block_for_that_network_only() -> None:
    allow = parse_networks(["10.0.0.0/8", "fd00::/8"])
    assert address_allowed("10.20.30.40", allow=allow)
    assert address_allowed("fd12::1", allow=allow)
    assert not address_allowed("192.168.0.1", allow=allow)
    assert not address_allowed("127.0.0.1", allow=allow)


def test_allow_listing_one_loopback_host_keeps_its_neighbours_blocked() -> None:
    allow = parse_networks(["127.0.0.1/32"])
    assert address_allowed("127.0.0.1", allow=allow)
    assert not address_allowed("127.0.0.2", allow=allow)
    assert not address_allowed("::1", allow=allow)


def test_allowed_ipv4_network_also_admits_its_ipv4_mapped_and_nat64_forms() -> None:
    allow = parse_networks(["10.0.0.0/8"])
    assert address_allowed("::ffff:10.0.0.1", allow=allow)
    assert address_allowed("64:ff9b::a00:1", allow=allow)
    assert not address_allowed("::ffff:192.168.0.1", allow=allow)


def test_allowing_an_ipv6_network_does_not_admit_a_private_ipv4_carried_inside_it() -> None:
    allow = parse_networks(["2000::/3"])  # all global unicast, 6to4's 2002::/16 included
    assert address_allowed("2606:4700::1111", allow=allow)
    assert not address_allowed("2002:7f00:1::", allow=allow)  # 6to4 of 127.0.0.1
    assert not address_allowed("2002:a00:1::", allow=allow)  # 6to4 of 10.0.0.1
    assert address_allowed("2002:a00:1::", allow=parse_networks(["2000::/3", "10.0.0.0/8"]))
    # Teredo: 2001:0:<server>:<flags>:<port>:<client XOR ff…>; neither IPv4 may be private
    teredo_to_loopback = ipaddress.IPv6Address("2001:0:4136:e378:8000:63bf:" + "80ff:fffd")  # client 127.0.0.2
    assert teredo_to_loopback.teredo[1] == ipaddress.IPv4Address("127.0.0.2")
    assert not address_allowed(teredo_to_loopback, allow=allow)
    teredo_via_private = ipaddress.IPv6Address("2001:0:a00:5:8000:63bf:3fff:fdd2")  # server 10.0.0.5
    assert teredo_via_private.teredo[0] == ipaddress.IPv4Address("10.0.0.5")
    assert not address_allowed(teredo_via_private, allow=allow)
    assert address_allowed("2001:0:4136:e378:8000:63bf:f7f7:f7f7", allow=allow)  # 65.54.227.120 and 8.8.8.8


def test_allow_list_accepts_bare_addresses_as_single_hosts() -> None:
    assert parse_networks(["192.168.1.5"]) == (ipaddress.ip_network("192.168.1.5/32"),)


@pytest.mark.parametrize(
    ("spelling", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),  # one 32-bit decimal
        ("0177.0.0.1", "127.0.0.1"),  # octal
        ("0x7f.1", "127.0.0.1"),  # hex, short form
        ("0x7F000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),  # a.b: b fills 24 bits
        ("127.0.1", "127.0.0.1"),  # a.b.c: c fills 16 bits
        ("10.0x10.0300.1", "10.16.192.1"),
        ("0", "0.0.0.0"),
        ("017700000001", "127.0.0.1"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_host_literals_are_read_the_way_libc_reads_them(spelling: str, address: str) -> None:
    assert parse_host_literal(spelling) == ipaddress.ip_address(address)


@pytest.mark.parametrize(
    "spelling",
    [
        "example.com",
        "127.0.0.1.example.com",
        "08.0.0.1",
        "256.0.0.1",
        "127.16777216",
        "1.2.3.4.5",
        "1..2",
        "",
        "0x",
        "１２７.0.0.1",
        "localhost",
    ],
)
def test_names_and_malformed_numbers_are_not_literals(spelling: str) -> None:
    assert parse_host_literal(spelling) is None


@pytest.mark.parametrize(
    "spelling",
    [
        "1",
        "127.1",
        "0x7f.1",
        "0177.0.0.01",
        "4294967295",
        "4294967296",
        "1.2.3.256",
        "1.16777215",
        "1.16777216",
        "0x",
        "0x0",
        "09",
        "1.2.3",
        "1.2.3.4.",
        "255.255.255.255",
        "0xffffffff",
        "127.0.0.1 trailing",
    ],
)
def test_ipv4_parsing_agrees_with_the_system_inet_aton(spelling: str) -> None:
    try:
        expected = ipaddress.IPv4Address(socket.inet_aton(spelling))
    except OSError:
        expected = None
    assert parse_host_literal(spelling) == expected


# check_url is a pure pre-flight check on the URL's text: these addresses are refused, never contacted
@pytest.mark.parametrize(
    "url",
    [
        "http://user:pass@example.com/a.mp3",
        "http://user@example.com/a.mp3",
        "http://127.0.0.1/a.mp3",
        "http://2130706433/a.mp3",
        "http://0x7f.1/a.mp3",
        "http://0177.0.0.1/a.mp3",
        "http://127.1:8080/a.mp3",
        "http://127.0.0.1./a.mp3",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.mp3",
        "http://[::ffff:10.0.0.1]/a.mp3",
        "https://[fd00:ec2::254]/",
        "http:///a.mp3",
        "http://example.com:0/",
        "http://example.com:99999/",
        "http://127.0.0.1\\@example.com/",
        "http://example.com/a b",
    ],
)
def test_check_url_refuses_credentials_and_internal_literals(url: str) -> None:
    with pytest.raises(JobError) as caught:
        check_url(url)
    assert caught.value.code is ErrorCode.URL_NOT_ALLOWED


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.mp3", "file:///etc/passwd", "data:text/plain,hi", "gopher://example.com/",
            "javascript:alert(1)"],
)
def test_check_url_refuses_other_schemes_with_the_request_gates_code(url: str) -> None:
    with pytest.raises(JobError) as caught:
        check_url(url)
    assert caught.value.code is ErrorCode.UNSUPPORTED_URL
    request = ConvertRequested(url=url, format="mp3")
    assert validate_request(request, max_duration=60).code is ErrorCode.UNSUPPORTED_URL  # one rule, one code


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/watch?v=1",
        "http://8.8.8.8/a.mp3",
        "HTTPS://Example.COM:8443/a",
        "http://[2606:4700::1]/",
    ],
)
def test_check_url_lets_public_http_urls_through(url: str) -> None:
    check_url(url)


def test_check_url_leaves_names_to_the_proxy_which_sees_what_they_resolve_to() -> None:
    check_url("http://localhost:8080/a.mp3")


def test_check_url_honours_the_allow_list() -> None:
    check_url("http://10.1.2.3/a.mp3", allow=["10.0.0.0/8"])
    with pytest.raises(JobError):
        check_url("http://10.1.2.3/a.mp3", allow=["192.168.0.0/16"])


def test_proxy_rewrites_an_absolute_uri_request_for_one_upstream_exchange() -> None:
    head = (
        b"GET http://media.example:8080/a.mp3?x=1 HTTP/1.1\r\nHost: media.example:8080\r\n"
        b"Proxy-Connection: keep-alive\r\nConnection: keep-alive\r\nUser-Agent: ffmpeg\r\n\r\n"
    )
    request = parse_proxy_request(head)
    assert (request.host, request.port, request.tunnel) == ("media.example", 8080, False)
    assert request.upstream_head == (
        b"GET /a.mp3?x=1 HTTP/1.1\r\nHost: media.example:8080\r\nUser-Agent: ffmpeg\r\nConnection: close\r\n\r\n"
    )


def test_proxy_reads_connect_targets_including_ipv6() -> None:
    assert parse_proxy_request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")[:3] == ("example.com", 443, True)
    assert parse_proxy_request(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n")[:3] == ("::1", 8443, True)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /relative HTTP/1.1\r\n\r\n",
        b"GET https://example.com/ HTTP/1.1\r\n\r\n",
        b"GET ftp://example.com/ HTTP/1.1\r\n\r\n",
        b"CONNECT example.com HTTP/1.1\r\n\r\n",
        b"CONNECT example.com:0 HTTP/1.1\r\n\r\n",
        b"CONNECT example.com:70000 HTTP/1.1\r\n\r\n",
        b"GET http://example.com/ SPDY/3\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
)
def test_proxy_refuses_requests_it_does_not_serve(head: bytes) -> None:
    with pytest.raises(BadProxyRequest):
        parse_proxy_request(head)


def test_ffmpeg_child_environment_points_at_the_guard_and_drops_no_proxy() -> None:
    guard = FetchGuard()
    env = guard.subprocess_env({"PATH": "/usr/bin", "no_proxy": "*", "NO_PROXY": "10.0.0.1"})
    assert "no_proxy" not in env and "NO_PROXY" not in env
    assert env["PATH"] == "/usr/bin"
    assert env["http_proxy"] == guard.proxy_url


def test_child_environment_is_an_allow_list_not_a_copy_of_the_actors() -> None:
    actor = {
        "PATH": "/usr/bin", "HOME": "/home/ggt", "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC",
        "GGT_S3_SECRET_ACCESS_KEY": "s3cr3t", "GGT_BUS_KEY": "k3y", "GGT_AMQP_URL": "amqp://u:pw@h/",
        "AWS_SECRET_ACCESS_KEY": "x", "LD_PRELOAD": "/tmp/evil.so", "PYTHONPATH": "/tmp", "no_proxy": "*",
    }  # fmt: skip
    assert child_env(actor) == {"PATH": "/usr/bin", "HOME": "/home/ggt", "LANG": "C.UTF-8", "LC_ALL": "C",
                                "TZ": "UTC"}
    proxied = child_env(actor, proxy_url="http://127.0.0.1:9")
    assert proxied["https_proxy"] == proxied["HTTP_PROXY"] == "http://127.0.0.1:9"
    assert child_env({})["PATH"]  # a child can always find its programs


# --- cloud metadata and the operator's deny list


def test_cloud_metadata_stays_refused_even_inside_an_allow_listed_network() -> None:
    allow = parse_networks(["169.254.0.0/16", "168.63.0.0/16", "fd00::/8", "100.64.0.0/10"])
    for address in ("169.254.169.254", "168.63.129.16", "fd00:ec2::254", "100.100.100.200",
                    "::ffff:169.254.169.254"):
        assert not address_allowed(address, allow=allow), address
    assert address_allowed("169.254.10.10", allow=allow)


def test_deny_networks_win_over_allow_networks_and_over_public() -> None:
    allow = parse_networks(["10.0.0.0/8"])
    deny = parse_networks(["10.9.0.0/16", "8.8.8.0/24"])
    assert address_allowed("10.1.2.3", allow=allow, deny=deny)
    assert not address_allowed("10.9.1.1", allow=allow, deny=deny)
    assert not address_allowed("8.8.8.8", allow=allow, deny=deny)
    assert not address_allowed("::ffff:10.9.1.1", allow=allow, deny=deny)
    assert denial_reason("10.9.1.1", allow=allow, deny=deny) == "denied by the operator (GGT_DENY_NETWORKS)"


def test_check_url_refusals_name_no_address_or_reason() -> None:
    with pytest.raises(JobError) as caught:
        check_url("http://169.254.169.254/latest/meta-data/")
    assert caught.value.code is ErrorCode.URL_NOT_ALLOWED and caught.value.detail == SAFE_REFUSAL
    with pytest.raises(JobError):
        check_url("http://10.9.0.1/", allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])


# --- playlists ffmpeg reads only as the guard rewrote them


def to_guard(url: str) -> str:
    return "http://127.0.0.1:9" + gateway_path(url)


def test_every_url_of_a_playlist_points_back_at_the_guard() -> None:
    playlist = (
        "#EXTM3U\r\n#EXT-X-KEY:METHOD=AES-128,URI=\"key.bin\",IV=0x1\n"
        "#EXT-X-MAP:URI=init.mp4\n#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"a\",URI=\"https://cdn.example/a.m3u8\"\n"
        "#EXTINF:2,\n  seg0.ts  \r#EXTINF:2,\x00/abs/seg1.ts\n#EXT-X-STREAM-INF:BANDWIDTH=1\nv/low.m3u8\n"
    )
    out = rewrite_hls(playlist, base_url="https://site.example/live/x.m3u8", to_guard=to_guard)
    targets = [gateway_target(u.removeprefix("http://127.0.0.1:9")) for u in _urls_in(out)]
    assert targets == [
        "https://site.example/live/key.bin", "https://site.example/live/init.mp4", "https://cdn.example/a.m3u8",
        "https://site.example/live/seg0.ts", "https://site.example/abs/seg1.ts",
        "https://site.example/live/v/low.m3u8",
    ]
    assert "IV=\"0x1\"" in out and "#EXTINF:2," in out


def _urls_in(text: str) -> list[str]:
    urls = []
    for line in text.splitlines():
        if line.startswith("#"):
            urls += [value for key, value in parse_attributes(line.partition(":")[2]) if key == "URI="]
        elif line:
            urls.append(line)
    return urls


@pytest.mark.parametrize(
    "line",
    ["httpproxy://10.0.0.5:80/s.ts", "tcp://10.0.0.5:80", "crypto+tcp://10.0.0.5:80", "file:///etc/passwd",
     "data:text/plain,x", '#EXT-X-KEY:METHOD=AES-128,URI="tcp://10.0.0.5:1"', "#EXT-X-MAP:URI=httpproxy://h:1/"],
)
def test_a_playlist_naming_any_scheme_but_http_is_refused_whole(line: str) -> None:
    with pytest.raises(ManifestRefused):
        rewrite_hls(f"#EXTM3U\n#EXTINF:2,\n{line}\n", base_url="http://site.example/x.m3u8", to_guard=to_guard)


def test_attributes_are_read_as_ffmpeg_reads_them() -> None:
    assert parse_attributes('METHOD=AES-128, URI="a\\"b,c",IV=0x1') == [
        ("METHOD=", "AES-128"), ("URI=", 'a"b,c'), ("IV=", "0x1")]


@pytest.mark.parametrize(
    ("prefix", "complete", "kind"),
    [
        (b"#EXTM3U\n#EXTINF", False, BodyKind.HLS),
        (b"#EXT", False, BodyKind.NEED_MORE),
        (b"ID3\x04\x00\x00\x00\x00\x00\x02ab#EXTM3U\n", False, BodyKind.HLS),  # probing skips ID3v2
        (b"<?xml version='1.0'?><mpd profiles='dash:profile'", False, BodyKind.DASH),
        (b"\x00\x00\x00\x18ftypisom<MPD", False, BodyKind.MEDIA),  # after a NUL ffmpeg's probe stops
        (b"plain text with no playlist", False, BodyKind.NEED_MORE),
        (b"plain text with no playlist", True, BodyKind.MEDIA),
        (b"\xef\xbb\xbf#EXTM3U\n", True, BodyKind.MEDIA),  # ffmpeg does not skip a BOM either
    ],
)
def test_bodies_are_told_apart_as_ffmpegs_probe_would(prefix: bytes, complete: bool, kind: BodyKind) -> None:
    assert sniff_body(prefix, complete=complete) is kind


def test_gateway_paths_round_trip_and_keep_the_file_name_ffmpeg_judges() -> None:
    url = "https://cdn.example/a/seg 01.ts?token=x/y"
    path = gateway_path(url)
    assert path.endswith("/seg01.ts") and gateway_target(path) == url
    assert gateway_target("/via/!!!/x") is None and gateway_target("/other") is None


def test_gateway_url_refuses_inputs_that_are_not_http() -> None:
    guard = FetchGuard()
    for url in ("file:///etc/passwd", "tcp://10.0.0.5:80", "httpproxy://10.0.0.5:80/"):
        with pytest.raises(JobError) as caught:
            guard.gateway_url(url)
        assert caught.value.code is ErrorCode.URL_NOT_ALLOWED


# --- what yt-dlp found


def test_formats_with_urls_of_other_schemes_make_the_source_refused() -> None:
    good = {"url": "https://cdn.example/v.mp4", "fragments": [{"path": "s1.m4s"}], "fragment_base_url": "https://c/"}
    assert fetchable(good)
    for bad in ({"url": "tcp://10.0.0.5:80"}, {"url": "https://c/x", "manifest_url": "httpproxy://h:1/"},
                {"url": "https://c/x", "fragments": [{"url": "crypto+tcp://h:1/"}]},
                {"url": "https://c/x", "fragments": [{"path": "httpproxy://h:1/s"}]},
                {"url": "http://site.example/httpproxy://10.0.0.5:80/video.mp4"}):
        assert not fetchable(bad), bad
        with pytest.raises(JobError) as caught:
            refuse_unfetchable({"url": "https://ok/", "formats": [good, bad]})
        assert caught.value.code is ErrorCode.URL_NOT_ALLOWED
    refuse_unfetchable({"formats": [good], "entries": [{"formats": [good]}]})
    assert fetchable({"url": "https://web.archive.org/web/2020/https://example.com/v.mp4"})


def test_guard_without_refusals_reports_no_error() -> None:
    guard = FetchGuard()
    assert guard.blocked_error() is None
    guard.raise_if_blocked()
