"""Access: API keys (bearer tokens) on the job endpoints, and a rate limit per key or client address.

Public without a key: health, readiness, metrics, the OpenAPI document, the formats list and the
demo page with its static files. Browsers' EventSource cannot send headers, so GET requests may
also carry the key as ``?access_token=`` (it then appears in access logs: prefer the header).
The rate limit uses the ``limits`` library (moving window, in-memory: per gateway process).
"""

from __future__ import annotations

import hmac
import math
import time

from aiohttp import web
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from actors.gateway.errors import ApiError, HttpCode

#: path prefixes that need no key and are not rate limited
PUBLIC_PREFIXES = ("/healthz", "/readyz", "/metrics", "/api/openapi.json", "/api/formats", "/file-flow-demo",
                   "/static/")
#: query parameter that may carry the key on GET requests (EventSource, plain links)
TOKEN_PARAM = "access_token"


def is_public(path: str) -> bool:
    """Whether ``path`` is open to anyone (and outside the rate limit)."""
    return path == "/" or path.startswith(PUBLIC_PREFIXES)


def presented_key(request: web.Request) -> str | None:
    """The key the request carries: ``Authorization: Bearer <key>``, or ``?access_token=`` on GET."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if request.method in ("GET", "HEAD"):
        return request.query.get(TOKEN_PARAM) or None
    return None


def key_matches(presented: str | None, keys: tuple[str, ...]) -> bool:
    """Whether ``presented`` is one of ``keys`` (constant-time comparison for each)."""
    if presented is None:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented.encode(), key.encode())
    return found


class Access:
    """The access policy of one gateway: its keys and its per-minute limit (0 = no limit)."""

    def __init__(self, *, api_keys: tuple[str, ...], per_minute: int) -> None:
        self.api_keys = api_keys
        self.item = RateLimitItemPerMinute(per_minute) if per_minute > 0 else None
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def identity(self, request: web.Request) -> str:
        """Whom the rate limit counts: the key when keys are configured, else the client address."""
        if self.api_keys:
            return "key:" + (presented_key(request) or "")
        return "addr:" + (request.remote or "unknown")

    def check_key(self, request: web.Request) -> None:
        """Refuse a request without a valid key (when keys are configured) with 401."""
        if self.api_keys and not key_matches(presented_key(request), self.api_keys):
            raise ApiError(401, HttpCode.UNAUTHORIZED, headers={"WWW-Authenticate": 'Bearer realm="getgoodtape"'})

    async def check_rate(self, request: web.Request) -> None:
        """Count the request; refuse it with 429 and Retry-After past the limit."""
        if self.item is None:
            return
        who = self.identity(request)
        if await self.limiter.hit(self.item, who):
            return
        stats = await self.limiter.get_window_stats(self.item, who)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise ApiError(429, HttpCode.RATE_LIMITED, headers={"Retry-After": str(retry_after)})


def access_middleware(access: Access):
    """The middleware applying ``access`` to every non-public request (CORS preflights pass)."""
    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.method == "OPTIONS" or is_public(request.path):
            return await handler(request)
        access.check_key(request)
        await access.check_rate(request)
        return await handler(request)

    return middleware
