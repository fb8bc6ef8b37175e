"""The gateway's assembly: ``make_app`` builds the aiohttp application, ``run_gateway`` serves it.

Middlewares, outermost first: request metrics, JSON errors, API keys + rate limit. CORS (aiohttp-cors)
wraps the routes when ``GGT_CORS_ORIGINS`` is set. A background subscription to ``job.#`` feeds
the outcome counts behind /api/storage/stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import aiohttp_cors
from aiohttp import web

from actors import metrics
from actors.gateway import handlers, sse
from actors.gateway.auth import Access, access_middleware
from actors.gateway.errors import error_middleware
from actors.gateway.keys import (
    ACCEPTED,
    BUS,
    OPTIONS,
    PUBLIC_STORAGE,
    SETTINGS,
    STORAGE,
    STREAMS,
    TRACKER,
    AcceptedJobs,
    GatewayOptions,
)
from actors.gateway.stats import OutcomeTracker
from actors.jobs import utcnow
from actors.settings import Settings
from bus.base import Bus
from storage import Storage

log = logging.getLogger("getgoodtape.gateway")

#: largest request body accepted (a ConvertRequested is a few hundred bytes)
MAX_BODY_BYTES = 64 * 1024
#: headers a cross-origin page may send and read
CORS_ALLOW_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID")
CORS_EXPOSE_HEADERS = ("Location", "Retry-After")


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


async def _observe_outcomes(app: web.Application) -> AsyncIterator[None]:
    """Feed every job event to the outcome tracker while the app runs (the task is owned here)."""
    tracker = app[TRACKER]

    async def follow() -> None:
        async with app[BUS].subscribe("job.#") as events:
            async for envelope, body in events:
                if (message := sse.decode_event(envelope, body)) is not None:
                    tracker.observe(message)

    task = asyncio.create_task(follow())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _end_streams(app: web.Application) -> None:
    """At shutdown, end every open event stream (its client reconnects elsewhere with Last-Event-ID)."""
    for live in list(app[STREAMS]):
        live.put_nowait(None)


def make_app(settings: Settings, *, bus: Bus, storage: Storage, public_storage: Storage | None = None,
             options: GatewayOptions | None = None) -> web.Application:
    """The gateway application on a started bus and open storage (both owned by the caller)."""
    access = Access(api_keys=tuple(settings.api_keys), per_minute=settings.rate_limit_per_minute)
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[request_metrics, error_middleware, access_middleware(access)])
    app[SETTINGS] = settings
    app[BUS] = bus
    app[STORAGE] = storage
    app[PUBLIC_STORAGE] = public_storage or storage
    app[TRACKER] = OutcomeTracker(since=utcnow())
    app[ACCEPTED] = AcceptedJobs()
    app[STREAMS] = set()
    app[OPTIONS] = options or GatewayOptions()
    app.cleanup_ctx.append(_observe_outcomes)
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
    from actors.registry import ACTOR_CLASSES
    from actors.serve import install_stop_signals, local_services, workers
    from actors.wiring import make_bus, storage_config

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
