"""The storage failures callers tell apart; everything else surfaces as botocore's ClientError."""

from __future__ import annotations


class StorageError(Exception):
    """Base of the storage package's own exceptions."""


class StorageUnavailable(StorageError):
    """Storage cannot be reached or answers 5xx after botocore's retries; worth retrying later."""


class StorageMisconfigured(StorageError):
    """Storage refused the configuration (bucket, credentials, region, endpoint): retrying cannot help."""


class WriteConflict(StorageError):
    """A conditional write lost: the document changed (If-Match) or already exists (If-None-Match)."""
