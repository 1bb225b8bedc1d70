"""A2A for PenguiFlow: call remote agents from a flow, and serve a flow to A2A clients.

* **Client** — :class:`A2AClientTransport` (``penguiflow_a2a.client``) is a
  ``RemoteTransport`` speaking A2A 1.0 JSON-RPC (0.3 when the agent only offers
  that) over httpx: ``RemoteNode(transport=A2AClientTransport(), ...)``.
  Needs the ``penguiflow[a2a]`` extra (httpx).
* **Server** — :class:`A2AServerAdapter` and :func:`create_a2a_app`
  (``penguiflow_a2a.server``) serve a flow with the 2.1 routes and spec-true
  A2A 1.0 (agent card, JSON-RPC at ``POST /``). Needs ``penguiflow[a2a-server]``.
* The protocol's vocabulary is in :mod:`penguiflow_a2a.protocol`, the client's
  errors in :mod:`penguiflow_a2a.errors`, the SSE codec in :mod:`penguiflow_a2a.sse`.

``__all__`` is the 2.1 list (the compatibility contract); the client and its
errors are importable from here as additions, outside ``__all__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .server import (
    A2AAgentCard,
    A2AMessagePayload,
    A2AServerAdapter,
    A2ASkill,
    A2ATaskCancelRequest,
    create_a2a_app,
)

if TYPE_CHECKING:
    from .client import A2AClientTransport  # noqa: F401  (for type checkers; lazy below)

__all__ = [
    "A2AAgentCard",
    "A2ASkill",
    "A2AMessagePayload",
    "A2ATaskCancelRequest",
    "A2AServerAdapter",
    "create_a2a_app",
]

_ERRORS = frozenset({
    "A2AError", "A2AConnectionError", "A2ATimeoutError", "A2AProtocolError", "A2ARPCError",
    "A2ATaskError", "A2ATaskFailed", "A2ATaskInterrupted", "TaskNotFoundError",
    "TaskNotCancelableError", "UnsupportedOperationError", "VersionNotSupportedError",
})


def __getattr__(name: str) -> Any:
    # The client imports httpx (the `a2a` extra): only when asked for, so a server-only
    # install imports this package without it.
    if name == "A2AClientTransport":
        from .client import A2AClientTransport

        return A2AClientTransport
    if name in _ERRORS:
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'penguiflow_a2a' has no attribute {name!r}")
