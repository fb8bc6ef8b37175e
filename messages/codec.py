"""JSON on the wire, strict decoding, and the envelope carried in AMQP properties and headers."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime

import msgspec

from messages.types import TYPES_BY_NAME, Base, JobId, Message, ReplyTo, type_name

#: MAJOR.MINOR of the wire contract. A newer MINOR only adds optional fields; a newer MAJOR is refused.
SCHEMA_VERSION = "1.1"
SCHEMA_MAJOR = 1
CONTENT_TYPE = "application/json"

#: Largest message body accepted on consume; bigger ones are dead-lettered unread.
MAX_BODY_BYTES = 1024 * 1024
#: how much of an oversized body its dead letter keeps (enough to see what it was)
DEAD_LETTER_KEEP_BYTES = 4096

# Header names: our own, never ``x-`` prefixed (RabbitMQ reserves those).
H_SCHEMA = "ggt-schema"
H_ATTEMPT = "ggt-attempt"
H_REPLAYS = "ggt-replays"
H_RETRY_DELAY_MS = "ggt-retry-delay-ms"
H_ERROR_CODE = "ggt-error-code"
H_ERROR_MESSAGE = "ggt-error-message"
H_ACTOR = "ggt-actor"
H_ORIGIN_EXCHANGE = "ggt-origin-exchange"
H_ORIGIN_ROUTING_KEY = "ggt-origin-routing-key"
H_FIRST_FAILURE = "ggt-first-failure"
H_DEAD_LETTERED_AT = "ggt-dead-lettered-at"
#: set on a dead letter whose body was over MAX_BODY_BYTES: the original size and sha256; only the
#: first DEAD_LETTER_KEEP_BYTES are kept (an oversized message is undecodable anyway, so nothing is lost
#: that a replay could use, and a publisher cannot fill the broker's disk with copies)
H_BODY_BYTES = "ggt-body-bytes"
H_BODY_SHA256 = "ggt-body-sha256"
#: the tenant that owns the job a message is about; set by the bus, covered by the MAC
H_OWNER = "ggt-owner"
#: HMAC-SHA256 of an internal command (bus/auth.py); only the service's key makes it
H_MAC = "ggt-mac"

_encoder = msgspec.json.Encoder()
_union_decoder = msgspec.json.Decoder(Message)
_decoders = {name: msgspec.json.Decoder(cls) for name, cls in TYPES_BY_NAME.items()}
_hints_decoder = msgspec.json.Decoder()
_FIELD_RE = re.compile(r"- at `\$(?P<path>[^`]*)`")
_NAMED_RE = re.compile(r"field `(?P<name>[^`]+)`")


class DecodeError(Exception):
    """A message that can never be processed: bad JSON, unknown type, wrong or missing field, newer schema.

    ``field`` names the offending field as a JSON path (``$.quality``), or is empty.
    """

    def __init__(self, reason: str, *, field: str = "") -> None:
        super().__init__(f"{reason} (field {field})" if field else reason)
        self.reason = reason
        self.field = field


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """Who, what and when of a message; travels in AMQP properties, never in the body."""

    message_id: str
    job_id: str
    type: str
    schema: str = SCHEMA_VERSION
    created_at: datetime
    #: our own headers (attempt, replays, diagnostics); values are str or int
    headers: dict[str, str | int] = {}

    @property
    def attempt(self) -> int:
        """1 for the first delivery through our retry path, 2 after the first retry, … (never below 0)."""
        return header_count(self.headers, H_ATTEMPT, default=1)

    @property
    def replays(self) -> int:
        """How often an operator replayed this message from a dead-letter queue (never below 0)."""
        return header_count(self.headers, H_REPLAYS, default=0)

    @property
    def owner(self) -> str:
        """The tenant owning the message's job; "" when the message names none."""
        value = self.headers.get(H_OWNER, "")
        return value if isinstance(value, str) else ""


def header_count(headers: dict[str, str | int], name: str, *, default: int) -> int:
    """A counter header as an int clamped at ≥ 0 (a negative one would defeat a cap); junk → ``default``."""
    try:
        return max(0, int(headers.get(name, default)))
    except (TypeError, ValueError):
        return default


def header_time(value: object) -> datetime | None:
    """A time header (ISO 8601) as an aware datetime; None for a missing or unreadable one (a letter's
    headers may be anyone's: junk must not stop the tool that reads them)."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def request_message_id(owner: str, body: bytes) -> str:
    """The stable id of a request published without one: the same body from the same owner is the same
    message, so a redelivery after a crash becomes the same job."""
    return hashlib.sha256(owner.encode() + b"\n" + body).hexdigest()[:32]


def new_id() -> str:
    """A fresh message or job id: 32 hex digits, unguessable."""
    return uuid.uuid4().hex


def now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def envelope_for(message: Base, *, job_id: str | None = None, message_id: str | None = None,
                 headers: dict[str, str | int] | None = None) -> Envelope:
    """The envelope of a new message; the job id comes from the message when it has one."""
    jid = job_id or getattr(message, "job_id", None) or ""
    return Envelope(
        message_id=message_id or new_id(),
        job_id=jid,
        type=type_name(type(message)),
        created_at=now(),
        headers=dict(headers or {}),
    )


def encode(message: Base) -> bytes:
    """The JSON body of a message (with its ``type`` tag)."""
    return _encoder.encode(message)


def check_schema(version: str | None) -> None:
    """Refuse a message written for a newer major version of the contract."""
    if not version:
        return
    major = version.split(".", 1)[0]
    if not major.isdigit():
        raise DecodeError(f"schema version {version!r} is not MAJOR.MINOR", field="headers.ggt-schema")
    if int(major) > SCHEMA_MAJOR:
        raise DecodeError(
            f"schema version {version} is newer than this service understands ({SCHEMA_VERSION})",
            field="headers.ggt-schema",
        )


def decode(body: bytes, *, type_name_hint: str | None = None, schema: str | None = None) -> Base:
    """Decode a body strictly; raise DecodeError naming the field on any mismatch.

    With ``type_name_hint`` (the AMQP ``type`` property) the body may omit its ``type`` tag; without
    it, the tag picks the Struct.
    """
    check_schema(schema)
    if len(body) > MAX_BODY_BYTES:
        raise DecodeError(f"message body of {len(body)} bytes exceeds the {MAX_BODY_BYTES}-byte limit")
    if type_name_hint:
        decoder = _decoders.get(type_name_hint)
        if decoder is None:
            raise DecodeError(f"unknown message type {type_name_hint!r}", field="type")
    else:
        decoder = _union_decoder
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _FIELD_RE.search(text)
        path = ("$" + m.group("path")) if m else ""
        reason = _FIELD_RE.sub("", text).strip()
        named = _NAMED_RE.search(text)
        if named:  # "missing required field `url`" names a field inside the object at ``path``
            path = f"{path or '$'}.{named.group('name')}"
        if path == "$.type" or (not path and "tag" in text.lower()):
            reason = f"unknown or missing message type: {reason}"
            path = path or "$.type"
        raise DecodeError(reason, field=path) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise DecodeError("body is nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # whatever else a hostile body provokes
        raise DecodeError(f"body cannot be decoded: {type(exc).__name__}: {exc}") from None


class RequestHints(msgspec.Struct, frozen=True, kw_only=True):
    """What an undecodable request still says validly: the job it names and where to reply."""

    job_id: JobId
    reply_to: ReplyTo | None = None


def request_hints(body: bytes) -> RequestHints | None:
    """The valid ``job_id`` (and ``reply_to``) of a body that is a JSON object; None when it names none.

    Lets the service answer a request that cannot become a job (``"format": "mp5"``).
    """
    if len(body) > MAX_BODY_BYTES:
        return None
    try:
        raw = _hints_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError, ValueError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("job_id"), str):
        return None
    reply_to = raw.get("reply_to")
    try:
        return msgspec.convert({"job_id": raw["job_id"], "reply_to": reply_to if isinstance(reply_to, str) else None},
                               RequestHints)
    except msgspec.ValidationError:
        try:  # a bad reply_to does not hide the job's events
            return msgspec.convert({"job_id": raw["job_id"]}, RequestHints)
        except msgspec.ValidationError:
            return None


def to_builtins(message: Base) -> dict:
    """A message as plain dicts and lists (for the HTTP API and logs)."""
    return msgspec.to_builtins(message)
