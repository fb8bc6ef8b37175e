"""Assembly: the bus and the storage an actor process uses, chosen from the settings."""

from __future__ import annotations

from actors.settings import Settings
from bus.base import Bus, Topology
from bus.memory import MemoryBus
from bus.rabbit import RabbitBus
from messages.routing import ACTORS


def topology(settings: Settings) -> Topology:
    """The broker topology these settings ask for."""
    return Topology(
        actors=ACTORS,
        retry_delays=tuple(settings.retry_delays),
        delivery_limit=settings.delivery_limit,
        publish_timeout=settings.publish_timeout,
    )


def make_bus(settings: Settings, *, name: str = "getgoodtape") -> Bus:
    """RabbitMQ when ``GGT_AMQP_URL`` is set, else the in-memory bus (one process only)."""
    if settings.amqp_url:
        return RabbitBus(settings.amqp_url, topology(settings), name=name)
    return MemoryBus(topology(settings))
