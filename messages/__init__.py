"""The wire contract of GetGoodTape: messages, codec, error codes and routing. Imports no other project package."""

from messages.codec import SCHEMA_VERSION, DecodeError, Envelope, decode, encode, envelope_for, new_id
from messages.errors import ERRORS, Error, ErrorCode, JobError
from messages.types import *  # noqa: F403
from messages.types import MESSAGE_TYPES, Message

__all__ = [
    "ERRORS",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "DecodeError",
    "Envelope",
    "Error",
    "ErrorCode",
    "JobError",
    "Message",
    "decode",
    "encode",
    "envelope_for",
    "new_id",
]
