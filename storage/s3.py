"""Object storage over one aiobotocore S3 client: presigning, multipart control, head, stats, JSON documents.

``Storage`` is the only place that holds storage credentials. Everything that touches file data does so
through the presigned URLs it hands out; the coordinator uses the rest (complete, abort, head, stats).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from contextlib import AsyncExitStack
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import msgspec
from aiobotocore.session import AioSession, get_session
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from storage.errors import StorageError, StorageMisconfigured, StorageUnavailable, WriteConflict
from storage.keys import CONVERTED_PREFIX, content_disposition, format_of_key, multipart_etag, strip_etag
from storage.sigv4 import QuerySigner

#: Seconds to wait for a TCP connection to storage before botocore retries.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Seconds to wait on a silent storage socket (control calls are small; no file data flows here).
DEFAULT_READ_TIMEOUT = 60.0
#: Attempts per call, first included (botocore "standard" retry mode: connection errors, 5xx, throttling).
DEFAULT_MAX_ATTEMPTS = 3
#: Connections the client keeps to storage; presigning uses none.
DEFAULT_MAX_POOL_CONNECTIONS = 20
#: Default lifetime of a presigned download URL, seconds.
DEFAULT_GET_EXPIRES = 24 * 3600
#: How often abort is repeated while ListParts still shows parts (S3 may need more than one abort).
ABORT_ROUNDS = 3
#: Content type of the small JSON documents (job records).
JSON_CONTENT_TYPE = "application/json"

#: Error codes that mean "no such object" on HEAD / GET.
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
#: Error codes that mean a conditional write lost.
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey"}


class StorageConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where the bucket is and the credentials to reach it."""

    endpoint: str
    region: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    #: path-style addressing (MinIO, local endpoints); R2 and S3 work either way
    path_style: bool = True


class ObjectInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What HEAD says about a stored object (``etag`` without quotes)."""

    key: str
    size: int
    etag: str
    content_type: str
    last_modified: datetime
    metadata: dict[str, str] = {}


class UploadInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An open (neither completed nor aborted) multipart upload."""

    key: str
    upload_id: str
    initiated: datetime


class FormatStats(msgspec.Struct, kw_only=True):
    """Objects and bytes of one format."""

    objects: int = 0
    bytes: int = 0


class StorageStats(msgspec.Struct, frozen=True, kw_only=True):
    """Converted files by format (extension under ``converted/``) and open multipart uploads."""

    objects: int
    bytes: int
    by_format: dict[str, FormatStats]
    open_uploads: int


def client_config(
    config: StorageConfig,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    max_pool_connections: int = DEFAULT_MAX_POOL_CONNECTIONS,
) -> Config:
    """The botocore Config: SigV4 always, the addressing style, and checksums only when required.

    R2 rejects the CRC checksums newer botocore sends by default, hence ``when_required``.
    """
    return Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if config.path_style else "virtual"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
    )


def error_code(exc: ClientError) -> str:
    """The S3 error code of a ClientError (``NoSuchKey``, ``404`` …)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    """The HTTP status of a ClientError (0 when unknown)."""
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


#: S3 error codes that mean the configuration is wrong, with what to check; retrying cannot help
MISCONFIGURATION_HINTS: dict[str, str] = {
    "NoSuchBucket": "the bucket does not exist: create it, or fix GGT_S3_BUCKET",
    "InvalidBucketName": "the bucket name is not valid: fix GGT_S3_BUCKET",
    "AccessDenied": "the credentials may not use this bucket: grant the key access to it "
                    "(docs/DEPLOY.md lists the permissions), or fix GGT_S3_ACCESS_KEY_ID",
    "AllAccessDisabled": "all access to this bucket is disabled: check the bucket with your provider",
    "InvalidAccessKeyId": "the access key is not known to this store: fix GGT_S3_ACCESS_KEY_ID "
                          "(and that GGT_S3_ENDPOINT is the store that issued it)",
    "SignatureDoesNotMatch": "the secret key does not match the access key: fix GGT_S3_SECRET_ACCESS_KEY",
    "InvalidToken": "the credentials are not valid: fix GGT_S3_ACCESS_KEY_ID / GGT_S3_SECRET_ACCESS_KEY",
    "ExpiredToken": "the credentials have expired: issue new ones",
    "AuthorizationHeaderMalformed": "the region is wrong for this bucket: fix GGT_S3_REGION",
    "IllegalLocationConstraintException": "the region is wrong for this bucket: fix GGT_S3_REGION",
    "PermanentRedirect": "the bucket lives in another region or endpoint: fix GGT_S3_REGION / GGT_S3_ENDPOINT",
    "AccountProblem": "the storage account has a problem: check it with your provider",
}
#: bare HTTP statuses (HEAD answers carry no error body) that mean the same on a bucket-level call
_MISCONFIGURED_STATUS_HINTS: dict[int, str] = {
    301: MISCONFIGURATION_HINTS["PermanentRedirect"],
    403: "the credentials are refused for this bucket: check GGT_S3_ACCESS_KEY_ID, "
         "GGT_S3_SECRET_ACCESS_KEY and the key's permissions",
    404: MISCONFIGURATION_HINTS["NoSuchBucket"],
}


def storage_failure(code: str, status: int, *, bucket_call: bool = False) -> tuple[str, str] | None:
    """How a storage error answer counts: ("misconfigured", what to check), ("unavailable", why), or
    None for an answer the caller handles itself (a missing key, a lost condition).

    ``bucket_call``: the answer came from a bucket-level call (HeadBucket), whose bare 403/404/301
    statuses speak about the bucket, not about one object.
    """
    if code in MISCONFIGURATION_HINTS:
        return "misconfigured", MISCONFIGURATION_HINTS[code]
    if bucket_call and code in ("", str(status)) and status in _MISCONFIGURED_STATUS_HINTS:
        return "misconfigured", _MISCONFIGURED_STATUS_HINTS[status]
    if code in ("403", "Forbidden") and status == 403:
        return "misconfigured", _MISCONFIGURED_STATUS_HINTS[403]
    if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"):
        return "unavailable", f"storage failed: {code or status} ({status})"
    return None


def misconfigured_message(hint: str, code: str, *, bucket: str, endpoint: str) -> str:
    """The operator's message: what the store said, about which bucket at which endpoint, what to check."""
    return (f"storage refused the configuration: {code} for bucket {bucket!r} at {endpoint or 'AWS S3'}; "
            f"{hint} (run `getgoodtape check` to test the settings)")


@contextlib.contextmanager
def _unavailable_on_failure(config: StorageConfig | None = None, *, bucket_call: bool = False) -> Iterator[None]:
    """Turn connection failures and 5xx answers (after botocore's retries) into StorageUnavailable,
    and answers that mean a wrong configuration into StorageMisconfigured."""
    try:
        yield
    except (BotoConnectionError, HTTPClientError) as exc:
        where = f" ({config.endpoint})" if config is not None else ""
        raise StorageUnavailable(f"storage unreachable{where}: {exc}") from exc
    except ClientError as exc:
        verdict = storage_failure(error_code(exc), http_status(exc), bucket_call=bucket_call)
        if verdict is None:
            raise
        kind, text = verdict
        if kind == "unavailable":
            raise StorageUnavailable(text) from exc
        raise StorageMisconfigured(misconfigured_message(
            text, error_code(exc) or str(http_status(exc)),
            bucket=config.bucket if config else "?", endpoint=config.endpoint if config else "")) from exc


@functools.cache
def process_session() -> AioSession:
    """The aiobotocore session the Storages of this process share (clients are made per Storage)."""
    return get_session()


class Storage:
    """An async context manager over one S3 client bound to one bucket.

    ``async with Storage(config) as storage: url = await storage.presign_put(key, ...)``
    """

    def __init__(
        self,
        config: StorageConfig,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_pool_connections: int = DEFAULT_MAX_POOL_CONNECTIONS,
        session: AioSession | None = None,
    ) -> None:
        self.config = config
        #: one session for every Storage of a process (unless given): it caches botocore's service
        #: models, which cost ~0.1–0.3 s to load per session (the coordinator and verifier of one
        #: process, a coordinator's public endpoint)
        self._session = session
        self._botocore_config = client_config(
            config,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            max_pool_connections=max_pool_connections,
        )
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            self._client = await stack.enter_async_context(
                (self._session or process_session()).create_client(
                    "s3",
                    endpoint_url=self.config.endpoint,
                    region_name=self.config.region,
                    aws_access_key_id=self.config.access_key_id,
                    aws_secret_access_key=self.config.secret_access_key,
                    config=self._botocore_config,
                )
            )
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> Any:
        """The underlying aiobotocore S3 client (for calls this class does not wrap)."""
        if self._client is None:
            raise RuntimeError("Storage is not open: use `async with Storage(config) as storage`")
        return self._client

    @property
    def bucket(self) -> str:
        """The bucket every call works on."""
        return self.config.bucket

    # ------------------------------------------------------------------------------ presigning

    async def _presign(
        self, operation: str, params: dict[str, Any], *, expires: int, method: str | None = None
    ) -> str:
        return await self.client.generate_presigned_url(
            operation, Params={"Bucket": self.bucket, **params}, ExpiresIn=int(expires), HttpMethod=method
        )

    async def presign_put(self, key: str, *, content_type: str, expires: int) -> str:
        """A presigned single PUT; the request must send exactly this Content-Type and a Content-Length."""
        return await self._presign("put_object", {"Key": key, "ContentType": content_type}, expires=expires)

    async def presign_parts(
        self, key: str, upload_id: str, *, first: int = 1, count: int, expires: int
    ) -> list[str]:
        """Presigned UploadPart URLs for part numbers ``first`` … ``first + count - 1``.

        botocore builds the URL's base (addressing style, key encoding); the many signatures are
        computed by ``QuerySigner``, ~50× faster than botocore's presigner per URL.
        """
        if count <= 0:
            return []
        reference = await self._presign(
            "upload_part", {"Key": key, "UploadId": upload_id, "PartNumber": first}, expires=expires
        )
        signer = QuerySigner(
            access_key_id=self.config.access_key_id,
            secret_access_key=self.config.secret_access_key,
            region=self.config.region,
            expires=expires,
        )
        base_url = reference.split("?", 1)[0]
        return [
            signer.presign("PUT", base_url, {"partNumber": str(number), "uploadId": upload_id})
            for number in range(first, first + count)
        ]

    async def presign_abort(self, key: str, upload_id: str, *, expires: int) -> str:
        """A presigned AbortMultipartUpload (DELETE), so an uploader without credentials can abort."""
        return await self._presign(
            "abort_multipart_upload", {"Key": key, "UploadId": upload_id}, expires=expires, method="DELETE"
        )

    async def presign_get(
        self, key: str, *, expires: int = DEFAULT_GET_EXPIRES, filename: str | None = None
    ) -> str:
        """A presigned GET; with ``filename`` the download is offered under that name (RFC 6266)."""
        params: dict[str, Any] = {"Key": key}
        if filename:
            params["ResponseContentDisposition"] = content_disposition(filename)
        return await self._presign("get_object", params, expires=expires)

    # ------------------------------------------------------------------------------- multipart

    async def create_multipart(self, key: str, *, content_type: str) -> str:
        """Start a multipart upload and return its upload id."""
        with _unavailable_on_failure(self.config):
            response = await self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType=content_type
            )
        return str(response["UploadId"])

    async def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> str:
        """Complete the upload from ``(part number, etag)`` pairs; returns the object's ETag (no quotes).

        Safe to repeat: when the upload is already gone (NoSuchUpload) but the object carries the
        multipart ETag these parts produce, the earlier completion is taken as this one.
        """
        ordered = sorted(parts)
        body = {
            "Parts": [{"PartNumber": number, "ETag": f'"{strip_etag(etag)}"'} for number, etag in ordered]
        }
        try:
            with _unavailable_on_failure(self.config):
                response = await self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload=body
                )
        except ClientError as exc:
            if error_code(exc) != "NoSuchUpload":
                raise
            expected = multipart_etag(etag for _, etag in ordered)
            info = await self.head(key)
            if info is None or info.etag != expected:
                raise
            return expected
        return strip_etag(response["ETag"])

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort the upload, then confirm with ListParts that no part is left (NoSuchUpload is clean)."""
        for _ in range(ABORT_ROUNDS):
            with _unavailable_on_failure(self.config):
                try:
                    await self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                except ClientError as exc:
                    if error_code(exc) != "NoSuchUpload":
                        raise
                try:
                    listed = await self.client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id)
                except ClientError as exc:
                    if error_code(exc) == "NoSuchUpload":
                        return
                    raise
            if not listed.get("Parts"):
                return
        raise StorageError(f"parts of upload {upload_id} remain after {ABORT_ROUNDS} aborts")

    async def list_multipart_uploads(self, prefix: str = "") -> list[UploadInfo]:
        """Open multipart uploads whose key starts with ``prefix``."""
        uploads: list[UploadInfo] = []
        with _unavailable_on_failure(self.config):
            paginator = self.client.get_paginator("list_multipart_uploads")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                uploads.extend(
                    UploadInfo(key=item["Key"], upload_id=item["UploadId"], initiated=item["Initiated"])
                    for item in page.get("Uploads", [])
                )
        return uploads

    # --------------------------------------------------------------------------------- objects

    async def head(self, key: str) -> ObjectInfo | None:
        """Size, ETag, type, time and metadata of an object, or None when there is none."""
        try:
            with _unavailable_on_failure(self.config):
                response = await self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) in _MISSING_CODES:
                return None
            raise
        return ObjectInfo(
            key=key,
            size=int(response["ContentLength"]),
            etag=strip_etag(response["ETag"]),
            content_type=response.get("ContentType", ""),
            last_modified=response["LastModified"],
            metadata=dict(response.get("Metadata", {})),
        )

    async def delete(self, key: str) -> None:
        """Delete an object (no error when it does not exist)."""
        with _unavailable_on_failure(self.config):
            await self.client.delete_object(Bucket=self.bucket, Key=key)

    async def stats(self) -> StorageStats:
        """Converted files by format and the number of open multipart uploads (every page read)."""
        by_format: dict[str, FormatStats] = {}
        with _unavailable_on_failure(self.config):
            paginator = self.client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=CONVERTED_PREFIX):
                for item in page.get("Contents", []):
                    entry = by_format.setdefault(format_of_key(item["Key"]) or "", FormatStats())
                    entry.objects += 1
                    entry.bytes += int(item["Size"])
        uploads = await self.list_multipart_uploads()
        return StorageStats(
            objects=sum(entry.objects for entry in by_format.values()),
            bytes=sum(entry.bytes for entry in by_format.values()),
            by_format=by_format,
            open_uploads=len(uploads),
        )

    # ------------------------------------------------------------------------- JSON documents

    async def put_json(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        """Store a small JSON document and return its ETag.

        ``if_match``: only replace the version with this ETag; ``if_none_match``: only create.
        A lost condition raises WriteConflict.
        """
        conditions: dict[str, str] = {}
        if if_match is not None:
            conditions["IfMatch"] = f'"{strip_etag(if_match)}"'
        if if_none_match:
            conditions["IfNoneMatch"] = "*"
        try:
            with _unavailable_on_failure(self.config):
                response = await self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, ContentType=JSON_CONTENT_TYPE, **conditions
                )
        except ClientError as exc:
            if conditions and (error_code(exc) in _CONFLICT_CODES or http_status(exc) in (409, 412)):
                raise WriteConflict(f"{key}: {error_code(exc)}") from exc
            raise
        return strip_etag(response["ETag"])

    async def get_json(self, key: str) -> tuple[bytes, str] | None:
        """A small document's bytes and ETag, or None when there is none."""
        try:
            with _unavailable_on_failure(self.config):
                response = await self.client.get_object(Bucket=self.bucket, Key=key)
                async with response["Body"] as body:
                    data = await body.read()
        except ClientError as exc:
            if error_code(exc) in _MISSING_CODES:
                return None
            raise
        return data, strip_etag(response["ETag"])

    # ---------------------------------------------------------------------------------- bucket

    async def check_bucket(self) -> None:
        """Raise StorageMisconfigured (no bucket, credentials refused, wrong region) or StorageUnavailable."""
        with _unavailable_on_failure(self.config, bucket_call=True):
            try:
                await self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if error_code(exc) in ("301", "400", "403"):
                    # HEAD answers carry no error body: a LIST's answer names the cause (wrong secret,
                    # unknown key, region); when the LIST works, HEAD's own answer stands
                    await self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                raise

    async def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (safe to call from every process at start-up)."""
        with _unavailable_on_failure(self.config):
            try:
                await self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
                    raise
            options: dict[str, Any] = {}
            if self.config.region not in ("us-east-1", "auto"):
                options["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
            try:
                await self.client.create_bucket(Bucket=self.bucket, **options)
            except ClientError as exc:
                if error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise
