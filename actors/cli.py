"""The ``getgoodtape`` command: run actors, convert, submit, export the schema, manage dead letters."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from actors.settings import load_settings


def _cmd_run(args: argparse.Namespace) -> int:
    from actors.logs import setup_logging
    from actors.registry import ACTOR_CLASSES
    from actors.serve import serve

    settings = load_settings()
    setup_logging(settings.log_level)
    names = list(ACTOR_CLASSES) if args.actors == ["all"] else args.actors
    if "gateway" in names:
        from actors.gateway.app import run_gateway

        asyncio.run(run_gateway(settings, with_actors=[n for n in names if n != "gateway"]))
        return 0
    for name in names:
        if name not in ACTOR_CLASSES:
            print(f"unknown actor {name!r}; choose from {', '.join(ACTOR_CLASSES)}, all, gateway", file=sys.stderr)
            return 2
    if not settings.amqp_url and len(names) < len(ACTOR_CLASSES):
        print("GGT_AMQP_URL is not set: separate actor processes need RabbitMQ "
              "(the in-memory bus only works with all actors in one process: `getgoodtape run all`)",
              file=sys.stderr)
        return 2
    needs_storage = {"coordinator", "verifier"} & set(names)
    if not settings.s3_endpoint and needs_storage and len(names) < len(ACTOR_CLASSES):
        print(f"GGT_S3_ENDPOINT is not set: {', '.join(sorted(needs_storage))} in a process of its own needs the "
              "shared S3 (MinIO, R2, S3, or `getgoodtape s3` for local runs); the embedded S3 only serves "
              "`getgoodtape run all` and `getgoodtape convert`", file=sys.stderr)
        return 2
    asyncio.run(serve(names, settings))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from messages.schema import public_schemas

    schemas = public_schemas()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, schema in schemas.items():
            (out / f"{name}.schema.json").write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        print(f"wrote {len(schemas)} schemas to {out}/")
    else:
        json.dump(schemas, sys.stdout, indent=2, sort_keys=True)
        print()
    return 0


def _cmd_s3(args: argparse.Namespace) -> int:
    import signal
    import threading

    from storage.embedded import EmbeddedS3

    settings = load_settings()
    s3 = EmbeddedS3(bucket=settings.s3_bucket, port=args.port)
    s3.start()
    cfg = s3.config
    print(f"embedded S3 on {cfg.endpoint} (bucket {cfg.bucket}); for the actors:\n"
          f"  export GGT_S3_ENDPOINT={cfg.endpoint} GGT_S3_BUCKET={cfg.bucket} "
          f"GGT_S3_ACCESS_KEY_ID={cfg.access_key_id} GGT_S3_SECRET_ACCESS_KEY={cfg.secret_access_key}",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    s3.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="getgoodtape", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run actors in this process (coordinator, converter, uploader, verifier, "
                                     "gateway, or all)")
    run.add_argument("actors", nargs="+", metavar="ACTOR")
    run.set_defaults(fn=_cmd_run)

    schema = sub.add_parser("schema", help="write the JSON Schema of the public messages")
    schema.add_argument("-o", "--out", help="directory to write <type>.schema.json files into (default: stdout)")
    schema.set_defaults(fn=_cmd_schema)

    s3 = sub.add_parser("s3", help="serve the embedded S3 on loopback (development: actors as separate processes)")
    s3.add_argument("--port", type=int, default=9000)
    s3.set_defaults(fn=_cmd_s3)

    for extra in _extra_commands():
        extra(sub)
    return parser


def _extra_commands():
    """Subcommands living in their own modules (convert, submit, dlq)."""
    found = []
    for module in ("actors.convert_cmd", "actors.dlq_cmd"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError as exc:
            if exc.name != module:
                raise
            continue
        found.append(mod.register)
    return found


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
