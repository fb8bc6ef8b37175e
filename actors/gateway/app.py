"""The gateway's assembly: ``make_app`` builds the aiohttp application, ``run_gateway`` serves it.

Middlewares, outermost first: request metrics, security headers (CSP), JSON errors, API keys + rate
limits. CORS (aiohttp-cors) wraps the routes when ``GGT_CORS_ORIGINS`` is set. ONE background
subscription to ``job.#`` feeds the outcome counts behind /api/storage/stats and every open event
stream (fanned out in process). ``settings_problems`` is checked before the gateway starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Sequence

import aiohttp_cors
from aiohttp import web

from actors.core.jobs import owner_of, utcnow
from actors.gateway import handlers, sse
from actors.gateway.auth import Access, access_middleware, parse_api_keys
from actors.gateway.errors import error_middleware
from actors.gateway.keys import (
    ACCEPTED,
    BUS,
    HUB,
    MONITOR,
    OPTIONS,
    PUBLIC_STORAGE,
    SETTINGS,
    STORAGE,
    TRACKER,
    AcceptedJobs,
    GatewayOptions,
)
from actors.gateway.monitor import Monitor
from actors.gateway.stats import OutcomeTracker
from actors.runtime import metrics
from actors.runtime.settings import Settings
from bus.auth import verify
from bus.base import Bus
from storage import Storage

log = logging.getLogger("getgoodtape.gateway")

#: largest request body accepted (a ConvertRequested is a few hundred bytes)
MAX_BODY_BYTES = 64 * 1024
#: headers a cross-origin page may send and read
CORS_ALLOW_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID")
CORS_EXPOSE_HEADERS = ("Location", "Retry-After")
#: what a page served here may load and where it may connect: only this origin, no inline script,
#: no framing, no plugins (the demo page needs nothing else)
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
#: longest download URL lifetime S3 accepts for a SigV4 presigned URL (seconds)
MAX_DOWNLOAD_URL_TTL_S = 7 * 24 * 3600
#: http_host values that listen beyond this machine although they are not addresses of one interface
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` listens on this machine only (a loopback address or ``localhost``)."""
    if host in WILDCARD_HOSTS:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def settings_problems(settings: Settings) -> list[str]:
    """What keeps these settings from serving the gateway safely (empty = fine); pure."""
    problems: list[str] = []
    try:
        keys = parse_api_keys(tuple(settings.api_keys))
    except ValueError as exc:
        problems.append(str(exc))
        keys = ()
    if not keys and not settings.api_keys and not settings.allow_open_api \
            and not is_loopback_host(settings.http_host):
        problems.append(f"GGT_HTTP_HOST={settings.http_host or '(all interfaces)'} is not loopback and "
                        "GGT_API_KEYS is empty: set keys, or GGT_ALLOW_OPEN_API=true behind an authenticating proxy")
    if not 1 <= settings.download_url_ttl <= MAX_DOWNLOAD_URL_TTL_S:
        problems.append(f"GGT_DOWNLOAD_URL_TTL={settings.download_url_ttl} must be 1..{MAX_DOWNLOAD_URL_TTL_S} "
                        "seconds (S3 refuses presigned URLs valid for more than 7 days)")
    if settings.sse_streams_per_key < 1:
        problems.append("GGT_SSE_STREAMS_PER_KEY must be at least 1")
    if settings.rate_limit_per_minute < 0 or settings.auth_failures_per_minute < 0:
        problems.append("GGT_RATE_LIMIT_PER_MINUTE and GGT_AUTH_FAILURES_PER_MINUTE must not be negative")
    if not 0 < settings.http_port < 65536:
        problems.append(f"GGT_HTTP_PORT={settings.http_port} is not a TCP port")
    return problems


def check_settings(settings: Settings) -> None:
    """Refuse to start (SystemExit naming every problem) on settings ``settings_problems`` rejects."""
    problems = settings_problems(settings)
    if problems:
        raise SystemExit("invalid gateway configuration:\n  " + "\n  ".join(problems)
                         + "\n(see README.md, Configuration)")


@web.middleware
async def security_headers(request: web.Request, handler):
    """Every answer carries the Content-Security-Policy and forbids content sniffing."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        exc.headers.setdefault("X-Content-Type-Options", "nosniff")
        raise
    if not response.prepared:  # an event stream has sent its headers already (it set none of these)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


@web.middleware
async def request_metrics(request: web.Request, handler):
    """Count requests by route and status (``ggt_http_requests_total``)."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.HTTP_REQUESTS.labels(request.method, route, str(status)).inc()


async def _follow_events(app: web.Application) -> AsyncIterator[None]:
    """The gateway's one subscription: every job event goes to the outcome tracker and to the open
    streams of its owner's job (the task is owned here; serving starts once it is bound)."""
    tracker, hub = app[TRACKER], app[HUB]
    bound = asyncio.Event()
    keys = app[BUS].keys

    async def follow() -> None:
        async with app[BUS].subscribe("job.#") as events:
            bound.set()
            async for envelope, body in events:
                if keys is not None and not verify(keys, envelope, body):
                    # anyone who may write ggt.events could forge a completed job with their own link
                    log.warning("unsigned event dropped", extra={"job_id": envelope.job_id, "type": envelope.type})
                    continue
                if (message := sse.decode_event(envelope, body)) is not None:
                    tracker.observe(message)
                    hub.dispatch(owner_of(envelope.owner), message)

    task = asyncio.create_task(follow())
    waiting = asyncio.create_task(bound.wait())
    await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if task.done():
        task.result()  # the subscription failed: so does the start
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _end_streams(app: web.Application) -> None:
    """At shutdown, end every open event stream (its client reconnects elsewhere with Last-Event-ID)."""
    app[HUB].end_all()


def make_app(settings: Settings, *, bus: Bus, storage: Storage, public_storage: Storage | None = None,
             options: GatewayOptions | None = None) -> web.Application:
    """The gateway application on a started bus and open storage (both owned by the caller); ValueError
    for API keys ``parse_api_keys`` refuses."""
    options = options or GatewayOptions()
    access = Access(api_keys=parse_api_keys(tuple(settings.api_keys)), per_minute=settings.rate_limit_per_minute,
                    failures_per_minute=settings.auth_failures_per_minute)
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[request_metrics, security_headers, error_middleware,
                                       access_middleware(access)])
    app[SETTINGS] = settings
    app[BUS] = bus
    app[STORAGE] = storage
    app[PUBLIC_STORAGE] = public_storage or storage
    app[TRACKER] = OutcomeTracker(since=utcnow())
    app[ACCEPTED] = AcceptedJobs()
    app[HUB] = sse.EventHub()
    app[MONITOR] = Monitor(bus=bus, storage=storage, ttl=options.monitor_ttl, stats_ttl=options.stats_ttl)
    app[OPTIONS] = options
    app.cleanup_ctx.append(_follow_events)
    app.on_shutdown.append(_end_streams)

    router = app.router
    router.add_post("/api/convert", handlers.convert)
    router.add_get("/api/jobs/{job_id}", handlers.job)
    router.add_get("/api/jobs/{job_id}/events", handlers.events)
    router.add_get("/api/jobs/{job_id}/download", handlers.download)
    router.add_get("/api/storage/stats", handlers.stats)
    router.add_get("/api/formats", handlers.formats)
    router.add_get("/api/openapi.json", handlers.openapi)
    router.add_get("/healthz", handlers.healthz)
    router.add_get("/readyz", handlers.readyz)
    router.add_get("/metrics", handlers.metrics_endpoint)
    router.add_get("/file-flow-demo", handlers.demo)
    router.add_get("/", handlers.root)
    router.add_static("/static/", handlers.STATIC_DIR)
    if settings.cors_origins:
        _allow_cors(app, settings.cors_origins)
    return app


def _allow_cors(app: web.Application, origins: Sequence[str]) -> None:
    """Let pages from ``origins`` call every route (preflights answered by aiohttp-cors)."""
    option = aiohttp_cors.ResourceOptions(allow_credentials=False, allow_headers=CORS_ALLOW_HEADERS,
                                          expose_headers=CORS_EXPOSE_HEADERS, allow_methods=["GET", "POST"])
    cors = aiohttp_cors.setup(app, defaults={origin: option for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)


async def run_gateway(settings: Settings, *, with_actors: Sequence[str] = ()) -> None:
    """``getgoodtape run gateway [actors…]``: serve the API on http_host:http_port until a stop signal,
    with ``with_actors`` running in this process (``all`` = every actor; then the in-memory bus and
    the embedded S3 are fine when nothing is configured)."""
    from actors.bootstrap.registry import ACTOR_CLASSES
    from actors.bootstrap.serve import install_stop_signals, local_services, workers
    from actors.bootstrap.wiring import make_bus
    from actors.runtime.storage import storage_config

    check_settings(settings)
    names = list(ACTOR_CLASSES) if "all" in with_actors else list(with_actors)
    everything_here = set(names) >= set(ACTOR_CLASSES)
    if not settings.amqp_url and not everything_here:
        raise SystemExit("GGT_AMQP_URL is not set: a gateway without every actor in its process needs RabbitMQ "
                         "(or run `getgoodtape run gateway all`)")
    stopping = asyncio.Event()
    install_stop_signals(stopping)
    async with contextlib.AsyncExitStack() as stack:
        if everything_here:
            settings, bus = await stack.enter_async_context(local_services(settings, name="gateway"))
        else:
            bus = make_bus(settings, name="gateway")
            await bus.start()
            stack.push_async_callback(bus.close)
        storage = await stack.enter_async_context(Storage(storage_config(settings)))
        public = storage
        if settings.s3_public_endpoint:
            public = await stack.enter_async_context(Storage(storage_config(settings, public=True)))
        if names:
            await stack.enter_async_context(workers(names, settings=settings, bus=bus, stopping=stopping))
        runner = web.AppRunner(make_app(settings, bus=bus, storage=storage, public_storage=public),
                               access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        await site.start()
        log.info("gateway listening", extra={"host": settings.http_host, "port": settings.http_port,
                                             "actors": ",".join(names)})
        await stopping.wait()
        log.info("stop signal: closing the gateway")
