"""``getgoodtape check``: test what this process's role needs before it takes work.

Broker (user, vhost, topology), storage (bucket, credentials, presigned PUT/GET through the configured
and the public endpoint, conditional writes, clock skew), the programs (ffmpeg, ffprobe, yt-dlp,
its solver and JavaScript runtime) and the operator's levers (egress proxy, cookies, yt-dlp options).
Prints a table — what, status, the fix — and exits non-zero on a
failure. ``getgoodtape run <actor>`` and ``convert`` run the same checks for their roles at start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec

from actors.adapters import tools
from actors.runtime.settings import Settings, load_settings

#: every role ``check`` knows; ``all`` is every one of them
ROLES = ("coordinator", "converter", "uploader", "verifier", "gateway")
#: seconds the broker check may take before it counts as unreachable
BROKER_TIMEOUT = 10.0
#: seconds a storage call of the check may take (connect and read)
STORAGE_TIMEOUT = 5.0
#: clock skew against the store that only warns, and the one that fails: S3 refuses header-signed
#: requests beyond 15 minutes, and presigned URLs start or end early by the skew
SKEW_WARN_S = 60.0
SKEW_FAIL_S = 15 * 60.0
#: where the check writes its probe objects (deleted at once)
CHECK_PREFIX = "check/"


class Status(enum.StrEnum):
    """How one check ended."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIPPED = "skipped"


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the table: what was checked, how it ended, what was seen, and the fix."""

    what: str
    status: Status
    detail: str = ""
    fix: str = ""


def exit_status(results: Iterable[Check]) -> int:
    """1 when any check failed, else 0 (warnings do not fail)."""
    return 1 if any(r.status is Status.FAIL for r in results) else 0


def failures(results: Iterable[Check]) -> list[Check]:
    """The failed checks."""
    return [r for r in results if r.status is Status.FAIL]


def needs(role: str) -> set[str]:
    """What a role depends on: ``broker``, ``storage-write``, ``storage-read``, ``ffmpeg``, ``ffprobe``, ``yt-dlp``."""
    table = {
        "coordinator": {"broker", "storage-write"},
        "converter": {"broker", "yt-dlp"},
        "uploader": {"broker", "ffmpeg"},
        "verifier": {"broker", "storage-read", "ffprobe"},
        "gateway": {"broker", "storage-read"},
    }
    if role == "all":
        return set().union(*table.values())
    return set(table[role])


def redact_url(url: str) -> str:
    """``url`` without its password (broker URLs carry one)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def broker_failure(exc: BaseException, url: str) -> Check:
    """The failed broker check for an exception of connecting or declaring: what it means and the fix."""
    shown = redact_url(url)
    user = urlsplit(url).username or "guest"
    text = f"{type(exc).__name__}: {exc}"
    if "ACCESS_REFUSED" in text or "AuthenticationError" in type(exc).__name__:
        return Check(what="broker", status=Status.FAIL,
                     detail=f"{shown}: the broker refused user {user!r} ({text[:200]})",
                     fix="check the user and password in GGT_AMQP_URL (rabbitmqctl list_users)")
    if "NOT_ALLOWED" in text or "Connection.Close" in text or "vhost" in text.lower():
        return Check(what="broker", status=Status.FAIL,
                     detail=f"{shown}: the broker refused the vhost for user {user!r} ({text[:200]})",
                     fix="create the vhost or grant the user on it (rabbitmqctl set_permissions -p VHOST USER …)")
    if "PRECONDITION_FAILED" in text:
        return Check(what="broker topology", status=Status.FAIL, detail=f"{shown}: {text[:300]}",
                     fix="a queue or exchange exists with other arguments; see docs/DEAD_LETTERS.md (queue settings)")
    if "ACCESS_REFUSED" in text or "403" in text:
        return Check(what="broker topology", status=Status.FAIL, detail=f"{shown}: {text[:300]}",
                     fix="grant the service user configure/write/read on the ggt.* names (docs/DEPLOY.md)")
    return Check(what="broker", status=Status.FAIL, detail=f"{shown} is unreachable ({text[:200]})",
                 fix="check GGT_AMQP_URL's host and port, and that RabbitMQ runs and this host may reach it")


async def check_broker(settings: Settings) -> Check:
    """Connect with the configured user and declare the topology (idempotent) as the actors will."""
    if not settings.amqp_url:
        return Check(what="broker", status=Status.OK, detail="in-memory bus (GGT_AMQP_URL not set: one process only)")
    from actors.bootstrap.wiring import make_bus

    bus = make_bus(settings, name="check")
    started = time.monotonic()
    try:
        async with asyncio.timeout(BROKER_TIMEOUT):
            await bus.start()
    except TimeoutError:
        return Check(what="broker", status=Status.FAIL,
                     detail=f"{redact_url(settings.amqp_url)} did not answer within {BROKER_TIMEOUT:.0f} s",
                     fix="check GGT_AMQP_URL's host and port, and that RabbitMQ runs and this host may reach it")
    except Exception as exc:
        return broker_failure(exc, settings.amqp_url)
    finally:
        with contextlib.suppress(Exception):
            await bus.close()
    notes = getattr(bus, "topology_notes", [])
    if notes:
        return Check(what="broker topology", status=Status.WARN, detail="; ".join(notes)[:600],
                     fix="the actors apply the configured limit themselves; see docs/DEAD_LETTERS.md "
                         "to align the broker's own backstop")
    return Check(what="broker", status=Status.OK,
                 detail=f"{redact_url(settings.amqp_url)}: connected, topology declared "
                        f"({(time.monotonic() - started) * 1000:.0f} ms)")


def _storage_fix(exc: BaseException, endpoint: str) -> tuple[str, str]:
    """(detail, fix) for a storage failure of the check."""
    from storage.errors import StorageMisconfigured, StorageUnavailable

    if isinstance(exc, StorageMisconfigured):
        detail, _, fix = str(exc).partition("; ")
        return detail, fix
    if isinstance(exc, StorageUnavailable):
        return str(exc)[:300], f"check GGT_S3_ENDPOINT ({endpoint}) is right and reachable from this host"
    return f"{type(exc).__name__}: {exc}"[:300], "see the detail; `getgoodtape check` again once fixed"


def skew_check(server_date: str | None, *, now: datetime) -> Check:
    """Clock skew against the store's Date header."""
    if not server_date:
        return Check(what="storage clock", status=Status.WARN, detail="the store sent no Date header")
    try:
        theirs = parsedate_to_datetime(server_date)
    except (TypeError, ValueError):
        return Check(what="storage clock", status=Status.WARN, detail=f"unreadable Date header {server_date!r}")
    skew = (now - theirs).total_seconds()
    detail = f"this host is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the store"
    fix = "synchronise this host's clock (NTP): presigned URLs and signed requests depend on it"
    if abs(skew) >= SKEW_FAIL_S:
        return Check(what="storage clock", status=Status.FAIL, detail=detail, fix=fix)
    if abs(skew) >= SKEW_WARN_S:
        return Check(what="storage clock", status=Status.WARN, detail=detail, fix=fix)
    return Check(what="storage clock", status=Status.OK, detail=detail)


async def _fetch(http: aiohttp.ClientSession, method: str, url: str, *, data: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes, str | None]:
    async with http.request(method, url, data=data, headers=headers) as response:
        return response.status, await response.read(), response.headers.get("Date")


async def check_storage(settings: Settings, *, write: bool) -> list[Check]:
    """Bucket and credentials, conditional writes (``write``), presigned PUT/GET on both endpoints, skew."""
    from actors.runtime.storage import storage_config
    from messages.codec import new_id
    from storage.errors import StorageError, WriteConflict
    from storage.s3 import Storage

    if not settings.s3_endpoint:
        from actors.bootstrap.wiring import EMBEDDED_S3_MISSING

        try:
            import storage.embedded
        except ImportError:
            return [Check(what="storage", status=Status.FAIL, detail="GGT_S3_ENDPOINT is not set and the embedded "
                          "S3 is not installed", fix=EMBEDDED_S3_MISSING.split(": ", 1)[1])]
        return [Check(what="storage", status=Status.OK,
                      detail="embedded S3 (GGT_S3_ENDPOINT not set: this process only)")]
    config = storage_config(settings)
    where = f"bucket {config.bucket!r} at {config.endpoint}"
    results: list[Check] = []
    options = {"connect_timeout": STORAGE_TIMEOUT, "read_timeout": STORAGE_TIMEOUT, "max_attempts": 1}
    timeout = aiohttp.ClientTimeout(total=STORAGE_TIMEOUT * 2)
    async with contextlib.AsyncExitStack() as stack:
        storage = await stack.enter_async_context(Storage(config, **options))
        http = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        try:
            await storage.check_bucket()
        except (StorageError, aiohttp.ClientError, OSError) as exc:
            detail, fix = _storage_fix(exc, config.endpoint)
            return [Check(what="storage bucket", status=Status.FAIL, detail=detail, fix=fix)]
        results.append(Check(what="storage bucket", status=Status.OK, detail=f"{where}: exists, credentials accepted"))

        key = f"{CHECK_PREFIX}{new_id()}"
        server_date: str | None = None
        try:
            if write:
                results.append(await _conditional_writes(storage, key + ".json", WriteConflict))
                body = b"getgoodtape check\n"
                put = await storage.presign_put(key, content_type="text/plain", expires=300)
                status, _, server_date = await _fetch(http, "PUT", put, data=body,
                                                      headers={"Content-Type": "text/plain"})
                if status != 200:
                    results.append(Check(what="presigned PUT", status=Status.FAIL, detail=f"{where}: HTTP {status}",
                                         fix="the store refused a presigned upload: check the key's write permission "
                                             "and GGT_S3_REGION"))
                else:
                    results.append(Check(what="presigned PUT", status=Status.OK, detail=f"{len(body)} bytes stored"))
                    results += await _presigned_gets(settings, storage, http, key, body, stack, options)
            else:
                # a presigned GET of a key that does not exist: 404 proves the signature is accepted
                url = await storage.presign_get(key, expires=300)
                status, _, server_date = await _fetch(http, "GET", url)
                ok = status == 404
                results.append(Check(what="presigned GET", status=Status.OK if ok else Status.FAIL,
                                     detail=f"{where}: HTTP {status} for a missing key"
                                     + (" (signature accepted)" if ok else ""),
                                     fix="" if ok else
                                     "the store refused a presigned GET: check the secret key and region"))
        except (StorageError, aiohttp.ClientError, OSError) as exc:
            detail, fix = _storage_fix(exc, config.endpoint)
            results.append(Check(what="storage access", status=Status.FAIL, detail=detail, fix=fix))
        finally:
            if write:
                for name in (key, key + ".json"):
                    with contextlib.suppress(Exception):
                        await storage.delete(name)
        results.append(skew_check(server_date, now=datetime.now(UTC)))
    return results


async def _conditional_writes(storage, key: str, conflict: type[Exception]) -> Check:
    """If-None-Match: * must refuse a second create; If-Match must refuse a stale ETag."""
    fix = ("job records depend on conditional writes (If-None-Match / If-Match): use a store that honours "
           "them (AWS S3, R2, MinIO ≥ 2024)")
    etag = await storage.put_json(key, b"{}", if_none_match=True)
    lacking = []
    try:
        await storage.put_json(key, b"{}", if_none_match=True)
        lacking.append("If-None-Match")
    except conflict:
        pass
    try:
        await storage.put_json(key, b"{}", if_match="0" * 32)
        lacking.append("If-Match")
    except conflict:
        pass
    await storage.put_json(key, b"{}", if_match=etag)
    if lacking:
        return Check(what="conditional writes", status=Status.FAIL,
                     detail=f"the store ignores {' and '.join(lacking)}", fix=fix)
    return Check(what="conditional writes", status=Status.OK, detail="If-None-Match and If-Match honoured")


async def _presigned_gets(settings: Settings, storage, http: aiohttp.ClientSession, key: str, body: bytes,
                          stack: contextlib.AsyncExitStack, options: dict) -> list[Check]:
    """The probe object read back through a presigned GET on the configured and the public endpoint."""
    from actors.runtime.storage import storage_config
    from storage.s3 import Storage

    results = []
    endpoints = [("presigned GET", storage)]
    if settings.s3_public_endpoint and settings.s3_public_endpoint != settings.s3_endpoint:
        public = await stack.enter_async_context(Storage(storage_config(settings, public=True), **options))
        endpoints.append(("presigned GET (public endpoint)", public))
    for what, store in endpoints:
        url = await store.presign_get(key, expires=300)
        try:
            status, got, _ = await _fetch(http, "GET", url)
        except (aiohttp.ClientError, OSError) as exc:
            results.append(Check(what=what, status=Status.FAIL, detail=f"{store.config.endpoint}: {exc}"[:300],
                                 fix="download URLs use this endpoint: it must be reachable "
                                     "(GGT_S3_PUBLIC_ENDPOINT is the address users reach storage by)"))
            continue
        ok = status == 200 and got == body
        results.append(Check(what=what, status=Status.OK if ok else Status.FAIL,
                             detail=f"{store.config.endpoint}: HTTP {status}" + (", content matches" if ok else ""),
                             fix="" if ok else "download URLs on this endpoint do not work: check "
                                               "GGT_S3_PUBLIC_ENDPOINT / GGT_S3_REGION"))
    return results


#: longest lifetime S3 accepts for a presigned URL (SigV4: 7 days)
MAX_PRESIGN_S = 7 * 24 * 3600


def check_settings(settings: Settings, roles: Sequence[str]) -> list[Check]:
    """Settings that cannot work, and credentials a role should not hold (least privilege)."""
    wanted: set[str] = set().union(*(needs(role) for role in roles)) if roles else set()
    problems = []
    if settings.delivery_limit < 1:
        problems.append(("GGT_DELIVERY_LIMIT", f"is {settings.delivery_limit}", "set it to 1 or more"))
    if settings.max_attempts < 1:
        problems.append(("GGT_MAX_ATTEMPTS", f"is {settings.max_attempts}", "set it to 1 or more"))
    if not settings.retry_delays or any(d <= 0 for d in settings.retry_delays):
        problems.append(("GGT_RETRY_DELAYS", f"is {settings.retry_delays}", "give positive seconds, e.g. 1,5,25,120"))
    if not 0 < settings.download_url_ttl <= MAX_PRESIGN_S:
        problems.append(("GGT_DOWNLOAD_URL_TTL", f"is {settings.download_url_ttl}",
                         f"S3 accepts 1 … {MAX_PRESIGN_S} seconds (7 days)"))
    results = [Check(what=f"setting {name}", status=Status.FAIL, detail=detail, fix=fix)
               for name, detail, fix in problems]
    holds = settings.s3_access_key_id or settings.s3_secret_access_key
    if roles and holds and not wanted & {"storage-write", "storage-read"}:
        results.append(Check(what="least privilege", status=Status.WARN,
                             detail=f"{', '.join(roles)} holds storage credentials it never uses",
                             fix="remove GGT_S3_ACCESS_KEY_ID / GGT_S3_SECRET_ACCESS_KEY from this process "
                                 "(uploader and converter use presigned URLs only)"))
    return results


def check_programs(wanted: set[str]) -> list[Check]:
    """ffmpeg, ffprobe, yt-dlp, its solver and JavaScript runtime, as far as ``wanted`` needs them."""
    results = []
    for name in ("ffmpeg", "ffprobe"):
        if name in wanted:
            tool = tools.program(name)
            results.append(Check(what=name, status=Status.OK if tool.path else Status.FAIL,
                                 detail=f"{tool.version} ({tool.path})" if tool.path else "not found on PATH",
                                 fix="" if tool.path else "install ffmpeg (Debian: apt-get install ffmpeg)"))
    if "yt-dlp" in wanted:
        ytdlp, ejs, deno = tools.package("yt-dlp"), tools.package("yt-dlp-ejs"), tools.deno()
        results.append(Check(what="yt-dlp", status=Status.OK if ytdlp.version else Status.FAIL,
                             detail=ytdlp.version or "not installed",
                             fix="" if ytdlp.version else "pip install yt-dlp"))
        solver_fix = "pip install 'yt-dlp[default]' (YouTube needs it for full format access)"
        results.append(Check(what="yt-dlp JS solver (yt-dlp-ejs)", status=Status.OK if ejs.version else Status.WARN,
                             detail=ejs.version or "not installed", fix="" if ejs.version else solver_fix))
        results.append(Check(what="JavaScript runtime (deno)", status=Status.OK if deno.path else Status.WARN,
                             detail=f"{deno.version} ({deno.path})" if deno.path else "not found",
                             fix="" if deno.path else "pip install deno (YouTube needs it for full format access)"))
    return results


#: seconds the check waits for a TCP connection to the egress proxy
EGRESS_TIMEOUT = 5.0
#: what to do about a lever that cannot be used, by setting
LEVER_FIXES = {
    "GGT_EGRESS_PROXY": "give http://host:port or http://user:pass@host:port (HTTP CONNECT) or socks5://…, or unset it",
    "GGT_COOKIES_FILE": "export the cookies in Netscape format (as yt-dlp's --cookies reads them) to a file "
                        "this process may read, or unset it",
    "GGT_YTDLP_EXTRACTOR_ARGS": "write IE_KEY:ARGS entries separated by spaces, as yt-dlp's --extractor-args",
    "GGT_YTDLP_PLUGINS": "name installed yt-dlp plugin packages by their pip names (pip show NAME)",
}


async def check_levers(settings: Settings) -> list[Check]:
    """The operator's levers (egress proxy, cookies, extractor arguments, plugins): usable or not,
    shown without a secret (proxy credentials masked, no cookie value, argument names only)."""
    from actors.adapters.levers import lever_problems
    from actors.guard.cookies import load_cookies
    from actors.guard.egress import masked_proxy_url
    from actors.guard.ytdlp_levers import parse_extractor_args, plugin_files

    problems = lever_problems(settings)
    results = [Check(what=f"setting {name}", status=Status.FAIL, detail=problem, fix=LEVER_FIXES[name])
               for name, problem in problems]
    failed = {name for name, _ in problems}
    if "GGT_EGRESS_PROXY" not in failed:
        results.append(await _check_egress(settings.egress_proxy, masked_proxy_url(settings.egress_proxy)))
    if settings.cookies_file and "GGT_COOKIES_FILE" not in failed:
        jar = load_cookies(settings.cookies_file)
        domains = sorted({cookie.domain.lstrip(".") for cookie in jar})
        results.append(Check(what="cookies file", status=Status.OK,
                             detail=f"{settings.cookies_file}: {len(jar)} cookies for {', '.join(domains)[:300]}"))
    if settings.ytdlp_extractor_args and "GGT_YTDLP_EXTRACTOR_ARGS" not in failed:
        args = parse_extractor_args(settings.ytdlp_extractor_args)
        shown = "; ".join(f"{key}: {', '.join(sorted(values))}" for key, values in sorted(args.items()))
        results.append(Check(what="yt-dlp extractor args", status=Status.OK, detail=f"{shown} (values not shown)"))
    if "GGT_YTDLP_PLUGINS" not in failed:
        loaded = [f"{name} ({len(plugin_files(name))} modules)" for name in settings.ytdlp_plugins]
        results.append(Check(what="yt-dlp plugins", status=Status.OK,
                             detail=", ".join(loaded) if loaded else "none (every installed plugin stays off)"))
    return results


async def _check_egress(url: str, shown: str) -> Check:
    if not url:
        return Check(what="egress", status=Status.OK, detail="direct (GGT_EGRESS_PROXY not set)")
    parts = urlsplit(url)
    try:
        async with asyncio.timeout(EGRESS_TIMEOUT):
            _, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.close()
    except (OSError, TimeoutError) as exc:
        return Check(what="egress proxy", status=Status.FAIL, detail=f"{shown} is unreachable ({type(exc).__name__})",
                     fix="check GGT_EGRESS_PROXY's host and port, and that this host may reach the proxy")
    return Check(what="egress proxy", status=Status.OK, detail=f"every fetch leaves through {shown}")


async def run_checks(settings: Settings, roles: Sequence[str]) -> list[Check]:
    """Every check the roles need, broker and storage concurrently."""
    wanted: set[str] = set().union(*(needs(role) for role in roles))
    jobs = []
    if "broker" in wanted:
        jobs.append(check_broker(settings))
    if wanted & {"storage-write", "storage-read"}:
        jobs.append(check_storage(settings, write="storage-write" in wanted))
    found = await asyncio.gather(*jobs)
    results = check_settings(settings, roles)
    results += [r for group in found for r in (group if isinstance(group, list) else [group])]
    if wanted & {"yt-dlp", "ffmpeg"}:  # the roles whose guard fetches users' URLs: converter, uploader
        # after the gather: a broker set-up that refuses to start (SystemExit) ends it alone
        results += await check_levers(settings)
    return results + await asyncio.to_thread(check_programs, wanted)


def render(results: Sequence[Check], *, as_json: bool = False, out=None) -> None:
    """The table (what, status, detail, fix) — or one JSON object per check and line."""
    out = out or sys.stdout
    if as_json:
        for result in results:
            out.write(msgspec.json.encode(result).decode() + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    colours = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "red", Status.SKIPPED: "dim"}
    table = Table("what", "status", "detail", "fix", show_lines=False)
    for r in results:
        table.add_row(r.what, f"[{colours[r.status]}]{r.status.value}[/]", r.detail, r.fix)
    Console(file=out, width=max(120, Console(file=out).width)).print(table)


async def preflight(settings: Settings, roles: Sequence[str]) -> None:
    """The checks of ``roles`` before a process takes work: exits non-zero with the table on a failure."""
    stop_on_failure(await run_checks(settings, roles))


def stop_on_failure(results: Sequence[Check]) -> None:
    """Exit non-zero with the table of the failed checks and their fixes, if any failed."""
    if exit_status(results):
        render(failures(results), out=sys.stderr)
        for failed in failures(results):
            print(f"getgoodtape: {failed.what}: {failed.detail}" + (f" — fix: {failed.fix}" if failed.fix else ""),
                  file=sys.stderr)
        raise SystemExit(1)


def _cmd_check(args: argparse.Namespace) -> int:
    settings = load_settings()
    roles = list(ROLES) if args.role == "all" else [args.role]
    started = time.monotonic()
    results = asyncio.run(run_checks(settings, roles))
    render(results, as_json=args.json)
    if not args.json:
        print(f"{len(results)} checks in {time.monotonic() - started:.2f} s: "
              f"{len(failures(results))} failed", file=sys.stderr)
    return exit_status(results)


def check_arguments(check: argparse.ArgumentParser) -> None:
    """The arguments of ``check``."""
    check.add_argument("--role", choices=[*ROLES, "all"], default="all",
                       help="the actor (or gateway) this process runs (default: all)")
    check.add_argument("--json", action="store_true", help="one JSON object per check and line on stdout")
    check.set_defaults(fn=_cmd_check)
