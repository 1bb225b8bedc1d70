"""Rows and blocks: what the durable stores put in a file (``penguiflow_exporters``'
``_records``, ``_blocks``, ``_block_read`` and ``_folds``).

Blocks are JSON: any event round-trips (or, for a value JSON cannot hold, comes
back as its text), a crafted block is refused with a clear error instead of being
executed, and schema-4's pickled blocks are read once, by a restricted reader.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle
import re
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from penguiflow.state import EventRecord, StoredEvent
from penguiflow_exporters import _block_read, _blocks, _folds, _legacy_v4, _records
from penguiflow_exporters._block_read import decode_block
from penguiflow_exporters._blocks import encode_block
from penguiflow_exporters._folds import fold_rows, split_fresh
from penguiflow_exporters._legacy_v4 import decode_v4_block
from penguiflow_exporters._records import (
    COLUMNS,
    BlockError,
    Row,
    check_row,
    check_rows,
    row_of,
    rows_of,
    tuple_rows,
)


def record(trace: Any = "t-1", seq: int = 1, **changes: Any) -> EventRecord:
    base = EventRecord("t-1", 1000.0 + seq, "node_start", "a", "a-id", f"inv{seq}", ("p",),
                       f"s{seq}", None, seq, 0, 999.0, "demo", "flow-r", 0.25, 1, 2, 1, 64, 3,
                       False, None, None)
    return base._replace(trace_id=trace, **changes)


def test_rows_extend_the_runtime_record_by_name() -> None:
    assert COLUMNS[:len(EventRecord._fields)] == EventRecord._fields
    assert COLUMNS[-1] == "payload"


def test_a_block_round_trips_runtime_records_and_stored_events() -> None:
    stored = StoredEvent("t-1", 5.0, "custom", None, None, {"a": [1, 2], "b": None},
                         flow_id="f", seq=9, parent_invocation_ids=("x", "y"))
    rows = rows_of([record(), stored, record(seq=2, extra=MappingProxyType({"k": "v"}))])
    back = decode_block(encode_block(rows))
    assert back[0] == rows[0]
    assert back[1].payload == {"a": [1, 2], "b": None}
    assert back[1].parent_invocation_ids == ("x", "y")
    assert back[2].extra == {"k": "v"}
    assert all(type(row) is Row for row in back)


def test_plain_tuple_rows_are_written_exactly_as_rows() -> None:
    # The host-side writers take plain tuples (tuple_rows): the same values, and
    # every step of the write path gives the same answer for them as for Rows.
    stored = StoredEvent("t-2", 5.0, "node_failed", "b", "b-id", {"a": 1}, flow_id="f",
                         seq=9, attempt=0)
    lost = StoredEvent("t-2", 6.0, _folds.LOST_KIND, None, None,
                       {"events_lost": 3, "reason": "x"}, flow_id="f", seq=10)
    items = [record(), record(seq=2, kind="node_success"), stored, lost,
             (*record(seq=3), None)]
    rows, plain = rows_of(items), tuple_rows(items)
    assert plain == [tuple(row) for row in rows]
    assert all(type(row) is tuple for row in plain)
    assert decode_block(encode_block(plain[:2])) == rows[:2]
    assert _blocks.group_by_trace(plain) == {
        key: [tuple(r) for r in group] for key, group in _blocks.group_by_trace(rows).items()}
    terminal, errors = frozenset({"node_success", "node_failed"}), frozenset({"node_failed"})
    folds = [fold_rows(x, terminal=terminal, errors=errors) for x in (rows, plain)]
    assert [{k: (f.events, f.starts, f.open, f.failed, f.events_lost, f.nodes)
             for k, f in fold.items()} for fold in folds] == [
        {"t-1": (3, 2, 1, False, 0, {"a"}), "t-2": (2, 0, -1, True, 3, set())}] * 2
    assert split_fresh(plain, {"flow-r": [(1, 2)]}) == split_fresh(rows, {"flow-r": [(1, 2)]})
    # One bad row is refused alone, with its reason, whichever form it takes.
    bad = [*plain, tuple(row_of(record(trace="t\x00")))]
    assert check_rows(bad) == check_rows([*rows, row_of(record(trace="t\x00"))])
    assert check_rows(bad)[0][0] == len(plain)


_text = st.text(alphabet=st.characters(codec=None), max_size=40)  # NUL, surrogates, ESC...
_json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20)
# The same kinds of values, nested one level at most: for tests that draw dozens of
# them per example (a table of payloads), where drawing recursive values took ~90% of
# the test's time.
_json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text
_json_small = (_json_scalar | st.lists(_json_scalar, max_size=3)
               | st.dictionaries(_text, _json_scalar, max_size=3))


@given(payload=st.dictionaries(_text, _json_like, max_size=6), node=_text)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_any_plain_payload_round_trips_exactly(payload: dict[str, Any], node: str) -> None:
    event = StoredEvent("t-1", 1.0, "k", node, None, payload, flow_id="f", seq=1)
    (row,) = decode_block(encode_block([row_of(event)]))
    assert row.payload == payload
    assert row.node_name == node


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    __str__ = __repr__


def test_values_json_cannot_hold_come_back_as_text() -> None:
    deep: dict[str, Any] = {}
    cursor = deep
    for _ in range(10_000):
        cursor["d"] = {}
        cursor = cursor["d"]
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    rows = rows_of([record(extra={"odd": Unprintable(), "set": {3}}),
                    record(seq=2, extra={"deep": deep}),
                    record(seq=3, extra={"cycle": cyclic})])
    back = decode_block(encode_block(rows))
    assert back[0].extra["odd"].startswith("<")  # the object's placeholder text
    assert back[0].extra["set"] == [3]
    # only the value JSON cannot hold becomes text; its key and neighbours stay
    assert isinstance(back[1].extra["deep"], str)
    assert back[2].extra == {"cycle": "[[...]]"}
    assert len(encode_block(rows)) < 200_000  # the deep value's text is bounded


@pytest.mark.parametrize(("text", "problem"), [
    ("not json", "corrupt event block"),
    (json.dumps({"v": 3, "n": 0, "cols": {}}), "not a version-1 or -2 block"),
    (json.dumps({"v": 1, "n": -1, "cols": {}}), "bad event count"),
    (json.dumps({"v": 1, "n": 2, "cols": {"ts": [1.0]}}), "column 'ts' is not 2 values"),
    ("[" * 100_000, "corrupt event block"),
])
def test_a_crafted_block_is_refused_with_the_reason(text: str, problem: str) -> None:
    with pytest.raises(BlockError, match=problem):
        decode_block(text)


@pytest.mark.parametrize(("change", "reason"), [
    ({"trace_id": 5}, "trace_id is a int"),
    ({"trace_id": "a\x00b"}, "trace_id holds a control character"),
    ({"trace_id": "a\x1b]0;x\x07"}, "trace_id holds a control character"),
    ({"trace_id": "a\ud800"}, "trace_id holds a lone surrogate"),
    ({"trace_id": "x" * 5_000_000}, "trace_id is 5000000 characters long"),
    ({"trace_id": ""}, "trace_id is empty"),
    ({"node_name": "n\x00"}, "node_name holds a control character"),
    ({"node_name": "n\udfff"}, "node_name holds a lone surrogate"),
    ({"flow_id": 3}, "flow_id is a int"),
    ({"ts": float("nan")}, "ts is not a finite number"),
])
def test_check_row_names_what_is_wrong(change: dict[str, Any], reason: str) -> None:
    assert reason in (check_row(row_of(record()._replace(**change))) or "")


def test_check_row_accepts_unicode_names_and_trace_less_events() -> None:
    assert check_row(row_of(record(node_name="nœud-é-日本"))) is None
    assert check_row(row_of(record(trace=None))) is None


# -- schema-4 blocks (migration only) ---------------------------------------------------


def test_v4_blocks_of_both_layouts_decode_to_rows() -> None:
    runtime = tuple(record())
    head, payload = tuple(record(seq=2))[:14], {"x": 1}
    one = pickle.dumps([runtime], 5)
    two = pickle.dumps([head], 5) + pickle.dumps([(payload,)], 5)
    assert decode_v4_block(one) == [row_of(record())]
    (row,) = decode_v4_block(two)
    assert row.payload == {"x": 1} and row.seq == 2 and row.latency_ms is None


def _v4_payload_block(payload: Any) -> bytes:
    """A schema-4 block of one stored event (two pickles, one memo) with ``payload``."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, 5)
    pickler.dump([tuple(record())[:14]])
    pickler.dump([(payload,)])
    return buffer.getvalue()


def test_a_v4_block_that_refers_to_itself_is_refused_not_walked_forever() -> None:
    cyclic: list[Any] = ["x"]
    cyclic.append(cyclic)
    with pytest.raises(BlockError, match="nests deeper than 100 levels"):
        decode_v4_block(_v4_payload_block({"loop": cyclic}))
    bomb: list[Any] = ["x" * 10]
    for _ in range(30):  # 2**30 strings once written out, in a few hundred bytes
        bomb = [bomb, bomb]
    with pytest.raises(BlockError, match="unfolds into too many values"):
        decode_v4_block(_v4_payload_block(bomb))


_v4_atom = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
            | st.text(max_size=3) | st.binary(max_size=3))
_v4_value = st.recursive(
    _v4_atom, lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner)
                             | st.dictionaries(_v4_atom, inner, max_size=3)
                             | st.frozensets(_v4_atom, max_size=3)),
    max_leaves=40)


def _unfolded(value: Any) -> tuple[int, int]:
    """(values, the depth of the deepest container), walked one value at a time."""
    count, deepest, stack = 0, -1, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if isinstance(item, (dict, list, tuple, frozenset)):
            deepest = max(deepest, depth)
            items = [*item, *item.values()] if isinstance(item, dict) else list(item)
            stack.extend((nested, depth + 1) for nested in items)
    return count, deepest


@given(value=_v4_value, wraps=st.integers(0, 4) | st.integers(96, 102),
       slack=st.integers(-2, 2))
@settings(max_examples=200, deadline=None)
def test_the_v4_bounds_refuse_exactly_the_values_too_many_or_too_deep(
        value: Any, wraps: int, slack: int) -> None:
    # _bounded counts whole containers of atoms at once; this walks value by value.
    # The budget is drawn about the value's own count, the depth about the limit.
    for _ in range(wraps):
        value = [value]
    count, deepest = _unfolded(value)
    budget = max(1, count + slack)
    if count > budget or deepest >= 100:
        with pytest.raises(BlockError, match=r"too many values|nests deeper"):
            _legacy_v4._bounded(value, budget)
    else:
        _legacy_v4._bounded(value, budget)


class _Evil:
    def __reduce__(self) -> Any:
        import os

        return (os.system, ("true",))


class _Huge:
    def __reduce__(self) -> Any:
        return (bytearray, (10**9,))


@pytest.mark.parametrize("obj", [_Evil(), _Huge()], ids=["code", "1gb"])
def test_a_crafted_v4_block_is_refused_not_executed(obj: Any) -> None:
    with pytest.raises(BlockError, match="corrupt schema-4 block"):
        decode_v4_block(pickle.dumps([obj], 5))


class _Str(str):
    def isprintable(self) -> bool:  # a subclass that lies about itself
        return True


def test_a_str_subclass_is_checked_as_the_plain_str_it_holds() -> None:
    assert check_row(row_of(record(trace=_Str("t-1")))) is None
    assert "control character" in (check_row(row_of(record(trace=_Str("t\x00")))) or "")
    assert "control character" in (check_row(row_of(record(node_name=_Str("n\x1b")))) or "")


@given(keys=st.lists(_text, max_size=6, unique=True),
       values=st.lists(st.lists(_json_small, min_size=6, max_size=6), min_size=2,
                             max_size=8))
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_payloads_of_one_shape_round_trip_through_the_payload_table(
    keys: list[str], values: list[list[Any]],
) -> None:
    payloads = [dict(zip(keys, row, strict=False)) for row in values]
    events = [StoredEvent("t-1", float(i), "k", None, None, p, flow_id="f", seq=i)
              for i, p in enumerate(payloads)]
    text = encode_block(rows_of(events))
    assert [row.payload for row in decode_block(text)] == payloads
    if len(payloads) > 1:
        assert '"payload"' in text  # the table form, keys written once


def test_payloads_of_different_shapes_keep_their_own_keys() -> None:
    events = [StoredEvent("t-1", 1.0, "k", None, None, {"a": 1}, flow_id="f", seq=1),
              StoredEvent("t-1", 2.0, "k", None, None, {"b": 2, 3: "int key"}, flow_id="f",
                          seq=2)]
    back = decode_block(encode_block(rows_of(events)))
    assert [row.payload for row in back] == [{"a": 1}, {"b": 2, "3": "int key"}]


_scalar = (st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80)
           | st.floats() | _text | st.sampled_from([10**4300, -(10**5000)]))  # past int()
_flat = _scalar | st.lists(_scalar, max_size=3) | st.dictionaries(_text, _scalar, max_size=3)


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN (JSON keeps NaN; NaN != NaN in Python)."""
    return json.dumps(a, sort_keys=True, default=repr) == json.dumps(b, sort_keys=True,
                                                                      default=repr)


@given(payloads=st.lists(st.dictionaries(st.sampled_from(["a", "b", "é", "\x00"]), _flat,
                                         min_size=2, max_size=2), min_size=1, max_size=6),
       extra=_flat, node=_text)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_the_fast_encoder_stores_what_the_stdlib_encoder_stores(
    payloads: list[dict[str, Any]], extra: Any, node: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Blocks of JSON's own types go through pydantic-core's encoder, anything else
    # through json's: a reader must get the same values either way.
    events = [StoredEvent("t-1", 1.0 + i, "k", node, None, p, flow_id="f", seq=i,
                          parent_invocation_ids=("p", node)) for i, p in enumerate(payloads)]
    rows = [row._replace(extra=extra) for row in rows_of(events)]
    fast = decode_block(encode_block(rows))
    with monkeypatch.context() as patched:
        def refuse(*_args: Any, **_kwargs: Any) -> bytes:
            raise TypeError("stdlib only")
        patched.setattr(_blocks, "_fast_encode", refuse)
        slow = decode_block(encode_block(rows))
    assert _same([tuple(r) for r in fast], [tuple(r) for r in slow])


_alike_values = st.sampled_from([0.0, -0.0, 0, False, 1, True, 1.0, None, "x", float("nan")])


@given(traces=st.lists(st.integers(1, 6), min_size=2, max_size=12),
       depth=st.lists(st.integers(0, 2) | st.just(2**70), min_size=1, max_size=3),
       extra=st.lists(st.none() | _alike_values | _flat, min_size=1, max_size=3),
       node=_text,
       latency=st.lists(st.sampled_from([0.0, 2.5, None, float("nan"), float("inf"),
                                         -float("inf"), 1e308]), min_size=1, max_size=3))
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_a_batch_of_many_traces_stores_what_each_block_on_its_own_stores(
    traces: list[int], depth: list[int], extra: list[Any], node: str, latency: list[Any],
) -> None:
    # A batch of runtime events is looked at once (the columns it shares, the types
    # it holds), then cut into blocks: each block must read back exactly as the
    # block encode_block makes of the same rows alone (extras of 1, True and 1.0,
    # of -0.0, NaN, a lone surrogate in a node name; the columns whose type the
    # schema fixes hold that type; NaN, infinities and a sum that overflows, which
    # orjson would write as null, and an int past 64 bits, which it refuses).
    rows = tuple_rows(
        record(trace=f"t{trace}", seq=i + 1, node_name=node,
               queue_depth_in=depth[i % len(depth)], latency_ms=latency[i % len(latency)],
               extra=extra[i % len(extra)], parent_invocation_ids=(node, "p"))
        for i, trace in enumerate(traces))
    groups = _blocks.group_by_trace(rows)
    batch = _blocks.block_rows(groups)
    assert [block.trace_id for block in batch] == list(groups)
    for block, group in zip(batch, groups.values(), strict=True):
        alone = decode_block(encode_block(group))
        assert _same([tuple(r) for r in decode_block(block.data)], [tuple(r) for r in alone])
        assert (block.n, block.ts_lo, block.ts_hi) == (
            len(group), min(r[1] for r in group), max(r[1] for r in group))
    # Traces longer than a block: each block holds its own slice of the batch's rows.
    chunks = [(trace, offset, group[offset:offset + 3]) for trace, group in groups.items()
              for offset in range(0, len(group), 3)]
    small = _blocks.block_rows(groups, 3)
    assert [(b.trace_id, b.offset, b.n) for b in small] == [
        (trace, offset, len(chunk)) for trace, offset, chunk in chunks]
    for block, (_trace, _offset, chunk) in zip(small, chunks, strict=True):
        alone = decode_block(encode_block(chunk))
        assert _same([tuple(r) for r in decode_block(block.data)], [tuple(r) for r in alone])
        assert (block.ts_lo, block.ts_hi) == (min(r[1] for r in chunk), max(r[1] for r in chunk))


def test_equal_extras_of_different_types_read_back_as_written() -> None:
    # 0 == False and {"a": 1} == {"a": True}: a column of equal values is written
    # once, but not when JSON writes them differently.
    for first, second in ((0, False), ({"a": 1}, {"a": True}), (1.0, 1)):
        rows = rows_of([record(seq=1, extra=first), record(seq=2, extra=second)])
        back = [row.extra for row in decode_block(encode_block(rows))]
        assert _same(back, [first, second]), (first, second)


def test_a_value_of_one_trace_never_becomes_another_traces() -> None:
    # Across a batch, 1 == 1.0 == True and 0.0 == -0.0: a column of equal values
    # is written once for the batch only when JSON writes them alike.
    cases = {"latency_ms": (1, 1.0), "queued_ts": (0.0, -0.0), "trace_cancelled": (0, False),
             "extra": ((1,), (True,))}  # parent ids are str: decode_block refuses others
    for column, (first, second) in cases.items():
        rows = tuple_rows([record(trace="t1", seq=1, **{column: first}),
                           record(trace="t1", seq=2, **{column: first}),
                           record(trace="t2", seq=3, **{column: second}),
                           record(trace="t2", seq=4, **{column: second})])
        blocks = _blocks.block_rows(_blocks.group_by_trace(rows))
        back = [getattr(row, column) for block in blocks for row in decode_block(block.data)]
        assert _same(back, [first, first, second, second]), column


def test_a_batch_of_plain_runtime_events_takes_the_batch_path() -> None:
    # The test above compares the two paths; this one makes sure the batch path is
    # the one a usual batch takes (else the comparison would prove nothing).
    rows = tuple_rows(record(trace=f"t{i % 5}", seq=i + 1, latency_ms=0.5)
                      for i in range(40))
    shape = _blocks._BatchShape.of(_blocks.group_by_trace(rows))
    assert shape is not None and shape.finite  # orjson's path
    nan = tuple_rows(record(trace=f"t{i % 5}", seq=i + 1,
                            latency_ms=float("nan") if i == 7 else 0.5) for i in range(40))
    shape = _blocks._BatchShape.of(_blocks.group_by_trace(nan))
    assert shape is not None and not shape.finite
    # Big blocks pay their own steps once per many events: the general path, which
    # was faster for them (one long trace's events).
    long = tuple_rows(record(trace="t0", seq=i + 1) for i in range(500))
    assert _blocks._BatchShape.of(_blocks.group_by_trace(long)) is None
    odd = tuple_rows([*(record(trace="t0", seq=1 + i) for i in range(3)),
                      record(trace="t0", seq=9, extra={"k": object()})])
    assert _blocks._BatchShape.of(_blocks.group_by_trace(odd)) is None
    stored = [row_of(StoredEvent("t-1", 1.0 + i, "k", None, None, {"a": i}, flow_id="f",
                                 seq=i)) for i in range(4)]
    assert _blocks._BatchShape.of(_blocks.group_by_trace(stored)) is None


def test_the_fast_encoder_leaves_values_it_would_write_its_own_way_to_json() -> None:
    # pydantic-core writes a datetime, a set or a None key differently from ``plain``:
    # such a block goes through json's encoder, so the text never depends on the
    # values stored next to it.
    import datetime

    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    events = [StoredEvent("t-1", 1.0, "k", None, None, {"at": when, "n": None}, flow_id="f",
                          seq=1),
              StoredEvent("t-1", 2.0, "k", None, None, {"at": "x", "n": {None: 1}},
                          flow_id="f", seq=2)]
    back = decode_block(encode_block(rows_of(events)))
    assert [row.payload for row in back] == [{"at": str(when), "n": None},
                                             {"at": "x", "n": {"null": 1}}]


def test_an_ascii_block_for_a_database_not_in_utf8_reads_back_the_same() -> None:
    # A LATIN1 Postgres refuses "日本" in a text value: its blocks escape what is
    # not ASCII (JSON's \u escapes; an astral character as a surrogate pair), and
    # read back to the same text.
    events = [StoredEvent("t-é", 1.0 + i, "k", "nœud", None, {"text": "日本 é 🐧", "i": i},
                          flow_id="f", seq=i) for i in range(3)]
    block = encode_block(rows_of(events), ascii_only=True)
    assert block.isascii()
    assert not encode_block(rows_of(events)).isascii()  # UTF-8 by default: faster
    back = decode_block(block)
    assert [row.payload["text"] for row in back] == ["日本 é 🐧"] * 3
    assert {row.trace_id for row in back} == {"t-é"}
    assert {row.node_name for row in back} == {"nœud"}


@pytest.mark.parametrize("path", ["fast", "stdlib"])
def test_an_int_too_long_for_json_loads_is_stored_as_its_digits(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # int() and json.loads convert at most 4,300 digits by default (a process-wide
    # limit a library leaves alone): a longer int comes back as its digits' text,
    # whichever encoder wrote the block; its neighbours come back as values.
    if path == "stdlib":
        monkeypatch.setattr(_blocks, "_plain_doc", lambda *_args: False)
    huge = 10**5000
    digits = "1" + "0" * 5000
    events = [StoredEvent("t-1", 1.0, "k", None, None, {"n": huge, "m": 1}, flow_id="f",
                          seq=1),
              StoredEvent("t-1", 2.0, "k", None, None, {"n": 2, "m": [huge, 5]},
                          flow_id="f", seq=2),
              StoredEvent("t-1", 3.0, "k", None, None, {"n": 10**4000, "m": 3},
                          flow_id="f", seq=3)]
    back = decode_block(encode_block(rows_of(events)))
    assert [row.seq for row in back] == [1, 2, 3]
    assert [row.payload for row in back] == [{"n": digits, "m": 1}, {"n": 2, "m": [digits, 5]},
                                             {"n": 10**4000, "m": 3}]


def test_a_huge_int_trace_id_does_not_make_the_block_unreadable() -> None:
    events = [StoredEvent(10**5000, 1.0, "k", None, None, {"i": 1}, flow_id="f",  # type: ignore[arg-type]
                          seq=1)]
    back = decode_block(encode_block(rows_of(events)))
    assert back[0].trace_id == "1" + "0" * 5000 and back[0].payload == {"i": 1}


@pytest.mark.parametrize("values", [
    [1, True], [True, 1], [1, 1.0], [0.0, -0.0], [-0.0, 0.0], [[1], [True]], [(1.0,), (1,)],
    [{"a": 1}, {"a": True}], [{1: "x"}, {True: "x"}], [["a"], ("a",)]])
def test_equal_values_json_writes_differently_come_back_each_as_written(
        values: list[Any]) -> None:
    # 1 == True == 1.0 and 0.0 == -0.0 in Python, but not in what a store returns:
    # a column of such values is not written once, as one.
    events = [StoredEvent("t-1", 1.0 + i, "k", None, None, {"v": v, "w": "x"}, flow_id="f",
                          seq=i) for i, v in enumerate(values)]
    expected = [json.loads(json.dumps({"v": v, "w": "x"})) for v in values]
    back = decode_block(encode_block(rows_of(events)))
    assert _same([row.payload for row in back], expected)
    assert [repr(row.payload["v"]) for row in back] == [repr(e["v"]) for e in expected]
    # Not a table (a dict and an OrderedDict): the payload column itself.
    from collections import OrderedDict
    odd = [events[0], dataclasses.replace(events[1], payload=OrderedDict(events[1].payload))]
    back = decode_block(encode_block(rows_of(odd)))
    assert [repr(row.payload["v"]) for row in back] == [repr(e["v"]) for e in expected[:2]]


def test_a_stored_events_repeated_fields_and_few_node_names_are_written_once() -> None:
    # A StoredEvent made from a runtime event repeats its ts, kind and node in its
    # payload, and a trace has a handful of nodes: version 2 writes those once, and
    # reads back exactly what was written.
    events = []
    for i in range(40):
        ts, kind, node = 1000.0 + i, ["node_start", "node_success"][i % 2], f"n{i % 3}"
        node_id = f"{i % 3:032x}"
        events.append(StoredEvent("t-1", ts, kind, node, node_id,
                                  {"ts": ts, "event": kind, "node_name": node,
                                   "node_id": node_id, "latency_ms": i * 0.5,
                                   "trace_id": "t-1"}, flow_id="f", seq=i))
    rows = rows_of(events)
    block = encode_block(rows)
    doc = json.loads(block)
    assert doc["v"] == 2
    assert doc["payload"]["alias"] == {"ts": "ts", "event": "kind", "node_name": "node_name",
                                       "node_id": "node_id"}
    assert doc["cols"]["node_id"]["d"] == [f"{i:032x}" for i in range(3)]
    assert decode_block(block) == rows
    # An equal but distinct payload value is not an alias: it keeps its own type.
    rows[3] = rows[3]._replace(payload={**rows[3].payload, "ts": 1003})
    back = decode_block(encode_block(rows))
    assert back[3].payload["ts"] == 1003 and type(back[3].payload["ts"]) is int
    assert back == rows


@pytest.mark.parametrize(("column", "problem"), [
    ({"d": ["a"], "i": [0, -1]}, "indexed column 'kind' is not 2 values"),
    ({"d": ["a"], "i": [0, 1]}, "indexed column 'kind' is not 2 values"),
    ({"d": ["a"], "i": [0]}, "indexed column 'kind' is not 2 values"),
    ({"d": "ab", "i": [0, 1]}, "indexed column 'kind' is not 2 values"),
    ({"d": ["a"], "i": [0, "0"]}, "indexed column 'kind' is not 2 values"),
])
def test_a_crafted_indexed_column_is_refused(column: dict[str, Any], problem: str) -> None:
    text = json.dumps({"v": 2, "n": 2, "cols": {"kind": column}})
    with pytest.raises(BlockError, match=re.escape(problem)):
        decode_block(text)


def test_a_crafted_alias_is_refused() -> None:
    text = json.dumps({"v": 2, "n": 1, "cols": {}, "payload": {
        "keys": ["a"], "cols": {}, "same": {}, "alias": {"a": "no such column"}}})
    with pytest.raises(BlockError, match="payload column 'a' names no event column"):
        decode_block(text)


def test_a_version_1_block_still_reads() -> None:
    text = json.dumps({"v": 1, "n": 2, "trace_id": "t", "cols": {
        "ts": [1.0, 2.0], "kind": ["a", "b"], "seq": [1, 2]}, "same": {"flow_id": "f"},
        "payload": {"keys": ["x"], "cols": {"x": [1, 2]}, "same": {}}})
    back = decode_block(text)
    assert [(r.ts, r.kind, r.seq, r.flow_id, r.payload) for r in back] == [
        (1.0, "a", 1, "f", {"x": 1}), (2.0, "b", 2, "f", {"x": 2})]


@given(kinds=st.lists(_text, min_size=1, max_size=3), nodes=st.lists(_text, min_size=1, max_size=3),
       n=st.integers(min_value=1, max_value=80), data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_indexed_and_aliased_columns_read_back_as_written(
        kinds: list[str], nodes: list[str], n: int, data: st.DataObject) -> None:
    rows = []
    for i in range(n):
        kind = data.draw(st.sampled_from(kinds))
        node = data.draw(st.sampled_from([*nodes, None]))
        ts = data.draw(st.floats(allow_nan=False, allow_infinity=False))  # as check_row
        payload = {"ts": ts, "event": kind, "node_name": data.draw(st.sampled_from([node, "x"]))}
        rows.append(StoredEvent("t-1", ts, kind or "k", node, None, payload, flow_id="f",
                                seq=i))
    rows_in = rows_of(rows)
    assert _same([tuple(r) for r in decode_block(encode_block(rows_in))],
                 [tuple(r) for r in rows_in])


def test_an_int_key_too_long_for_text_does_not_stop_the_encoder() -> None:
    # JSON writes an int key as its digits: one past int()'s limit cannot be, and
    # must not send the encoder round and round (it did: RecursionError).
    huge = 10**5000
    rows = [row._replace(extra={huge: "e", "k": 1})
            for row in rows_of([StoredEvent("t-1", 1.0, "k", None, None, {huge: 1, "a": 2},
                                            flow_id="f", seq=1)])]
    back = decode_block(encode_block(rows))
    assert back[0].payload == {"1" + "0" * 5000: 1, "a": 2}
    assert back[0].extra == {"1" + "0" * 5000: "e", "k": 1}


def test_a_giant_int_is_written_as_cut_text_and_quickly() -> None:
    # pydantic-core converts an int to decimal in time quadratic in its length
    # (2.6 s for this one): such an int goes the stdlib way, as cut text.
    import time

    giant = 1 << 4_000_000
    events = [StoredEvent("t-1", 1.0 + i, "k", None, None, {"n": giant if i == 1 else i},
                          flow_id="f", seq=i) for i in range(3)]
    started = time.perf_counter()
    block = encode_block(rows_of(events))
    assert time.perf_counter() - started < 1.0
    assert len(block) < 20_000
    back = decode_block(block)
    assert [row.payload["n"] for row in back][::2] == [0, 2]
    assert back[1].payload["n"].startswith("0x") and "[cut:" in back[1].payload["n"]


@pytest.mark.parametrize(("change", "problem"), [
    ({"payload": None}, "payload is None (a StoredEvent's payload is a mapping)"),
    ({"payload": 5}, "payload is a int, not a mapping"),
    ({"payload": [1, 2]}, "payload is a list, not a mapping"),
    ({"ts": 10**400}, "ts is not a finite number"),
    ({"seq": 1 << 63}, "seq does not fit in 64 bits"),
    ({"attempt": -(1 << 70)}, "attempt does not fit in 64 bits"),
])
def test_a_row_no_reader_could_read_back_is_refused_alone(
        change: dict[str, Any], problem: str) -> None:
    rows = rows_of([StoredEvent("t-1", 1.0 + i, "k", None, None, {"i": i}, flow_id="f",
                                seq=i) for i in range(4)])
    rows[2] = rows[2]._replace(**change)
    assert check_rows(rows) == [(2, problem)]
    assert check_row(rows[2]) == problem


def test_an_object_equal_to_anything_keeps_its_own_value() -> None:
    # mock.ANY == "x" and ANY == None: a column of "x"s (or Nones) with ANY among
    # them is not one value; ANY is written as its text, its neighbours as theirs.
    from decimal import Decimal
    from unittest import mock

    for values in (["x", mock.ANY], [None, mock.ANY], [Decimal("1.0"), Decimal("1.00")]):
        events = [StoredEvent("t-1", 1.0 + i, "k", None, None, {"v": v, "w": 1},
                              flow_id="f", seq=i) for i, v in enumerate(values)]
        back = [row.payload["v"] for row in decode_block(encode_block(rows_of(events)))]
        assert back == [v if v is None or type(v) is str else str(v) for v in values]


def test_the_same_list_in_every_payload_is_written_once() -> None:
    tags = [1, 2, {"zz": True}]
    events = [StoredEvent("t-1", 1.0 + i, "k", None, None, {"tags": tags, "i": i},
                          flow_id="f", seq=i) for i in range(50)]
    block = encode_block(rows_of(events))
    assert block.count('"zz"') == 1
    assert [row.payload["tags"] for row in decode_block(block)] == [tags] * 50


def test_a_clean_batch_is_checked_without_a_step_per_row(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # check_rows looks at a clean batch column by column; only a suspect one goes
    # row by row (a probe that always looked suspect once cost 1.3 us an event).
    runtime = [r._replace(payload=None, queue_depth_in=1, queue_depth_out=0)
               for r in rows_of([StoredEvent(f"t-{i % 7}", 1.0 + i, "k", "n", None, {},
                                             flow_id="f", seq=i) for i in range(50)])]
    stored = rows_of([StoredEvent(f"t-{i % 7}", 1.0 + i, "k", None, "id", {"i": i},
                                  flow_id="f", seq=i) for i in range(50)])

    def row_by_row(*_args: Any) -> str:
        raise AssertionError("a clean batch went row by row")

    monkeypatch.setattr(_records, "check_row", row_by_row)
    assert check_rows(runtime) == [] and check_rows(stored) == []
    assert check_rows([*runtime, *stored]) == []


# -- crafted blocks: sizes and types a writer never stores -----------------------------


@pytest.mark.parametrize("n", [10**9, 10**7, _block_read._MAX_BLOCK_EVENTS + 1])
def test_a_block_claiming_more_events_than_any_writer_wrote_is_refused_at_once(
        n: int) -> None:
    # A few bytes claiming 10**9 events were a MemoryError ([None] * n), 10**7 a
    # 7.4 GB list of Rows: refused before anything of n's size is made.
    import time
    import tracemalloc

    text = json.dumps({"v": 2, "n": n, "trace_id": "t", "cols": {},
                       "same": {"ts": 1.0, "kind": "k", "seq": 1}})
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(BlockError, match="at most 100000"):
            decode_block(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 0.5
    assert peak < 100_000


def test_the_bound_is_the_largest_block_the_v4_upgrade_wrote() -> None:
    # Postgres's schema 4 wrote blocks of up to 10,000 events, which the upgrade to
    # schema 5 re-encodes whole (_pg_schema._v4_to_v5): such a block reads; one
    # event more is refused.
    n = _block_read._MAX_BLOCK_EVENTS
    # n events that differ in their seq (built as plain tuples: _replace n times cost
    # ~1 s); the block's other columns are one value each.
    head, at = tuple(record()), EventRecord._fields.index("seq")
    heads = [(*head[:at], i + 1, *head[at + 1:]) for i in range(n)]
    rows = decode_v4_block(pickle.dumps(heads, 5))
    back = decode_block(encode_block(rows))
    assert len(back) == n and back == rows
    with pytest.raises(BlockError, match="at most 100000"):
        decode_block(encode_block([*rows, row_of(record(seq=n + 1))]))


def _block_with(column: str, value: Any) -> str:
    """A block of two runtime events written by encode_block, with the first event's
    ``column`` replaced by ``value`` (written in full, as a column of two values)."""
    rows = rows_of([record(seq=1), record(seq=2)])
    doc = json.loads(encode_block(rows))
    values = [list(v) if type(v) is tuple else v for v in
              (getattr(rows[0], column), getattr(rows[1], column))]
    doc["same"].pop(column, None)
    doc["cols"][column] = [value, values[1]]
    return json.dumps(doc)


@pytest.mark.parametrize(("column", "value"), [
    ("ts", float("nan")), ("ts", float("inf")), ("ts", "abc"), ("ts", None), ("ts", True),
    pytest.param("ts", 10**400, id="ts-10**400"),
    ("node_name", 7), ("node_id", [1]), ("flow_id", False), ("flow_name", {"f": 1}),
    ("kind", {"k": 1}), ("kind", None), ("kind", ""), ("kind", 3),
    ("seq", "1"), ("seq", 1.5), ("seq", True), ("seq", None),
    ("payload", 5), ("payload", [1]), ("payload", "p"),
])
def test_a_value_no_writer_stores_in_its_column_is_refused_by_name(
        column: str, value: Any) -> None:
    # Such a block read back made the readers fail later, with a TypeError (the
    # trace view, spans): decode_block says which column is not what was written.
    with pytest.raises(BlockError, match=f"column '{column}'"):
        decode_block(_block_with(column, value))


@pytest.mark.parametrize(("column", "value", "read"), [
    ("invocation_id", ["x"], "['x']"), ("invocation_id", 12345, "12345"),
    ("span_id", {"a": 1}, "{'a': 1}"), ("parent_span_id", 1.5, "1.5"),
    ("parent_invocation_ids", [["a"], {"b": 1}], ("['a']", "{'b': 1}")),
    ("parent_invocation_ids", [1], ("1",)), ("parent_invocation_ids", "ab", ()),
    ("parent_invocation_ids", {"b": 1}, ()),
    ("queued_ts", "abc", None), ("queued_ts", [1.0], None), ("queued_ts", True, None),
    pytest.param("queued_ts", 10**400, None, id="queued_ts-10**400"),
    ("queued_ts", 2**63, None),
])
def test_a_value_older_writers_stored_unchecked_is_read_mended(
        column: str, value: Any, read: Any) -> None:
    # check_row let any value into these columns until 2026-12-07: such a block must
    # still read (a store written then), with what readers cannot use mended (an id
    # as its text, parent ids as texts, a queued time as unknown), never refused.
    first, second = decode_block(_block_with(column, value))
    assert getattr(first, column) == read
    assert getattr(second, column) == getattr(row_of(record(seq=2)), column)


def test_a_wrong_type_in_a_column_of_one_value_or_the_trace_id_is_refused() -> None:
    doc = json.loads(encode_block(rows_of([record(seq=1), record(seq=2)])))
    for key, column, value in (("same", "flow_name", ["demo"]), ("same", "kind", 5),
                               ("same", "seq", 1.0), ("same", "ts", "now")):
        with pytest.raises(BlockError, match=f"column '{column}'"):
            decode_block(json.dumps({**doc, key: {**doc[key], column: value}}))
    with pytest.raises(BlockError, match="column 'trace_id'"):
        decode_block(json.dumps({**doc, "trace_id": 5}))


def test_a_runtime_event_without_int_queue_sizes_needs_its_payload() -> None:
    # A payload is null only on a runtime event, whose payload a reader makes of its
    # queue sizes (check_row refuses any other).
    runtime = json.loads(encode_block(rows_of([record(seq=1), record(seq=2)])))
    runtime["same"]["queue_depth_out"] = "2"
    with pytest.raises(BlockError, match="column 'payload'"):
        decode_block(json.dumps(runtime))
    stored = StoredEvent("t-1", 3.0, "k", None, None, {"a": 1}, flow_id="f", seq=3)
    mixed = json.loads(encode_block(rows_of([record(seq=1), stored, record(seq=2)])))
    mixed["cols"]["queue_depth_in"][2] = None
    with pytest.raises(BlockError, match="column 'payload'"):
        decode_block(json.dumps(mixed))
    mixed["cols"]["queue_depth_in"][2] = 4
    assert [r.queue_depth_in for r in decode_block(json.dumps(mixed))] == [1, None, 4]


# Values of each checked column a writer stores (check_row's, and the StoredEvent's
# types for ids, parent ids and queued_ts), and values of types it never stores.
_id = st.none() | st.text(max_size=8)
_time = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**53, 2**53)
_wrong = {
    "trace_id": st.integers() | st.booleans() | st.lists(st.text(max_size=2), max_size=2),
    "ts": st.none() | st.text(max_size=3) | st.booleans()
    | st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    "kind": st.none() | st.just("") | st.integers() | st.dictionaries(st.text(max_size=2),
                                                                       st.integers()),
    "seq": st.floats() | st.booleans() | st.text(max_size=3) | st.none(),
    "payload": st.integers() | st.text(max_size=3) | st.lists(st.integers(), max_size=2),
}


@given(data=st.data(), n=st.integers(1, 40),
       stored=st.lists(st.booleans(), min_size=1, max_size=40))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_block_of_storable_rows_reads_and_one_wrong_value_is_a_block_error(
        data: st.DataObject, n: int, stored: list[bool]) -> None:
    # Whatever a writer stores reads back (whichever of its layouts: columns of one
    # value, indexed, payload tables, a mix of runtime and stored events); one value
    # of a type it never stores, in any event's column, makes decode_block raise
    # BlockError (naming the column), never another exception.
    rows = []
    for i in range(n):
        event = record(seq=i + 1, kind=data.draw(st.sampled_from(["node_start", "x"])),
                       node_name=data.draw(st.sampled_from(["a", "b", None])),
                       invocation_id=data.draw(_id), span_id=data.draw(_id),
                       parent_invocation_ids=tuple(data.draw(st.lists(st.text(max_size=4),
                                                                      max_size=2))),
                       ts=data.draw(_time), queued_ts=data.draw(st.none() | _time),
                       attempt=data.draw(st.integers(0, 3)))
        row = row_of(event)
        if stored[i % len(stored)]:
            row = row._replace(payload={"i": i}, latency_ms=None, queue_depth_in=None,
                               queue_depth_out=None)
        assert check_row(row) is None
        rows.append(row)
    text = encode_block(rows)
    back = decode_block(text)
    assert _same([tuple(r) for r in back], [tuple(r) for r in rows])
    column = data.draw(st.sampled_from(sorted(_wrong)))
    value = data.draw(_wrong[column])
    at = data.draw(st.integers(0, n - 1))
    if column == "payload" and rows[at].payload is None:
        value = data.draw(st.integers() | st.text(max_size=3))  # a null one is right here
    doc = json.loads(text)
    if column == "trace_id":
        doc["trace_id"] = value
    else:
        values = [list(v) if type(v) is tuple else v for v in
                  (getattr(row, column) for row in decode_block(text))]
        values[at] = value
        doc["same"].pop(column, None)
        doc["cols"][column] = values
        doc.pop("payload", None) if column == "payload" else None
    with pytest.raises(BlockError, match=f"column '{column}'"):
        decode_block(json.dumps(doc))


def test_a_payload_table_of_many_empty_keys_is_refused_before_it_is_made() -> None:
    # 100,000 keys of no value for 10,000 events: ~1.4 MB of text would have made
    # 10**9 payload cells (every key of every payload, None).
    import tracemalloc

    keys = [f"k{i}" for i in range(100_000)]
    doc = {"v": 2, "n": 10_000, "trace_id": "t", "same": {"ts": 1.0, "kind": "k", "seq": 1},
           "cols": {}, "payload": {"keys": keys, "cols": {}, "same": {}}}
    text = json.dumps(doc)
    tracemalloc.start()
    try:
        with pytest.raises(BlockError, match="a payload table of 100000 keys"):
            decode_block(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * len(text)  # the parsed document, not its claim


_GOOD = StoredEvent("t", 1.0, "node_start", "n", "n", {"a": 1}, flow_id="f", seq=1,
                    invocation_id="i", parent_invocation_ids=("p",))


@pytest.mark.parametrize(("change", "reason"), [
    ({"invocation_id": 12345}, "invocation_id is a int, not a str"),
    ({"span_id": ["x"]}, "span_id is a list, not a str"),
    ({"parent_span_id": b"x"}, "parent_span_id is a bytes, not a str"),
    ({"parent_invocation_ids": ("a", 1)}, "parent_invocation_ids is not a tuple of str"),
    ({"parent_invocation_ids": "ab"}, "parent_invocation_ids is not a tuple of str"),
    ({"queued_ts": "abc"}, "queued_ts is a str, not a number"),
    ({"queued_ts": True}, "queued_ts is a bool, not a number"),
    ({"queued_ts": 10**400}, "queued_ts does not fit in 64 bits"),  # crashed pf inspect
])
def test_a_stored_event_a_reader_could_not_use_is_refused_alone(
        change: dict[str, Any], reason: str) -> None:
    # decode_block refuses a block holding such a value, so a writer storing one
    # (save_event took it before) made its whole block, up to 2,000 events of the
    # trace, unreadable.
    rows = tuple_rows([_GOOD, dataclasses.replace(_GOOD, seq=2, **change),
                       dataclasses.replace(_GOOD, seq=3)])
    assert check_rows(rows) == [(1, reason)]
    assert check_rows(rows[::2]) == []
    assert decode_block(encode_block(rows[::2])) == rows_of(rows[::2])


def test_a_queued_time_that_is_not_finite_is_stored_and_read_back() -> None:
    # The writer stores any number there (a clock that went wrong); readers show it
    # as unknown, and must still read the block.
    rows = tuple_rows([dataclasses.replace(_GOOD, queued_ts=math.nan),
                       dataclasses.replace(_GOOD, seq=2, queued_ts=-math.inf)])
    assert check_rows(rows) == []
    back = decode_block(encode_block(rows))
    assert math.isnan(back[0].queued_ts) and back[1].queued_ts == -math.inf


def test_payloads_too_wide_for_a_table_are_written_whole_and_read_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The reader refuses a payload table of more cells (keys x events) than
    # _TABLE_CELLS unless its text is as long: values that repeat are written once,
    # so the writer must not write such a table (2,000 events of a 600-key payload
    # of one value each were 1.2M cells from 42 kB). Shown here with a small bound.
    # The writer's bound and the reader's are one constant, imported by each.
    monkeypatch.setattr(_blocks, "_TABLE_CELLS", 100)
    monkeypatch.setattr(_block_read, "_TABLE_CELLS", 100)
    wide = [StoredEvent("t", 1.0 + i, "k", None, None, {f"k{j}": 1 for j in range(20)},
                        flow_id="f", seq=i + 1) for i in range(10)]
    text = encode_block(rows_of(wide))
    assert "payload" not in json.loads(text)  # 200 cells: payloads whole, no table
    assert [r.payload for r in decode_block(text)] == [e.payload for e in wide]
    narrow = encode_block(rows_of(wide[:5]))  # 100 cells: a table
    assert "payload" in json.loads(narrow)
    assert [r.payload for r in decode_block(narrow)] == [e.payload for e in wide[:5]]


# -- StoredEvents by column (ColumnRows) ------------------------------------------------

# Mostly storable values, so that batches hold several traces' events among the bad.
_odd_names = st.sampled_from(["a", "b", "é日本", None, "a", "b", "n\x00", "x\ud800", "\x1b[2J"])
_stored_payloads = st.one_of(
    st.dictionaries(st.sampled_from(["k", "ts", "events_lost"]), _json_small, max_size=3),
    st.fixed_dictionaries({"k": _json_scalar}), st.none(), st.just(["not", "a", "mapping"]))


@given(events=st.lists(st.tuples(
    st.sampled_from(["t-1", "t-2", "t-1", "t-2", None, "t\x00", 7]),  # bad and none too
    _odd_names, st.integers(0, 6),                                    # node, seq (repeats)
    st.sampled_from(["node_start", "node_success", "node_error", _folds.LOST_KIND]),
    _stored_payloads, st.sampled_from([1.5, -0.0, 2, 3.25, float("nan")])),
    min_size=1, max_size=16),
    redelivered=st.lists(st.integers(0, 6), max_size=3))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_stored_events_by_column_are_written_exactly_as_their_tuple_rows(
    events: list[tuple[Any, ...]], redelivered: list[int],
) -> None:
    # save_event's batches (StoredEvents only) reach the writers as columns, with no
    # tuple per event: every step of the write path must answer for them exactly
    # as for the same events' plain tuple rows (hostile names, refused events,
    # payloads that are not mappings, repeated seqs, several traces, none).
    items = [StoredEvent(trace, ts, kind, node, None, payload, flow_id="f", seq=seq,
                         invocation_id=f"i{seq}", parent_invocation_ids=("p",))
             for trace, node, seq, kind, payload, ts in events]
    by_column, plain = _records.ColumnRows.of_events(items), tuple_rows(items)
    assert list(by_column) == plain and len(by_column) == len(plain)
    assert by_column[-1] == plain[-1] and list(by_column[1::2]) == plain[1::2]
    assert check_rows(by_column) == check_rows(plain)
    refused = {i for i, _ in check_rows(plain)}
    keep = [i for i in range(len(plain)) if i not in refused]
    good, good_plain = _records.select(by_column, keep), [plain[i] for i in keep]
    assert list(good) == good_plain
    terminal, errors = frozenset({"node_success"}), frozenset({"node_error"})
    folds = [{k: [sorted(f.nodes) if name == "nodes" else getattr(f, name)
                  for name in f.__slots__]
              for k, f in fold_rows(x, terminal=terminal, errors=errors).items()}
             for x in (good, good_plain)]
    assert _same(folds[0], folds[1])  # NaN times: equal as written
    stored = {"f": [(s, s) for s in redelivered]}
    assert split_fresh(good, stored) == split_fresh(good_plain, stored)
    groups, plain_groups = _blocks.group_by_trace(good), _blocks.group_by_trace(good_plain)
    assert {k: list(g) for k, g in groups.items()} == plain_groups
    assert _blocks.block_rows(groups, 3) == _blocks.block_rows(plain_groups, 3)


def test_stored_events_go_by_column_only_in_batches_of_long_traces() -> None:
    def stored(trace: str, seq: int) -> StoredEvent:
        return StoredEvent(trace, 5.0, "custom", None, None, {"a": seq}, flow_id="f",
                           seq=seq)

    one_trace = [stored("t-1", seq) for seq in range(64)]
    assert type(_records.event_rows(one_trace)) is _records.ColumnRows
    assert list(_records.event_rows(one_trace)) == tuple_rows(one_trace)
    # Traces of 32 events in the batch, a runtime record, an unhashable trace id:
    # tuple rows, as before.
    two_traces = [stored(f"t-{seq % 2}", seq) for seq in range(64)]
    unhashable = [*one_trace[:-1], dataclasses.replace(one_trace[-1], trace_id=[])]
    for items in (two_traces, [*one_trace, record()], unhashable):
        assert type(_records.event_rows(items)) is list
        assert _records.event_rows(items) == tuple_rows(items)
    assert _records.event_rows([]) == []
    with pytest.raises(IndexError):
        _records.event_rows(one_trace)[64]


def test_by_column_traces_are_told_apart_by_hash_and_equality_as_by_row() -> None:
    # A str subclass whose == says yes to every str: grouping by == alone put
    # another trace's events in its block (the tuple path groups with a dict).
    class Loose(str):
        __hash__ = str.__hash__

        def __eq__(self, other: object) -> bool:
            return isinstance(other, str)

    items = [StoredEvent(Loose("t-1") if i % 2 else "t-2", float(i), "k", None, None, {},
                         flow_id="f", seq=i) for i in range(128)]
    groups = _blocks.group_by_trace(_records.ColumnRows.of_events(items))
    assert sorted(map(len, groups.values())) == [64, 64]
