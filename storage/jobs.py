"""Job records: one small JSON document per job under ``jobs/<owner>/<job id>.json`` in the bucket
(``jobs/<job id>.json`` for the default tenant, ``owner=""``).

Durable, shared by coordinator replicas, and it survives restarts without another server. Records
are bytes in, bytes out: the record's type lives with the coordinator (actors/), not here.

Optimistic concurrency uses S3 conditional writes: ``If-None-Match: *`` to create, ``If-Match:
<etag>`` to replace. AWS S3 (since 2024), R2 and MinIO honour both on PutObject. moto (5.2) checks
both too, but its check-then-put is not atomic across threads; the embedded S3 serialises
conditional writes so that it is (see storage.embedded).

An ETag is the MD5 of the bytes: two writers saving identical bytes over the same version both
"win". Keep a changing field in the record (a version counter or updated_at) so every save differs.
"""

from __future__ import annotations

from storage.keys import job_record_key
from storage.s3 import Storage


class JobStore:
    """Load and save job records with optimistic concurrency on their ETags."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def load(self, job_id: str, *, owner: str = "") -> tuple[bytes, str] | None:
        """The record's bytes and ETag, or None for a job unknown to this owner."""
        return await self._storage.get_json(job_record_key(job_id, owner=owner))

    async def save(self, job_id: str, data: bytes, *, etag: str | None, owner: str = "") -> str:
        """Write the record and return its new ETag.

        ``etag=None`` creates the record (WriteConflict if one exists); otherwise the write only
        replaces the version with that ETag (WriteConflict if another writer got there first:
        load again, re-apply, save again).
        """
        key = job_record_key(job_id, owner=owner)
        if etag is None:
            return await self._storage.put_json(key, data, if_none_match=True)
        return await self._storage.put_json(key, data, if_match=etag)
