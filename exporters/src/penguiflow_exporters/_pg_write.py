"""The Postgres store's writer: one batch, one transaction (stdlib, asyncpg, _records,
_blocks, _folds).

Imports nothing from penguiflow, so that ``python -m penguiflow_exporters._pg_write``
(the store's writer process, ``writer="process"``; see _writer_proc.py) starts in
~0.1 s. :class:`PostgresWriter` is the backend's
:class:`~penguiflow_exporters.writer.EventWriter`; the store runs it on its event
loop (``writer="loop"``) or has this module's :func:`main` run it in a child.

One batch, one transaction, on the writer's own connection:

1. Refuse the rows :func:`~._records.check_row` refuses (and seqs outside int8): they
   are reported in ``rejected`` and the rest is written.
2. Take the schema's write lock (a transaction-scoped advisory lock). Writers in any
   process serialise their batches on it, from reading the ranges to commit: so no
   two writers store one event, a trace's blocks get consecutive ``first`` values,
   block ids become visible in id order (a follower reading ``id > last`` never
   skips a block that committed late), and summary upserts cannot deadlock.
3. Read the batch's flows' stored seq ranges; drop the rows stored already or
   repeated in the batch (:func:`~._folds.split_fresh`), reported in ``skipped``.
4. Upsert one summary row per trace, folded in Python (:func:`~._folds.fold_rows`);
   it RETURNs each trace's key and new event count, so a block's ``first`` is the
   count before this batch. Replace the touched flows' ranges.
5. COPY the blocks (:func:`~._blocks.iter_blocks`: a trace's share of the batch, as
   JSON column blocks of at most BLOCK_EVENTS events), then NOTIFY the schema's
   channel with the ids of the traces touched (live ``follow()``).

Steps 4 and 5 overlap the writer's work with the server's: blocks are encoded while
the server runs the upsert, and the COPY streams them as they are encoded.

Errors are the driver's (asyncpg exceptions, OSError; a connection the driver found
closed, however it says so, is a ``ConnectionResetError``): the store translates
them (``translate``), or the writer process reports them to its parent, which does.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

from ._blocks import Block, group_by_trace, iter_blocks
from ._folds import Fold, fold_rows, split_fresh
from ._records import (
    _FLOW_ID,
    BLOCK_EVENTS,
    EventValueError,
    Ranges,
    RowLike,
    WriteReply,
    check_rows,
    event_rows,
    loads_rows,
    reading_events,
    select,
    values_of,
)
from ._serve import serve
from .writer import WriteResult

__all__ = ["ANY_TRACE", "BLOCK_BYTES", "BLOCK_COLUMNS", "PostgresWriter", "WRITE_LOCK",
           "main", "notify_payloads", "server_codec"]

#: First key of the two-key advisory lock writers serialise on ("PFwr"); the
#: second is derived from the schema name (the store's ``lock_key``).
WRITE_LOCK: Final = 0x50467772
#: Most bytes of one block's ``data`` (a block of more events is cut in parts): a
#: COPY row is one protocol message, and the server drops the connection on a message
#: over 1 GB, so a batch holding such a block was retried, then lost whole. A single
#: event bigger than this stays one block (refused alone if over 1 GB). The store
#: passes it to its writer (``block_bytes``), so a test can lower it.
BLOCK_BYTES: Final = 64 << 20
#: The ``blocks`` columns a batch COPYs.
BLOCK_COLUMNS: Final = ("trace_key", "first", "n", "ts_lo", "ts_hi", "data")
#: A notification meaning "something changed, whatever the trace" (for trace ids
#: too long to list).
ANY_TRACE: Final = "*"
# NOTIFY payloads must be shorter than 8000 bytes.
_NOTIFY_MAX_BYTES: Final = 7900
# Joins a trace's node names for the summary upsert: check_row refuses control
# characters in names, so the unit separator never occurs in one.
_NODE_SEP: Final = "\x1f"

_quote = json.encoder.encode_basestring_ascii


class _Sql:
    """The write transaction's statements for one schema (built once)."""

    def __init__(self, schema: str, lock_key: int, channel: str) -> None:
        s = f'"{schema}"'
        self.schema, self.lock_key, self.channel = schema, lock_key, channel
        self.ranges = (
            f"SELECT flow_id, lo, hi FROM {s}.flow_seqs WHERE flow_id = ANY($1::text[]) "
            f"ORDER BY flow_id, lo")
        # Replaces touched flows' ranges: deletes the rows whose lo is gone (merged
        # into an earlier range) and upserts the new or grown ones; the two sets of
        # keys are disjoint, so one statement does both.
        self.save_ranges = (
            f"WITH gone AS (DELETE FROM {s}.flow_seqs f USING unnest($1::text[], $2::int8[]) "
            f"AS d(flow_id, lo) WHERE f.flow_id = d.flow_id AND f.lo = d.lo) "
            f"INSERT INTO {s}.flow_seqs (flow_id, lo, hi) "
            f"SELECT * FROM unnest($3::text[], $4::int8[], $5::int8[]) "
            f"ON CONFLICT (flow_id, lo) DO UPDATE SET hi = EXCLUDED.hi")
        # Merges a batch's folds (one array element per trace, in order of first
        # event, so new traces' first_seen follows arrival order) into the summaries
        # with TraceSummaryBuilder's semantics, and returns every touched trace's key
        # and event count. Node names arrive joined by _NODE_SEP (string_to_array was
        # ~3x cheaper than a JSON sub-query per trace, measured).
        self.fold = f"""
            INSERT INTO {s}.traces AS t (
                trace_id, flow_name, started_ts, ended_ts, node_count, error_count,
                remote_call_count, event_count, open_count, cancelled, failed, nodes,
                events_lost)
            SELECT u.trace_id, u.flow_name, u.started_ts, u.ended_ts, u.node_count,
                   u.error_count, u.remote_call_count, u.event_count, u.open_count,
                   u.cancelled, u.failed, string_to_array(u.nodes, E'\\x1f'), u.events_lost
            FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[], $5::int4[],
                        $6::int4[], $7::int4[], $8::int8[], $9::int4[], $10::bool[],
                        $11::bool[], $12::text[], $13::int8[]) WITH ORDINALITY
                 AS u(trace_id, flow_name, started_ts, ended_ts, node_count, error_count,
                      remote_call_count, event_count, open_count, cancelled, failed, nodes,
                      events_lost, n)
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
                        END,
                events_lost = t.events_lost + EXCLUDED.events_lost
            RETURNING trace_id, first_seen, event_count"""


class PostgresWriter:
    """The Postgres :class:`~penguiflow_exporters.writer.EventWriter` (see the module
    docstring), on one connection of its own, opened on the first batch and again
    after it was lost: a server that is down fails batches, never the constructor.

    Args:
        options: ``dsn``, ``schema``, ``lock_key`` (the write lock's second key),
            ``channel`` (NOTIFY), ``terminal`` / ``errors`` (the core's
            TERMINAL_KINDS and ERROR_KINDS, see fold_rows), ``connect_timeout_s``,
            ``command_timeout_s`` (each statement's deadline: a server that stops
            answering fails the batch with a TimeoutError, its connection dropped),
            and optionally ``block_events`` (most events per block) and
            ``block_bytes`` (most bytes per block, see :data:`BLOCK_BYTES`).
        translate: turns a driver exception into the store's error (the store's
            ``StoreUnavailable`` for "try again later", another ``StateStoreError``
            for the rest); None leaves them as they are (the writer process).
    """

    def __init__(self, options: Mapping[str, Any], *,
                 translate: Callable[[BaseException], BaseException] | None = None) -> None:
        self._options = dict(options)
        self._sql = _Sql(options["schema"], options["lock_key"], options["channel"])
        self._terminal: frozenset[str] = options["terminal"]
        self._errors: frozenset[str] = options["errors"]
        self._block_events: int = options.get("block_events", BLOCK_EVENTS)
        self._block_bytes: int = options.get("block_bytes", BLOCK_BYTES)
        self._translate = translate
        self._conn: Any = None
        self._encoding = "utf-8"  # the database's, as a Python codec (see server_codec)

    async def write(self, items: Sequence[Any]) -> WriteResult:
        """Store ``items`` (EventRecords, StoredEvents, Rows) in one transaction."""
        with reading_events():
            rows = event_rows(items)
        return WriteResult(*await self.write_rows(rows))

    async def write_rows(self, rows: Sequence[RowLike]) -> WriteReply:
        """Store ``rows`` in one transaction; the positions skipped and refused (and no
        notices: this writer has none)."""
        try:
            conn = self._conn
            if conn is None or conn.is_closed():
                self._conn = None
                options = self._options
                try:
                    conn = self._conn = await asyncpg.connect(
                        options["dsn"], timeout=options["connect_timeout_s"],
                        command_timeout=options.get("command_timeout_s"),
                        server_settings={"application_name": "penguiflow-writer"})
                except TimeoutError as exc:
                    raise TimeoutError(
                        f"no answer to connecting within connect_timeout_s="
                        f"{options['connect_timeout_s']:g}") from exc
                self._encoding = server_codec(await conn.fetchval("SHOW server_encoding"))
            return await self._transaction(conn, rows)
        except asyncio.CancelledError:
            raise
        except TimeoutError as exc:
            # A statement the server did not answer within command_timeout_s: the
            # connection is in doubt (a reply may still come), so it is dropped.
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.terminate()
            timed_out = exc if str(exc) else TimeoutError(
                f"no answer within command_timeout_s={self._options.get('command_timeout_s')}")
            if self._translate is None:
                raise timed_out from exc
            raise self._translate(timed_out) from timed_out
        except Exception as exc:
            error: BaseException = exc
            conn = self._conn
            if conn is not None and _in_doubt(conn, exc):
                # The connection went away, or is left in a state no next batch can
                # use (asyncpg still "in a transaction" after a reply was lost, which
                # refuses every later transaction): drop it, so the next batch opens
                # a new one, and report a lost connection, to retry, not a batch to
                # split (splitting would blame rows for the connection's fault).
                self._conn = None
                conn.terminate()
                if not isinstance(exc, OSError):
                    error = ConnectionResetError(
                        f"lost the connection to Postgres ({type(exc).__name__}: {exc})")
                    error.__cause__ = exc
            if self._translate is None:
                raise error from exc
            raise self._translate(error) from error

    async def close(self) -> None:
        """Close the connection (terminated if the server does not answer in 5 s)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5.0)
            except asyncio.CancelledError:  # the caller's own deadline: still released
                conn.terminate()
                raise
            except Exception:
                conn.terminate()

    async def _transaction(self, conn: Any, rows: Sequence[RowLike]) -> WriteReply:
        # check_rows checks a batch by its distinct values (~0.2 us per event against
        # ~5 for check_row per row), seqs within int8 included.
        with reading_events():
            rejected = check_rows(rows, self._encoding)
        refused = {i for i, _ in rejected}
        positions = [i for i in range(len(rows)) if i not in refused] if refused \
            else list(range(len(rows)))  # of the rows kept, in `rows`
        good = select(rows, positions) if refused else rows
        if not good:
            return [], rejected, []
        sql = self._sql
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", WRITE_LOCK, sql.lock_key)
            # Under the write lock: no other writer can store these seqs meanwhile.
            stored = await self._stored_ranges(conn, good)
            dropped, ranges = split_fresh(good, stored)
            skipped = [positions[j] for j in dropped]
            if dropped:
                gone = set(dropped)
                good = select(good, [j for j in range(len(good)) if j not in gone])
                if not good:
                    return skipped, rejected, []
            with reading_events():
                folds = fold_rows(good, terminal=self._terminal, errors=self._errors)
                groups = group_by_trace(good)
            # ASCII only for a database not in UTF-8: escaping costs ~0.3 us an event.
            # Encoded as they are taken, inside the COPY: an event whose values raise
            # meanwhile ends the blocks early (an error raised into the COPY would
            # leave the connection unusable) and is raised once the COPY is done, so
            # the transaction rolls back and the batch is split, not lost whole.
            unreadable: list[EventValueError] = []
            ascii_only = self._encoding != "utf-8"
            blocks = _read_events(_capped(iter_blocks(groups, self._block_events,
                                                      ascii_only=ascii_only),
                                          groups, self._block_bytes, ascii_only),
                                  unreadable)
            # The server upserts the summaries while this process encodes the first
            # blocks, then stores blocks while it encodes the next ones (the COPY
            # streams): its work and the server's overlap (see _encode_while).
            upsert = asyncio.ensure_future(self._upsert_traces(conn, folds))
            try:
                ready = await _encode_while(upsert, blocks)
                counts = await upsert
            finally:
                upsert.cancel()  # a no-op once done; else the transaction is failing
            await self._save_ranges(conn, stored, ranges)
            await conn.copy_records_to_table(
                "blocks", schema_name=sql.schema, columns=BLOCK_COLUMNS,
                records=_records(ready, blocks, counts, folds))
            if unreadable:
                raise unreadable[0]
            await conn.execute("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
                               sql.channel, notify_payloads(groups))
        return skipped, rejected, []

    async def _stored_ranges(self, conn: Any, rows: Sequence[RowLike]) -> dict[Any, Ranges]:
        """The stored seq ranges of the flows of ``rows`` (see split_fresh)."""
        flows = set(values_of(rows, _FLOW_ID))
        flows.discard(None)
        if not flows:
            return {}
        stored: dict[Any, Ranges] = {}
        for flow_id, lo, hi in await conn.fetch(self._sql.ranges, list(flows)):
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
            await conn.execute(self._sql.save_ranges, *gone, *put)

    async def _upsert_traces(self, conn: Any, folds: Mapping[Any, Fold]
                             ) -> dict[Any, tuple[int, int]]:
        """Merge ``folds`` into ``traces``; each trace's key and new event count."""
        if not folds:
            return {}
        values = list(folds.values())
        rows = await conn.fetch(
            self._sql.fold, list(folds), [f.flow_name for f in values],
            [f.started for f in values], [f.ended for f in values],
            [f.starts for f in values], [f.errors for f in values],
            [f.remotes for f in values], [f.events for f in values],
            [f.open for f in values], [f.cancelled for f in values],
            [f.failed for f in values], [_NODE_SEP.join(sorted(f.nodes)) for f in values],
            [f.events_lost for f in values])
        return {row[0]: (row[1], row[2]) for row in rows}


# Events encoded between two turns of the event loop while a statement runs or a COPY
# streams: ~2-5 ms of work. A turn lets a finished statement's reply be read, and on
# the flow's loop (writer="loop") lets the flow run.
_TURN_EVENTS: Final = 2000


async def _encode_while(pending: asyncio.Future[Any], blocks: Iterator[Block]) -> list[Block]:
    """Blocks taken from ``blocks`` until ``pending`` (a statement) completes.

    The upsert of a batch's summaries costs the server ~1.3 us per event for traces
    of 10 events, and encoding them costs this process ~2.4 (measured); doing one
    while the other runs takes the shorter off the batch's time when there is a
    core for each.
    """
    ready: list[Block] = []
    await asyncio.sleep(0)  # ``pending`` sends its statement
    encoded = 0
    while not pending.done():
        block = next(blocks, None)
        if block is None:
            break
        ready.append(block)
        encoded += block.n
        if encoded >= _TURN_EVENTS:
            encoded = 0
            await asyncio.sleep(0)
    return ready


async def _records(ready: list[Block], blocks: Iterator[Block],
                   counts: Mapping[Any, tuple[int, int]],
                   folds: Mapping[Any, Fold]) -> AsyncIterator[tuple[Any, ...]]:
    """The ``blocks`` rows (BLOCK_COLUMNS) of ``ready`` then of the rest of ``blocks``.

    An async iterable, so the COPY sends what it has (every ~512 KB) while the next
    blocks are encoded: the server stores the first ones meanwhile.
    """
    encoded = 0
    for block in itertools.chain(ready, blocks):
        trace_id = block.trace_id
        if trace_id is None:
            yield (None, 0, block.n, block.ts_lo, block.ts_hi, block.data)
        else:
            # The trace's events before this batch, plus the block's offset in it.
            key, count = counts[trace_id]
            yield (key, count - folds[trace_id].events + block.offset, block.n,
                   block.ts_lo, block.ts_hi, block.data)
        encoded += block.n
        if encoded >= _TURN_EVENTS:
            encoded = 0
            await asyncio.sleep(0)


def _capped(blocks: Iterator[Block], groups: Mapping[Any, Sequence[RowLike]],
            max_bytes: int, ascii_only: bool) -> Iterator[Block]:
    """``blocks``, each over ``max_bytes`` (UTF-8) cut into blocks that are not (but
    for single events). Costs a ``len`` per block; only oversized ones are encoded
    again."""
    for block in blocks:
        if len(block.data) * 4 <= max_bytes or block.n == 1 \
                or _size(block.data) <= max_bytes:
            yield block
            continue
        rows = groups[block.trace_id][block.offset:block.offset + block.n]
        parts = min(block.n, _size(block.data) // max_bytes + 1)
        step = -(-block.n // parts)
        for start in range(0, block.n, step):
            part = {block.trace_id: rows[start:start + step]}
            for sub in _capped(iter_blocks(part, step, ascii_only=ascii_only), part,
                               max_bytes, ascii_only):
                yield sub._replace(offset=block.offset + start + sub.offset)


def _size(data: str) -> int:
    """``data``'s length in UTF-8 (``isascii`` is O(1) in CPython)."""
    return len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))


def server_codec(server_encoding: str) -> str:
    """The Python codec of a Postgres server encoding ("utf-8" for UTF8, SQL_ASCII,
    which stores any bytes, and one Python does not know: then only what UTF-8
    cannot hold is refused, and the server refuses the rest, batch by batch)."""
    name = server_encoding.upper()
    if name in ("UTF8", "SQL_ASCII"):
        return "utf-8"
    name = {"KOI8R": "koi8_r", "KOI8U": "koi8_u"}.get(name, name.replace("WIN", "cp"))
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "utf-8"


def _in_doubt(conn: Any, exc: BaseException) -> bool:
    """Whether ``conn`` may not serve another batch after ``exc``: closed, still in a
    transaction, or failed by the client side or the link rather than refused by the
    server (a server's refusal, e.g. a value out of range, leaves it usable)."""
    if conn.is_closed() or conn.is_in_transaction():
        return True
    return isinstance(exc, (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                            asyncpg.PostgresConnectionError))


def notify_payloads(trace_ids: Iterable[str | None]) -> list[str]:
    """JSON arrays of the touched trace ids (null for none), each < 8000 bytes."""
    payloads: list[str] = []
    items: list[str] = []
    size = 2
    for trace_id in dict.fromkeys(trace_ids):
        # ASCII only, so len() counts bytes; the C quoting is ~5x json.dumps' speed.
        item = _quote(trace_id) if type(trace_id) is str else "null"
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
    """The writer process's handler (see _serve.serve): a PostgresWriter on an event
    loop of its own; ``write`` returns the :data:`~._records.WriteReply`."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._writer: PostgresWriter | None = None

    def init(self, options: dict[str, Any]) -> None:
        self._writer = PostgresWriter(options)

    def write(self, payload: bytes) -> WriteReply:
        assert self._writer is not None
        return self._loop.run_until_complete(self._writer.write_rows(loads_rows(payload)))

    def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._writer.close())
        with contextlib.suppress(Exception):
            self._loop.close()



def _read_events(blocks: Iterator[Block], unreadable: list[EventValueError]
                 ) -> Iterator[Block]:
    """``blocks`` as they are encoded; ended early, with the error in ``unreadable``,
    when an event's values raise (see :func:`~._records.reading_events`)."""
    try:
        with reading_events():
            yield from blocks
    except EventValueError as exc:
        unreadable.append(exc)


def main() -> None:
    """The child's entry point (``python -m penguiflow_exporters._pg_write``)."""
    handler = _Handler()
    try:
        serve(handler)
    finally:
        handler.close()


if __name__ == "__main__":
    main()
