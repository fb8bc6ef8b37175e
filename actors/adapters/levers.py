"""The operator's levers for the real web, built once per actor from Settings: egress proxy,
cookies, yt-dlp extractor arguments and plugin packages (docs/DEPLOY.md, "On a datacenter host").

``Levers.open(settings)`` validates them (a bad one raises ``LeversInvalid`` with a message that
names the setting and never repeats a secret), loads the cookies file once and builds the plugin
directory; ``levers.guard(...)`` makes each job's FetchGuard with them; ``close()`` removes the
plugin directory. ``lever_problems(settings)`` is the same validation for ``getgoodtape check``.
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import tempfile
from pathlib import Path
from typing import Any

from actors.guard.addresses import IPNetwork, parse_networks
from actors.guard.cookies import CookiesFileInvalid, load_cookies
from actors.guard.egress import Egress, EgressProxyInvalid
from actors.guard.extract import WorkerLevers
from actors.guard.gateway_cookies import GatewayCookies
from actors.guard.proxy import FetchGuard
from actors.guard.ytdlp_levers import LeverInvalid, parse_extractor_args, plugin_files, plugin_view
from actors.runtime.settings import Settings


class LeversInvalid(ValueError):
    """A lever setting cannot be used; the message says which and why (no cookie, token or password in it)."""


def lever_problems(settings: Settings) -> list[tuple[str, str]]:
    """(setting, problem) for each lever that cannot be used; empty when all are fine (or unset)."""
    problems: list[tuple[str, str]] = []
    allowed = []
    for setting, cidrs in (("GGT_ALLOW_NETWORKS", settings.allow_networks),
                           ("GGT_DENY_NETWORKS", settings.deny_networks)):
        for cidr in cidrs:
            try:
                (network,) = parse_networks([cidr])
            except ValueError as exc:  # host bits set ("10.0.0.1/8"), not an address
                problems.append((setting, f"{cidr!r} is not a network: {exc}"))
                continue
            if setting == "GGT_ALLOW_NETWORKS":
                allowed.append(network)
    problems += _allow_everything(allowed)
    try:
        Egress(settings.egress_proxy)
    except EgressProxyInvalid as exc:
        problems.append(("GGT_EGRESS_PROXY", str(exc)))
    if settings.cookies_file:
        try:
            load_cookies(settings.cookies_file)
        except CookiesFileInvalid as exc:
            problems.append(("GGT_COOKIES_FILE", str(exc)))
    try:
        parse_extractor_args(settings.ytdlp_extractor_args)
    except LeverInvalid as exc:
        problems.append(("GGT_YTDLP_EXTRACTOR_ARGS", str(exc)))
    for name in settings.ytdlp_plugins:
        try:
            plugin_files(name)
        except LeverInvalid as exc:
            problems.append(("GGT_YTDLP_PLUGINS", str(exc)))
    return problems


def _allow_everything(networks: list[IPNetwork]) -> list[tuple[str, str]]:
    """A problem when the allowed networks together cover every IPv4 or every IPv6 address (``0.0.0.0/0``,
    or ``0.0.0.0/1,128.0.0.0/1``): the guard would protect nothing."""
    found = []
    for version, everything in ((4, ipaddress.ip_network("0.0.0.0/0")), (6, ipaddress.ip_network("::/0"))):
        if everything in ipaddress.collapse_addresses(n for n in networks if n.version == version):
            found.append(("GGT_ALLOW_NETWORKS", f"the entries together allow every IPv{version} address: the guard "
                                                "would protect nothing (name the internal networks users may reach)"))
    return found


class Levers:
    """The levers of one actor process: ``levers = Levers.open(settings)`` … ``levers.close()``."""

    def __init__(self, settings: Settings, *, egress: Egress, cookies: http.cookiejar.CookieJar | None,
                 extractor_args: dict[str, dict[str, list[str]]], plugin_dir: str,
                 plugin_root: tempfile.TemporaryDirectory[str] | None) -> None:
        self.settings = settings
        self.egress = egress
        self.cookies = cookies
        self.extractor_args = extractor_args
        self.plugin_dir = plugin_dir
        self._plugin_root = plugin_root

    @classmethod
    def open(cls, settings: Settings) -> Levers:
        """Validate and load the levers of ``settings``; raises LeversInvalid."""
        problems = lever_problems(settings)
        if problems:
            raise LeversInvalid("; ".join(f"{name}: {problem}" for name, problem in problems))
        root = tempfile.TemporaryDirectory(prefix="ggt-ytdlp-plugins-") if settings.ytdlp_plugins else None
        plugin_dir = plugin_view(settings.ytdlp_plugins, Path(root.name)) if root is not None else ""
        return cls(settings, egress=Egress(settings.egress_proxy),
                   cookies=load_cookies(settings.cookies_file) if settings.cookies_file else None,
                   extractor_args=parse_extractor_args(settings.ytdlp_extractor_args),
                   plugin_dir=plugin_dir, plugin_root=root)

    def close(self) -> None:
        """Remove the plugin directory (the workers that use it are stopped first)."""
        if self._plugin_root is not None:
            self._plugin_root.cleanup()

    def guard(self, **kwargs: Any) -> FetchGuard:
        """A FetchGuard for one job: the settings' networks, the egress, the operator's cookies;
        ``kwargs`` as FetchGuard's."""
        cookies = GatewayCookies(self.cookies) if self.cookies is not None else None
        return FetchGuard(allow=self.settings.allow_networks, deny=self.settings.deny_networks,
                          egress=self.egress, cookies=cookies, **kwargs)

    def worker_levers(self) -> WorkerLevers:
        """What an extraction worker (or the feeder) needs of the levers: paths and arguments, no cookie value."""
        return WorkerLevers(cookies_file=self.settings.cookies_file, extractor_args=self.extractor_args,
                            plugin_dir=self.plugin_dir)
