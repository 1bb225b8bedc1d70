"""Reading schema-4 blocks, once, to migrate them (stdlib only).

Schema 4 stored a trace's events as a pickle (protocol 5) of tuples in one of two
layouts, told apart by their length: 23 items (the runtime's fields) in one
pickle, or two pickles back to back (each item's first 14 fields, then the rest:
the 15-item layout's payload, or the runtime columns). Migration to schema 5
decodes each block here and re-encodes it as JSON (``_records.encode_block``);
nothing else reads pickle.

The unpickler is restricted: it resolves only the constructors of plain data, and
wraps each so that it takes plain data of a bounded size. A crafted block cannot
run code, and cannot make the reader allocate more than the block's own size
times a small factor (``bytearray(10**9)`` is refused, not executed).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any

from ._records import BlockError, Row

__all__ = ["decode_v4_block"]

def _guarded(ctor: Callable[..., Any]) -> Callable[..., Any]:
    def build(*args: Any) -> Any:
        # bytes(n) / bytearray(n) allocate n bytes: the 1 GB a crafted block asked for.
        if ctor in (bytes, bytearray) and any(type(a) is not bytes for a in args):
            raise pickle.UnpicklingError(f"a block calls {ctor.__name__} with a "
                                         "non-bytes argument")
        if len(args) > 2:
            raise pickle.UnpicklingError(f"a block calls {ctor.__name__} with {len(args)} "
                                         "arguments")
        return ctor(*args)

    return build


_SAFE: dict[tuple[str, str], Callable[..., Any]] = {
    ("builtins", ctor.__name__): _guarded(ctor)
    for ctor in (dict, list, tuple, set, frozenset, str, int, float, bool, bytes, bytearray,
                 complex)
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"a block names {module}.{name}; schema-4 blocks held plain data only"
            ) from None


def decode_v4_block(data: bytes) -> list[Row]:
    """The Rows of one schema-4 block.

    Raises:
        BlockError: the bytes are not a schema-4 block (corrupt, truncated, or naming
            anything but plain data).
    """
    try:
        unpickler = _Unpickler(io.BytesIO(bytes(data)))
        heads = unpickler.load()
        if type(heads) is not list:
            raise BlockError("corrupt schema-4 block (not a list)")
        if heads and all(type(h) is tuple and len(h) == 23 for h in heads):
            return [tuple.__new__(Row, (*h, None)) for h in heads]
        tails = unpickler.load()
    except BlockError:
        raise
    except Exception as exc:
        raise BlockError(f"corrupt schema-4 block ({type(exc).__name__}: {exc})") from exc
    if type(tails) is not list or len(heads) != len(tails):
        raise BlockError("corrupt schema-4 block (heads and tails differ)")
    rows: list[Row] = []
    for head, tail in zip(heads, tails, strict=True):
        if type(head) is not tuple or type(tail) is not tuple or len(head) != 14:
            raise BlockError("corrupt schema-4 block (an item of neither layout)")
        if len(tail) == 1:  # a StoredEvent: its payload
            rows.append(tuple.__new__(Row, (*head, *(None,) * 9, tail[0])))
        elif len(tail) == 9:  # the runtime columns and extra
            rows.append(tuple.__new__(Row, (*head, *tail, None)))
        else:
            raise BlockError("corrupt schema-4 block (an item of neither layout)")
    return rows
