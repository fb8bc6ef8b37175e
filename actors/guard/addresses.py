"""Which IP addresses a user's URL may reach: pure functions over ``ipaddress`` values.

The rule: an address is allowed when it is publicly routable or lies in a network the operator
allow-listed. IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4) are judged by the IPv4
address inside, because that is where the packets end up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_v4 = ipaddress.IPv4Network
_v6 = ipaddress.IPv6Network

#: cloud instance services (metadata, WireServer, task credentials): never reachable, whatever
#: an operator allow-lists, because they hand out the host's credentials. Some are public addresses.
CLOUD_METADATA: tuple[tuple[IPNetwork, str], ...] = (
    (_v4("169.254.169.254/32"), "cloud metadata"),
    (_v4("169.254.170.2/32"), "cloud metadata (ECS task credentials)"),
    (_v4("169.254.169.253/32"), "cloud DNS (AWS)"),
    (_v4("168.63.129.16/32"), "cloud metadata (Azure WireServer)"),
    (_v4("100.100.100.200/32"), "cloud metadata (Alibaba)"),
    (_v4("192.0.0.192/32"), "cloud metadata (Oracle)"),
    (_v6("fd00:ec2::254/128"), "cloud metadata (AWS IPv6)"),
    (_v6("fd00:ec2::23/128"), "cloud DNS (AWS IPv6)"),
)

#: IPv4 ranges no user URL may reach, first match names the reason (most specific first)
BLOCKED_IPV4: tuple[tuple[IPNetwork, str], ...] = (
    (_v4("0.0.0.0/8"), "this-network"),
    (_v4("10.0.0.0/8"), "private"),
    (_v4("100.64.0.0/10"), "shared address space (CGNAT)"),
    (_v4("127.0.0.0/8"), "loopback"),
    (_v4("169.254.0.0/16"), "link-local (cloud metadata)"),
    (_v4("172.16.0.0/12"), "private"),
    (_v4("192.0.0.0/24"), "IETF protocol assignments"),
    (_v4("192.0.2.0/24"), "documentation"),
    (_v4("192.88.99.0/24"), "6to4 relay anycast"),
    (_v4("192.168.0.0/16"), "private"),
    (_v4("198.18.0.0/15"), "benchmarking"),
    (_v4("198.51.100.0/24"), "documentation"),
    (_v4("203.0.113.0/24"), "documentation"),
    (_v4("224.0.0.0/4"), "multicast"),
    (_v4("255.255.255.255/32"), "broadcast"),
    (_v4("240.0.0.0/4"), "reserved"),
)

#: IPv6 ranges no user URL may reach (the IPv4-carrying forms are handled before this table)
BLOCKED_IPV6: tuple[tuple[IPNetwork, str], ...] = (
    (_v6("::/128"), "unspecified"),
    (_v6("::1/128"), "loopback"),
    (_v6("::/96"), "IPv4-compatible (deprecated)"),
    (_v6("::ffff:0:0:0/96"), "IPv4-translated (SIIT)"),
    (_v6("64:ff9b:1::/48"), "local-use NAT64"),
    (_v6("100::/64"), "discard-only"),
    (_v6("2001::/32"), "Teredo"),
    (_v6("2001:2::/48"), "benchmarking"),
    (_v6("2001:10::/28"), "ORCHID"),
    (_v6("2001:20::/28"), "ORCHIDv2"),
    (_v6("2001:db8::/32"), "documentation"),
    (_v6("3fff::/20"), "documentation"),
    (_v6("5f00::/16"), "SRv6 SIDs"),
    (_v6("fc00::/7"), "unique-local"),
    (_v6("fe80::/10"), "link-local"),
    (_v6("fec0::/10"), "site-local"),
    (_v6("ff00::/8"), "multicast"),
)

#: the only IPv6 space allocated for global unicast; anything outside it is not a public host
GLOBAL_UNICAST_V6 = _v6("2000::/3")
#: the well-known NAT64 prefix: the last 32 bits are the IPv4 destination
NAT64_WELL_KNOWN = _v6("64:ff9b::/96")


def embedded_ipv4(ip: IPAddress) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address delivers to (mapped, NAT64, 6to4) and the form's name."""
    if ip.version != 6:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip in NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    return None


def block_reason(ip: IPAddress | str) -> str | None:
    """Why ``ip`` is not a public address (``"loopback"``, ``"private"`` …), or None if it is public."""
    ip = _as_address(ip)
    embedded = embedded_ipv4(ip)
    if embedded is not None:
        inner, form = embedded
        reason = block_reason(inner)
        return None if reason is None else f"{form} {reason}"
    metadata = _metadata_reason(ip)
    if metadata is not None:
        return metadata
    table = BLOCKED_IPV4 if ip.version == 4 else BLOCKED_IPV6
    for network, reason in table:
        if ip in network:
            return reason
    if ip.version == 6 and ip not in GLOBAL_UNICAST_V6:
        return "reserved"
    # the stdlib's registry view catches what our tables miss (it grows with each Python release)
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return "not globally routable"
    return None


def is_public_address(ip: IPAddress | str) -> bool:
    """True when ``ip`` is publicly routable (after unwrapping IPv4 carried inside IPv6)."""
    return block_reason(ip) is None


def denial_reason(ip: IPAddress | str, *, allow: Sequence[IPNetwork] = (),
                  deny: Sequence[IPNetwork] = ()) -> str | None:
    """Why a user's fetch may not connect to ``ip`` (None when it may).

    Order: cloud metadata and the operator's ``deny`` networks refuse first, even inside ``allow``;
    then ``allow`` admits; then only public addresses pass.
    """
    ip = _as_address(ip)
    # the IPv4 an address carries inside (mapped, NAT64, 6to4; Teredo's server and client) is where it
    # delivers: each must pass on its own, so allowing the outer network (say 2000::/3, which holds
    # 6to4's 2002::/16 and Teredo's 2001::/32) does not allow a private address inside
    embedded = embedded_ipv4(ip)
    inner: list[IPAddress] = [embedded[0]] if embedded is not None else []
    if isinstance(ip, ipaddress.IPv6Address) and ip.teredo is not None:
        inner += list(ip.teredo)
    candidates: list[IPAddress] = [ip, *inner]
    for candidate in candidates:
        metadata = _metadata_reason(candidate)
        if metadata is not None:
            return metadata
    if _within(candidates, deny):
        return "denied by the operator (GGT_DENY_NETWORKS)"
    if _within(candidates, allow) and all(_within([c], allow) or block_reason(c) is None for c in inner):
        return None
    return block_reason(ip)


def address_allowed(ip: IPAddress | str, *, allow: Sequence[IPNetwork],
                    deny: Sequence[IPNetwork] = ()) -> bool:
    """True when a user's fetch may connect to ``ip``: not metadata or denied, and public or allow-listed."""
    return denial_reason(ip, allow=allow, deny=deny) is None


def _within(candidates: Sequence[IPAddress], networks: Sequence[IPNetwork]) -> bool:
    # containment across versions is always False, but say so rather than rely on it
    return any(c.version == net.version and c in net for c in candidates for net in networks)


def _metadata_reason(ip: IPAddress) -> str | None:
    return next((reason for network, reason in CLOUD_METADATA
                 if ip.version == network.version and ip in network), None)


def parse_networks(cidrs: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    """Networks from CIDR strings such as ``"10.0.0.0/8"``; a bare address means just that host."""
    return tuple(
        c if isinstance(c, ipaddress.IPv4Network | ipaddress.IPv6Network) else ipaddress.ip_network(c.strip())
        for c in cidrs
    )


def parse_host_literal(text: str) -> IPAddress | None:
    """The address a URL host spells (``127.1``, ``0x7f.1``, ``2130706433``, ``[::1]``), else None.

    IPv4 follows libc ``inet_aton``: one to four dot-separated parts, each decimal, octal (leading
    0) or hex (0x), the last part filling the remaining bytes; trailing whitespace ends the text.
    """
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return None
    return _inet_aton(text.split(maxsplit=1)[0] if text else text)


_BASE_DIGITS = {8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        value = _inet_aton_number(part)
        if value is None:
            return None
        values.append(value)
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = last
    for index, value in enumerate(head):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def _inet_aton_number(part: str) -> int | None:
    if part[:2] in ("0x", "0X"):
        base, digits = 16, part[2:]
    elif len(part) > 1 and part[0] == "0":
        base, digits = 8, part[1:]
    else:
        base, digits = 10, part
    # explicit ASCII digit sets: int() would also accept other scripts' digits, libc does not
    if not digits or any(ch not in _BASE_DIGITS[base] for ch in digits):
        return None
    return int(digits, base)


def _as_address(ip: IPAddress | str) -> IPAddress:
    return ipaddress.ip_address(ip) if isinstance(ip, str) else ip
