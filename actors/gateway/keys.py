"""The gateway's shared state, stored on the aiohttp app under typed keys."""

from __future__ import annotations

from collections import OrderedDict

import msgspec
from aiohttp import web

from actors.gateway.monitor import MONITOR_TTL_S, STATS_TTL_S, Monitor
from actors.gateway.sse import EventHub
from actors.gateway.stats import OutcomeTracker
from actors.runtime.settings import Settings
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
    #: seconds readiness and queue depths are reused (0 = ask every time)
    monitor_ttl: float = MONITOR_TTL_S
    #: seconds the storage figures are reused (0 = list the bucket every time)
    stats_ttl: float = STATS_TTL_S


class AcceptedJobs:
    """The most recent (owner, job id) pairs this gateway published a request for."""

    def __init__(self, *, limit: int = ACCEPTED_MEMORY) -> None:
        self._ids: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._limit = limit

    def remember(self, owner: str, job_id: str) -> None:
        """Note a job just accepted for ``owner``."""
        self._ids[(owner, job_id)] = None
        self._ids.move_to_end((owner, job_id))
        while len(self._ids) > self._limit:
            self._ids.popitem(last=False)

    def knows(self, owner: str, job_id: str) -> bool:
        """Whether this gateway accepted the owner's job."""
        return (owner, job_id) in self._ids


SETTINGS = web.AppKey("settings", Settings)
BUS = web.AppKey("bus", Bus)
#: storage with the actors' endpoint (records, stats, readiness)
STORAGE = web.AppKey("storage", Storage)
#: storage with the endpoint users reach (download redirects); the same object without a public endpoint
PUBLIC_STORAGE = web.AppKey("public_storage", Storage)
TRACKER = web.AppKey("tracker", OutcomeTracker)
ACCEPTED = web.AppKey("accepted", AcceptedJobs)
#: the one event subscription fanned out to the open event streams
HUB = web.AppKey("hub", EventHub)
#: cached readiness, queue depths and storage figures
MONITOR = web.AppKey("monitor", Monitor)
OPTIONS = web.AppKey("options", GatewayOptions)
