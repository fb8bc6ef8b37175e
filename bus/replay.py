"""Dead-letter replay: list, replay and purge the letters in the actors' dead-letter queues.

The decisions are pure functions (``matches``, ``refusal``, ``destination``, ``replay_envelope``);
``list_letters``, ``replay`` and ``purge`` are the shell that takes a batch of letters from each
dead-letter queue, acts on the ones that match, and puts every other letter back, in order.

A replayed letter is published to its original destination with a publisher confirm, and only
then removed from its dead-letter queue: a crash in between duplicates the message, never loses it.

The tool trusts only what the service wrote: a letter is replayed only when its MAC verifies
(anyone who could write to ``ggt.dlx`` could plant one), only to the service's own exchanges and
routing keys whatever its origin headers say, and its counters are read clamped at ≥ 0.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import msgspec

from bus.base import Bus, BusError, DeadLetter, DeadLetterBatch
from messages.codec import (
    H_ACTOR,
    H_ATTEMPT,
    H_DEAD_LETTERED_AT,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_ORIGIN_EXCHANGE,
    H_ORIGIN_ROUTING_KEY,
    H_REPLAYS,
    H_RETRY_DELAY_MS,
    Envelope,
)
from messages.routing import (
    ACTORS,
    COMMANDS_EXCHANGE,
    COORDINATOR,
    REQUESTS_EXCHANGE,
    ROUTING_KEYS,
    actor_routing_key,
    dead_letter_queue,
    queue_name,
    tenant_of_request,
)

#: replays of one message an operator may make before the tool refuses (a message that keeps
#: failing after three fresh starts needs a fix, not a fourth try)
DEFAULT_MAX_REPLAYS = 3

#: the word that selects every actor's dead-letter queue
ALL_ACTORS = "all"

#: headers describing the previous failure; a replayed copy starts clean without them.
#: ``ggt-first-failure`` is kept on purpose: it records when the message first failed, across replays.
FAILURE_HEADERS = frozenset({
    H_ATTEMPT,
    H_RETRY_DELAY_MS,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_ACTOR,
    H_ORIGIN_EXCHANGE,
    H_ORIGIN_ROUTING_KEY,
    H_DEAD_LETTERED_AT,
})


class LetterFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Which dead letters to act on; an empty field matches everything.

    ``since`` / ``until`` bound the time the letter was dead-lettered (``since`` inclusive,
    ``until`` exclusive); a letter with no recorded time never matches a time window.
    """

    error_code: str | None = None
    job_id: str | None = None
    message_id: str | None = None
    type: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class Action(enum.StrEnum):
    """What was done to a letter."""

    REPLAYED = "replayed"
    PURGED = "purged"
    SKIPPED = "skipped"


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What happened to one dead letter (or, with ``dry_run``, what would happen)."""

    letter: DeadLetter
    action: Action
    dry_run: bool = False
    #: (exchange, routing key) a replay goes to; None for purges and refusals without one
    destination: tuple[str, str] | None = None
    #: why a letter was skipped
    reason: str = ""


# ------------------------------------------------------------------------------------- pure core


def actors_of(actor_or_queue: str) -> tuple[str, ...]:
    """The actors named by ``all``, an actor name, its work queue or its dead-letter queue.

    Raises ValueError for anything else.
    """
    if actor_or_queue == ALL_ACTORS:
        return ACTORS
    for actor in ACTORS:
        if actor_or_queue in (actor, queue_name(actor), dead_letter_queue(actor)):
            return (actor,)
    raise ValueError(
        f"unknown actor or queue {actor_or_queue!r}; choose from {', '.join(ACTORS)}, "
        f"their queues (ggt.<actor>, ggt.<actor>.dlq) or {ALL_ACTORS}"
    )


def as_utc(when: datetime) -> datetime:
    """``when`` as an aware UTC datetime (a naive one is taken to be UTC already)."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def matches(letter: DeadLetter, selected: LetterFilter) -> bool:
    """Whether ``letter`` passes every condition of the filter."""
    env = letter.envelope
    if selected.error_code is not None and letter.error_code != selected.error_code:
        return False
    if selected.job_id is not None and env.job_id != selected.job_id:
        return False
    if selected.message_id is not None and env.message_id != selected.message_id:
        return False
    if selected.type is not None and env.type != selected.type:
        return False
    if selected.since is not None or selected.until is not None:
        if letter.dead_lettered_at is None:
            return False
        at = as_utc(letter.dead_lettered_at)
        if selected.since is not None and at < as_utc(selected.since):
            return False
        if selected.until is not None and at >= as_utc(selected.until):
            return False
    return True


def destination(letter: DeadLetter) -> tuple[str, str]:
    """Where a replay goes: the letter's original exchange and routing key.

    A letter without a recorded origin (published by hand into the DLQ) goes back to the queue of
    the actor it was dead-lettered by, through that actor's own routing key. A signed request from
    the public ingress goes straight to the coordinator's queue: its MAC keeps its owner and replay
    count, which the ingress would drop.
    """
    if letter.origin_exchange == REQUESTS_EXCHANGE and letter.authenticated:
        return COMMANDS_EXCHANGE, actor_routing_key(COORDINATOR)
    if letter.origin_routing_key:
        return letter.origin_exchange, letter.origin_routing_key
    return COMMANDS_EXCHANGE, actor_routing_key(letter.actor)


def is_service_destination(exchange: str, routing_key: str) -> bool:
    """Whether a replay may publish there: a command key or ``actor.<actor>`` on ggt.commands, or
    ``convert.<tenant>`` on ggt.requests — never events, reply queues or anything else."""
    if exchange == COMMANDS_EXCHANGE:
        return routing_key in ROUTING_KEYS.values() or routing_key in {actor_routing_key(a) for a in ACTORS}
    return exchange == REQUESTS_EXCHANGE and tenant_of_request(routing_key) is not None


def refusal(letter: DeadLetter, *, max_replays: int) -> str:
    """Why ``letter`` may not be replayed again, or ``""`` when it may."""
    if not letter.authenticated:
        return ("not written by the service: no valid ggt-mac under this GGT_BUS_KEY (forged, or signed with a "
                "key this tool does not hold — add it to GGT_BUS_KEYS_PREVIOUS); purge it")
    done = letter.envelope.replays
    if done >= max_replays:
        return f"replayed {done} times already (cap {max_replays}; raise --max-replays or purge it)"
    exchange, routing_key = destination(letter)
    if not is_service_destination(exchange, routing_key):
        return (f"its origin {exchange or '(default exchange)'}/{routing_key} is not one of the service's "
                "destinations (ggt.commands command keys or actor.<actor>, ggt.requests convert.<tenant>); "
                "purge it")
    return ""


def replay_envelope(letter: DeadLetter) -> Envelope:
    """The envelope of the replayed copy: same id, job, type and creation time; attempt reset,
    replay count + 1, the previous failure's diagnostics dropped (``ggt-first-failure`` kept)."""
    headers = {k: v for k, v in letter.envelope.headers.items() if k not in FAILURE_HEADERS}
    headers[H_REPLAYS] = letter.envelope.replays + 1
    return msgspec.structs.replace(letter.envelope, headers=headers)


# ------------------------------------------------------------------------------------------ shell

T = TypeVar("T")


async def _visit(bus: Bus, *, actor: str, filters: LetterFilter, limit: int | None,
                 handle: Callable[[DeadLetterBatch, int, DeadLetter], Awaitable[T]],
                 report: Callable[[T], None] | None = None) -> list[T]:
    """Run ``handle`` on the first ``limit`` matching letters of each named DLQ, in queue order.

    Each queue is taken whole (to find matches anywhere in it) and every letter ``handle`` did not
    remove is put back in order, also when ``handle`` raises or the call is cancelled. ``report``
    hears each result as it happens, so a caller can tell what was done before a failure.
    """
    outcomes: list[T] = []
    for name in actors_of(actor):
        if limit is not None and len(outcomes) >= limit:
            break
        batch = await bus.take_dead_letters(name)
        try:
            for index, letter in enumerate(batch.letters):
                if limit is not None and len(outcomes) >= limit:
                    break
                if matches(letter, filters):
                    outcomes.append(result := await handle(batch, index, letter))
                    if report is not None:
                        report(result)
        finally:
            await batch.close()
    return outcomes


async def list_letters(bus: Bus, *, actor: str = ALL_ACTORS, filters: LetterFilter = LetterFilter(),
                       limit: int | None = None) -> list[DeadLetter]:
    """The matching dead letters, in queue order; every letter stays where it was."""

    async def keep(batch: DeadLetterBatch, index: int, letter: DeadLetter) -> DeadLetter:
        return letter

    return await _visit(bus, actor=actor, filters=filters, limit=limit, handle=keep)


async def replay(bus: Bus, *, actor: str = ALL_ACTORS, filters: LetterFilter = LetterFilter(),
                 limit: int | None = None, dry_run: bool = False, max_replays: int = DEFAULT_MAX_REPLAYS,
                 report: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Republish the matching letters to their original destinations; remove each after its confirm.

    Letters at the replay cap, or whose publish fails (unroutable, no confirm), stay in the DLQ and
    come back as SKIPPED with the reason. ``limit`` bounds the matching letters considered (refused
    ones count). With ``dry_run`` nothing is published or removed. ``report`` hears each outcome as
    it happens.
    """

    async def replay_one(batch: DeadLetterBatch, index: int, letter: DeadLetter) -> Outcome:
        target = destination(letter)
        if reason := refusal(letter, max_replays=max_replays):
            return Outcome(letter=letter, action=Action.SKIPPED, dry_run=dry_run, destination=target,
                           reason=reason)
        if dry_run:
            return Outcome(letter=letter, action=Action.REPLAYED, dry_run=True, destination=target)
        exchange, routing_key = target
        try:
            await bus.publish_raw(exchange=exchange, routing_key=routing_key, body=letter.body,
                                  envelope=replay_envelope(letter), reply_to=letter.reply_to)
        except BusError as exc:
            return Outcome(letter=letter, action=Action.SKIPPED, destination=target,
                           reason=f"publish failed, letter kept: {exc}")
        await batch.remove(index)  # only after the confirm: a crash before this duplicates, never loses
        return Outcome(letter=letter, action=Action.REPLAYED, destination=target)

    return await _visit(bus, actor=actor, filters=filters, limit=limit, handle=replay_one, report=report)


async def purge(bus: Bus, *, actor: str = ALL_ACTORS, filters: LetterFilter = LetterFilter(),
                limit: int | None = None, dry_run: bool = False,
                report: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Delete the matching letters for good (with ``dry_run``, only say which); ``report`` as for replay."""

    async def purge_one(batch: DeadLetterBatch, index: int, letter: DeadLetter) -> Outcome:
        if not dry_run:
            await batch.remove(index)
        return Outcome(letter=letter, action=Action.PURGED, dry_run=dry_run)

    return await _visit(bus, actor=actor, filters=filters, limit=limit, handle=purge_one, report=report)


#: how an action reads in a report: (done, dry run)
_LABELS = {
    Action.REPLAYED: ("replayed", "would replay"),
    Action.PURGED: ("purged", "would purge"),
    Action.SKIPPED: ("skipped", "skipped"),
}


def label(outcome: Outcome) -> str:
    """The action as a report says it: ``replayed``, ``would replay``, ``skipped`` …"""
    done, planned = _LABELS[outcome.action]
    return planned if outcome.dry_run else done


def summary(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """How many letters each action touched, by ``label``."""
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[label(outcome)] = counts.get(label(outcome), 0) + 1
    return counts
