"""Assembly: the bus and the storage an actor process uses, chosen from the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from actors.runtime.settings import Settings
from bus.auth import BusKeys
from bus.base import Bus, Topology
from bus.memory import MemoryBus
from messages.routing import ACTORS

if TYPE_CHECKING:
    from storage.embedded import EmbeddedS3

#: what to do when the zero-config path needs the embedded S3 and the `local` extra is not installed
EMBEDDED_S3_MISSING = (
    "GGT_S3_ENDPOINT is not set and the embedded S3 is not installed: install it with "
    "`pip install 'getgoodtape[local]'` (moto and werkzeug; for local runs), "
    "or set GGT_S3_ENDPOINT, GGT_S3_BUCKET and the credentials of your S3 / MinIO / R2"
)


def topology(settings: Settings) -> Topology:
    """The broker topology these settings ask for."""
    return Topology(
        actors=ACTORS,
        retry_delays=tuple(settings.retry_delays),
        delivery_limit=settings.delivery_limit,
        publish_timeout=settings.publish_timeout,
    )


def bus_keys(settings: Settings) -> BusKeys | None:
    """The keys of ``GGT_BUS_KEY`` / ``GGT_BUS_KEYS_PREVIOUS``; None when no key is set."""
    if not settings.bus_key:
        if settings.bus_keys_previous:
            raise SystemExit("GGT_BUS_KEYS_PREVIOUS is set without GGT_BUS_KEY: set the key that signs")
        return None
    try:
        return BusKeys.of(settings.bus_key, settings.bus_keys_previous)
    except ValueError as exc:
        raise SystemExit(f"invalid configuration: GGT_BUS_KEY: {exc}") from None


def make_bus(settings: Settings, *, name: str = "getgoodtape", publisher_only: bool = False) -> Bus:
    """RabbitMQ when ``GGT_AMQP_URL`` is set, else the in-memory bus (one process only).

    On RabbitMQ a service process needs ``GGT_BUS_KEY`` (start refuses without); ``publisher_only``
    is for clients that only publish ConvertRequested to the public ingress and follow events.
    """
    if settings.amqp_url:
        keys = bus_keys(settings)
        if keys is None and not publisher_only:
            raise SystemExit("GGT_BUS_KEY is not set: service processes on RabbitMQ sign and verify every internal "
                             "command with it. Give every one the same key (openssl rand -hex 32); "
                             "see docs/SECURITY.md")
        from bus.rabbit import RabbitBus  # aio-pika: only processes on RabbitMQ load it

        return RabbitBus(settings.amqp_url, topology(settings), name=name, keys=keys, publisher_only=publisher_only)
    return MemoryBus(topology(settings), keys=bus_keys(settings))




def new_embedded_s3(*, bucket: str, port: int = 0) -> EmbeddedS3:
    """An (unstarted) embedded S3; exits with what to install when the `local` extra is missing."""
    try:
        from storage.embedded import EmbeddedS3
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in ("moto", "werkzeug"):
            raise SystemExit(EMBEDDED_S3_MISSING) from None
        raise
    return EmbeddedS3(bucket=bucket, port=port)


def with_embedded_s3(settings: Settings, embedded: EmbeddedS3) -> Settings:
    """``settings`` pointed at a running embedded S3."""
    cfg = embedded.config
    return msgspec.structs.replace(
        settings, s3_endpoint=cfg.endpoint, s3_region=cfg.region, s3_bucket=cfg.bucket,
        s3_access_key_id=cfg.access_key_id, s3_secret_access_key=cfg.secret_access_key, s3_path_style=True,
    )
