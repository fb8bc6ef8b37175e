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
    #: secret (≥ 32 characters) that signs internal commands (HMAC-SHA256); required with RabbitMQ,
    #: the same in every service process; empty with the in-memory bus = a random key per process
    bus_key: str = ""
    #: older bus keys still accepted (comma-separated) while a rotation runs; never used to sign
    bus_keys_previous: tuple[str, ...] = ()

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
    #: networks user URLs may never reach, even inside allow_networks, comma-separated CIDRs
    #: (cloud metadata addresses are always refused)
    deny_networks: tuple[str, ...] = ()
    #: seconds yt-dlp and ffmpeg wait on a stalled socket
    network_timeout: float = 30.0
    #: address space (RLIMIT_AS) each ffmpeg and ffprobe child may map, bytes; 0 = unbounded
    child_memory_limit: int = 1 * GiB
    #: largest thumbnail the uploader fetches for cover art, bytes; a bigger one is left out
    max_thumbnail_bytes: int = 2 * MiB
    #: most bytes of media one job may fetch (all its inputs and segments together); a plan with a
    #: known duration gets less (``planning.source_budget``); past it the job fails ``source_too_large``
    max_source_bytes: int = 16 * GiB

    # --- operator levers for the real web (docs/DEPLOY.md, "On a datacenter host")
    #: proxy every upstream connection of the guard goes through (``http://[user:pass@]host:port``
    #: for HTTP CONNECT, or ``socks5://…``); the guard still vets each target and tunnels to its IP
    egress_proxy: str = ""
    #: Netscape-format cookies file (as yt-dlp's ``--cookies`` reads), applied to extraction and to
    #: the media fetches they match; read, never written; needed on converter and uploader hosts
    cookies_file: str = ""
    #: yt-dlp ``--extractor-args`` values, whitespace-separated (``youtube:player_client=web;po_token=…``)
    ytdlp_extractor_args: str = ""
    #: installed yt-dlp plugin packages (distribution names) allowed to load; every other plugin stays off
    ytdlp_plugins: tuple[str, ...] = ()

    # --- edges
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    #: API keys of the HTTP API, ``tenant:token`` (or a bare token: its tenant is ``key-<sha256 prefix>``);
    #: empty = no authentication, allowed on a loopback http_host only (or with allow_open_api)
    api_keys: tuple[str, ...] = ()
    #: serve the API without keys on a non-loopback http_host (behind an authenticating proxy)
    allow_open_api: bool = False
    #: requests per minute per API key (or per client address without keys)
    rate_limit_per_minute: int = 60
    #: failed authentications per minute per client address before it is refused with 429
    auth_failures_per_minute: int = 10
    #: concurrent event streams (SSE) per API key (per tenant)
    sse_streams_per_key: int = 20
    cors_origins: tuple[str, ...] = ()
    #: port for an actor process's Prometheus metrics; 0 = off
    metrics_port: int = 0
    log_level: str = "INFO"

    @property
    def embedded_s3(self) -> bool:
        """True when no S3 endpoint is configured and the in-process S3 is used."""
        return not self.s3_endpoint


_TUPLE_FIELDS = {"retry_delays", "allow_networks", "deny_networks", "api_keys", "cors_origins", "bus_keys_previous",
                 "ytdlp_plugins"}


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from ``GGT_*`` variables (``environ`` defaults to the process environment)."""
    env = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for field in msgspec.structs.fields(Settings):
        value = env.get("GGT_" + field.name.upper())
        if value is None:
            continue
        if field.name == "api_keys":  # blank entries are kept, so the gateway refuses them
            raw[field.name] = [item.strip() for item in value.split(",")] if value.strip() else []
        elif field.name in _TUPLE_FIELDS:
            raw[field.name] = [item.strip() for item in value.split(",") if item.strip()]
        else:
            raw[field.name] = value
    raw.update(overrides)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"invalid configuration: {exc} (see README.md, Configuration)") from None
