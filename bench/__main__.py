"""``python -m bench all [--runs N] [--quick | --small] [--out DIR]`` — the whole benchmark in one run.

``python -m bench report [--out DIR]`` re-renders the tables and chart from ``DIR/results.json``.
Writes ``results.json``, ``chart.png`` and ``report.md`` into ``--out`` (default bench/results/).
Needs the local RabbitMQ (a fresh vhost is made and deleted), ffmpeg, curl; everything else runs on
loopback as processes of this run. See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import msgspec

from bench import report
from bench.pipeline import Options, Results, run_all

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def options_for(args: argparse.Namespace) -> Options:
    """Options of the chosen mode: full (default), --quick (1 run, fewer jobs) or --small (CI: tiny sources)."""
    if args.small:
        return Options(runs=args.runs or 1, small_jobs=3, concurrent_jobs=4, uploader_sizes=("10M",),
                       long_audio=True, small=True, work_dir=args.work_dir + "-small")
    if args.quick:
        return Options(runs=args.runs or 1, small_jobs=10, concurrent_jobs=20, uploader_sizes=("10M", "100M"),
                       long_audio=False, work_dir=args.work_dir)
    return Options(runs=args.runs or 5, work_dir=args.work_dir)


def write_report(results: Results, out: Path) -> None:
    """results.json, chart.png and report.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_bytes(msgspec.json.format(msgspec.json.encode(results)) + b"\n")
    report.chart(results, out / "chart.png")
    (out / "report.md").write_text(report.markdown(results, chart="chart.png"))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; exit status 0 even when goals are missed (they are reported)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("all", "report"))
    parser.add_argument("--runs", type=int, default=0, help="runs of each path (default 5; --quick/--small 1)")
    parser.add_argument("--quick", action="store_true", help="1 run, 10 small jobs, 20 concurrent, no 60-min audio")
    parser.add_argument("--small", action="store_true", help="CI: tiny sources, 1 run, a few jobs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where results go (default bench/results)")
    parser.add_argument("--work-dir", default="/tmp/ggt-bench", help="generated sources, logs, temp files")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every service process and the vhost are cleaned up
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.command == "report":
        results = msgspec.json.decode((args.out / "results.json").read_bytes(), type=Results)
    else:
        results = asyncio.run(run_all(options_for(args)))
    write_report(results, args.out)
    print(report.goals_table(results))
    print(f"\nwritten to {args.out}/ (results.json, chart.png, report.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
