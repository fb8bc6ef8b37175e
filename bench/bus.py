"""Bus throughput: publish-with-confirm (pipelined) and consume-with-ack for N small messages.

    python -m bench.bus [--count 10000] [--window 500] [--amqp-url URL]

Uses a fresh vhost on the local broker when rabbitmqctl is available (the default URL) so that
nothing of a running deployment is touched. Prints messages per second for each half.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import time
import uuid

from bus.auth import BusKeys
from bus.base import Topology
from bus.rabbit import RabbitBus
from messages.routing import ACTORS
from messages.types import VerifyObject


def _vhost() -> str | None:
    ctl = shutil.which("rabbitmqctl")
    if not ctl:
        return None
    name = f"ggt-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run([ctl, "add_vhost", name], check=True, capture_output=True)
    subprocess.run([ctl, "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True, capture_output=True)
    return name


async def run(url: str, count: int, window: int, prefetch: int) -> dict[str, float]:
    """Publish ``count`` messages with at most ``window`` confirms outstanding, then consume them all."""
    bus = RabbitBus(url, Topology(actors=ACTORS), name="bench", keys=BusKeys.random())  # every publish signed
    await bus.start()
    await bus.purge_all()
    message = VerifyObject(job_id="bench-job-0001", key="converted/x.mp3", size=1, etag="e",
                           content_type="audio/mpeg", format="mp3", duration=1.0)
    sem = asyncio.Semaphore(window)

    async def one() -> None:
        async with sem:
            await bus.publish(message)

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(count):
            group.create_task(one())
    publish_s = time.perf_counter() - t0

    got = 0
    t0 = time.perf_counter()
    async with contextlib.aclosing(bus.deliveries("verifier", prefetch=prefetch)) as deliveries:
        async for delivery in deliveries:
            await delivery.ack()
            got += 1
            if got == count:
                break
    consume_s = time.perf_counter() - t0
    await bus.close()
    return {"publish_per_s": count / publish_s, "consume_per_s": count / consume_s,
            "publish_s": publish_s, "consume_s": consume_s}


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=500, help="publishes awaiting confirms at once")
    parser.add_argument("--prefetch", type=int, default=500)
    parser.add_argument("--amqp-url", default="")
    args = parser.parse_args()
    vhost = None
    url = args.amqp_url
    if not url:
        vhost = _vhost()
        url = f"amqp://guest:guest@127.0.0.1:5672/{vhost or ''}"
    try:
        r = asyncio.run(run(url, args.count, args.window, args.prefetch))
    finally:
        if vhost:
            subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)
    print(f"messages: {args.count}  window: {args.window}  prefetch: {args.prefetch}")
    print(f"publish with confirm : {r['publish_per_s']:8.0f} msg/s  ({r['publish_s']:.2f} s)")
    print(f"consume with ack     : {r['consume_per_s']:8.0f} msg/s  ({r['consume_s']:.2f} s)")


if __name__ == "__main__":
    main()
