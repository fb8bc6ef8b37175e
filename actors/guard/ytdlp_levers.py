"""The operator's yt-dlp levers: extractor arguments, and the plugin packages allowed to load.

- ``GGT_YTDLP_EXTRACTOR_ARGS``: values of yt-dlp's ``--extractor-args`` (``IE_KEY:ARGS``, several
  separated by whitespace), parsed by yt-dlp's own option parser into YoutubeDL's
  ``extractor_args``. They may hold a PO token: errors name the entry's position, never its text.
- ``GGT_YTDLP_PLUGINS``: installed distributions (pip names) whose ``yt_dlp_plugins`` modules may
  load — a PO-token provider, say. Every other plugin stays off, installed or not. yt-dlp's own
  mechanism does the loading: its plugin directories (``yt_dlp.globals.plugin_dirs``) hold one
  sub-directory per plugin package with a ``yt_dlp_plugins`` tree inside; ``plugin_view`` builds
  such a directory holding links to the named distributions' plugin files only (installed plugin
  packages share one ``site-packages/yt_dlp_plugins``, so pointing yt-dlp at site-packages would
  load them all), and the extraction workers and the feeder search that directory alone.
"""

from __future__ import annotations

import importlib.metadata
import optparse
import os
import re
from collections.abc import Sequence
from pathlib import Path

#: yt-dlp's namespace package for plugins
PLUGIN_NAMESPACE = "yt_dlp_plugins"
#: a distribution name as PEP 508 allows it
_DISTRIBUTION_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")


class LeverInvalid(ValueError):
    """An operator's yt-dlp setting cannot be used (the message never repeats an extractor argument)."""


def parse_extractor_args(text: str) -> dict[str, dict[str, list[str]]]:
    """YoutubeDL's ``extractor_args`` for ``--extractor-args`` values separated by whitespace; raises LeverInvalid."""
    import yt_dlp

    entries = text.split()
    if not entries:
        return {}
    argv = ["--ignore-config"]
    for entry in entries:
        argv += ["--extractor-args", entry]
    for at, entry in enumerate(entries, start=1):
        key = entry.partition(":")[0]
        if ":" not in entry or not key or not re.fullmatch(r"[A-Za-z0-9_]+", key):
            raise LeverInvalid(f"entry {at} is not IE_KEY:ARGS "
                               "(for example youtube:player_client=web)")
    try:
        parsed = yt_dlp.parse_options(argv)
    except (optparse.OptParseError, SystemExit):
        raise LeverInvalid("not in yt-dlp's --extractor-args syntax "
                           "(IE_KEY:ARG=VALUE,VALUE;ARG=VALUE …)") from None
    return dict(parsed.ydl_opts.get("extractor_args") or {})


def plugin_files(name: str) -> list[tuple[Path, Path]]:
    """(path inside ``yt_dlp_plugins``'s parent, real file) of every plugin module of distribution ``name``;
    raises LeverInvalid when it is no valid name, not installed, or holds no yt-dlp plugin."""
    if not _DISTRIBUTION_NAME.match(name):
        raise LeverInvalid(f"{name!r} is not a package name")
    try:
        distribution = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise LeverInvalid(f"package {name!r} is not installed "
                           f"(pip install {name})") from None
    found = [(Path(*file.parts), Path(str(distribution.locate_file(file))))
             for file in distribution.files or ()
             if file.parts and file.parts[0] == PLUGIN_NAMESPACE and file.suffix == ".py"]
    if not found:
        raise LeverInvalid(f"package {name!r} holds no {PLUGIN_NAMESPACE} modules")
    return found


def plugin_view(names: Sequence[str], into: Path) -> str:
    """Build under ``into`` a yt-dlp plugin directory holding the named packages' plugins only (links
    to their files); return it for ``plugin_dirs`` ("" when no package is named)."""
    if not names:
        return ""
    for name in names:
        package = into / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        for relative, real in plugin_files(name):
            link = package / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(real, link)
    return str(into)


def use_plugin_dir(plugin_dir: str) -> None:
    """Point yt-dlp's plugin search at ``plugin_dir`` only ("" = no plugins at all, the API's
    ``--no-plugin-dirs``); call before the first YoutubeDL is made in this process."""
    from yt_dlp import globals as ytdlp_globals

    ytdlp_globals.plugin_dirs.value = [plugin_dir] if plugin_dir else []
