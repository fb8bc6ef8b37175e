"""GetGoodTape against the original design's paths and the physical floor, in one run.

Four paths convert the same source with the same ffmpeg output arguments (GetGoodTape's plan):

- ``floor``: bare ffmpeg reading the source URL and writing to /dev/null (for mp4, plus one PUT of
  the same bytes to storage with curl);
- ``original``: the original processor: yt-dlp downloads to a temp dir, ffmpeg converts to a temp
  file, curl PUTs it to a presigned URL (``upload_to_r2_direct``);
- ``relay``: the same, but curl PUTs to a relay process that receives the file whole and uploads
  it again (the old coordinator hop);
- ``getgoodtape``: publish ConvertRequested, wait for JobCompleted (four actor processes over
  RabbitMQ and the embedded S3, which runs as its own process);
- ``cli``: the main job as a user runs it first: ``getgoodtape convert URL -f FMT -o FILE`` as a
  whole process (start-up, the in-memory bus, the embedded S3, saving the file and tearing down
  included).

Plus: small jobs one after another (bus and storage cost per job) and many jobs at once
(concurrency efficiency), and the uploader's memory across output sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from actors.core.ffmpeg_args import ffmpeg_argv, output_args
from actors.runtime.settings import Settings
from bench.procs import Cost, Watched, cpu_split, machine_cpu, run_measured, watching
from bench.services import Service, broker_pid, free_port, load_average, python, queue_consumers, rabbit_vhost, versions
from bench.sources import ensure_sources
from messages.types import ConvertRequested, Format, JobCompleted, MediaPlan
from storage.s3 import Storage, StorageConfig

#: the original path's pace, bytes per second (the issue's 20 MB/s source)
RATE_20MBPS = 20_000_000
#: presigned URLs of the benchmark live this long, seconds
EXPIRES = 3600
#: the paths, in the order they run within one round
PATHS = ("floor", "original", "relay", "getgoodtape", "cli")
#: actor processes of the main runs
ACTORS = ("coordinator", "converter", "uploader", "verifier")
#: seconds one job of the benchmark may take before the run fails
JOB_TIMEOUT = 1500.0
#: seconds to wait for the extra actor processes of the concurrency run to consume
CONSUMERS_TIMEOUT = 120.0
#: bare ffmpeg runs of the small-job and concurrency baselines
BARE_RUNS = 5
EMBEDDED_ACCESS_KEY = "ggt-embedded"
EMBEDDED_SECRET = "ggt-embedded-secret"


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    """One side-by-side comparison: which source, which format, at which source rate (None = unthrottled)."""

    name: str
    source: str
    format: str
    rate: int | None = None


class Options(msgspec.Struct, frozen=True, kw_only=True):
    """What to run and how often."""

    runs: int = 5
    small_jobs: int = 50
    concurrent_jobs: int = 100
    uploader_sizes: tuple[str, ...] = ("10M", "100M", "1G")
    long_audio: bool = True
    #: runs of the 60-minute audio scenario (each path takes ~1–2 min on 2 cores, so fewer than ``runs``)
    long_audio_runs: int = 1
    small: bool = False
    work_dir: str = "/tmp/ggt-bench"


class PathRun(msgspec.Struct, kw_only=True):
    """One run of one path on one scenario."""

    scenario: str
    path: str
    run: int
    wall: float
    #: seconds of each step (download/convert/upload, ffmpeg/put, or GetGoodTape's stage timings)
    steps: dict[str, float] = {}
    #: the data path's processes (the S3 server is kept apart in ``store``)
    costs: dict[str, Cost] = {}
    store: Cost | None = None
    output_bytes: int = 0


class SmallJobs(msgspec.Struct, kw_only=True):
    """Sequential 1-second jobs: latencies and the bare ffmpeg time they are compared with."""

    jobs: int
    latencies: list[float]
    bare_ffmpeg: list[float]
    stage_timings: list[dict[str, float]] = []


class Concurrency(msgspec.Struct, kw_only=True):
    """Many jobs at once: total wall against bare ffmpeg CPU over the cores."""

    jobs: int
    converters: int
    uploaders: int
    cores: int
    wall: float
    bare_cpu: list[float]
    failed: int = 0
    costs: dict[str, Cost] = {}
    store: Cost | None = None
    #: what shares the cores without being GetGoodTape: the broker, the media server, this bench process
    others: dict[str, Cost] = {}
    #: the whole machine's busy and idle CPU seconds during the run (every core, /proc/stat)
    machine_busy: float = 0.0
    machine_idle: float = 0.0


class UploaderRow(msgspec.Struct, kw_only=True):
    """bench.uploader's data path (null sink) at one output size."""

    size: int
    seconds: float
    peak_rss: int
    written: int
    parts: int


class Results(msgspec.Struct, kw_only=True):
    """Everything one ``python -m bench all`` measured."""

    started: str
    options: Options
    machine: dict[str, str]
    load_start: list[float]
    load_end: list[float] = []
    sources: dict[str, int] = {}
    scenarios: list[Scenario] = []
    runs: list[PathRun] = []
    small_jobs: SmallJobs | None = None
    concurrency: Concurrency | None = None
    uploader: list[UploaderRow] = []
    uploader_part_size: int = 0
    seconds: float = 0.0


def scenarios(options: Options) -> list[Scenario]:
    """The side-by-side matrix: the video to mp3 and to mp4 at 20 MB/s and unthrottled (+ the long audio)."""
    found = [
        Scenario(name=f"video→{fmt} @{label}", source="video", format=fmt, rate=rate)
        for fmt in ("mp3", "mp4") for rate, label in ((RATE_20MBPS, "20MB/s"), (None, "unthrottled"))
    ]
    if options.long_audio:
        found.append(Scenario(name="audio 60 min→mp3 @unthrottled", source="audio", format="mp3"))
    return found


# ------------------------------------------------------------------------------------ the bench


class Bench:
    """The services of one run and the paths measured on them."""

    def __init__(self, options: Options, work: Path) -> None:
        self.options, self.work = options, work
        self.sources: dict[str, Path] = {}
        self.media: Service | None = None
        self.s3: Service | None = None
        self.relay: Service | None = None
        self.original: Service | None = None
        self.media_url = ""
        self.relay_url = ""
        self.storage: Storage | None = None
        self.settings: Settings | None = None
        self.cluster = None
        self.planner = None
        self.plans: dict[tuple[str, str], MediaPlan] = {}
        self.references: dict[tuple[str, str], Path] = {}
        self._counter = 0

    # --- set-up

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Bench]:
        """Start every service (stopped on exit, in reverse order)."""
        from actors.converter import Converter
        from tests.support.cluster import actor_cluster

        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.sources = await asyncio.to_thread(ensure_sources, self.work, small=self.options.small)
        with contextlib.ExitStack() as stack, rabbit_vhost() as amqp_url:
            self.media = self._service(stack, "media", python("-m", "bench.server", str(self.work / "media")), logs)
            self.media_url = f"http://127.0.0.1:{self.media.wait_for('PORT').split()[1]}"
            port = free_port()
            bucket = f"ggt-bench-{int(time.time())}"
            self.s3 = self._service(stack, "s3", python("-m", "actors.cli", "s3", "--port", str(port)), logs,
                                    env={"GGT_S3_BUCKET": bucket})
            self.s3.wait_for("embedded S3")
            self.relay = self._service(stack, "relay", python("-m", "bench.relay"), logs)
            self.relay_url = f"http://127.0.0.1:{self.relay.wait_for('PORT').split()[1]}/relay"
            self.original = self._service(stack, "original", python("-m", "bench.original"), logs, stdin=True)
            self.original.wait_for("READY")
            config = StorageConfig(endpoint=f"http://127.0.0.1:{port}", region="us-east-1", bucket=bucket,
                                   access_key_id=EMBEDDED_ACCESS_KEY, secret_access_key=EMBEDDED_SECRET)
            self.settings = Settings(
                amqp_url=amqp_url, s3_endpoint=config.endpoint, s3_bucket=bucket,
                s3_access_key_id=EMBEDDED_ACCESS_KEY, s3_secret_access_key=EMBEDDED_SECRET,
                allow_networks=("127.0.0.1/32",), log_level="WARNING", job_time_limit=JOB_TIMEOUT,
                bus_key=secrets.token_hex(32),  # the service's processes share one, made up per run
            )
            async with Storage(config) as storage, actor_cluster(self.settings, logs) as cluster:
                self.storage, self.cluster = storage, cluster
                for actor in ACTORS:
                    cluster.start(actor)
                self.planner = Converter(settings=self.settings, bus=cluster.bus)
                await self.planner.setup()
                try:
                    await self._warm_up()
                    yield self
                finally:
                    await self.planner.teardown()

    def _service(self, stack: contextlib.ExitStack, name: str, argv: list[str], logs: Path, **kw) -> Service:
        service = Service(name, argv, log=logs / f"{name}.log", **kw)
        stack.callback(service.stop)
        return service

    async def _warm_up(self) -> None:
        """One job through every actor, so that no measured run pays a process's start-up."""
        await self.ggt_job(self.source_url("clip", None), "mp3")

    # --- helpers

    def source_url(self, role: str, rate: int | None) -> str:
        """The source's URL on the media server, rate-limited when ``rate`` is set."""
        name = self.sources[role].name
        return f"{self.media_url}/slow/{name}?rate={rate}" if rate else f"{self.media_url}/{name}"

    def job_id(self, prefix: str) -> str:
        """A fresh job id."""
        self._counter += 1
        return f"bench-{prefix}-{int(time.time())}-{self._counter:05d}"

    async def plan(self, role: str, fmt: str) -> MediaPlan:
        """GetGoodTape's plan for the source (converter logic itself: yt-dlp, ffprobe, plan_media)."""
        key = (role, fmt)
        if key not in self.plans:
            request = ConvertRequested(url=self.source_url(role, None), format=Format(fmt), job_id=self.job_id("plan"))
            self.plans[key] = await self.planner.plan_for(request)
        return self.plans[key]

    def bare_argv(self, plan: MediaPlan, url: str) -> list[str]:
        """The plan's exact ffmpeg argv reading ``url`` (the plan's source URL swapped for it)."""
        return ffmpeg_argv(msgspec.structs.replace(
            plan, inputs=[msgspec.structs.replace(plan.inputs[0], url=url), *plan.inputs[1:]]),
            network_timeout=self.planner.settings.network_timeout)

    async def reference_output(self, role: str, fmt: str) -> Path:
        """The converted file once, on disk, for the floor's PUT (made outside any measurement)."""
        key = (role, fmt)
        if key not in self.references:
            plan = await self.plan(role, fmt)
            target = self.work / "outputs" / f"{role}.{plan.extension}"
            target.parent.mkdir(exist_ok=True)
            argv = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
                    "-i", str(self.sources[role]), *output_args(plan), str(target)]
            done = await run_measured(argv, name="ffmpeg")
            if done.returncode != 0:
                raise RuntimeError(f"reference ffmpeg failed: {done.stderr.decode()[-500:]}")
            self.references[key] = target
        return self.references[key]

    def watched(self, *names: str) -> list[Watched]:
        """Watchers of the named services and actor processes."""
        services = {"s3": self.s3, "relay": self.relay, "original": self.original}
        out: list[Watched] = []
        for name in names:
            if name in services:
                out.append(Watched(name, services[name].pid))
            else:
                for i, child in enumerate(self.cluster.processes[name]):
                    out.append(Watched(name if i == 0 else f"{name}-{i}", child.pid))
        return out

    # --- the four paths

    async def floor(self, scenario: Scenario, run: int) -> PathRun:
        """Bare ffmpeg to /dev/null (+ one curl PUT of the same bytes for mp4)."""
        plan = await self.plan(scenario.source, scenario.format)
        ff = await run_measured(self.bare_argv(plan, self.source_url(scenario.source, scenario.rate)), name="ffmpeg")
        if ff.returncode != 0:
            raise RuntimeError(f"bare ffmpeg failed: {ff.stderr.decode()[-500:]}")
        steps = {"ffmpeg": ff.wall}
        costs = {"ffmpeg": ff.cost}
        wall = ff.wall
        store = None
        reference = await self.reference_output(scenario.source, scenario.format)
        if scenario.format == "mp4":
            key = f"bench/floor/{self.job_id('floor')}.{plan.extension}"
            url = await self.storage.presign_put(key, content_type=plan.content_type, expires=EXPIRES)
            [s3] = self.watched("s3")
            async with watching([s3]) as store_cost:
                put = await run_measured(["curl", "-sS", "-f", "-X", "PUT", "-H", f"Content-Type: {plan.content_type}",
                                          "-T", str(reference), url], name="curl")
            if put.returncode != 0:
                raise RuntimeError(f"curl PUT failed: {put.stderr.decode()[-500:]}")
            await self.storage.delete(key)
            steps["put"] = put.wall
            costs["curl"] = put.cost
            wall += put.wall
            store = store_cost["s3"]
        return PathRun(scenario=scenario.name, path="floor", run=run, wall=wall, steps=steps, costs=costs,
                       store=store, output_bytes=reference.stat().st_size)

    async def original_path(self, scenario: Scenario, run: int, *, relay: bool) -> PathRun:
        """The original processor (download → temp file → curl PUT), directly or through the relay."""
        from bench.original import Job, Timings

        plan = await self.plan(scenario.source, scenario.format)
        key = f"bench/original/{self.job_id('orig')}.{plan.extension}"
        put_url = await self.storage.presign_put(key, content_type=plan.content_type, expires=EXPIRES)
        job = Job(url=self.source_url(scenario.source, scenario.rate), output_args=output_args(plan),
                  extension=plan.extension, put_url=put_url, content_type=plan.content_type,
                  relay_url=self.relay_url if relay else "", work_dir=str(self.work / "tmp"))
        (self.work / "tmp").mkdir(exist_ok=True)
        names = ("original", "relay", "s3") if relay else ("original", "s3")
        async with watching(self.watched(*names)) as costs:
            started = time.monotonic()
            self.original.proc.stdin.write(msgspec.json.encode(job) + b"\n")
            self.original.proc.stdin.flush()
            line = await asyncio.to_thread(self.original.read_line, timeout=JOB_TIMEOUT)
            wall = time.monotonic() - started
        timings = msgspec.json.decode(line, type=Timings)
        if timings.error:
            raise RuntimeError(f"original path failed: {timings.error}")
        info = await self.storage.head(key)
        assert info is not None and info.size == timings.size, (info, timings.size)
        await self.storage.delete(key)
        store = costs.pop("s3")
        return PathRun(scenario=scenario.name, path="relay" if relay else "original", run=run, wall=wall,
                       steps={"download": timings.download, "convert": timings.convert, "upload": timings.upload},
                       costs=dict(costs), store=store, output_bytes=timings.size)

    async def ggt_job(self, url: str, fmt: str) -> tuple[float, JobCompleted]:
        """Publish one ConvertRequested, wait for its JobCompleted; (seconds, the event). Deletes the object."""
        request = ConvertRequested(url=url, format=Format(fmt), job_id=self.job_id("ggt"))
        started = time.monotonic()
        await self.cluster.run([request], timeout=JOB_TIMEOUT)
        wall = time.monotonic() - started
        final = self.cluster.finals[request.job_id]
        if not isinstance(final, JobCompleted):
            raise RuntimeError(f"GetGoodTape job failed: {final.error.code}: {final.error.message}")
        await self.storage.delete(final.key)
        return wall, final

    async def getgoodtape(self, scenario: Scenario, run: int) -> PathRun:
        """ConvertRequested → JobCompleted through the four actor processes."""
        async with watching(self.watched(*ACTORS, "s3")) as costs:
            wall, final = await self.ggt_job(self.source_url(scenario.source, scenario.rate), scenario.format)
        store = costs.pop("s3")
        return PathRun(scenario=scenario.name, path="getgoodtape", run=run, wall=wall, steps=dict(final.timings),
                       costs=dict(costs), store=store, output_bytes=final.size)

    async def cli(self, scenario: Scenario, run: int) -> PathRun:
        """``getgoodtape convert URL -f FMT -o FILE --json`` as its own process, nothing configured but
        the loopback media server allowed: the one-shot run, start-up and teardown included."""
        plan = await self.plan(scenario.source, scenario.format)
        output = self.work / "tmp" / f"cli-{self.job_id('cli')}.{plan.extension}"
        output.parent.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GGT_")}
        env.update(GGT_ALLOW_NETWORKS="127.0.0.1/32", GGT_JOB_TIME_LIMIT=str(JOB_TIMEOUT))
        done = await run_measured(python("-m", "actors.cli", "convert", self.source_url(scenario.source, scenario.rate),
                                         "-f", scenario.format, "-o", str(output), "--json"),
                                  name="getgoodtape convert", env=env, capture=True)
        if done.returncode != 0:
            raise RuntimeError(f"getgoodtape convert failed: {done.stderr.decode()[-1000:]}")
        final = msgspec.json.decode(done.stdout, type=JobCompleted)
        size = output.stat().st_size
        output.unlink()
        assert size == final.size, (size, final.size)
        return PathRun(scenario=scenario.name, path="cli", run=run, wall=done.wall,
                       steps={**final.timings, "process": done.wall}, costs={"getgoodtape convert": done.cost},
                       output_bytes=size)

    async def one(self, path: str, scenario: Scenario, run: int) -> PathRun:
        """Run ``path`` once on ``scenario``."""
        if path == "floor":
            return await self.floor(scenario, run)
        if path in ("original", "relay"):
            return await self.original_path(scenario, run, relay=path == "relay")
        if path == "cli":
            return await self.cli(scenario, run)
        return await self.getgoodtape(scenario, run)

    # --- small jobs and concurrency

    async def small_jobs(self, count: int) -> SmallJobs:
        """``count`` 1-second clip → mp3 jobs one after another, and the bare ffmpeg time of one."""
        plan = await self.plan("clip", "mp3")
        url = self.source_url("clip", None)
        bare = []
        for _ in range(BARE_RUNS):
            done = await run_measured(self.bare_argv(plan, url), name="ffmpeg")
            bare.append(done.wall)
        latencies, stages = [], []
        for _ in range(count):
            wall, final = await self.ggt_job(url, "mp3")
            latencies.append(wall)
            stages.append(dict(final.timings))
        return SmallJobs(jobs=count, latencies=latencies, bare_ffmpeg=bare, stage_timings=stages)

    async def concurrency(self, count: int) -> Concurrency:
        """``count`` short jobs at once with two converters and two uploaders."""
        for actor in ("converter", "uploader"):
            while len(self.cluster.processes[actor]) < 2:
                self.cluster.start(actor)
        vhost = self.settings.amqp_url.rsplit("/", 1)[1]
        deadline = time.monotonic() + CONSUMERS_TIMEOUT
        while True:
            consumers = await asyncio.to_thread(queue_consumers, vhost)
            if consumers.get("ggt.converter", 0) >= 2 and consumers.get("ggt.uploader", 0) >= 2:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"extra actor processes did not start consuming: {consumers}")
            await asyncio.sleep(1.0)  # polling another process's state (the broker's)
        plan = await self.plan("short", "mp3")
        url = self.source_url("short", None)
        bare_cpu = []
        for _ in range(BARE_RUNS):
            done = await run_measured(self.bare_argv(plan, url), name="ffmpeg")
            bare_cpu.append(done.cost.cpu)
        requests = [ConvertRequested(url=url, format=Format.MP3, job_id=self.job_id("conc")) for _ in range(count)]
        assert self.media is not None
        others = [Watched("media", self.media.pid)]
        broker = await asyncio.to_thread(broker_pid)
        if broker:
            others.append(Watched("broker", broker))
        # no sampler: this run's figure is the whole machine, and CPU is exact from begin and end alone
        async with watching([*self.watched(*ACTORS, "s3"), *others], sample=False) as costs:
            own0, (busy0, idle0) = cpu_split(os.getpid())[0], machine_cpu()
            started = time.monotonic()
            await self.cluster.run(requests, timeout=JOB_TIMEOUT)
            wall = time.monotonic() - started
            (busy1, idle1), own = machine_cpu(), cpu_split(os.getpid())[0] - own0
        finals = [self.cluster.finals[r.job_id] for r in requests]
        for final in finals:
            if isinstance(final, JobCompleted):
                await self.storage.delete(final.key)
        store = costs.pop("s3")
        shared = {w.name: costs.pop(w.name) for w in others}
        shared["bench"] = Cost(name="bench", cpu=round(own, 3))  # this process alone: publishing, watching events
        return Concurrency(jobs=count, converters=2, uploaders=2, cores=os.cpu_count() or 1, wall=wall,
                           bare_cpu=bare_cpu, failed=sum(not isinstance(f, JobCompleted) for f in finals),
                           costs=dict(costs), store=store, others=shared,
                           machine_busy=round(busy1 - busy0, 3), machine_idle=round(idle1 - idle0, 3))


# --------------------------------------------------------------------------------- the uploader


async def uploader_rows(sizes: tuple[str, ...], *, part_size: int) -> list[UploaderRow]:
    """bench.uploader's child (ffmpeg → stream_to_target) against its null sink, at each size."""
    from aiohttp import web

    from actors.runtime.http import serving
    from bench.uploader import NullStore, parse_size, run_one

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", NullStore.handle)
    async with serving(app) as port:
        store = NullStore(f"http://127.0.0.1:{port}")
        rows = []
        for size in sizes:
            row = await run_one(store, parse_size(size), part_size=part_size, parts_in_flight=2)
            rows.append(UploaderRow(size=row.size, seconds=row.seconds, peak_rss=row.peak_rss,
                                    written=row.written + row.ffmpeg_written, parts=row.parts))
        return rows


# --------------------------------------------------------------------------------------- all


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


async def run_all(options: Options, *, progress=_log) -> Results:
    """Every part of the benchmark, in one run, with the load average at its start and end."""
    started = time.monotonic()
    work = Path(options.work_dir)
    results = Results(started=time.strftime("%Y-%m-%d %H:%M:%S %z"), options=options,
                      machine=await asyncio.to_thread(versions), load_start=load_average())
    results.scenarios = scenarios(options)
    bench = Bench(options, work)
    async with bench.running():
        results.sources = {role: path.stat().st_size for role, path in bench.sources.items()}
        for scenario in results.scenarios:  # plans and reference outputs before any measurement
            await bench.reference_output(scenario.source, scenario.format)
        for run in range(options.runs):
            for scenario in results.scenarios:
                if scenario.source == "audio" and run >= options.long_audio_runs:
                    continue
                for path in PATHS:
                    result = await bench.one(path, scenario, run)
                    results.runs.append(result)
                    progress(f"run {run + 1}/{options.runs} {scenario.name:<32} {path:<12} {result.wall:7.2f} s")
        progress(f"small jobs: {options.small_jobs}")
        results.small_jobs = await bench.small_jobs(options.small_jobs)
        progress(f"concurrency: {options.concurrent_jobs} jobs")
        results.concurrency = await bench.concurrency(options.concurrent_jobs)
        progress(f"concurrency: {results.concurrency.wall:.2f} s")
    if options.uploader_sizes:
        progress(f"uploader: {','.join(options.uploader_sizes)}")
        results.uploader_part_size = bench.settings.part_size
        results.uploader = await uploader_rows(options.uploader_sizes, part_size=bench.settings.part_size)
    results.load_end = load_average()
    results.seconds = round(time.monotonic() - started, 1)
    return results


def median(values: list[float]) -> float:
    """The median (0 for none)."""
    return statistics.median(values) if values else 0.0

