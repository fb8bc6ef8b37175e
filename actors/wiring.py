"""Assembly: the bus and the storage an actor process uses, chosen from the settings."""

from __future__ import annotations

import msgspec

from actors.settings import Settings
from bus.base import Bus, Topology
from bus.memory import MemoryBus
from bus.rabbit import RabbitBus
from messages.routing import ACTORS
from storage.embedded import EmbeddedS3
from storage.s3 import StorageConfig


def topology(settings: Settings) -> Topology:
    """The broker topology these settings ask for."""
    return Topology(
        actors=ACTORS,
        retry_delays=tuple(settings.retry_delays),
        delivery_limit=settings.delivery_limit,
        publish_timeout=settings.publish_timeout,
    )


def make_bus(settings: Settings, *, name: str = "getgoodtape") -> Bus:
    """RabbitMQ when ``GGT_AMQP_URL`` is set, else the in-memory bus (one process only)."""
    if settings.amqp_url:
        return RabbitBus(settings.amqp_url, topology(settings), name=name)
    return MemoryBus(topology(settings))


def storage_config(settings: Settings, *, public: bool = False) -> StorageConfig:
    """Where the bucket is; ``public`` uses the endpoint users reach (download URLs)."""
    if not settings.s3_endpoint:
        raise SystemExit(
            "GGT_S3_ENDPOINT is not set: actors in separate processes need a shared S3 "
            "(the embedded S3 only serves `getgoodtape run all` and `getgoodtape convert`)"
        )
    endpoint = (settings.s3_public_endpoint or settings.s3_endpoint) if public else settings.s3_endpoint
    return StorageConfig(
        endpoint=endpoint,
        region=settings.s3_region,
        bucket=settings.s3_bucket,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key,
        path_style=settings.s3_path_style,
    )


def with_embedded_s3(settings: Settings, embedded: EmbeddedS3) -> Settings:
    """``settings`` pointed at a running embedded S3."""
    cfg = embedded.config
    return msgspec.structs.replace(
        settings, s3_endpoint=cfg.endpoint, s3_region=cfg.region, s3_bucket=cfg.bucket,
        s3_access_key_id=cfg.access_key_id, s3_secret_access_key=cfg.secret_access_key, s3_path_style=True,
    )
