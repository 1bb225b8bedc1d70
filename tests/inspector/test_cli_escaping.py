"""Stored text never reaches the terminal raw: every human-readable output escapes it.

A node named ``"x\\x1b]0;pwned\\x07"`` used to retitle the user's terminal when
``pf inspect --plain`` printed it. The traces here carry hostile text in every
field the outputs print (trace id, flow and node names, errors, tracebacks,
remote agent, skill, context and task ids, cancel reasons, bus edges, worker
ids, lost-event reasons), and the output must hold no control character but the
newline: no byte below 0x20 except ``\\n``, no DEL, no C1 (U+0080-U+009F), no
lone surrogate. ``--json`` stays faithful: ``json.loads`` gives the text back.

The stores refuse control characters in trace ids and node/flow names and ids
(``check_row``), so the real ``pf`` on a real SQLite store is fed hostile text
in every payload field and in the invocation ids; the names are covered
in-process, through the same renderings, on events a store might hand over.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from penguiflow.state import EVENTS_LOST_KIND, StoredEvent
from penguiflow_exporters import open_store
from penguiflow_inspector import render
from penguiflow_inspector.model import build_trace, printable

T0 = 1_700_000_000.0
HOSTILE = "x\x1b]0;pwned\x07\x00\t\r\n\x7f\x9b[2J\x85é✓"


def hostile_events(text: str, trace_id: str, *, names: bool = True) -> list[StoredEvent]:
    """One trace with ``text`` in every field an output prints (with ``names=False``,
    not in the node and flow names and ids, which a store refuses)."""
    seq = 0
    named = text if names else "-ok"
    # Ids are hashed into span ids as UTF-8 (penguiflow.tracing): no lone surrogates there.
    ids = "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF)

    def ev(ms: float, kind: str, node: str | None, inv: str | None = None,
           **payload: object) -> StoredEvent:
        nonlocal seq
        seq += 1
        return StoredEvent(trace_id, T0 + ms / 1000, kind, node, node, dict(payload),
                           invocation_id=inv, seq=seq, span_id=inv, flow_name="flow" + named,
                           flow_id="worker" + named, attempt=0,
                           queued_ts=T0 + ms / 1000 - 0.001 if kind == "message_fetch" else None)

    node, inv = "node" + named, "inv" + ids
    return [
        ev(0, "message_fetch", node, edge="OpenSea->" + text, deliveries=2,
           previous_worker="gone" + text),
        ev(1, "node_start", node, inv),
        ev(2, "remote_call_start", node, inv, remote_skill="skill" + text,
           remote_agent_url="agent" + text),
        ev(3, "remote_stream_event", node, inv, remote_task_state="working" + text,
           remote_context_id="ctx" + text, remote_task_id="task" + text,
           remote_text_bytes=3),
        ev(4, "remote_call_error", node, inv, remote_error="remote" + text),
        ev(5, "node_error", node, inv, exception="boom" + text,
           traceback="Traceback:\n  line " + text + "\nValueError: " + text),
        ev(6, "node_failed", node, inv, exception="boom" + text,
           flow_error={"message": "failed" + text}),
        ev(7, "trace_cancel_start", None),
        ev(8, "remote_call_cancelled", None, remote_task_id="task" + text,
           remote_cancel_reason="reason" + text, latency_ms=1.0),
        ev(9, "deadline_skip", "late" + named, deadline_s=T0),
        ev(10, EVENTS_LOST_KIND, None, events_lost=2, reason="lost" + text),
    ]


def assert_inert(out: str) -> None:
    """No control character a terminal would act on: only printable text and newlines."""
    bad = sorted({f"U+{ord(c):04X}" for c in out
                  if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F
                  or 0xD800 <= ord(c) <= 0xDFFF})
    assert not bad, f"raw control characters in the output: {bad}"


def store_with(text: str, directory: Path) -> str:
    url = f"sqlite:///{directory}/hostile.db"

    async def fill() -> None:
        async with open_store(url) as store:
            await store.save_events(hostile_events(text, "feed0001", names=False))
            await store.flush()
            assert not store.failures, store.failures  # every event stored

    asyncio.run(fill())
    return url


PF = [sys.executable, "-m", "penguiflow_inspector.cli"]


def pf(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*PF, *args], capture_output=True, timeout=60, check=False)


def every_output(url: str) -> list[tuple[str, bytes]]:
    """stdout and stderr of each human-readable command, and of two error paths.

    The four pf processes run at once: each spends ~1 s starting Python, which
    overlaps on a second core (the hypothesis test below starts 16)."""
    commands = [("inspect", "feed", "--store", url, "--plain"),
                ("traces", "--store", url, "--plain"),
                ("tail", "feed", "--store", url, "--plain"),
                ("export", "feed", "--store", url, "--json", "/nonexistent/dir/out.json")]
    procs = [(args, subprocess.Popen([*PF, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE))
             for args in commands]
    outputs = []
    for args, proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
        name = " ".join(args[:2])
        outputs += [(name, stdout), (name + " (stderr)", stderr)]
    return outputs


def check_bytes(name: str, data: bytes) -> None:
    assert not [b for b in data if (b < 0x20 and b != 0x0A) or b == 0x7F], name
    assert_inert(data.decode("utf-8"))


ESCAPED = "x\\x1b]0;pwned\\x07\\x00\\t\\r\\n\\x7f\\u009b[2J\\u0085é✓"


def test_the_terminal_title_attack_is_printed_escaped(tmp_path: Path) -> None:
    url = store_with(HOSTILE, tmp_path)
    outputs = every_output(url)
    for name, data in outputs:
        check_bytes(name, data)
    plain = dict(outputs)["inspect feed"].decode()
    assert f"failed: failed{ESCAPED}" in plain and f"(inv{ESCAPED})" in plain
    assert f"emit->{ESCAPED}" in plain and "OpenSea" not in plain  # the edge, as users see it
    # The traceback under its invocation: its newlines break lines, the rest is escaped.
    assert "      ValueError: x\\x1b]0;pwned\\x07\\x00\\t\\r\n      \\x7f" in plain
    assert f"skill skill{ESCAPED}" in plain and f"task task{ESCAPED}" in plain
    tail = dict(outputs)["tail feed"].decode()
    assert f"exception=boom{ESCAPED}" in tail and f"edge=emit->{ESCAPED}" in tail
    # --json is faithful: the stored text comes back as it was.
    data = json.loads(pf("inspect", "feed", "--store", url, "--json").stdout)
    assert {i["invocation_id"] for i in data["invocations"]} == {"inv" + HOSTILE}
    assert data["hops"][0]["edge"] == "OpenSea->" + HOSTILE
    assert data["hops"][0]["edge_display"] == "emit->" + HOSTILE


def test_hostile_names_are_escaped_in_every_rendering() -> None:
    events = hostile_events(HOSTILE, "feed" + HOSTILE)
    text = render.trace_text(build_trace(events))
    assert_inert(text)
    assert f"trace feed{ESCAPED}  flow flow{ESCAPED}" in text
    assert f"late{ESCAPED}"[:16] in text  # the skipped node's row (names are cut at 18)


def test_an_error_line_quoting_what_the_user_typed_is_escaped(tmp_path: Path) -> None:
    url = store_with("plain", tmp_path)
    run = pf("inspect", "\x1b]0;pwned\x07\x9b", "--store", url, "--plain")
    assert run.returncode == 2 and b"no trace id starts with" in run.stderr
    check_bytes("unknown id", run.stderr)


def test_a_lone_surrogate_is_escaped_not_a_crash() -> None:
    # SQLite cannot store one (not UTF-8); another store or a fixture can hand one over.
    events = hostile_events("\ud800", "feed")
    text = render.trace_text(build_trace(events))
    assert "\\ud800" in text
    assert_inert(text)
    text.encode("utf-8")  # printable to any UTF-8 terminal


# Any text in every field, through every plain output in-process (fast: many examples) ...
ANY_TEXT = st.text(max_size=12)


@given(ANY_TEXT)
@settings(max_examples=150, deadline=None)
def test_any_text_is_inert_in_every_rendering(text: str) -> None:
    events = hostile_events(text, "feed" + "".join(c for c in text
                                                   if not 0xD800 <= ord(c) <= 0xDFFF))
    view = build_trace(events)
    assert_inert(render.trace_text(view))
    assert_inert("".join(render.event_line(e) + "\n" for e in events))
    assert_inert(printable(text) + printable(text, multiline=True))


# ... and through the real pf on a real SQLite store (slow: a few examples).
STORABLE = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)


@given(STORABLE)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_stored_text_is_inert_in_the_real_pf(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        url = store_with(text, Path(directory))
        for name, data in every_output(url):
            check_bytes(name, data)


@pytest.mark.parametrize(("raw", "shown"), [
    ("\x1b", "\\x1b"), ("\x07", "\\x07"), ("\x00", "\\x00"), ("\x7f", "\\x7f"),
    ("\x9b", "\\u009b"), ("\ud800", "\\ud800"), ("\n", "\\n"), ("\t", "\\t"),
    ("é✓ ok", "é✓ ok"),
])
def test_printable_escapes_visibly(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert printable("a\nb", multiline=True) == "a\nb"


def test_a_stored_status_is_escaped_in_pf_tails_last_line(tmp_path: Path) -> None:
    # The summary's status is shown as stored when it is no status of ours (a
    # foreign or hand-edited row): pf tail's "ended:" line wrote it raw, so an
    # escape sequence there cleared the screen and set the terminal's title.
    url = store_with("x", tmp_path)
    with sqlite3.connect(tmp_path / "hostile.db") as conn:
        conn.execute("UPDATE traces SET status = ?", (HOSTILE.replace("\x00", ""),))
    run = pf("tail", "feed", "--store", url, "--plain")
    assert run.returncode == 0, run.stderr
    check_bytes("tail (stderr)", run.stderr)
    assert "ended: x\\x1b]0;pwned\\x07" in run.stderr.decode()
