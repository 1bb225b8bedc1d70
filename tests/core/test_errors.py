"""§3 FlowError / FlowErrorCode."""

from __future__ import annotations

from enum import Enum

import pytest

from penguiflow import FlowError, FlowErrorCode
from penguiflow import errors as pf_errors


def test_errors_module_exposes_the_same_classes() -> None:
    assert pf_errors.FlowError is FlowError
    assert pf_errors.FlowErrorCode is FlowErrorCode


def test_flow_error_code_members() -> None:
    names = [m.name for m in FlowErrorCode]
    assert names == [
        "NODE_TIMEOUT",
        "NODE_EXCEPTION",
        "TRACE_CANCELLED",
        "DEADLINE_EXCEEDED",
        "HOP_BUDGET_EXHAUSTED",
        "TOKEN_BUDGET_EXHAUSTED",
    ]
    assert issubclass(FlowErrorCode, str)
    assert issubclass(FlowErrorCode, Enum)
    for member in FlowErrorCode:
        assert member.value == member.name
        assert member == member.name
    assert FlowErrorCode("NODE_TIMEOUT") is FlowErrorCode.NODE_TIMEOUT


def test_constructor_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        FlowError("t", "n", FlowErrorCode.NODE_EXCEPTION, "m")  # type: ignore[misc]


def test_attributes_and_defaults() -> None:
    err = FlowError(trace_id="t1", node_name="n", code=FlowErrorCode.NODE_EXCEPTION, message="bad")
    assert isinstance(err, Exception)
    assert err.trace_id == "t1"
    assert err.node_name == "n"
    assert err.node_id is None
    assert err.code == "NODE_EXCEPTION"
    assert type(err.code) is str
    assert err.message == "bad"
    assert err.original_exc is None
    assert err.metadata == {}
    assert type(err.metadata) is dict
    assert err.exception_type is None
    assert err.args == ("bad",)
    assert err.unwrap() is None


def test_non_enum_codes_are_stringified() -> None:
    assert FlowError(trace_id=None, node_name=None, code="CUSTOM", message="m").code == "CUSTOM"
    err = FlowError(trace_id=None, node_name=None, code=42, message="m")  # type: ignore[arg-type]
    assert err.code == "42"
    assert type(err.code) is str


def test_metadata_is_copied() -> None:
    meta = {"a": 1}
    err = FlowError(
        trace_id="t", node_name="n", code="C", message="m", metadata=meta, node_id="nid"
    )
    meta["b"] = 2
    assert err.metadata == {"a": 1}
    assert err.metadata is not meta
    assert err.node_id == "nid"


def test_original_exception_identity_and_type_name() -> None:
    boom = KeyError("k")
    err = FlowError(trace_id="t", node_name="n", code="C", message="m", original_exc=boom)
    assert err.unwrap() is boom
    assert err.original_exc is boom
    assert err.exception_type == "KeyError"


@pytest.mark.parametrize(
    ("trace_id", "node_name", "expected"),
    [
        ("abc", "fetcher", "[NODE_TIMEOUT] slow trace=abc node=fetcher"),
        (None, "fetcher", "[NODE_TIMEOUT] slow node=fetcher"),
        ("abc", None, "[NODE_TIMEOUT] slow trace=abc"),
        (None, None, "[NODE_TIMEOUT] slow"),
    ],
)
def test_str_format(trace_id: str | None, node_name: str | None, expected: str) -> None:
    err = FlowError(
        trace_id=trace_id, node_name=node_name, code=FlowErrorCode.NODE_TIMEOUT, message="slow"
    )
    assert str(err) == expected


def test_to_payload_minimal() -> None:
    err = FlowError(trace_id=None, node_name=None, code=FlowErrorCode.NODE_EXCEPTION, message="m")
    assert err.to_payload() == {"code": "NODE_EXCEPTION", "message": "m"}


def test_to_payload_full() -> None:
    err = FlowError(
        trace_id="t",
        node_name="n",
        node_id="id1",
        code=FlowErrorCode.NODE_TIMEOUT,
        message="m",
        original_exc=TimeoutError(),
        metadata={"attempt": 2},
    )
    assert err.to_payload() == {
        "code": "NODE_TIMEOUT",
        "message": "m",
        "trace_id": "t",
        "node_name": "n",
        "node_id": "id1",
        "exception_type": "TimeoutError",
        "metadata": {"attempt": 2},
    }


def test_from_exception_defaults_message_to_str_of_exc() -> None:
    exc = ValueError("broken input")
    err = FlowError.from_exception(
        trace_id="t", node_name="n", node_id="nid", exc=exc, code=FlowErrorCode.NODE_EXCEPTION
    )
    assert isinstance(err, FlowError)
    assert err.message == "broken input"
    assert err.unwrap() is exc
    assert err.code == "NODE_EXCEPTION"
    assert err.node_id == "nid"
    assert err.exception_type == "ValueError"
    assert err.metadata == {}


def test_from_exception_uses_class_name_for_empty_message() -> None:
    err = FlowError.from_exception(
        trace_id=None, node_name=None, node_id=None, exc=RuntimeError(), code="X"
    )
    assert err.message == "RuntimeError"
    assert str(err) == "[X] RuntimeError"


def test_from_exception_explicit_message_and_metadata() -> None:
    meta = {"k": 1}
    err = FlowError.from_exception(
        trace_id="t",
        node_name="n",
        node_id=None,
        exc=OSError("disk"),
        code=FlowErrorCode.TRACE_CANCELLED,
        message="custom",
        metadata=meta,
    )
    meta["k"] = 2
    assert err.message == "custom"
    assert err.args == ("custom",)
    assert err.metadata == {"k": 1}
    assert err.code == "TRACE_CANCELLED"


def test_from_exception_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        FlowError.from_exception("t", "n", None, ValueError("x"), "C")  # type: ignore[misc]


def test_flow_error_can_be_raised_and_caught() -> None:
    with pytest.raises(FlowError) as info:
        raise FlowError(trace_id="t", node_name="n", code="C", message="m")
    assert info.value.trace_id == "t"


def test_a_flow_error_crosses_a_process_boundary_whole() -> None:
    # Its keyword-only __init__ broke the default unpickling: a FlowError returned
    # from a process pool worker raised TypeError in the parent instead.
    import pickle

    err = FlowError(trace_id="t", node_name="n", node_id="id", code=FlowErrorCode.NODE_TIMEOUT,
                    message="Node 'n' timed out", original_exc=TimeoutError("slow"),
                    metadata={"attempts": 3})
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is FlowError and back.args == err.args and str(back) == str(err)
    assert (back.trace_id, back.node_name, back.node_id, back.code, back.metadata) == (
        "t", "n", "id", "NODE_TIMEOUT", {"attempts": 3})
    assert isinstance(back.unwrap(), TimeoutError) and back.exception_type == "TimeoutError"
    assert back.to_payload() == err.to_payload()


# --- the error tree (penguiflow.errors' docstring) ------------------------------------------

_TREE_MODULES = (
    "penguiflow.errors",
    "penguiflow.state",
    "penguiflow.remote",
    "penguiflow_a2a.errors",
    "penguiflow_a2a.server",
    "penguiflow_exporters.otel",
)


def _drawn_tree() -> list[tuple[int, str, str]]:
    """``(depth, class name, description)`` for every line of the drawn hierarchy
    (the root, ``Exception``, is depth 0)."""
    doc = pf_errors.__doc__ or ""
    block = doc.split("::", 1)[1].split("\n\n")[1]
    rows = []
    for line in block.splitlines():
        if "──" in line:
            head, _, rest = line.partition("── ")
            name, _, description = rest.strip().partition(" ")
            rows.append((len(head) // 5, name, description.strip()))
        elif line.strip():
            rows.append((0, line.strip(), ""))
    return rows


def _resolve(name: str) -> type[BaseException]:
    import builtins
    import importlib

    found = getattr(builtins, name, None)
    for module in _TREE_MODULES:
        found = found or getattr(importlib.import_module(module), name, None)
    assert isinstance(found, type) and issubclass(found, BaseException), name
    return found


def test_the_drawn_error_tree_is_the_real_one() -> None:
    rows = _drawn_tree()
    assert rows[0][1:] == ("Exception", "")
    parents: dict[int, type[BaseException]] = {0: Exception}
    for depth, name, description in rows[1:]:
        cls = _resolve(name)
        parent = parents[depth - 1]
        assert parent in cls.__bases__ or (
            # A class drawn with a builtin in parentheses has it as a second base.
            issubclass(cls, parent) and cls.__bases__[0] is parent
        ), f"{name} is not drawn under its base class ({cls.__bases__})"
        builtin = description[1:].partition(")")[0] if description.startswith("(") else None
        if builtin:
            assert issubclass(cls, _resolve(builtin)), f"{name} is not a {builtin}"
        parents[depth] = cls
    drawn = {name for _, name, _ in rows}
    own = {
        obj.__name__ for obj in vars(pf_errors).values()
        if isinstance(obj, type) and issubclass(obj, BaseException)
        and obj.__module__ == "penguiflow.errors"
    }
    assert own <= drawn, f"classes of penguiflow.errors missing from the drawing: {own - drawn}"


def test_every_penguiflow_error_shares_one_base() -> None:
    from penguiflow.core import CycleError, TraceCancelled
    from penguiflow.remote import InMemoryTransport, RemoteAgentError, RemoteError
    from penguiflow.state import StateStoreError, StoreUnavailable
    from penguiflow_a2a.errors import A2AError, A2ATimeoutError
    from penguiflow_a2a.server import A2ARequestError
    from penguiflow_exporters.otel import OTLPExportError

    for cls in (FlowError, CycleError, TraceCancelled, StateStoreError, StoreUnavailable,
                RemoteError, RemoteAgentError, A2AError, A2ARequestError, OTLPExportError):
        assert issubclass(cls, pf_errors.PenguiFlowError), cls
    # The 2.1 bases stay: code catching them keeps working.
    assert issubclass(CycleError, RuntimeError)
    assert issubclass(RemoteAgentError, RuntimeError)
    assert issubclass(A2ATimeoutError, TimeoutError)
    assert issubclass(OTLPExportError, RuntimeError)
    assert InMemoryTransport.__module__ == "penguiflow._memory_transport"
