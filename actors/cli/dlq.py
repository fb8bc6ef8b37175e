"""``getgoodtape dlq list | show | replay | purge``: the operator's hands on the dead-letter queues.

Reads the broker from ``GGT_AMQP_URL`` (the in-memory bus keeps no dead letters across processes,
so these commands need RabbitMQ). The work is done by ``bus.replay``; this module parses, formats
and prints. Exit status: 0 done, 1 something was left undone (a letter skipped, a message not
found, the broker unreachable), 2 a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import aio_pika.exceptions

from actors.bootstrap.wiring import make_bus
from actors.runtime.settings import Settings, load_settings
from bus.base import Bus, BusError, DeadLetter
from bus.replay import (
    ALL_ACTORS,
    DEFAULT_MAX_REPLAYS,
    Action,
    LetterFilter,
    Outcome,
    actors_of,
    as_utc,
    label,
    list_letters,
    purge,
    replay,
    summary,
)

#: characters of an error message shown in the ``list`` table (``show`` prints it whole)
ERROR_MESSAGE_WIDTH = 60

#: exit statuses
EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2

#: relative times for --since/--until: a number and a unit, meaning that long ago
_RELATIVE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

_NO_BROKER = (
    "GGT_AMQP_URL is not set: dead letters live in RabbitMQ's dead-letter queues; the in-memory bus "
    "keeps none across processes, so there is nothing for this command to read. "
    "Set GGT_AMQP_URL=amqp://user:pass@host:5672/ to the broker the actors use."
)


class UsageError(Exception):
    """A command line that cannot be carried out as written (exit status 2)."""


# ------------------------------------------------------------------------------------- pure parts


def parse_when(text: str, *, now: datetime) -> datetime:
    """An ISO 8601 time (naive = UTC) or a relative one (``90s``, ``15m``, ``2h``, ``3d``, ``1w`` ago)."""
    if m := _RELATIVE.match(text.strip()):
        return now - timedelta(seconds=float(m["n"]) * _UNIT_SECONDS[m["unit"]])
    try:
        return as_utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise UsageError(f"not a time: {text!r} (use ISO 8601, e.g. 2025-01-31T12:00:00Z, or 90s/15m/2h/3d/1w)") \
            from None


def filter_of(args: argparse.Namespace, *, now: datetime) -> LetterFilter:
    """The LetterFilter the command line asks for."""
    return LetterFilter(
        error_code=args.error_code,
        job_id=args.job_id,
        message_id=getattr(args, "message_id", None),
        type=args.type,
        since=parse_when(args.since, now=now) if args.since else None,
        until=parse_when(args.until, now=now) if args.until else None,
    )


def redacted(url: str) -> str:
    """A broker URL without its password, fit for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


#: categories a terminal may act on instead of showing: controls (ESC sequences), format characters
#: (bidi overrides that reorder a line), surrogates, line and paragraph separators
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def printable(text: str) -> str:
    """``text`` with every control, format and separator character shown as an escape (``\\x1b``,
    ``\\u202e``): a letter's bytes are anyone's, and they must not drive the operator's terminal."""
    if text.isprintable():
        return text
    return "".join(ch if unicodedata.category(ch) not in _UNPRINTABLE
                   else (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}") for ch in text)


def _plain(lines: Sequence[str]) -> str:
    """Lines made printable and joined: what the operator's terminal is given."""
    return "\n".join(printable(line) for line in lines)


def _when(at: datetime | None) -> str:
    return as_utc(at).strftime("%Y-%m-%d %H:%M:%S") if at else "-"


def _short(text: str, width: int) -> str:
    text = printable(" ".join(text.split()))  # one line per letter, whatever the message holds
    return text if len(text) <= width else text[: width - 1] + "…"


def _target(exchange: str, routing_key: str) -> str:
    return f"{exchange or '(default exchange)'}/{routing_key}"


def letter_json(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as plain JSON data (``--json``)."""
    env = letter.envelope
    return {
        "actor": letter.actor,
        "message_id": env.message_id,
        "job_id": env.job_id,
        "type": env.type,
        "error_code": letter.error_code,
        "error_message": letter.error_message,
        "attempts": env.attempt,
        "replays": env.replays,
        "dead_lettered_at": as_utc(letter.dead_lettered_at).isoformat() if letter.dead_lettered_at else None,
        "created_at": env.created_at.isoformat(),
        "origin_exchange": letter.origin_exchange,
        "origin_routing_key": letter.origin_routing_key,
        "reply_to": letter.reply_to,
        "headers": dict(env.headers),
    }


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    """An outcome as plain JSON data (``--json``)."""
    return {
        "action": label(outcome),
        "reason": outcome.reason,
        "destination": list(outcome.destination) if outcome.destination else None,
        "letter": letter_json(outcome.letter),
    }


def letters_table(letters: Sequence[DeadLetter]) -> list[str]:
    """The ``list`` table: a header line and one line per letter."""
    head = ("MESSAGE ID", "JOB ID", "TYPE", "ACTOR", "ERROR CODE", "ATTEMPTS", "REPLAYS", "DEAD-LETTERED AT (UTC)",
            "ERROR MESSAGE")
    rows = [head]
    for letter in letters:
        env = letter.envelope
        rows.append((env.message_id, env.job_id or "-", env.type or "-", letter.actor, letter.error_code or "-",
                     str(env.attempt), str(env.replays), _when(letter.dead_lettered_at),
                     _short(letter.error_message, ERROR_MESSAGE_WIDTH) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
            for row in rows]


def outcome_line(outcome: Outcome) -> str:
    """One line of a replay or purge report."""
    env, letter = outcome.letter.envelope, outcome.letter
    who = (f"{env.message_id} job={env.job_id or '-'} type={env.type or '-'} actor={letter.actor} "
           f"error={letter.error_code or '-'}")
    if outcome.action is Action.SKIPPED:
        return f"skipped       {who}: {outcome.reason}"
    where = f" → {_target(*outcome.destination)}" if outcome.destination else ""
    return f"{label(outcome):<13} {who}{where}"


def summary_line(outcomes: Sequence[Outcome], *, dry_run: bool) -> str:
    """The last line of a report: counts per action."""
    counts = summary(outcomes)
    parts = ", ".join(f"{name} {count}" for name, count in counts.items()) or "nothing matched"
    prefix = "dry run, nothing changed: " if dry_run else ""
    return f"{prefix}{parts} ({len(outcomes)} matching letter{'s' if len(outcomes) != 1 else ''})"


def show_lines(letter: DeadLetter) -> list[str]:
    """Everything about one letter: envelope, headers, and the body as indented JSON."""
    env = letter.envelope
    lines = [
        f"message id:       {env.message_id}",
        f"job id:           {env.job_id or '-'}",
        f"type:             {env.type or '-'}",
        f"actor:            {letter.actor}",
        f"schema:           {env.schema or '-'}",
        f"created at:       {as_utc(env.created_at).isoformat()}",
        f"dead-lettered at: {as_utc(letter.dead_lettered_at).isoformat() if letter.dead_lettered_at else '-'}",
        f"error:            {letter.error_code or '-'}: {letter.error_message or '-'}",
        f"origin:           {_target(letter.origin_exchange, letter.origin_routing_key)}",
        f"reply to:         {letter.reply_to or '-'}",
        "headers:",
        *(f"  {key}: {value}" for key, value in sorted(env.headers.items())),
        "body:",
    ]
    try:
        lines.append(json.dumps(json.loads(letter.body), indent=2, ensure_ascii=False, sort_keys=True))
    except ValueError:  # an undecodable letter: show what arrived
        lines.append(letter.body.decode("utf-8", "replace"))
    return lines


# --------------------------------------------------------------------------------------- commands


async def _cmd_list(bus: Bus, args: argparse.Namespace, out: TextIO) -> int:
    letters = await list_letters(bus, actor=args.actor, filters=filter_of(args, now=_now()), limit=args.limit)
    if args.json:
        json.dump([letter_json(letter) for letter in letters], out, indent=2)
        print(file=out)
    elif letters:
        print(_plain(letters_table(letters)), file=out)
    else:
        print("no dead letters match", file=out)
    return EXIT_OK


async def _cmd_show(bus: Bus, args: argparse.Namespace, out: TextIO) -> int:
    letters = await list_letters(bus, actor=args.actor, filters=LetterFilter(message_id=args.message_id))
    if not letters:
        print(f"no dead letter with message id {args.message_id} in {args.actor}", file=sys.stderr)
        return EXIT_INCOMPLETE
    if args.json:
        json.dump([{**letter_json(letter), "body": letter.body.decode("utf-8", "replace")} for letter in letters],
                  out, indent=2)
        print(file=out)
        return EXIT_OK
    for n, letter in enumerate(letters):
        if n:
            print("-" * 40, file=out)  # the same id twice: a duplicate, shown whole
        print(_plain(show_lines(letter)), file=out)
    return EXIT_OK


async def _cmd_replay(bus: Bus, args: argparse.Namespace, out: TextIO) -> int:
    outcomes = await replay(bus, actor=args.actor, filters=filter_of(args, now=_now()), limit=args.limit,
                            dry_run=args.dry_run, max_replays=args.max_replays, report=_line_printer(args, out))
    _finish_report(outcomes, args, out)
    return EXIT_INCOMPLETE if any(o.action is Action.SKIPPED for o in outcomes) else EXIT_OK


async def _cmd_purge(bus: Bus, args: argparse.Namespace, out: TextIO) -> int:
    outcomes = await purge(bus, actor=args.actor, filters=filter_of(args, now=_now()), limit=args.limit,
                           dry_run=args.dry_run, report=_line_printer(args, out))
    _finish_report(outcomes, args, out)
    return EXIT_OK


def _line_printer(args: argparse.Namespace, out: TextIO) -> Callable[[Outcome], None] | None:
    """Print each outcome as it happens (so a broker failure midway still shows what was done)."""
    if args.json:
        return None
    return lambda outcome: print(printable(outcome_line(outcome)), file=out, flush=True)


def _finish_report(outcomes: Sequence[Outcome], args: argparse.Namespace, out: TextIO) -> None:
    if args.json:
        json.dump([outcome_json(o) for o in outcomes], out, indent=2)
        print(file=out)
    else:
        print(summary_line(outcomes, dry_run=args.dry_run), file=out)


def _now() -> datetime:
    return datetime.now(UTC)


async def _with_bus(settings: Settings, command: Callable[[Bus], Awaitable[int]]) -> int:
    bus = make_bus(settings, name="getgoodtape/dlq")
    try:
        await bus.start()
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        await bus.close()
        print(f"cannot reach RabbitMQ at {redacted(settings.amqp_url)}: {exc}", file=sys.stderr)
        return EXIT_INCOMPLETE
    try:
        return await command(bus)
    finally:
        await bus.close()


def _run(args: argparse.Namespace) -> int:
    settings = load_settings()
    if not settings.amqp_url:
        print(_NO_BROKER, file=sys.stderr)
        return EXIT_USAGE
    try:
        _check(args)  # a bad actor, time or missing --yes is refused before touching the broker
    except UsageError as exc:
        print(f"getgoodtape dlq: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_with_bus(settings, lambda bus: args.command_fn(bus, args, sys.stdout)))
    except BrokenPipeError:
        # the reader went away (``| head``): the run stopped; what was reported is done, every other
        # letter is back in its queue. Point stdout at devnull so the final flush does not complain.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INCOMPLETE
    except (BusError, OSError, aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError) as exc:
        # letters already settled were reported line by line; every other one is still in its DLQ
        # (the broker puts back what this connection held when it goes away)
        print(f"getgoodtape dlq: the broker failed: {exc!r}; letters not reported above as replayed or "
              f"purged are still in their dead-letter queue", file=sys.stderr)
        return EXIT_INCOMPLETE


def _check(args: argparse.Namespace) -> None:
    """Raise UsageError for a command line that cannot be carried out."""
    try:
        actors_of(args.actor)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.command_fn is not _cmd_show:
        filter_of(args, now=_now())
    if args.command_fn is _cmd_purge and not (args.yes or args.dry_run):
        raise UsageError("purge deletes dead letters for good: add --yes (or look first with --dry-run)")


# ------------------------------------------------------------------------------------------ parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def dlq_arguments(dlq: argparse.ArgumentParser) -> None:
    """The subcommands of ``dlq`` and their arguments."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--actor", "--queue", dest="actor", default=ALL_ACTORS, metavar="ACTOR|QUEUE",
                       help="an actor, its queue (ggt.<actor>) or dead-letter queue (ggt.<actor>.dlq), "
                            "or all (default)")
    where.add_argument("--json", action="store_true", help="machine-readable output")

    select = argparse.ArgumentParser(add_help=False)
    select.add_argument("--error-code", help="only letters with this error code (e.g. storage_unavailable, "
                                             "delivery_limit)")
    select.add_argument("--job-id", help="only letters of this job")
    select.add_argument("--type", help="only letters of this message type (e.g. verify_object)")
    select.add_argument("--since", help="dead-lettered at or after this time (ISO 8601, or 15m/2h/3d ago)")
    select.add_argument("--until", help="dead-lettered before this time (ISO 8601, or 15m/2h/3d ago)")
    select.add_argument("--limit", type=_positive, help="act on at most this many matching letters")

    dlq.description, dlq.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    commands = dlq.add_subparsers(dest="dlq_command", required=True)

    cmd = commands.add_parser("list", parents=[where, select], help="a table of the matching dead letters")
    cmd.set_defaults(fn=_run, command_fn=_cmd_list)

    cmd = commands.add_parser("show", parents=[where], help="headers and body of one dead letter")
    cmd.add_argument("message_id", metavar="MESSAGE_ID")
    cmd.set_defaults(fn=_run, command_fn=_cmd_show)

    cmd = commands.add_parser("replay", parents=[where, select],
                              help="republish matching letters to their original destination")
    cmd.add_argument("--dry-run", action="store_true", help="say what would be replayed; change nothing")
    cmd.add_argument("--max-replays", type=_not_negative, default=DEFAULT_MAX_REPLAYS,
                     help=f"refuse letters already replayed this often (default {DEFAULT_MAX_REPLAYS})")
    cmd.set_defaults(fn=_run, command_fn=_cmd_replay)

    cmd = commands.add_parser("purge", parents=[where, select], help="delete matching letters for good")
    cmd.add_argument("--dry-run", action="store_true", help="say what would be deleted; change nothing")
    cmd.add_argument("--yes", action="store_true", help="really delete (required unless --dry-run)")
    cmd.set_defaults(fn=_run, command_fn=_cmd_purge)
