"""Where messages go: exchange names, routing keys and which actor consumes which message type.

This is part of the public contract (other systems publish ConvertRequested to ``ggt.requests`` with
routing key ``convert.<tenant>`` and bind their queues to ``ggt.events`` with ``job.<tenant>.#``), so
it lives beside the messages. ``ggt.commands`` carries internal commands only: only the service's
broker user may write it, and every command on it carries a MAC (bus/auth.py).
"""

from __future__ import annotations

import re

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

#: direct exchange for internal commands between actors (only the service writes here)
COMMANDS_EXCHANGE = "ggt.commands"
#: topic exchange of the public ingress: ConvertRequested only, routing key ``convert.<tenant>``
REQUESTS_EXCHANGE = "ggt.requests"
#: topic exchange for JobProgress / JobCompleted / JobFailed; routing key ``job.<tenant>.<job_id>.<event>``
EVENTS_EXCHANGE = "ggt.events"
#: direct exchange for dead letters; routing key = actor name
DEAD_LETTER_EXCHANGE = "ggt.dlx"

COORDINATOR = "coordinator"
CONVERTER = "converter"
UPLOADER = "uploader"
VERIFIER = "verifier"
ACTORS = (COORDINATOR, CONVERTER, UPLOADER, VERIFIER)

#: the owner of requests and events that name none (the CLI, a gateway without tenants)
DEFAULT_TENANT = "default"
#: the binding of the coordinator's queue on ggt.requests: one word, the tenant
REQUESTS_BINDING = "convert.*"
#: what a tenant id looks like (messages.types.TenantId); one routing-key word, safe in user names
TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

#: routing key on ggt.commands for each internal command type (ConvertRequested travels on ggt.requests)
ROUTING_KEYS: dict[type[Base], str] = {
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


def is_tenant(name: str) -> bool:
    """Whether ``name`` is a valid tenant id."""
    return TENANT_RE.fullmatch(name) is not None


#: the tenant a bare API key gets: this prefix + the first 8 hex of the token's sha256
BARE_KEY_TENANT_PREFIX = "key-"


def reserved_tenant(name: str) -> bool:
    """Whether ``name`` is a tenant the service assigns itself — the default one (the CLI, a gateway
    without tenants) or a bare key's — which no integrator or named API key may be given."""
    return name == DEFAULT_TENANT or name.startswith(BARE_KEY_TENANT_PREFIX)


def request_routing_key(owner: str = "") -> str:
    """``convert.<tenant>`` on ggt.requests; an empty owner is the default tenant."""
    return f"convert.{owner or DEFAULT_TENANT}"


def tenant_of_request(routing_key: str) -> str | None:
    """The tenant a ggt.requests routing key names, or None when it is not ``convert.<tenant>``."""
    prefix, _, tenant = routing_key.partition(".")
    return tenant if prefix == "convert" and is_tenant(tenant) else None


def event_routing_key(message: Base, owner: str = "") -> str:
    """``job.<tenant>.<job_id>.<progress|completed|failed>`` on ggt.events (empty owner → default tenant)."""
    return f"job.{owner or DEFAULT_TENANT}.{message.job_id}.{EVENT_NAMES[type(message)]}"  # type: ignore[attr-defined]


def job_events_pattern(job_id: str, owner: str = "*") -> str:
    """The ggt.events binding that sees every event of one job (of any tenant with ``*``)."""
    return f"job.{owner or DEFAULT_TENANT}.{job_id}.#"


def is_event(message_type: type[Base]) -> bool:
    """Whether this type goes to ggt.events rather than ggt.commands."""
    return message_type in EVENT_NAMES


def command_type_name(routing_key: str) -> str | None:
    """The message type a command routing key carries, if it names one."""
    if tenant_of_request(routing_key) is not None:
        return type_name(ConvertRequested)
    for cls, key in ROUTING_KEYS.items():
        if key == routing_key:
            return type_name(cls)
    return None


#: the prefix of the queues an integrator may declare and read (its broker user's configure rights)
INTEGRATOR_QUEUE_PREFIX = "integrator."
#: the prefix of the service's own queues (work, dead-letter and retry queues)
SERVICE_QUEUE_PREFIX = "ggt."


def reply_queue_allowed(owner: str, queue: str) -> bool:
    """Whether the service may deliver tenant ``owner``'s answers to ``queue`` (a ``reply_to``).

    The service's broker user may write the default exchange, so it could put an answer into any
    queue: another tenant's (``integrator.<other>.…``) or one of its own work queues. A tenant gets
    only its own queues, ``integrator.<owner>.…`` (the only ones its user may declare); the default
    tenant (the CLI, the service's own callers) any queue outside the service's and the integrators'.
    """
    if queue.startswith(SERVICE_QUEUE_PREFIX):
        return False
    if owner in ("", DEFAULT_TENANT):
        return not queue.startswith(INTEGRATOR_QUEUE_PREFIX)
    return queue.startswith(f"{INTEGRATOR_QUEUE_PREFIX}{owner}.")
