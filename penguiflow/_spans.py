"""The span model: a trace's events in, its OpenTelemetry spans (as SpanData) out.

The mapping of ``docs/reference/telemetry.md`` (and the observability design's
table) lives here and only here. Two callers feed it the same events:

* the live tracer (:mod:`penguiflow._tracer`) as the runtime emits them, and
* ``pf export``, from the events a StateStore holds.

So a span rebuilt from storage equals the live one in ids, names, parents and
timings by construction. The model never reads a clock: every time is an
event's ``ts`` (epoch seconds), so replaying stored events is exact.

Ids. The root span's id is derived from the trace id (``_ids.root_span_id``);
a node span's id is its invocation id (:func:`span_id_of`: the runtime's ids are
16 hex digits; any other id a store holds, e.g. one saved through
``save_event``, maps to a deterministic digest of it, the same for a span and
for the parents and links naming it); a remote call's CLIENT span id is
derived from the invocation id and the call's index within it. A node span's
parent is its single upstream invocation, else the root; an invocation that
consumed several upstream outputs (a join) gets one link per upstream.

A ``trace_parent`` event (``PenguiFlow.adopt_trace_parent``) of a trace not
started yet is kept aside (bounded) and applied by the trace's first other
event: a trace only adopted opens nothing.

A span is handed to ``on_end`` when it ends; the root span ends when
:meth:`SpanModel.end_trace` is called (the live tracer: when the trace drains
or the flow stops; the exporter: after the last stored event).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import semconv as sc
from ._ids import otel_trace_id, root_span_id
from .errors import peer_text, safe_str
from .spandata import SpanData, SpanEventData, SpanLinkData

if TYPE_CHECKING:
    from .state import StoredEvent

__all__ = ["SpanModel", "derived_span_id", "error_type_of", "span_id_of", "spans_from_events"]

_EXC_NAME = re.compile(r"^(?:<unprintable ([A-Za-z_][\w.]*):|([A-Za-z_][\w.]*)\()")
_EMPTY: Mapping[str, Any] = {}


def error_type_of(exception_repr: Any) -> str:
    """The exception class name in a ``repr(exc)`` string (``"ValueError('x')"``), or in
    ``errors.safe_repr``'s placeholder (``"<unprintable ValueError: ...>"``)."""
    if not isinstance(exception_repr, str):
        return "Exception"
    match = _EXC_NAME.match(exception_repr)
    return (match.group(1) or match.group(2)) if match else "Exception"


def derived_span_id(*parts: str) -> int:
    """A deterministic, non-zero 64-bit span id from ``parts``.

    Any str is accepted: lone surrogates are encoded with ``surrogatepass`` (the
    same bytes as plain UTF-8 for every other str), as in ``_ids.root_span_id``.
    """
    digest = hashlib.blake2b(":".join(parts).encode("utf-8", "surrogatepass"),
                             digest_size=8, person=b"pf-span")
    return int.from_bytes(digest.digest(), "big") or 1


def _hex_span_id(text: str) -> int:
    """``text`` as a span id when it is 16 hex digits and not all zero, else 0."""
    if len(text) == 16:
        try:
            value = int(text, 16)
        except ValueError:
            return 0
        if value > 0:
            return value
    return 0


def span_id_of(invocation_id: str) -> int:
    """The span id of the invocation ``invocation_id``: never raises, never zero.

    16 hex digits (every id the runtime makes, ``_ids.new_invocation_id``) are
    the span id itself; any other str (a stored id such as ``"inv-1"``, or all
    zeros, which is not a valid span id) maps to a deterministic 64-bit digest
    of it, so a span and every parent or link naming its id still agree. (A
    16-character spelling ``int()`` also takes, such as ``"_"`` separators, is the
    number it spells: deterministic as well.)
    """
    return _hex_span_id(invocation_id) or derived_span_id("invocation", invocation_id)


def _count(value: Any) -> int:
    return value if isinstance(value, int) else 0


#: Nanosecond times are clamped to what OTLP's fixed64 fields hold.
_NS_MAX = (1 << 63) - 1


def _ns(ts: float) -> int:
    # A stored time that is no time (NaN, infinite, 1e300: read back by pf export)
    # is clamped, never an OverflowError that loses the whole trace's export.
    try:
        return min(max(round(ts * 1e9), 0), _NS_MAX)
    except (OverflowError, ValueError):
        return 0 if ts != ts or ts < 0 else _NS_MAX


def _call_index(extra: Mapping[str, Any]) -> int | None:
    """The remote call's index as RemoteNode counted it (``remote_call_index``; absent
    on an invocation's first call, so 0); None when it is not an int >= 0."""
    given = extra.get("remote_call_index", 0)
    return given if type(given) is int and given >= 0 else None


def _streamed(span: SpanData, extra: Mapping[str, Any]) -> None:
    """The chunks an invocation streamed (ctx.emit_chunk with text, RemoteNode's
    included) and its time to the first, on its span: whether it then succeeded,
    failed or was cancelled (the runtime reports them with each outcome)."""
    chunks = extra.get("stream_chunks")
    if isinstance(chunks, int):
        span.attributes[sc.PF_STREAM_CHUNKS] = chunks
        first = extra.get("stream_first_chunk_ts")
        if isinstance(first, int | float):
            span.attributes[sc.GEN_AI_TIME_TO_FIRST_CHUNK] = max(
                0.0, (_ns(first) - span.start_ns) / 1e9)



def _server_of(url: str) -> dict[str, Any]:
    """``server.address`` and ``server.port`` of an agent URL, as far as it has them:
    none for one ``urlsplit`` refuses (``http://[evil``: an unclosed IPv6 bracket,
    from a stored event or a user's card), or a port out of range."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return {}
    if not parts.hostname:
        return {}
    attributes: dict[str, Any] = {sc.SERVER_ADDRESS: parts.hostname}
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        attributes[sc.SERVER_PORT] = port
    return attributes

class _TraceSpans:
    """The open spans of one trace."""

    __slots__ = ("emitters", "flows", "inv_nodes", "nodes", "otel_id", "remote_count",
                 "remote_index", "remotes", "root", "seen_flows", "trace_id")

    def __init__(self, trace_id: str, start_ts: float, flow_name: str | None) -> None:
        self.trace_id = trace_id
        self.otel_id = int(otel_trace_id(trace_id), 16)
        attributes: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: sc.OP_INVOKE_WORKFLOW,
            sc.PF_TRACE_ID: trace_id,
        }
        if flow_name:
            attributes[sc.GEN_AI_WORKFLOW_NAME] = flow_name
        self.root = SpanData(
            name=sc.workflow_span_name(flow_name), trace_id=self.otel_id,
            span_id=int(root_span_id(trace_id), 16), parent_span_id=None, kind="internal",
            start_ns=_ns(start_ts), end_ns=_ns(start_ts), attributes=attributes, root=True)
        #: Open node spans by invocation id; ``names`` remembers every node seen.
        self.nodes: dict[str, SpanData] = {}
        #: The open remote CLIENT span of each invocation making a call.
        self.remotes: dict[str, SpanData] = {}
        self.remote_count: dict[str, int] = {}
        #: The call index (``remote_call_index``) of each open CLIENT span: an event
        #: of an earlier call (a late local cancel) must not end a later call's span.
        self.remote_index: dict[str, int] = {}
        #: Node name of every invocation seen (for ``pf.edge`` on fan-in links).
        self.inv_nodes: dict[str, str | None] = {}
        #: flow ids that recorded events here (a playbook subflow shares the trace).
        self.flows: set[str | None] = set()
        #: Over a delivering bus (penguiflow.binding): the worker ids that emitted the
        #: trace (``emitter`` of message events), and every flow id ever seen. Only
        #: the emitter's process exports the root span: a worker's spans hang under
        #: the spans of the processes that sent it their inputs.
        self.emitters: set[str] | None = None
        self.seen_flows: set[str | None] = set()


class SpanModel:
    """Turns events into SpanData; see the module docstring for the mapping.

    Args:
        on_end: called with each span as it ends (root spans included).
        on_parent: called as ``on_parent(root_span, parent_span_id, sampled)``
            when a trace adopts a caller's span as its root's parent (a
            ``trace_parent`` event, applied when the trace's first other event
            comes), before any span of it ends.
        on_open: called with a trace's root span as the trace opens (its first
            event, an adopted parent applied), before that event is applied.
    """

    def __init__(self, on_end: Callable[[SpanData], None],
                 on_parent: Callable[[SpanData, int, bool], None] | None = None,
                 on_open: Callable[[SpanData], None] | None = None) -> None:
        self._on_end = on_end
        self._on_parent = on_parent
        self._on_open = on_open
        self._traces: dict[str, _TraceSpans] = {}
        #: Traces whose root a stop() ended while the flow still held their work:
        #: run() again continues them under the same (derived) root id, which must
        #: not be exported a second time. Oldest forgotten first.
        self._stopped_roots: dict[str, None] = {}
        #: Open traces by OTel trace id (the tracer's sampler reads their roots).
        self._by_otel: dict[int, _TraceSpans] = {}
        #: ``trace_parent`` events of traces not started yet (PenguiFlow.adopt_trace_parent
        #: comes before the emit): applied by the trace's first other event, so a
        #: trace only adopted (its emit refused, the client gone) opens nothing.
        #: Oldest forgotten first.
        self._pending_parents: dict[str, tuple[float, Mapping[str, Any]]] = {}
        #: A node answering with a new trace id hands its output to an invocation in
        #: another trace, whose span must not name a parent there: the trace of the
        #: upstream invocation is looked up. Invocations of open traces (their
        #: trace's spans) are all known, however long they run; those of ended
        #: traces are remembered (trace id, node name) as their trace ends, two
        #: generations of at most _INVS_MAX each.
        self._open_invs: dict[str, _TraceSpans] = {}
        self._invs: dict[str, tuple[str, str | None]] = {}
        self._invs_old: dict[str, tuple[str, str | None]] = {}

    def open_traces(self) -> list[str]:
        """Trace ids with a root span not yet ended."""
        return list(self._traces)

    def is_open(self, trace_id: Any) -> bool:
        """Whether ``trace_id``'s root span has not ended yet."""
        return str(trace_id) in self._traces

    def node_span(self, invocation_id: str) -> SpanData | None:
        """The open span of ``invocation_id`` (for making it current around user code)."""
        for spans in self._traces.values():
            span = spans.nodes.get(invocation_id)
            if span is not None:
                return span
        return None

    def root_of(self, otel_id: int) -> SpanData | None:
        """The root span of the open trace whose OTel trace id is ``otel_id``, if any."""
        spans = self._by_otel.get(otel_id)
        return None if spans is None else spans.root

    def pending_sampled(self, trace_id: Any) -> bool | None:
        """The sampled flag of the caller ``trace_id`` adopted, not started yet (None:
        no valid parent kept for it)."""
        adopted = self._pending_parents.get(str(trace_id)) if self._pending_parents else None
        if adopted is None or not _hex_span_id(str(adopted[1].get("parent_span_id"))):
            return None
        return adopted[1].get("parent_sampled") is not False

    def invocation_ended(self, invocation_id: str) -> bool:
        """Whether ``invocation_id`` started in a trace that has ended since (as far
        as remembered: the invocations of recently ended traces)."""
        return invocation_id not in self._open_invs and (
            invocation_id in self._invs or invocation_id in self._invs_old)

    def drop_pending(self, flow_id: str | None) -> None:
        """Forget the adopted parents ``flow_id`` recorded for traces never started."""
        pending = self._pending_parents
        for key in [k for k, (_ts, extra) in pending.items()
                    if extra.get(_PENDING_FLOW) == flow_id]:
            del pending[key]

    def otel_id_of(self, trace_id: Any) -> int:
        """The OTel trace id of ``trace_id``: kept while its spans are open, else derived."""
        spans = self._traces.get(str(trace_id))
        return spans.otel_id if spans is not None else int(otel_trace_id(str(trace_id)), 16)

    def remote_span(self, trace_id: str, invocation_id: str | None) -> SpanData | None:
        """The open remote CLIENT span of ``invocation_id`` in ``trace_id``, if any."""
        spans = self._traces.get(trace_id)
        return None if spans is None else spans.remotes.get(invocation_id or "")

    # -- feeding -------------------------------------------------------------------------

    def feed(
        self, trace_id: Any, ts: float, kind: str, node_name: str | None, node_id: str | None,
        invocation_id: str | None, parents: tuple[str, ...], attempt: int,
        latency_ms: float | None, flow_name: str | None, flow_id: str | None,
        queued_ts: float | None, extra: Mapping[str, Any] | None,
    ) -> None:
        """Apply one event. Events without a trace id (``node_cancelled``) are ignored."""
        if trace_id is None:
            return
        tid = str(trace_id)
        spans = self._traces.get(tid)
        start_ts = queued_ts if queued_ts is not None and queued_ts < ts else ts
        if spans is None:
            if kind == "trace_parent":
                # Kept until the trace starts (see _pending_parents): the trace's
                # flows and its sampling decision are the ones of its real events.
                pending = self._pending_parents
                pending.pop(tid, None)
                pending[tid] = (ts, {**(extra or _EMPTY), _PENDING_FLOW: flow_id})
                if len(pending) > _PENDING_MAX:
                    del pending[next(iter(pending))]
                return
            spans = self._traces[tid] = _TraceSpans(tid, start_ts, flow_name)
            self._by_otel[spans.otel_id] = spans
            if self._pending_parents:
                adopted = self._pending_parents.pop(tid, None)
                if adopted is not None:
                    adopted_ts, adopted_extra = adopted
                    if _ns(adopted_ts) < spans.root.start_ns:
                        spans.root.start_ns = _ns(adopted_ts)
                    self._trace_parent(spans, _ns(adopted_ts), None, None, None, (), 0, None,
                                       adopted_extra)
            if self._on_open is not None:
                self._on_open(spans.root)
        root = spans.root
        spans.flows.add(flow_id)
        spans.seen_flows.add(flow_id)
        ns = _ns(ts)
        if _ns(start_ts) < root.start_ns:
            root.start_ns = _ns(start_ts)
        if root.end_ns is None or ns > root.end_ns:
            root.end_ns = ns
        extra = extra or _EMPTY
        handler = _HANDLERS.get(kind)
        if handler is not None:
            handler(self, spans, ns, node_name, node_id, invocation_id, parents, attempt,
                    latency_ms, extra)
            if spans.emitters is not None and kind == "node_start" and invocation_id:
                span = spans.nodes.get(invocation_id)
                if span is not None and flow_id is not None:
                    span.attributes[sc.PF_WORKER_ID] = flow_id
        elif kind == "message_fetch" or kind == "message_emit":
            emitter = extra.get("emitter")
            if isinstance(emitter, str):
                if spans.emitters is None:
                    spans.emitters = set()
                spans.emitters.add(emitter)

    def end_trace(self, trace_id: Any, flow_id: str | None = None, *,
                  stopped: bool = False, end_ns: int | None = None) -> None:
        """End the root span (and any span still open) of ``trace_id``.

        With ``flow_id``, only that flow is done with the trace: the root ends
        once every flow that recorded events in it (a playbook subflow shares its
        parent's trace) is done. ``stopped``: the flow stopped with work of the
        trace left; if it runs again and the trace goes on, its root (exported
        now) is not exported again when the trace ends. ``end_ns``: when the trace
        was cut (the stop's time): node and remote spans still open end then, with
        ``error.type=unfinished`` (without it, at the trace's last event).
        """
        key = str(trace_id)
        spans = self._traces.get(key)
        if spans is None:
            if self._pending_parents:
                self._pending_parents.pop(key, None)
            return
        if flow_id is not None:
            spans.flows.discard(flow_id)
            if spans.flows:
                return
        del self._traces[key]
        try:
            self._end_spans(key, spans, stopped, end_ns)
        finally:
            # Only now: the spans ended above are decided on this root (root_of).
            if self._by_otel.get(spans.otel_id) is spans:
                del self._by_otel[spans.otel_id]
            self._remember_invs(spans)

    def _remember_invs(self, spans: _TraceSpans) -> None:
        """Move the invocations of ``spans`` (its trace ended) from the open ones to
        the remembered ones: a node of another trace may take one's output later."""
        open_invs = self._open_invs
        invs = self._invs
        trace_id = spans.trace_id
        for inv, node_name in spans.inv_nodes.items():
            if open_invs.get(inv) is spans:
                del open_invs[inv]
            invs[inv] = (trace_id, node_name)
            if len(invs) > _INVS_MAX:
                self._invs_old = invs
                self._invs = invs = {}

    def _end_spans(self, key: str, spans: _TraceSpans, stopped: bool,
                   end_ns: int | None) -> None:
        end = spans.root.end_ns
        if end_ns is not None and end is not None and (spans.remotes or spans.nodes):
            # The root spans what ran in it, to the stop that cut it.
            spans.root.end_ns = end = max(end, end_ns)
        for span in list(spans.remotes.values()) + list(spans.nodes.values()):
            # Still open when its trace ended: the flow stopped mid-invocation (live:
            # ``end_ns``, the stop's time) or the stored events end here. Not a 0 ms
            # success at its own start: unfinished, an error, as long as it ran.
            cut = end if end_ns is None else end_ns
            span.end_ns = cut if cut is None else max(cut, span.start_ns)
            span.attributes.setdefault(sc.ERROR_TYPE, sc.ERROR_UNFINISHED)
            span.status = "error"
            span.status_description = (
                "still running when the flow stopped" if end_ns is not None
                else "no end recorded: the events stop while it runs")
            self._on_end(span)
        emitters = spans.emitters
        if key in self._stopped_roots:
            del self._stopped_roots[key]  # the continued trace: its root went already
            return
        if stopped:
            self._stopped_roots[key] = None
            if len(self._stopped_roots) > 10_000:
                del self._stopped_roots[next(iter(self._stopped_roots))]
        if emitters is None or not emitters.isdisjoint(spans.seen_flows):
            self._on_end(spans.root)

    def end_all(self) -> None:
        """End every open trace (the flow stopped); adopted parents of traces that
        never started are dropped."""
        for trace_id in list(self._traces):
            self.end_trace(trace_id)
        self._pending_parents.clear()

    # -- node spans ----------------------------------------------------------------------

    def _node_start(self, spans: _TraceSpans, ns: int, node_name: str | None,
                    node_id: str | None, inv: str | None, parents: tuple[str, ...],
                    attempt: int, latency_ms: float | None, extra: Mapping[str, Any]) -> None:
        if inv is None or inv in spans.nodes:
            return  # a later attempt of an open invocation: same span
        attributes: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: sc.OP_INVOKE_AGENT,
            sc.PF_INVOCATION_ID: inv,
        }
        if node_name is not None:
            attributes[sc.GEN_AI_AGENT_NAME] = node_name
        if node_id is not None:
            attributes[sc.PF_NODE_ID] = node_id
        links: list[SpanLinkData] = []
        if len(parents) == 1:
            up = parents[0]
            parent = span_id_of(up)
            if up not in spans.inv_nodes:
                other = self._inv_elsewhere(up)
                if other is not None and other[0] != spans.trace_id:
                    # The upstream node answered with a new trace id: its span is in
                    # the old trace. Under this trace's root, linked to it there.
                    parent = spans.root.span_id
                    links.append(self._link(spans, up, node_name))
        else:
            parent = spans.root.span_id
            for up in parents:
                links.append(self._link(spans, up, node_name))
        spans.inv_nodes[inv] = node_name
        self._open_invs[inv] = spans
        spans.nodes[inv] = SpanData(
            name=sc.agent_span_name(node_name), trace_id=spans.otel_id, span_id=span_id_of(inv),
            parent_span_id=parent, kind="internal", start_ns=ns, attributes=attributes,
            links=links)

    def _inv_elsewhere(self, up: str) -> tuple[str, str | None] | None:
        """The trace id and node name of the invocation ``up`` of an open trace or a
        recently ended one, if known."""
        spans = self._open_invs.get(up)
        if spans is not None:
            return spans.trace_id, spans.inv_nodes.get(up)
        return self._invs.get(up) or self._invs_old.get(up)

    def _upstream_trace(self, spans: _TraceSpans, up: str) -> int:
        """The OTel trace id of the upstream invocation ``up``: this trace's unless
        an invocation of another trace (open, or ended recently) has that id."""
        if up in spans.inv_nodes:
            return spans.otel_id
        other = self._inv_elsewhere(up)
        if other is None or other[0] == spans.trace_id:
            return spans.otel_id
        return self.otel_id_of(other[0])

    def _link(self, spans: _TraceSpans, up: str, node_name: str | None) -> SpanLinkData:
        """A link to the upstream invocation ``up``'s span, in its own trace."""
        name = spans.inv_nodes.get(up)
        if name is None:
            other = self._inv_elsewhere(up)
            name = other[1] if other is not None else None
        return SpanLinkData(self._upstream_trace(spans, up), span_id_of(up), {
            sc.PF_EDGE: f"{name or '?'}->{node_name}"})

    def _cut_remote(self, spans: _TraceSpans, inv: str | None, ns: int,
                    error_type: str | None, description: str) -> None:
        """End the CLIENT span ``inv``'s attempt left open: its call was cut short
        (the node's timeout, an error around it, the node ending) and no remote
        event will end it, or a retry's call would take its place."""
        span = spans.remotes.pop(inv or "", None)
        if span is None:
            return
        spans.remote_index.pop(inv or "", None)
        span.end_ns = max(ns, span.start_ns)
        if error_type is not None:
            span.attributes[sc.ERROR_TYPE] = error_type
            span.status = "error"
            span.status_description = description
        self._on_end(span)

    def _end_node(self, spans: _TraceSpans, inv: str | None, ns: int, attempt: int, *,
                  cut_remote: bool = True) -> None:
        if cut_remote and spans.remotes:
            self._cut_remote(spans, inv, ns, None, "")
        span = spans.nodes.pop(inv, None) if inv is not None else None
        if span is None:
            return
        span.end_ns = ns
        if attempt:
            # Only when retried: an attribute costs the SDK ~1 µs per span to
            # validate, and most invocations succeed at once (absent = 1 attempt).
            span.attributes[sc.PF_ATTEMPTS] = attempt + 1
        self._on_end(span)

    def _node_success(self, spans: _TraceSpans, ns: int, node_name: str | None,
                      node_id: str | None, inv: str | None, parents: tuple[str, ...],
                      attempt: int, latency_ms: float | None,
                      extra: Mapping[str, Any]) -> None:
        span = spans.nodes.get(inv) if inv is not None else None
        if span is not None:
            _streamed(span, extra)
        if span is not None and len(parents) > 1 and not span.links:
            # A join reports every input it joined at the end: a child of the
            # root, linked to each upstream invocation.
            span.parent_span_id = spans.root.span_id
            span.links = [self._link(spans, up, node_name) for up in parents]
        self._end_node(spans, inv, ns, attempt)

    def _node_attempt_failed(self, spans: _TraceSpans, ns: int, node_name: str | None,
                             node_id: str | None, inv: str | None, parents: tuple[str, ...],
                             attempt: int, latency_ms: float | None,
                             extra: Mapping[str, Any], *, timeout: bool = False) -> None:
        if spans.remotes:
            exc = extra.get("exception")
            self._cut_remote(spans, inv, ns, sc.ERROR_TIMEOUT if timeout else error_type_of(exc),
                             "cut short by the node's timeout" if timeout
                             else f"cut short: {safe_str(exc)}")
        span = spans.nodes.get(inv) if inv is not None else None
        if span is None:
            return
        exc = extra.get("exception")
        if timeout:
            span.events.append(SpanEventData(sc.EV_TIMEOUT, ns, {sc.PF_ATTEMPT: attempt}))
            span.attributes[sc.ERROR_TYPE] = sc.ERROR_TIMEOUT
        else:
            attributes: dict[str, Any] = {
                "exception.type": error_type_of(exc), "exception.message": safe_str(exc),
                sc.PF_ATTEMPT: attempt}
            stacktrace = extra.get("traceback")
            if type(stacktrace) is str:  # stored by the runtime since issue 15 §2
                attributes["exception.stacktrace"] = stacktrace
            span.events.append(SpanEventData("exception", ns, attributes))
            span.attributes[sc.ERROR_TYPE] = error_type_of(exc)

    def _node_timeout(self, spans: _TraceSpans, ns: int, node_name: str | None,
                      node_id: str | None, inv: str | None, parents: tuple[str, ...],
                      attempt: int, latency_ms: float | None,
                      extra: Mapping[str, Any]) -> None:
        self._node_attempt_failed(spans, ns, node_name, node_id, inv, parents, attempt,
                                  latency_ms, extra, timeout=True)

    def _node_retry(self, spans: _TraceSpans, ns: int, node_name: str | None,
                    node_id: str | None, inv: str | None, parents: tuple[str, ...],
                    attempt: int, latency_ms: float | None, extra: Mapping[str, Any]) -> None:
        span = spans.nodes.get(inv) if inv is not None else None
        if span is None:
            return
        # A retry means the failed attempt is not the invocation's outcome.
        error_type = span.attributes.pop(sc.ERROR_TYPE, None)
        sleep_s = extra.get("sleep_s")
        attributes: dict[str, Any] = {
            sc.PF_ATTEMPT: attempt,
            sc.ERROR_TYPE: error_type or error_type_of(extra.get("exception")),
        }
        if isinstance(sleep_s, int | float):
            attributes[sc.PF_BACKOFF_MS] = float(sleep_s) * 1000.0
        span.events.append(SpanEventData(sc.EV_RETRY, ns, attributes))

    def _node_failed(self, spans: _TraceSpans, ns: int, node_name: str | None,
                     node_id: str | None, inv: str | None, parents: tuple[str, ...],
                     attempt: int, latency_ms: float | None, extra: Mapping[str, Any]) -> None:
        if spans.remotes:
            self._cut_remote(spans, inv, ns, error_type_of(extra.get("exception")),
                             "cut short: the node failed")
        span = spans.nodes.get(inv) if inv is not None else None
        if span is None:
            return
        flow_error = extra.get("flow_error")
        message = None
        if isinstance(flow_error, Mapping):
            message = flow_error.get("message")
        _streamed(span, extra)
        span.attributes.setdefault(sc.ERROR_TYPE, error_type_of(extra.get("exception")))
        span.status = "error"
        span.status_description = safe_str(message) if message is not None else None
        self._end_node(spans, inv, ns, attempt)

    def _node_cancelled(self, spans: _TraceSpans, ns: int, node_name: str | None,
                        node_id: str | None, inv: str | None, parents: tuple[str, ...],
                        attempt: int, latency_ms: float | None,
                        extra: Mapping[str, Any]) -> None:
        remote = spans.remotes.get(inv or "")
        if remote is not None and sc.A2A_TASK_ID not in remote.attributes:
            # No task known: no remote cancel will follow to end the call's span.
            self._cut_remote(spans, inv, ns, sc.ERROR_CANCELLED, "cancelled (trace_cancel)")
        span = spans.nodes.get(inv) if inv is not None else None
        if span is None:
            return
        _streamed(span, extra)
        span.attributes[sc.ERROR_TYPE] = sc.ERROR_CANCELLED
        span.status = "error"
        span.status_description = "trace cancelled"
        # A call whose task is known stays open: the remote cancel's event ends it.
        self._end_node(spans, inv, ns, attempt, cut_remote=False)

    def _node_abandoned(self, spans: _TraceSpans, ns: int, node_name: str | None,
                        node_id: str | None, inv: str | None, parents: tuple[str, ...],
                        attempt: int, latency_ms: float | None,
                        extra: Mapping[str, Any]) -> None:
        # Recorded by the process that took the input again: the span exists only
        # where its start was recorded too (``pf export``), never in that process.
        span = spans.nodes.get(inv) if inv is not None else None
        if span is None:
            return
        span.attributes[sc.ERROR_TYPE] = sc.ERROR_ABANDONED
        worker = extra.get("worker_id")
        if isinstance(worker, str):
            span.attributes[sc.PF_WORKER_ID] = worker
        span.status = "error"
        span.status_description = "abandoned: its worker stopped mid-node"
        self._end_node(spans, inv, ns, attempt)

    # -- trace-level events ------------------------------------------------------------

    def _deadline_skip(self, spans: _TraceSpans, ns: int, node_name: str | None,
                       node_id: str | None, inv: str | None, parents: tuple[str, ...],
                       attempt: int, latency_ms: float | None,
                       extra: Mapping[str, Any]) -> None:
        attributes: dict[str, Any] = {sc.GEN_AI_AGENT_NAME: node_name or "?"}
        deadline = extra.get("deadline_s")
        if isinstance(deadline, int | float) and math.isfinite(deadline):
            attributes[sc.PF_DEADLINE_UNIX_MS] = int(deadline * 1000)
            attributes[sc.PF_DEADLINE_REMAINING_MS] = deadline * 1000 - ns / 1e6
        spans.root.events.append(SpanEventData(sc.EV_DEADLINE_SKIP, ns, attributes))
        spans.root.attributes[sc.ERROR_TYPE] = sc.ERROR_DEADLINE
        spans.root.status = "error"
        spans.root.status_description = "deadline exceeded"

    def _cancel_start(self, spans: _TraceSpans, ns: int, node_name: str | None,
                      node_id: str | None, inv: str | None, parents: tuple[str, ...],
                      attempt: int, latency_ms: float | None,
                      extra: Mapping[str, Any]) -> None:
        spans.root.events.append(SpanEventData(sc.EV_CANCEL_REQUESTED, ns))
        spans.root.attributes[sc.ERROR_TYPE] = sc.ERROR_CANCELLED
        spans.root.status = "error"
        spans.root.status_description = "trace cancelled"

    def _cancel_finish(self, spans: _TraceSpans, ns: int, node_name: str | None,
                       node_id: str | None, inv: str | None, parents: tuple[str, ...],
                       attempt: int, latency_ms: float | None,
                       extra: Mapping[str, Any]) -> None:
        spans.root.events.append(SpanEventData(sc.EV_CANCEL_ACKNOWLEDGED, ns))

    def _cancel_drop(self, spans: _TraceSpans, ns: int, node_name: str | None,
                     node_id: str | None, inv: str | None, parents: tuple[str, ...],
                     attempt: int, latency_ms: float | None,
                     extra: Mapping[str, Any]) -> None:
        spans.root.events.append(SpanEventData(sc.EV_CANCEL_DROPPED, ns, {
            sc.GEN_AI_AGENT_NAME: node_name or "?"}))

    # -- remote calls ---------------------------------------------------------------------

    def _remote_start(self, spans: _TraceSpans, ns: int, node_name: str | None,
                      node_id: str | None, inv: str | None, parents: tuple[str, ...],
                      attempt: int, latency_ms: float | None,
                      extra: Mapping[str, Any]) -> None:
        key = inv or ""
        if spans.remotes.get(key) is not None:  # an earlier call nothing ended
            self._cut_remote(spans, inv, ns, sc.ERROR_CANCELLED, "cut short by the next call")
        index = spans.remote_count.get(key, 0)
        given = _call_index(extra)
        if given is not None:
            index = given  # RemoteNode's own count: the same ids in every process
        spans.remote_count[key] = index + 1
        spans.remote_index[key] = index
        skill = extra.get("remote_skill")
        url = extra.get("remote_agent_url")
        streaming = bool(extra.get("remote_streaming"))
        attributes: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: sc.OP_INVOKE_AGENT,
            sc.GEN_AI_PROVIDER_NAME: "a2a",
            sc.A2A_METHOD_NAME: "message/stream" if streaming else "message/send",
        }
        if skill is not None:
            attributes[sc.GEN_AI_AGENT_NAME] = str(skill)
        if isinstance(url, str) and url:
            attributes[sc.PF_REMOTE_AGENT_URL] = url
            attributes.update(_server_of(url))
        sent = extra.get("remote_request_bytes")
        if isinstance(sent, int):
            attributes[sc.PF_REMOTE_BYTES_SENT] = sent
        node = spans.nodes.get(key)
        parent = node.span_id if node is not None else spans.root.span_id
        spans.remotes[key] = SpanData(
            name=sc.agent_span_name(str(skill) if skill is not None else node_name),
            trace_id=spans.otel_id,
            span_id=derived_span_id(spans.trace_id, key, "remote", str(index)),
            parent_span_id=parent, kind="client", start_ns=ns, attributes=attributes)

    @staticmethod
    def _open_remote(spans: _TraceSpans, inv: str | None,
                     extra: Mapping[str, Any]) -> SpanData | None:
        """The open CLIENT span this remote event belongs to: None when the event
        names another call (an earlier one, ended already) by its index."""
        key = inv or ""
        span = spans.remotes.get(key)
        given = _call_index(extra)
        if span is not None and given is not None and given != spans.remote_index.get(key):
            return None
        return span

    @staticmethod
    def _remote_ids(span: SpanData, extra: Mapping[str, Any]) -> None:
        # What the peer said (its ids, its method): bounded and made UTF-8 like any
        # text from outside. A 5 MB task id made one span bigger than a collector
        # takes (the whole batch of 512 refused) and a lone surrogate failed the
        # attribute's encoding at every export.
        context_id = extra.get("remote_context_id")
        task_id = extra.get("remote_task_id")
        if context_id is not None:
            span.attributes[sc.GEN_AI_CONVERSATION_ID] = peer_text(context_id)
        if task_id is not None:
            span.attributes[sc.A2A_TASK_ID] = peer_text(task_id)
        # The method the transport actually sent (SendMessage, message/stream, or a
        # fallback from streaming to SendMessage), when it reports one.
        method = extra.get("remote_method")
        if isinstance(method, str) and method:
            span.attributes[sc.A2A_METHOD_NAME] = peer_text(method)

    def _remote_stream(self, spans: _TraceSpans, ns: int, node_name: str | None,
                       node_id: str | None, inv: str | None, parents: tuple[str, ...],
                       attempt: int, latency_ms: float | None,
                       extra: Mapping[str, Any]) -> None:
        span = self._open_remote(spans, inv, extra)
        if span is None:
            return
        self._remote_ids(span, extra)
        if extra.get("remote_text_bytes"):  # status-only events carry no text
            chunks = _count(span.attributes.get(sc.PF_STREAM_CHUNKS)) + 1
            span.attributes[sc.PF_STREAM_CHUNKS] = chunks
            if chunks == 1:
                span.attributes[sc.GEN_AI_TIME_TO_FIRST_CHUNK] = (ns - span.start_ns) / 1e9
                self._call_streamed(spans, inv)
        state = extra.get("remote_task_state")
        if state is not None:
            state = peer_text(state)
            if span.attributes.get(sc.PF_REMOTE_TASK_STATE) != state:
                span.attributes[sc.PF_REMOTE_TASK_STATE] = state
                span.events.append(SpanEventData(sc.PF_REMOTE_TASK_STATE, ns, {
                    sc.PF_REMOTE_TASK_STATE: state}))

    @staticmethod
    def _call_streamed(spans: _TraceSpans, inv: str | None) -> None:
        # Said on the node span as it happens, whichever of the two spans ends
        # first (a cancel with the task known ends the node span first).
        node = spans.nodes.get(inv or "")
        if node is not None:
            node.remote_first_chunk = True

    def _end_remote(self, spans: _TraceSpans, inv: str | None, ns: int,
                    extra: Mapping[str, Any]) -> SpanData | None:
        if self._open_remote(spans, inv, extra) is None:
            return None
        span = spans.remotes.pop(inv or "")
        spans.remote_index.pop(inv or "", None)
        self._remote_ids(span, extra)
        received = extra.get("remote_response_bytes")
        if isinstance(received, int):
            span.attributes[sc.PF_REMOTE_BYTES_RECEIVED] = received
        state = extra.get("remote_task_state")
        if state is not None:
            span.attributes[sc.PF_REMOTE_TASK_STATE] = peer_text(state)
        span.end_ns = ns
        return span

    def _remote_success(self, spans: _TraceSpans, ns: int, node_name: str | None,
                        node_id: str | None, inv: str | None, parents: tuple[str, ...],
                        attempt: int, latency_ms: float | None,
                        extra: Mapping[str, Any]) -> None:
        span = self._end_remote(spans, inv, ns, extra)
        if span is not None:
            self._on_end(span)

    def _remote_error(self, spans: _TraceSpans, ns: int, node_name: str | None,
                      node_id: str | None, inv: str | None, parents: tuple[str, ...],
                      attempt: int, latency_ms: float | None,
                      extra: Mapping[str, Any]) -> None:
        span = self._end_remote(spans, inv, ns, extra)
        if span is None:
            return
        error = extra.get("remote_error")
        span.attributes[sc.ERROR_TYPE] = error_type_of(error)
        span.status = "error"
        span.status_description = safe_str(error) if error is not None else None
        span.events.append(SpanEventData("exception", ns, {
            "exception.type": error_type_of(error), "exception.message": safe_str(error)}))
        self._on_end(span)

    def _remote_cancelled(self, spans: _TraceSpans, ns: int, node_name: str | None,
                          node_id: str | None, inv: str | None, parents: tuple[str, ...],
                          attempt: int, latency_ms: float | None,
                          extra: Mapping[str, Any]) -> None:
        # The task id is the peer's and the reason may quote it: bounded, UTF-8.
        reason = peer_text(extra.get("remote_cancel_reason") or "trace_cancel")
        attributes: dict[str, Any] = {sc.PF_CANCEL_REASON: reason}
        task_id = extra.get("remote_task_id")
        if task_id is not None:
            attributes[sc.A2A_TASK_ID] = peer_text(task_id)
        if latency_ms is not None:
            attributes[sc.PF_CANCEL_ROUND_TRIP_MS] = float(latency_ms)
        if reason != "local_cancel":  # a call cut short locally: the trace lives on
            spans.root.events.append(SpanEventData(sc.EV_CANCEL_PROPAGATED, ns, attributes))
        span = self._end_remote(spans, inv, ns, extra)
        if span is None:
            return
        span.events.append(SpanEventData(sc.EV_CANCEL_PROPAGATED, ns, dict(attributes)))
        _streamed(span, extra)
        if sc.GEN_AI_TIME_TO_FIRST_CHUNK in span.attributes:
            self._call_streamed(spans, inv)
        span.attributes[sc.ERROR_TYPE] = sc.ERROR_CANCELLED
        span.status = "error"
        span.status_description = f"cancelled ({reason})"
        self._on_end(span)

    def _remote_cancel_error(self, spans: _TraceSpans, ns: int, node_name: str | None,
                             node_id: str | None, inv: str | None, parents: tuple[str, ...],
                             attempt: int, latency_ms: float | None,
                             extra: Mapping[str, Any]) -> None:
        reason = peer_text(extra.get("remote_cancel_reason"))
        attributes: dict[str, Any] = {
            sc.PF_CANCEL_REASON: reason,
            "exception.message": safe_str(extra.get("remote_error"))}
        spans.root.events.append(SpanEventData(sc.EV_CANCEL_PROPAGATION_FAILED, ns, attributes))
        span = self._end_remote(spans, inv, ns, extra)
        if span is None:
            return
        # The call was cancelled here; telling the agent failed: said on the span.
        span.events.append(SpanEventData(sc.EV_CANCEL_PROPAGATION_FAILED, ns, dict(attributes)))
        span.attributes[sc.ERROR_TYPE] = sc.ERROR_CANCELLED
        span.status = "error"
        span.status_description = f"cancelled ({reason}); the remote cancel failed"
        self._on_end(span)

    def _trace_parent(self, spans: _TraceSpans, ns: int, node_name: str | None,
                      node_id: str | None, inv: str | None, parents: tuple[str, ...],
                      attempt: int, latency_ms: float | None,
                      extra: Mapping[str, Any]) -> None:
        # The trace continues a caller's trace (PenguiFlow.adopt_trace_parent): the
        # root hangs under the caller's span; the other keys are root attributes.
        # Only a valid W3C span id: the caller's span is in another process's
        # trace, so a digest of anything else would name no span at all.
        parent = _hex_span_id(str(extra.get("parent_span_id")))
        if not parent:
            return
        spans.root.parent_span_id = parent
        for key, value in extra.items():
            if key not in _PARENT_KEYS and isinstance(value, str | bool | int | float):
                spans.root.attributes[key] = value
        if self._on_parent is not None:
            self._on_parent(spans.root, parent, extra.get("parent_sampled") is not False)


# Keys of a trace_parent event that describe the parent, not the root span (the
# operation name says which span is the root: the caller's keys do not rename it).
_PENDING_FLOW = "\x00flow_id"  # a pending trace_parent's flow (no str event key)
_PARENT_KEYS = frozenset({"parent_span_id", "parent_sampled", _PENDING_FLOW,
                          sc.GEN_AI_OPERATION_NAME})
#: Adopted parents kept for traces not started yet (see SpanModel._pending_parents).
_PENDING_MAX = 4096
#: Invocations per generation of SpanModel._invs (a new trace's node finds its
#: upstream in an ended trace among the last 8k-16k invocations whose trace ended).
_INVS_MAX = 8192

_Handler = Callable[..., None]
_HANDLERS: dict[str, _Handler] = {
    "node_start": SpanModel._node_start,
    "node_success": SpanModel._node_success,
    "node_error": SpanModel._node_attempt_failed,
    "node_timeout": SpanModel._node_timeout,
    "node_retry": SpanModel._node_retry,
    "node_failed": SpanModel._node_failed,
    "node_trace_cancelled": SpanModel._node_cancelled,
    "node_abandoned": SpanModel._node_abandoned,
    "deadline_skip": SpanModel._deadline_skip,
    "trace_cancel_start": SpanModel._cancel_start,
    "trace_cancel_finish": SpanModel._cancel_finish,
    "trace_cancel_drop": SpanModel._cancel_drop,
    "remote_call_start": SpanModel._remote_start,
    "remote_stream_event": SpanModel._remote_stream,
    "remote_call_success": SpanModel._remote_success,
    "remote_call_error": SpanModel._remote_error,
    "remote_call_cancelled": SpanModel._remote_cancelled,
    "remote_cancel_error": SpanModel._remote_cancel_error,
    "trace_parent": SpanModel._trace_parent,
}


def spans_from_events(events: Iterable[StoredEvent]) -> list[SpanData]:
    """Rebuild the spans of stored events (one or more traces), as the live tracer made them.

    Events are applied in the order given (``load_history`` order: occurrence).
    Every trace's root span ends at its last event. Spans come out in the order
    they ended, roots last per trace.
    """
    out: list[SpanData] = []
    model = SpanModel(out.append)
    for ev in events:
        payload = ev.payload
        latency = payload.get("latency_ms")
        model.feed(ev.trace_id, ev.ts, ev.kind, ev.node_name, ev.node_id, ev.invocation_id,
                   tuple(ev.parent_invocation_ids), ev.attempt,
                   latency if isinstance(latency, int | float) else None, ev.flow_name,
                   ev.flow_id, ev.queued_ts, payload)
    model.end_all()
    return out
