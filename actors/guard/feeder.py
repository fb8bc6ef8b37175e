"""The uploader's feeder: yt-dlp writing one source (merged when it has several formats) to stdout.

Run as ``python -m actors.guard.feeder --proxy URL [-f FORMAT] [--add-header N:V] -- PAGE_URL``
with the guard's allow-listed environment. It is yt-dlp without config, plugins, cache or netrc,
plus one rule the yt-dlp CLI cannot express: before anything is downloaded, every URL of the chosen
formats must be http(s) (else it exits with ``url_not_allowed`` on stderr), and each is replaced by
the guard's gateway URL for it. So the ffmpeg yt-dlp runs to merge formats — with a whitelist of
``http,tcp,crypto`` — and yt-dlp's own downloaders reach only the guard, which rewrites playlists,
refuses DASH for ffmpeg and vets every hop.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import msgspec
import yt_dlp
from yt_dlp.postprocessor.common import PostProcessor

from actors.guard.cookies import apply_to, load_cookies
from actors.guard.extract import FEEDER_LEVERS_VARIABLE, WorkerLevers
from actors.guard.proxy import FFMPEG_PROTOCOL_WHITELIST, gateway_path
from actors.guard.urls import refuse_unfetchable
from actors.guard.ytdlp_levers import use_plugin_dir
from messages.errors import ErrorCode, JobError

#: yt-dlp protocols whose ``url`` is fetched as it is (by yt-dlp's http/HLS downloaders or by ffmpeg):
#: these are pointed at the gateway. DASH fragments are fetched by yt-dlp through the proxy.
GATEWAY_PROTOCOLS = frozenset({"http", "https", "m3u8", "m3u8_native", "http_dash_segments"})
#: exit status when a format names something the guard will not fetch
EXIT_NOT_ALLOWED = 3


class GuardFormats(PostProcessor):
    """Before the download: refuse non-http(s) URLs, then point each format's URL at the guard's gateway."""

    def __init__(self, proxy_url: str) -> None:
        super().__init__()
        self._proxy_url = proxy_url

    def run(self, info: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        """Check and rewrite ``info`` (and its requested formats) in place."""
        refuse_unfetchable(info)
        for fmt in [info, *(info.get("requested_formats") or ())]:
            if fmt.get("url") and str(fmt.get("protocol") or "https") in GATEWAY_PROTOCOLS:
                fmt["url"] = self._proxy_url + gateway_path(str(fmt["url"]))
        return [], info


def feeder_params(*, proxy_url: str, timeout: float, format_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """YoutubeDL params of the feeder: stdout, through the guard, nothing read from the machine."""
    return {
        "quiet": True, "no_warnings": True, "noprogress": True, "logtostderr": True,
        "outtmpl": {"default": "-"}, "nopart": True, "noplaylist": True, "playlist_items": "1",
        "proxy": proxy_url, "geo_verification_proxy": proxy_url, "socket_timeout": timeout,
        "format": format_id or None, "http_headers": headers,
        "usenetrc": False, "netrc_cmd": None, "cachedir": False, "cookiefile": None,
        "enable_file_urls": False, "allow_unplayable_formats": False,
        # the ffmpeg yt-dlp runs (merges, HLS) may speak plain http to the guard only
        "external_downloader_args": {"ffmpeg_i": ["-protocol_whitelist", FFMPEG_PROTOCOL_WHITELIST]},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Download the page's chosen formats to stdout; the exit status says how it went."""
    parser = argparse.ArgumentParser(prog="python -m actors.guard.feeder")
    parser.add_argument("--proxy", required=True)
    parser.add_argument("--socket-timeout", type=float, default=30.0)
    parser.add_argument("-f", "--format", default="")
    parser.add_argument("--add-header", action="append", default=[])
    parser.add_argument("url")
    args = parser.parse_args(argv)
    headers = dict(item.split(":", 1) for item in args.add_header if ":" in item)
    levers = msgspec.json.decode(os.environ.get(FEEDER_LEVERS_VARIABLE) or "{}", type=WorkerLevers)
    use_plugin_dir(levers.plugin_dir)  # the operator's allowed plugin packages only, or none
    params = feeder_params(proxy_url=args.proxy, timeout=args.socket_timeout, format_id=args.format,
                           headers=headers)
    params["extractor_args"] = levers.extractor_args
    with yt_dlp.YoutubeDL(params) as ydl:
        if levers.cookies_file:  # into the jar, never as cookiefile (yt-dlp would write it back)
            apply_to(ydl.cookiejar, load_cookies(levers.cookies_file))
        ydl.add_post_processor(GuardFormats(args.proxy), when="before_dl")
        try:
            return ydl.download([args.url])
        except (JobError, yt_dlp.utils.DownloadError) as exc:
            cause = exc if isinstance(exc, JobError) else (exc.exc_info[1] if exc.exc_info else None)
            if isinstance(cause, JobError) and cause.code is ErrorCode.URL_NOT_ALLOWED:
                print(f"{ErrorCode.URL_NOT_ALLOWED.value}: {cause.detail}", file=sys.stderr)
                return EXIT_NOT_ALLOWED
            return 1


if __name__ == "__main__":
    sys.exit(main())
