"""Authenticated internal commands: an HMAC-SHA256 that only the service's key makes.

The MAC covers what a command *means* — type, message id, job id, schema version, owner and body —
and not the headers the bus rewrites on its way (attempt, replays, diagnostics), so a retry copy or
a replayed dead letter keeps its MAC. Keys rotate without downtime: sign with the current key,
verify with the current and every previous one (``GGT_BUS_KEYS_PREVIOUS``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import msgspec

from messages.codec import H_MAC, SCHEMA_VERSION, Envelope

#: shortest GGT_BUS_KEY accepted (characters); 32 random bytes as hex are 64
MIN_KEY_LENGTH = 32
_fields = msgspec.json.Encoder()


class BusKeys(msgspec.Struct, frozen=True, kw_only=True):
    """The key that signs internal commands and the older ones still accepted while a rotation runs."""

    current: bytes
    previous: tuple[bytes, ...] = ()

    @classmethod
    def random(cls) -> BusKeys:
        """A key made up for one process (the in-memory bus: nothing outside it can sign)."""
        return cls(current=secrets.token_bytes(32))

    @classmethod
    def of(cls, current: str, previous: tuple[str, ...] = ()) -> BusKeys:
        """Keys from their configured text; raises ValueError for one that is too short to be a secret."""
        for key in (current, *previous):
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(f"a bus key needs at least {MIN_KEY_LENGTH} characters "
                                 "(make one with: python -c 'import secrets; print(secrets.token_hex(32))')")
        return cls(current=current.encode(), previous=tuple(p.encode() for p in previous))


def _signed_part(envelope: Envelope, body: bytes) -> bytes:
    # a JSON array of the envelope fields: unambiguous (no field can run into the next), then the body
    fields = [envelope.type, envelope.message_id, envelope.job_id, envelope.schema or SCHEMA_VERSION, envelope.owner]
    return _fields.encode(fields) + b"\n" + body


def mac(key: bytes, envelope: Envelope, body: bytes) -> str:
    """The hex HMAC-SHA256 of a command under ``key``."""
    return hmac.new(key, _signed_part(envelope, body), hashlib.sha256).hexdigest()


def signed(keys: BusKeys, envelope: Envelope, body: bytes) -> Envelope:
    """``envelope`` with a fresh ``ggt-mac`` header made with the current key."""
    return msgspec.structs.replace(envelope, headers={**envelope.headers, H_MAC: mac(keys.current, envelope, body)})


def verify(keys: BusKeys, envelope: Envelope, body: bytes) -> bool:
    """Whether the envelope's ``ggt-mac`` was made by the current or a previous key for exactly this command."""
    given = envelope.headers.get(H_MAC)
    if not isinstance(given, str) or not given:
        return False
    part = _signed_part(envelope, body)
    return any(hmac.compare_digest(given, hmac.new(key, part, hashlib.sha256).hexdigest())
               for key in (keys.current, *keys.previous))
