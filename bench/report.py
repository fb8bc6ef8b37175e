"""Tables, goals and the chart from a Results document (pure functions, then one matplotlib figure)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from bench.pipeline import PATHS, Concurrency, PathRun, Results, median
from bench.procs import Cost

MiB = 1024 * 1024
#: goals of the issue
GOAL_FLOOR_RATIO = 1.15
GOAL_ORIGINAL_RATIO = 0.75
GOAL_SMALL_OVERHEAD_S = 0.150
GOAL_EFFICIENCY = 0.80
#: issue #16: the one-shot `getgoodtape convert` process ÷ bare ffmpeg, and the long-lived service's
GOAL_CLI_RATIO = 1.25
GOAL_SERVICE_RATIO = 1.05
#: most peak-RSS difference across uploader output sizes that still counts as flat (bench.uploader's)
FLAT_TOLERANCE = 8 * MiB
#: what shares the cores of the concurrency run without being GetGoodTape, by its name in the results
OTHER_NAMES = {"s3": "S3 server (embedded)", "broker": "RabbitMQ", "media": "media server",
               "bench": "the bench process (publishing, events)"}
#: rows of the concurrency run's CPU account that are not a process of OTHER_NAMES
FFMPEG_ROW, UPLOADER_ROW = "ffmpeg (the uploaders' children)", "uploaders' own Python (guard relay, PUTs, bus)"
REST_ROW, IDLE_ROW = "the rest of the machine (kernel, other services)", "idle"


def by_path(results: Results) -> dict[str, dict[str, list[PathRun]]]:
    """scenario → path → its runs."""
    grouped: dict[str, dict[str, list[PathRun]]] = defaultdict(lambda: defaultdict(list))
    for run in results.runs:
        grouped[run.scenario][run.path].append(run)
    return grouped


def median_wall(runs: list[PathRun]) -> float:
    """Median wall seconds of some runs."""
    return median([r.wall for r in runs])


def _max_cost(runs: list[PathRun]) -> dict[str, Cost]:
    """Per process: the highest peak RSS, the median CPU and disk writes over the runs."""
    names = {name for r in runs for name in r.costs}
    out = {}
    for name in sorted(names):
        costs = [r.costs[name] for r in runs if name in r.costs]
        children: dict[str, int] = {}
        for c in costs:
            for child, peak in c.children_peak_rss.items():
                children[child] = max(children.get(child, 0), peak)
        out[name] = Cost(name=name, peak_rss=max(c.peak_rss for c in costs),
                         written=int(median([c.written for c in costs])), cpu=median([c.cpu for c in costs]),
                         children_peak_rss=children)
    return out


def _mib(n: int) -> str:
    return f"{n / MiB:.0f}"


def _rss_text(costs: dict[str, Cost]) -> str:
    parts = []
    for name, cost in costs.items():
        text = f"{name} {_mib(cost.peak_rss)}"
        kids = ", ".join(f"{k} {_mib(v)}" for k, v in sorted(cost.children_peak_rss.items()) if v)
        parts.append(text + (f" ({kids})" if kids else ""))
    return "; ".join(parts)


def side_by_side_table(results: Results) -> str:
    """One markdown table: per scenario and path, median wall, ratios, memory, disk, CPU."""
    lines = [
        "| scenario | path | median wall s | ÷ floor | ÷ original | peak RSS MiB per process (children) "
        "| disk written MB (data path) | disk written MB (S3 server) | CPU s |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for scenario, paths in by_path(results).items():
        floor = median_wall(paths.get("floor", []))
        original = median_wall(paths.get("original", []))
        for path in PATHS:
            runs = paths.get(path, [])
            if not runs:
                continue
            wall = median_wall(runs)
            costs = _max_cost(runs)
            written = sum(c.written for c in costs.values())
            store = int(median([r.store.written for r in runs if r.store is not None])) if any(
                r.store for r in runs) else 0
            cpu = sum(c.cpu for c in costs.values())
            lines.append(
                f"| {scenario} | {path} | {wall:.2f} | {wall / floor:.2f} | {wall / original:.2f} | "
                f"{_rss_text(costs)} | {written / 1e6:.1f} | {store / 1e6:.1f} | {cpu:.2f} |"
            )
    return "\n".join(lines)


def steps_table(results: Results) -> str:
    """Median seconds of each step per scenario and path (where the time goes)."""
    lines = ["| scenario | path | steps (median s) | runs |", "|---|---|---|---:|"]
    for scenario, paths in by_path(results).items():
        for path in PATHS:
            runs = paths.get(path, [])
            if not runs:
                continue
            keys = list(dict.fromkeys(k for r in runs for k in r.steps))
            steps = ", ".join(f"{k} {median([r.steps[k] for r in runs if k in r.steps]):.2f}" for k in keys)
            lines.append(f"| {scenario} | {path} | {steps} | {len(runs)} |")
    return "\n".join(lines)


def small_job_figures(results: Results) -> dict[str, float]:
    """p50/p95 latency, bare ffmpeg median and the overhead (latency − bare) of the small jobs."""
    s = results.small_jobs
    if s is None or not s.latencies:
        return {}
    ordered = sorted(s.latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    bare = median(s.bare_ffmpeg)
    stages = {k: median([t.get(k, 0.0) for t in s.stage_timings])
              for k in (s.stage_timings[0] if s.stage_timings else {})}
    return {"p50": median(s.latencies), "p95": p95, "bare": bare, "overhead_p50": median(s.latencies) - bare,
            "overhead_p95": p95 - bare, **{f"stage_{k}": v for k, v in stages.items()}}


def efficiency(results: Results) -> float:
    """(jobs × bare ffmpeg CPU s ÷ cores) ÷ wall of the concurrency run."""
    c = results.concurrency
    if c is None or c.wall <= 0:
        return 0.0
    return c.jobs * median(c.bare_cpu) / c.cores / c.wall


def cpu_account(c: Concurrency) -> list[tuple[str, float]]:
    """Where the concurrency run's CPU went, seconds per job: every process, the rest of the machine, idle.

    The rows add up to the machine's CPU over the run (cores × wall, as /proc/stat counts it).
    """
    def per_job(seconds: float) -> float:
        return seconds / c.jobs

    def total(prefix: str, *, children: bool | None = None) -> float:
        picked = [k for n, k in c.costs.items() if n.split("-")[0] == prefix]
        if children is None:
            return sum(k.cpu for k in picked)
        return sum(k.children_cpu if children else k.cpu - k.children_cpu for k in picked)

    rows = [(FFMPEG_ROW, total("uploader", children=True)), (UPLOADER_ROW, total("uploader", children=False)),
            ("coordinator", total("coordinator")),
            ("converters (with their probe workers)", total("converter")),
            ("verifier (with its probe workers)", total("verifier"))]
    rows += [(OTHER_NAMES.get(name, name), cost.cpu) for name, cost in
             ([("s3", c.store)] if c.store else []) + list(c.others.items())]
    if c.machine_busy:
        rows.append((REST_ROW, c.machine_busy - sum(v for _, v in rows)))
        rows.append((IDLE_ROW, c.machine_idle))
    return [(what, per_job(seconds)) for what, seconds in rows]


def ceiling(c: Concurrency) -> float:
    """The efficiency this machine allows the run if GetGoodTape's own processes cost nothing but ffmpeg:
    bare ffmpeg CPU ÷ (the pipeline's ffmpeg + what shares the cores: S3 server, broker, media server, bench)."""
    account = dict(cpu_account(c))
    shared = sum(v for k, v in account.items() if k in OTHER_NAMES.values())
    floor = account[FFMPEG_ROW] + shared
    return median(c.bare_cpu) / floor if floor > 0 else 0.0


def goals(results: Results) -> list[tuple[str, str, str, bool]]:
    """(goal, measured, target, met) rows."""
    rows: list[tuple[str, str, str, bool]] = []
    grouped = by_path(results)
    for scenario, paths in grouped.items():
        if not scenario.startswith("video→"):
            continue
        ggt = median_wall(paths.get("getgoodtape", []))
        floor = median_wall(paths.get("floor", []))
        original = median_wall(paths.get("original", []))
        if scenario.startswith("video→mp3") and floor:
            ratio = ggt / floor
            target = GOAL_SERVICE_RATIO if "20MB/s" in scenario else GOAL_FLOOR_RATIO
            rows.append((f"{scenario}: end-to-end ÷ floor", f"{ratio:.2f} ({ggt:.2f} s ÷ {floor:.2f} s)",
                         f"≤ {target}", ratio <= target))
            cli = median_wall(paths.get("cli", []))
            if cli and "20MB/s" in scenario:
                ratio = cli / floor
                rows.append((f"{scenario}: one-shot `getgoodtape convert` process ÷ floor",
                             f"{ratio:.2f} ({cli:.2f} s ÷ {floor:.2f} s)", f"≤ {GOAL_CLI_RATIO}",
                             ratio <= GOAL_CLI_RATIO))
        if "20MB/s" in scenario and original:
            ratio = ggt / original
            rows.append((f"{scenario}: end-to-end ÷ original processor",
                         f"{ratio:.2f} ({ggt:.2f} s ÷ {original:.2f} s)",
                         f"≤ {GOAL_ORIGINAL_RATIO}", ratio <= GOAL_ORIGINAL_RATIO))
    data_path = [r for r in results.runs if r.path == "getgoodtape"]
    if data_path:
        written = max(sum(c.written for c in r.costs.values()) for r in data_path)
        rows.append(("GetGoodTape data path: bytes written to disk (actors + ffmpeg, every run)", f"{written:,}",
                     "0", written == 0))
    if results.uploader:
        full = [r.peak_rss for r in results.uploader if r.parts > 3] or [r.peak_rss for r in results.uploader]
        spread = max(full) - min(full)
        sizes = ", ".join(f"{r.size / 1e6:,.0f} MB → {r.peak_rss / MiB:.0f} MiB" for r in results.uploader)
        rows.append(("uploader peak RSS flat across output sizes (bench.uploader, null sink)",
                     f"{sizes}; spread {spread / MiB:.1f} MiB", f"≤ {FLAT_TOLERANCE // MiB} MiB spread",
                     spread <= FLAT_TOLERANCE))
        written = max(r.written for r in results.uploader)
        rows.append(("uploader data path: bytes written to disk", f"{written:,}", "0", written == 0))
    small = small_job_figures(results)
    if small:
        rows.append(("small jobs: p50 latency − bare ffmpeg", f"{small['overhead_p50'] * 1000:.0f} ms "
                     f"(p50 {small['p50'] * 1000:.0f} ms, p95 {small['p95'] * 1000:.0f} ms, "
                     f"bare ffmpeg {small['bare'] * 1000:.0f} ms)",
                     f"≤ {GOAL_SMALL_OVERHEAD_S * 1000:.0f} ms", small["overhead_p50"] <= GOAL_SMALL_OVERHEAD_S))
    if results.concurrency:
        c = results.concurrency
        eff = efficiency(results)
        rows.append((f"concurrency: {c.jobs} jobs, {c.converters} converters, {c.uploaders} uploaders",
                     f"{eff:.0%} ({c.jobs} × {median(c.bare_cpu):.2f} CPU s ÷ {c.cores} cores ÷ {c.wall:.1f} s"
                     f"{f'; {c.failed} failed' if c.failed else ''})", f"≥ {GOAL_EFFICIENCY:.0%}",
                     eff >= GOAL_EFFICIENCY and not c.failed))
    return rows


def goals_table(results: Results) -> str:
    """The goals as a markdown table."""
    lines = ["| goal | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {g} | {m} | {t} | {'yes' if ok else '**no**'} |" for g, m, t, ok in goals(results)]
    return "\n".join(lines)


def other_tables(results: Results) -> str:
    """Small jobs, concurrency costs, uploader rows, sources, machine."""
    out = []
    small = small_job_figures(results)
    if small:
        stages = ", ".join(f"{k[6:]} {v * 1000:.0f} ms" for k, v in small.items() if k.startswith("stage_"))
        out.append(f"Small jobs ({results.small_jobs.jobs} × 1-second clip → mp3, one after another): "
                   f"p50 {small['p50'] * 1000:.0f} ms, p95 {small['p95'] * 1000:.0f} ms; bare ffmpeg "
                   f"{small['bare'] * 1000:.0f} ms; overhead p50 {small['overhead_p50'] * 1000:.0f} ms, "
                   f"p95 {small['overhead_p95'] * 1000:.0f} ms. Median stage timings from JobCompleted: {stages}.")
    if results.concurrency:
        c = results.concurrency
        costs = "; ".join(f"{n} CPU {k.cpu:.1f} s, peak {_mib(k.peak_rss)} MiB" for n, k in c.costs.items())
        store = f"; S3 server CPU {c.store.cpu:.1f} s" if c.store else ""
        out.append(f"Concurrency ({c.jobs} jobs at once): wall {c.wall:.1f} s; bare ffmpeg CPU per job "
                   f"{median(c.bare_cpu):.3f} s; efficiency {efficiency(results):.0%}. Processes: {costs}{store}.")
        if c.others:
            rows = ["| CPU per job | ms |", "|---|---:|"]
            rows += [f"| {what} | {seconds * 1000:.1f} |" for what, seconds in cpu_account(c)]
            out.append(f"Where the concurrency run's CPU went ({c.cores} cores × {c.wall:.1f} s), per job, beside "
                       f"bare ffmpeg's {median(c.bare_cpu) * 1000:.0f} ms. The most this machine allows if "
                       f"GetGoodTape's processes cost nothing but their ffmpeg: {ceiling(c):.0%}.\n\n"
                       + "\n".join(rows))
    if results.uploader:
        rows = ["| output bytes | parts | seconds | MB/s | peak RSS MiB | disk written |",
                "|---:|---:|---:|---:|---:|---:|"]
        rows += [f"| {r.size:,} | {r.parts} | {r.seconds:.2f} | {r.size / 1e6 / r.seconds:.0f} | "
                 f"{r.peak_rss / MiB:.1f} | {r.written:,} |" for r in results.uploader]
        out.append(f"Uploader data path (bench.uploader's child, part size {results.uploader_part_size // MiB} MiB, "
                   "null sink):\n\n" + "\n".join(rows))
    out.append("Sources: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in results.sources.items()) + ".")
    m = results.machine
    out.append(f"Machine: {m.get('nproc')} cores, {m.get('cpu')}, {m.get('ram_gib')} GiB RAM, Linux "
               f"{m.get('kernel')}; Python {m.get('python')}; {m.get('ffmpeg')}; RabbitMQ {m.get('rabbitmq')}; "
               f"yt-dlp {m.get('yt_dlp')}; {m.get('curl')}. Load average at start {results.load_start}, "
               f"at end {results.load_end}; the run took {results.seconds:.0f} s ({results.started}).")
    return "\n\n".join(out)


def markdown(results: Results, *, chart: str | None = None) -> str:
    """The whole report."""
    parts = ["## Goals", goals_table(results), "## Side by side", side_by_side_table(results),
             "## Where the time goes", steps_table(results), "## Small jobs, concurrency, uploader, machine",
             other_tables(results)]
    if chart:
        parts.insert(4, f"![median wall time per path]({chart})")
    return "\n\n".join(parts) + "\n"


def chart(results: Results, target: Path) -> None:
    """Grouped bars: median wall time of each path per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = by_path(results)
    names = list(grouped)
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(PATHS)
    colors = {"floor": "#999999", "original": "#d62728", "relay": "#ff7f0e", "getgoodtape": "#2ca02c",
              "cli": "#1f77b4"}
    for i, path in enumerate(PATHS):
        values = [median_wall(grouped[n].get(path, [])) for n in names]
        bars = ax.bar([x + (i - (len(PATHS) - 1) / 2) * width for x in range(len(names))], values, width, label=path,
                      color=colors[path])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("median wall time, s (lower is better)")
    ax.set_title(f"GetGoodTape vs the original design's paths and the floor ({results.options.runs} runs, median)")
    ax.legend()
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
