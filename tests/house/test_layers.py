"""Import direction, checked from the source with ``ast`` (function-local imports included).

Between the packages (docs/ARCHITECTURE.md, "Layers"): messages and storage import no other project
package, bus imports only messages, nothing outside actors imports actors. Inside actors, by kind
(actors/__init__.py is the map):

- ``core`` — pure decisions: no I/O library; of the project only core, the wire contract, the pure
  guard rules, ``storage.keys``/``storage.errors``, ``bus.base`` and the settings struct;
- ``runtime`` — how any actor runs: core, bus, storage, messages; never an actor, a wrapper or the root;
- ``adapters`` and ``guard`` — the outside world's tools and the SSRF guard: core, runtime, each other;
- the four actors (``actors/<name>.py``) — anything below, never another actor and never the root;
- ``bootstrap`` — the composition root: the actors and everything below; only an edge imports it;
- the edges (``cli``, ``gateway``) — anything; only another edge imports one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("messages", "storage", "bus", "actors")

#: which project packages each package may import (itself included)
ALLOWED_PACKAGES: Mapping[str, frozenset[str]] = {
    "messages": frozenset({"messages"}),
    "storage": frozenset({"storage"}),
    "bus": frozenset({"bus", "messages"}),
    "actors": frozenset({"actors", "bus", "storage", "messages"}),
}

#: the pure decisions: tests call them with plain values
PURE = frozenset({
    "actors.core", "actors.runtime.settle", "actors.guard.addresses", "actors.guard.urls", "storage.keys",
})
#: what a pure module may import of the project besides other pure modules
PURE_MAY_IMPORT = frozenset({"messages", "storage.errors", "bus.base", "actors.runtime.settings"})
#: libraries that do I/O (network, processes, threads, the event loop): no pure module imports one
IO_LIBRARIES = frozenset({
    "asyncio", "aiohttp", "aio_pika", "aiormq", "aiobotocore", "botocore", "boto3", "subprocess", "socket",
    "ssl", "selectors", "threading", "multiprocessing", "concurrent", "yt_dlp", "http.client", "http.server",
    "urllib.request",
})
#: the edges: what a user or an operator runs; only another edge imports one
EDGES = ("actors.cli", "actors.gateway")
#: the composition root: only an edge (or the root itself) imports it
ROOTS = ("actors.bootstrap",)
#: the four actors, thin handlers on top of everything else
ACTOR_MODULES = ("actors.converter", "actors.coordinator", "actors.uploader", "actors.verifier")
#: the kinds below the actors, and which of them each may import (inside actors)
BELOW = {
    "actors.core": ("actors.core", "actors.guard.addresses", "actors.guard.urls", "actors.runtime.settings"),
    "actors.runtime": ("actors.runtime", "actors.core"),
    "actors.adapters": ("actors.adapters", "actors.guard", "actors.runtime", "actors.core"),
    "actors.guard": ("actors.adapters", "actors.guard", "actors.runtime", "actors.core"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it, as absolute dotted names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def project_graph() -> dict[str, set[str]]:
    """module → the modules it imports, for every module of the four packages."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            graph[module_name(path)] = imports_of(path)
    return graph


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Every import that breaks a rule, as ``importer → imported (rule)``."""
    modules = set(graph)
    found = []
    for importer, imported in sorted(graph.items()):
        top = importer.split(".")[0]
        for target in sorted(imported):
            target_top = target.split(".")[0]
            if target_top in ALLOWED_PACKAGES and target_top not in ALLOWED_PACKAGES[top]:
                found.append(f"{importer} → {target} (package rule)")
                continue
            if _within(importer, PURE) and target_top not in ALLOWED_PACKAGES and _within(target, IO_LIBRARIES):
                found.append(f"{importer} → {target} (a pure module imports no I/O library)")
            if (_within(importer, PURE) and target_top in ALLOWED_PACKAGES and target in modules
                    and not _within(target, PURE | PURE_MAY_IMPORT)):
                found.append(f"{importer} → {target} (a pure module imports only pure modules)")
            if target not in modules or not target.startswith("actors."):
                continue
            if _within(target, EDGES) and not _within(importer, EDGES):
                found.append(f"{importer} → {target} (only an edge imports an edge)")
            elif _within(target, ROOTS) and not _within(importer, (*EDGES, *ROOTS)):
                found.append(f"{importer} → {target} (only an edge imports the composition root)")
            elif _within(target, ACTOR_MODULES) and not _within(importer, (*EDGES, *ROOTS)):
                found.append(f"{importer} → {target} (an actor is imported only by the root and the edges)")
            for kind, may in BELOW.items():
                if target != "actors" and _within(importer, (kind,)) and not _within(target, may):
                    found.append(f"{importer} → {target} ({kind} imports only {', '.join(may)})")
    return found


def test_the_code_keeps_the_import_rules() -> None:
    graph = project_graph()
    assert {"messages.types", "bus.base", "storage.keys", "actors.runtime.settle", "actors.core.plan"} <= set(graph)
    assert violations(graph) == []


def test_each_rule_catches_an_import_that_breaks_it() -> None:
    broken = {
        "messages.types": {"bus.base"},
        "storage.keys": {"messages.types", "asyncio"},
        "bus.base": {"storage.s3"},
        "bus.rabbit": {"actors.runtime.worker"},
        "actors.runtime.settle": {"actors.runtime.worker", "aiohttp.web"},
        "actors.runtime.worker": {"actors.gateway.app", "actors.adapters.ffmpeg"},
        "actors.gateway.app": {"actors.cli", "actors.bootstrap.serve", "actors.uploader"},  # edges may
        "actors.core.plan": {"actors.guard.proxy"},
        "actors.adapters.ffmpeg": {"actors.uploader"},
        "actors.verifier": {"actors.bootstrap.wiring", "actors.coordinator"},
        "actors.bootstrap.serve": {"actors.verifier"},  # the root may
        "actors.cli": set(), "actors.gateway": set(), "storage.s3": set(), "actors.gateway.app.x": set(),
        "actors.bootstrap.wiring": set(), "actors.uploader": set(), "actors.coordinator": set(),
        "actors.guard.proxy": set(),
    }
    assert violations(broken) == [
        "actors.adapters.ffmpeg → actors.uploader (an actor is imported only by the root and the edges)",
        "actors.adapters.ffmpeg → actors.uploader (actors.adapters imports only actors.adapters, actors.guard, "
        "actors.runtime, actors.core)",
        "actors.core.plan → actors.guard.proxy (a pure module imports only pure modules)",
        "actors.core.plan → actors.guard.proxy (actors.core imports only actors.core, actors.guard.addresses, "
        "actors.guard.urls, actors.runtime.settings)",
        "actors.runtime.settle → actors.runtime.worker (a pure module imports only pure modules)",
        "actors.runtime.settle → aiohttp.web (a pure module imports no I/O library)",
        "actors.runtime.worker → actors.adapters.ffmpeg (actors.runtime imports only actors.runtime, actors.core)",
        "actors.runtime.worker → actors.gateway.app (only an edge imports an edge)",
        "actors.runtime.worker → actors.gateway.app (actors.runtime imports only actors.runtime, actors.core)",
        "actors.verifier → actors.bootstrap.wiring (only an edge imports the composition root)",
        "actors.verifier → actors.coordinator (an actor is imported only by the root and the edges)",
        "bus.base → storage.s3 (package rule)",
        "bus.rabbit → actors.runtime.worker (package rule)",
        "messages.types → bus.base (package rule)",
        "storage.keys → asyncio (a pure module imports no I/O library)",
        "storage.keys → messages.types (package rule)",
    ]


def test_relative_and_function_local_imports_are_seen() -> None:
    source = ROOT / "actors" / "gateway" / "handlers.py"
    assert "storage.keys" in imports_of(source)
    assert "actors.core.ffmpeg_args" in imports_of(ROOT / "actors" / "uploader.py")
