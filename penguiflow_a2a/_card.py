"""Reading an A2A agent card into the one thing the client needs: where and how to call.

Private helper of :mod:`penguiflow_a2a.client`. A card may be 1.0
(``supportedInterfaces[]``), 0.3-only (``url`` + ``preferredTransport`` +
``additionalInterfaces``), or the a2a-sdk's union of both; fields this module
does not use are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

from .errors import A2AProtocolError
from .protocol import V0_3, V1_0, parse_version

__all__ = ["CARD_PATH", "Endpoint", "card_url", "parse_card"]

#: Where an agent publishes its card, relative to its base URL (A2A 0.3 and 1.0).
CARD_PATH = "/.well-known/agent-card.json"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The JSON-RPC interface the client talks to.

    Attributes:
        agent_url: the base URL the caller configured (names the agent in errors).
        rpc_url: the interface's own ``url``, where every JSON-RPC POST goes.
        version: ``"1.0"`` or ``"0.3"``.
        tenant: the interface's ``tenant``, echoed as ``params.tenant`` (1.0 only).
        streaming: the card's ``capabilities.streaming`` (absent means False).
        name: the agent's ``name``, if the card has one.
    """

    agent_url: str
    rpc_url: str
    version: str
    tenant: str | None = None
    streaming: bool = False
    name: str | None = None


def card_url(agent_url: str) -> str:
    """The well-known card URL of an agent's base URL."""
    return agent_url.rstrip("/") + CARD_PATH


def _jsonrpc_interfaces(card: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """``(version, url, tenant)`` of each JSON-RPC interface, in card order."""
    found: list[tuple[str, str, str | None]] = []
    interfaces = card.get("supportedInterfaces")
    if isinstance(interfaces, list):
        for item in interfaces:
            if not isinstance(item, Mapping):
                continue
            binding = item.get("protocolBinding")
            url = item.get("url")
            if not isinstance(binding, str) or binding.upper() != "JSONRPC":
                continue
            if not isinstance(url, str) or not url:
                continue
            raw = item.get("protocolVersion")
            version = parse_version(raw if isinstance(raw, str) else None)
            tenant = item.get("tenant")
            if version is not None:
                found.append((version, url, tenant if isinstance(tenant, str) and tenant
                              else None))
    # A 0.3 card: the main url + preferredTransport, then additionalInterfaces.
    raw_version = card.get("protocolVersion")
    v03 = parse_version(raw_version if isinstance(raw_version, str) else None)
    if v03 == V0_3:
        url = card.get("url")
        preferred = card.get("preferredTransport", "JSONRPC")
        if (isinstance(url, str) and url and isinstance(preferred, str)
                and preferred.upper() == "JSONRPC"):
            found.append((V0_3, url, None))
        extra = card.get("additionalInterfaces")
        if isinstance(extra, list):
            for item in extra:
                if (isinstance(item, Mapping) and isinstance(item.get("url"), str)
                        and str(item.get("transport", "")).upper() == "JSONRPC"):
                    found.append((V0_3, item["url"], None))
    return found


def parse_card(card: Any, *, agent_url: str, source: str) -> Endpoint:
    """The endpoint to call from a card: JSON-RPC 1.0 first, else JSON-RPC 0.3.

    Args:
        card: the decoded card JSON.
        agent_url: the agent's base URL as configured.
        source: where the card came from (a URL), for error messages; relative
            interface URLs are resolved against it.

    Raises:
        A2AProtocolError: the card is not an object, or offers no JSON-RPC
            interface of a version this client speaks.
    """
    if not isinstance(card, Mapping):
        raise A2AProtocolError(
            f"the A2A agent card at {source} is not a JSON object "
            f"(got {type(card).__name__})", agent_url=agent_url)
    interfaces = _jsonrpc_interfaces(card)
    chosen = next((i for i in interfaces if i[0] == V1_0), None)
    if chosen is None:
        chosen = next((i for i in interfaces if i[0] == V0_3), None)
    if chosen is None:
        raise A2AProtocolError(
            f"the A2A agent card at {source} offers no JSON-RPC interface for A2A 1.0 or "
            "0.3 (no supportedInterfaces entry with protocolBinding JSONRPC and a "
            "supported protocolVersion, and no 0.3 url)", agent_url=agent_url)
    version, url, tenant = chosen
    capabilities = card.get("capabilities")
    streaming = (isinstance(capabilities, Mapping)
                 and capabilities.get("streaming") is True)
    name = card.get("name")
    return Endpoint(agent_url=agent_url, rpc_url=urljoin(source, url), version=version,
                    tenant=tenant if version == V1_0 else None, streaming=streaming,
                    name=name if isinstance(name, str) else None)
