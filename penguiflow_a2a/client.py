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
* Nothing is waited on for ever unless asked: without ``timeout_s``, the calls
  that should answer at once (the agent card, GetTask) are each bounded by
  ``stream_idle_timeout_s`` and a stream by its idle bound; only a blocking
  SendMessage, which answers when the task ends, is unbounded. A call that gives
  up at its ``timeout_s`` on a task whose id it knows sends CancelTask for it first
  (best effort, once, bounded by :data:`GIVE_UP_CANCEL_S`; CANCELED is not waited
  for), and remembers it (:meth:`A2AClientTransport.already_cancelled`).
* Every failure is an :class:`~penguiflow_a2a.errors.A2AError` naming the agent
  URL and method; no httpx exception escapes.
* As soon as an answer names the task, its ``contextId``/``taskId`` go into the
  node invocation's log scope (:func:`penguiflow.tracing.note_remote_ids`), so
  the log lines of the rest of the call (polls, resubscriptions, httpx's own,
  the runtime's ``remote_*`` events) carry ``context_id`` and ``task_id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx

from penguiflow.remote import RemoteCallRequest, RemoteCallResult, RemoteStreamEvent
from penguiflow.tracing import note_remote_ids

from ._card import Endpoint, card_url, parse_card
from ._results import StreamTracker, parts_value, task_outcome, task_state
from ._rpc import RpcChannel
from .errors import (
    A2AConnectionError,
    A2AError,
    A2AProtocolError,
    A2ATimeoutError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from .protocol import (
    CANCELED,
    COMPLETED,
    FINAL_STATES,
    TERMINAL_STATES,
    V0_3,
    V1_0,
    ErrorCode,
    message_to_v03,
    method_name,
    payload_to_parts,
    send_result_from_v03,
    state_to_v03,
    task_from_v03,
)
from .sse import DEFAULT_MAX_EVENT_BYTES

__all__ = ["A2AClientTransport"]

logger = logging.getLogger("penguiflow_a2a.client")

#: The longest a call that gave up at its ``timeout_s`` spends sending CancelTask for
#: its task (once, CANCELED not waited for): the call is already late, and raises
#: this much later at most.
GIVE_UP_CANCEL_S = 1.0
#: How many given-up tasks :meth:`A2AClientTransport.already_cancelled` remembers.
_GIVEN_UP_KEPT = 1024

_T = TypeVar("_T")


def _id(value: Any) -> str | None:
    """A non-empty str id from a peer's JSON, else None (never trusted as typed)."""
    return value if isinstance(value, str) and value else None


class A2AClientTransport:
    """Calls A2A agents over JSON-RPC/HTTP (see the module docstring for the contract).

    Args:
        headers: added to every request (e.g. ``Authorization``).
        timeout_s: default overall bound of one call (card, RPCs, polling and
            the whole stream); a request's own ``timeout_s`` wins. None: no overall
            bound (the card fetch and each GetTask are still bounded by
            ``stream_idle_timeout_s``, and a stream by its idle bound).
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
        stream_idle_timeout_s: how long a stream may send nothing at all (no event,
            no keep-alive comment: servers send one every 15 s) before it counts as
            lost: it is then resumed with SubscribeToTask (``resubscribe_attempts``),
            or the call fails with :class:`A2AConnectionError`, instead of waiting
            for ever on a peer that hangs. When the call has no ``timeout_s``, it
            also bounds each quick call (agent card, GetTask): past it,
            :class:`A2ATimeoutError` naming that call. None: no bound (a peer that
            neither streams nor pings for minutes).
    """

    def __init__(self, *, headers: Mapping[str, str] | None = None,
                 timeout_s: float | None = None,
                 httpx_client: httpx.AsyncClient | None = None,
                 resubscribe_attempts: int = 3, resubscribe_backoff_s: float = 0.2,
                 card_ttl_s: float = 300.0, poll_interval_s: float = 0.05,
                 cancel_timeout_s: float = 10.0,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                 max_body_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                 stream_idle_timeout_s: float | None = 60.0) -> None:
        if stream_idle_timeout_s is not None and not stream_idle_timeout_s > 0:
            raise ValueError(f"stream_idle_timeout_s must be > 0 seconds, or None for no "
                             f"bound; got {stream_idle_timeout_s!r}")
        self._timeout_s = timeout_s
        self._idle_s = stream_idle_timeout_s
        self._channel = RpcChannel(headers=headers, timeout_s=timeout_s,
                                   httpx_client=httpx_client,
                                   max_event_bytes=max_event_bytes,
                                   max_body_bytes=max_body_bytes,
                                   stream_idle_timeout_s=stream_idle_timeout_s)
        self._resubscribe_attempts = max(0, resubscribe_attempts)
        self._backoff_s = resubscribe_backoff_s
        self._card_ttl_s = card_ttl_s
        self._poll_s = poll_interval_s
        self._cancel_timeout_s = cancel_timeout_s
        self._cards: dict[str, tuple[Endpoint, float]] = {}
        #: Endpoints from cards given inline (RemoteNode(agent_card=...)), by agent URL.
        self._inline: dict[str, Endpoint] = {}
        #: The tasks this transport cancelled itself (a call giving up at its
        #: timeout_s), most recent last, each with its CancelTask (done once sent,
        #: True: accepted): see :meth:`already_cancelled`. A CancelTask that failed
        #: drops its task (the caller may cancel it itself).
        self._given_up: OrderedDict[tuple[str, str], asyncio.Task[tuple[bool, str]]] = (
            OrderedDict())
        #: CancelTask requests of given-up calls still on their way (kept referenced:
        #: a caller cancelled meanwhile does not cut them; :meth:`aclose` ends them).
        self._cancelling: set[asyncio.Task[tuple[bool, str]]] = set()

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> A2AClientTransport:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the httpx client if this transport created it (idempotent).

        A give-up CancelTask still on its way (at most :data:`GIVE_UP_CANCEL_S`)
        is waited for first."""
        if self._cancelling:
            await asyncio.wait(set(self._cancelling))
        await self._channel.aclose()

    @property
    def cancel_timeout_s(self) -> float:
        """The longest :meth:`cancel` takes: ``timeout_s`` when set, else the
        ``cancel_timeout_s`` given. RemoteNode reads it (duck-typed) to bound its
        wait for a cancel by this transport's own bound."""
        return self._timeout_s if self._timeout_s is not None else self._cancel_timeout_s

    @cancel_timeout_s.setter
    def cancel_timeout_s(self, value: float) -> None:
        # A subclass (or a caller) setting it, as before it was a property.
        self._cancel_timeout_s = value

    def already_cancelled(self, *, agent_url: str, task_id: str) -> bool:
        """Whether this transport itself is sending, or sent and had accepted,
        CancelTask for that task: a call that gave up at its ``timeout_s``. False
        again once that CancelTask failed. RemoteNode asks (duck-typed, an optional
        addition to the RemoteTransport protocol) before cancelling a call cut short,
        so the remote task is not cancelled twice; then waits for
        :meth:`wait_cancelled`."""
        return (agent_url, task_id) in self._given_up

    async def wait_cancelled(self, *, agent_url: str, task_id: str) -> bool:
        """Whether the CancelTask this transport sent for that task (a call that gave
        up at its ``timeout_s``) was accepted, once it is answered (at most
        :data:`GIVE_UP_CANCEL_S`): False when it failed, or when this transport sent
        none. Never raises an A2AError."""
        sending = self._given_up.get((agent_url, task_id))
        if sending is None or (sending.done() and sending.cancelled()):
            return False
        try:
            accepted, _said = await asyncio.shield(sending)
        except Exception:
            return False
        return accepted

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
            ep = parse_card(agent_card, agent_url=agent_url, source=agent_url)
            # Kept: a later call without the card (CancelTask) must reach the same
            # endpoint, not fetch a card the agent URL may not serve.
            self._inline[agent_url] = ep
            return ep
        inline = self._inline.get(agent_url)
        if inline is not None:
            return inline
        cached = self._cards.get(agent_url)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        url = card_url(agent_url)
        status_code, body = await self._channel.get(url, agent_url=agent_url)
        if status_code != 200:
            raise A2AProtocolError(f"cannot read the A2A agent card at {url}: HTTP "
                                   f"{status_code}", agent_url=agent_url)
        try:
            card = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise A2AProtocolError(f"the A2A agent card at {url} is not JSON: {exc}",
                                   agent_url=agent_url) from exc
        ep = parse_card(card, agent_url=agent_url, source=url)
        self._cards[agent_url] = (ep, time.monotonic() + self._card_ttl_s)
        return ep

    def _bound(self, request_timeout: float | None) -> float | None:
        return request_timeout if request_timeout is not None else self._timeout_s

    def _quick_bound(self, bound: float | None) -> float | None:
        """The bound of each quick call (card, GetTask) inside a call bounded by ``bound``.

        None when ``bound`` is set (it covers them already); otherwise
        ``stream_idle_timeout_s``: a peer that accepts the connection and never
        answers must not hold an unbounded call for ever (httpx's read timeout is
        None then, and the card fetch is not a stream).
        """
        return self._idle_s if bound is None else None

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

    async def _quick(self, coro: Awaitable[_T], quick: float | None, *, agent_url: str,
                     what: str, method: str | None = None) -> _T:
        """``coro``, a quick call, bounded by ``quick`` (see :meth:`_quick_bound`).

        Raises:
            A2ATimeoutError: naming ``what`` and where the bound comes from.
        """
        if quick is None:
            return await coro
        try:
            async with asyncio.timeout(quick):
                return await coro
        except TimeoutError as exc:
            if isinstance(exc, A2AError):
                raise
            raise A2ATimeoutError(
                f"A2A agent {agent_url}: {what} took more than {quick} s (the call has no "
                "timeout_s, so stream_idle_timeout_s bounds each card fetch and GetTask)",
                agent_url=agent_url, method=method) from exc

    async def _card(self, request: RemoteCallRequest, quick: float | None) -> Endpoint:
        """The endpoint of ``request``'s agent, its card fetch bounded by ``quick``."""
        return await self._quick(self.endpoint(request.agent_url, request.agent_card), quick,
                                 agent_url=request.agent_url, what="reading the agent card")

    async def _get_task(self, ep: Endpoint, task_id: str,
                        quick: float | None = None) -> Mapping[str, Any]:
        """GetTask (no history), bounded by ``quick`` (see :meth:`_quick_bound`)."""
        params: dict[str, Any] = {"id": task_id}
        if ep.version == V1_0:
            params["historyLength"] = 0
        method = method_name("get", ep.version)
        task = await self._quick(self._channel.call(ep, "get", params), quick,
                                 agent_url=ep.agent_url, what=f"{method} of task {task_id}",
                                 method=method)
        return task_from_v03(task) if ep.version == V0_3 else task

    async def _poll(self, ep: Endpoint, task: Mapping[str, Any],
                    done: frozenset[str] = FINAL_STATES,
                    quick: float | None = None) -> Mapping[str, Any]:
        """GetTask with growing pauses until the task's state is in ``done``.

        Each GetTask is bounded by ``quick``; the polling itself is not (the task
        may legitimately run for hours while its agent answers every poll).
        """
        pause = self._poll_s
        while task_state(task) not in done:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
            task_id = task.get("id")
            if not isinstance(task_id, str):
                raise A2AProtocolError(f"A2A agent {ep.agent_url} answered a task without "
                                       "an id", agent_url=ep.agent_url)
            task = await self._get_task(ep, task_id, quick)
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
        bound = self._bound(request.timeout_s)
        return await self._send_bounded(request, self._quick_bound(bound), bound)

    async def _send_bounded(self, request: RemoteCallRequest, quick: float | None,
                            bound: float | None) -> RemoteCallResult:
        """:meth:`_send` bounded by ``bound``; a task it gave up on is cancelled."""
        known: dict[str, str] = {}
        try:
            async with asyncio.timeout(bound):
                return await self._send(request, quick, bound, known)
        except TimeoutError as exc:
            if isinstance(exc, A2AError):
                raise  # a quick call's own bound (an unresponsive agent): no cancel
            task_id = known.get("task_id")
            cancelled = await self._cancel_given_up(request.agent_url, task_id)
            raise A2ATimeoutError(
                f"A2A agent {request.agent_url}: SendMessage took more than {bound} s"
                + (f" (task {task_id}){cancelled}" if task_id else ""),
                agent_url=request.agent_url) from exc

    async def _cancel_given_up(self, agent_url: str, task_id: str | None) -> str:
        """Best-effort CancelTask of a task the call gave up on (its timeout passed),
        so it does not keep running, and holding a task slot, with nobody waiting.

        Sent once; CANCELED is not waited for (the call is already late), and the
        request is bounded by :data:`GIVE_UP_CANCEL_S` (or the transport's
        ``cancel_timeout_s``/``timeout_s`` when shorter). It runs in a task of its
        own: a caller cancelled meanwhile (flow.stop()) does not cut it, and the
        task is remembered while it is on its way and once it was accepted
        (:meth:`already_cancelled`, :meth:`wait_cancelled`). Never raises an A2AError.
        Returns what happened, as the end of the timeout's message.
        """
        if task_id is None:
            return ""
        key = (agent_url, task_id)
        sending = asyncio.get_running_loop().create_task(
            self._send_give_up_cancel(agent_url, task_id))
        self._given_up[key] = sending
        self._given_up.move_to_end(key)
        while len(self._given_up) > _GIVEN_UP_KEPT:
            self._given_up.popitem(last=False)
        self._cancelling.add(sending)

        def sent(done: asyncio.Task[tuple[bool, str]]) -> None:
            self._cancelling.discard(done)
            failed = (done.cancelled() or done.exception() is not None
                      or not done.result()[0])
            if failed and self._given_up.get(key) is done:
                del self._given_up[key]  # not cancelled: the caller may try itself

        sending.add_done_callback(sent)
        _accepted, said = await asyncio.shield(sending)
        return said

    async def _send_give_up_cancel(self, agent_url: str, task_id: str
                                   ) -> tuple[bool, str]:
        """Whether CancelTask was accepted (or the task had ended meanwhile), and
        what happened, as the end of the timeout's message."""
        bounds = [GIVE_UP_CANCEL_S, self._cancel_timeout_s]
        if self._timeout_s is not None:
            bounds.append(self._timeout_s)
        bound = min(bounds)
        try:
            state = await self._bounded(self._cancel_once(agent_url, task_id), bound,
                                        agent_url=agent_url,
                                        what=f"sending CancelTask for task {task_id}")
        except TaskNotCancelableError:
            return True, " (it had ended meanwhile)"
        except A2AError as exc:
            logger.warning("A2A agent %s: could not cancel task %s after its timeout: %s",
                           agent_url, task_id, exc)
            return False, f"; cancelling it failed: {exc}"
        if state == CANCELED:
            return True, "; the task was cancelled (CancelTask)"
        return True, (f"; CancelTask was accepted (the task was still "
                      f"{state_to_v03(state) if state else 'in an unknown state'}, "
                      f"winding down)")

    async def _send(self, request: RemoteCallRequest, quick: float | None,
                    bound: float | None, known: dict[str, str] | None = None,
                    ) -> RemoteCallResult:
        """SendMessage itself is bounded by the call's ``bound`` only (it answers when
        the task ends: the transport's ``timeout_s`` must not cut a request that
        allows longer); the card fetch and the GetTask polls by ``quick``. The task
        id, once an answer names it, goes into ``known`` (for a cancel on timeout)."""
        ep = await self._card(request, quick)
        method = method_name("send", ep.version)
        answer = await self._channel.call(ep, "send", self._params(ep, request),
                                          read_timeout_s=bound)
        if ep.version == V0_3:
            try:
                answer = send_result_from_v03(answer)
            except ValueError as exc:
                raise A2AProtocolError(f"A2A agent {ep.agent_url}: {method} answered {exc}",
                                       agent_url=ep.agent_url, method=method) from exc
        message = answer.get("message")
        if isinstance(message, Mapping):
            note_remote_ids(_id(message.get("contextId")), _id(message.get("taskId")))
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
        note_remote_ids(_id(task.get("contextId")), _id(task.get("id")))
        task_id = _id(task.get("id"))
        if known is not None and task_id is not None and task_state(task) not in FINAL_STATES:
            known["task_id"] = task_id
        task = await self._poll(ep, task, quick=quick)
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
        quick = self._quick_bound(bound)
        ep = await self._bounded(self._card(request, quick), bound, agent_url=request.agent_url,
                                 what="reading the agent card")
        if not ep.streaming:
            logger.warning("A2A agent %s does not stream (its card's capabilities.streaming "
                           "is not true): falling back to %s", request.agent_url,
                           method_name("send", ep.version))
            remaining = None if deadline is None else max(
                0.0, deadline - asyncio.get_running_loop().time())
            result = await self._send_bounded(request, quick, remaining)
            yield RemoteStreamEvent(text="", done=True, meta=result.meta,
                                    context_id=result.context_id, task_id=result.task_id,
                                    agent_url=request.agent_url, result=result.result)
            return
        tracker = StreamTracker(agent_url=request.agent_url,
                                method=method_name("stream", ep.version))
        steps = self._follow(ep, request, tracker, quick)
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
                    await steps.aclose()  # the stream first: it holds a connection
                    cancelled = await self._cancel_given_up(request.agent_url,
                                                            tracker.task_id)
                    raise A2ATimeoutError(
                        f"A2A agent {request.agent_url}: the stream of task "
                        f"{tracker.task_id} did not finish within {bound} s{cancelled}",
                        agent_url=request.agent_url, method=tracker.method) from exc
                for event in events:
                    yield event
        finally:
            await steps.aclose()
        yield tracker.final_event()

    async def _follow(self, ep: Endpoint, request: RemoteCallRequest,
                      tracker: StreamTracker, quick: float | None,
                      ) -> AsyncGenerator[list[RemoteStreamEvent], None]:
        """Batches of events until the tracker is finished, resubscribing on drops.

        The GetTask calls of the fallback (the task ended while we were away) are
        bounded by ``quick``; the streams by their idle bound. The resubscribe
        budget counts consecutive failures: a resumed stream that brings new events
        earns it back, so a long stream behind a proxy that cuts connections now and
        then is followed to its end, while an agent that keeps failing is given up.
        """
        source = self._channel.events(ep, "stream", self._params(ep, request))
        attempts = 0
        subscribing = False
        while True:
            try:
                async for response in source:
                    events = tracker.apply(response)
                    note_remote_ids(tracker.context_id, tracker.task_id)
                    if events:
                        attempts = 0  # progress: this resume worked
                    yield events
                    if tracker.finished:
                        return
                reason = "the agent closed the stream before the task reached a final state"
            except A2AConnectionError as exc:
                reason = str(exc)
            except A2ATimeoutError as exc:
                # A resubscribe that could not connect in time (connect, pool or
                # write timeout) is one failed attempt, as a refused connection is.
                if not subscribing:
                    raise
                reason = str(exc)
            except (UnsupportedOperationError, TaskNotFoundError):
                if not subscribing or tracker.task_id is None:
                    raise
                # The task ended while we were away: read what is missing from GetTask.
                task = await self._get_task(ep, tracker.task_id, quick)
                yield tracker.apply({"task": await self._poll(ep, task, quick=quick)})
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
                    f"and {self._resubscribe_attempts} consecutive resubscribe attempts failed "
                    f"(last: {reason})", agent_url=ep.agent_url,
                    method=method_name("subscribe", ep.version))
            logger.info("A2A agent %s: stream of task %s dropped (%s); resubscribing "
                        "(attempt %d)", ep.agent_url, tracker.task_id, reason, attempts)
            await asyncio.sleep(self._backoff_s * 2 ** (attempts - 1))
            source = self._channel.events(ep, "subscribe", {"id": tracker.task_id})
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

    async def _cancel_once(self, agent_url: str, task_id: str) -> Any:
        """CancelTask, once; the task's state in the answer (None: not said)."""
        note_remote_ids(None, task_id)
        ep = await self.endpoint(agent_url)
        task = await self._channel.call(ep, "cancel", {"id": task_id})
        if ep.version == V0_3:
            task = task_from_v03(task)
        return task_state(task) if isinstance(task, Mapping) else None

    async def _cancel(self, agent_url: str, task_id: str) -> None:
        note_remote_ids(None, task_id)
        ep = await self.endpoint(agent_url)
        method = method_name("cancel", ep.version)
        task = await self._channel.call(ep, "cancel", {"id": task_id})
        if ep.version == V0_3:
            task = task_from_v03(task)
        task = await self._poll(ep, task, done=TERMINAL_STATES)
        state = task_state(task)
        if state != CANCELED:
            raise TaskNotCancelableError(
                f"A2A agent {agent_url} answered {method} for task {task_id} but the task "
                f"ended {state_to_v03(state)}", code=ErrorCode.TASK_NOT_CANCELABLE,
                agent_url=agent_url, method=method)
