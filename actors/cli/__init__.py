"""The ``getgoodtape`` command: run actors, convert, submit, export the schema, manage dead letters."""

from __future__ import annotations

import argparse
import importlib
import sys

from actors import __version__

# nothing heavier at the top: `getgoodtape --help` and `--version` must start like a CLI; each
# command imports what it uses when it runs


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from actors.bootstrap.registry import ACTOR_CLASSES
    from actors.bootstrap.serve import serve
    from actors.runtime.logs import setup_logging
    from actors.runtime.settings import load_settings

    settings = load_settings()
    setup_logging(settings.log_level)
    names = list(ACTOR_CLASSES) if args.actors == ["all"] else args.actors
    if "gateway" in names:
        from actors.gateway.app import run_gateway

        _preflight(settings, names)
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
    _preflight(settings, names)
    asyncio.run(serve(names, settings))
    return 0


def _preflight(settings, names: list[str]) -> None:
    """The start-up checks of these roles (`getgoodtape check`): exit non-zero, saying why, on a failure."""
    import asyncio

    from actors.cli.check import ROLES, preflight

    asyncio.run(preflight(settings, [name for name in names if name in ROLES]))


def _cmd_schema(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

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

    from actors.bootstrap.wiring import new_embedded_s3
    from actors.runtime.settings import load_settings

    settings = load_settings()
    s3 = new_embedded_s3(bucket=settings.s3_bucket, port=args.port)
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


#: the subcommands living in their own modules: name → ("module:function" that adds the command's
#: arguments, its one-line help). A module is imported only when its command is parsed, so
#: ``getgoodtape --help`` and ``--version`` load none of them and each command loads only its own
#: (aiohttp, rich, aio-pika, boto, yt-dlp, moto stay out of the commands that do not use them)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("actors.cli.convert:convert_arguments", "convert a URL or local file end to end in this process"),
    "submit": ("actors.cli.convert:submit_arguments",
               "publish a request to a running deployment (needs GGT_AMQP_URL)"),
    "dlq": ("actors.cli.dlq:dlq_arguments", "list, show, replay or purge dead letters (needs GGT_AMQP_URL)"),
    "provision": ("actors.cli.provision:provision_arguments",
                  "broker users with least permissions (rabbitmqctl lines)"),
    "check": ("actors.cli.check:check_arguments",
              "check the broker, storage and programs this role needs; non-zero exit on a failure"),
}

#: ``build_parser(only=EVERY_COMMAND)``: the arguments of every subcommand (the docs' checks use it)
EVERY_COMMAND = "*"


def build_parser(*, only: str | None = EVERY_COMMAND) -> argparse.ArgumentParser:
    """The argument parser; the arguments of the ``COMMANDS`` are added for ``only`` (a command
    name, None for none of them, ``EVERY_COMMAND`` for all), the others are listed by name and help."""
    parser = argparse.ArgumentParser(prog="getgoodtape", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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

    for name, (target, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if only in (name, EVERY_COMMAND):
            module, function = target.split(":")
            getattr(importlib.import_module(module), function)(command)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (its first word that is not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(only=command_of(argv)).parse_args(argv)
    return args.fn(args)

