"""The FastAPI app of :func:`penguiflow_a2a.server.create_a2a_app` (imported lazily).

Routes: the 2.1 ones of spec §16 (``GET /agent``, ``POST /message/send``,
``POST /message/stream``, ``POST /tasks/cancel``), the A2A 1.0 card at
``GET /.well-known/agent-card.json`` and JSON-RPC at ``POST /``.

Every non-GET request first passes :class:`Guard`: authentication (401/403),
the per-principal rate limit (429 + ``Retry-After``) and the body size limit
(413, decided from ``Content-Length`` before anything is read, and by counting
while a chunked body arrives). Only then is the body handed to the route, with the
principal ``auth`` returned: every route acts on the caller's own tasks only.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints'
annotations at runtime, and some name classes imported inside :func:`build_app`.
"""

import asyncio
import inspect
import logging
import math
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, Final

from starlette.datastructures import Headers as HTTPHeaders
from starlette.responses import JSONResponse, Response, StreamingResponse

from ._jsonrpc import handle_rpc
from ._legacy import LegacyFrames
from .protocol import V0_3, V1_0, wire_json
from .server import (
    A2AMessagePayload,
    A2ARequestError,
    A2AServerAdapter,
    A2ATaskCancelRequest,
)

__all__ = ["Guard", "SafeJSONResponse", "agent_card_v1", "build_app", "header_value",
           "parse_traceparent"]

logger = logging.getLogger("penguiflow_a2a.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_MODES = ["text/plain", "application/json"]
# A header value sent as is: Latin-1 text without controls (what 2.1 sent), no
# leading or trailing blank (h11 refuses those), not empty.
_HEADER_SAFE = re.compile(
    r"[\x21-\x7e\xa0-\xff](?:[\x20-\x7e\xa0-\xff]*[\x21-\x7e\xa0-\xff])?")
# Kept as is when a value is percent-encoded: printable ASCII except "%".
_QUOTE_SAFE = "".join(chr(c) for c in range(0x21, 0x7f) if chr(c) != "%")


class SafeJSONResponse(JSONResponse):
    """Starlette's JSON response (compact UTF-8, non-ASCII as is), except that a value
    with a lone surrogate (legal in a Python str: a flow's output, an error text) is
    written with ``\\u`` escapes, and a NaN or infinity as ``null``
    (:func:`~penguiflow_a2a.protocol.wire_json`), instead of failing the request
    with a 500: the client reads back the very same string."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except (UnicodeEncodeError, ValueError):
            return wire_json(content).encode()


def parse_traceparent(values: list[str]) -> tuple[str, str, bool] | None:
    """``(trace_id, parent_span_id, sampled)`` of a valid W3C ``traceparent``, else None.

    ``sampled`` is the flags' ``01`` bit: the run's trace is then sampled as a
    span with that remote parent (see ``PenguiFlow.adopt_trace_parent``).

    Strict (W3C Trace Context §3.2): exactly one header; lowercase hex fields;
    version ``ff`` invalid; version ``00`` has nothing after the flags; trace id
    and span id not all zeros. An invalid header is ignored (a new trace starts).
    """
    if len(values) != 1:
        return None
    match = _TRACEPARENT.fullmatch(values[0].strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 \
            or span_id == "0" * 16:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def header_value(value: str) -> str:
    """``value`` as an HTTP response header can carry it.

    Unchanged when it is Latin-1 text without control characters and without
    leading/trailing blanks (every id 2.1 could send). Anything else (non-Latin-1
    like ``"ctx-\u2603"``, CR, LF, NUL, other controls, edge blanks) would fail the
    response (a 500 or a dropped connection, leaving the task behind) or inject
    headers: such a value is sent percent-encoded as UTF-8 (RFC 3986, ``%`` itself
    encoded too), e.g. ``ctx-%E2%98%83``. The exact ids are in the stream's first
    frame.
    """
    if _HEADER_SAFE.fullmatch(value):
        return value
    return urllib.parse.quote(value, safe=_QUOTE_SAFE, errors="surrogatepass")


def principal_of(scope: Scope) -> Any:
    """The principal :class:`Guard` stored for this request (None without ``auth``)."""
    state = scope.get("state")
    return state.get("a2a_principal") if isinstance(state, dict) else None


def agent_card_v1(adapter: A2AServerAdapter) -> dict[str, Any]:
    """The A2A 1.0 AgentCard (plus the 0.3 union fields) of ``adapter``'s card."""
    card = adapter.agent_card
    url = adapter.agent_url.rstrip("/") + "/"
    skills = []
    for skill in card.skills:
        tags = getattr(skill, "tags", None)
        tags = [str(t) for t in tags] if isinstance(tags, list) and tags else list(card.tags)
        skills.append({"id": skill.name, "name": skill.name, "description": skill.description,
                       "tags": tags})
    out: dict[str, Any] = {
        "name": card.name, "description": card.description,
        "supportedInterfaces": [
            {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": V1_0},
            {"url": url, "protocolBinding": "JSONRPC", "protocolVersion": V0_3}],
        "version": card.version,
        "capabilities": {"streaming": True, "pushNotifications": False},
        "defaultInputModes": list(_MODES), "defaultOutputModes": list(_MODES),
        "skills": skills,
    }
    if card.documentation_url:
        out["documentationUrl"] = card.documentation_url
    if adapter.auth_scheme:
        # Each scheme in 1.0 form with its 0.3 form merged in, plus 0.3's "security"
        # list, as a2a-sdk's union card has them: the card lists a 0.3 interface, and a
        # 0.3 client reads "type" (without it, a2a-sdk's 0.3 model takes a Bearer
        # scheme for mutualTLS) and "security" (without it, no auth is required).
        out["securitySchemes"] = {name: _with_v03_scheme(scheme)
                                  for name, scheme in adapter.auth_scheme.items()}
        out["securityRequirements"] = [{"schemes": {name: {"list": []}}}
                                       for name in adapter.auth_scheme]
        out["security"] = [{name: []} for name in adapter.auth_scheme]
    out.update({"preferredTransport": "JSONRPC", "protocolVersion": V0_3, "url": url})
    return out


#: 1.0 SecurityScheme member -> (0.3 "type", {1.0 field: 0.3 field}).
_SCHEMES_V03: Final[Mapping[str, tuple[str, Mapping[str, str]]]] = {
    "apiKeySecurityScheme": ("apiKey", {"location": "in", "name": "name"}),
    "httpAuthSecurityScheme": ("http", {"scheme": "scheme", "bearerFormat": "bearerFormat"}),
    "oauth2SecurityScheme": ("oauth2", {"flows": "flows",
                                        "oauth2MetadataUrl": "oauth2MetadataUrl"}),
    "openIdConnectSecurityScheme": ("openIdConnect", {"openIdConnectUrl": "openIdConnectUrl"}),
    "mtlsSecurityScheme": ("mutualTLS", {}),
}
#: The OAuth2 flows 0.3 knows (1.0's deviceCode is not one), and their fields.
_FLOWS_V03: Final = ("authorizationCode", "clientCredentials", "implicit", "password")
_FLOW_FIELDS_V03: Final = ("authorizationUrl", "tokenUrl", "refreshUrl", "scopes")


def _with_v03_scheme(scheme: Any) -> Any:
    """A 1.0 SecurityScheme with its 0.3 fields (``type`` ...) added beside, as
    a2a-sdk's union card writes it; a scheme in another form is kept as given."""
    if not isinstance(scheme, Mapping) or "type" in scheme:
        return scheme
    out = dict(scheme)
    for member, (kind, fields) in _SCHEMES_V03.items():
        inner = scheme.get(member)
        if not isinstance(inner, Mapping):
            continue
        v03: dict[str, Any] = {"type": kind}
        for field_v1, field_v03 in (*fields.items(), ("description", "description")):
            if field_v1 in inner:
                v03[field_v03] = inner[field_v1]
        if isinstance(v03.get("flows"), Mapping):
            v03["flows"] = {
                name: {k: flow[k] for k in _FLOW_FIELDS_V03 if k in flow}
                for name, flow in v03["flows"].items()
                if name in _FLOWS_V03 and isinstance(flow, Mapping)}
        for key, value in v03.items():
            out.setdefault(key, value)
        break
    return out


class _TokenBuckets:
    """Per-key token buckets: ``rate`` tokens/s, burst ``max(1, rate)``; LRU-bounded."""

    def __init__(self, rate: float, max_keys: int = 10_000) -> None:
        self.rate, self.burst, self.max_keys = rate, max(1.0, rate), max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Take one token; 0.0 if granted, else the seconds until one is available."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


async def _send_json(send: Send, status: int, body: bytes,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _detail(detail: Any) -> bytes:
    return wire_json({"detail": detail}, separators=None, default=str).encode()


class Guard:
    """ASGI middleware: auth, rate limit and body size for every non-GET request.

    Header values are never logged (some are credentials). The principal that
    ``auth`` returned is kept in ``scope["state"]["a2a_principal"]``.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 adapter: A2AServerAdapter) -> None:
        self.app, self.adapter = app, adapter
        self.buckets = _TokenBuckets(adapter.rate_limit) if adapter.rate_limit else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        adapter = self.adapter
        headers = HTTPHeaders(scope=scope)
        principal: Any = None
        if adapter.auth is not None:
            try:
                principal = adapter.auth(headers)
                if inspect.isawaitable(principal):
                    principal = await principal
            except A2ARequestError as exc:
                extra = ([(b"www-authenticate", b"Bearer")] if exc.status_code == 401 else [])
                await _send_json(send, exc.status_code, _detail(exc.detail), extra)
                return
            except Exception:
                logger.exception("a2a_auth_callable_failed")
                await _send_json(send, 500, _detail("authentication failed"))
                return
        if self.buckets is not None:
            client = scope.get("client")
            key = (f"principal:{principal}" if principal is not None
                   else f"client:{client[0] if client else '?'}")
            wait = self.buckets.take(key)
            if wait > 0:
                await _send_json(send, 429, _detail("rate limit exceeded"),
                                 [(b"retry-after", str(max(1, math.ceil(wait))).encode())])
                return
        limit = adapter.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            status = 413 if length.isdigit() else 400
            await _send_json(send, status, _detail(
                f"request body larger than {limit} bytes" if status == 413
                else "invalid Content-Length"))
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            body += message.get("body", b"")
            if len(body) > limit:
                await _send_json(send, 413, _detail(f"request body larger than {limit} bytes"))
                return
            if not message.get("more_body", False):
                break
        scope.setdefault("state", {})["a2a_principal"] = principal
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _ClientStalled(Exception):
    """A stream's client took no bytes for the response's ``send_timeout_s``."""


def _bounded_send(send: Send, timeout_s: float | None) -> Send:
    """``send`` that gives up after ``timeout_s``: an ASGI server's ``send`` waits
    while the socket's buffers are full, so a client that stopped reading would
    hold the response's coroutine (and its task's subscriber) for ever."""
    if timeout_s is None:
        return send

    async def bounded(message: Message) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await send(message)
        except TimeoutError:
            raise _ClientStalled from None

    return bounded


def _log_stalled(scope: Scope, timeout_s: float | None) -> None:
    client = scope.get("client")
    logger.warning("a2a_stream_client_stalled", extra={
        "client": f"{client[0]}:{client[1]}" if client else None, "send_timeout_s": timeout_s,
        "detail": "the client read nothing for send_timeout_s: the stream is given up"})


class LegacyStream(StreamingResponse):
    """The 2.1 ``/message/stream`` response: closes its frames however it ends.

    The frames' ``aclose`` ends a task whose message was never emitted; calling it
    here covers a response that failed or was given up before its first frame.
    A client that reads nothing for ``send_timeout_s`` is given up (logged).
    """

    def __init__(self, frames: LegacyFrames, headers: dict[str, str], *,
                 send_timeout_s: float | None = None) -> None:
        super().__init__(frames, media_type="text/event-stream", headers=headers)
        self.frames = frames
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, _bounded_send(send, self.send_timeout_s))
        except _ClientStalled:
            _log_stalled(scope, self.send_timeout_s)
        finally:
            await self.frames.aclose()


class EventStream(Response):
    """An SSE response that ends when its frames end, the client leaves, ``cut`` is
    set, or one write waits longer than ``send_timeout_s``.

    ``cut`` is the subscriber's "dropped" signal (its queue overflowed). A client
    that reads nothing leaves the writer blocked in ``send`` for ever, and when the
    task ends before the queue overflows nothing would cut it: ``send_timeout_s``
    bounds each write, and the response is abandoned (logged) instead of waiting.
    """

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], cut: asyncio.Event | None, *,
                 send_timeout_s: float | None = None) -> None:
        self.frames, self.cut = frames, cut
        self.send_timeout_s = send_timeout_s
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        bounded = _bounded_send(send, self.send_timeout_s)

        async def write() -> None:
            try:
                async for frame in self.frames:
                    await bounded({"type": "http.response.body", "body": frame,
                                   "more_body": True})
                await bounded({"type": "http.response.body", "body": b"", "more_body": False})
            except _ClientStalled:
                _log_stalled(scope, self.send_timeout_s)

        async def left() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(write()),
                                            asyncio.ensure_future(left())]
        if self.cut is not None:
            waits.append(asyncio.ensure_future(self.cut.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            results = await asyncio.gather(*waits, return_exceptions=True)
            await self.frames.aclose()  # type: ignore[attr-defined]
        if isinstance(results[0], Exception):
            logger.error("a2a_stream_failed", exc_info=results[0])


def build_app(adapter: A2AServerAdapter, *, include_docs: bool) -> Any:
    """The FastAPI app; see :func:`penguiflow_a2a.server.create_a2a_app`."""
    from fastapi import FastAPI, Request

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await adapter.start()
        try:
            yield
        finally:
            await adapter.stop()

    card = adapter.agent_card
    app = FastAPI(title=card.name, description=card.description, version=card.version,
                  lifespan=lifespan, docs_url="/docs" if include_docs else None,
                  redoc_url="/redoc" if include_docs else None,
                  openapi_url="/openapi.json" if include_docs else None,
                  default_response_class=SafeJSONResponse)
    app.add_middleware(Guard, adapter=adapter)

    async def request_error(_request: Request, exc: Exception) -> SafeJSONResponse:
        assert isinstance(exc, A2ARequestError)
        return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    app.add_exception_handler(A2ARequestError, request_error)

    def traceparent(request: Request) -> tuple[str, str, bool] | None:
        return parse_traceparent(request.headers.getlist("traceparent"))

    @app.get("/agent")
    async def agent() -> dict[str, Any]:
        return card.to_payload()

    @app.get("/.well-known/agent-card.json")
    async def agent_card() -> dict[str, Any]:
        return agent_card_v1(adapter)

    @app.post("/message/send", response_model=None)
    async def message_send(payload: A2AMessagePayload, request: Request) -> dict[str, Any]:
        return await adapter.handle_send(payload, traceparent=traceparent(request),
                                         principal=principal_of(request.scope))

    @app.post("/message/stream")
    async def message_stream(payload: A2AMessagePayload, request: Request) -> StreamingResponse:
        frames, task_id, context_id = await adapter.stream(
            payload, traceparent=traceparent(request), principal=principal_of(request.scope))
        try:
            return LegacyStream(frames, headers={
                "Cache-Control": "no-cache", "X-A2A-Task-Id": header_value(task_id),
                "X-A2A-Context-Id": header_value(context_id)},
                send_timeout_s=adapter.stream_send_timeout_s)
        except BaseException:
            await frames.aclose()  # the task must not stay SUBMITTED for ever
            raise

    @app.post("/tasks/cancel", response_model=None)
    async def tasks_cancel(payload: A2ATaskCancelRequest, request: Request) -> dict[str, Any]:
        return await adapter.cancel(payload, principal=principal_of(request.scope))

    @app.post("/", include_in_schema=False)
    async def jsonrpc(request: Request) -> Response:
        version = request.headers.get("a2a-version")
        if version is None:
            version = request.query_params.get("A2A-Version")
        reply = await handle_rpc(adapter, await request.body(), version=version,
                                 traceparent=traceparent(request),
                                 principal=principal_of(request.scope))
        if reply.stream is not None:
            return EventStream(reply.stream, reply.cut,
                               send_timeout_s=adapter.stream_send_timeout_s)
        return Response(reply.body, media_type="application/json")

    return app
