"""docs/ARCHITECTURE.md's "Where each decision lives" table is the newcomer's map: every
``path: symbol`` in it must exist, so the map cannot drift from the code."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
TICKED = re.compile(r"`([^`]+)`")
PATH_SYMBOL = re.compile(r"^(?P<path>[\w/]+\.py)(?::\s*(?P<symbol>[\w.]+))?$")


def table_references(text: str) -> list[tuple[str, str]]:
    """(path, symbol) for every reference in the table's "where" column; symbol "" for a bare path.
    A bare ``symbol`` after a ``path: symbol`` belongs to the same path."""
    section = text.split("## Where each decision lives", 1)[1].split("\n## ", 1)[0]
    found = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or set(cells[1]) <= set("- ") or cells[1] == "where":
            continue
        path = ""
        for ticked in TICKED.findall(cells[1]):
            match = PATH_SYMBOL.match(ticked.strip())
            if match:
                path = match["path"]
                found.append((path, match["symbol"] or ""))
            elif re.fullmatch(r"[\w.]+", ticked) and path:
                found.append((path, ticked))
            elif ticked.endswith("/"):
                found.append((ticked, ""))
    return found


def missing(references: list[tuple[str, str]]) -> list[str]:
    """The references whose file or symbol does not exist."""
    gone = []
    for path, symbol in references:
        if not (ROOT / path).exists():
            gone.append(path)
            continue
        if not symbol:
            continue
        module = path.removesuffix(".py").replace("/", ".")
        target: object = importlib.import_module(module)
        for part in symbol.split("."):
            if not hasattr(target, part):
                gone.append(f"{path}: {symbol}")
                break
            target = getattr(target, part)
        else:
            defined_in = getattr(target, "__module__", module)  # a function or class only imported there
            if isinstance(defined_in, str) and defined_in != module and callable(target):
                gone.append(f"{path}: {symbol} (defined in {defined_in})")
    return gone


def test_every_path_and_symbol_in_the_decision_table_exists() -> None:
    references = table_references(DOC.read_text())
    assert len(references) >= 20
    assert missing(references) == []


def test_a_renamed_symbol_or_a_moved_file_is_reported() -> None:
    text = """## Where each decision lives

| decision | where |
| --- | --- |
| settle | `actors/runtime/settle.py: settle`, `unreported`, `no_such_function` |
| gone | `actors/no_such_module.py: anything`; `actors/runtime/worker.py: Worker._apply`, `Worker.nothing` |
| moved | `actors/adapters/upload.py: multipart_etag` |

## Next
| x | `actors/elsewhere.py: ignored` |
"""
    references = table_references(text)
    assert references == [("actors/runtime/settle.py", "settle"), ("actors/runtime/settle.py", "unreported"),
                          ("actors/runtime/settle.py", "no_such_function"), ("actors/no_such_module.py", "anything"),
                          ("actors/runtime/worker.py", "Worker._apply"), ("actors/runtime/worker.py", "Worker.nothing"),
                          ("actors/adapters/upload.py", "multipart_etag")]
    assert missing(references) == ["actors/runtime/settle.py: no_such_function", "actors/no_such_module.py",
                                   "actors/runtime/worker.py: Worker.nothing",
                                   "actors/adapters/upload.py: multipart_etag (defined in storage.keys)"]


def test_every_path_and_symbol_named_anywhere_in_the_document_exists() -> None:
    """The house tree and the job's path through the code drift as easily as the table."""
    references, fenced = [], False
    for line in DOC.read_text().splitlines():
        fenced ^= line.startswith("```")
        for ticked in [] if fenced or line.startswith("```") else TICKED.findall(line):
            match = PATH_SYMBOL.match(ticked.strip())
            if match and "/" in match["path"]:
                references.append((match["path"], match["symbol"] or ""))
    assert len(references) >= 60
    assert missing(references) == []
