"""The operator's cookies (``GGT_COOKIES_FILE``): read once, never written, never shown.

The file is Netscape-formatted, as yt-dlp's ``--cookies`` reads it, and is parsed by yt-dlp's own
loader into a jar that has no file name, so nothing can ever save into the operator's file (yt-dlp
writes its ``cookiefile`` back on close; we never give it one). The cookies reach sites two ways:

- extraction: each worker's YoutubeDL gets a copy of the jar before every job (``apply_to``);
- media fetches: the guard's gateway adds the ones matching each fetched URL (domain, path,
  secure, expiry as a browser would: the standard library's cookie policy) —
  ``actors.guard.gateway_cookies.GatewayCookies``.

They never travel in a message: ``strip_from_info`` removes them from the formats yt-dlp returns
(its ``cookies`` field), so a plan, an event or a dead letter carries only cookies the site itself
set. Hence the uploader host needs the same file (docs/DEPLOY.md, docs/SECURITY.md).
"""

from __future__ import annotations

import contextlib
import copy
import http.cookiejar
import io
import os
from collections.abc import Iterable
from typing import Any

from actors.core.ytdlp_info import COOKIE_ATTRIBUTES


class CookiesFileInvalid(ValueError):
    """``GGT_COOKIES_FILE`` cannot be used (the message names the file and the problem, never a cookie)."""


def load_cookies(path: str) -> http.cookiejar.CookieJar:
    """The cookies of the Netscape-format file at ``path``, in a jar that cannot save; raises CookiesFileInvalid.

    yt-dlp's loader prints each line it skips, cookie value included: that output is swallowed and
    only counted.
    """
    from yt_dlp.cookies import YoutubeDLCookieJar

    if not os.access(path, os.R_OK) or not os.path.isfile(path):
        raise CookiesFileInvalid(f"{path}: not a readable file")
    jar = YoutubeDLCookieJar()  # no filename: save() raises, so the operator's file is never written
    swallowed = io.StringIO()
    try:
        with contextlib.redirect_stderr(swallowed):
            jar.load(path, ignore_discard=True, ignore_expires=True)
    except http.cookiejar.LoadError:  # an OSError: first
        raise CookiesFileInvalid(f"{path}: not a Netscape-format cookies file (export one as yt-dlp's "
                                 "--cookies reads it)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CookiesFileInvalid(f"{path}: cannot be read ({type(exc).__name__})") from None
    if not len(jar):
        skipped = swallowed.getvalue().count("skipping cookie file entry")
        raise CookiesFileInvalid(f"{path}: holds no cookies ({skipped} malformed lines skipped)")
    return jar


def cookie_names(jar: Iterable[http.cookiejar.Cookie]) -> frozenset[str]:
    """Every cookie name in ``jar``: what ``strip_from_info`` removes. By name, not value: a site
    that refreshes a session cookie during extraction sets a new value of the same secret."""
    return frozenset(cookie.name for cookie in jar)


def apply_to(target: http.cookiejar.CookieJar, operator: Iterable[http.cookiejar.Cookie]) -> None:
    """Put copies of the operator's cookies into ``target`` (a YoutubeDL's jar, cleared per job)."""
    for cookie in operator:
        target.set_cookie(copy.copy(cookie))


def strip_cookie_string(cookies: str, names: frozenset[str]) -> str:
    """yt-dlp's ``cookies`` string without the cookies (and their attributes) named in ``names``."""
    kept: list[str] = []
    dropping = False
    for token in cookies.split(";"):
        name, sep, _ = token.strip().partition("=")
        if name.lower() in COOKIE_ATTRIBUTES or not sep:
            if not dropping and token.strip():
                kept.append(token.strip())
            continue
        dropping = name in names
        if not dropping:
            kept.append(token.strip())
    return "; ".join(kept)


def strip_from_info(info: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """``info`` (yt-dlp's sanitised dict, changed in place) with the operator's cookies removed from
    every format's ``cookies`` and ``Cookie`` header — of the result and of every playlist entry,
    nested ones included (yt-dlp fills each entry's formats too); the site's own cookies stay."""
    if not names:
        return info
    entries: list[Any] = []
    results: list[Any] = [info]
    while results:
        result = results.pop()
        if not isinstance(result, dict):
            continue
        entries += [result, *_items(result, "formats"), *_items(result, "requested_formats"),
                    *_items(result, "thumbnails")]
        results += _items(result, "entries")
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("cookies"), str):
            entry["cookies"] = strip_cookie_string(entry["cookies"], names) or None
            if entry["cookies"] is None:
                del entry["cookies"]
        headers = entry.get("http_headers")
        if isinstance(headers, dict):
            for name in [n for n in headers if n.lower() == "cookie"]:
                rest = "; ".join(part.strip() for part in str(headers[name]).split(";")
                                 if part.strip().partition("=")[0] not in names)
                if rest:
                    headers[name] = rest
                else:
                    del headers[name]
    return info


def _items(result: dict[str, Any], key: str) -> list[Any]:
    value = result.get(key)
    return list(value) if isinstance(value, list | tuple) else []


