"""Dead-letter replay: the pure decisions, the library on both buses, and the CLI on the real broker."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from actors import cli
from actors.cli.dlq import UsageError, letters_table, parse_when, redacted
from actors.runtime.settings import Settings
from bus.auth import signed
from bus.base import Bus, DeadLetter, Delivery
from bus.replay import (
    Action,
    LetterFilter,
    Outcome,
    actors_of,
    destination,
    list_letters,
    matches,
    purge,
    refusal,
    replay,
    replay_envelope,
)
from messages.codec import (
    H_ACTOR,
    H_ATTEMPT,
    H_DEAD_LETTERED_AT,
    H_ERROR_CODE,
    H_ERROR_MESSAGE,
    H_FIRST_FAILURE,
    H_ORIGIN_EXCHANGE,
    H_ORIGIN_ROUTING_KEY,
    H_REPLAYS,
    Envelope,
    encode,
    envelope_for,
)
from messages.errors import Error, ErrorCode
from messages.routing import ACTORS, COMMANDS_EXCHANGE, DEAD_LETTER_EXCHANGE
from messages.types import VerifyObject
from tests.support.buses import dead_letters_of, receiving

WAIT = 10.0
#: a fixed clock for planted letters, so time windows are exact
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def verify(job: str) -> VerifyObject:
    return VerifyObject(job_id=job, key=f"converted/{job}.mp3", size=1, etag="e", content_type="audio/mpeg",
                        format="mp3", duration=1.0)


async def plant(bus: Bus, job: str, *, code: str = "internal", at: datetime = T0, replays: int = 0,
                routing_key: str = "verify_object", reply_to: str | None = None) -> Envelope:
    """Put a letter into the verifier's DLQ exactly as Delivery.dead_letter would, with a chosen time."""
    message = verify(job)
    headers: dict[str, str | int] = {
        H_ERROR_CODE: code, H_ERROR_MESSAGE: f"{code} happened to {job}", H_ACTOR: "verifier", H_ATTEMPT: 3,
        H_ORIGIN_EXCHANGE: COMMANDS_EXCHANGE, H_ORIGIN_ROUTING_KEY: routing_key,
        H_FIRST_FAILURE: (at - timedelta(minutes=5)).isoformat(), H_DEAD_LETTERED_AT: at.isoformat(),
    }
    if replays:
        headers[H_REPLAYS] = replays
    assert bus.keys is not None
    env = signed(bus.keys, envelope_for(message, headers=headers), encode(message))  # the service wrote it
    await bus.publish_raw(exchange=DEAD_LETTER_EXCHANGE, routing_key="verifier", body=encode(message),
                          envelope=env, reply_to=reply_to)
    return env


async def dlq_jobs(bus: Bus, actor: str = "verifier") -> list[str]:
    """Job ids in the DLQ, in queue order, read straight from the bus (left in place)."""
    batch = await bus.take_dead_letters(actor)
    try:
        return [letter.envelope.job_id for letter in batch.letters]
    finally:
        await batch.close()


async def arrivals(got: asyncio.Queue[Delivery], count: int) -> list[Delivery]:
    """The next ``count`` deliveries, acked."""
    out = []
    for _ in range(count):
        d = await asyncio.wait_for(got.get(), WAIT)
        await d.ack()
        out.append(d)
    return out


def letter(*, job: str = "j1", code: str = "internal", at: datetime | None = T0, replays: int = 0,
           origin: tuple[str, str] = (COMMANDS_EXCHANGE, "verify_object")) -> DeadLetter:
    headers: dict[str, str | int] = {H_ATTEMPT: 4, H_ERROR_CODE: code, H_ERROR_MESSAGE: "boom", H_ACTOR: "verifier",
                                     H_ORIGIN_EXCHANGE: origin[0], H_ORIGIN_ROUTING_KEY: origin[1],
                                     H_FIRST_FAILURE: "2025-03-01T11:00:00+00:00",
                                     H_DEAD_LETTERED_AT: "2025-03-01T12:00:00+00:00", "ggt-other": "kept"}
    if replays:
        headers[H_REPLAYS] = replays
    return DeadLetter(actor="verifier", envelope=envelope_for(verify(job), headers=headers), body=b"{}",
                      error_code=code, error_message="boom", origin_exchange=origin[0],
                      origin_routing_key=origin[1], dead_lettered_at=at, authenticated=True)


# ---------------------------------------------------------------------------------- pure decisions


def test_filter_matches_on_every_field_it_names() -> None:
    one = letter(job="job-a", code="timeout")
    assert matches(one, LetterFilter())
    assert matches(one, LetterFilter(error_code="timeout", job_id="job-a", type="verify_object"))
    assert not matches(one, LetterFilter(error_code="internal"))
    assert not matches(one, LetterFilter(job_id="job-b"))
    assert not matches(one, LetterFilter(type="resolve_media"))
    assert matches(one, LetterFilter(message_id=one.envelope.message_id))
    assert not matches(one, LetterFilter(message_id="0" * 32))


def test_time_window_includes_since_excludes_until_and_reads_naive_times_as_utc() -> None:
    one = letter(at=T0)
    assert matches(one, LetterFilter(since=T0, until=T0 + timedelta(seconds=1)))
    assert not matches(one, LetterFilter(until=T0))
    assert not matches(one, LetterFilter(since=T0 + timedelta(microseconds=1)))
    assert matches(one, LetterFilter(since=datetime(2025, 3, 1, 12, 0)))  # naive = UTC
    assert matches(letter(at=datetime(2025, 3, 1, 12, 0)), LetterFilter(since=T0))
    later_zone = T0.astimezone(timezone(timedelta(hours=2)))
    assert matches(one, LetterFilter(since=later_zone, until=later_zone + timedelta(hours=1)))


def test_a_letter_without_a_dead_letter_time_never_matches_a_time_window() -> None:
    assert matches(letter(at=None), LetterFilter())
    assert not matches(letter(at=None), LetterFilter(since=T0 - timedelta(days=1)))


def test_replay_envelope_keeps_identity_resets_attempt_counts_replays_and_drops_diagnostics() -> None:
    one = letter(replays=1)
    env = replay_envelope(one)
    assert (env.message_id, env.job_id, env.type, env.created_at) == (
        one.envelope.message_id, one.envelope.job_id, one.envelope.type, one.envelope.created_at)
    assert env.attempt == 1 and H_ATTEMPT not in env.headers
    assert env.replays == 2
    for gone in (H_ERROR_CODE, H_ERROR_MESSAGE, H_ACTOR, H_ORIGIN_EXCHANGE, H_ORIGIN_ROUTING_KEY,
                 H_DEAD_LETTERED_AT):
        assert gone not in env.headers
    assert env.headers[H_FIRST_FAILURE] == "2025-03-01T11:00:00+00:00"
    assert env.headers["ggt-other"] == "kept"


def test_replay_is_refused_at_the_cap_and_allowed_below_it() -> None:
    assert refusal(letter(replays=2), max_replays=3) == ""
    assert "3 times" in refusal(letter(replays=3), max_replays=3)
    assert refusal(letter(replays=0), max_replays=0) != ""


def test_destination_is_the_origin_or_the_actor_key_when_none_was_recorded() -> None:
    assert destination(letter()) == (COMMANDS_EXCHANGE, "verify_object")
    assert destination(letter(origin=("", ""))) == (COMMANDS_EXCHANGE, "actor.verifier")


def test_actor_names_queues_and_all_resolve_to_actors() -> None:
    assert actors_of("all") == ACTORS
    assert actors_of("verifier") == ("verifier",)
    assert actors_of("ggt.verifier.dlq") == ("verifier",)
    assert actors_of("ggt.uploader") == ("uploader",)
    with pytest.raises(ValueError, match="unknown actor"):
        actors_of("ggt.nobody.dlq")


def test_since_and_until_take_iso_times_or_durations_ago() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_when("2h", now=now) == now - timedelta(hours=2)
    assert parse_when("90s", now=now) == now - timedelta(seconds=90)
    assert parse_when("1w", now=now) == now - timedelta(days=7)
    assert parse_when("2025-02-01T08:00:00Z", now=now) == datetime(2025, 2, 1, 8, tzinfo=UTC)
    assert parse_when("2025-02-01", now=now) == datetime(2025, 2, 1, tzinfo=UTC)
    with pytest.raises(UsageError):
        parse_when("yesterday", now=now)


def test_list_table_truncates_long_error_messages_to_one_line() -> None:
    long = msgspec.structs.replace(letter(), error_message="line one\nline two " + "x" * 200)
    lines = letters_table([long])
    assert lines[0].split()[:3] == ["MESSAGE", "ID", "JOB"]
    assert len(lines) == 2 and "line one line two" in lines[1] and lines[1].endswith("…")
    assert long.envelope.message_id in lines[1]


def test_broker_password_never_reaches_an_error_message() -> None:
    assert redacted("amqp://ggt:s3cret@127.0.0.1:5672/vh") == "amqp://ggt:***@127.0.0.1:5672/vh"
    assert redacted("amqp://127.0.0.1/") == "amqp://127.0.0.1/"


# ------------------------------------------------------------------------------ library, both buses


async def test_dead_lettered_message_is_replayed_to_its_origin_with_same_id_attempt_reset_and_one_replay(
        bus: Bus) -> None:
    reply_queue = "test.reply.replay"
    env = await bus.publish(verify("job-replay-1"), headers={H_ATTEMPT: 3}, reply_to=reply_queue)
    async with receiving(bus, "verifier") as got:
        d = await asyncio.wait_for(got.get(), WAIT)
        await d.dead_letter(actor="verifier", error=Error.of(ErrorCode.STORAGE_UNAVAILABLE, "s3 down"))
    first_failure = (await dead_letters_of(bus, "verifier", count=1))[0].envelope.headers[H_FIRST_FAILURE]

    outcomes = await replay(bus, actor="verifier", filters=LetterFilter())

    assert [(o.action, o.destination) for o in outcomes] == [(Action.REPLAYED, (COMMANDS_EXCHANGE, "verify_object"))]
    assert await dlq_jobs(bus) == [], "the replayed letter is gone from the DLQ"
    async with receiving(bus, "verifier") as got:
        [again] = await arrivals(got, 1)
    assert again.routing_key == "verify_object"
    assert again.envelope.message_id == env.message_id
    assert again.envelope.job_id == "job-replay-1"
    assert again.envelope.attempt == 1
    assert again.envelope.headers[H_REPLAYS] == 1
    assert again.reply_to == reply_queue
    assert again.body == encode(verify("job-replay-1"))
    for gone in (H_ERROR_CODE, H_ERROR_MESSAGE, H_ACTOR, H_DEAD_LETTERED_AT, H_ORIGIN_ROUTING_KEY):
        assert gone not in again.envelope.headers
    assert again.envelope.headers[H_FIRST_FAILURE] == first_failure, "first failure kept for history"


async def test_broker_dead_letter_after_the_delivery_limit_is_replayed_to_its_original_routing_key(
        bus: Bus) -> None:
    env = await bus.publish(verify("job-crashloop-replay"))
    async with receiving(bus, "verifier") as got:
        for _ in range(bus.topology.delivery_limit + 1):
            d = await asyncio.wait_for(got.get(), WAIT)
            await d.release()
        [dead] = await dead_letters_of(bus, "verifier", count=1)
        assert dead.error_code == "delivery_limit"

        outcomes = await replay(bus, actor="ggt.verifier.dlq", filters=LetterFilter(error_code="delivery_limit"))

        assert [o.destination for o in outcomes] == [(COMMANDS_EXCHANGE, "verify_object")]
        [again] = await arrivals(got, 1)
    assert again.envelope.message_id == env.message_id
    assert again.routing_key == "verify_object"
    assert again.delivery_count == 0
    assert again.envelope.replays == 1
    assert await dlq_jobs(bus) == []


@pytest.mark.parametrize(("filters", "chosen"), [
    (LetterFilter(error_code="storage_unavailable"), ["job-b", "job-d"]),
    (LetterFilter(job_id="job-c"), ["job-c"]),
    (LetterFilter(since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=3)), ["job-b", "job-c"]),
    (LetterFilter(error_code="storage_unavailable", since=T0 + timedelta(hours=2)), ["job-d"]),
], ids=["error-code", "job-id", "time-window", "code-and-since"])
async def test_filters_replay_only_matching_letters_and_leave_the_rest_in_order(
        bus: Bus, filters: LetterFilter, chosen: list[str]) -> None:
    planted = {"job-a": "internal", "job-b": "storage_unavailable", "job-c": "timeout",
               "job-d": "storage_unavailable", "job-e": "internal"}
    for hours, (job, code) in enumerate(planted.items()):
        await plant(bus, job, code=code, at=T0 + timedelta(hours=hours))

    outcomes = await replay(bus, actor="verifier", filters=filters)

    assert [o.letter.envelope.job_id for o in outcomes] == chosen
    assert all(o.action is Action.REPLAYED for o in outcomes)
    assert await dlq_jobs(bus) == [job for job in planted if job not in chosen]
    async with receiving(bus, "verifier") as got:
        assert sorted(d.envelope.job_id for d in await arrivals(got, len(chosen))) == sorted(chosen)


async def test_dry_run_replays_nothing_and_leaves_every_letter_in_place(bus: Bus) -> None:
    for job in ("job-1", "job-2", "job-3"):
        await plant(bus, job)

    outcomes = await replay(bus, actor="all", filters=LetterFilter(), dry_run=True)
    purged = await purge(bus, actor="all", filters=LetterFilter(), dry_run=True)

    assert [(o.action, o.dry_run) for o in outcomes] == [(Action.REPLAYED, True)] * 3
    assert [(o.action, o.dry_run) for o in purged] == [(Action.PURGED, True)] * 3
    assert await dlq_jobs(bus) == ["job-1", "job-2", "job-3"]
    depths = await bus.queue_depths()
    assert depths["ggt.verifier"] == 0, "nothing was published"


async def test_limit_replays_only_the_first_matching_letters(bus: Bus) -> None:
    for job in ("job-1", "job-2", "job-3", "job-4"):
        await plant(bus, job, code="timeout" if job != "job-1" else "internal")

    outcomes = await replay(bus, actor="verifier", filters=LetterFilter(error_code="timeout"), limit=2)

    assert [o.letter.envelope.job_id for o in outcomes] == ["job-2", "job-3"]
    assert await dlq_jobs(bus) == ["job-1", "job-4"]
    async with receiving(bus, "verifier") as got:
        assert sorted(d.envelope.job_id for d in await arrivals(got, 2)) == ["job-2", "job-3"]


async def test_replay_above_the_cap_is_refused_and_the_letter_stays(bus: Bus) -> None:
    await plant(bus, "job-tired", replays=3)
    await plant(bus, "job-fresh", replays=2)

    outcomes = await replay(bus, actor="verifier", filters=LetterFilter())

    assert [(o.letter.envelope.job_id, o.action) for o in outcomes] == [
        ("job-tired", Action.SKIPPED), ("job-fresh", Action.REPLAYED)]
    assert "cap 3" in outcomes[0].reason
    assert await dlq_jobs(bus) == ["job-tired"]
    async with receiving(bus, "verifier") as got:
        [fresh] = await arrivals(got, 1)
    assert fresh.envelope.job_id == "job-fresh" and fresh.envelope.replays == 3

    raised = await replay(bus, actor="verifier", filters=LetterFilter(), max_replays=4)
    assert [o.action for o in raised] == [Action.REPLAYED], "a higher cap lets it through"
    assert await dlq_jobs(bus) == []


async def test_an_origin_that_is_not_a_service_destination_keeps_the_letter_and_reports_why(bus: Bus) -> None:
    await plant(bus, "job-lost", routing_key="nobody-listens-here")
    await plant(bus, "job-ok")

    heard: list[Outcome] = []
    outcomes = await replay(bus, actor="verifier", filters=LetterFilter(), report=heard.append)

    assert [o.action for o in outcomes] == [Action.SKIPPED, Action.REPLAYED]
    assert "not one of the service's destinations" in outcomes[0].reason
    assert heard == outcomes, "each outcome is reported as it happens"
    assert await dlq_jobs(bus) == ["job-lost"]


async def test_a_publish_that_fails_keeps_the_letter_and_reports_why(bus: Bus, monkeypatch) -> None:
    from bus.base import Unroutable

    await plant(bus, "job-lost")
    await plant(bus, "job-ok")
    real = bus.publish_raw

    async def refuse_job_lost(**kw):
        if kw["envelope"].job_id == "job-lost":
            raise Unroutable("no queue bound (test)")
        await real(**kw)

    monkeypatch.setattr(bus, "publish_raw", refuse_job_lost)
    heard: list[Outcome] = []
    outcomes = await replay(bus, actor="verifier", filters=LetterFilter(), report=heard.append)

    assert [o.action for o in outcomes] == [Action.SKIPPED, Action.REPLAYED]
    assert "publish failed" in outcomes[0].reason
    assert heard == outcomes, "each outcome is reported as it happens"
    assert await dlq_jobs(bus) == ["job-lost"]


async def test_purge_removes_only_matching_letters(bus: Bus) -> None:
    for job, code in (("job-1", "internal"), ("job-2", "undecodable_message"), ("job-3", "internal"),
                      ("job-4", "undecodable_message")):
        await plant(bus, job, code=code)

    outcomes = await purge(bus, actor="all", filters=LetterFilter(error_code="undecodable_message"))

    assert [(o.letter.envelope.job_id, o.action) for o in outcomes] == [("job-2", Action.PURGED),
                                                                         ("job-4", Action.PURGED)]
    assert await dlq_jobs(bus) == ["job-1", "job-3"]
    assert (await bus.queue_depths())["ggt.verifier"] == 0, "purged letters are not replayed"


async def test_list_shows_matching_letters_across_actors_and_moves_nothing(bus: Bus) -> None:
    await plant(bus, "job-1")
    await plant(bus, "job-2", code="timeout")
    listed = await list_letters(bus, actor="all", filters=LetterFilter(error_code="timeout"))
    assert [one.envelope.job_id for one in listed] == ["job-2"]
    assert listed[0].dead_lettered_at == T0
    assert await dlq_jobs(bus) == ["job-1", "job-2"]


# ------------------------------------------------------------------------------- the CLI, on RabbitMQ


def _point_cli_at(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """The CLI reads GGT_*: give it the test broker and the test topology (queue arguments must agree)."""
    monkeypatch.setenv("GGT_AMQP_URL", settings.amqp_url)
    monkeypatch.setenv("GGT_RETRY_DELAYS", ",".join(str(d) for d in settings.retry_delays))
    monkeypatch.setenv("GGT_DELIVERY_LIMIT", str(settings.delivery_limit))
    monkeypatch.setenv("GGT_BUS_KEY", settings.bus_key)


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``getgoodtape *argv`` in-process (in a thread: the CLI runs its own event loop)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_lists_shows_and_replays_dead_letters_on_the_broker(
        rabbit_bus: Bus, rabbit_settings: Settings, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _point_cli_at(monkeypatch, rabbit_settings)
    one = await plant(rabbit_bus, "job-cli-1", code="storage_unavailable")
    two = await plant(rabbit_bus, "job-cli-2", code="timeout", replays=3)

    code, out, _ = await run_cli(capsys, "dlq", "list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["message_id"], r["job_id"], r["error_code"], r["attempts"], r["replays"]) for r in rows] == [
        (one.message_id, "job-cli-1", "storage_unavailable", 3, 0), (two.message_id, "job-cli-2", "timeout", 3, 3)]

    code, out, _ = await run_cli(capsys, "dlq", "list", "--queue", "ggt.verifier.dlq")
    assert code == 0
    assert "MESSAGE ID" in out and one.message_id in out and two.message_id in out
    assert "storage_unavailable happened to job-cli-1" in out

    code, out, _ = await run_cli(capsys, "dlq", "show", one.message_id)
    assert code == 0
    assert f"{H_ERROR_CODE}: storage_unavailable" in out
    assert '  "job_id": "job-cli-1",' in out, "the body is pretty-printed JSON"

    code, out, _ = await run_cli(capsys, "dlq", "replay", "--dry-run")
    assert code == 1, "a refused letter makes the run incomplete"
    assert "would replay" in out and "dry run, nothing changed" in out
    assert await dlq_jobs(rabbit_bus) == ["job-cli-1", "job-cli-2"]

    code, out, _ = await run_cli(capsys, "dlq", "replay", "--actor", "verifier")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("replayed") and one.message_id in lines[0] and "job=job-cli-1" in lines[0]
    assert "→ ggt.commands/verify_object" in lines[0]
    assert lines[1].startswith("skipped") and two.message_id in lines[1] and "cap 3" in lines[1]
    assert lines[2].startswith("replayed 1, skipped 1")
    assert await dlq_jobs(rabbit_bus) == ["job-cli-2"]
    async with receiving(rabbit_bus, "verifier") as got:
        [again] = await arrivals(got, 1)
    assert again.envelope.message_id == one.message_id and again.envelope.replays == 1

    code, _, err = await run_cli(capsys, "dlq", "purge", "--job-id", "job-cli-2")
    assert code == 2 and "--yes" in err
    assert await dlq_jobs(rabbit_bus) == ["job-cli-2"]
    code, out, _ = await run_cli(capsys, "dlq", "purge", "--job-id", "job-cli-2", "--yes")
    assert code == 0 and "purged 1" in out
    assert await dlq_jobs(rabbit_bus) == []

    code, _, err = await run_cli(capsys, "dlq", "show", one.message_id)
    assert code == 1 and "no dead letter" in err


async def test_cli_refuses_without_a_broker_url_and_says_why(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("GGT_AMQP_URL", raising=False)
    code, _, err = await run_cli(capsys, "dlq", "list")
    assert code == 2 and "GGT_AMQP_URL is not set" in err and "in-memory bus" in err


async def test_cli_rejects_a_bad_time_or_actor_before_touching_the_broker(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GGT_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")  # nothing listens there
    code, _, err = await run_cli(capsys, "dlq", "replay", "--since", "yesterday")
    assert code == 2 and "not a time" in err
    code, _, err = await run_cli(capsys, "dlq", "list", "--actor", "nobody")
    assert code == 2 and "unknown actor" in err


async def test_dead_letter_queues_are_declared_without_ttl_or_length_limit(rabbit_bus: Bus) -> None:
    """RabbitMQ refuses a redeclaration whose arguments differ: this one names no TTL and no limit,
    so it succeeds only while the bus declares the DLQs that way (letters never expire silently)."""
    import aio_pika

    from bus.rabbit import RabbitBus

    assert isinstance(rabbit_bus, RabbitBus)
    connection = await aio_pika.connect(rabbit_bus.url)
    async with connection:
        channel = await connection.channel()
        for actor in ACTORS:
            await channel.declare_queue(f"ggt.{actor}.dlq", durable=True, arguments={"x-queue-type": "classic"})
