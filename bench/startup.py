"""``python -m bench.startup SOURCE [--base DIR] [--rounds N]``: the CLI's own start-up, side by side.

Times ``python -m actors.cli --help`` and ``python -m actors.cli convert SOURCE -f mp3 -o FILE
--json`` (the whole process; the job's stage timings from its JSON) for this tree and, with
``--base``, another checkout (e.g. ``git archive main | tar -x -C DIR``), in interleaved rounds so
load drift hits both alike; prints medians. Nothing configured: in-memory bus, embedded S3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_round(tree: Path, source: str, out: Path) -> dict[str, float]:
    """--help and one convert in ``tree``: seconds of each, and the job's total and preparing stages."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GGT_")}, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "actors.cli", "--help"], cwd=tree, env=env, capture_output=True, check=True)
    helped = time.perf_counter() - started
    started = time.perf_counter()
    argv = [sys.executable, "-m", "actors.cli", "convert", source, "-f", "mp3", "-o", str(out), "--json"]
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, check=True)
    converted = time.perf_counter() - started
    timings = json.loads(done.stdout)["timings"]
    return {"help": helped, "convert": converted, "stages total": timings["total"], "preparing": timings["preparing"]}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a local media file or a URL the CLI may fetch")
    parser.add_argument("--base", type=Path, help="another checkout to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    trees = {"this tree": ROOT, **({"base": args.base.resolve()} if args.base else {})}
    seen: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for number in range(args.rounds):
            for name in (list(trees) if number % 2 == 0 else list(trees)[::-1]):
                for what, seconds in one_round(trees[name], args.source, Path(tmp) / "out.mp3").items():
                    seen.setdefault((name, what), []).append(seconds)
    for (name, what), values in seen.items():
        print(f"{name:10s} {what:13s} median {statistics.median(values):.2f} s  "
              f"({', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
