"""The converter: ResolveMedia → yt-dlp (+ ffprobe for direct links) → limits checked → MediaResolved.

The decisions live in ``actors.formats`` (which format, what the source is, which error code) and
``actors.planning`` (the plan and the limits); this module does the I/O around them.

Every fetch goes through the SSRF guard. yt-dlp runs in a worker thread (the guard's proxy lives on
the event loop) with one YoutubeDL per process, made and warmed up in ``setup`` (~1 s once: the
first extraction would otherwise compile every extractor's URL pattern), so that each resolve of
a direct link costs ~0.02 s of yt-dlp plus ~0.1 s of ffprobe. The YoutubeDL and its guard are shared, so
extractions in one process take turns (a lock held by the extracting thread itself): YoutubeDL is
not made for concurrent use, its cookie jar is emptied per job, and every refusal the shared guard
records while the lock is held belongs to that job. ffprobe, which runs per job, gets a guard of
its own. Throughput grows with converter processes, not with concurrency inside one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import yt_dlp
from yt_dlp import globals as ytdlp_globals
from yt_dlp.extractor import gen_extractor_classes
from yt_dlp.utils import YoutubeDLError, unified_timestamp

from actors.formats import probe_target, source_info, with_probe, ytdlp_error
from actors.guard import BlockedFetch, FetchGuard, check_url
from actors.planning import Limits, SourceInput, plan_media, validate_request
from actors.probe import ProbeResult, ffprobe
from actors.runtime import Actor, Context
from messages.errors import ErrorCode, JobError
from messages.types import ConvertRequested, MediaPlan, MediaResolved, ResolveMedia

#: key of yt-dlp's fallback extractor that reads any web page (its "Unsupported URL" means "no media here")
GENERIC_EXTRACTOR = "Generic"
#: a URL no site extractor claims, for the warm-up (it is matched against patterns, never fetched)
WARM_UP_URL = "https://warm-up.invalid/"
#: an HTTP date, parsed once at warm-up
WARM_UP_DATE = "Tue, 02 Jan 2024 03:04:05 GMT"
#: yt-dlp's own pick is not used (``actors.formats`` chooses), so a spec that never needs merging:
#: the default one would run ``ffmpeg -version`` (~0.2 s) to see whether merging is possible
FORMAT_SPEC = "best/bestvideo/bestaudio"
#: only the first entry of a playlist is ever extracted (the rest would cost a request each)
PLAYLIST_ITEMS = "1"


class _YtdlpLog:
    """yt-dlp's logger interface, forwarded to ours (its errors are raised and reported, so they log at info)."""

    def __init__(self, target: logging.Logger) -> None:
        self._log = target

    def debug(self, message: str) -> None:
        self._log.debug("yt-dlp: %s", message)

    def info(self, message: str) -> None:
        self._log.debug("yt-dlp: %s", message)

    def warning(self, message: str) -> None:
        self._log.info("yt-dlp warning: %s", message)

    def error(self, message: str) -> None:
        self._log.info("yt-dlp error: %s", message)


def ytdlp_params(*, proxy: Mapping[str, object], network_timeout: float, max_bytes: int,
                 logger: object) -> dict[str, Any]:
    """YoutubeDL params for resolving untrusted URLs: no config, cache, netrc, downloads or post-processing.

    ``proxy`` is the guard's ``ytdlp_options()``. Config files are a CLI feature (the API reads none);
    plugins are switched off separately (``disable_ytdlp_plugins``).
    """
    return {
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": logger,
        "skip_download": True,
        "format": FORMAT_SPEC,
        "noplaylist": True,  # a watch-URL inside a playlist means the video
        "playlist_items": PLAYLIST_ITEMS,
        "extract_flat": False,
        "lazy_playlist": False,
        "socket_timeout": network_timeout,
        # applies to downloads only (we download nothing here); set so no code path ever exceeds it
        "max_filesize": max_bytes,
        "usenetrc": False,
        "netrc_cmd": None,
        "cachedir": False,
        "cookiefile": None,
        "cookiesfrombrowser": None,
        "postprocessors": [],
        "external_downloader": {},
        "source_address": None,
        "enable_file_urls": False,
        "allow_unplayable_formats": False,
        "check_formats": False,
        **proxy,
    }


def disable_ytdlp_plugins() -> None:
    """Keep yt-dlp from importing plugins (the API equivalent of ``--no-plugin-dirs``); call before any YoutubeDL.

    yt-dlp loads plugins from its plugin directories the first time a YoutubeDL is made, unless the
    plugin directory list is empty (``yt_dlp.globals.plugin_dirs``, checked in yt_dlp/plugins.py).
    """
    ytdlp_globals.plugin_dirs.value = []


def blocked_error(blocked: list[BlockedFetch]) -> JobError | None:
    """``url_not_allowed`` naming the first refused fetch, or None."""
    if not blocked:
        return None
    first = blocked[0]
    return JobError(ErrorCode.URL_NOT_ALLOWED, f"{first.host} resolves to {first.ip}: {first.reason}")


class Converter(Actor):
    """ResolveMedia → MediaResolved: resolves the URL, learns the source, checks the limits, plans."""

    name = "converter"
    step = "resolve"

    async def setup(self) -> None:
        """Start the shared guard and make the process's one YoutubeDL (plugins off)."""
        self._stack = contextlib.AsyncExitStack()
        self.guard = await self._stack.enter_async_context(
            FetchGuard(allow=self.settings.allow_networks, idle_timeout=self.settings.network_timeout)
        )
        disable_ytdlp_plugins()
        params = ytdlp_params(proxy=self.guard.ytdlp_options(), network_timeout=self.settings.network_timeout,
                              max_bytes=self.settings.max_output_bytes, logger=_YtdlpLog(self.log))
        try:
            self.ydl = yt_dlp.YoutubeDL(params)
        except BaseException:
            await self._stack.aclose()
            raise
        self._ydl_lock = threading.Lock()
        # jobs wait for their turn here, not in a worker thread: threads parked on _ydl_lock would
        # fill the default executor that the guard's own name lookups (loop.getaddrinfo) need
        self._extract_turn = asyncio.Lock()
        # yt-dlp's own order (YoutubeDL tries them in it): the first suitable extractor handles a URL
        self._extractors = gen_extractor_classes()
        await asyncio.to_thread(self._warm_up)

    def _warm_up(self) -> None:
        """Pay yt-dlp's one-off costs now rather than in the first job: no network involved.

        The first extraction tests a URL against every extractor's pattern, compiling ~1,900 regular
        expressions (~0.8 s), imports the generic extractor's module and parses its first date.
        """
        self._extractor_for(WARM_UP_URL)
        self.ydl.get_info_extractor(GENERIC_EXTRACTOR)
        # the generic extractor dates a direct link by its Last-Modified header; the first parse
        # compiles ~50 strptime patterns (~0.2 s)
        unified_timestamp(WARM_UP_DATE)

    async def teardown(self) -> None:
        """Stop the guard, then close the YoutubeDL once no extraction uses it."""
        # the guard first: an extraction still running in a thread (its job was cancelled) then fails
        # fast instead of waiting on a proxy that needs this loop
        await self._stack.aclose()
        await asyncio.to_thread(self._close_ydl)

    def _close_ydl(self) -> None:
        if self._ydl_lock.acquire(timeout=self.settings.network_timeout):
            try:
                self.ydl.close()
            finally:
                self._ydl_lock.release()

    async def resolve(self, message: ResolveMedia, ctx: Context) -> None:
        """Resolve ``message.request.url`` and publish the plan (or raise a coded JobError)."""
        plan = await self.plan_for(message.request)
        await ctx.publish(MediaResolved(job_id=message.job_id, plan=plan))

    async def plan_for(self, request: ConvertRequested) -> MediaPlan:
        """The MediaPlan for ``request``: checks, yt-dlp, ffprobe where needed, limits."""
        error = validate_request(request, max_duration=self.settings.max_duration)
        if error is not None:
            raise JobError(error.code, error.detail)
        url = request.url.strip()
        check_url(url, allow=self.settings.allow_networks)
        async with self._extract_turn:
            info = await asyncio.to_thread(self._extract, url)
        source = source_info(info, request)
        target = probe_target(source)
        if target is not None:
            try:
                probe = await self._probe(target)
            except JobError as exc:
                if source.duration is None or exc.code is ErrorCode.URL_NOT_ALLOWED:
                    raise
                # yt-dlp knew the duration; the probe was only for codecs, and ffmpeg will judge the source
                self.log.info("probe failed; planning without codec details", extra={"code": str(exc.code)})
            else:
                source = with_probe(source, probe)
        return plan_media(request=request, source=source, limits=Limits.from_settings(self.settings))

    # --- yt-dlp, in a worker thread

    def _extract(self, url: str) -> dict[str, Any]:
        """yt-dlp's processed info for ``url``; raises coded JobErrors. Runs in a thread, one at a time."""
        with self._ydl_lock:
            # nothing else uses this guard while the lock is held: what it refuses now is this job's
            self.guard.blocked.clear()
            self.ydl.cookiejar.clear()  # a site's cookies from another job stay with that job
            try:
                info = self.ydl.extract_info(url, download=False, process=True)
            except YoutubeDLError as exc:  # DownloadError wraps most; RequestError (file:// …) comes bare
                text = str(exc)
                by_generic = "unsupported url" in text.lower() and self._extractor_for(url) == GENERIC_EXTRACTOR
                raise blocked_error(self.guard.blocked) or ytdlp_error(text, by_generic=by_generic) from None
            blocked = blocked_error(self.guard.blocked)
            if blocked is not None:
                raise blocked
            if not isinstance(info, dict):
                raise JobError(ErrorCode.NO_MEDIA_FOUND, "yt-dlp returned nothing")
            # plain data from here on: no LazyLists or callables cross into the planning core
            return self.ydl.sanitize_info(info)

    def _extractor_for(self, url: str) -> str:
        """The key of the extractor yt-dlp picks for ``url``: the first suitable one (the generic one is last)."""
        return next((ie.ie_key() for ie in self._extractors if ie.suitable(url)), "")

    # --- ffprobe, through a guard of the job's own

    async def _probe(self, target: SourceInput) -> ProbeResult:
        """ffprobe ``target`` through the SSRF guard with the format's headers; raises coded JobErrors."""
        timeout = self.settings.network_timeout
        async with FetchGuard(allow=self.settings.allow_networks, idle_timeout=timeout) as guard:
            try:
                result = await ffprobe(target.url, timeout=timeout, headers=target.headers,
                                       wrap_input=guard.input_args, env=guard.subprocess_env(os.environ))
            except JobError:
                guard.raise_if_blocked()  # a refused fetch explains the failure best
                raise
            guard.raise_if_blocked()  # ffmpeg skips HLS segments it cannot open and may still succeed
            return result
