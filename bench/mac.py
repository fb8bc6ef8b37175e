"""``python -m bench.mac`` — what authenticating one internal command costs: sign, verify, and the
bus's whole admission check (``admit``), in µs per message, for a small and a large command.

Pure CPU, no broker. Prints one line per case; docs/SECURITY.md quotes the figures.
"""

from __future__ import annotations

import timeit

from bus.auth import BusKeys, signed, verify
from bus.base import admit
from messages.codec import encode, envelope_for
from messages.routing import COMMANDS_EXCHANGE
from messages.types import VerifyObject

#: repetitions per measurement; the best of ROUNDS is reported (the least disturbed run)
NUMBER, ROUNDS = 20_000, 5


def cases() -> dict[str, VerifyObject]:
    """A typical small command (~200 B) and one with a large body (~64 KiB of expected codecs)."""
    small = VerifyObject(job_id="bench-job-0001", key="converted/bench-job-0001.mp3", size=123456, etag="e" * 32,
                         content_type="audio/mpeg", format="mp3", duration=60.0)
    large = VerifyObject(job_id="bench-job-0002", key="converted/bench-job-0002.mp3", size=1, etag="e",
                         content_type="audio/mpeg", format="mp3", duration=1.0,
                         expect_codecs={f"stream{i}": "x" * 60 for i in range(900)})
    return {"small": small, "large": large}


def measure() -> dict[str, dict[str, float]]:
    """µs per message of sign, verify and admit, per case."""
    keys = BusKeys.of("bench-key-" + "0" * 54, ("old-key-" + "1" * 56,))
    out: dict[str, dict[str, float]] = {}
    for name, message in cases().items():
        body = encode(message)
        env = signed(keys, envelope_for(message, headers={"ggt-owner": "acme"}), body)
        assert verify(keys, env, body)
        timings = {
            "sign": lambda env=env, body=body: signed(keys, env, body),
            "verify": lambda env=env, body=body: verify(keys, env, body),
            "admit": lambda env=env, body=body: admit(env, body, exchange=COMMANDS_EXCHANGE,
                                                      routing_key="verify_object", keys=keys),
        }
        out[name] = {"bytes": float(len(body))}
        for what, fn in timings.items():
            best = min(timeit.repeat(fn, number=NUMBER, repeat=ROUNDS))
            out[name][what] = best / NUMBER * 1e6
    return out


def main() -> None:
    for name, figures in measure().items():
        print(f"{name:5} body {int(figures['bytes']):6d} B: sign {figures['sign']:.2f} µs, "
              f"verify {figures['verify']:.2f} µs, admit (verify + envelope) {figures['admit']:.2f} µs")


if __name__ == "__main__":
    main()
