"""Cheap monitoring: readiness, queue depths and storage figures, each fetched at most once per few
seconds however often callers ask (one shared call in flight; failures are not kept)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from bus.base import Bus
from storage import Storage, StorageStats

log = logging.getLogger("getgoodtape.gateway")

T = TypeVar("T")

#: seconds a readiness verdict and queue depths are reused
MONITOR_TTL_S = 5.0
#: seconds a storage listing (a LIST of every converted file) is reused
STATS_TTL_S = 30.0
#: seconds each readiness check may take
READY_TIMEOUT_S = 3.0


class Cached(Generic[T]):
    """The result of one async call, reused for ``ttl`` seconds; concurrent callers share one call and
    an exception reaches every waiting caller without being kept."""

    def __init__(self, fetch: Callable[[], Awaitable[T]], *, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch, self._ttl, self._clock = fetch, ttl, clock
        self._lock = asyncio.Lock()
        self._value: T | None = None
        self._at: float | None = None
        #: how many times the call was really made (tests and metrics read it)
        self.calls = 0

    async def get(self) -> T:
        """The cached value, fetched again once it is older than ``ttl``."""
        async with self._lock:
            if self._at is not None and self._clock() - self._at < self._ttl:
                return self._value  # type: ignore[return-value]
            self.calls += 1
            value = await self._fetch()
            self._value, self._at = value, self._clock()
            return value


class Monitor:
    """The gateway's view of the broker and the bucket, cached (``ttl=0`` turns caching off)."""

    def __init__(self, *, bus: Bus, storage: Storage, ttl: float = MONITOR_TTL_S,
                 stats_ttl: float = STATS_TTL_S) -> None:
        self._bus, self._storage = bus, storage
        self.depths = Cached(self._queue_depths, ttl=ttl)
        self.readiness = Cached(self._ready, ttl=ttl)
        self.stored = Cached(storage.stats, ttl=stats_ttl)

    async def queue_depths(self) -> dict[str, int]:
        """Messages waiting per queue (the shape metrics.refresh_queue_depths reads from a bus)."""
        return await self.depths.get()

    async def storage_stats(self) -> StorageStats:
        """Converted files by format and open uploads."""
        return await self.stored.get()

    async def _queue_depths(self) -> dict[str, int]:
        async with asyncio.timeout(READY_TIMEOUT_S):
            return await self._bus.queue_depths()

    async def _ready(self) -> dict[str, str]:
        storage = self._storage
        broker, bucket = await asyncio.gather(
            _check("broker", self.queue_depths()),
            _check("storage", storage.client.head_bucket(Bucket=storage.bucket)))
        return {"broker": broker, "storage": bucket}


async def _check(name: str, call: Awaitable[object]) -> str:
    """"ok", or "failed" with the kind of failure only: the detail (host names, addresses) is logged."""
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await call
    except Exception as exc:
        log.warning("readiness check failed", extra={"check": name, "reason": f"{type(exc).__name__}: {exc}"})
        return "failed: timeout" if isinstance(exc, TimeoutError) else "failed: unavailable"
    return "ok"
