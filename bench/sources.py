"""The benchmark's sources, generated with ffmpeg (lavfi testsrc2 + sine, x264 ultrafast) and cached.

``ensure_sources(work_dir, small=False)`` makes what is missing and returns name → Path. The work
directory (default ``$GGT_BENCH_DIR`` or /tmp/ggt-bench) is outside git; files are reused across runs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import msgspec

#: frames per second of the generated video
FPS = 25
#: a keyframe every 2 s, like a typical web upload
GOP_FRAMES = 50
#: longest one generation may take, seconds (the 5-minute 720p source takes ~1 min on 2 cores)
GENERATE_TIMEOUT_S = 1800


class Source(msgspec.Struct, frozen=True, kw_only=True):
    """A source to generate: seconds, picture size (None = audio only), file name."""

    name: str
    seconds: float
    width: int | None = 1280
    height: int | None = 720

    @property
    def file_name(self) -> str:
        """The cached file's name (parameters included, so a change makes a new file)."""
        size = f"{self.width}x{self.height}" if self.width else "audio"
        ext = "mp4" if self.width else "m4a"
        return f"{self.name}-{size}-{self.seconds:g}s.{ext}"


#: name → source, full size: the 5-minute 720p video, the 1-second clip, the 30-second clip of the
#: concurrency run, the 60-minute audio-only source
FULL = {
    "video": Source(name="video", seconds=300),
    "clip": Source(name="clip", seconds=1),
    "short": Source(name="short", seconds=30),
    "audio": Source(name="audio", seconds=3600, width=None, height=None),
}
#: the same roles, tiny (CI): seconds, not minutes
SMALL = {
    "video": Source(name="video", seconds=4, width=320, height=240),
    "clip": Source(name="clip", seconds=1, width=320, height=240),
    "short": Source(name="short", seconds=2, width=320, height=240),
    "audio": Source(name="audio", seconds=6, width=None, height=None),
}


def generate_argv(source: Source, target: Path) -> list[str]:
    """ffmpeg making ``source`` at ``target``: H.264 (ultrafast) + AAC in MP4, or AAC in M4A (faststart)."""
    argv = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]
    if source.width:
        argv += ["-f", "lavfi", "-i",
                 f"testsrc2=size={source.width}x{source.height}:rate={FPS}:duration={source.seconds}"]
    argv += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={source.seconds}"]
    if source.width:
        argv += ["-c:v", "libx264", "-preset", "ultrafast", "-g", str(GOP_FRAMES), "-pix_fmt", "yuv420p"]
    argv += ["-c:a", "aac", "-b:a", "128k", "-ac", "2", "-movflags", "+faststart",
             "-f", "mp4" if source.width else "ipod", str(target)]
    return argv


def ensure_sources(work_dir: Path, *, small: bool = False) -> dict[str, Path]:
    """Every source of the chosen size under ``work_dir/media``, generated when missing."""
    media = work_dir / "media"
    media.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for role, source in (SMALL if small else FULL).items():
        target = media / source.file_name
        if not target.exists():
            partial = target.with_name(".partial-" + target.name)
            subprocess.run(generate_argv(source, partial), check=True, timeout=GENERATE_TIMEOUT_S)
            partial.rename(target)
        paths[role] = target
    return paths
