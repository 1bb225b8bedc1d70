"""The HTTP and JSON-RPC layer of the A2A client: one POST, one SSE stream, one GET.

Private helper of :mod:`penguiflow_a2a.client`. It turns every httpx failure
into an :class:`~penguiflow_a2a.errors.A2AError` naming the agent and method,
caps what it reads (``max_body_bytes`` per JSON body, ``max_event_bytes`` per
SSE event), and hands back 1.0 JSON only (0.3 answers are converted here).
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Final

import httpx
from opentelemetry import propagate

from ._card import Endpoint
from .errors import A2AConnectionError, A2AError, A2AProtocolError, A2ATimeoutError, rpc_error
from .protocol import (
    V0_3,
    V1_0,
    VERSION_HEADER,
    method_name,
    stream_result_from_v03,
    wire_json,
)
from .sse import DEFAULT_MAX_EVENT_BYTES, SSEError, aiter_sse

__all__ = ["RpcChannel"]

_RESPONSE_KEYS = ("task", "message", "statusUpdate", "artifactUpdate")
class _Default(enum.Enum):
    """``read_timeout_s``'s default, told apart from None (no bound) by type."""

    TRANSPORT = "the transport's timeout_s"


_TRANSPORT: Final = _Default.TRANSPORT


class RpcChannel:
    """JSON-RPC calls and streams to A2A endpoints over one (lazily made) httpx client.

    Every request carries ``A2A-Version`` (the endpoint's), the given ``headers``
    and W3C trace context of the current OTel context.
    """

    def __init__(self, *, headers: Mapping[str, str] | None, timeout_s: float | None,
                 httpx_client: httpx.AsyncClient | None,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                 max_body_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                 stream_idle_timeout_s: float | None = None) -> None:
        self._headers = dict(headers or {})
        self._timeout_s = timeout_s
        self._idle_s = stream_idle_timeout_s
        self._client = httpx_client
        self._owns_client = httpx_client is None
        self._max_event_bytes = max_event_bytes
        self._max_body_bytes = max_body_bytes
        self._closed = False

    async def aclose(self) -> None:
        """Close the httpx client if this channel created it (idempotent). Every
        later request raises :class:`A2AConnectionError` (none opens a new client
        that nobody would close)."""
        self._closed = True
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._closed:
            raise A2AConnectionError(
                "A2AClientTransport is closed (aclose() or its async with block ended): "
                "create a new transport, or close it only after its calls and streams end")
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._httpx_timeout(stream=False))
        return self._client

    def _httpx_timeout(self, *, stream: bool, read_s: float | _Default | None = _TRANSPORT
                       ) -> httpx.Timeout:
        connect = self._timeout_s if self._timeout_s is not None else 30.0
        # A stream's read timeout is its idle bound: any bytes (an event or a
        # keep-alive comment) restart it. Its whole length is bounded by timeout_s,
        # by the caller (asyncio), not here.
        if stream:
            return httpx.Timeout(connect, read=self._idle_s)
        read = self._timeout_s if read_s is _Default.TRANSPORT else read_s
        return httpx.Timeout(connect, read=read)

    def _request_headers(self, version: str, *, stream: bool = False) -> dict[str, str]:
        headers = {VERSION_HEADER: version, **self._headers}
        if stream:
            headers["Accept"] = "text/event-stream"
            headers["Cache-Control"] = "no-store"
        propagate.inject(headers)
        return headers

    def _transport_error(self, exc: Exception, *, url: str, agent_url: str,
                         method: str | None) -> A2AError:
        what = f"{method} to {url}" if method else url
        if isinstance(exc, httpx.TimeoutException):
            return A2ATimeoutError(f"A2A agent {agent_url}: no answer to {what} in time "
                                   f"({type(exc).__name__})", agent_url=agent_url,
                                   method=method)
        return A2AConnectionError(f"A2A agent {agent_url}: {what} failed: "
                                  f"{type(exc).__name__}: {exc}", agent_url=agent_url,
                                  method=method)

    async def _read_body(self, response: httpx.Response, *, agent_url: str,
                         method: str | None) -> bytes:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self._max_body_bytes:
                raise A2AProtocolError(
                    f"A2A agent {agent_url} answered {method or 'a request'} with a body "
                    f"over {self._max_body_bytes} bytes", agent_url=agent_url, method=method)
        return bytes(body)

    def _decode(self, response: httpx.Response, body: bytes, *, agent_url: str,
                method: str, what: str = "answer") -> Any:
        """The ``result`` of a JSON-RPC response (raising its error, if any)."""
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            data = None
        if response.status_code >= 400 and not (isinstance(data, dict) and "error" in data):
            cls = A2AConnectionError if response.status_code >= 500 else A2AProtocolError
            raise cls(f"A2A agent {agent_url} answered {method} with HTTP "
                      f"{response.status_code}: {body[:200]!r}", agent_url=agent_url,
                      method=method)
        if not isinstance(data, dict):
            raise A2AProtocolError(
                f"A2A agent {agent_url}: the {what} to {method} is not a JSON object "
                f"(HTTP {response.status_code}, {response.headers.get('content-type')!r}, "
                f"starts {body[:80]!r})", agent_url=agent_url, method=method)
        if data.get("error") is not None:
            raise rpc_error(data["error"], agent_url=agent_url, method=method)
        if not isinstance(data.get("result"), Mapping):
            raise A2AProtocolError(
                f"A2A agent {agent_url}: the {what} to {method} has no JSON-RPC result "
                f"object (keys: {sorted(data)[:8]})", agent_url=agent_url, method=method)
        return data["result"]

    def envelope(self, ep: Endpoint, op: str, params: dict[str, Any]) -> tuple[str, bytes]:
        method = method_name(op, ep.version)
        if ep.version == V1_0 and ep.tenant:
            params = {**params, "tenant": ep.tenant}
        body = {"jsonrpc": "2.0", "id": str(uuid.uuid4()), "method": method, "params": params}
        return method, wire_json(body, separators=None, default=str).encode()

    async def call(self, ep: Endpoint, op: str, params: dict[str, Any], *,
                   read_timeout_s: float | _Default | None = _TRANSPORT) -> Mapping[str, Any]:
        """One unary JSON-RPC call; its ``result`` object.

        ``read_timeout_s``: how long the answer may take (httpx's read timeout):
        by default the transport's ``timeout_s``; a blocking SendMessage passes its
        call's own bound (a request's ``timeout_s`` wins over the transport's).
        """
        method, content = self.envelope(ep, op, params)
        headers = self._request_headers(ep.version)
        headers["Content-Type"] = "application/json"
        try:
            async with self._http().stream("POST", ep.rpc_url, content=content,
                                           headers=headers,
                                           timeout=self._httpx_timeout(
                                               stream=False, read_s=read_timeout_s)) as resp:
                body = await self._read_body(resp, agent_url=ep.agent_url, method=method)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, url=ep.rpc_url, agent_url=ep.agent_url,
                                        method=method) from exc
        result: Mapping[str, Any] = self._decode(resp, body, agent_url=ep.agent_url,
                                                 method=method)
        return result

    async def events(self, ep: Endpoint, op: str,
                      params: dict[str, Any]) -> AsyncGenerator[Mapping[str, Any], None]:
        """The 1.0 StreamResponses of one streaming call, as the server sends them."""
        method, content = self.envelope(ep, op, params)
        headers = self._request_headers(ep.version, stream=True)
        headers["Content-Type"] = "application/json"
        try:
            async with self._http().stream("POST", ep.rpc_url, content=content,
                                           headers=headers,
                                           timeout=self._httpx_timeout(stream=True)) as resp:
                ctype = resp.headers.get("content-type", "").lower()
                if resp.status_code >= 400 or "text/event-stream" not in ctype:
                    # An upfront error (HTTP 200, application/json), or a unary answer.
                    body = await self._read_body(resp, agent_url=ep.agent_url, method=method)
                    yield self._stream_result(
                        self._decode(resp, body, agent_url=ep.agent_url, method=method),
                        ep, method)
                    return
                async for sse in aiter_sse(resp.aiter_bytes(),
                                           max_event_bytes=self._max_event_bytes):
                    yield self._sse_result(sse.event, sse.data, ep, method)
        except httpx.ReadTimeout as exc:
            # Silent past the idle bound: no event and no keep-alive (servers ping
            # every 15 s). A lost stream, resumed with SubscribeToTask where it can be.
            raise A2AConnectionError(
                f"A2A agent {ep.agent_url}: the {method} stream sent nothing (no event, no "
                f"keep-alive) for {self._idle_s} s", agent_url=ep.agent_url,
                method=method) from exc
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, url=ep.rpc_url, agent_url=ep.agent_url,
                                        method=method) from exc
        except SSEError as exc:
            raise A2AProtocolError(f"A2A agent {ep.agent_url}: bad event stream for "
                                   f"{method}: {exc}", agent_url=ep.agent_url,
                                   method=method) from exc

    def _sse_result(self, event: str, data: str, ep: Endpoint,
                    method: str) -> Mapping[str, Any]:
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            raise A2AProtocolError(f"A2A agent {ep.agent_url}: an event of the {method} "
                                   f"stream is not a JSON object: {data[:80]!r}",
                                   agent_url=ep.agent_url, method=method)
        if event == "error" or obj.get("error") is not None:
            raise rpc_error(obj.get("error", obj), agent_url=ep.agent_url, method=method)
        result = obj.get("result")
        if not isinstance(result, Mapping):
            raise A2AProtocolError(f"A2A agent {ep.agent_url}: an event of the {method} "
                                   "stream has no JSON-RPC result object",
                                   agent_url=ep.agent_url, method=method)
        return self._stream_result(result, ep, method)

    @staticmethod
    def _stream_result(result: Mapping[str, Any], ep: Endpoint,
                       method: str) -> Mapping[str, Any]:
        if ep.version == V0_3:
            try:
                return stream_result_from_v03(result)
            except ValueError as exc:
                raise A2AProtocolError(f"A2A agent {ep.agent_url}: {method} sent {exc}",
                                       agent_url=ep.agent_url, method=method) from exc
        if (not any(isinstance(result.get(k), Mapping) for k in _RESPONSE_KEYS)
                and "status" in result and "id" in result):
            return {"task": result}  # a bare Task (e.g. a non-streaming server)
        return result

    async def get(self, url: str, *, agent_url: str) -> tuple[int, bytes]:
        """GET ``url`` (the agent card): its status and (capped) body."""
        try:
            async with self._http().stream("GET", url, headers=self._request_headers(V1_0),
                                           timeout=self._httpx_timeout(stream=False)) as resp:
                body = await self._read_body(resp, agent_url=agent_url, method=None)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, url=url, agent_url=agent_url,
                                        method=None) from exc
        return resp.status_code, body
