"""The wire contract: strict decoding with named fields, schema export, error codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from messages.codec import DecodeError, check_schema, decode, encode
from messages.errors import ERRORS, Error, ErrorCode
from messages.schema import public_schemas
from messages.types import MESSAGE_TYPES, ConvertRequested, Format, JobFailed, Stage

ROOT = Path(__file__).resolve().parents[2]


def test_convert_requested_round_trips_as_json_with_its_type_tag():
    message = ConvertRequested(url="https://example.com/a", format=Format.MP3, quality="192", job_id="order-4711")
    body = encode(message)
    assert json.loads(body)["type"] == "convert_requested"
    assert decode(body) == message


def test_a_hand_written_request_without_type_decodes_when_the_amqp_type_names_it():
    body = b'{"url": "https://example.com/a.mp4", "format": "m4a"}'
    message = decode(body, type_name_hint="convert_requested")
    assert isinstance(message, ConvertRequested) and message.format is Format.M4A


@pytest.mark.parametrize(
    ("body", "hint", "field"),
    [
        (b'{"type": "no_such_type"}', None, "$.type"),
        (b'{"url": "x"}', None, "$.type"),
        (b'{}', "nonsense", "type"),
        (b'{"url": "https://e.com", "format": "mp9"}', "convert_requested", "$.format"),
        (b'{"url": 42, "format": "mp3"}', "convert_requested", "$.url"),
        (b'{"format": "mp3"}', "convert_requested", "$.url"),
        (b'{"url": "https://e.com", "format": "mp3", "start": -1}', "convert_requested", "$.start"),
        (b'{"url": "https://e.com", "format": "mp3", "job_id": "a b"}', "convert_requested", "$.job_id"),
        (b'{"type":"step_failed","job_id":"abcdefgh1","step":"x","error":{"code":"timeout","message":"m"}}',
         None, "$.error.retryable"),
    ],
)
def test_strict_decoding_names_the_offending_field(body, hint, field):
    with pytest.raises(DecodeError) as err:
        decode(body, type_name_hint=hint)
    assert err.value.field == field


def test_invalid_json_is_a_decode_error():
    with pytest.raises(DecodeError, match="not valid JSON"):
        decode(b"{nope", type_name_hint="convert_requested")


def test_a_newer_major_schema_version_is_refused_and_a_newer_minor_accepted():
    check_schema("1.7")
    with pytest.raises(DecodeError, match="newer") as err:
        check_schema("2.0")
    assert err.value.field == "headers.ggt-schema"


def test_unknown_fields_of_a_newer_minor_version_are_ignored():
    body = b'{"url": "https://e.com/a", "format": "mp3", "future_option": true}'
    assert decode(body, type_name_hint="convert_requested").url == "https://e.com/a"


def test_an_oversized_body_is_refused_unread():
    with pytest.raises(DecodeError, match="exceeds"):
        decode(b" " * (1024 * 1024 + 1), type_name_hint="convert_requested")


def test_every_message_type_is_frozen_and_tagged():
    tags = [t.__struct_config__.tag for t in MESSAGE_TYPES]
    assert len(set(tags)) == len(tags)
    assert all(t.__struct_config__.frozen for t in MESSAGE_TYPES)


def test_every_error_code_has_a_message_that_says_what_to_do():
    assert set(ERRORS) == set(ErrorCode)
    for code, spec in ERRORS.items():
        assert len(spec.message) > 20, code
    failed = JobFailed(job_id="order-4711", error=Error.of(ErrorCode.TOO_LONG, "3 h"), stage=Stage.PREPARING)
    assert json.loads(encode(failed))["error"] == {
        "code": "too_long", "message": ERRORS[ErrorCode.TOO_LONG].message, "retryable": False, "detail": "3 h"}


def test_committed_json_schemas_match_the_structs():
    for name, schema in public_schemas().items():
        committed = json.loads((ROOT / "docs" / "schema" / f"{name}.schema.json").read_text())
        assert committed == schema, f"docs/schema is stale: run `getgoodtape schema -o docs/schema` ({name})"


def test_the_schema_command_writes_every_public_message(tmp_path):
    from actors.cli import main

    assert main(["schema", "-o", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(f"{n}.schema.json" for n in ("convert_requested", "job_progress", "job_completed",
                                                          "job_failed"))
    schema = json.loads((tmp_path / "convert_requested.schema.json").read_text())
    assert {"url", "format"} <= set(schema["required"])


def test_every_error_code_is_documented_in_messages_md():
    from messages.errors import ErrorCode

    table = (ROOT / "docs" / "MESSAGES.md").read_text()
    missing = [code.value for code in ErrorCode if f"| `{code.value}` |" not in table]
    assert not missing, f"docs/MESSAGES.md lacks error codes {missing}"


def test_storage_repeats_exactly_the_job_id_shape_of_the_wire_contract() -> None:
    from messages.types import JOB_ID_SHAPE
    from storage.keys import JOB_ID_PATTERN

    assert JOB_ID_PATTERN.pattern == f"^{JOB_ID_SHAPE}$"
