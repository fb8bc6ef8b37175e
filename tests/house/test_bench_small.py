"""The benchmark's small version runs end to end and produces sane numbers (no timing goals here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec

from bench.pipeline import PATHS, Results
from bench.report import FFMPEG_ROW, OTHER_NAMES, REST_ROW, UPLOADER_ROW, cpu_account, goals, markdown

ROOT = Path(__file__).resolve().parents[2]
#: seconds the small benchmark may take on a loaded 2-core machine
SMALL_BENCH_TIMEOUT = 600


def test_small_benchmark_measures_every_path_and_writes_report(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--small", "--out", str(tmp_path / "out"),
         "--work-dir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=SMALL_BENCH_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = msgspec.json.decode((tmp_path / "out" / "results.json").read_bytes(), type=Results)

    for scenario in results.scenarios:
        assert {r.path for r in results.runs if r.scenario == scenario.name} == set(PATHS)
    for run in results.runs:
        assert 0 < run.wall < SMALL_BENCH_TIMEOUT
        assert run.output_bytes > 0
        assert run.costs and all(c.peak_rss > 0 for c in run.costs.values()), run
    ggt = [r for r in results.runs if r.path == "getgoodtape"]
    assert {"coordinator", "converter", "uploader", "verifier"} <= set(ggt[0].costs)
    assert all(sum(c.written for c in r.costs.values()) == 0 for r in ggt), "no temp file on the data path"
    cli = [r for r in results.runs if r.path == "cli"]
    assert all(r.steps["process"] >= r.steps["total"] > 0 for r in cli), "the whole process, start-up included"
    originals = [r for r in results.runs if r.path == "original"]
    assert all(r.costs["original"].written >= r.output_bytes for r in originals), "the original writes temp files"
    assert all(r.costs["relay"].peak_rss > 0 for r in results.runs if r.path == "relay")

    assert results.small_jobs and len(results.small_jobs.latencies) == 3
    assert all(latency > 0 for latency in results.small_jobs.latencies)
    c = results.concurrency
    assert c and c.failed == 0 and c.wall > 0
    # the whole machine is accounted for: the broker, media server and bench beside the actors and S3,
    # the machine's counters cover the run's window, and no process is counted twice (the rest ≥ 0)
    assert {"broker", "media", "bench"} <= set(c.others) and all(k.cpu > 0 for k in c.others.values()), c.others
    assert abs(c.machine_busy + c.machine_idle - c.cores * c.wall) <= 0.1 * c.cores * c.wall + 0.1
    account = dict(cpu_account(c))
    assert account[FFMPEG_ROW] > 0 and account[UPLOADER_ROW] > 0, account
    assert account[REST_ROW] >= -0.02 * c.cores * c.wall / c.jobs, account
    assert set(OTHER_NAMES.values()) <= set(account)
    assert results.uploader and results.uploader[0].written == 0
    assert results.machine["nproc"] and results.load_start and results.load_end

    assert (tmp_path / "out" / "chart.png").stat().st_size > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Goals" in report and "getgoodtape" in report and "Where the concurrency run's CPU went" in report
    assert len(goals(results)) >= 6
    assert markdown(results).count("| video→mp3") >= 4
