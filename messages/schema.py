"""JSON Schema of the public messages, generated from the Structs (never written by hand)."""

from __future__ import annotations

import inspect
from typing import Any

import msgspec

from messages.codec import SCHEMA_VERSION
from messages.types import PUBLIC_IN, PUBLIC_OUT, Base, type_name


def message_schema(message_type: type[Base]) -> dict:
    """A standalone JSON Schema (draft 2020-12) document for one message type."""
    (ref,), components = msgspec.json.schema_components([message_type], ref_template="#/$defs/{name}")
    name = ref["$ref"].rsplit("/", 1)[-1]
    root = dict(components.pop(name))
    return _normalised({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"getgoodtape/{type_name(message_type)}/{SCHEMA_VERSION}",
        **root,
        "$defs": components,
    })


def _normalised(node: Any) -> Any:
    """The schema with every description dedented like ``inspect.cleandoc``.

    msgspec releases differ in how they strip docstrings (0.23 dedents, earlier ones kept the
    indentation), so the committed schemas would otherwise depend on the library's version.
    """
    if isinstance(node, dict):
        return {key: inspect.cleandoc(value) if key == "description" and isinstance(value, str)
                else _normalised(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_normalised(item) for item in node]
    return node


def public_schemas() -> dict[str, dict]:
    """``type`` tag → schema, for ConvertRequested (in) and JobProgress/JobCompleted/JobFailed (out)."""
    return {type_name(t): message_schema(t) for t in (*PUBLIC_IN, *PUBLIC_OUT)}
