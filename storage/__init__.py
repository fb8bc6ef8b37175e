"""Object storage over aiobotocore: presigning, multipart control, head, stats, job records, embedded S3."""

from storage.errors import StorageError, StorageMisconfigured, StorageUnavailable, WriteConflict
from storage.jobs import JobStore
from storage.keys import content_disposition, job_record_key, multipart_etag, object_key
from storage.s3 import ObjectInfo, Storage, StorageConfig, StorageStats, UploadInfo

__all__ = [
    "JobStore",
    "ObjectInfo",
    "Storage",
    "StorageConfig",
    "StorageError",
    "StorageMisconfigured",
    "StorageStats",
    "StorageUnavailable",
    "UploadInfo",
    "WriteConflict",
    "content_disposition",
    "job_record_key",
    "multipart_etag",
    "object_key",
]
