"""Attribute keys, span names and metric names of PenguiFlow's telemetry.

One module so that the runtime, ``pf export`` and the docs
(``docs/reference/telemetry.md``) agree on every key.

``gen_ai.*`` keys follow the OpenTelemetry GenAI semantic conventions and
``a2a.*`` keys the A2A conventions, both at *Development* stability, revision
of semantic-conventions v1.37 (2025-09). They are our own string constants
rather than imports from ``opentelemetry-semantic-conventions`` so that the
core depends on ``opentelemetry-api`` alone and a renamed key upstream is a
deliberate change here. ``pf.*`` keys are PenguiFlow's own.
"""

from __future__ import annotations

from typing import Final

# -- GenAI conventions (Development) ------------------------------------------------
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_WORKFLOW_NAME: Final = "gen_ai.workflow.name"
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_CONVERSATION_ID: Final = "gen_ai.conversation.id"
GEN_AI_TIME_TO_FIRST_CHUNK: Final = "gen_ai.response.time_to_first_chunk"
OP_INVOKE_WORKFLOW: Final = "invoke_workflow"
OP_INVOKE_AGENT: Final = "invoke_agent"

# -- A2A conventions (Development) ---------------------------------------------------
A2A_TASK_ID: Final = "a2a.task.id"
A2A_METHOD_NAME: Final = "a2a.method.name"

# -- General conventions (Stable) ----------------------------------------------------
ERROR_TYPE: Final = "error.type"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"

# -- PenguiFlow ----------------------------------------------------------------------
PF_TRACE_ID: Final = "pf.trace_id"
PF_FLOW_ID: Final = "pf.flow.id"
PF_NODE_ID: Final = "pf.node.id"
PF_INVOCATION_ID: Final = "pf.invocation.id"
#: The worker (process) an invocation ran in, over a delivering bus: its flow id.
PF_WORKER_ID: Final = "pf.worker.id"
PF_ATTEMPT: Final = "pf.attempt"
PF_ATTEMPTS: Final = "pf.attempts"
PF_BACKOFF_MS: Final = "pf.backoff_ms"
PF_EDGE: Final = "pf.edge"
PF_STREAM_CHUNKS: Final = "pf.stream.chunks"
PF_DEADLINE_UNIX_MS: Final = "pf.deadline.unix_ms"
PF_DEADLINE_REMAINING_MS: Final = "pf.deadline.remaining_ms"
PF_REMOTE_AGENT_URL: Final = "pf.remote.agent_url"
PF_REMOTE_BYTES_SENT: Final = "pf.remote.bytes_sent"
PF_REMOTE_BYTES_RECEIVED: Final = "pf.remote.bytes_received"
PF_REMOTE_TASK_STATE: Final = "pf.remote.task_state"
PF_CANCEL_REASON: Final = "pf.cancel.reason"
#: On a cancel's propagation events: ms from the cancel to the remote's answer.
PF_CANCEL_ROUND_TRIP_MS: Final = "pf.cancel.round_trip_ms"
#: Metric attributes: a remote call's outcome, and the kind of an observer's failure.
PF_REMOTE_OUTCOME: Final = "pf.remote.outcome"
PF_OBSERVER_FAILURE: Final = "pf.observer.failure"

# -- error.type values ----------------------------------------------------------------
ERROR_TIMEOUT: Final = "timeout"
ERROR_CANCELLED: Final = "cancelled"
ERROR_DEADLINE: Final = "deadline_exceeded"
ERROR_BUDGET: Final = "budget_exhausted"
ERROR_ABANDONED: Final = "abandoned"
#: A node or remote-call span still open when its trace was ended: the flow stopped
#: mid-invocation (live), or the stored events end there (``pf export``).
ERROR_UNFINISHED: Final = "unfinished"

# -- span event names ------------------------------------------------------------------
EV_RETRY: Final = "pf.node.retry"
EV_TIMEOUT: Final = "pf.node.timeout"
EV_CHUNK: Final = "pf.stream.chunk"
EV_CANCEL_REQUESTED: Final = "pf.cancel.requested"
EV_CANCEL_PROPAGATED: Final = "pf.cancel.propagated"
EV_CANCEL_ACKNOWLEDGED: Final = "pf.cancel.acknowledged"
EV_CANCEL_DROPPED: Final = "pf.cancel.dropped"
EV_CANCEL_PROPAGATION_FAILED: Final = "pf.cancel.propagation_failed"
EV_DEADLINE_SKIP: Final = "pf.deadline.skip"

# -- metric instrument names ------------------------------------------------------------
M_NODE_DURATION: Final = "pf.node.duration"
M_NODE_ERRORS: Final = "pf.node.errors"
M_NODE_RETRIES: Final = "pf.node.retries"
M_REMOTE_DURATION: Final = "pf.remote.duration"
M_REMOTE_BYTES_SENT: Final = "pf.remote.bytes_sent"
M_REMOTE_BYTES_RECEIVED: Final = "pf.remote.bytes_received"
M_CANCEL_LATENCY: Final = "pf.cancel.latency"
M_TIME_TO_FIRST_CHUNK: Final = "pf.stream.time_to_first_chunk"
M_QUEUE_DEPTH: Final = "pf.queue.depth"
M_TRACES_IN_FLIGHT: Final = "pf.traces.in_flight"
M_OBSERVER_FAILURES: Final = "pf.observer.failures"


def workflow_span_name(flow_name: str | None) -> str:
    """``invoke_workflow {flow name}`` (the root span of a trace)."""
    return f"{OP_INVOKE_WORKFLOW} {utf8_text(flow_name)}" if flow_name else OP_INVOKE_WORKFLOW


def agent_span_name(name: str | None) -> str:
    """``invoke_agent {node or remote skill name}`` (node and remote-call spans)."""
    return f"{OP_INVOKE_AGENT} {utf8_text(name)}" if name else OP_INVOKE_AGENT


def utf8_text(text: str) -> str:
    """``text`` with each lone surrogate (legal in a str, not in UTF-8) as U+FFFD;
    ``text`` itself when it encodes as UTF-8. Never raises.

    For text that leaves the process: an exporter must encode a span's name (the
    OTLP encoder refuses one it cannot, and with it the whole batch, up to 512 spans
    of other traces), and a chunk written raw on an SSE stream must not cut the
    client's stream short. A paired surrogate is kept as its character.
    """
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        # Through UTF-16, which keeps a paired surrogate and replaces a lone one.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
