"""``getgoodtape provision``: the broker users of a deployment, with least permissions, as rabbitmqctl lines.

``service`` is the user every actor (and the gateway, and ``dlq``) connects as: it alone may write
``ggt.commands``. ``integrator --tenant T`` is an outside system: it may publish ConvertRequested to
``ggt.requests`` as ``convert.T`` only, declare and read its own queues ``integrator.T.*``, and bind
them to ``ggt.events`` for ``job.T.#`` only. The lines are printed (review, paste, put in your
provisioning); ``--apply`` runs them with the local ``rabbitmqctl``. docs/SECURITY.md explains them.
"""

from __future__ import annotations

import argparse
import re
import secrets
import shlex
import shutil
import subprocess
import sys

from messages.routing import EVENTS_EXCHANGE, REQUESTS_EXCHANGE, is_tenant, reserved_tenant

#: the broker user of the service's own processes
SERVICE_USER = "ggt-service"
#: the resources the service uses: its exchanges and queues (ggt.*), and amq.* (amq.default for
#: replies to a caller's queue, amq.gen-* for its private event subscriptions)
SERVICE_RESOURCES = r"^(ggt\..*|amq\..*)$"


def integrator_user(tenant: str) -> str:
    """The default broker user name of a tenant's integrator."""
    return f"integrator-{tenant}"


def integrator_queue_prefix(tenant: str) -> str:
    """The prefix every queue of the tenant's integrator must carry (``integrator.<tenant>.``)."""
    return f"integrator.{tenant}."


def service_commands(*, vhost: str = "/", user: str = SERVICE_USER, password: str) -> list[list[str]]:
    """rabbitmqctl argument lists that create the service user with rights on the ggt.* resources only."""
    return [
        ["add_user", user, password],
        ["set_permissions", "-p", vhost, user, SERVICE_RESOURCES, SERVICE_RESOURCES, SERVICE_RESOURCES],
    ]


def integrator_commands(tenant: str, *, vhost: str = "/", user: str | None = None,
                        password: str) -> list[list[str]]:
    """rabbitmqctl argument lists that create a tenant's integrator user with least permissions.

    configure: its own queues; write: ggt.requests and its own queues (binding needs write on the
    queue); read: ggt.events (binding needs read on the exchange) and its own queues. Topic
    permissions narrow the keys: publish ``convert.<tenant>`` only, bind ``job.<tenant>.…`` only.
    """
    if not is_tenant(tenant):
        raise ValueError(f"not a tenant id: {tenant!r} (lowercase letters, digits, _ and -, at most 32)")
    if reserved_tenant(tenant):
        raise ValueError(f"tenant {tenant!r} is reserved: the default tenant and key-* are the service's own")
    name = user or integrator_user(tenant)
    own = re.escape(integrator_queue_prefix(tenant))
    return [
        ["add_user", name, password],
        ["set_permissions", "-p", vhost, name, f"^{own}.*$",
         f"^({re.escape(REQUESTS_EXCHANGE)}|{own}.*)$", f"^({re.escape(EVENTS_EXCHANGE)}|{own}.*)$"],
        ["set_topic_permissions", "-p", vhost, name, REQUESTS_EXCHANGE, f"^convert\\.{re.escape(tenant)}$", "^$"],
        ["set_topic_permissions", "-p", vhost, name, EVENTS_EXCHANGE, "^$", f"^job\\.{re.escape(tenant)}\\."],
    ]


def shell_lines(commands: list[list[str]]) -> list[str]:
    """The commands as shell lines a person can read and paste."""
    return [shlex.join(["rabbitmqctl", *command]) for command in commands]


def apply(commands: list[list[str]], *, ctl: str = "rabbitmqctl") -> None:
    """Run the commands with ``rabbitmqctl``; raises CalledProcessError on the first that fails."""
    for command in commands:
        subprocess.run([ctl, *command], check=True, capture_output=True, timeout=60)


def _cmd_provision(args: argparse.Namespace) -> int:
    password = args.password or secrets.token_hex(24)
    try:
        if args.role == "service":
            commands = service_commands(vhost=args.vhost, user=args.user or SERVICE_USER, password=password)
        else:
            if not args.tenant:
                print("getgoodtape provision integrator: --tenant is required", file=sys.stderr)
                return 2
            commands = integrator_commands(args.tenant, vhost=args.vhost, user=args.user, password=password)
    except ValueError as exc:
        print(f"getgoodtape provision: {exc}", file=sys.stderr)
        return 2
    if not args.apply:
        print("\n".join(shell_lines(commands)))
        return 0
    ctl = shutil.which("rabbitmqctl")
    if not ctl:
        print("getgoodtape provision --apply: rabbitmqctl is not on PATH (run the printed lines on the broker)",
              file=sys.stderr)
        return 2
    try:
        apply(commands, ctl=ctl)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode("utf-8", "replace").strip()
        print(f"getgoodtape provision: rabbitmqctl {exc.cmd[1]} failed: {detail}", file=sys.stderr)
        return 1
    user = commands[0][1]
    print(f"created broker user {user} on vhost {args.vhost}" + ("" if args.password else f"; password {password}"))
    return 0


def provision_arguments(cmd: argparse.ArgumentParser) -> None:
    """The arguments of ``provision``."""
    cmd.description, cmd.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    cmd.add_argument("role", choices=("service", "integrator"))
    cmd.add_argument("--tenant", help="the integrator's tenant id (routing keys convert.<tenant>, job.<tenant>.#)")
    cmd.add_argument("--vhost", default="/", help="the deployment's virtual host (default /)")
    cmd.add_argument("--user", help="broker user name (default ggt-service / integrator-<tenant>)")
    cmd.add_argument("--password", help="the user's password (default: a random one, printed)")
    cmd.add_argument("--apply", action="store_true", help="run the lines with the local rabbitmqctl")
    cmd.set_defaults(fn=_cmd_provision)
