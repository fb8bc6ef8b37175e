"""Where an uploader may send bytes, and when a command's upload URLs can no longer be used. Pure.

The uploader holds no credentials; what keeps it from being turned against another host is that every
URL it is handed (put, parts, abort) must address this service's bucket on the configured endpoint.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from urllib.parse import unquote, urlsplit

from actors.runtime.settings import Settings
from messages.errors import ErrorCode, JobError
from messages.types import StreamToStorage, UploadTarget
from storage.keys import CONVERTED_PREFIX

#: default port of each scheme, for comparing an upload URL with the storage endpoint
DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, lower-cased, or None for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.username or parts.password:
        return None
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme]


def upload_url_allowed(url: str, settings: Settings, *, key: str) -> bool:
    """Whether ``url`` addresses object ``key`` under the converted-files prefix in the configured
    bucket on the configured endpoint (``GGT_S3_ENDPOINT``, path-style or virtual-hosted): the only
    place an uploader may send bytes (or an abort) to."""
    endpoint = _origin(settings.s3_endpoint) if settings.s3_endpoint else None
    target = _origin(url)
    if endpoint is None or target is None or not key.startswith(CONVERTED_PREFIX) or ".." in key.split("/"):
        return False
    scheme, host, port = endpoint
    base = urlsplit(settings.s3_endpoint).path.rstrip("/")
    path = unquote(urlsplit(url).path)
    if settings.s3_path_style:
        return target == endpoint and path == f"{base}/{settings.s3_bucket}/{key}"
    return target == (scheme, f"{settings.s3_bucket}.{host}", port) and path == f"{base}/{key}"


def target_problem(target: UploadTarget, settings: Settings) -> JobError | None:
    """``forbidden_destination`` when any URL of ``target`` (put, parts, abort) is not for this
    service's storage (``upload_url_allowed``), else None."""
    urls = [target.put_url]
    if target.multipart is not None:
        urls += [*target.multipart.part_urls, target.multipart.abort_url]
    for index, url in enumerate(urls):
        if not upload_url_allowed(url, settings, key=target.key):
            # the URL itself stays out of the detail: it may carry a signature
            return JobError(ErrorCode.FORBIDDEN_DESTINATION,
                            f"upload URL #{index} does not address {target.key!r} in the configured bucket")
    return None


def stale_target(message: StreamToStorage, *, replays: int, now: datetime) -> str:
    """Why the command's upload URLs cannot be used (empty when they can): a replayed copy whose
    upload may have been aborted meanwhile, or URLs that expire before the step could finish."""
    if replays > message.renewals:
        return f"replayed command (replay {replays}): the upload it names may be gone"
    if message.target.expires_at:
        expires = datetime.fromisoformat(message.target.expires_at)
        if expires < now + timedelta(seconds=message.time_limit):
            return f"upload URLs expire at {message.target.expires_at}, before the step could finish"
    return ""
