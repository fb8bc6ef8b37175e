"""The product's error codes, defined once: code, human message, retryable flag.

Every failure a user can meet carries one of these codes, and the same code reaches the CLI, the
HTTP API, the events on ``ggt.events`` and the logs.
"""

from __future__ import annotations

import enum

import msgspec


class ErrorCode(enum.StrEnum):
    """Stable, documented error codes. Never rename one: other systems match on them."""

    INVALID_REQUEST = "invalid_request"
    URL_NOT_ALLOWED = "url_not_allowed"
    UNSUPPORTED_URL = "unsupported_url"
    NO_MEDIA_FOUND = "no_media_found"
    MEDIA_UNAVAILABLE = "media_unavailable"
    LOGIN_REQUIRED = "login_required"
    MEMBERS_ONLY = "members_only"
    AGE_RESTRICTED = "age_restricted"
    GEO_BLOCKED = "geo_blocked"
    RATE_LIMITED = "rate_limited"
    BOT_CHECK = "bot_check"
    MEDIA_REMOVED = "media_removed"
    SOURCE_REFUSED = "source_refused"
    TOO_LONG = "too_long"
    TOO_LARGE = "too_large"
    SOURCE_TOO_LARGE = "source_too_large"
    LIVE_NOT_SUPPORTED = "live_not_supported"
    CONVERSION_FAILED = "conversion_failed"
    UPLOAD_FAILED = "upload_failed"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    STORAGE_MISCONFIGURED = "storage_misconfigured"
    VERIFICATION_FAILED = "verification_failed"
    TIMEOUT = "timeout"
    UNDECODABLE_MESSAGE = "undecodable_message"
    UNAUTHENTICATED_MESSAGE = "unauthenticated_message"
    FORBIDDEN_DESTINATION = "forbidden_destination"
    INTERNAL = "internal"


class ErrorSpec(msgspec.Struct, frozen=True):
    """What a code means to the person who meets it."""

    message: str
    retryable: bool


#: code → (what happened and what to do, whether trying again can help)
ERRORS: dict[ErrorCode, ErrorSpec] = {
    ErrorCode.INVALID_REQUEST: ErrorSpec(
        "The request is not valid: check the named field against docs/MESSAGES.md.", False
    ),
    ErrorCode.URL_NOT_ALLOWED: ErrorSpec(
        "The URL points at an address or scheme that is not allowed; use a public http(s) URL "
        "(operators can allow networks with GGT_ALLOW_NETWORKS).",
        False,
    ),
    ErrorCode.UNSUPPORTED_URL: ErrorSpec(
        "No extractor understands this URL; use a direct media link or a page of a supported site.", False
    ),
    ErrorCode.NO_MEDIA_FOUND: ErrorSpec("The page holds no audio or video that can be converted.", False),
    ErrorCode.MEDIA_UNAVAILABLE: ErrorSpec(
        "The media could not be fetched (removed, private, or the server refused); check the URL.", True
    ),
    ErrorCode.LOGIN_REQUIRED: ErrorSpec(
        "The media is private or needs a signed-in account; ask its owner to make it public, or an operator "
        "can give the service a cookies file of an account that may see it.", False
    ),
    ErrorCode.MEMBERS_ONLY: ErrorSpec(
        "The media is for the channel's paying members only; it needs the cookies of a member's account.", False
    ),
    ErrorCode.AGE_RESTRICTED: ErrorSpec(
        "The site asks to confirm the viewer's age; it needs the cookies of an age-verified account.", False
    ),
    ErrorCode.GEO_BLOCKED: ErrorSpec(
        "The media is not available from the service's location; an operator can route fetches through an "
        "egress proxy in a country where it is available.", False
    ),
    ErrorCode.RATE_LIMITED: ErrorSpec(
        "The site is rate-limiting this service's address (HTTP 429 or 'try again later'); the job is retried "
        "later. Operators: fewer jobs per site, or another egress address.", True
    ),
    ErrorCode.BOT_CHECK: ErrorSpec(
        "The site asks to prove the viewer is not a bot; retrying from the same address does not help. "
        "Operators: configure a cookies file or a PO-token provider plugin (docs/DEPLOY.md).", False
    ),
    ErrorCode.MEDIA_REMOVED: ErrorSpec(
        "The media was removed or never existed (404/410, deleted, account terminated); check the URL.", False
    ),
    ErrorCode.SOURCE_REFUSED: ErrorSpec(
        "The site refused the media URLs even after they were resolved again (HTTP 403/410): they are bound "
        "to another address or expire at once. Operators: let every actor leave from one address "
        "(GGT_EGRESS_PROXY, docs/DEPLOY.md).", False
    ),
    ErrorCode.TOO_LONG: ErrorSpec(
        "The media is longer than this service's limit; clip it with start/end or use a shorter source.",
        False,
    ),
    ErrorCode.TOO_LARGE: ErrorSpec(
        "The output would exceed the maximum file size; pick a lower quality or clip the source.", False
    ),
    ErrorCode.SOURCE_TOO_LARGE: ErrorSpec(
        "The source is larger than this service fetches for one job (for its duration, or at all: "
        "GGT_MAX_SOURCE_BYTES); clip it with start/end or use a smaller source.", False
    ),
    ErrorCode.LIVE_NOT_SUPPORTED: ErrorSpec(
        "Live streams cannot be converted; try again once the broadcast has ended.", False
    ),
    ErrorCode.CONVERSION_FAILED: ErrorSpec(
        "ffmpeg could not convert the source; it may be damaged, cut off or in an unsupported codec.", False
    ),
    ErrorCode.UPLOAD_FAILED: ErrorSpec(
        "Storing the file failed; the job can be retried (storage refused or dropped the upload).", True
    ),
    ErrorCode.STORAGE_UNAVAILABLE: ErrorSpec(
        "Object storage did not answer; the job is retried, or can be replayed from the dead-letter queue.",
        True,
    ),
    ErrorCode.STORAGE_MISCONFIGURED: ErrorSpec(
        "Object storage refused the service's configuration (bucket, credentials, region or endpoint); "
        "an operator must fix it — `getgoodtape check` says what. Retrying cannot help until then.",
        False,
    ),
    ErrorCode.VERIFICATION_FAILED: ErrorSpec(
        "The stored file did not match what was produced (size, checksum, container, codec or duration); "
        "it was deleted. A media mismatch repeats on every run (check the source is complete); retryable "
        "only when storage lost or changed the bytes.",
        False,
    ),
    ErrorCode.TIMEOUT: ErrorSpec(
        "The job ran past its time limit and was stopped; use a shorter source or a lower quality.", False
    ),
    ErrorCode.UNDECODABLE_MESSAGE: ErrorSpec(
        "The message could not be decoded; fix the publisher (see docs/MESSAGES.md). It was dead-lettered.",
        False,
    ),
    ErrorCode.UNAUTHENTICATED_MESSAGE: ErrorSpec(
        "An internal command arrived without a valid MAC (only the service, holding GGT_BUS_KEY, may send "
        "them; outside systems publish ConvertRequested to ggt.requests). It was dead-lettered; no job was touched.",
        False,
    ),
    ErrorCode.FORBIDDEN_DESTINATION: ErrorSpec(
        "An upload URL did not point at this service's storage endpoint, bucket and key prefix; "
        "nothing was sent. The command was refused.",
        False,
    ),
    ErrorCode.INTERNAL: ErrorSpec(
        "An unexpected error; the job was dead-lettered for an operator to inspect and replay.", True
    ),
}


class Error(msgspec.Struct, frozen=True, kw_only=True):
    """A failure as data: carried in JobFailed, StepFailed and the HTTP API."""

    code: ErrorCode
    message: str
    retryable: bool
    detail: str = ""

    @classmethod
    def of(cls, code: ErrorCode, detail: str = "") -> Error:
        """The error for ``code`` with its standard message; ``detail`` says what exactly happened."""
        spec = ERRORS[code]
        return cls(code=code, message=spec.message, retryable=spec.retryable, detail=detail[:2000])


class JobError(Exception):
    """Raised by actor code for a failure a user can see; the runtime turns it into events."""

    def __init__(self, code: ErrorCode, detail: str = "", *, retryable: bool | None = None) -> None:
        super().__init__(f"{code}: {detail}" if detail else str(code))
        self.code = code
        self.detail = detail
        self.retryable = ERRORS[code].retryable if retryable is None else retryable

    def to_error(self) -> Error:
        """This failure as a wire value."""
        spec = ERRORS[self.code]
        return Error(code=self.code, message=spec.message, retryable=self.retryable, detail=self.detail[:2000])


class HttpErrorCode(enum.StrEnum):
    """Codes of failures of the HTTP API itself (docs/API.md); a job's own failure keeps its ErrorCode."""

    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_STREAMS = "too_many_streams"
    JOB_NOT_FOUND = "job_not_found"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TOO_LARGE = "request_too_large"
    JOB_NOT_FINISHED = "job_not_finished"
    BUS_UNAVAILABLE = "bus_unavailable"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    INTERNAL = "internal"


#: the message a caller sees for each HTTP-level code
HTTP_ERRORS: dict[HttpErrorCode, str] = {
    HttpErrorCode.INVALID_REQUEST: "The request is not valid: check the named field against docs/API.md.",
    HttpErrorCode.UNAUTHORIZED: "A valid API key is required: send it as 'Authorization: Bearer <key>'.",
    HttpErrorCode.RATE_LIMITED: "Too many requests for this key or address; wait for Retry-After seconds.",
    HttpErrorCode.TOO_MANY_STREAMS: "Too many open event streams for this key; close one first.",
    HttpErrorCode.JOB_NOT_FOUND: "No job with this id is known.",
    HttpErrorCode.NOT_FOUND: "No such endpoint; see /api/openapi.json.",
    HttpErrorCode.METHOD_NOT_ALLOWED: "This endpoint does not accept that method.",
    HttpErrorCode.REQUEST_TOO_LARGE: "The request body is too large.",
    HttpErrorCode.JOB_NOT_FINISHED: "The job has not completed yet; follow its events.",
    HttpErrorCode.BUS_UNAVAILABLE: "The message broker did not accept the request; try again shortly.",
    HttpErrorCode.STORAGE_UNAVAILABLE: "Object storage did not answer; try again shortly.",
    HttpErrorCode.INTERNAL: "An unexpected error; it was logged.",
}
