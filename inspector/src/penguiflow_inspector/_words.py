"""The inspector's shared vocabulary: what every output (``pf traces``, ``--plain``,
the TUI, ``--json``) calls a status, and how it writes times, durations and names.

Re-exported by :mod:`penguiflow_inspector.model` (its public names).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    pass


# -- shared vocabulary: what every output (pf traces, --plain, the TUI, --json) says --------

STATUS_WORD: Final[Mapping[str, str]] = {
    "ok": "succeeded", "error": "failed", "timeout": "failed", "cancelled": "cancelled",
    "running": "running", "skipped": "skipped", "incomplete": "incomplete",
    "succeeded": "succeeded", "failed": "failed", "success": "succeeded",
}
"""A model status (:data:`Status`, a remote call's outcome) -> the store's word for it.

The words are the store's (``TraceSummary.status``: succeeded, failed, cancelled,
running, incomplete) plus ``skipped`` (a message dropped because its deadline had
passed). A timeout is a failure: it says ``failed`` (its symbol is
``MARK_SYMBOL["timeout"]``). The store's own words map to themselves."""

STATUS_SYMBOL: Final[Mapping[str, str]] = {
    "succeeded": "✓", "failed": "!", "cancelled": "✕", "running": "▸", "skipped": "↷",
    "incomplete": "?",
}
"""A status word (:data:`STATUS_WORD`'s values) -> its one-cell symbol."""

MARK_SYMBOL: Final[Mapping[str, str]] = {
    "retry": "↻", "timeout": "◔", "chunks": "≋", "critical": "◆", "remote": "↳",
}
"""Markers after a row's name: ``↻n`` retries, ``◔`` an attempt timed out, ``≋n``
stream chunks; ``◆`` the critical path; ``↳`` a remote call under its invocation."""


def status_word(status: str) -> str:
    """The word every output shows for a model status or remote outcome (see
    :data:`STATUS_WORD`); an unknown status is returned as it is."""
    return STATUS_WORD.get(status, status)


def axis_fraction(t: float, t0: float, t1: float) -> float:
    """Where ``t`` falls on the time axis ``t0``..``t1``, as a fraction in [0, 1]; 0
    when that is no number: stored times so far apart that their difference
    overflows (``1e308`` and ``-1e308``: an infinite span) or not finite at all."""
    try:
        frac = (t - t0) / (t1 - t0)
    except (ZeroDivisionError, OverflowError):
        return 0.0
    return min(max(frac, 0.0), 1.0) if math.isfinite(frac) else 0.0


def finite(value: Any) -> float | None:
    """``value`` if it is a finite number, else None: a stored ``queued_ts`` of NaN
    or infinity (nothing checks it on the way in) is shown as unknown, never drawn."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def format_clock(ts: float, pattern: str | None = None, *, utc: bool = False) -> str:
    """``ts`` (epoch seconds) as a local (or UTC) time, by ``pattern`` (strftime) or
    to the millisecond. A stored time that is no time (NaN, infinite, or out of
    the calendar's range: a writer that recorded milliseconds) is shown as its
    number (``ts=1.7e+12``), never an error: one odd event must not stop a view."""
    try:
        moment = dt.datetime.fromtimestamp(ts, dt.UTC if utc else None)
    except (OverflowError, OSError, ValueError, TypeError):
        return f"ts={ts:.3g}" if isinstance(ts, float | int) else "ts=?"
    return (moment.strftime(pattern) if pattern
            else moment.isoformat(sep=" ", timespec="milliseconds"))


def format_duration(ms: float | None) -> str:
    """A duration in milliseconds for people, in at most 9 cells: ``0.8 ms``,
    ``812.4 ms``, ``1.23 s``, ``143 s``; ``-`` for None. Every output formats
    durations with it, so two screens showing one duration print the same text."""
    if ms is None or math.isnan(ms):
        return "-"
    sign, ms = ("-", -ms) if ms < 0 else ("", ms)
    if ms < 999.95:
        return f"{sign}{ms:.1f} ms"
    if ms < 99_995:
        return f"{sign}{ms / 1000:.2f} s"
    return f"{sign}{ms / 1000:.0f} s"


def format_offset(ts: float | None, origin: float) -> str:
    """``ts`` relative to ``origin`` (both epoch seconds): ``+1.23 s`` after it,
    ``-0.8 ms`` before it (never ``+-``); ``-`` for None."""
    if ts is None:
        return "-"
    ms = (ts - origin) * 1000.0
    return ("-" if ms < 0 else "+") + format_duration(abs(ms))


#: Characters a terminal could act on: C0 controls, DEL, C1 controls (U+0080-U+009F,
#: e.g. U+009B, a one-character CSI), and lone surrogates (not encodable: a crash).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_UNPRINTABLE_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_SHORT_ESCAPES: Final = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def printable(text: object, *, multiline: bool = False) -> str:
    """``text`` (from a store: names, ids, errors, payloads) safe to print to a terminal.

    Every control character is shown escaped, never written raw: C0 (``\\x1b``,
    ``\\x07``, ``\\x00``, ``\\n``, ``\\t``, ``\\r``), DEL (``\\x7f``), C1
    (``\\u009b``) and lone surrogates (``\\ud800``). With ``multiline`` newlines are
    kept (a traceback); everything else is. Other Unicode passes unchanged. A node
    named ``"x\\x1b]0;pwned\\x07"`` would otherwise retitle the user's terminal.
    Non-str values are ``str()``-ed first; the text is returned as is when clean
    (one regex search).
    """
    text = text if isinstance(text, str) else str(text)
    pattern = _UNPRINTABLE_BUT_NEWLINE if multiline else _UNPRINTABLE
    return pattern.sub(_escape, text) if pattern.search(text) else text


#: The runtime's internal endpoints (``penguiflow.core``): messages enter a flow from
#: OpenSea and leave it to Rookery. Users see the words below instead.
_ENDPOINT_WORDS: Final = {"OpenSea": "emit", "Rookery": "result"}


def display_name(name: str) -> str:
    """A node name as users see it: the runtime's endpoints ``OpenSea`` and ``Rookery``
    (named on events such as ``trace_cancel_finish``) read ``emit`` and ``result``."""
    return _ENDPOINT_WORDS.get(name, name)


def display_edge(edge: str) -> str:
    """An edge label as users see it: ``OpenSea->a`` reads ``emit->a``, ``a->Rookery``
    reads ``a->result`` (the runtime's internal endpoint names never reach the user;
    ``--json`` keeps the raw label)."""
    parts = edge.split("->")
    return "->".join(_ENDPOINT_WORDS.get(p.strip(), p) for p in parts)
