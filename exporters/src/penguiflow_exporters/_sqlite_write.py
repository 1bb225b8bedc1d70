"""The SQLite store's write transaction, and the writer process that runs it (stdlib only).

:class:`BatchWriter` stores a batch of block items (see _batch.py) in one
transaction: trace and flow keys, the seq ranges that make writes idempotent, the
summaries, the blocks. :class:`~penguiflow_exporters.sqlite.SQLiteStateStore`
runs it in a child process by default (``writer="process"``, see _writer_proc.py
for why), or on its worker thread (``writer="thread"``).

The child's batches (``W`` frames) are a pickled ``(grouped, chunks)``. A batch of
StoredEvents (an import) comes as blocks (``grouped``): the parent groups it by
trace and encodes each block (see :meth:`BatchWriter.write_blocks`), so the child
stores them as they came, decoding them only to fold and deduplicate. The
runtime's events come as encoded slices of the batch, which the child groups and
encodes: the flow's process then does the least (see sqlite._prepare).
On the 2-core CI machine a thread writer put the chain benchmark at ~2.8x its time
without a store, the process writer at ~2x.
"""

from __future__ import annotations

import json
import pickle
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from operator import itemgetter
from typing import Any

from ._batch import (
    Ranges,
    block_items,
    block_rows,
    fold_rows,
    heads_and_rows,
    skipped_positions,
    split_fresh,
)
from ._serve import serve

__all__ = ["BatchWriter", "main"]

_INSERT_BLOCK = ("INSERT INTO blocks (trace_key, first, n, ts_lo, ts_hi, data) "
                 "VALUES (?, ?, ?, ?, ?, ?)")
_SUMMARY_COLUMNS = (
    "trace_id, flow_name, status, started_ts, ended_ts, node_count, error_count, "
    "remote_call_count, event_count, nodes, open_count, failed, cancelled")
# A batch's summaries are folded in Python (fold_rows) while its items are at hand: one
# row per trace reaches SQLite instead of a GROUP BY over the batch's events with two
# correlated sub-queries per trace (~4 us per event, measured). New traces are inserted
# whole, in order of their first event (their key is list_traces' tie-break); stored
# ones are merged, with TraceSummaryBuilder's semantics. The status rule (cancelled >
# failed > running > succeeded, penguiflow.state._trace_status) is stated in SQL.
_INSERT_TRACE = (
    f"INSERT INTO traces (key, {_SUMMARY_COLUMNS}) VALUES (?1, ?2, ?3, "
    "CASE WHEN ?13 THEN 'cancelled' WHEN ?12 THEN 'failed' WHEN ?11 > 0 THEN 'running' "
    "ELSE 'succeeded' END, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)")
_UPDATE_TRACE = (
    "UPDATE traces SET flow_name = ifnull(flow_name, ?1), "
    "status = CASE WHEN cancelled OR ?2 THEN 'cancelled' WHEN failed OR ?3 THEN 'failed' "
    "WHEN open_count + ?4 > 0 THEN 'running' ELSE 'succeeded' END, "
    "started_ts = min(started_ts, ?5), ended_ts = max(ended_ts, ?6), "
    "node_count = node_count + ?7, error_count = error_count + ?8, "
    "remote_call_count = remote_call_count + ?9, event_count = event_count + ?10, "
    "nodes = CASE WHEN ?11 = '[]' OR ?11 = nodes THEN nodes "
    "ELSE (SELECT json_group_array(value) FROM (SELECT value FROM json_each(nodes) "
    "UNION SELECT value FROM json_each(?11) ORDER BY 1)) END, "
    "open_count = open_count + ?4, failed = failed OR ?3, cancelled = cancelled OR ?2 "
    "WHERE key = ?12 AND trace_id = ?13")
# Keys cached per writer (keys never change once committed); cleared past this size.
_KEY_CACHE_MAX = 100_000

_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
_quote = json.encoder.encode_basestring
_flow_of, _ts_of = itemgetter(13), itemgetter(1)


def _names(nodes: Iterable[str]) -> str:
    """The sorted JSON array of node names (``traces.nodes``).

    Joined from C-quoted names: a json encoder call per trace cost ~0.8 us per event
    of a 10-event trace, measured.
    """
    return f"[{','.join(map(_quote, sorted(nodes)))}]" if nodes else "[]"


class _StaleKeys(Exception):
    """A cached trace key no longer names its trace (rolled back, retried uncached)."""


class BatchWriter:
    """Stores batches of block items in one SQLite file; one transaction per batch.

    Args:
        conn: an open connection (autocommit mode: ``isolation_level=None``) to a
            file at the current schema version.
        terminal / errors: the core's terminal and error kinds (see fold_rows).
    """

    def __init__(self, conn: sqlite3.Connection, *, terminal: frozenset[str],
                 errors: frozenset[str]) -> None:
        self.conn = conn
        self._terminal = terminal
        self._errors = errors
        # Committed trace and flow keys; see _keys.
        self._trace_keys: dict[Any, int] = {}
        self._flow_keys: dict[Any, int] = {}

    def write(self, items: list[tuple[Any, ...]]) -> list[int] | None:
        """Store the items not stored yet (see split_fresh), in order.

        Returns:
            None when every item was stored, else the positions (in ``items``) of
            those skipped because their ``(flow_id, seq)`` was stored already or
            came earlier in the batch.
        """
        groups: dict[Any, list[tuple[Any, ...]]] = {}
        folds = fold_rows(items, 0, 1, 2, 3, 10, 12, terminal=self._terminal,
                          errors=self._errors, groups=groups)
        return self._retrying(items, folds, block_rows(groups, folds))

    def write_blocks(self, blocks: list[bytes]) -> list[int] | None:
        """Store a batch the parent already encoded as blocks (the writer process's way).

        ``blocks`` are encode_block() outputs, each of one trace's consecutive
        events (at most BLOCK_EVENTS), in batch order. Only their heads are decoded
        (to fold and deduplicate; a StoredEvent's payload is most of a block's
        decoding), and they are stored as they came: the parent's encoding is not
        redone, unless some events were stored already. Returns what :meth:`write`
        does, positions counted over the blocks' items.
        """
        heads, rows = heads_and_rows(blocks)
        folds = fold_rows(heads, 0, 1, 2, 3, 10, 12, terminal=self._terminal,
                          errors=self._errors)

        def items() -> list[tuple[Any, ...]]:
            return [item for data in blocks for item in block_items(data)]

        return self._retrying(heads, folds, list(rows), items)

    def _retrying(self, items: list[tuple[Any, ...]], folds: dict[Any, list[Any]],
                  blocks: list[tuple[Any, ...]],
                  whole: Callable[[], list[tuple[Any, ...]]] | None = None
                  ) -> list[int] | None:
        while True:
            try:
                return self._store(items, folds, blocks, whole)
            except _StaleKeys:
                self._trace_keys.clear()
                self._flow_keys.clear()

    def _store(self, items: list[tuple[Any, ...]], folds: dict[Any, list[Any]],
               blocks: list[tuple[Any, ...]],
               whole: Callable[[], list[tuple[Any, ...]]] | None) -> list[int] | None:
        """Store a folded batch; ``items`` may be heads only (``item[:14]``), then
        ``whole()`` gives the whole items, which a re-delivery needs to re-encode."""
        conn = self.conn
        # The write lock up front: a batch reads the keys, ranges and counts it updates.
        conn.execute("BEGIN IMMEDIATE")
        try:
            trace_keys, new_traces, flow_keys, new_flows = self._keys(
                [block[0] for block in blocks], set(map(_flow_of, items)))
            fresh, ranges = split_fresh(items, self._stored_ranges(flow_keys, new_flows))
            skipped: list[int] | None = None
            if fresh is not items:  # re-delivered events: keep only the others
                skipped = skipped_positions(items, fresh)
                if whole is not None:
                    dropped = set(skipped)
                    fresh = [item for i, item in enumerate(whole()) if i not in dropped]
                groups: dict[Any, list[tuple[Any, ...]]] = {}
                folds = fold_rows(fresh, 0, 1, 2, 3, 10, 12, terminal=self._terminal,
                                  errors=self._errors, groups=groups)
                blocks = block_rows(groups, folds)
            for flow_id, flow_ranges in ranges.items():
                key = flow_keys[flow_id]
                conn.execute("DELETE FROM flow_seqs WHERE flow_key = ?", (key,))
                conn.executemany("INSERT INTO flow_seqs (flow_key, lo, hi) VALUES (?, ?, ?)",
                                 [(key, lo, hi) for lo, hi in flow_ranges])
            counts = self._event_counts(trace_keys, new_traces)
            inserts: list[tuple[Any, ...]] = []
            updates: list[tuple[Any, ...]] = []
            for trace_id, (flow_name, started, ended, starts, errors, remotes, count, opened,
                           failed, cancelled, nodes) in folds.items():
                if trace_id in new_traces:
                    inserts.append((trace_keys[trace_id], trace_id, flow_name, started, ended,
                                    starts, errors, remotes, count, _names(nodes), opened,
                                    int(failed), int(cancelled)))
                else:
                    updates.append((flow_name, int(cancelled), int(failed), opened, started,
                                    ended, starts, errors, remotes, count, _names(nodes),
                                    trace_keys[trace_id], trace_id))
            if inserts:
                conn.executemany(_INSERT_TRACE, inserts)
            if updates:
                conn.executemany(_UPDATE_TRACE, updates)
            conn.executemany(_INSERT_BLOCK, [
                (trace_keys.get(trace_id), counts.get(trace_id, 0) + offset, n, lo, hi, data)
                for trace_id, offset, n, lo, hi, data in blocks])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        # Committed: the new keys are now everyone's.
        for cache, added in ((self._trace_keys, new_traces), (self._flow_keys, new_flows)):
            if len(cache) + len(added) > _KEY_CACHE_MAX:
                cache.clear()
            cache.update(added)
        return skipped

    def _event_counts(self, trace_keys: Mapping[Any, int],
                      new_traces: Mapping[Any, int]) -> dict[Any, int]:
        """Events stored so far of the batch's known traces (their blocks' ``first``).

        Raises:
            _StaleKeys: a cached key no longer names its trace (deleted meanwhile by
                retention, see the guide, and its key possibly reused).
        """
        known = {key: trace_id for trace_id, key in trace_keys.items()
                 if trace_id not in new_traces}
        if not known:
            return {}
        counts: dict[Any, int] = {}
        for key, trace_id, count in self.conn.execute(
                "SELECT key, trace_id, event_count FROM traces "
                "WHERE key IN (SELECT value FROM json_each(?))", (_encode(list(known)),)):
            if known.get(key) == trace_id:
                counts[trace_id] = count
        if len(counts) != len(known):
            raise _StaleKeys
        return counts

    def _stored_ranges(self, flow_keys: Mapping[Any, int],
                       new_flows: Mapping[Any, int]) -> dict[Any, Ranges]:
        """The seq ranges stored of the batch's known flows, by flow id."""
        known = {key: flow_id for flow_id, key in flow_keys.items() if flow_id not in new_flows}
        if not known:
            return {}
        ranges: dict[Any, Ranges] = {}
        for key, lo, hi in self.conn.execute(
                "SELECT flow_key, lo, hi FROM flow_seqs "
                "WHERE flow_key IN (SELECT value FROM json_each(?)) ORDER BY flow_key, lo",
                (_encode(list(known)),)):
            ranges.setdefault(known[key], []).append((lo, hi))
        return ranges

    def _keys(self, trace_ids: Iterable[Any], flow_ids: Iterable[Any]
              ) -> tuple[dict[Any, int], dict[Any, int], dict[Any, int], dict[Any, int]]:
        """Trace and flow keys of a batch (under the write lock), and those new here.

        Keys already committed come from the cache or the file (another process may
        have stored the trace); new ones are numbered after the largest key, in order
        of first appearance. New flows are inserted here, new traces with their fold.
        """
        trace_keys, new_traces = self._resolve(dict.fromkeys(trace_ids), self._trace_keys,
                                               "traces", "trace_id")
        flow_keys, new_flows = self._resolve(dict.fromkeys(flow_ids), self._flow_keys,
                                             "flows", "flow_id")
        if new_flows:
            self.conn.executemany("INSERT INTO flows (key, flow_id) VALUES (?, ?)",
                                  [(key, flow_id) for flow_id, key in new_flows.items()])
        return trace_keys, new_traces, flow_keys, new_flows

    def _resolve(self, ids: dict[Any, None], cache: dict[Any, int], table: str,
                 column: str) -> tuple[dict[Any, int], dict[Any, int]]:
        ids.pop(None, None)
        keys = {i: cache[i] for i in ids if i in cache}
        if len(keys) == len(ids):
            return keys, {}
        missing = [i for i in ids if i not in keys]
        # Table and column names are the constants passed by _keys.
        keys.update(self.conn.execute(
            f"SELECT {column}, key FROM {table} WHERE {column} IN "
            f"(SELECT value FROM json_each(?))", (_encode(missing),)))
        cache.update((i, keys[i]) for i in missing if i in keys)
        (last,) = self.conn.execute(f"SELECT ifnull(max(key), 0) FROM {table}").fetchone()
        new = {i: last + n for n, i in enumerate((i for i in missing if i not in keys), 1)}
        keys.update(new)
        return keys, new


class _Handler:
    """The SQLite writer process's handler (see _serve.serve)."""

    def __init__(self) -> None:
        self._writer: BatchWriter | None = None

    def init(self, options: dict[str, Any]) -> None:
        conn = sqlite3.connect(options["path"], isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(options['busy_timeout_ms'])}")
        conn.execute("PRAGMA synchronous = NORMAL")
        self._writer = BatchWriter(conn, terminal=options["terminal"], errors=options["errors"])

    def write(self, payload: bytes) -> list[int] | None:
        assert self._writer is not None
        grouped, chunks = pickle.loads(payload)
        if grouped:
            return self._writer.write_blocks(chunks)
        return self._writer.write([item for chunk in chunks for item in block_items(chunk)])


def main() -> None:
    """The child's entry point (``python -m penguiflow_exporters._sqlite_write``)."""
    serve(_Handler())


if __name__ == "__main__":
    main()
