"""What crosses a process boundary: items as JSON, never pickle.

A delivering message bus (``penguiflow_distributed.RedisMessageBus``) moves the
items a flow puts on its floes between processes. This module turns one item
into bytes and back, with nothing in the bytes able to choose code to run: a
decoded value is JSON data, or an instance of a model the *receiving* process
already knows by name (:class:`WireTypes`), built by pydantic validation.

What an item becomes:

* a :class:`~penguiflow.types.Message`: its fields as JSON, its payload as a
  tagged value (below);
* a :class:`~penguiflow.errors.FlowError`: its ``to_payload()`` (the original
  exception object does not cross; ``exception_type`` names it);
* anything else: a tagged value.

A tagged value is ``{"t": tag, "v": json}``: ``tag`` is ``"module:QualName"`` for a
pydantic model instance, else null. On the way in, a tag the receiver knows gives
the model back; an unknown tag leaves the plain JSON data (a node that validates
with a registry turns it into its input model then). A plain value arrives as its
JSON form, which JSON's few types make lossy (``docs/guides/distributed.md`` has
the table): tuples and sets as lists, non-str dict keys as str, bytes, datetimes,
Decimals and UUIDs as str, an Enum as its value, containers of models as
containers of dicts. NaN and infinities are kept (written as ``NaN`` /
``Infinity``). A node that needs the types back takes a model.

Encoding fails with :class:`~penguiflow.errors.WireEncodingError` (a
``TypeError``) naming the edge and the type; decoding fails with
:class:`~penguiflow.errors.WireDecodingError` (a ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pydantic_core
from pydantic import BaseModel, ValidationError

from .errors import FlowError, WireDecodingError, WireEncodingError, safe_repr
from .types import WM, FinalAnswer, Headers, Message, PlanStep, StreamChunk, Thought

__all__ = ["WireTypes", "dumps_item", "loads_item", "type_tag"]

#: The models every receiver knows: penguiflow's own.
_BUILTIN: tuple[type[BaseModel], ...] = (
    WM, FinalAnswer, StreamChunk, PlanStep, Thought, Headers, Message)


def type_tag(cls: type) -> str:
    """The name a model crosses the wire under: ``"module:QualName"``."""
    return f"{cls.__module__}:{cls.__qualname__}"


class WireTypes:
    """The models a receiving process rebuilds by tag (penguiflow's own, plus ``models``).

    A flow bound to a bus adds its registry's models; a bus adds the ones its
    user passes (``RedisMessageBus(..., types=[...])``).
    """

    __slots__ = ("_by_tag",)

    def __init__(self, models: Iterable[type[BaseModel]] = ()) -> None:
        self._by_tag: dict[str, type[BaseModel]] = {}
        self.add(_BUILTIN)
        self.add(models)

    def add(self, models: Iterable[type[BaseModel]]) -> None:
        """Know ``models`` by their tags too.

        Raises:
            WireEncodingError: (a ``TypeError``) one is not a pydantic model class.
        """
        for model in models:
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise WireEncodingError(
                    f"wire types must be pydantic model classes; got {safe_repr(model)}")
            self._by_tag[type_tag(model)] = model

    def get(self, tag: str) -> type[BaseModel] | None:
        """The model known under ``tag``, or None."""
        return self._by_tag.get(tag)

    def __contains__(self, model: object) -> bool:
        return isinstance(model, type) and self._by_tag.get(type_tag(model)) is model


def _tagged(value: Any) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        return {"t": type_tag(type(value)), "v": value.model_dump(mode="json")}
    return {"t": None, "v": value}


def dumps_item(item: Any, *, edge: str = "?") -> bytes:
    """``item`` as JSON bytes (see the module docstring).

    Raises:
        WireEncodingError: (a ``TypeError``) ``item`` (or its payload) has no JSON
            form; the message names ``edge`` and the type.
    """
    try:
        if type(item) is Message or isinstance(item, Message):
            fields = item.model_dump(mode="json", exclude={"payload"})
            doc: dict[str, Any] = {"m": fields, "p": _tagged(item.payload)}
        elif isinstance(item, FlowError):
            doc = {"e": item.to_payload()}
        else:
            doc = _tagged(item)
        # NaN and infinities as JSON5-style constants: kept, not silently nulled.
        return pydantic_core.to_json(doc, inf_nan_mode="constants")
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
        kind, where = _culprit(item)
        raise WireEncodingError(
            f"cannot send a {kind} on edge {edge!r}{where}: it has no JSON form "
            f"({safe_repr(exc)}); send a pydantic model or JSON data (dict, list, str, "
            f"number, bool, None) across processes") from exc


def _culprit(item: Any) -> tuple[str, str]:
    """The type JSON could not write, and where in ``item`` it is: a Message's
    payload when that alone fails, else the Message field that does (its meta)."""
    if not isinstance(item, Message):
        return type(item).__name__, ""
    try:
        pydantic_core.to_json(_tagged(item.payload), inf_nan_mode="constants")
    except Exception:
        return type(item.payload).__name__, " (the Message's payload)"
    for name in type(item).model_fields:
        if name == "payload":
            continue
        try:
            pydantic_core.to_json(item.model_dump(mode="json", include={name}))
        except Exception:
            return _refused_types(getattr(item, name)), f" (in the Message's {name!r})"
    return type(item.payload).__name__, ""


def _refused_types(value: Any) -> str:
    """The type names of the values in ``value`` (a dict: meta) JSON refuses."""
    values = value.values() if isinstance(value, dict) else [value]
    bad: dict[str, None] = {}
    for v in values:
        try:
            pydantic_core.to_json(v)
        except Exception:
            bad[type(v).__name__] = None
    return ", ".join(bad) or type(value).__name__


def _text_or_none(e: dict[str, Any], key: str) -> str | None:
    value = e.get(key)
    if value is not None and not isinstance(value, str):
        raise WireDecodingError(f"a FlowError's {key!r} must be a string or null, "
                                f"not {type(value).__name__}")
    return value


def _value(doc: Any, types: WireTypes) -> Any:
    if not isinstance(doc, dict) or "v" not in doc:
        raise WireDecodingError(f"not a tagged value: {safe_repr(doc)[:200]}")
    tag, value = doc.get("t"), doc["v"]
    if tag is None:
        return value
    model = types.get(tag) if isinstance(tag, str) else None
    if model is None:
        return value  # unknown here: the data, for a registry to validate
    return model.model_validate(value)


def loads_item(data: bytes | str, types: WireTypes) -> Any:
    """The item :func:`dumps_item` encoded, rebuilt with ``types``.

    Raises:
        WireDecodingError: (a ``ValueError``) ``data`` is not such an encoding,
            or a tagged model refuses its data.
    """
    try:
        doc = pydantic_core.from_json(data)
        if not isinstance(doc, dict):
            raise WireDecodingError(f"not an encoded item: {safe_repr(doc)[:200]}")
        if "m" in doc:
            fields = doc["m"]
            if not isinstance(fields, dict):
                raise WireDecodingError("a Message's fields must be an object")
            return Message.model_validate({**fields, "payload": _value(doc.get("p"), types)})
        if "e" in doc:
            e = doc["e"]
            if not isinstance(e, dict):
                raise WireDecodingError("a FlowError's fields must be an object")
            # From the broker, so untrusted: a trace id that is not a str would
            # break every table keyed by it (the reader that took it, with it).
            code, message = e["code"], e["message"]
            if not isinstance(code, str) or not isinstance(message, str):
                raise WireDecodingError("a FlowError's 'code' and 'message' must be strings")
            metadata = e.get("metadata")
            if metadata is not None and not isinstance(metadata, dict):
                raise WireDecodingError("a FlowError's 'metadata' must be an object or null")
            error = FlowError(trace_id=_text_or_none(e, "trace_id"),
                              node_name=_text_or_none(e, "node_name"),
                              node_id=_text_or_none(e, "node_id"), code=code, message=message,
                              metadata=metadata)
            error.exception_type = _text_or_none(e, "exception_type")
            return error
        return _value(doc, types)
    except WireDecodingError:
        raise
    except (ValueError, ValidationError, KeyError, TypeError, AttributeError) as exc:
        raise WireDecodingError(f"cannot decode an item: {safe_repr(exc)[:500]}") from exc
