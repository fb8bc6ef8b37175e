"""Access: API keys (bearer tokens) name tenants; rate limits per tenant, per client address, and on
failed authentication.

``GGT_API_KEYS`` holds ``tenant:token`` entries; a bare ``token`` is the tenant ``key-<first 8 hex of
sha256(token)>`` (stable, and it names no part of the token). Without keys every caller is the
default tenant. Public without a key: health, readiness, metrics, the OpenAPI document, the formats
list and the demo page with its static files; readiness and metrics are still rate-limited per
client address. Browsers' EventSource cannot send headers, so GET requests may also carry the key
as ``?access_token=`` (it then appears in access logs: prefer the header). The limits use the
``limits`` library (moving window, in-memory: per gateway process).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time

import msgspec
from aiohttp import web
from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from actors.gateway.errors import ApiError, HttpCode
from messages.routing import BARE_KEY_TENANT_PREFIX, DEFAULT_TENANT, is_tenant, reserved_tenant

#: path prefixes that need no key
PUBLIC_PREFIXES = ("/healthz", "/readyz", "/metrics", "/api/openapi.json", "/api/formats", "/file-flow-demo",
                   "/static/")
#: public paths that cost a broker or storage call: rate-limited per client address
MONITOR_PREFIXES = ("/readyz", "/metrics")
#: query parameter that may carry the key on GET requests (EventSource, plain links)
TOKEN_PARAM = "access_token"
#: where a request's tenant is kept once its key is checked
TENANT = web.RequestKey("tenant", str)
#: same shape as messages.types.TenantId
#: shortest token accepted (a guessable key is no key)
MIN_TOKEN_CHARS = 16


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """One accepted token and the tenant it names."""

    tenant: str
    token: str


def bare_key_tenant(token: str) -> str:
    """The tenant of a token configured without one: ``key-`` + the first 8 hex of its sha256."""
    return BARE_KEY_TENANT_PREFIX + hashlib.sha256(token.encode()).hexdigest()[:8]


def parse_api_keys(entries: tuple[str, ...]) -> tuple[ApiKey, ...]:
    """The keys of ``GGT_API_KEYS`` entries; ValueError naming the entry for a blank or short token, a
    bad tenant name or a token given twice (the token itself is never repeated in the message)."""
    keys: list[ApiKey] = []
    for number, entry in enumerate(entries, start=1):
        tenant, sep, token = entry.partition(":")
        if not sep:
            tenant, token = "", entry
        token = token.strip()
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"GGT_API_KEYS entry {number} has a blank token (or one with spaces)")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"GGT_API_KEYS entry {number}: a token needs at least {MIN_TOKEN_CHARS} characters")
        if reserved_tenant(tenant.strip()):
            raise ValueError(f"GGT_API_KEYS entry {number}: tenant {tenant.strip()!r} is reserved (the default "
                             f"tenant and {BARE_KEY_TENANT_PREFIX}* are the service's own)")
        tenant = tenant.strip() or bare_key_tenant(token)
        if not is_tenant(tenant):
            raise ValueError(f"GGT_API_KEYS entry {number}: tenant {tenant!r} is not [a-z0-9][a-z0-9_-]{{0,31}}")
        if any(k.token == token for k in keys):
            raise ValueError(f"GGT_API_KEYS entry {number} repeats a token")
        keys.append(ApiKey(tenant=tenant, token=token))
    return tuple(keys)


def is_public(path: str) -> bool:
    """Whether ``path`` is open to anyone without a key."""
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


def tenant_of(presented: str | None, keys: tuple[ApiKey, ...]) -> str | None:
    """The tenant whose token is ``presented``, or None (every key compared in constant time)."""
    if presented is None:
        return None
    found: str | None = None
    for key in keys:
        if hmac.compare_digest(presented.encode(), key.token.encode()):
            found = key.tenant
    return found


def request_tenant(request: web.Request) -> str:
    """The tenant the access middleware found for this request."""
    return request.get(TENANT, DEFAULT_TENANT)


class Access:
    """The access policy of one gateway: its keys, its per-minute limit (0 = no limit) and the limit
    on failed authentications per client address."""

    def __init__(self, *, api_keys: tuple[ApiKey, ...], per_minute: int, failures_per_minute: int = 10) -> None:
        self.api_keys = api_keys
        self.item = RateLimitItemPerMinute(per_minute) if per_minute > 0 else None
        self.failures = RateLimitItemPerMinute(failures_per_minute) if failures_per_minute > 0 else None
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    async def authenticate(self, request: web.Request) -> str:
        """The request's tenant; 401 for a missing or wrong key, 429 for an address past its failures."""
        if not self.api_keys:
            return DEFAULT_TENANT
        address = "fail:" + (request.remote or "unknown")
        if self.failures is not None and not await self.limiter.test(self.failures, address):
            await self._refuse(self.failures, address)
        tenant = tenant_of(presented_key(request), self.api_keys)
        if tenant is None:
            if self.failures is not None:
                await self.limiter.hit(self.failures, address)
            raise ApiError(401, HttpCode.UNAUTHORIZED, headers={"WWW-Authenticate": 'Bearer realm="getgoodtape"'})
        return tenant

    async def check_rate(self, who: str) -> None:
        """Count a request of ``who``; refuse it with 429 and Retry-After past the limit."""
        if self.item is not None and not await self.limiter.hit(self.item, who):
            await self._refuse(self.item, who)

    async def _refuse(self, item: RateLimitItem, who: str) -> None:
        stats = await self.limiter.get_window_stats(item, who)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise ApiError(429, HttpCode.RATE_LIMITED, headers={"Retry-After": str(retry_after)})


def access_middleware(access: Access):
    """The middleware applying ``access``: keys and the limit on job endpoints, the per-address limit on
    readiness and metrics, nothing on the rest of the public paths (CORS preflights pass)."""
    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.method == "OPTIONS":
            return await handler(request)
        if is_public(request.path):
            if request.path.startswith(MONITOR_PREFIXES):
                await access.check_rate("addr:" + (request.remote or "unknown"))
            return await handler(request)
        tenant = await access.authenticate(request)
        request[TENANT] = tenant
        await access.check_rate(f"tenant:{tenant}" if access.api_keys else "addr:" + (request.remote or "unknown"))
        return await handler(request)

    return middleware
