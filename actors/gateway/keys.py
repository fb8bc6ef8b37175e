"""The gateway's shared state, stored on the aiohttp app under typed keys."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import msgspec
from aiohttp import web

from actors.gateway.stats import OutcomeTracker
from actors.settings import Settings
from bus.base import Bus
from storage import Storage

#: job ids accepted by this gateway that are remembered (to show them as queued before the
#: coordinator records them); older ones are forgotten first
ACCEPTED_MEMORY = 10_000


class GatewayOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Timing knobs of the gateway (tests shorten them)."""

    #: seconds between SSE keepalive comments
    keepalive: float = 15.0
    #: seconds an event stream waits for a job it has never heard of before answering 404
    unknown_job_wait: float = 3.0


class AcceptedJobs:
    """The most recent job ids this gateway published a request for."""

    def __init__(self, *, limit: int = ACCEPTED_MEMORY) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def remember(self, job_id: str) -> None:
        """Note a job id just accepted."""
        self._ids[job_id] = None
        self._ids.move_to_end(job_id)
        while len(self._ids) > self._limit:
            self._ids.popitem(last=False)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids


SETTINGS = web.AppKey("settings", Settings)
BUS = web.AppKey("bus", Bus)
#: storage with the actors' endpoint (records, stats, readiness)
STORAGE = web.AppKey("storage", Storage)
#: storage with the endpoint users reach (download redirects); the same object without a public endpoint
PUBLIC_STORAGE = web.AppKey("public_storage", Storage)
TRACKER = web.AppKey("tracker", OutcomeTracker)
ACCEPTED = web.AppKey("accepted", AcceptedJobs)
#: the live queues of open event streams, woken with None at shutdown
STREAMS = web.AppKey("streams", set[asyncio.Queue])
OPTIONS = web.AppKey("options", GatewayOptions)
