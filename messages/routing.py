"""Where messages go: exchange names, routing keys and which actor consumes which message type.

This is part of the public contract (other systems publish to ``ggt.commands`` with routing key
``convert`` and bind their queues to ``ggt.events``), so it lives beside the messages.
"""

from __future__ import annotations

from messages.types import (
    Base,
    ConvertRequested,
    JobCompleted,
    JobFailed,
    JobProgress,
    MediaResolved,
    RenewUpload,
    ResolveMedia,
    StepFailed,
    Streamed,
    StreamToStorage,
    Verified,
    VerifyObject,
    type_name,
)

#: direct exchange for commands between actors (and from other systems)
COMMANDS_EXCHANGE = "ggt.commands"
#: topic exchange for JobProgress / JobCompleted / JobFailed; routing key ``job.<job_id>.<event>``
EVENTS_EXCHANGE = "ggt.events"
#: direct exchange for dead letters; routing key = actor name
DEAD_LETTER_EXCHANGE = "ggt.dlx"

COORDINATOR = "coordinator"
CONVERTER = "converter"
UPLOADER = "uploader"
VERIFIER = "verifier"
ACTORS = (COORDINATOR, CONVERTER, UPLOADER, VERIFIER)

#: routing key on ggt.commands for each command type
ROUTING_KEYS: dict[type[Base], str] = {
    ConvertRequested: "convert",
    ResolveMedia: "resolve_media",
    MediaResolved: "media_resolved",
    StreamToStorage: "stream_to_storage",
    Streamed: "streamed",
    VerifyObject: "verify_object",
    Verified: "verified",
    RenewUpload: "renew_upload",
    StepFailed: "step_failed",
}

#: which actor consumes each command type
CONSUMER: dict[type[Base], str] = {
    ConvertRequested: COORDINATOR,
    ResolveMedia: CONVERTER,
    MediaResolved: COORDINATOR,
    StreamToStorage: UPLOADER,
    Streamed: COORDINATOR,
    VerifyObject: VERIFIER,
    Verified: COORDINATOR,
    RenewUpload: COORDINATOR,
    StepFailed: COORDINATOR,
}

EVENT_NAMES: dict[type[Base], str] = {JobProgress: "progress", JobCompleted: "completed", JobFailed: "failed"}


def queue_name(actor: str) -> str:
    """The durable quorum work queue of an actor."""
    return f"ggt.{actor}"


def dead_letter_queue(actor: str) -> str:
    """The dead-letter queue of an actor."""
    return f"ggt.{actor}.dlq"


def actor_routing_key(actor: str) -> str:
    """A routing key that reaches exactly one actor's queue (used by retries)."""
    return f"actor.{actor}"


def routing_keys_for(actor: str) -> list[str]:
    """Every routing key bound to the actor's queue on ggt.commands."""
    keys = [key for cls, key in ROUTING_KEYS.items() if CONSUMER[cls] == actor]
    return [*keys, actor_routing_key(actor)]


def event_routing_key(message: Base) -> str:
    """``job.<job_id>.<progress|completed|failed>`` on ggt.events."""
    return f"job.{message.job_id}.{EVENT_NAMES[type(message)]}"  # type: ignore[attr-defined]


def is_event(message_type: type[Base]) -> bool:
    """Whether this type goes to ggt.events rather than ggt.commands."""
    return message_type in EVENT_NAMES


def command_type_name(routing_key: str) -> str | None:
    """The message type a command routing key carries, if it names one."""
    for cls, key in ROUTING_KEYS.items():
        if key == routing_key:
            return type_name(cls)
    return None
