"""Who handles what is written in two places — ``messages.routing`` (what the broker routes where) and
each actor's annotated handlers (what the code runs); the actor names in three (``routing.ACTORS``,
``registry.ACTOR_CLASSES``, each class's ``name``). These tests tie them together."""

from __future__ import annotations

from collections.abc import Mapping

from actors.bootstrap.registry import ACTOR_CLASSES, actor_class
from actors.runtime.settings import Settings
from messages.routing import ACTORS, CONSUMER
from messages.types import Base, MediaResolved, ResolveMedia, Streamed


def routing_mismatches(handled: Mapping[str, set[type[Base]]], consumer: Mapping[type[Base], str]) -> list[str]:
    """Where an actor's handlers differ from what ``consumer`` routes to it."""
    found = []
    for name, types in sorted(handled.items()):
        routed = {t for t, actor in consumer.items() if actor == name}
        found += [f"{name} handles {t.__name__}, routed to {consumer.get(t, 'nobody')}" for t in types - routed]
        found += [f"{t.__name__} is routed to {name}, which has no handler" for t in routed - types]
    return sorted(found)


def handled_types() -> dict[str, set[type[Base]]]:
    return {name: set(actor_class(name)(settings=Settings(), bus=None).handlers())  # type: ignore[arg-type]
            for name in ACTOR_CLASSES}


def test_the_registry_names_exactly_the_routed_actors_and_each_class_carries_its_name() -> None:
    assert tuple(ACTOR_CLASSES) == ACTORS
    assert {name: actor_class(name).name for name in ACTOR_CLASSES} == {name: name for name in ACTORS}


def test_every_actors_handlers_are_exactly_what_routing_consumer_sends_it() -> None:
    assert routing_mismatches(handled_types(), CONSUMER) == []


def test_a_handler_routing_does_not_know_and_a_route_without_a_handler_are_both_found() -> None:
    handled = {"coordinator": {MediaResolved, Streamed}, "converter": set()}
    consumer = {MediaResolved: "coordinator", ResolveMedia: "converter"}
    assert routing_mismatches(handled, consumer) == [
        "ResolveMedia is routed to converter, which has no handler",
        "coordinator handles Streamed, routed to nobody",
    ]
