"""§2 message models."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel, ValidationError

from penguiflow import WM, FinalAnswer, Headers, Message, PlanStep, StreamChunk, Thought
from penguiflow import types as pf_types


def test_types_module_exposes_the_same_classes() -> None:
    assert pf_types.Headers is Headers
    assert pf_types.Message is Message
    assert pf_types.StreamChunk is StreamChunk
    assert pf_types.PlanStep is PlanStep
    assert pf_types.Thought is Thought
    assert pf_types.WM is WM
    assert pf_types.FinalAnswer is FinalAnswer
    for model in (Headers, Message, StreamChunk, PlanStep, Thought, WM, FinalAnswer):
        assert issubclass(model, BaseModel)


def test_headers_defaults_and_required_tenant() -> None:
    h = Headers(tenant="acme")
    assert (h.tenant, h.topic, h.priority) == ("acme", None, 0)
    with pytest.raises(ValidationError):
        Headers()  # type: ignore[call-arg]


def test_message_defaults() -> None:
    m = Message(payload={"x": 1}, headers=Headers(tenant="acme"))
    assert m.payload == {"x": 1}
    assert re.fullmatch(r"[0-9a-f]{32}", m.trace_id)
    assert m.deadline_s is None
    assert m.meta == {}
    assert isinstance(m.ts, float)


def test_message_payload_and_headers_are_required() -> None:
    with pytest.raises(ValidationError):
        Message(headers=Headers(tenant="acme"))  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        Message(payload=1)  # type: ignore[call-arg]


def test_headers_can_be_given_as_a_mapping() -> None:
    m = Message(payload=1, headers={"tenant": "acme", "priority": 3})
    assert isinstance(m.headers, Headers)
    assert m.headers.priority == 3


def test_consecutive_messages_get_fresh_ids_timestamps_and_meta() -> None:
    h = Headers(tenant="acme")
    first = Message(payload=1, headers=h)
    second = Message(payload=2, headers=h)
    assert first.trace_id != second.trace_id
    assert second.ts > first.ts
    assert first.meta is not second.meta
    first.meta["k"] = "v"
    assert second.meta == {}


def test_message_is_mutable_and_supports_model_copy_update() -> None:
    m = Message(payload=1, headers=Headers(tenant="acme"), meta={"a": 1})
    m.payload = 2
    assert m.payload == 2
    copy = m.model_copy(update={"payload": 3, "deadline_s": 12.5})
    assert copy.payload == 3
    assert copy.deadline_s == 12.5
    assert copy.trace_id == m.trace_id
    assert copy.headers == m.headers
    assert m.payload == 2


def test_default_model_config_ignores_unknown_fields() -> None:
    h = Headers(tenant="acme", region="eu")  # type: ignore[call-arg]
    assert h.tenant == "acme"
    assert not hasattr(h, "region")


def test_stream_chunk_defaults_and_fresh_meta() -> None:
    a = StreamChunk(stream_id="s", seq=0, text="hi")
    b = StreamChunk(stream_id="s", seq=1, text="there")
    assert a.done is False
    assert a.meta == {}
    a.meta["x"] = 1
    assert b.meta == {}
    with pytest.raises(ValidationError):
        StreamChunk(stream_id="s", text="no seq")  # type: ignore[call-arg]


@pytest.mark.parametrize("kind", ["retrieve", "web", "sql", "summarize", "route", "stop"])
def test_plan_step_accepts_every_kind(kind: str) -> None:
    step = PlanStep(kind=kind)  # type: ignore[arg-type]
    assert step.kind == kind
    assert step.args == {}
    assert step.max_concurrency == 1


def test_plan_step_rejects_unknown_kind() -> None:
    with pytest.raises(ValidationError):
        PlanStep(kind="dance")  # type: ignore[arg-type]


def test_plan_step_args_are_per_instance() -> None:
    a = PlanStep(kind="web")
    b = PlanStep(kind="web")
    a.args["q"] = "x"
    assert b.args == {}


def test_thought_fields() -> None:
    t = Thought(steps=[PlanStep(kind="sql", args={"q": 1})], rationale="because")
    assert t.done is False
    assert t.steps[0].kind == "sql"
    t2 = Thought(steps=[{"kind": "stop"}], rationale="r", done=True)  # type: ignore[list-item]
    assert isinstance(t2.steps[0], PlanStep)
    with pytest.raises(ValidationError):
        Thought(steps=[])  # type: ignore[call-arg]


def test_wm_defaults() -> None:
    wm = WM(query="q")
    assert wm.facts == []
    assert wm.hops == 0
    assert wm.budget_hops == 8
    assert wm.tokens_used == 0
    assert wm.budget_tokens is None
    assert wm.confidence == 0.0
    with pytest.raises(ValidationError):
        WM()  # type: ignore[call-arg]


def test_wm_facts_are_per_instance_and_copyable() -> None:
    a = WM(query="q")
    b = WM(query="q")
    a.facts.append("f")
    assert b.facts == []
    c = a.model_copy(update={"hops": 3, "budget_hops": None})
    assert c.hops == 3
    assert c.budget_hops is None
    assert c.facts == ["f"]


def test_final_answer_defaults() -> None:
    a = FinalAnswer(text="done")
    b = FinalAnswer(text="done")
    assert a.citations == []
    a.citations.append("x")
    assert b.citations == []
    assert a != b
    with pytest.raises(ValidationError):
        FinalAnswer()  # type: ignore[call-arg]
