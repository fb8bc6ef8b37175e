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
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from actors.registry import ACTOR_CLASSES
from actors.serve import install_stop_signals, local_services, workers
from actors.settings import Settings, load_settings
from actors.webserve import serving
from actors.wiring import make_bus
from bus.base import Bus
from messages.codec import decode, new_id
from messages.types import ConvertRequested, Format, JobCompleted, JobFailed, JobProgress, Quality

console = Console(stderr=True)

#: chunk size when saving the finished file
SAVE_CHUNK = 1024 * 1024


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert`` and ``submit`` subcommands."""
    convert = sub.add_parser("convert", help="convert a URL or local file end to end in this process")
    _request_args(convert, "URL or path of a local media file")
    convert.add_argument("-o", "--output", help="where to save the file (default: ./<title>.<ext>)")
    convert.add_argument("--no-save", action="store_true", help="do not download the result")
    convert.set_defaults(fn=_cmd_convert)

    submit = sub.add_parser("submit", help="publish a request to a running deployment (needs GGT_AMQP_URL)")
    _request_args(submit, "URL of the media")
    submit.add_argument("--follow", action="store_true", help="follow the job's events until it ends")
    submit.set_defaults(fn=_cmd_submit)


def _request_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("source", metavar="SOURCE", help=what)
    parser.add_argument("-f", "--format", required=True, choices=[f.value for f in Format])
    parser.add_argument("-q", "--quality", choices=[q.value for q in Quality],
                        help="kbit/s for audio, maximum height for video, or best (default per format)")
    parser.add_argument("--start", type=float, help="clip start, seconds")
    parser.add_argument("--end", type=float, help="clip end, seconds")
    parser.add_argument("--job-id", help="your own job id (a repeat with the same id is the same job)")
    parser.add_argument("--json", action="store_true", help="print the final event as JSON on stdout")


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


async def follow(bus: Bus, job_id: str, events: AsyncIterator, *, show: bool) -> JobCompleted | JobFailed:
    """Show the job's progress until its final event; return that event."""
    columns = (TextColumn("{task.description:<11}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not show, transient=False) as bar:
        task = bar.add_task("queued", total=100)
        async for envelope, body in events:
            message = decode(body, type_name_hint=envelope.type)
            if getattr(message, "job_id", None) != job_id:
                continue
            if isinstance(message, JobProgress):
                bar.update(task, description=message.stage.value, completed=message.percent)
            elif isinstance(message, JobCompleted):
                bar.update(task, description="completed", completed=100)
                return message
            elif isinstance(message, JobFailed):
                bar.update(task, description="failed")
                return message
    raise RuntimeError("event stream ended before the job did")


async def save(url: str, output: Path) -> None:
    """Download the finished file to ``output`` (the user's copy; not part of the data path)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        with output.open("wb") as f:
            async for chunk in response.content.iter_chunked(SAVE_CHUNK):
                f.write(chunk)


def report(final: JobCompleted | JobFailed, *, saved: Path | None, as_json: bool, embedded: bool = False) -> int:
    """Print the outcome; the process exit status."""
    if as_json:
        sys.stdout.write(msgspec.json.encode(final).decode() + "\n")
    if isinstance(final, JobFailed):
        console.print(f"[red]failed[/red] {final.error.code}: {final.error.message}")
        if final.error.detail:
            console.print(f"  detail: {final.error.detail}")
        return 1
    console.print(f"[green]done[/green] {final.key}  {final.size / 1e6:.2f} MB  {final.duration:.1f} s  "
                  f"sha256 {final.sha256[:16]}…")
    console.print("  stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in final.timings.items()))
    if saved:
        console.print(f"  saved to {saved}")
    console.print(f"  download URL (valid until {final.expires_at}"
                  f"{'; the embedded S3 ends with this process' if embedded else ''}):")
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
    async with contextlib.AsyncExitStack() as stack:
        if local is not None:
            source = await stack.enter_async_context(serve_local_file(local))
            # the one loopback address this run serves the file on; nothing else is opened up
            settings = msgspec.structs.replace(settings, allow_networks=(*settings.allow_networks, "127.0.0.1/32"))
        request = _request(args, source)
        settings, bus = await stack.enter_async_context(local_services(settings, name="convert"))
        stopping = asyncio.Event()
        install_stop_signals(stopping)
        await stack.enter_async_context(workers(list(ACTOR_CLASSES), settings=settings, bus=bus, stopping=stopping))
        events = await stack.enter_async_context(bus.subscribe(f"job.{request.job_id}.#"))
        started = time.monotonic()
        await bus.publish(request)
        follow_task = asyncio.ensure_future(follow(bus, request.job_id, events, show=not args.json))
        stop_task = asyncio.ensure_future(stopping.wait())
        done, _ = await asyncio.wait({follow_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        if follow_task not in done:
            follow_task.cancel()
            console.print("interrupted")
            return 130
        final = follow_task.result()
        saved = None
        if isinstance(final, JobCompleted) and not args.no_save:
            saved = Path(args.output) if args.output else Path(f"{_safe_name(final.title, request.job_id)}.{local_ext(final)}")
            await save(final.download_url, saved)
        console.print(f"  wall time {time.monotonic() - started:.2f} s")
        return report(final, saved=saved, as_json=args.json, embedded=embedded)


def local_ext(final: JobCompleted) -> str:
    """The extension of the stored object."""
    return final.key.rsplit(".", 1)[-1]


def _safe_name(title: str, job_id: str) -> str:
    from actors.coordinator import download_filename

    return download_filename(title, "x", job_id)[:-2]


def _cmd_convert(args: argparse.Namespace) -> int:
    from actors.logs import setup_logging

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
    bus = make_bus(settings, name="submit")
    await bus.start()
    try:
        async with bus.subscribe(f"job.{request.job_id}.#") as events:
            await bus.publish(request)
            console.print(f"submitted job {request.job_id}")
            if not args.follow:
                print(request.job_id)
                return 0
            final = await follow(bus, request.job_id, events, show=not args.json)
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
