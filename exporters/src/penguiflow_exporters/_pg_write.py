"""The Postgres store's write transaction, and the writer process that runs it.

Imports only the standard library, asyncpg, _batch and _writer_proc (nothing
from penguiflow), so that a writer process starts in ~0.1 s.

:class:`BatchWriter` stores one batch in one transaction (see postgres.py's
docstring): the write lock, the batch's flows' stored seq ranges (a re-delivered
event is dropped, and the rest folded and encoded again), the summary upsert
(which RETURNs each trace's key and new event count, so a block's ``first`` is
the count before it), the new ranges, one binary COPY of the blocks, NOTIFY.
:class:`~penguiflow_exporters.postgres.PostgresStateStore` runs it in a child
process by default (``writer="process"``: see _writer_proc.py for why), or on
the flow's event loop (``writer="loop"``); both hand it a :class:`Batch`.

The child's batches (``W`` frames) are a pickled ``(grouped, chunks)``, as the
SQLite writer's (see _sqlite_write.py). A batch of the runtime's EVENT_FIELDS
tuples alone (a flow's events) comes as encoded slices of the batch
(``grouped`` False), which the child groups, folds and encodes
(:meth:`BatchWriter.from_items`): the flow's process then only pickles them
(~0.5 us per event instead of ~1.2 to group and encode, measured for SQLite). A
batch holding StoredEvents (an import, a replay) comes as blocks (``grouped``:
encode_block outputs, a trace's events at a time, in order): the child decodes
only their heads, to fold and deduplicate, and stores the bytes it got
(:meth:`BatchWriter.from_blocks`). Its reply is None, or the positions of the
events skipped because they were stored already: in the batch's order, or
(``grouped``) in the blocks'. No chunks at all (the parent's warm-up) only
connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

from ._batch import (
    BLOCK_EVENTS,
    Ranges,
    block_items,
    block_rows,
    fold_rows,
    heads_and_rows,
    skipped_positions,
    split_fresh,
)
from ._serve import serve

__all__ = ["ANY_TRACE", "BLOCK_COLUMNS", "Batch", "BatchWriter", "WRITE_LOCK", "main",
           "notify_payloads"]

#: First key of the two-key advisory lock writers serialise on ("PFwr"); the
#: second is derived from the schema name.
WRITE_LOCK: Final = 0x50467772
#: The ``blocks`` columns a batch COPYs.
BLOCK_COLUMNS: Final = ("trace_key", "first", "n", "ts_lo", "ts_hi", "data")
#: A notification meaning "something changed, whatever the trace" (for trace ids
#: too long to list).
ANY_TRACE: Final = "*"
# NOTIFY payloads must be shorter than 8000 bytes.
_NOTIFY_MAX_BYTES: Final = 7900
# Joins a trace's node names for the summary upsert (unit separator).
_NODE_SEP: Final = "\x1f"
_NODE_SEP_SQL: Final = "E'\\x1f'"

_encode_json = json.JSONEncoder(allow_nan=False, separators=(",", ":"), default=str).encode
_quote = json.encoder.encode_basestring_ascii
_flow_of, _ts_of = itemgetter(13), itemgetter(1)

Items = Sequence[tuple[Any, ...]]


class Batch:
    """A batch ready for :meth:`BatchWriter.write`, folded and encoded as if none of
    it were stored yet (usually true; the writer checks under its lock).

    ``own``: per flow id, the ranges of the batch's seqs (split_fresh against
    nothing), or None when the batch repeats an event (then ``folds`` and
    ``blocks`` are unused). ``folds``: fold_rows of the batch. ``blocks``:
    ``(trace_id, offset, n, ts_lo, ts_hi, data)``, ``offset`` counted within the
    trace's share of the batch. ``heads()``: the batch's items, at least their
    first fourteen fields, in the order positions are reported; ``whole()``: the
    same items whole (to encode them again). Both are only called on a re-delivery.
    """

    __slots__ = ("blocks", "folds", "heads", "own", "whole")

    def __init__(self, own: dict[Any, Ranges] | None, folds: dict[Any, list[Any]],
                 blocks: list[tuple[Any, ...]], heads: Callable[[], Items],
                 whole: Callable[[], Items] | None = None) -> None:
        self.own, self.folds, self.blocks = own, folds, blocks
        self.heads = heads
        self.whole = whole or heads


class BatchWriter:
    """Writes batches into one schema; the SQL is built once.

    Args:
        schema: the schema's name (validated by the store).
        lock_key: the second key of the write lock (the store derives it from the name).
        channel: the NOTIFY channel.
        terminal / errors: the core's kinds (see fold_rows).
        block_events: most events per block when a batch is encoded again.
    """

    def __init__(self, schema: str, *, lock_key: int, channel: str,
                 terminal: frozenset[str], errors: frozenset[str],
                 block_events: int = BLOCK_EVENTS) -> None:
        self.schema = schema
        self.lock_key = lock_key
        self.channel = channel
        self.terminal = terminal
        self.errors = errors
        self.block_events = block_events
        s = f'"{schema}"'
        self._sql_ranges = (
            f"SELECT flow_id, lo, hi FROM {s}.flow_seqs WHERE flow_id = ANY($1::text[]) "
            f"ORDER BY flow_id, lo")
        # Replaces touched flows' ranges: deletes the rows whose lo is gone (merged
        # into an earlier range) and upserts the new or grown ones; the two sets of
        # keys are disjoint, so one statement does both.
        self._sql_save_ranges = (
            f"WITH gone AS (DELETE FROM {s}.flow_seqs f USING unnest($1::text[], $2::int8[]) "
            f"AS d(flow_id, lo) WHERE f.flow_id = d.flow_id AND f.lo = d.lo) "
            f"INSERT INTO {s}.flow_seqs (flow_id, lo, hi) "
            f"SELECT * FROM unnest($3::text[], $4::int8[], $5::int8[]) "
            f"ON CONFLICT (flow_id, lo) DO UPDATE SET hi = EXCLUDED.hi")
        # Merges a batch's per-trace folds (fold_rows, one array element per trace, in
        # order of first event, so new traces' first_seen follows arrival order) into
        # the summaries with TraceSummaryBuilder's semantics, and returns every
        # touched trace's key and event count (so the count before this batch is the
        # index of its block's first event). `nodes` arrive as names joined by _NODE_SEP
        # (string_to_array, ~3x cheaper than a JSON sub-query per trace, measured), or
        # as JSON arrays (_sql_fold_json) when a name contains that character.
        self._sql_fold = f"""
            INSERT INTO {s}.traces AS t (
                trace_id, flow_name, started_ts, ended_ts, node_count, error_count,
                remote_call_count, event_count, open_count, cancelled, failed, nodes)
            SELECT u.trace_id, u.flow_name, u.started_ts, u.ended_ts, u.node_count,
                   u.error_count, u.remote_call_count, u.event_count, u.open_count,
                   u.cancelled, u.failed,
                   string_to_array(u.nodes, {_NODE_SEP_SQL})
            FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[], $5::int4[],
                        $6::int4[], $7::int4[], $8::int8[], $9::int4[], $10::bool[],
                        $11::bool[], $12::text[]) WITH ORDINALITY
                 AS u(trace_id, flow_name, started_ts, ended_ts, node_count, error_count,
                      remote_call_count, event_count, open_count, cancelled, failed, nodes, n)
            ORDER BY u.n
            ON CONFLICT (trace_id) DO UPDATE SET
                flow_name = COALESCE(t.flow_name, EXCLUDED.flow_name),
                started_ts = LEAST(t.started_ts, EXCLUDED.started_ts),
                ended_ts = GREATEST(t.ended_ts, EXCLUDED.ended_ts),
                node_count = t.node_count + EXCLUDED.node_count,
                error_count = t.error_count + EXCLUDED.error_count,
                remote_call_count = t.remote_call_count + EXCLUDED.remote_call_count,
                event_count = t.event_count + EXCLUDED.event_count,
                open_count = t.open_count + EXCLUDED.open_count,
                cancelled = t.cancelled OR EXCLUDED.cancelled,
                failed = t.failed OR EXCLUDED.failed,
                nodes = CASE WHEN EXCLUDED.nodes <@ t.nodes THEN t.nodes
                        ELSE ARRAY(SELECT DISTINCT n FROM unnest(t.nodes || EXCLUDED.nodes) AS n)
                        END
            RETURNING trace_id, first_seen, event_count"""
        self._sql_fold_json = self._sql_fold.replace(
            f"string_to_array(u.nodes, {_NODE_SEP_SQL})",
            "ARRAY(SELECT json_array_elements_text(u.nodes::json))")

    def fold(self, items: Iterable[tuple[Any, ...]],
             groups: dict[Any, list[tuple[Any, ...]]] | None = None) -> dict[Any, list[Any]]:
        """fold_rows of block items (or heads), with this writer's kinds."""
        return fold_rows(items, 0, 1, 2, 3, 10, 12, terminal=self.terminal,
                         errors=self.errors, groups=groups)

    def from_items(self, items: list[tuple[Any, ...]]) -> Batch:
        """The :class:`Batch` of block items, folded and encoded as if none of them
        were stored yet (the writer process's way for the runtime's tuples)."""
        fresh, own = split_fresh(items, {})  # against nothing: repeats in the batch only
        if fresh is not items:
            return Batch(None, {}, [], lambda: items)  # write() sorts it out
        groups: dict[Any, list[tuple[Any, ...]]] = {}
        folds = self.fold(items, groups)
        return Batch(own, folds, block_rows(groups, folds, self.block_events), lambda: items)

    def from_blocks(self, blocks: list[bytes]) -> Batch:
        """The :class:`Batch` of blocks a parent encoded (the writer process's way).

        Only the blocks' heads are decoded (to fold and deduplicate); the bytes are
        stored as they came unless some events were stored already.
        """
        heads, rows = heads_and_rows(blocks)
        fresh, own = split_fresh(heads, {})
        folds = self.fold(heads) if fresh is heads else {}

        def whole() -> list[tuple[Any, ...]]:
            return [item for data in blocks for item in block_items(data)]

        return Batch(own if fresh is heads else None, folds, rows, lambda: heads, whole)

    async def write(self, conn: Any, batch: Batch) -> list[int] | None:
        """Store ``batch`` in one transaction on ``conn``.

        Events whose ``(flow_id, seq)`` is stored already (or came earlier in the
        batch) are skipped; events without a flow id are always stored.

        Returns:
            None when every event was stored, else the positions (in
            ``batch.heads()``) of those skipped.
        """
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", WRITE_LOCK, self.lock_key)
            own = batch.own
            heads = None if own is not None else batch.heads()
            flows = set(own) if own is not None else set(map(_flow_of, heads or ()))
            # Under the write lock: no other writer can store these seqs meanwhile.
            stored = await self._stored_ranges(conn, flows)
            ranges = None if own is None else _joined(stored, own)
            folds, blocks, skipped = batch.folds, batch.blocks, None
            if ranges is None:  # re-delivered events: drop them, fold and encode again
                if heads is None:
                    heads = batch.heads()
                fresh, ranges = split_fresh(heads, stored)
                skipped = skipped_positions(heads, fresh)
                if len(skipped) == len(heads):
                    return skipped
                if batch.whole is not batch.heads:
                    dropped = set(skipped)
                    fresh = [item for i, item in enumerate(batch.whole()) if i not in dropped]
                groups: dict[Any, list[tuple[Any, ...]]] = {}
                folds = self.fold(fresh, groups)
                blocks = block_rows(groups, folds, self.block_events)
                del heads, fresh, groups
            counts = await self._upsert_traces(conn, folds)
            await self._save_ranges(conn, stored, ranges)
            # A trace's blocks: `first` counts from the trace's events before this
            # batch (its new count less this batch's share, fold[6]).
            await conn.copy_records_to_table(
                "blocks", schema_name=self.schema, columns=BLOCK_COLUMNS,
                records=[(None, 0, n, lo, hi, data) if trace_id is None
                         else (counts[trace_id][0],
                               counts[trace_id][1] - folds[trace_id][6] + offset,
                               n, lo, hi, data)
                         for trace_id, offset, n, lo, hi, data in blocks])
            await conn.execute("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
                               self.channel, notify_payloads(
                                   dict.fromkeys(block[0] for block in blocks)))
        return skipped

    async def _stored_ranges(self, conn: Any, flows: set[Any]) -> dict[Any, Ranges]:
        """The stored seq ranges of ``flows`` (see split_fresh); None is ignored."""
        flows.discard(None)
        if not flows:
            return {}
        stored: dict[Any, Ranges] = {}
        for flow_id, lo, hi in await conn.fetch(self._sql_ranges, list(flows)):
            stored.setdefault(flow_id, []).append((lo, hi))
        return stored

    async def _save_ranges(self, conn: Any, stored: Mapping[Any, Ranges],
                           ranges: Mapping[Any, Ranges]) -> None:
        """Replace the rows of the flows in ``ranges`` (read as ``stored``) by ``ranges``."""
        gone: tuple[list[Any], list[int]] = ([], [])
        put: tuple[list[Any], list[int], list[int]] = ([], [], [])
        for flow_id, new in ranges.items():
            old = stored.get(flow_id) or []
            if new == old:
                continue
            kept = {lo for lo, _ in new}
            for lo, _ in old:
                if lo not in kept:
                    gone[0].append(flow_id)
                    gone[1].append(lo)
            unchanged = set(old)
            for lo, hi in new:
                if (lo, hi) not in unchanged:
                    put[0].append(flow_id)
                    put[1].append(lo)
                    put[2].append(hi)
        if gone[0] or put[0]:
            await conn.execute(self._sql_save_ranges, *gone, *put)

    async def _upsert_traces(self, conn: Any, folds: dict[Any, list[Any]]
                             ) -> dict[Any, tuple[int, int]]:
        """Merge ``folds`` (see fold_rows) into ``traces``; each trace's key and new
        event count."""
        if not folds:
            return {}
        columns = [list(column) for column in zip(*folds.values(), strict=True)]
        if any(_NODE_SEP in name for name in set().union(*columns[10])):
            sql, nodes = self._sql_fold_json, [_encode_json(sorted(n)) for n in columns[10]]
        else:
            sql, nodes = self._sql_fold, [_NODE_SEP.join(sorted(n)) for n in columns[10]]
        # fold_rows' order is (..., open, failed, cancelled, nodes); the SQL's
        # (..., open_count, cancelled, failed, nodes).
        rows = await conn.fetch(sql, list(folds), *columns[:8], columns[9], columns[8], nodes)
        return {row[0]: (row[1], row[2]) for row in rows}


def _joined(stored: Mapping[Any, Ranges], own: Mapping[Any, Ranges]
            ) -> dict[Any, Ranges] | None:
    """Each flow's ranges with ``own``'s added (adjacent ones joined), or None if any
    of ``own``'s seqs is stored already: split_fresh's answer when nothing is dropped.
    """
    joined: dict[Any, Ranges] = {}
    for flow_id, new in own.items():
        merged: Ranges = []
        for lo, hi in sorted([*stored.get(flow_id, ()), *new]):
            if merged and lo <= merged[-1][1]:
                return None  # sorted by lo, so any overlap shows against the last one
            if merged and lo == merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        joined[flow_id] = merged
    return joined


def notify_payloads(trace_ids: Iterable[str | None]) -> list[str]:
    """JSON arrays of the touched trace ids (null for none), each < 8000 bytes."""
    payloads: list[str] = []
    items: list[str] = []
    size = 2
    for trace_id in dict.fromkeys(trace_ids):
        # ASCII only, so len() counts bytes; the C quoting is ~5x json.dumps' speed.
        item = _quote(trace_id) if type(trace_id) is str else json.dumps(trace_id)
        if len(item) + 2 > _NOTIFY_MAX_BYTES:
            payloads.append(ANY_TRACE)
            continue
        if size + len(item) + 1 > _NOTIFY_MAX_BYTES:
            payloads.append(f"[{','.join(items)}]")
            items, size = [], 2
        items.append(item)
        size += len(item) + 1
    if items:
        payloads.append(f"[{','.join(items)}]")
    return payloads


# -- the writer process -------------------------------------------------------------


class _Handler:
    """The Postgres writer process's handler (see _serve.serve).

    Its own event loop and connection, connected on the first batch (and again
    after the connection is lost): a server that is down fails batches, never
    ``init``.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._conn: Any = None
        self._options: dict[str, Any] = {}
        self._writer: BatchWriter | None = None

    def init(self, options: dict[str, Any]) -> None:
        self._options = options
        self._writer = BatchWriter(
            options["schema"], lock_key=options["lock_key"], channel=options["channel"],
            terminal=options["terminal"], errors=options["errors"],
            block_events=options["block_events"])

    def write(self, payload: bytes) -> list[int] | None:
        writer = self._writer
        assert writer is not None
        grouped, chunks = pickle.loads(payload)
        batch: Batch | None = None
        if chunks and grouped:
            batch = writer.from_blocks(chunks)
        elif chunks:
            batch = writer.from_items([item for chunk in chunks for item in block_items(chunk)])
        return self._loop.run_until_complete(self._write(batch))

    async def _write(self, batch: Batch | None) -> list[int] | None:
        """Write ``batch``; None (an empty batch: the parent's warm-up) only connects."""
        assert self._writer is not None
        conn = self._conn
        if conn is None or conn.is_closed():
            self._conn = None
            options = self._options
            conn = self._conn = await asyncpg.connect(
                options["dsn"], timeout=options["connect_timeout_s"],
                server_settings={"application_name": "penguiflow-writer"})
        return None if batch is None else await self._writer.write(conn, batch)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                self._loop.run_until_complete(conn.close(timeout=5))
            except Exception:
                conn.terminate()
        with contextlib.suppress(Exception):
            self._loop.close()


def main() -> None:
    """The child's entry point (``python -m penguiflow_exporters._pg_write``)."""
    handler = _Handler()
    try:
        serve(handler)
    finally:
        handler.close()


if __name__ == "__main__":
    main()
