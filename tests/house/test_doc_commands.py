"""Every command shown in README.md and docs/*.md: concrete ones are parsed by the real parser (a
wrong option, like the old ``--code``, fails here) and those that need nothing but this machine are
run; synopsis lines (``[…]``, ``a|b``, ``…``) must name real subcommands; the rest is marked as an
example needing a real deployment."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from actors.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: concrete commands that only touch this machine: they are run, and must exit 0
RUNNABLE = {"--version", "schema", "check", "s3 --help", "provision"}
#: subcommands whose commands need a deployment (broker, store, media): parsed, not run
NEEDS_DEPLOYMENT = {"submit", "run", "dlq", "convert", "s3"}


def shown_commands() -> list[tuple[str, int, str]]:
    """(file, line, command) of each ``getgoodtape …`` command in the docs' fenced shell blocks."""
    found = []
    for doc in DOCS:
        fenced = False
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                continue
            code = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
            for part in re.split(r"\s*(?:&&|&|;)\s*", code):
                part = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", part.strip())  # VAR=value prefixes
                if part.startswith("getgoodtape"):
                    found.append((doc.name, number, part))
    return found


COMMANDS = shown_commands()


def is_synopsis(command: str) -> bool:
    return bool(re.search(r"[\[\]|…]|\bFILTERS\b", command))


def test_the_docs_show_commands_at_all() -> None:
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize(("doc", "line", "command"), COMMANDS, ids=[f"{d}:{n}" for d, n, _ in COMMANDS])
def test_every_documented_command_is_accepted_by_the_cli(doc: str, line: int, command: str) -> None:
    words = shlex.split(command)[1:]
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    if is_synopsis(command):
        named = words[0]
        assert named in subcommands or named.startswith("--"), f"{doc}:{line}: no subcommand {named!r}"
        return
    try:
        build_parser().parse_args(words)
    except SystemExit as exc:
        if exc.code != 0:  # --version and --help exit 0 after printing
            raise AssertionError(f"{doc}:{line}: `{command}` is refused by the CLI") from None
    head = " ".join(words[:2]) if words[:2] == ["s3", "--help"] else words[0]
    if head in RUNNABLE and "--apply" not in words:  # provision only prints unless --apply
        env = {k: v for k, v in os.environ.items() if not k.startswith("GGT_")}
        args = words
        if words[:1] == ["schema"]:
            args = ["schema"]  # stdout, not the committed directory
        result = subprocess.run([sys.executable, "-m", "actors.cli", *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, f"{doc}:{line}: `{command}` failed: {result.stderr[-2000:]}"
    else:
        assert words[0] in NEEDS_DEPLOYMENT | {"provision"}, f"{doc}:{line}: `{command}` is neither run nor marked"


def test_the_old_replay_option_would_have_failed_this_test() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dlq", "replay", "--actor", "uploader", "--code", "storage_unavailable"])
