"""Configuration: one typed struct, read from ``GGT_*`` environment variables once at start-up.

No other module reads ``os.environ``; everything receives the Settings it needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

MiB = 1024 * 1024
GiB = 1024 * MiB


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting, with its default. Field ``x_y`` is read from ``GGT_X_Y``."""

    # --- bus
    #: RabbitMQ URL; empty means the in-memory bus (zero-config, one process)
    amqp_url: str = ""
    #: seconds to wait for a publisher confirm before the publish counts as failed
    publish_timeout: float = 10.0
    #: unacked messages per actor process; 0 = each actor's own default (coordinator 16, converter 4,
    #: uploader 2 — it holds part buffers and runs ffmpeg per message —, verifier 4)
    prefetch: int = 0
    #: attempts through our own retry path before a message is dead-lettered
    max_attempts: int = 5
    #: seconds of each retry tier (exponential backoff; jitter stays inside a tier)
    retry_delays: tuple[float, ...] = (1.0, 5.0, 25.0, 120.0)
    #: quorum-queue x-delivery-limit: bounds crash loops (redeliveries after a process died)
    delivery_limit: int = 10
    #: seconds SIGTERM waits for in-flight work before leaving it unacked for redelivery
    shutdown_grace: float = 20.0

    # --- storage
    #: S3 endpoint (https://<account>.r2.cloudflarestorage.com, http://minio:9000 …); empty = embedded S3
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    s3_bucket: str = "getgoodtape"
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    #: endpoint written into download URLs handed to users, when they reach storage by another
    #: address than the actors do (compose: actors use http://minio:9000); empty = s3_endpoint
    s3_public_endpoint: str = ""
    #: path-style addressing (MinIO, local endpoints); R2 and S3 work either way
    s3_path_style: bool = True
    #: seconds a presigned download URL stays valid
    download_url_ttl: int = 24 * 3600

    # --- uploads
    #: multipart part size; parts are PUT from memory, so memory ≈ (parts in flight + 1) × this
    part_size: int = 8 * MiB
    #: part PUTs in flight at once per upload
    parts_in_flight: int = 2
    #: "auto" (single PUT or multipart) or "chunked" (endpoints that accept chunked PUTs only)
    upload_mode: str = "auto"

    # --- limits
    #: longest source (after clipping) accepted, seconds
    max_duration: float = 4 * 3600.0
    #: largest output accepted, bytes (ffmpeg -fs and the part URLs cover this)
    max_output_bytes: int = 4 * GiB
    #: hard time limit of one job step, seconds; must stay below RabbitMQ's consumer_timeout (30 min)
    job_time_limit: float = 25 * 60.0
    #: networks user URLs may reach besides the public internet, comma-separated CIDRs
    allow_networks: tuple[str, ...] = ()
    #: seconds yt-dlp and ffmpeg wait on a stalled socket
    network_timeout: float = 30.0

    # --- edges
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    #: bearer tokens accepted by the HTTP API; empty = no authentication (local use)
    api_keys: tuple[str, ...] = ()
    #: requests per minute per API key (or per client address without keys)
    rate_limit_per_minute: int = 60
    cors_origins: tuple[str, ...] = ()
    #: port for an actor process's Prometheus metrics; 0 = off
    metrics_port: int = 0
    log_level: str = "INFO"

    @property
    def embedded_s3(self) -> bool:
        """True when no S3 endpoint is configured and the in-process S3 is used."""
        return not self.s3_endpoint


_TUPLE_FIELDS = {"retry_delays", "allow_networks", "api_keys", "cors_origins"}


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from ``GGT_*`` variables (``environ`` defaults to the process environment)."""
    env = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for field in msgspec.structs.fields(Settings):
        value = env.get("GGT_" + field.name.upper())
        if value is None:
            continue
        if field.name in _TUPLE_FIELDS:
            raw[field.name] = [item.strip() for item in value.split(",") if item.strip()]
        else:
            raw[field.name] = value
    raw.update(overrides)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"invalid configuration: {exc} (see README.md, Configuration)") from None
