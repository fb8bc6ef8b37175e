"""Server-Sent Events of one job: the current state first, then live events, until the final one.

Event ids are derived from the job's state, not from the connection: ``rank(stage) × 100000 +
percent × 100`` for progress, 510000 for completed, 600000 for failed. They grow as the job moves
on, are the same on every gateway replica, and make resumption a comparison: a client that
reconnects with ``Last-Event-ID: N`` gets only events whose id is greater than N. An event whose
id is not greater than the last one sent (late or duplicate progress) is dropped, so ids a client
sees always increase.

Every stream of a gateway reads one shared subscription to ``job.#`` (EventHub): events are fanned
out in process to the streams of their owner's job, so a stream costs a queue, not a broker channel.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator

import msgspec
from aiohttp import web

from actors.core.jobs import JobRecord, final_event
from messages.codec import DecodeError, Envelope, decode
from messages.routing import EVENT_NAMES
from messages.types import STAGE_ORDER, Base, JobCompleted, JobFailed, JobProgress, Stage

#: seconds between keepalive comments on a quiet stream (proxies close idle connections at ~60 s)
KEEPALIVE_S = 15.0
#: milliseconds a browser waits before reconnecting a dropped stream (the ``retry:`` field)
RECONNECT_MS = 2000
#: ordering of stages inside event ids; terminal stages outrank every progress event
STAGE_RANK: dict[Stage, int] = {stage: rank for rank, stage in enumerate((*STAGE_ORDER, Stage.FAILED))}
#: room for percent × 100 (0..10000) inside one stage rank
RANK_SPAN = 100_000
#: no Last-Event-ID: every event is new
NONE_SEEN = -1

_encoder = msgspec.json.Encoder()


def event_id(message: Base) -> int:
    """The id of an event: grows with the job's stage and percent; final events outrank all progress."""
    if isinstance(message, JobCompleted):
        return STAGE_RANK[Stage.COMPLETED] * RANK_SPAN + 10_000
    if isinstance(message, JobFailed):
        return STAGE_RANK[Stage.FAILED] * RANK_SPAN
    assert isinstance(message, JobProgress)
    return STAGE_RANK[message.stage] * RANK_SPAN + round(message.percent * 100)


def is_final(message: Base) -> bool:
    """Whether this event ends the job's stream."""
    return isinstance(message, JobCompleted | JobFailed)


def parse_last_event_id(value: str | None) -> int:
    """The id a resuming client saw last; NONE_SEEN when absent or not a number."""
    if value is None or not value.strip().lstrip("-").isdigit():
        return NONE_SEEN
    return int(value.strip())


def format_event(message: Base) -> bytes:
    """One SSE event: ``id``, ``event`` (progress | completed | failed) and the message as JSON."""
    return (f"id: {event_id(message)}\nevent: {EVENT_NAMES[type(message)]}\n"
            f"data: {_encoder.encode(message).decode()}\n\n").encode()


def state_event(record: JobRecord) -> Base:
    """The record's current state as the event a stream starts with."""
    return final_event(record) or JobProgress(job_id=record.job_id, stage=record.stage, percent=record.percent)


def queued_event(job_id: str) -> JobProgress:
    """The state of a job accepted by this gateway that the coordinator has not recorded yet."""
    return JobProgress(job_id=job_id, stage=Stage.QUEUED, percent=0.0, detail="waiting for the coordinator")


def decode_event(envelope: Envelope, body: bytes) -> Base | None:
    """A JobProgress / JobCompleted / JobFailed from the bus, or None for anything else."""
    try:
        message = decode(body, type_name_hint=envelope.type or None, schema=envelope.schema or None)
    except DecodeError:
        return None
    return message if isinstance(message, JobProgress | JobCompleted | JobFailed) else None


class TooManyStreams(Exception):
    """The tenant already has its maximum of open event streams."""


class EventHub:
    """Fans the events of the gateway's one subscription out to the open streams of each job,
    keyed by (owner, job id): a stream only ever sees its own tenant's job."""

    def __init__(self) -> None:
        self._streams: dict[tuple[str, str], set[asyncio.Queue[Base | None]]] = {}
        self._per_owner: Counter[str] = Counter()

    def open_streams(self, owner: str) -> int:
        """Streams the tenant has open now."""
        return self._per_owner[owner]

    @contextlib.contextmanager
    def listen(self, owner: str, job_id: str, *, limit: int) -> Iterator[asyncio.Queue[Base | None]]:
        """A queue receiving the job's events while the block runs; TooManyStreams past ``limit``."""
        if self._per_owner[owner] >= limit:
            raise TooManyStreams(owner)
        live: asyncio.Queue[Base | None] = asyncio.Queue()
        self._streams.setdefault((owner, job_id), set()).add(live)
        self._per_owner[owner] += 1
        try:
            yield live
        finally:
            self._per_owner[owner] -= 1
            streams = self._streams.get((owner, job_id), set())
            streams.discard(live)
            if not streams:
                self._streams.pop((owner, job_id), None)

    def dispatch(self, owner: str, message: Base) -> None:
        """Hand one event to every stream of its job."""
        for live in self._streams.get((owner, getattr(message, "job_id", "")), ()):
            live.put_nowait(message)

    def end_all(self) -> None:
        """Wake every stream with None (shutdown): each ends, its client reconnects elsewhere."""
        for streams in self._streams.values():
            for live in streams:
                live.put_nowait(None)


async def first_event(live: asyncio.Queue[Base | None], *, timeout: float) -> Base | None:
    """The first live event within ``timeout`` seconds, or None."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            return await live.get()
    return None


async def open_stream(request: web.Request) -> web.StreamResponse:
    """Start the ``text/event-stream`` answer (no caching, no proxy buffering) with the reconnect delay."""
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    await response.prepare(request)
    await response.write(f"retry: {RECONNECT_MS}\n\n".encode())
    return response


async def run_stream(response: web.StreamResponse, *, first: Base, live: asyncio.Queue[Base | None],
                     last_seen: int, keepalive: float = KEEPALIVE_S) -> int:
    """Send ``first``, then live events, each only when its id is above the last sent; keepalive
    comments while quiet. Ends after the final event, or when the queue yields None (shutdown).
    Returns the number of events sent."""
    sent = 0
    message: Base | None = first
    while True:
        if message is not None and event_id(message) > last_seen:
            await response.write(format_event(message))
            last_seen = event_id(message)
            sent += 1
        if message is not None and is_final(message):
            return sent
        try:
            async with asyncio.timeout(keepalive):
                message = await live.get()
        except TimeoutError:
            await response.write(b": keepalive\n\n")
            message = None
            continue
        if message is None:
            return sent
