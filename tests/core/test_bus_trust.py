"""Trust on the bus as values: MACs, admission, request hints, provisioning lines, printable letters;
and the coordinator answering a request that cannot become a job."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from actors.cli.dlq import letters_table, printable, show_lines
from actors.cli.provision import integrator_commands, service_commands, shell_lines
from bus.auth import BusKeys, mac, signed, verify
from bus.base import DeadLetter, admit
from messages.codec import H_MAC, H_OWNER, DecodeError, decode, encode, envelope_for, request_hints
from messages.routing import COMMANDS_EXCHANGE, REQUESTS_EXCHANGE, event_routing_key, tenant_of_request
from messages.types import ConvertRequested, JobFailed, JobProgress, Stage, VerifyObject
from tests.fixtures.pipeline import JOB_TIMEOUT

KEY_A, KEY_B = "a" * 40, "b" * 40


def verify_object(job: str = "job-mac-0001") -> VerifyObject:
    return VerifyObject(job_id=job, key=f"converted/{job}.mp3", size=1, etag="e", content_type="audio/mpeg",
                        format="mp3", duration=1.0)


# ------------------------------------------------------------------------------------------ MAC


def test_a_mac_covers_type_ids_schema_owner_and_body_but_not_the_counters() -> None:
    keys = BusKeys.of(KEY_A)
    body = encode(verify_object())
    env = signed(keys, envelope_for(verify_object(), headers={H_OWNER: "acme"}), body)
    assert verify(keys, env, body)
    retried = msgspec.structs.replace(env, headers={**env.headers, "ggt-attempt": 3, "ggt-replays": 1})
    assert verify(keys, retried, body), "retry and replay headers are outside the MAC"
    for changed in (msgspec.structs.replace(env, type="stream_to_storage"),
                    msgspec.structs.replace(env, message_id="other"),
                    msgspec.structs.replace(env, job_id="job-other-01"),
                    msgspec.structs.replace(env, schema="2.0"),
                    msgspec.structs.replace(env, headers={**env.headers, H_OWNER: "victim"})):
        assert not verify(keys, changed, body)
    assert not verify(keys, env, body + b" ")


def test_rotation_signs_with_the_current_key_and_verifies_with_any() -> None:
    old, rotating, new_only = BusKeys.of(KEY_A), BusKeys.of(KEY_B, (KEY_A,)), BusKeys.of(KEY_B)
    body = encode(verify_object())
    by_old = signed(old, envelope_for(verify_object()), body)
    assert verify(rotating, by_old, body), "a process on the new key still accepts the old one"
    by_rotating = signed(rotating, envelope_for(verify_object()), body)
    assert by_rotating.headers[H_MAC] == mac(KEY_B.encode(), by_rotating, body)
    assert verify(old, by_rotating, body) is False and verify(new_only, by_rotating, body)


def test_a_short_bus_key_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        BusKeys.of("short")


def test_admission_takes_the_owner_from_the_routing_key_never_a_header() -> None:
    keys = BusKeys.random()
    request = ConvertRequested(url="http://127.0.0.1/a.mp4", format="mp3")
    forged = signed(keys, envelope_for(request, headers={H_OWNER: "victim"}), encode(request))
    env, ok = admit(forged, encode(request), exchange=REQUESTS_EXCHANGE, routing_key="convert.acme", keys=keys)
    assert ok and env.headers == {H_OWNER: "acme"}
    env, ok = admit(forged, encode(request), exchange=COMMANDS_EXCHANGE, routing_key="actor.coordinator", keys=keys)
    assert ok and env.owner == "victim", "on ggt.commands the owner is the one the MAC covers"
    assert tenant_of_request("convert.acme.extra") is None and tenant_of_request("convert.") is None


def test_events_are_keyed_by_owner_with_the_default_tenant_for_none() -> None:
    progress = JobProgress(job_id="job-keyed-01", stage=Stage.PREPARING, percent=0.0)
    assert event_routing_key(progress, "acme") == "job.acme.job-keyed-01.progress"
    assert event_routing_key(progress) == "job.default.job-keyed-01.progress"


# ------------------------------------------------------------------------------------ decoding


def test_a_job_id_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(DecodeError, match="job_id"):
        decode(json.dumps({"type": "convert_requested", "url": "http://x/a", "format": "mp3",
                           "job_id": "job-newline1\n"}).encode())


def test_deeply_nested_json_is_a_decode_error() -> None:
    body = (b'{"type":"convert_requested","url":"http://x/a","format":"mp3","x":'
            + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(DecodeError):
        decode(body)
    assert request_hints(body) is None


def test_request_hints_name_only_valid_job_ids_and_reply_queues() -> None:
    hints = request_hints(b'{"job_id": "order-4711", "reply_to": "integrator.acme.replies", "format": "mp5"}')
    assert hints is not None and (hints.job_id, hints.reply_to) == ("order-4711", "integrator.acme.replies")
    bad_reply = request_hints(b'{"job_id": "order-4711", "reply_to": "no spaces allowed"}')
    assert bad_reply is not None and bad_reply.reply_to is None
    assert request_hints(b'{"job_id": "x"}') is None and request_hints(b"[1]") is None
    assert request_hints(b"not json") is None


# -------------------------------------------------------------------------------- provisioning


def test_the_integrator_lines_grant_its_own_queues_requests_and_its_events_only() -> None:
    lines = shell_lines(integrator_commands("acme", vhost="/", password="pw"))
    assert lines == [
        "rabbitmqctl add_user integrator-acme pw",
        "rabbitmqctl set_permissions -p / integrator-acme '^integrator\\.acme\\..*$' "
        "'^(ggt\\.requests|integrator\\.acme\\..*)$' '^(ggt\\.events|integrator\\.acme\\..*)$'",
        "rabbitmqctl set_topic_permissions -p / integrator-acme ggt.requests '^convert\\.acme$' '^$'",
        "rabbitmqctl set_topic_permissions -p / integrator-acme ggt.events '^$' '^job\\.acme\\.'",
    ]
    with pytest.raises(ValueError):
        integrator_commands("Acme.*", password="pw")
    for reserved in ("default", "key-0123abcd"):  # the CLI's tenant and a bare API key's are the service's
        with pytest.raises(ValueError, match="reserved"):
            integrator_commands(reserved, password="pw")
    assert service_commands(password="pw")[1][-3:] == [r"^(ggt\..*|amq\..*)$"] * 3


def test_the_compose_provisioning_script_runs_the_documented_lines() -> None:
    from pathlib import Path

    script = (Path(__file__).resolve().parents[2] / "docker" / "rabbitmq-provision.sh").read_text()
    for line in shell_lines(integrator_commands("example", vhost="/", password="PW"))[1:]:
        assert line in script, line
    for line in shell_lines(service_commands(vhost="/", password="PW"))[1:]:
        assert line in script, line


# ------------------------------------------------------------------------------ dlq printing


def test_dlq_output_shows_control_characters_escaped() -> None:
    assert printable("ok \x1b]0;pwned\x07 \u202e \x9b") == "ok \\x1b]0;pwned\\x07 \\u202e \\x9b"
    hostile = "\x1b[2J[bold red]x[/]\u2028"
    letter = DeadLetter(actor="verifier", envelope=envelope_for(verify_object(), headers={"ggt-x": hostile}),
                        body=json.dumps({"k": hostile}).encode() + b"\x1b", error_code="internal",
                        error_message=hostile, origin_exchange=hostile, origin_routing_key="k", dead_lettered_at=None)
    from actors.cli.dlq import _plain

    for text in (_plain(show_lines(letter)), _plain(letters_table([letter]))):
        assert "\x1b" not in text and "\u2028" not in text and "\\x1b" in text


# ------------------------------------------------------------- a request that cannot become a job


async def test_a_request_for_mp5_is_answered_with_invalid_request_naming_the_field(pipeline) -> None:
    bus = pipeline.bus
    await bus.declare_reply_queue("integrator.acme.replies")
    body = json.dumps({"type": "convert_requested", "url": "http://127.0.0.1/a.mp4", "format": "mp5",
                       "job_id": "order-mp5-0001", "reply_to": "integrator.acme.replies"}).encode()
    request = ConvertRequested(url="http://127.0.0.1/a.mp4", format="mp3")
    async with bus.subscribe("job.acme.#") as mine:
        await bus.publish_raw(exchange=REQUESTS_EXCHANGE, routing_key="convert.acme", body=body,
                              envelope=envelope_for(request))
        final = await pipeline.final("order-mp5-0001", timeout=JOB_TIMEOUT)
        env, _ = await asyncio.wait_for(anext(mine), JOB_TIMEOUT)
    assert isinstance(final, JobFailed) and final.error.code == "invalid_request"
    assert "$.format" in final.error.detail
    assert env.owner == "acme", "the answer goes to the requesting tenant's events"
    async with bus.subscribe(queue="integrator.acme.replies") as replies:
        _, reply = await asyncio.wait_for(anext(replies), JOB_TIMEOUT)
    assert decode(reply) == final
