"""The SQLite store's write transaction, and the writer process that runs it (stdlib only).

:class:`BatchWriter` stores a batch of block items (see _batch.py) in one
transaction: trace and flow keys, the seq ranges that make writes idempotent, the
summaries, the blocks. :class:`~penguiflow_exporters.sqlite.SQLiteStateStore`
runs it in a child process by default (``writer="process"``), or on its worker
thread (``writer="thread"``).

Why a process. Python holds one lock (the GIL) per process. Folding, encoding and
binding a batch hold it ~2 us per event, and SQLite gives it up at every row it
writes and must then win it back from the flow's event loop, waiting out the
switch interval (5 ms) each time the loop is busy. On the 2-core CI machine a
store on a thread put the chain benchmark at ~2.8x its time without a store; the
flow's process now only pickles each batch (~0.6 us per runtime event) into a
pipe. This module and _batch.py import nothing from penguiflow, so the child
starts in ~0.1 s instead of the ~0.8 s the core takes to import.

Protocol (``python -m penguiflow_exporters._sqlite_write``, stdin/stdout are
the pipe; the child's prints go to stderr): frames of one op byte, an 8-byte
big-endian length, and a pickled payload.

* ``I`` (init): ``{"path", "terminal", "errors", "busy_timeout_ms"}``; the parent
  has created and migrated the file.
* ``W`` (write): a pickled list of blocks (encode_block outputs, see
  :meth:`BatchWriter.write_blocks`): the parent groups and encodes, block by block
  (so that its event loop is never held long), and the child stores the blocks
  as they are, decoding them only to fold and deduplicate.
* ``Q`` (quit).

Replies: ``K`` with the result (``None``, or for a write the positions of the
items not stored because already stored, when any), or ``E`` with
``(sqlite_errorcode or None, message)``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping
from operator import itemgetter
from typing import Any, BinaryIO

from ._batch import Ranges, block_rows, fold_rows, split_fresh

__all__ = ["BatchWriter", "WriterError", "WriterProcess", "main", "read_frame", "write_frame"]

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
        events (at most BLOCK_EVENTS), in batch order. They are decoded to fold and
        deduplicate, but stored as they came: the parent's encoding is not redone.
        Returns what :meth:`write` does, positions counted over the blocks' items.
        """
        items: list[tuple[Any, ...]] = []
        rows: list[tuple[Any, ...]] = []
        offsets: dict[Any, int] = {}
        for data in blocks:
            block = pickle.loads(data)  # written by our parent, from plain data
            trace_id = block[0][0]
            offset = offsets.get(trace_id, 0)
            offsets[trace_id] = offset + len(block)
            stamps = list(map(_ts_of, block))
            rows.append((trace_id, offset, len(block), min(stamps), max(stamps), data))
            items += block
        folds = fold_rows(items, 0, 1, 2, 3, 10, 12, terminal=self._terminal,
                          errors=self._errors)
        return self._retrying(items, folds, rows)

    def _retrying(self, items: list[tuple[Any, ...]], folds: dict[Any, list[Any]],
                  blocks: list[tuple[Any, ...]]) -> list[int] | None:
        while True:
            try:
                return self._store(items, folds, blocks)
            except _StaleKeys:
                self._trace_keys.clear()
                self._flow_keys.clear()

    def _store(self, items: list[tuple[Any, ...]], folds: dict[Any, list[Any]],
               blocks: list[tuple[Any, ...]]) -> list[int] | None:
        conn = self.conn
        # The write lock up front: a batch reads the keys, ranges and counts it updates.
        conn.execute("BEGIN IMMEDIATE")
        try:
            trace_keys, new_traces, flow_keys, new_flows = self._keys(
                [block[0] for block in blocks], set(map(_flow_of, items)))
            fresh, ranges = split_fresh(items, self._stored_ranges(flow_keys, new_flows))
            skipped: list[int] | None = None
            if fresh is not items:  # re-delivered events: keep only the others
                kept = set(map(id, fresh))
                skipped = [i for i, item in enumerate(items) if id(item) not in kept]
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


# -- the writer process ----------------------------------------------------------------

_HEADER = struct.Struct(">cQ")


def write_frame(out: BinaryIO, op: bytes, payload: bytes) -> None:
    """Write one frame (see the module docstring) and flush it."""
    out.write(_HEADER.pack(op, len(payload)))
    out.write(payload)
    out.flush()


def read_frame(inp: BinaryIO) -> tuple[bytes, bytes]:
    """Read one frame; raises EOFError when the other end is gone."""
    header = inp.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the other end of the writer pipe closed")
    op, size = _HEADER.unpack(header)
    payload = inp.read(size)
    if len(payload) < size:
        raise EOFError("the other end of the writer pipe closed mid-frame")
    return op, payload


def _serve(inp: BinaryIO, out: BinaryIO) -> None:
    writer: BatchWriter | None = None
    while True:
        try:
            op, payload = read_frame(inp)
        except EOFError:
            return  # the store (or its process) is gone
        try:
            if op == b"Q":
                write_frame(out, b"K", pickle.dumps(None))
                return
            if op == b"I":
                init = pickle.loads(payload)
                conn = sqlite3.connect(init["path"], isolation_level=None)
                conn.execute(f"PRAGMA busy_timeout = {int(init['busy_timeout_ms'])}")
                conn.execute("PRAGMA synchronous = NORMAL")
                writer = BatchWriter(conn, terminal=init["terminal"], errors=init["errors"])
                result: Any = None
            elif op == b"W" and writer is not None:
                result = writer.write_blocks(pickle.loads(payload))
            else:
                raise ValueError(f"unexpected frame {op!r} (init first)")
        except Exception as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            write_frame(out, b"E", pickle.dumps((code, f"{type(exc).__name__}: {exc}")))
            continue
        write_frame(out, b"K", pickle.dumps(result))


class WriterError(Exception):
    """The writer process reported a failure (``code``: the SQLite error code, if any),
    or is gone (``code`` None, ``gone`` True)."""

    def __init__(self, message: str, code: int | None = None, *, gone: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.gone = gone


class WriterProcess:
    """The parent's end: a writer process for one database file, started on first use.

    ``request`` blocks (it runs on the store's worker thread, which gives up the GIL
    while it waits) and is not thread-safe: one thread uses it. A writer that dies
    is reported once (:class:`WriterError` with ``gone``) and started anew by the
    next request.
    """

    def __init__(self, path: str, init: Mapping[str, Any]) -> None:
        self.path = path
        self._init = dict(init, path=path)
        self._proc: subprocess.Popen[bytes] | None = None
        #: Processes started so far (1 unless one died).
        self.started = 0

    @property
    def pid(self) -> int | None:
        """The running writer's process id, if one is running."""
        return None if self._proc is None or self._proc.poll() is not None else self._proc.pid

    def _start(self) -> subprocess.Popen[bytes]:
        # This package's directory on the child's path, whatever put it on ours.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        proc = subprocess.Popen([sys.executable, "-m", "penguiflow_exporters._sqlite_write"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._proc = proc
        self.started += 1
        self._exchange(proc, b"I", pickle.dumps(self._init))
        return proc

    def request(self, op: bytes, payload: bytes) -> Any:
        """Send one frame and return the reply's result.

        Raises:
            WriterError: the writer failed (the transaction was rolled back), or
                could not be started, or died.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            try:
                proc = self._start()
            except OSError as exc:
                raise WriterError(f"cannot start the writer process ({exc})", gone=True) from exc
        return self._exchange(proc, op, payload)

    def _exchange(self, proc: subprocess.Popen[bytes], op: bytes, payload: bytes) -> Any:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            write_frame(proc.stdin, op, payload)  # type: ignore[arg-type]
            kind, reply = read_frame(proc.stdout)  # type: ignore[arg-type]
        except (OSError, EOFError) as exc:
            self._reap(proc)
            raise WriterError(f"the writer process exited (code {proc.returncode})",
                              gone=True) from exc
        if kind == b"E":
            code, message = pickle.loads(reply)
            raise WriterError(message, code)
        return pickle.loads(reply)

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = None
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Ask the writer to quit and wait for it (killed after 5 s); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(WriterError):
                self._exchange(proc, b"Q", b"")
        self._reap(proc)


def main() -> None:
    """The child's entry point: serve the store on stdin/stdout until told to quit."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the pipe
    # Its heap is a batch at a time, freed by reference counting: collect rarely.
    gc.set_threshold(100_000, 50, 50)
    _serve(inp, out)


if __name__ == "__main__":
    main()
