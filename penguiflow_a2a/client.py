"""A2A client transport: a :class:`~penguiflow.remote.RemoteTransport` over JSON-RPC/HTTP.

``A2AClientTransport`` lets a :func:`~penguiflow.remote.RemoteNode` call any A2A
agent (A2A 1.0, or 0.3 when the card only offers 0.3). It is built on httpx
alone. Contracts:

* The agent card (``{agent_url}/.well-known/agent-card.json``) is read once per
  agent URL and cached for ``card_ttl_s``; the JSON-RPC 1.0 interface is used if
  listed, else the 0.3 one, at the interface's own ``url``.
* Every request carries ``A2A-Version``, the caller's ``headers`` and W3C trace
  context (``traceparent``/``tracestate`` of the current OTel context: inside a
  RemoteNode that is the call's CLIENT span).
* ``send`` makes a blocking SendMessage (polling GetTask if the agent answers
  early) and returns the task's final result; ``stream`` makes a
  SendStreamingMessage and yields one event per artifact chunk or state change,
  then exactly one ``done`` event; a dropped stream is resumed with
  SubscribeToTask, delivering each chunk once. A task that ends FAILED,
  REJECTED or CANCELED raises :class:`~penguiflow_a2a.errors.A2ATaskFailed`; one
  that stops for input or auth raises ``A2ATaskInterrupted``.
* Every failure is an :class:`~penguiflow_a2a.errors.A2AError` naming the agent
  URL and method; no httpx exception escapes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx
from opentelemetry import propagate

from penguiflow.remote import RemoteCallRequest, RemoteCallResult, RemoteStreamEvent

from ._card import Endpoint, card_url, parse_card
from ._results import StreamTracker, parts_value, task_outcome, task_state
from .errors import (
    A2AConnectionError,
    A2AError,
    A2AProtocolError,
    A2ATimeoutError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
    rpc_error,
)
from .protocol import (
    CANCELED,
    COMPLETED,
    FINAL_STATES,
    TERMINAL_STATES,
    V0_3,
    V1_0,
    VERSION_HEADER,
    ErrorCode,
    message_to_v03,
    method_name,
    payload_to_parts,
    send_result_from_v03,
    state_to_v03,
    stream_result_from_v03,
    task_from_v03,
)
from .sse import DEFAULT_MAX_EVENT_BYTES, SSEError, aiter_sse

__all__ = ["A2AClientTransport"]

logger = logging.getLogger("penguiflow_a2a.client")

_T = TypeVar("_T")

_RESPONSE_KEYS = ("task", "message", "statusUpdate", "artifactUpdate")


class A2AClientTransport:
    """Calls A2A agents over JSON-RPC/HTTP (see the module docstring for the contract).

    Args:
        headers: added to every request (e.g. ``Authorization``).
        timeout_s: default overall bound of one call (card, RPCs, polling and
            the whole stream); a request's own ``timeout_s`` wins. None: no bound.
        httpx_client: the client to use; never closed by this transport.
            Without one, a client is created on first use and closed by
            :meth:`aclose`.
        resubscribe_attempts: how many times a dropped stream is resumed.
        resubscribe_backoff_s: first wait before resuming; doubles each attempt.
        card_ttl_s: how long a fetched agent card is reused.
        poll_interval_s: first wait between GetTask polls; doubles up to 1 s.
        cancel_timeout_s: bound of :meth:`cancel` waiting to see CANCELED (used
            when ``timeout_s`` is None).
        max_event_bytes: cap on one SSE event.
        max_body_bytes: cap on one JSON response body.
    """

    def __init__(self, *, headers: Mapping[str, str] | None = None,
                 timeout_s: float | None = None,
                 httpx_client: httpx.AsyncClient | None = None,
                 resubscribe_attempts: int = 3, resubscribe_backoff_s: float = 0.2,
                 card_ttl_s: float = 300.0, poll_interval_s: float = 0.05,
                 cancel_timeout_s: float = 10.0,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                 max_body_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._headers = dict(headers or {})
        self._timeout_s = timeout_s
        self._client = httpx_client
        self._owns_client = httpx_client is None
        self._resubscribe_attempts = max(0, resubscribe_attempts)
        self._backoff_s = resubscribe_backoff_s
        self._card_ttl_s = card_ttl_s
        self._poll_s = poll_interval_s
        self._cancel_timeout_s = cancel_timeout_s
        self._max_event_bytes = max_event_bytes
        self._max_body_bytes = max_body_bytes
        self._cards: dict[str, tuple[Endpoint, float]] = {}

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> A2AClientTransport:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the httpx client if this transport created it (idempotent)."""
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._httpx_timeout(stream=False))
        return self._client

    def _httpx_timeout(self, *, stream: bool) -> httpx.Timeout:
        connect = self._timeout_s if self._timeout_s is not None else 30.0
        return httpx.Timeout(connect, read=None if stream else self._timeout_s)

    def _bound(self, request_timeout: float | None) -> float | None:
        return request_timeout if request_timeout is not None else self._timeout_s

    # -- HTTP ------------------------------------------------------------------------
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
        except ValueError:
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

    def _envelope(self, ep: Endpoint, op: str, params: dict[str, Any]) -> tuple[str, bytes]:
        method = method_name(op, ep.version)
        if ep.version == V1_0 and ep.tenant:
            params = {**params, "tenant": ep.tenant}
        body = {"jsonrpc": "2.0", "id": str(uuid.uuid4()), "method": method, "params": params}
        return method, json.dumps(body, default=str).encode()

    async def _rpc(self, ep: Endpoint, op: str, params: dict[str, Any]) -> Mapping[str, Any]:
        """One unary JSON-RPC call; its ``result`` object."""
        method, content = self._envelope(ep, op, params)
        headers = self._request_headers(ep.version)
        headers["Content-Type"] = "application/json"
        try:
            async with self._http().stream("POST", ep.rpc_url, content=content,
                                           headers=headers,
                                           timeout=self._httpx_timeout(stream=False)) as resp:
                body = await self._read_body(resp, agent_url=ep.agent_url, method=method)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, url=ep.rpc_url, agent_url=ep.agent_url,
                                        method=method) from exc
        result: Mapping[str, Any] = self._decode(resp, body, agent_url=ep.agent_url,
                                                 method=method)
        return result

    async def _events(self, ep: Endpoint, op: str,
                      params: dict[str, Any]) -> AsyncGenerator[Mapping[str, Any], None]:
        """The 1.0 StreamResponses of one streaming call, as the server sends them."""
        method, content = self._envelope(ep, op, params)
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
        except ValueError:
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

    # -- cards -----------------------------------------------------------------------
    async def endpoint(self, agent_url: str,
                       agent_card: Mapping[str, Any] | None = None) -> Endpoint:
        """The JSON-RPC endpoint of ``agent_url``, from ``agent_card`` or its fetched card.

        Raises:
            A2AConnectionError / A2ATimeoutError: the card could not be fetched.
            A2AProtocolError: the card is not JSON or offers no usable interface.
        """
        if agent_card is not None and ("supportedInterfaces" in agent_card
                                       or "url" in agent_card):
            return parse_card(agent_card, agent_url=agent_url, source=agent_url)
        cached = self._cards.get(agent_url)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        url = card_url(agent_url)
        try:
            async with self._http().stream("GET", url,
                                           headers=self._request_headers(V1_0),
                                           timeout=self._httpx_timeout(stream=False)) as resp:
                body = await self._read_body(resp, agent_url=agent_url, method=None)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, url=url, agent_url=agent_url,
                                        method=None) from exc
        if resp.status_code != 200:
            raise A2AProtocolError(f"cannot read the A2A agent card at {url}: HTTP "
                                   f"{resp.status_code}", agent_url=agent_url)
        try:
            card = json.loads(body)
        except ValueError as exc:
            raise A2AProtocolError(f"the A2A agent card at {url} is not JSON: {exc}",
                                   agent_url=agent_url) from exc
        ep = parse_card(card, agent_url=agent_url, source=url)
        self._cards[agent_url] = (ep, time.monotonic() + self._card_ttl_s)
        return ep

    # -- messages and tasks ----------------------------------------------------------
    @staticmethod
    def _params(ep: Endpoint, request: RemoteCallRequest) -> dict[str, Any]:
        message: dict[str, Any] = {"messageId": str(uuid.uuid4()), "role": "ROLE_USER",
                                   "parts": payload_to_parts(request.message.payload)}
        meta = request.message.meta
        context_id = meta.get("a2a_context_id") if isinstance(meta, Mapping) else None
        if isinstance(context_id, str) and context_id:
            message["contextId"] = context_id
        if ep.version == V0_3:
            return {"message": message_to_v03(message), "configuration": {"blocking": True}}
        return {"message": message, "configuration": {}}

    async def _get_task(self, ep: Endpoint, task_id: str) -> Mapping[str, Any]:
        params: dict[str, Any] = {"id": task_id}
        if ep.version == V1_0:
            params["historyLength"] = 0
        task = await self._rpc(ep, "get", params)
        return task_from_v03(task) if ep.version == V0_3 else task

    async def _poll(self, ep: Endpoint, task: Mapping[str, Any],
                    done: frozenset[str] = FINAL_STATES) -> Mapping[str, Any]:
        """GetTask with growing pauses until the task's state is in ``done``."""
        pause = self._poll_s
        while task_state(task) not in done:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
            task_id = task.get("id")
            if not isinstance(task_id, str):
                raise A2AProtocolError(f"A2A agent {ep.agent_url} answered a task without "
                                       "an id", agent_url=ep.agent_url)
            task = await self._get_task(ep, task_id)
        return task

    async def _bounded(self, coro: Awaitable[_T], bound: float | None, *, agent_url: str,
                       what: str) -> _T:
        try:
            async with asyncio.timeout(bound):
                return await coro
        except TimeoutError as exc:
            if isinstance(exc, A2AError):
                raise
            raise A2ATimeoutError(f"A2A agent {agent_url}: {what} took more than {bound} s",
                                  agent_url=agent_url) from exc

    # -- RemoteTransport ---------------------------------------------------------------
    async def send(self, request: RemoteCallRequest) -> RemoteCallResult:
        """SendMessage (blocking) and return the task's final result.

        Raises:
            A2ATaskFailed / A2ATaskInterrupted: the task did not complete.
            A2AError: any transport, protocol or JSON-RPC failure.
        """
        result: RemoteCallResult = await self._bounded(
            self._send(request), self._bound(request.timeout_s),
            agent_url=request.agent_url, what="SendMessage")
        return result

    async def _send(self, request: RemoteCallRequest) -> RemoteCallResult:
        ep = await self.endpoint(request.agent_url, request.agent_card)
        method = method_name("send", ep.version)
        answer = await self._rpc(ep, "send", self._params(ep, request))
        if ep.version == V0_3:
            try:
                answer = send_result_from_v03(answer)
            except ValueError as exc:
                raise A2AProtocolError(f"A2A agent {ep.agent_url}: {method} answered {exc}",
                                       agent_url=ep.agent_url, method=method) from exc
        message = answer.get("message")
        if isinstance(message, Mapping):
            parts = message.get("parts")
            return RemoteCallResult(
                result=parts_value(list(parts) if isinstance(parts, list) else []),
                context_id=message.get("contextId"), task_id=message.get("taskId"),
                agent_url=request.agent_url, meta={"a2a_method": method})
        task = answer.get("task")
        if not isinstance(task, Mapping):
            raise A2AProtocolError(f"A2A agent {ep.agent_url} answered {method} with neither "
                                   "a task nor a message", agent_url=ep.agent_url,
                                   method=method)
        task = await self._poll(ep, task)
        value = task_outcome(task, agent_url=ep.agent_url, method=method)
        return RemoteCallResult(result=value, context_id=task.get("contextId"),
                                task_id=task.get("id"), agent_url=request.agent_url,
                                meta={"task_state": state_to_v03(COMPLETED),
                                      "a2a_method": method})

    async def stream(self, request: RemoteCallRequest) -> AsyncIterator[RemoteStreamEvent]:
        """SendStreamingMessage: chunk and state events, then exactly one ``done`` event.

        A dropped stream is resumed with SubscribeToTask (bounded attempts with
        backoff); an agent whose card says it does not stream is called with
        SendMessage instead (logged once per call).

        Raises:
            A2ATaskFailed / A2ATaskInterrupted: the task did not complete.
            A2AConnectionError: the stream was lost and could not be resumed.
            A2AError: any other transport, protocol or JSON-RPC failure.
        """
        bound = self._bound(request.timeout_s)
        deadline = None if bound is None else asyncio.get_running_loop().time() + bound
        ep = await self._bounded(self.endpoint(request.agent_url, request.agent_card), bound,
                                 agent_url=request.agent_url, what="reading the agent card")
        if not ep.streaming:
            logger.warning("A2A agent %s does not stream (its card's capabilities.streaming "
                           "is not true): falling back to %s", request.agent_url,
                           method_name("send", ep.version))
            remaining = None if deadline is None else max(
                0.0, deadline - asyncio.get_running_loop().time())
            result: RemoteCallResult = await self._bounded(
                self._send(request), remaining, agent_url=request.agent_url,
                what="SendMessage")
            yield RemoteStreamEvent(text="", done=True, meta=result.meta,
                                    context_id=result.context_id, task_id=result.task_id,
                                    agent_url=request.agent_url, result=result.result)
            return
        tracker = StreamTracker(agent_url=request.agent_url,
                                method=method_name("stream", ep.version))
        steps = self._follow(ep, request, tracker)
        try:
            while True:
                try:
                    if deadline is None:
                        events = await anext(steps)
                    else:
                        async with asyncio.timeout_at(deadline):
                            events = await anext(steps)
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    if isinstance(exc, A2AError):
                        raise
                    raise A2ATimeoutError(
                        f"A2A agent {request.agent_url}: the stream of task "
                        f"{tracker.task_id} did not finish within {bound} s",
                        agent_url=request.agent_url, method=tracker.method) from exc
                for event in events:
                    yield event
        finally:
            await steps.aclose()
        yield tracker.final_event()

    async def _follow(self, ep: Endpoint, request: RemoteCallRequest,
                      tracker: StreamTracker
                      ) -> AsyncGenerator[list[RemoteStreamEvent], None]:
        """Batches of events until the tracker is finished, resubscribing on drops."""
        source = self._events(ep, "stream", self._params(ep, request))
        attempts = 0
        subscribing = False
        while True:
            try:
                async for response in source:
                    yield tracker.apply(response)
                    if tracker.finished:
                        return
                reason = "the agent closed the stream before the task reached a final state"
            except A2AConnectionError as exc:
                reason = str(exc)
            except (UnsupportedOperationError, TaskNotFoundError):
                if not subscribing or tracker.task_id is None:
                    raise
                # The task ended while we were away: read what is missing from GetTask.
                task = await self._get_task(ep, tracker.task_id)
                yield tracker.apply({"task": await self._poll(ep, task)})
                return
            finally:
                await source.aclose()
            if tracker.task_id is None:
                raise A2AConnectionError(
                    f"A2A agent {ep.agent_url}: the stream broke before any task was "
                    f"announced, so it cannot be resumed: {reason}",
                    agent_url=ep.agent_url, method=tracker.method)
            attempts += 1
            if attempts > self._resubscribe_attempts:
                raise A2AConnectionError(
                    f"A2A agent {ep.agent_url}: lost the stream of task {tracker.task_id} "
                    f"and {self._resubscribe_attempts} resubscribe attempts failed "
                    f"(last: {reason})", agent_url=ep.agent_url,
                    method=method_name("subscribe", ep.version))
            logger.info("A2A agent %s: stream of task %s dropped (%s); resubscribing "
                        "(attempt %d)", ep.agent_url, tracker.task_id, reason, attempts)
            await asyncio.sleep(self._backoff_s * 2 ** (attempts - 1))
            source = self._events(ep, "subscribe", {"id": tracker.task_id})
            subscribing = True

    async def cancel(self, *, agent_url: str, task_id: str) -> None:
        """CancelTask; returns once the agent reports the task CANCELED.

        Raises:
            TaskNotCancelableError: the task is already terminal (-32002), or it
                ended in another terminal state instead.
            A2ATimeoutError: CANCELED was not seen within the bound.
            A2AError: any other failure.
        """
        bound = self._timeout_s if self._timeout_s is not None else self._cancel_timeout_s
        await self._bounded(self._cancel(agent_url, task_id), bound, agent_url=agent_url,
                            what=f"cancelling task {task_id}")

    async def _cancel(self, agent_url: str, task_id: str) -> None:
        ep = await self.endpoint(agent_url)
        method = method_name("cancel", ep.version)
        task = await self._rpc(ep, "cancel", {"id": task_id})
        if ep.version == V0_3:
            task = task_from_v03(task)
        task = await self._poll(ep, task, done=TERMINAL_STATES)
        state = task_state(task)
        if state != CANCELED:
            raise TaskNotCancelableError(
                f"A2A agent {agent_url} answered {method} for task {task_id} but the task "
                f"ended {state_to_v03(state)}", code=ErrorCode.TASK_NOT_CANCELABLE,
                agent_url=agent_url, method=method)
