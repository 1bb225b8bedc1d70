"""Identifiers shared by events, stores and spans.

One rule set so that the runtime, the stores, the OTel layer and the inspector
agree on every id without talking to each other:

* an *invocation id* is 16 lowercase hex digits (64 random bits, never zero); it
  is the span id of that invocation's node span;
* the *root span id* of a trace is derived from the trace id alone, so a span
  exporter rebuilding a trace from stored events finds the same id;
* the *OTel trace id* is the penguiflow trace id when that is 32 hex digits and
  not all zero, otherwise a deterministic digest of it.
"""

from __future__ import annotations

import hashlib
from random import getrandbits

__all__ = ["new_invocation_id", "otel_trace_id", "root_span_id"]

_HEX = frozenset("0123456789abcdef")


def new_invocation_id() -> str:
    """Return a fresh 16-hex-digit id (a valid, non-zero OTel span id)."""
    # getrandbits is ~10x cheaper than os.urandom + hex and unique enough for span
    # ids, which only need to be unique within a trace.
    return f"{getrandbits(64) or 1:016x}"


def root_span_id(trace_id: str) -> str:
    """Return the span id of the root span of ``trace_id`` (deterministic)."""
    digest = hashlib.blake2b(trace_id.encode(), digest_size=8, person=b"pf-root").hexdigest()
    return digest if digest != "0" * 16 else "0" * 15 + "1"


def otel_trace_id(trace_id: str) -> str:
    """Return the 32-hex OTel trace id for a penguiflow trace id."""
    lowered = trace_id.lower()
    if len(lowered) == 32 and _HEX.issuperset(lowered) and lowered != "0" * 32:
        return lowered
    digest = hashlib.blake2b(trace_id.encode(), digest_size=16, person=b"pf-trace").hexdigest()
    return digest if digest != "0" * 32 else "0" * 31 + "1"
