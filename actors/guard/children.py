"""The environment every child process starts with: an allow-list, never a copy of the actor's.

ffmpeg, ffprobe, yt-dlp (and the Deno it runs for a site's JavaScript) parse hostile bytes; the
actor's environment holds the broker URL, the bus key and, for some actors, storage credentials.
A child gets only what it needs to run: where programs are, a home, the locale and time zone, the
system's CA settings, and — when it should fetch through the guard — the guard's proxy variables.
"""

from __future__ import annotations

from collections.abc import Mapping

#: variables a child inherits from the actor, by exact name
INHERITED = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR"})
#: prefixes of inherited variables (the locale categories)
INHERITED_PREFIXES = ("LC_",)
#: the variables that point http clients (ffmpeg, yt-dlp, Deno) at a proxy
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
#: PATH for a child when the actor has none
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def child_env(environ: Mapping[str, str], *, proxy_url: str | None = None) -> dict[str, str]:
    """The environment for a child: the allow-listed variables of ``environ``, plus the guard's proxy.

    No ``no_proxy`` ever (ffmpeg and yt-dlp skip the proxy for the hosts it names); without
    ``proxy_url`` no proxy variable at all.
    """
    env = {name: value for name, value in environ.items()
           if name in INHERITED or name.startswith(INHERITED_PREFIXES)}
    env.setdefault("PATH", DEFAULT_PATH)
    if proxy_url is not None:
        env.update(dict.fromkeys(PROXY_VARIABLES, proxy_url))
    return env
