"""Reading schema-4 blocks, once, to migrate them (stdlib only).

Schema 4 stored a trace's events as a pickle (protocol 5) of tuples in one of two
layouts, told apart by their length: 23 items (the runtime's fields) in one
pickle, or two pickles back to back (each item's first 14 fields, then the rest:
the 15-item layout's payload, or the runtime columns). Migration to schema 5
decodes each block here and re-encodes it as JSON (``_blocks.encode_block``);
nothing else reads pickle.

The unpickler is restricted: it resolves only the constructors of plain data, and
wraps each so that it takes plain data of a bounded size. A crafted block cannot
run code, and cannot make the reader allocate more than the block's own size
times a small factor (``bytearray(10**9)`` is refused, not executed).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterable
from itertools import compress, repeat
from operator import not_
from typing import Any, Final

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
    """The Rows of one schema-4 block, of bounded size (see :func:`_bounded`).

    Raises:
        BlockError: the bytes are not a schema-4 block (corrupt, truncated, or naming
            anything but plain data), or unfold into far more values than such a
            block holds (a crafted one: its JSON would fill memory and disk).
    """
    rows = _decode(data)
    _bounded(rows, _VALUES_PER_BYTE * len(data) + 10_000)
    return rows


def _decode(data: bytes) -> list[Row]:
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


# A block's values, nested containers counted, per byte of its pickle: a block holds
# a string once and refers to it by 2-5 bytes after, so the plain data of real blocks
# is a few values per byte; a crafted one can refer to one list many times, over and
# over, to unfold into more than memory holds when encoded.
_VALUES_PER_BYTE: Final = 64
_MAX_DEPTH: Final = 100
# The restricted unpickler builds these exact types only (no subclass can appear).
_ATOM_TYPES: Final = frozenset({str, int, float, bool, bytes, bytearray, complex, type(None)})


def _bounded(value: Any, budget: int) -> None:
    """Raise BlockError if ``value`` unfolds into more than ``budget`` values, or nests
    deeper than _MAX_DEPTH (a cycle does both): checked before encoding it as JSON,
    which writes each reference to a shared object out in full.

    Each value counts once: a container counts its items (a dict its keys and values)
    and goes on to walk those that are containers themselves. The counting and the
    picking of containers run in C: walking a 100,000-event block value by value in
    Python took ~2 s."""
    budget -= 1
    stack: list[tuple[Any, int]] = [] if type(value) in _ATOM_TYPES else [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth >= _MAX_DEPTH:
            raise BlockError(f"the block nests deeper than {_MAX_DEPTH} levels")
        if isinstance(item, dict):
            budget -= 2 * len(item)
            nested = [*_containers(item), *_containers(item.values())]
        elif isinstance(item, (list, tuple, set, frozenset)):
            budget -= len(item)
            nested = _containers(item)
        else:  # pragma: no cover - the v4 unpickler builds nothing else
            raise BlockError(f"the block holds a {type(item).__name__}")
        if budget < 0:
            raise BlockError("the block unfolds into too many values")
        stack.extend(zip(nested, repeat(depth + 1)))
    if budget < 0:
        raise BlockError("the block unfolds into too many values")


def _containers(items: Iterable[Any]) -> list[Any]:
    """The items of ``items`` that are no atom, in order (C iterators only)."""
    return list(compress(items, map(not_, map(_ATOM_TYPES.__contains__, map(type, items)))))
