"""Event blocks (penguiflow_exporters._blocks): encoding, the fold, idempotency ranges."""

from __future__ import annotations

import enum
import io
import os
import pickle
import random
import types
from typing import Any

import pytest

from penguiflow.state import StateStoreError, StoredEvent, stored_from_fields
from penguiflow_exporters._batch import block_heads, block_items
from penguiflow_exporters._blocks import (
    decode_block,
    encode_block,
    events_of,
    group_by_trace,
    merge_ranges,
    split_fresh,
    stored_item,
)

KINDS = ["node_start", "node_success", "node_error", "node_failed", "node_timeout",
         "node_retry", "node_trace_cancelled", "trace_cancel_start", "trace_cancel_finish",
         "remote_call_start", "remote_call_success", "remote_call_error",
         "remote_cancel_error", "emit", "custom"]


def runtime_fields(trace: str | None, seq: int, kind: str = "node_start", *,
                   node: str | None = "n", attempt: int = 0, flow: str | None = "f1",
                   flow_name: str | None = "demo", extra: Any = None) -> tuple[Any, ...]:
    return (trace, 100.0 + seq, kind, node, "nid", f"inv{seq}", ("p1",) if seq % 3 else (),
            f"s{seq}", None, seq, attempt, 99.5 + seq, flow_name, flow, 0.25, 1, 2, 1, 64, 3,
            False, 1 if seq % 2 else None, extra)


def test_runtime_items_round_trip_to_the_events_the_runtime_would_store() -> None:
    items = [runtime_fields("t1", i, random.choice(KINDS), extra={"k": i} if i % 4 else None)
             for i in range(1, 40)]
    got = events_of(decode_block(encode_block(items)))
    assert got == [stored_from_fields(item) for item in items]
    assert all(type(e.payload) is dict for e in got)


def test_stored_events_round_trip_whole() -> None:
    evs = [StoredEvent("t", 1.5, "custom", None, None, {"a": [1, 2], "nan": float("inf"),
                                                        3: ("tuple", None)},
                       parent_invocation_ids=("x", "y"), seq=7, flow_id="f"),
           StoredEvent(None, 2.0, "emit", "n", "id", {}, seq=8, flow_id=None)]
    assert events_of(decode_block(encode_block([stored_item(e) for e in evs]))) == evs


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Thing:
    def __str__(self) -> str:
        return "a thing"


class Broken:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_values_that_are_not_plain_data_are_written_as_plain_data() -> None:
    payload = {"proxy": types.MappingProxyType({"k": 1}), "enum": Color.RED, "int": Level.HIGH,
               "obj": Thing(), "cls": Thing, "set": {1}, "broken": Broken()}
    item = runtime_fields("t", 1, extra=types.MappingProxyType(payload))
    (event,) = events_of(decode_block(encode_block([item])))
    p = event.payload
    assert p["proxy"] == {"k": 1} and type(p["proxy"]) is dict
    assert p["enum"] == "red" and p["int"] == 3 and type(p["int"]) is int
    assert p["obj"] == "a thing" and p["set"] == {1}
    assert "Thing" in p["cls"] and "Broken object" in p["broken"]


def test_a_cycle_through_a_replaced_mapping_keeps_the_event() -> None:
    inner: dict[str, Any] = {}
    inner["self"] = types.MappingProxyType(inner)
    items = [runtime_fields("t", 1, extra=types.MappingProxyType({"loop": inner})),
             runtime_fields("t", 2)]
    events = events_of(decode_block(encode_block(items)))
    assert [e.seq for e in events] == [1, 2]
    assert "unserialisable_extra" in events[0].payload


class Evil:
    def __reduce__(self) -> Any:
        return (os.system, ("echo pwned",))


def test_a_block_naming_anything_but_plain_data_is_refused_not_run() -> None:
    with pytest.raises(StateStoreError, match=r"corrupt event block.*posix\.system"):
        decode_block(pickle.dumps([Evil()]) + pickle.dumps([()]))
    with pytest.raises(StateStoreError, match="corrupt event block"):
        decode_block(b"not a pickle")
    with pytest.raises(StateStoreError, match="corrupt event block"):
        decode_block(pickle.dumps([("t", 1.0)]))  # truncated: heads without tails
    with pytest.raises(StateStoreError, match="not two lists of one length"):
        decode_block(pickle.dumps({"a": 1}) + pickle.dumps([]))
    with pytest.raises(StateStoreError, match="an event of 2 fields"):
        events_of(decode_block(pickle.dumps([("t",)]) + pickle.dumps([(1.0,)])))


def test_group_by_trace_keeps_order_of_first_appearance() -> None:
    items = [runtime_fields(t, i) for i, t in enumerate(["b", "a", None, "b", "a"], 1)]
    groups = group_by_trace(items)
    assert list(groups) == ["b", "a", None]
    assert [i[9] for i in groups["b"]] == [1, 4]


def test_split_fresh_keeps_new_events_and_grows_the_ranges() -> None:
    items = [runtime_fields("t", s) for s in (5, 6, 7)]
    fresh, ranges = split_fresh(items, {"f1": [(1, 4)]})
    assert fresh is items and ranges == {"f1": [(1, 7)]}


def test_split_fresh_drops_stored_and_repeated_events() -> None:
    items = [runtime_fields("t", s) for s in (3, 9, 9, 10)] + [
        runtime_fields("t", 3, flow="f2"), runtime_fields("t", 3, flow=None),
        runtime_fields("t", 3, flow=None)]
    fresh, ranges = split_fresh(items, {"f1": [(1, 4), (8, 8)]})
    assert [(i[13], i[9]) for i in fresh] == [("f1", 9), ("f1", 10), ("f2", 3), (None, 3),
                                              (None, 3)]
    assert ranges == {"f1": [(1, 4), (8, 10)], "f2": [(3, 3)]}


def test_split_fresh_of_events_all_stored_keeps_none() -> None:
    items = [runtime_fields("t", s) for s in (2, 3)]
    fresh, ranges = split_fresh(items, {"f1": [(1, 3)]})
    assert list(fresh) == [] and ranges == {}


def test_merge_ranges() -> None:
    assert merge_ranges([], [3, 1, 2]) == [(1, 3)]
    assert merge_ranges([], [1, 1, 3]) == [(1, 1), (3, 3)]
    assert merge_ranges([(1, 2), (10, 12)], [3, 4, 8, 13]) == [(1, 4), (8, 8), (10, 13)]
    assert merge_ranges([(1, 2)], []) == [(1, 2)]


def test_pickler_leaves_plain_data_alone() -> None:
    # Exact built-in types never reach the override: a block of plain items is
    # byte for byte what pickle writes: runtime items as one list; otherwise heads,
    # then tails, with one memo.
    items = [runtime_fields("t", i, extra={"k": [1, 2.5, None]}) for i in range(1, 5)]
    assert encode_block(items) == pickle.dumps(items, 5)
    mixed = [*items, stored_item(StoredEvent("t", 2.0, "custom", None, None, {}, seq=9))]
    buffer = io.BytesIO()
    plain = pickle.Pickler(buffer, 5)
    plain.dump([item[:14] for item in mixed])
    plain.dump([item[14:] for item in mixed])
    assert encode_block(mixed) == buffer.getvalue()


def test_a_writer_reads_the_heads_alone_and_the_whole_items() -> None:
    items = [runtime_fields("t", 1), stored_item(StoredEvent("t", 2.0, "custom", None, None,
                                                             {"a": 1}, seq=2, flow_id="f1"))]
    data = encode_block(items)
    assert block_heads(data) == [item[:14] for item in items]
    assert block_items(data) == items == decode_block(data)
    runtime = [runtime_fields("t", 3), runtime_fields("t", 4)]
    data = encode_block(runtime)
    assert block_heads(data) == runtime == block_items(data) == decode_block(data)
    assert block_items(encode_block([])) == [] == decode_block(encode_block([]))
