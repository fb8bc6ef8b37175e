"""The original design's processor, rebuilt as a long-lived process for the comparison.

As the original video-processor did: yt-dlp downloads the source into a temporary directory,
ffmpeg converts it into a temporary file, and curl PUTs that file to the presigned URL
(``upload_to_r2_direct``: ``curl -X PUT -H Content-Type --data-binary @file``). With ``relay_url``
the PUT goes to the relay process instead (the older path through the Worker), which uploads it again.

``python -m bench.original`` reads one Job (JSON) per stdin line and answers one Timings line on
stdout. yt-dlp is imported and its extractors warmed once at start, as in a running service.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import msgspec


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One conversion: the source URL, GetGoodTape's output args, where to PUT the result."""

    url: str
    output_args: list[str]
    extension: str
    put_url: str
    content_type: str
    relay_url: str = ""
    work_dir: str = ""


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    """Seconds of each step and the size of the uploaded file; ``error`` when a step failed."""

    download: float = 0.0
    convert: float = 0.0
    upload: float = 0.0
    size: int = 0
    error: str = ""


def ydl_params(out_dir: Path) -> dict:
    """yt-dlp options of a plain download into ``out_dir`` (no config, cache or plugins)."""
    return {"quiet": True, "no_warnings": True, "noprogress": True, "outtmpl": str(out_dir / "source.%(ext)s"),
            "cachedir": False, "noplaylist": True, "nopart": True}


def run_job(job: Job) -> Timings:
    """Download, convert, upload; every file in a temporary directory removed afterwards."""
    import yt_dlp

    with tempfile.TemporaryDirectory(prefix="ggt-original-", dir=job.work_dir or None) as tmp:
        tmp_dir = Path(tmp)
        t0 = time.monotonic()
        with yt_dlp.YoutubeDL(ydl_params(tmp_dir)) as ydl:
            ydl.download([job.url])
        source = next(tmp_dir.glob("source.*"))
        t1 = time.monotonic()
        output = tmp_dir / f"output.{job.extension}"
        convert = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
                                  "-i", str(source), *job.output_args, str(output)], capture_output=True)
        if convert.returncode != 0:
            return Timings(error="ffmpeg: " + convert.stderr.decode(errors="replace")[-500:])
        t2 = time.monotonic()
        target = job.put_url if not job.relay_url else f"{job.relay_url}?to={quote(job.put_url, safe='')}"
        upload = subprocess.run(["curl", "-sS", "-f", "-X", "PUT", "-H", f"Content-Type: {job.content_type}",
                                 "--data-binary", f"@{output}", "--max-time", "600", target], capture_output=True)
        if upload.returncode != 0:
            return Timings(error="curl: " + upload.stderr.decode(errors="replace")[-500:])
        t3 = time.monotonic()
        return Timings(download=t1 - t0, convert=t2 - t1, upload=t3 - t2, size=output.stat().st_size)


def main() -> None:
    """Serve jobs from stdin until it closes."""
    import yt_dlp
    from yt_dlp.extractor import gen_extractor_classes

    # a running service has paid yt-dlp's one-off costs already (its extractor patterns compiled)
    for ie in gen_extractor_classes():
        ie.suitable("https://warm-up.invalid/")
    yt_dlp.YoutubeDL({"quiet": True}).close()
    print("READY", flush=True)
    for line in sys.stdin.buffer:
        try:
            result = run_job(msgspec.json.decode(line, type=Job))
        except Exception as exc:  # reported to the benchmark, which fails the run
            result = Timings(error=f"{type(exc).__name__}: {exc}")
        sys.stdout.buffer.write(msgspec.json.encode(result) + b"\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
