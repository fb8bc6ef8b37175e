"""Helpers for the fault-injection and load suites: figures, storage state, broker control, /proc.

``record_figure(tmp_path, scenario, **figures)`` prints a scenario's measured figures and appends
them as one JSON line to ``tmp_path/figures.jsonl`` (and to ``$GGT_RELIABILITY_FIGURES`` when set,
which is how docs/RELIABILITY.md's table is refreshed). The rest reads state other processes left
behind: stored objects, open multipart uploads, job records, a process's peak RSS and children.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika

from actors.core.jobs import JobRecord, decode_record
from messages.types import JobProgress, Stage
from storage import JobStore, Storage
from tests.fixtures.media import MediaLibrary

#: file, under each test's tmp_path, the figures are appended to
FIGURES_FILE = "figures.jsonl"
#: environment variable naming a file that collects every test's figures (for the docs)
FIGURES_ENV = "GGT_RELIABILITY_FIGURES"
#: seconds a rabbitmqctl command may take (stop_app waits for queues to shut down)
RABBITMQCTL_TIMEOUT = 120


def record_figure(tmp_path: Path, scenario: str, **figures: object) -> dict[str, object]:
    """Print the scenario's figures and append them as a JSON line (tmp_path and $GGT_RELIABILITY_FIGURES)."""
    entry = {"scenario": scenario, **figures}
    line = json.dumps(entry, sort_keys=False)
    print(f"FIGURE {line}")
    targets = [tmp_path / FIGURES_FILE]
    if shared := os.environ.get(FIGURES_ENV):
        targets.append(Path(shared))
    for target in targets:
        with target.open("a") as out:
            out.write(line + "\n")
    return entry


class Stopwatch:
    """Seconds since creation (monotonic), rounded for a figure."""

    def __init__(self) -> None:
        self._started = time.monotonic()

    def __call__(self) -> float:
        return round(time.monotonic() - self._started, 2)


# ------------------------------------------------------------------------------------ storage state


async def stored_keys(storage: Storage, prefix: str = "converted/") -> list[str]:
    """Every object key under ``prefix``."""
    keys: list[str] = []
    paginator = storage.client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=storage.bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


async def job_records(storage: Storage, job_ids: Iterable[str]) -> dict[str, JobRecord]:
    """The stored job record of each job that has one."""
    store = JobStore(storage)
    records: dict[str, JobRecord] = {}
    for job_id in job_ids:
        found = await store.load(job_id)
        if found is not None:
            records[job_id] = decode_record(found[0])
    return records


async def wait_for_records(storage: Storage, job_ids: list[str], *, timeout: float,
                           stages: tuple[Stage, ...] = (Stage.COMPLETED, Stage.FAILED)) -> dict[str, JobRecord]:
    """Poll the job records (state kept by other processes) until every job is in one of ``stages``."""
    records: dict[str, JobRecord] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                records = await job_records(storage, job_ids)
                if len(records) == len(job_ids) and all(r.stage in stages for r in records.values()):
                    return records
                await asyncio.sleep(0.5)  # polling another process's state, not synchronising
    except TimeoutError:
        stuck = Counter(r.stage.value for r in records.values())
        others = {job: (r.stage.value, r.error.code.value if r.error else None, r.error.detail if r.error else None,
                        r.revivals) for job, r in records.items() if r.stage not in stages}
        raise AssertionError(f"timed out after {timeout}s: {len(records)} records, stages {dict(stuck)}; "
                             f"not there: {others}") from None


def keys_per_job(keys: Iterable[str]) -> Counter[str]:
    """How many stored objects each job id has (object keys end in ``<job id>.<ext>``)."""
    return Counter(Path(key).stem for key in keys)


# ------------------------------------------------------------------------------------ sources


def per_job_sources(library: MediaLibrary, source: Path, job_ids: Iterable[str], *, folder: str) -> dict[str, str]:
    """A copy of ``source`` per job under ``folder`` in the media root (so the server's request log
    counts each job's fetches); job id → path to pass to ``media_server.url``."""
    paths: dict[str, str] = {}
    (library.root / folder).mkdir(parents=True, exist_ok=True)
    for job_id in job_ids:
        relative = f"{folder}/{job_id}{source.suffix}"
        target = library.root / relative
        if not target.exists():
            shutil.copyfile(source, target)
        paths[job_id] = relative
    return paths


def latest_stage(progress: list[JobProgress]) -> Stage | None:
    """The last stage a job's progress events reported."""
    return progress[-1].stage if progress else None


# ------------------------------------------------------------------------------------ the broker


def vhost_of(amqp_url: str) -> str:
    """The vhost of an AMQP URL ("/" when none is named)."""
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl args…`` off the event loop; raise with its output when it fails."""
    ctl = shutil.which("rabbitmqctl")
    assert ctl, "rabbitmqctl is needed to restart the local broker"
    done = await asyncio.to_thread(subprocess.run, [ctl, *args], capture_output=True, text=True,
                                   timeout=RABBITMQCTL_TIMEOUT, check=False)
    if done.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done.stdout


async def restart_broker_app(amqp_url: str) -> float:
    """``stop_app`` then ``start_app`` on the local node (never the node itself); seconds it was down.

    Only the local broker can be restarted this way: any other test broker fails the test, never skips it.
    """
    parts = urlsplit(amqp_url)
    assert (parts.hostname, parts.port or 5672) in (("127.0.0.1", 5672), ("localhost", 5672)), \
        f"the broker restart scenario needs the local broker (rabbitmqctl), not {parts.hostname}:{parts.port}"
    started = time.monotonic()
    await rabbitmqctl("stop_app")
    await rabbitmqctl("start_app")
    await rabbitmqctl("await_startup", "--timeout", str(RABBITMQCTL_TIMEOUT))
    return round(time.monotonic() - started, 2)


async def publish_plain(amqp_url: str, messages: list[tuple[str, bytes, dict[str, object]]]) -> None:
    """Publish (routing key, body, properties) triples with plain aio-pika, confirmed: ``convert.<tenant>``
    to ggt.requests, any other key to ggt.commands (unsigned: what a forger with broad rights sends).

    This is how another system would publish: no project bus code, JSON written by hand.
    """
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        requests = await channel.get_exchange("ggt.requests")
        commands = await channel.get_exchange("ggt.commands")
        for routing_key, body, properties in messages:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                       **properties)  # type: ignore[arg-type]
            exchange = requests if routing_key.startswith("convert.") else commands
            await exchange.publish(message, routing_key=routing_key, timeout=30)


# ------------------------------------------------------------------------------------ /proc


def peak_rss_kib(pid: int) -> int | None:
    """The process's peak resident set (VmHWM, KiB), or None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of every live descendant of ``pid``, from /proc."""
    parents: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
        names[int(entry.name)] = comm
    found: list[tuple[int, str]] = []
    todo = list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        found.append((child, names.get(child, "")))
        todo += parents.get(child, [])
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (and is not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


async def wait_settled(storage: Storage, bus, job_ids: list[str], *, timeout: float
                       ) -> tuple[dict[str, JobRecord], list]:
    """Poll until every job is completed or has a letter in a dead-letter queue; (records, letters)."""
    from bus.replay import list_letters

    records: dict[str, JobRecord] = {}
    letters: list = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                records = await job_records(storage, job_ids)
                letters = await list_letters(bus)
                lettered = {letter.envelope.job_id for letter in letters}
                done = {j for j, r in records.items() if r.stage == Stage.COMPLETED}
                if all(j in done or j in lettered for j in job_ids):
                    return records, letters
                await asyncio.sleep(0.5)  # polling other processes' state, not synchronising
    except TimeoutError:
        stuck = Counter(r.stage.value for r in records.values())
        raise AssertionError(f"timed out after {timeout}s: stages {dict(stuck)}, {len(letters)} letters") from None


#: header that marks a copy the tap published itself (never copied again)
COPY_HEADER = "test-copy"


class CommandTap:
    """A private queue bound to ggt.commands with the given routing keys (and to ggt.requests with
    ``convert.*``): sees every command and request published with them; with ``double=True`` it
    publishes each one again to the same exchange (same id, body and properties)."""

    def __init__(self, amqp_url: str, routing_keys: Iterable[str], *, double: bool = False) -> None:
        self.amqp_url, self.routing_keys, self.double = amqp_url, list(routing_keys), double
        #: (routing key, message type, message id, job id) of each original seen
        self.seen: list[tuple[str, str, str, str]] = []
        self.copies: Counter[str] = Counter()
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> CommandTap:
        self._stack = contextlib.AsyncExitStack()
        connection = await self._stack.enter_async_context(await aio_pika.connect(self.amqp_url))
        channel = await connection.channel(publisher_confirms=True)
        self._exchanges = {name: await channel.get_exchange(name) for name in ("ggt.commands", "ggt.requests")}
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in self.routing_keys:
            await queue.bind(self._exchanges["ggt.commands"], key)
        await queue.bind(self._exchanges["ggt.requests"], "convert.*")
        await queue.consume(self._on_message)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._stack is not None
        await self._stack.aclose()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            if (message.headers or {}).get(COPY_HEADER):
                return
            self.seen.append((message.routing_key or "", message.type or "", message.message_id or "",
                              message.correlation_id or ""))
            if self.double:
                copy = aio_pika.Message(
                    message.body, headers={**(message.headers or {}), COPY_HEADER: 1},
                    content_type=message.content_type, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message.message_id, correlation_id=message.correlation_id, type=message.type,
                    timestamp=message.timestamp, reply_to=message.reply_to, app_id=message.app_id)
                await self._exchanges[message.exchange or "ggt.commands"].publish(
                    copy, routing_key=message.routing_key or "", timeout=30)
                self.copies[message.type or message.routing_key or ""] += 1
