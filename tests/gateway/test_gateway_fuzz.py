"""The gateway fuzzed by schemathesis from its own /api/openapi.json: no operation answers 5xx.

The gateway runs on a loopback port on its own event loop in a thread (schemathesis' calls are
synchronous), on an in-memory bus without actors and a fresh bucket; bounded by max_examples per
operation so the whole run takes seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from actors.bootstrap.wiring import topology
from actors.gateway.app import make_app
from actors.gateway.keys import GatewayOptions
from actors.runtime.http import serving
from bus.memory import MemoryBus
from storage.s3 import StorageConfig
from tests.fixtures.broker import test_settings as settings_for_tests
from tests.fixtures.s3 import fresh_bucket

TOKEN = "fuzz-tenant-token-0123456789"
#: examples per operation: enough to reach every branch of the decoders, small enough for CI
MAX_EXAMPLES = 40
#: the events endpoint waits this long for a job it has never heard of
OPTIONS = GatewayOptions(keepalive=1.0, unknown_job_wait=0.05, monitor_ttl=1.0, stats_ttl=1.0)


class GatewayThread:
    """A gateway on its own loop in a background thread, served on 127.0.0.1."""

    def __init__(self, config: StorageConfig) -> None:
        self._config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fuzzed-gateway", daemon=True)
        self._stack = contextlib.AsyncExitStack()

    async def _start(self) -> int:
        settings = settings_for_tests(api_keys=(f"fuzz:{TOKEN}",), rate_limit_per_minute=0,
                                      auth_failures_per_minute=0)  # limits would answer 429 to most calls
        bus = MemoryBus(topology(settings))
        await bus.start()
        self._stack.push_async_callback(bus.close)
        storage = await self._stack.enter_async_context(fresh_bucket(self._config))
        app = make_app(settings, bus=bus, storage=storage, options=OPTIONS)
        return await self._stack.enter_async_context(serving(app))

    def __enter__(self) -> str:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stack.aclose(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def gateway_url(storage_config: StorageConfig) -> Iterator[str]:
    with GatewayThread(storage_config) as url:
        yield url


def fuzz_operation(operation) -> None:
    """Run ``MAX_EXAMPLES`` generated requests of one operation, each with the key and without."""
    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case) -> None:
        for headers in ({"Authorization": f"Bearer {TOKEN}"}, {}):
            response = case.call(headers=headers, timeout=10)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:300]}"
            assert "Traceback" not in response.text

    run()


def test_no_operation_of_the_openapi_document_answers_5xx(gateway_url: str):
    schema = schemathesis.openapi.from_url(f"{gateway_url}/api/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {f"{method.upper()} {path}" for path, item in schema.raw_schema["paths"].items() for method in item}
    # schemathesis leaves out the document's own path (it was just fetched to load the schema)
    assert {op.label for op in operations} == documented - {"GET /api/openapi.json"}, "every operation is fuzzed"
    for operation in operations:
        fuzz_operation(operation)
