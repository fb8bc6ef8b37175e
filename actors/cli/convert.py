"""``getgoodtape convert`` (the main job, all actors in this process) and ``getgoodtape submit``.

``convert`` runs coordinator, converter, uploader and verifier here — on the in-memory bus and the
embedded S3 when nothing is configured, on RabbitMQ / S3 when ``GGT_AMQP_URL`` / ``GGT_S3_ENDPOINT``
are set — publishes one ConvertRequested, follows its events with a progress bar, saves the file
and prints the download URL and the figures. A local file is served on loopback for this run only:
the actors themselves never read local paths.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import msgspec
from aiohttp import web
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from actors.bootstrap.registry import ACTOR_CLASSES
from actors.bootstrap.serve import embedded_storage, install_stop_signals, started_bus, workers
from actors.bootstrap.wiring import make_bus
from actors.cli.check import run_checks, stop_on_failure
from actors.core.jobs import owner_of
from actors.runtime.http import serving
from actors.runtime.settings import Settings, load_settings
from bus.base import Bus, DeadLetter
from messages.codec import decode, new_id
from messages.routing import ACTORS, DEFAULT_TENANT, dead_letter_queue, job_events_pattern
from messages.types import ConvertRequested, Format, JobCompleted, JobFailed, JobProgress, Quality, TenantId

console = Console(stderr=True)

#: chunk size when saving the finished file
SAVE_CHUNK = 1024 * 1024
#: seconds between looks at the dead-letter queue depths while a job is followed (a depth read is
#: one passive declare per queue; letters are only read when a queue grew)
DEAD_LETTER_POLL_S = 1.0
#: extra seconds of silence allowed beyond a step's time limit and the longest retry delay before a
#: followed job counts as stuck
STUCK_SLACK_S = 60.0
#: exit status when --timeout ends the wait (as timeout(1) does)
EXIT_TIMEOUT = 124


def convert_arguments(convert: argparse.ArgumentParser) -> None:
    """The arguments of ``convert``."""
    _request_args(convert, "URL or path of a local media file")
    convert.add_argument("-o", "--output", help="where to save the file (default: ./<title>.<ext>)")
    convert.add_argument("--no-save", action="store_true", help="do not download the result")
    convert.set_defaults(fn=_cmd_convert)


def submit_arguments(submit: argparse.ArgumentParser) -> None:
    """The arguments of ``submit``."""
    _request_args(submit, "URL of the media")
    submit.add_argument("--follow", action="store_true", help="follow the job's events until it ends")
    submit.add_argument("--no-dead-letters", dest="watch_dead_letters", action="store_false",
                        help="with --follow: do not watch the dead-letter queues (for users who may not read them)")
    submit.set_defaults(fn=_cmd_submit)


def _request_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("source", metavar="SOURCE", help=what)
    parser.add_argument("-f", "--format", required=True, choices=[f.value for f in Format])
    parser.add_argument("-q", "--quality", choices=[q.value for q in Quality],
                        help="kbit/s for audio, maximum height for video, or best (default per format)")
    parser.add_argument("--start", type=float, help="clip start, seconds")
    parser.add_argument("--end", type=float, help="clip end, seconds")
    parser.add_argument("--job-id", help="your own job id (a repeat with the same id is the same job)")
    parser.add_argument("--json", action="store_true",
                        help="print the outcome as one JSON object on stdout (nothing else goes to stdout)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop waiting after this many seconds (exit status 124); without it the wait "
                             "ends when the job completes, fails, is dead-lettered or is stuck")
    parser.add_argument("--tenant", type=_tenant, default=DEFAULT_TENANT,
                        help=f"the tenant that owns the job (default: {DEFAULT_TENANT})")


def _tenant(value: str) -> str:
    """A --tenant value, checked against messages.types.TenantId."""
    try:
        return msgspec.convert(value, TenantId)
    except msgspec.ValidationError:
        raise argparse.ArgumentTypeError(f"not a tenant id ([a-z0-9][a-z0-9_-]{{0,31}}): {value!r}") from None


def _request(args: argparse.Namespace, url: str) -> ConvertRequested:
    try:
        return msgspec.convert({
            "url": url, "format": args.format, "quality": args.quality, "start": args.start, "end": args.end,
            "job_id": args.job_id or new_id(),
        }, ConvertRequested)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"invalid_request: {exc}") from None


# ------------------------------------------------------------------------------------- convert


@contextlib.asynccontextmanager
async def serve_local_file(path: Path) -> AsyncIterator[str]:
    """Serve one local file on 127.0.0.1 (random port, Range requests) for this run; yields its URL."""
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_get("/{name}", handler)
    async with serving(app) as port:
        yield f"http://127.0.0.1:{port}/{quote(path.name)}"


class Stuck(msgspec.Struct, frozen=True, kw_only=True):
    """The wait ended without a final event: ``why`` is ``timeout`` (--timeout) or ``stuck`` (silence)."""

    job_id: str
    why: str
    seconds: float
    stage: str


Outcome = JobCompleted | JobFailed | DeadLetter | Stuck


def stuck_after(settings: Settings) -> float:
    """Seconds without an event after which a followed job counts as stuck: a step's time limit plus
    the longest retry delay (a silent retry) plus slack."""
    return settings.job_time_limit + max(settings.retry_delays or (0.0,)) + STUCK_SLACK_S


async def follow(bus: Bus, job_id: str, events: AsyncIterator, *, show: bool, idle: float | None = None,
                 state: dict | None = None, owner: str = DEFAULT_TENANT) -> JobCompleted | JobFailed | Stuck:
    """Show the progress of ``owner``'s job until its final event and return it; Stuck after ``idle``
    silent seconds."""
    state = {} if state is None else state
    state.setdefault("stage", "queued")
    columns = (TextColumn("{task.description:<11}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    iterator = aiter(events)
    with Progress(*columns, console=console, disable=not show, transient=False) as bar:
        task = bar.add_task("queued", total=100)
        while True:
            try:
                async with asyncio.timeout(idle):
                    envelope, body = await anext(iterator)
            except TimeoutError:
                return Stuck(job_id=job_id, why="stuck", seconds=idle or 0.0, stage=state["stage"])
            except StopAsyncIteration:
                break
            message = decode(body, type_name_hint=envelope.type)
            if getattr(message, "job_id", None) != job_id or owner_of(envelope.owner) != owner:
                continue  # another job, or another tenant's job of the same id
            if isinstance(message, JobProgress):
                state["stage"] = message.stage.value
                # a retry notice is announced at its stage's start: the bar never goes back, and says why it waits
                state["percent"] = max(state.get("percent", 0.0), message.percent)
                waiting = f" ({escape(message.detail)})" if "retry" in message.detail else ""
                bar.update(task, description=message.stage.value + waiting, completed=state["percent"])
            elif isinstance(message, JobCompleted):
                bar.update(task, description="completed", completed=100)
                return message
            elif isinstance(message, JobFailed):
                bar.update(task, description="failed")
                return message
    raise RuntimeError("event stream ended before the job did")


def letter_of(letters: list[DeadLetter], job_id: str) -> DeadLetter | None:
    """The dead letter of ``job_id`` among ``letters``, if any."""
    return next((letter for letter in letters if letter.envelope.job_id == job_id), None)


async def dead_letter_depths(bus: Bus) -> dict[str, int]:
    """Letters in each actor's dead-letter queue: take it before publishing, as the watcher's baseline."""
    depths = await bus.queue_depths()
    return {actor: depths.get(dead_letter_queue(actor), 0) for actor in ACTORS}


async def watch_dead_letters(bus: Bus, job_id: str, *, baseline: dict[str, int],
                             interval: float | None = None) -> DeadLetter:
    """Return the job's dead letter once one appears (its message could not be handled or reported).

    Reads letters only of a queue that grew since the last look (``baseline`` first), and puts them
    back untouched.
    """
    seen = baseline
    while True:
        depths = await dead_letter_depths(bus)
        for actor, depth in depths.items():
            if depth > seen.get(actor, 0):
                batch = await bus.take_dead_letters(actor)
                try:
                    found = letter_of(batch.letters, job_id)
                finally:
                    await batch.close()
                if found is not None:
                    return found
        seen = depths
        await asyncio.sleep(interval or DEAD_LETTER_POLL_S)  # a poll period: the broker has no event for it


async def wait_for_outcome(bus: Bus, job_id: str, events: AsyncIterator, *, show: bool, settings: Settings,
                           timeout: float | None, stopping: asyncio.Event | None = None,
                           letters_baseline: dict[str, int] | None = None,
                           owner: str = DEFAULT_TENANT) -> Outcome | None:
    """The job's end: its final event, its dead letter (watched when ``letters_baseline`` is given),
    Stuck — or None when ``stopping`` was set."""
    state: dict = {}
    contenders = {asyncio.ensure_future(follow(bus, job_id, events, show=show, idle=stuck_after(settings),
                                               state=state, owner=owner))}
    if letters_baseline is not None:
        contenders.add(asyncio.ensure_future(watch_dead_letters(bus, job_id, baseline=letters_baseline)))
    if stopping is not None:
        contenders.add(asyncio.ensure_future(stopping.wait()))
    try:
        done, _ = await asyncio.wait(contenders, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in contenders:
            task.cancel()
        await asyncio.gather(*contenders, return_exceptions=True)
    if not done:
        return Stuck(job_id=job_id, why="timeout", seconds=timeout or 0.0, stage=state.get("stage", "queued"))
    result = next(iter(done)).result()
    return None if result is True else result


async def save(url: str, output: Path) -> None:
    """Download the finished file to ``output`` (the user's copy; not part of the data path)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        with output.open("wb") as f:
            async for chunk in response.content.iter_chunked(SAVE_CHUNK):
                f.write(chunk)


def outcome_json(final: Outcome) -> dict:
    """The outcome as the one JSON object ``--json`` prints: the final event, or what ended the wait."""
    if isinstance(final, DeadLetter):
        return {"type": "dead_lettered", "job_id": final.envelope.job_id, "actor": final.actor,
                "error": {"code": final.error_code, "message": final.error_message}}
    if isinstance(final, Stuck):
        return {"type": final.why, "job_id": final.job_id, "stage": final.stage, "seconds": final.seconds}
    return msgspec.to_builtins(final)


def report(final: Outcome, *, saved: Path | None, as_json: bool, embedded: bool = False) -> int:
    """Print the outcome (with ``as_json``: one JSON object on stdout, nothing else); the exit status."""
    if as_json:
        sys.stdout.write(msgspec.json.encode(outcome_json(final)).decode() + "\n")
    if isinstance(final, DeadLetter):
        # every value from a message is printed as plain text: a "[/b]" in it is not rich markup
        console.print(f"[red]dead-lettered[/red] by the {escape(final.actor)}: {escape(final.error_code)}: "
                      f"{escape(final.error_message)}")
        console.print("  the job could not be handled nor its failure reported; fix the cause (for storage: "
                      "`getgoodtape check`), then replay it: "
                      f"getgoodtape dlq replay --actor {escape(final.actor)} --job-id {escape(final.envelope.job_id)}")
        return 1
    if isinstance(final, Stuck):
        if final.why == "timeout":
            console.print(f"[red]timeout[/red] job {final.job_id} did not end within {final.seconds:.0f} s "
                          f"(last stage: {escape(final.stage)}); it may still finish: follow it with "
                          "`getgoodtape submit` events or the gateway")
            return EXIT_TIMEOUT
        console.print(f"[red]stuck[/red] job {final.job_id}: no event for {final.seconds:.0f} s (last stage: "
                      f"{escape(final.stage)}), beyond its time limit; check that every actor runs "
                      "(`getgoodtape check`) and the dead letters (`getgoodtape dlq list`)")
        return 1
    if isinstance(final, JobFailed):
        console.print(f"[red]failed[/red] {escape(final.error.code)}: {escape(final.error.message)}")
        if final.error.detail:
            console.print(f"  detail: {escape(final.error.detail)}")
        return 1
    console.print(f"[green]done[/green] {escape(final.key)}  {final.size / 1e6:.2f} MB  {final.duration:.1f} s  "
                  f"sha256 {final.sha256[:16]}…")
    console.print("  stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in final.timings.items()))
    if saved:
        console.print(f"  saved to {escape(str(saved))}")
    console.print(f"  download URL (valid until {final.expires_at}"
                  f"{'; the embedded S3 ends with this process' if embedded else ''}):")
    if as_json:
        console.print(final.download_url, markup=False)  # stdout holds the one JSON object only
    else:
        print(final.download_url)
    return 0


def local_source(source: str) -> Path | None:
    """The local file ``source`` names, or None when it is a URL."""
    path = Path(source).expanduser()
    return path.resolve() if "://" not in source and path.is_file() else None


async def run_convert(args: argparse.Namespace, settings: Settings, *, local: Path | None) -> int:
    """Everything of ``getgoodtape convert``; ``local`` is the file to serve, if SOURCE is one."""
    source = args.source
    embedded = not settings.s3_endpoint
    # a wrong bucket, secret, endpoint or broker user ends here, said plainly, instead of a silent
    # wait. On the in-memory bus the actors only ever see this run's job, so the checks run while
    # they start (the job is published once the checks passed); on RabbitMQ they would take the
    # deployment's messages, so the checks come first
    checks = asyncio.ensure_future(run_checks(settings, list(ACTOR_CLASSES)))
    if settings.amqp_url:
        stop_on_failure(await checks)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(_cancel, checks)
        try:
            if local is not None:
                source = await stack.enter_async_context(serve_local_file(local))
                # the one loopback address this run serves the file on; nothing else is opened up
                settings = msgspec.structs.replace(settings,
                                                   allow_networks=(*settings.allow_networks, "127.0.0.1/32"))
            request = _request(args, source)
            bus = await stack.enter_async_context(started_bus(settings, name="convert"))
            stopping = asyncio.Event()
            install_stop_signals(stopping)
            # the converter first: its yt-dlp worker warms up (~1 s of a core) while the embedded S3
            # and the other actors start
            await stack.enter_async_context(workers(["converter"], settings=settings, bus=bus, stopping=stopping))
            settings = await stack.enter_async_context(embedded_storage(settings))
            others = [name for name in ACTOR_CLASSES if name != "converter"]
            await stack.enter_async_context(workers(others, settings=settings, bus=bus, stopping=stopping))
        except Exception:
            stop_on_failure(await checks)  # a failed check explains a failed start best
            raise
        stop_on_failure(await checks)
        events = await stack.enter_async_context(bus.subscribe(job_events_pattern(request.job_id, args.tenant)))
        started = time.monotonic()
        baseline = await dead_letter_depths(bus)
        await bus.publish(request, owner=args.tenant)
        final = await wait_for_outcome(bus, request.job_id, events, show=not args.json, settings=settings,
                                       timeout=args.timeout, stopping=stopping, letters_baseline=baseline,
                                       owner=args.tenant)
        if final is None:
            console.print("interrupted")
            return 130
        saved = None
        if isinstance(final, JobCompleted) and not args.no_save:
            saved = (Path(args.output) if args.output
                     else Path(f"{_safe_name(final.title, request.job_id)}.{local_ext(final)}"))
            await save(final.download_url, saved)
        console.print(f"  wall time {time.monotonic() - started:.2f} s")
        return report(final, saved=saved, as_json=args.json, embedded=embedded)


async def _cancel(task: asyncio.Future) -> None:
    """Cancel ``task`` (if it still runs) and wait for it to end."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def local_ext(final: JobCompleted) -> str:
    """The extension of the stored object."""
    return final.key.rsplit(".", 1)[-1]


def _safe_name(title: str, job_id: str) -> str:
    from storage.keys import safe_title

    return safe_title(title, job_id)


def _cmd_convert(args: argparse.Namespace) -> int:
    from actors.runtime.logs import setup_logging

    settings = load_settings()
    local = local_source(args.source)
    if local is not None and settings.amqp_url:
        # serving the file on loopback means letting this process's actors fetch 127.0.0.1; on a
        # shared broker they would do that for other people's jobs too, and the deployment's own
        # actors (which may take this job) refuse loopback
        print("a local file can only be converted with the in-memory bus: unset GGT_AMQP_URL, or serve the file "
              "over http(s) and use `getgoodtape submit`", file=sys.stderr)
        return 2
    setup_logging("WARNING" if settings.log_level.upper() == "INFO" else settings.log_level)
    return asyncio.run(run_convert(args, settings, local=local))


# -------------------------------------------------------------------------------------- submit


async def run_submit(args: argparse.Namespace, settings: Settings) -> int:
    """Publish one request to a running deployment; with --follow, wait for its end."""
    request = _request(args, args.source)
    bus = make_bus(settings, name="submit", publisher_only=True)
    await bus.start()
    try:
        async with bus.subscribe(job_events_pattern(request.job_id, args.tenant)) as events:
            baseline = await dead_letter_depths(bus) if args.follow and args.watch_dead_letters else None
            await bus.publish(request, owner=args.tenant)
            console.print(f"submitted job {request.job_id}")
            if not args.follow:
                if args.json:
                    submitted = {"type": "submitted", "job_id": request.job_id}
                    sys.stdout.write(msgspec.json.encode(submitted).decode() + "\n")
                else:
                    print(request.job_id)
                return 0
            final = await wait_for_outcome(bus, request.job_id, events, show=not args.json, settings=settings,
                                           timeout=args.timeout, letters_baseline=baseline, owner=args.tenant)
    finally:
        await bus.close()
    return report(final, saved=None, as_json=args.json)


def _cmd_submit(args: argparse.Namespace) -> int:
    settings = load_settings()
    if not settings.amqp_url:
        print("GGT_AMQP_URL is not set: submit publishes to a running deployment's RabbitMQ "
              "(use `getgoodtape convert` to run everything in this process)", file=sys.stderr)
        return 2
    return asyncio.run(run_submit(args, settings))
