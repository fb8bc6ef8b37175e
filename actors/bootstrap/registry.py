"""The actors by name, imported lazily so a process loads only what it runs."""

from __future__ import annotations

import importlib

from actors.runtime.worker import Actor

#: actor name → "module:Class"
ACTOR_CLASSES: dict[str, str] = {
    "coordinator": "actors.coordinator:Coordinator",
    "converter": "actors.converter:Converter",
    "uploader": "actors.uploader:Uploader",
    "verifier": "actors.verifier:Verifier",
}


def actor_class(name: str) -> type[Actor]:
    """The class of the actor called ``name``."""
    try:
        module, cls = ACTOR_CLASSES[name].split(":")
    except KeyError:
        raise SystemExit(f"unknown actor {name!r}; choose one of {', '.join(ACTOR_CLASSES)}") from None
    return getattr(importlib.import_module(module), cls)
