"""PenguiFlow over Redis Streams: one flow across worker processes.

Every process builds the same flow and runs it with a :class:`RedisMessageBus`;
``nodes=`` says which nodes run where::

    bus = RedisMessageBus.from_url("redis://127.0.0.1:6379/0?namespace=shop")
    flow.run(registry=registry, message_bus=bus, nodes=["enrich", "score"])

``pf worker MODULE:ATTR --bus URL`` (:mod:`penguiflow_distributed.worker`) runs a
worker process. See ``docs/guides/distributed.md``.
"""

from __future__ import annotations

from .bus import BusBindError, RedisMessageBus

__all__ = ["BusBindError", "RedisMessageBus"]
