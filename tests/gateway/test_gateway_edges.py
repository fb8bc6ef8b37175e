"""The gateway's edges, tried as an attacker would: start-up refusals, guessing keys, opening streams
without end, hammering the monitoring endpoints, hostile JSON and ids, error texts that leak."""

from __future__ import annotations

import contextlib
import socket
from urllib.parse import urlsplit

import aiohttp
import pytest

from actors.gateway.app import CONTENT_SECURITY_POLICY, is_loopback_host, run_gateway, settings_problems
from actors.gateway.keys import MONITOR, GatewayOptions
from actors.runtime.settings import load_settings
from tests.gateway.test_gateway import bare_gateway, read_events

TOKEN_A, TOKEN_B = "tenant-a-token-0123456789", "tenant-b-token-0123456789"
KEYS = (f"alice:{TOKEN_A}", f"bob:{TOKEN_B}")
CONVERT = {"url": "http://127.0.0.1/a.mp4", "format": "mp3"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.9", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("", False), ("::", False),
                                            ("gateway.internal", False)])
def test_which_hosts_count_as_loopback(host, loopback):
    assert is_loopback_host(host) is loopback


def test_an_open_api_on_a_non_loopback_host_is_refused_unless_asked_for():
    assert settings_problems(load_settings({}, http_host="127.0.0.1")) == []
    assert any("not loopback" in p for p in settings_problems(load_settings({}, http_host="0.0.0.0")))
    assert settings_problems(load_settings({}, http_host="0.0.0.0", allow_open_api=True)) == []
    assert settings_problems(load_settings({}, http_host="0.0.0.0", api_keys=KEYS)) == []


def test_blank_keys_and_a_download_lifetime_s3_refuses_are_start_up_errors():
    blank = load_settings({"GGT_API_KEYS": f"alice:{TOKEN_A}, ,", "GGT_HTTP_HOST": "0.0.0.0"})
    assert any("blank token" in p for p in settings_problems(blank))
    only_commas = load_settings({"GGT_API_KEYS": ",", "GGT_HTTP_HOST": "0.0.0.0"})
    assert settings_problems(only_commas), "a key list of blanks is not 'no keys'"
    week_and_a_day = load_settings({}, download_url_ttl=8 * 24 * 3600)
    assert any("7 days" in p for p in settings_problems(week_and_a_day))
    assert settings_problems(load_settings({}, download_url_ttl=7 * 24 * 3600)) == []


async def test_the_gateway_refuses_to_start_open_on_all_interfaces_and_listens_nowhere():
    port = free_port()
    with pytest.raises(SystemExit, match="GGT_ALLOW_OPEN_API"):
        await run_gateway(load_settings({}, http_host="0.0.0.0", http_port=port), with_actors=("all",))
    with socket.socket() as probe:  # nothing bound the port
        probe.bind(("127.0.0.1", port))


# ----------------------------------------------------------------------------------- keys


async def test_failed_authentication_is_rate_limited_per_client_address(storage):
    async with bare_gateway(storage, api_keys=KEYS, auth_failures_per_minute=3, rate_limit_per_minute=0) as client:
        guesses = [(await client.get("/api/jobs/some-job-0001", headers=bearer(f"guess-{n}"))).status
                   for n in range(3)]
        assert guesses == [401, 401, 401]
        blocked = await client.get("/api/jobs/some-job-0001", headers=bearer("guess-4"))
        assert blocked.status == 429 and (await blocked.json())["error"]["code"] == "rate_limited"
        assert 1 <= int(blocked.headers["Retry-After"]) <= 60
        # from this address even the right key waits: guessing cannot go on between two good requests
        assert (await client.get("/api/jobs/some-job-0001", headers=bearer(TOKEN_A))).status == 429
        # another client address (127.0.0.2, loopback) is not affected
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=connector) as other:
            url = client.make_url("/api/jobs/some-job-0001")
            async with other.get(url, headers=bearer(TOKEN_A)) as response:
                assert response.status == 404


# ------------------------------------------------------------------------------------ streams


async def test_event_streams_share_one_subscription_and_are_capped_per_key(storage, monkeypatch):
    from bus.memory import MemoryBus

    subscriptions: list[str] = []
    original = MemoryBus.subscribe

    def counting(self, pattern="job.#", **kwargs):
        subscriptions.append(pattern)
        return original(self, pattern, **kwargs)

    monkeypatch.setattr(MemoryBus, "subscribe", counting)
    async with bare_gateway(storage, api_keys=KEYS, sse_streams_per_key=2, rate_limit_per_minute=0) as client, \
            contextlib.AsyncExitStack() as streams:
        job_id = (await (await client.post("/api/convert", json=CONVERT, headers=bearer(TOKEN_A))).json())["job_id"]
        for _ in range(2):  # the job stays queued (no coordinator): each stream stays open
            stream = await streams.enter_async_context(client.get(f"/api/jobs/{job_id}/events",
                                                                  headers=bearer(TOKEN_A)))
            assert stream.status == 200
            assert (await read_events(stream, limit=1))[0].data["stage"] == "queued"
        third = await client.get(f"/api/jobs/{job_id}/events", headers=bearer(TOKEN_A))
        assert third.status == 429 and (await third.json())["error"]["code"] == "too_many_streams"
        # the cap is per key: another tenant opens its own (its job id unknown to it: 404 after the wait)
        assert (await client.get(f"/api/jobs/{job_id}/events", headers=bearer(TOKEN_B))).status == 404
        assert subscriptions == ["job.#"], "one shared subscription, none per stream"


# --------------------------------------------------------------------------------- monitoring


async def test_readiness_metrics_and_stats_are_cached_and_rate_limited(storage):
    options = GatewayOptions(monitor_ttl=60, stats_ttl=60)
    async with bare_gateway(storage, rate_limit_per_minute=6, options=options) as client:
        monitor = client.app[MONITOR]
        statuses = [(await client.get(path)).status for path in ("/readyz", "/metrics") * 2]
        statuses += [(await client.get("/api/storage/stats")).status for _ in range(2)]
        assert statuses == [200] * 6
        assert monitor.readiness.calls == 1 and monitor.depths.calls == 1, "one broker call for all of them"
        assert monitor.stored.calls == 1, "one bucket listing for both stats calls"
        assert (await client.get("/readyz")).status == 429, "past the per-address limit"
        assert (await client.get("/healthz")).status == 200, "liveness is never limited"


async def test_readiness_failures_name_no_internal_address(strict_s3, strict_storage):
    async with bare_gateway(strict_storage) as client:
        await strict_s3.down()
        ready = await client.get("/readyz")
        status = await client.get("/api/jobs/some-job-0001")
        await strict_s3.up()
        assert ready.status == 503 and status.status == 503
        for response in (ready, status):
            text = await response.text()
            assert "127.0.0.1" not in text and f":{urlsplit(strict_s3.endpoint).port}" not in text, text


# ------------------------------------------------------------------------------ hostile input


async def test_json_nested_thousands_deep_answers_400_with_a_code(storage):
    async with bare_gateway(storage) as client:
        body = '{"url": "http://127.0.0.1/a.mp4", "format": "mp3", "tags": ' + "[" * 5000 + "]" * 5000 + "}"
        response = await client.post("/api/convert", data=body, headers={"Content-Type": "application/json"})
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_request"


async def test_a_job_id_with_a_trailing_newline_is_refused_cleanly(storage):
    async with bare_gateway(storage) as client:
        response = await client.post("/api/convert", json={**CONVERT, "job_id": "order-000001\n"})
        assert response.status == 400
        assert (await response.json())["error"]["field"] == "$.job_id"
        for path in ("/api/jobs/order-000001%0A", "/api/jobs/order-000001%0A/events",
                     "/api/jobs/order-000001%0A/download"):
            answer = await client.get(path)
            assert answer.status == 404 and (await answer.json())["error"]["code"] == "job_not_found", path


async def test_every_answer_carries_the_content_security_policy(storage):
    async with bare_gateway(storage) as client:
        for path in ("/file-flow-demo", "/api/formats", "/api/jobs/never-a-job-1", "/no/such/route", "/"):
            response = await client.get(path, allow_redirects=False)
            assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, path
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
