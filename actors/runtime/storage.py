"""The bucket an actor process talks to, from the settings (the coordinator and the verifier hold one)."""

from __future__ import annotations

from actors.runtime.settings import Settings
from storage.s3 import StorageConfig


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
