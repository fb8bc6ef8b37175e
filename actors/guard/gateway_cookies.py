"""The guard's cookie jar for its gateway: the operator's cookies a browser would send, read-only.

Apart from ``actors.guard.cookies`` (the cookie files, plain data) because it is aiohttp's kind of
jar: the extraction workers, which import the rest, never load aiohttp.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import urllib.request
from http.cookies import BaseCookie, CookieError

import aiohttp
from yarl import URL


class GatewayCookies(aiohttp.DummyCookieJar):
    """aiohttp's cookie jar for the guard's gateway: the operator's cookies matching each request, read-only.

    What sites set is not kept (the site's own cookies come in ffmpeg's ``Cookie`` header, from the plan).
    """

    def __init__(self, jar: http.cookiejar.CookieJar) -> None:
        super().__init__()
        self._jar = jar

    def filter_cookies(self, request_url: URL) -> BaseCookie[str]:
        """The operator's cookies a browser would send to ``request_url``."""
        request = urllib.request.Request(str(request_url))
        self._jar.add_cookie_header(request)
        found: BaseCookie[str] = BaseCookie()
        for part in (request.get_header("Cookie") or "").split("; "):
            name, sep, value = part.partition("=")
            if not sep:
                continue
            with contextlib.suppress(CookieError):  # a name http.cookies refuses is not sent
                found[name] = value
                found[name].set(name, value, value)  # as written in the file, not re-quoted
        return found
