"""Errors over HTTP: one JSON shape, ``{"error": {"code", "message", ...}}``, and never a stack trace."""

from __future__ import annotations

import logging

import msgspec
from aiohttp import web

from messages.errors import HTTP_ERRORS as MESSAGES
from messages.errors import Error
from messages.errors import HttpErrorCode as HttpCode

log = logging.getLogger("getgoodtape.gateway")


class ApiError(Exception):
    """Raised by a handler to answer with a coded JSON error."""

    def __init__(self, status: int, code: HttpCode, *, field: str = "", detail: str = "",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {detail}" if detail else str(code))
        self.status, self.code, self.field, self.detail = status, code, field, detail
        self.headers = headers or {}


def error_body(code: str, message: str, **extra: object) -> dict[str, object]:
    """The JSON body of every error answer (empty extras left out)."""
    return {"error": {"code": code, "message": message, **{k: v for k, v in extra.items() if v not in ("", None)}}}


def json_response(data: object, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer encoded by msgspec (Structs, enums and datetimes included)."""
    return web.Response(body=msgspec.json.encode(data), status=status, headers=headers,
                        content_type="application/json")


def api_error_response(exc: ApiError) -> web.Response:
    """The answer for an ApiError."""
    body = error_body(exc.code, MESSAGES[exc.code], field=exc.field, detail=exc.detail)
    return json_response(body, status=exc.status, headers=exc.headers)


def job_error_response(error: Error, *, status: int) -> web.Response:
    """The answer carrying a job's own coded error (the same code as in its JobFailed event)."""
    body = error_body(error.code, error.message, detail=error.detail, retryable=error.retryable)
    return json_response(body, status=status)


#: HTTP statuses aiohttp raises itself → our code
_HTTP_CODES = {404: HttpCode.NOT_FOUND, 405: HttpCode.METHOD_NOT_ALLOWED, 413: HttpCode.REQUEST_TOO_LARGE,
               400: HttpCode.INVALID_REQUEST}


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Turn every failure into the JSON error shape; unexpected ones are logged, never shown."""
    try:
        return await handler(request)
    except ApiError as exc:
        return api_error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, HttpCode.INTERNAL if exc.status >= 500 else HttpCode.INVALID_REQUEST)
        response = json_response(error_body(code, MESSAGES[code]), status=exc.status)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error in a request", extra={"path": request.path})
        return json_response(error_body(HttpCode.INTERNAL, MESSAGES[HttpCode.INTERNAL]), status=500)
