"""PostgresStateStore: a TraceStore on PostgreSQL (asyncpg), shared by many processes.

The store is the three parts every durable store has (see _base.py), the shape of
OpenTelemetry's ``BatchSpanProcessor`` around a ``SpanExporter``:

* the :class:`~penguiflow_exporters.processor.BatchProcessor`: ``save_event`` only
  buffers; batches are written in the background, retried while the server is
  unreachable, split when the server refuses something so that only the events it
  refuses are lost, and every event not stored is counted in
  ``failures["events_lost"]`` and marked in its trace (``store_events_lost``);
* one writer, :class:`~penguiflow_exporters._pg_write.PostgresWriter`: one batch,
  one transaction (write lock, dedupe by seq ranges, summary upsert, COPY of JSON
  column blocks, NOTIFY), on a connection of its own;
* the queries below, on a pool, and ``follow()`` on a listening connection.

Where the writer runs (``writer``):

* ``"process"`` (default): the runtime's batches are written by a child process
  (``python -m penguiflow_exporters._pg_write``: its own interpreter, asyncpg
  connection and event loop) fed by
  :class:`~penguiflow_exporters._writer_proc.ProcessWriter`. The flow's process only
  pickles each batch (~2 us per event); validating, folding, JSON-encoding and the
  driver's work (~6 us) run on another core. Chain N=5 with the store attached ran
  at 4.7x its time without a store this way, 6.5x with ``"loop"`` (2-core machine,
  medians of 5). Batches of StoredEvents alone (imports, replays) are written on
  the loop (see ``_pg_writers.ProcessOrLoop``). Where no process can be started (a sandbox),
  the store writes on the loop instead, and says so once.
* ``"loop"``: on the flow's event loop (faster until durable when the machine has
  no core to spare: the child and the flow's process take turns on each batch).

Errors: a server that cannot be reached (refused, down, restarting, too many
connections, a lost connection) or cannot take a write now (a lock held past
``lock_timeout``, a ``statement_timeout``, a deadlock, a server turned read-only)
is :class:`~penguiflow.state.StoreUnavailable`: the processor retries the batch,
queries raise it. One that refuses every write whatever the events (a revoked
privilege, a table or schema dropped under the store) is
:class:`~penguiflow_exporters.processor.StoreRefused`: the batch is lost whole,
counted, not split. Anything else the driver raises is a
:class:`~penguiflow.state.StateStoreError` naming the server and schema (never the
password); a batch that raises one is split, down to the events refused.

Schema: see _pg_schema.py (version 5; version 4 is migrated on open, other versions
refused unchanged). ``readonly=True`` (``pf inspect``, ``pf export``) never creates
or alters anything: its connections are read-only sessions, and a schema that does
not exist or is not a version-5 penguiflow store is refused with one clear error.

Concurrency: any number of stores, in any number of processes, on one schema.
Writers serialise their transactions on an advisory lock (see _pg_write.py);
``follow()`` LISTENs on the schema's channel, which every committed batch NOTIFYs
with the trace ids it touched, so a reader in another process follows a live
trace. A trace's events come in order; following every trace, a batch's events
come trace by trace (a block each), not interleaved as they occurred.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import zlib
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any, Final, Literal
from urllib.parse import unquote_plus

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

from penguiflow.state import (
    ERROR_KINDS,
    TERMINAL_KINDS,
    RemoteBinding,
    StateStoreError,
    StoredEvent,
    StoreUnavailable,
    TraceFilter,
    TraceSummary,
    check_page,
)

from . import _pg_write
from ._base import ProcessedStore
from ._block_read import decode_block
from ._events import events_of
from ._pg_dsn import describe_dsn, several_at_signs
from ._pg_schema import (
    SCHEMA_VERSION,
    check_schema,
    create_or_migrate,
    old_bindings_indexes,
    stored_version,
    upgrade_bindings_indexes,
)
from ._pg_write import ANY_TRACE, PostgresWriter, server_codec
from ._pg_writers import NoProcess, ProcessOrLoop
from ._records import BLOCK_EVENTS, BlockError, Row
from ._writer_proc import ProcessWriter, WriterError
from .processor import StoreRefused
from .writer import EventWriter

logger = logging.getLogger("penguiflow_exporters.store")

__all__ = ["DEFAULT_SCHEMA", "PostgresStateStore", "SCHEMA_VERSION", "split_schema"]

#: The schema a store uses when neither ``schema=`` nor the DSN names one.
DEFAULT_SCHEMA: Final = "penguiflow"

# Lowercase only, so the name means the same quoted or not; <= 56 characters so
# that the NOTIFY channel "<schema>.events" fits Postgres' 63-byte identifiers.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,55}")
# Bigger batches than the processor's 2,000: a batch costs ~6 round trips and one
# summary upsert whatever its size, and a trace's share of it is one block.
_MAX_BATCH: Final = 10_000
# NUL marks a lost listener connection, since a NOTIFY payload can never contain it.
_LISTENER_LOST: Final = "\x00"

# Errors meaning "the server cannot be reached or refuses us for now": StoreUnavailable.
# Every other driver error becomes a StateStoreError.
_UNAVAILABLE: Final[tuple[type[BaseException], ...]] = (
    OSError,  # refused, unreachable, DNS failure, reset; TimeoutError is an OSError
    asyncpg.PostgresConnectionError,  # includes a connection lost mid-operation
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InsufficientResourcesError,  # too many connections, disk full, out of memory
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,  # no such database (yet)
)
# Reached, but it cannot take the write now: also StoreUnavailable (retried).
_BUSY: Final[tuple[type[BaseException], ...]] = (
    asyncpg.TransactionRollbackError,  # serialization failure, deadlock: try again
    # A lock held past lock_timeout, statement_timeout, a query cancelled by an
    # admin; and a server that turned read-only (a failover).
    asyncpg.LockNotAvailableError,
    asyncpg.QueryCanceledError,
    asyncpg.ReadOnlySQLTransactionError,
)
# Errors meaning "this server refuses every write, whatever the events": StoreRefused,
# so the processor does not split a batch down to single events for nothing (2N
# transactions, N error lines). A revoked privilege, a table or schema dropped under
# the store. Every other driver error may be one event's fault: the batch is split.
_REFUSED: Final[tuple[type[BaseException], ...]] = (
    asyncpg.InsufficientPrivilegeError,
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedColumnError,
    asyncpg.UndefinedFunctionError,
    asyncpg.InvalidSchemaNameError,
)
_DRIVER_ERRORS: Final[tuple[type[BaseException], ...]] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# What a query meets on a connection the pool kept idle while the server dropped it
# (a restart, pg_terminate_backend, a proxy's idle cut): asyncpg reports it as one of
# these when the query is sent. A read (or an idempotent write) is sent once more.
_STALE: Final[tuple[type[BaseException], ...]] = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InternalClientError,  # "cannot switch to state ...": the server's goodbye
    ConnectionResetError,
    BrokenPipeError,
)
_WRITER_MODULE: Final = "penguiflow_exporters._pg_write"

# Positions match _summary() below.
_SUMMARY_COLUMNS: Final = (
    "trace_id, flow_name, status, started_ts, ended_ts, node_count, error_count, "
    "remote_call_count, event_count, nodes, events_lost")


class PostgresStateStore(ProcessedStore):
    """A :class:`~penguiflow.state.TraceStore` on PostgreSQL, safe across processes.

    ``save_event`` only buffers; batches are written in the background and by
    ``flush()``. Every query flushes first, so a store reads its own writes. Use it
    as ``async with PostgresStateStore(dsn) as store``.

    Args:
        dsn: ``postgresql://user[:password]@host:port/database``. Messages name the
            host, port and database, never the password.
        schema: the Postgres schema holding the tables (lowercase identifier, at
            most 56 characters; default ``penguiflow``); created or migrated on
            ``open()`` unless read-only. The DSN may name it instead, as a query
            parameter (``postgresql://u@h/db?schema=myapp``: how a store URL given to
            ``open_store`` or ``pf --store`` selects it); it is taken out of the DSN
            before the driver sees it.
        writer: where batches are written: ``"process"`` (default), by a child
            process with its own connection, or ``"loop"``, on the event loop (see
            the module docstring).
        readonly: only read: ``open()`` creates and alters nothing, and every write
            raises StoreUnavailable.
        pool_min / pool_max: the query pool's bounds (the writer and each
            ``follow`` use a connection of their own besides).
        connect_timeout_s: how long connecting may take before StoreUnavailable.
        command_timeout_s: how long one query, or one statement of a batch's write,
            may wait for the server's answer (default 60 s): a server that stops
            answering (a hung host, a network partition that leaves the connection
            open) is then StoreUnavailable, the batch retried then counted lost,
            instead of a read, ``flush()`` or a flow under ``on_full="block"``
            waiting for ever. Opening (and migrating) the schema is not bounded by it.
        **options: the processor's options (see ProcessedStore and BatchProcessor):
            ``on_full``, ``max_batch`` (here 10,000 by default), ``max_buffer``,
            ``schedule_delay_s``, ``retries``, ``close_timeout_s``.

    Raises:
        ValueError: an invalid ``schema`` name, pool bounds, ``writer`` or option.
        StoreUnavailable: (from the methods) the server cannot be reached or refused
            the credentials, or the store is closed (or read-only, for writes).
        StateStoreError: (from the methods) any other database failure, including a
            schema version this module does not use (see _pg_schema.py).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        writer: Literal["process", "loop"] = "process",
        readonly: bool = False,
        pool_min: int = 1,
        pool_max: int = 4,
        connect_timeout_s: float = 10.0,
        command_timeout_s: float = 60.0,
        **options: Any,
    ) -> None:
        if writer not in ("process", "loop"):
            raise ValueError(f"writer must be 'process' or 'loop'; got {writer!r}")
        dsn, url_schema = split_schema(dsn)
        if schema is not None and url_schema is not None and schema != url_schema:
            raise ValueError(f"the DSN says schema={url_schema!r} but schema={schema!r} "
                             f"was passed; give one")
        if schema is not None and not schema.strip():
            raise ValueError("schema must name a schema (not empty); leave it out for the "
                             "default 'penguiflow'")
        schema = schema or url_schema or DEFAULT_SCHEMA
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(
                f"schema must be a lowercase identifier of at most 56 characters "
                f"([a-z_][a-z0-9_]*); got {schema!r}")
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ValueError(
                f"need 0 <= pool_min <= pool_max and pool_max >= 1; "
                f"got pool_min={pool_min}, pool_max={pool_max}")
        if not (isinstance(command_timeout_s, (int, float)) and 0 < command_timeout_s < 1e9):
            raise ValueError(
                f"command_timeout_s must be a positive number of seconds; "
                f"got {command_timeout_s!r}")
        if options.get("max_batch") is None and options.get("batch_size") is None:
            options["max_batch"] = min(_MAX_BATCH, options.get("max_buffer", 100_000))
        super().__init__(readonly=readonly, **options)
        self.schema = schema
        #: ``"process"`` or ``"loop"``: where batches are written.
        self.writer = writer
        self._dsn = dsn
        self._where = describe_dsn(dsn)
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = float(command_timeout_s)
        self._pool: Any = None
        # The database's encoding, as a Python codec (read on open): a value it cannot
        # hold is looked up as "not found", never sent (see _unstorable).
        self._encoding = "utf-8"
        #: Cancels of timed-out reads' queries on their way (see _call).
        self._cancelling: set[asyncio.Future[None]] = set()
        self._open_lock = asyncio.Lock()
        self._follow_wakes: set[asyncio.Queue[str | None]] = set()
        # Most events per block (tests make it small to cut traces into many blocks).
        self._block_events = BLOCK_EVENTS
        crc = zlib.crc32(schema.encode())
        self._lock_key = crc - (1 << 32) if crc >= 1 << 31 else crc  # a signed int4
        self._channel = f"{schema}.events"
        s = f'"{schema}"'
        self._s = s
        key_of = f"(SELECT first_seen FROM {s}.traces WHERE trace_id = $1)"
        self._sql_history = (
            f"SELECT id, data FROM {s}.blocks WHERE trace_key = {key_of} ORDER BY first, id")
        # The blocks overlapping events [$2, $2 + $3): from the last block starting
        # at or before $2, on the (trace_key, first) index; no OFFSET walk.
        self._sql_history_page = (
            f"SELECT id, first, data FROM {s}.blocks WHERE trace_key = {key_of} "
            f"AND first < $2::int8 + $3::int8 AND first >= (SELECT coalesce(max(first), 0) "
            f"FROM {s}.blocks WHERE trace_key = {key_of} AND first <= $2::int8) ORDER BY first, id")
        self._sql_last_block = f"SELECT coalesce(max(id), 0) FROM {s}.blocks"
        self._sql_trace_end = (
            f"SELECT coalesce(max(first + n), 0) FROM {s}.blocks WHERE trace_key = {key_of}")
        self._sql_follow_all = f"SELECT id, data FROM {s}.blocks WHERE id > $1 ORDER BY id"
        # A trace's blocks after the last one seen, by position (its index), not by
        # id: the (trace_key, id) pairs of a long trace need no second index.
        self._sql_follow_trace = (
            f"SELECT id, first, n, data FROM {s}.blocks WHERE trace_key = {key_of} "
            f"AND first >= $2 ORDER BY first, id")

    def __repr__(self) -> str:
        return f"PostgresStateStore({self._where!r}, schema={self.schema!r})"

    # -- errors -------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Translate driver and socket errors raised inside into the store's errors."""
        try:
            yield
        except StateStoreError:
            raise
        except (*_UNAVAILABLE, *_BUSY, *_DRIVER_ERRORS) as exc:
            raise self._translated(exc, doing) from exc

    def _translated(self, exc: BaseException, doing: str = "writing events") -> StateStoreError:
        """The store's error for a driver exception (see the module docstring)."""
        if isinstance(exc, StateStoreError):
            return exc
        if isinstance(exc, TimeoutError):
            return self._hung(doing, str(exc))
        return self._classified(doing, f"{type(exc).__name__}: {exc}",
                                lambda classes: isinstance(exc, classes))

    def _hung(self, doing: str, error: str) -> StoreUnavailable:
        """A query or write the server did not answer in time (a TimeoutError)."""
        return StoreUnavailable(
            f"Postgres at {self._where} (schema {self.schema!r}) did not answer while "
            f"{doing}: {error or 'no answer'} (command_timeout_s={self._command_timeout_s:g}, "
            f"connect_timeout_s={self._connect_timeout_s:g} for a new connection). The "
            f"server or the network to it is hung or overloaded; raise command_timeout_s "
            f"only if its queries are this slow")

    def _classified(self, doing: str, error: str,
                    is_a: Callable[[tuple[type[BaseException], ...]], bool]) -> StateStoreError:
        """The store's error for a driver error that ``is_a`` places among _UNAVAILABLE,
        _BUSY or _REFUSED, else a plain StateStoreError (a batch then is split)."""
        if is_a(_UNAVAILABLE):
            return self._unavailable(doing, error)
        if is_a(_BUSY):
            return self._busy(doing, error)
        if is_a(_REFUSED):
            return self._refused(doing, error)
        return self._failed_while(doing, error)

    def _busy(self, doing: str, error: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"Postgres at {self._where} (schema {self.schema!r}) cannot take it now while "
            f"{doing}: {error} (a lock another session holds past lock_timeout, a "
            f"statement_timeout, a deadlock, or a server that turned read-only)")

    def _refused(self, doing: str, error: str) -> StoreRefused:
        return StoreRefused(
            f"Postgres at {self._where} (schema {self.schema!r}) refuses the store while "
            f"{doing}: {error}. Grant the store's role its privileges on the schema, or "
            f"point it at a schema it owns (the store creates its tables on open)")

    def _unavailable(self, doing: str, error: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"cannot reach Postgres at {self._where} while {doing}: {error}. Start the "
            f"server, or fix the host, port, database or credentials in the DSN "
            f"(e.g. PENGUIFLOW_STORE)")

    def _failed_while(self, doing: str, error: str) -> StateStoreError:
        return StateStoreError(
            f"Postgres at {self._where} (schema {self.schema!r}) failed while {doing}: {error}")

    def _writer_error(self, exc: WriterError) -> StateStoreError:
        """The store's error for a batch the writer process failed (see _errors)."""
        if exc.gone:
            return StoreUnavailable(
                f"Postgres store at {self._where} (schema {self.schema!r}): {exc}; the "
                f"batch was not stored, and the next one starts a new writer (or pass "
                f"writer='loop')")
        # By class name: WriterError.types lists every class of the exception's MRO
        # in the writer process, so subclasses match as isinstance would.
        names = frozenset(exc.types)
        if "TimeoutError" in names:
            return self._hung("writing events", str(exc))
        return self._classified("writing events", str(exc), lambda classes: any(
            cls.__name__ in names for cls in classes))

    def _binding_problem(self, binding: RemoteBinding) -> str | None:
        """Why Postgres cannot store ``binding``, or None."""
        for field in ("trace_id", "context_id", "task_id", "agent_url"):
            value = getattr(binding, field)
            if value is None and field != "trace_id":
                continue
            if not isinstance(value, str):
                return (f"{field} is a {type(value).__name__}, not a str"
                        + ("" if field == "trace_id" else " or None"))
            if "\x00" in value:
                return f"{field} holds NUL, which Postgres text cannot hold"
            if self._unstorable(value):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return f"{field} holds a lone surrogate (not encodable as UTF-8)"
                return (f"{field} holds a character the database's encoding "
                        f"({self._encoding}) cannot hold")
        return None

    def _unstorable(self, value: object) -> bool:
        """Whether no stored text can equal ``value``: not a str, or one the database
        cannot hold (NUL, a lone surrogate, a character outside its encoding). Such a
        lookup finds nothing, as on SQLite; sent, the driver or server raised."""
        if not isinstance(value, str):
            return True
        if not value.isascii():
            try:
                value.encode(self._encoding)
            except UnicodeEncodeError:
                return True
        return "\x00" in value

    def _checked_pool(self) -> Any:
        if self._pool is None:
            raise StoreUnavailable(f"{self!r} is closed; create a new one")
        return self._pool

    # -- lifecycle ----------------------------------------------------------------

    async def _open(self) -> None:
        # open() may be entered by the writer and a query at once.
        async with self._open_lock:
            if self._pool is not None:
                return
            # A read-only store's sessions are made read-only once connected (the
            # server itself refuses any write on them), and again by each reset (its
            # RESET ALL). Not as a startup setting: with target_session_attrs=read-write
            # in the DSN, asyncpg then took every host for a read-only standby.
            readonly = {"init": _read_only, "reset": _reset_read_only} if self.readonly else {}
            self._check_dsn()
            with self._errors("connecting"):
                try:
                    pool = await asyncpg.create_pool(
                        self._dsn, min_size=self._pool_min, max_size=self._pool_max,
                        timeout=self._connect_timeout_s,
                        server_settings={"application_name": "penguiflow"}, **readonly)
                except (ValueError, OverflowError, TypeError) as exc:
                    raise self._bad_dsn(f"{type(exc).__name__} while parsing it") from None
            try:
                with self._errors("checking the schema" if self.readonly
                                  else "creating or migrating the schema"):
                    # A pool connection the server dropped meanwhile (a restart,
                    # pg_terminate_backend of idle sessions) fails its first query:
                    # again on the next, until the pool has had to make a new one.
                    for attempt in range(self._pool_min + 1):
                        try:
                            await self._prepare(pool)
                            break
                        except _STALE:
                            if attempt == self._pool_min:
                                raise
            except BaseException:
                pool.terminate()
                raise
            self._pool = pool

    async def _prepare(self, pool: Any) -> None:
        """Read the server's encoding and check (or create, or migrate) the schema."""
        async with pool.acquire() as conn:
            # A table locked elsewhere (VACUUM FULL, another tool's migration) must
            # not hold open() for ever: it is then StoreUnavailable, after
            # connect_timeout_s.
            await conn.execute(
                f"SET lock_timeout = {max(int(self._connect_timeout_s * 1000), 1)}")
            self._encoding = server_codec(await conn.fetchval("SHOW server_encoding"))
            if self.readonly:
                await check_schema(conn, self.schema, self._where)
            else:
                await create_or_migrate(conn, self.schema, self._where, self._lock_key)
                if await old_bindings_indexes(conn, self.schema):
                    logger.warning("state_store_bindings_index_old", extra={
                        "store": repr(self), "schema": self.schema,
                        "effect": "remote bindings whose ids take over ~2.7 KB "
                                  "(compressed) are refused",
                        "fix": "pf migrate --store <this store's URL>"})
            # Not in a finally: on a failure the connection may be gone (the RESET then
            # raised in place of the failure), and the pool's reset on release runs
            # RESET ALL anyway (or drops the connection).
            await conn.execute("RESET lock_timeout")

    async def upgrade_binding_indexes(self) -> bool:
        """Give a schema made by an older version the bindings indexes of this one
        (hashes: ids of any length), if it lacks them; True when it did. ``pf
        migrate`` calls it. It holds the bindings table's lock while the indexes are
        rebuilt (other processes' bindings wait), waits at most 30 s for that lock,
        and waits for other processes migrating the schema.

        Raises:
            StoreUnavailable: also when the store is read-only, or the lock was not
                had in time (try again when the table is quieter).
            StateStoreError: the role may not change the table's indexes (it does
                not own the table); the message says so.
        """
        self._writable()
        await self.open()
        def refused(cause: str) -> str:
            return (f"Postgres at {self._where} (schema {self.schema!r}): the store's role "
                    f"may not rebuild the bindings indexes ({cause}): only the owner of "
                    "the bindings table can; run pf migrate as that role. The store works "
                    "without: bindings whose ids are too long for the old indexes are "
                    "refused, naming this")

        with (_reworded(asyncpg.InsufficientPrivilegeError, refused),
              self._errors("rebuilding the bindings indexes")):
            async with self._checked_pool().acquire() as conn:
                return await upgrade_bindings_indexes(conn, self.schema, self._lock_key)

    async def stored_schema_version(self) -> int | None:
        """The schema version this store's schema records, read on a connection of its
        own without writing anything (``pf migrate`` asks before and after opening):
        None when the schema does not exist or has no ``schema_version`` table (no
        store there), 0 when that table is empty.

        Raises:
            StoreUnavailable: the server cannot be reached.
            StateStoreError: the DSN cannot be used, or the schema's
                ``schema_version`` table is another tool's.
        """
        with self._errors("reading the schema version"):
            conn = await self._connect(self._dsn, timeout=self._connect_timeout_s,
                                       command_timeout=self._command_timeout_s,
                                       server_settings={"application_name": "penguiflow"})
            try:
                await _read_only(conn)
                return await stored_version(conn, self.schema, self._where)
            finally:
                conn.terminate()

    async def _connect(self, *args: Any, **kwargs: Any) -> Any:
        """``asyncpg.connect``; a DSN the driver cannot parse refused without quoting it."""
        self._check_dsn()
        try:
            return await asyncpg.connect(*args, **kwargs)
        except (ValueError, OverflowError, TypeError) as exc:
            raise self._bad_dsn(f"{type(exc).__name__} while parsing it") from None

    def _check_dsn(self) -> None:
        """Refuse a DSN whose host the driver would take from the password (an
        unencoded ``@`` in it) before connecting anywhere."""
        if several_at_signs(self._dsn):
            raise self._bad_dsn("more than one @ before its host")

    def _bad_dsn(self, why: str) -> StoreRefused:
        # The driver could not parse the DSN. Its message may quote a part of it (the
        # password, cut at a reserved character): not shown.
        return StoreRefused(
            f"the Postgres DSN {self._where} cannot be used "
            f"({why}): check its host, port "
            f"and database, and percent-encode any / ? # @ : in the user name "
            f"or password (e.g. %2F for /, %40 for @)")

    async def _close(self) -> None:
        for wake in list(self._follow_wakes):
            wake.put_nowait(None)
        if self._cancelling:
            # A timed-out read's cancel still on its way (bounded by connect_timeout_s):
            # let it reach the server before the pool goes, or its query runs on.
            await asyncio.wait(list(self._cancelling),
                               timeout=self._close_time_left(self._connect_timeout_s))
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            # Within what is left of close_timeout_s: a query stuck on a lock held
            # elsewhere would otherwise keep close() waiting connect_timeout_s more.
            await asyncio.wait_for(pool.close(),
                                   self._close_time_left(self._connect_timeout_s))
        except Exception:
            # Closing must release the connections whatever state the server is in.
            pool.terminate()

    def _make_writer(self) -> EventWriter:
        options = {
            "dsn": self._dsn, "schema": self.schema, "lock_key": self._lock_key,
            "channel": self._channel, "terminal": TERMINAL_KINDS, "errors": ERROR_KINDS,
            "connect_timeout_s": self._connect_timeout_s,
            "command_timeout_s": self._command_timeout_s, "block_events": self._block_events,
            "block_bytes": _pg_write.BLOCK_BYTES}
        loop = PostgresWriter(options, translate=self._translated)
        if self.writer == "loop":
            return loop
        return ProcessOrLoop(
            ProcessWriter(_WRITER_MODULE, options, translate=self._process_error), loop)

    def _process_error(self, exc: WriterError) -> BaseException:
        if exc.starting and exc.gone:  # no process can be had here: see ProcessOrLoop
            return NoProcess(str(exc))
        return self._writer_error(exc)

    # -- queries ------------------------------------------------------------------

    async def _ready(self) -> Any:
        """Flush (so the store reads its own writes), open, return the pool."""
        await self.flush()
        await self.open()
        return self._checked_pool()

    async def _query(self, doing: str, method: str, *args: Any) -> Any:
        """``pool.<method>(*args)`` (a read, or an idempotent write), errors translated.

        Bounded by ``command_timeout_s`` (a server that stops answering is then
        StoreUnavailable, see :meth:`_hung`). Sent again when the pool's
        connection turns out dropped by the server while idle (``_STALE``): each
        such connection failed one query otherwise, so a long-lived reader (``pf
        tail``, the inspector) showed an error after every server restart.
        """
        with self._errors(doing):
            # Every idle connection of the pool may have been dropped at once: one try
            # per connection it can hold, and one on a new connection. Not once the
            # store is closed (its close cut the query): that is "closed", as before.
            for _ in range(self._pool_max):
                try:
                    return await self._call(method, *args)
                except _STALE as exc:
                    if self._pool is None:
                        raise
                    logger.info("state_store_stale_connection", extra={
                        "store": self._where, "doing": doing, "error": type(exc).__name__})
            return await self._call(method, *args)

    async def _call(self, method: str, *args: Any) -> Any:
        """``<method>(*args)`` on a connection of the pool, within command_timeout_s.

        One the server did not answer in time is terminated, not released to the
        pool: asyncpg would wait for its cancel request to be answered, for ever on a
        server that answers nothing. Waiting for a free connection (or a new one) is
        bounded too.
        """
        pool = self._checked_pool()
        timeout = self._command_timeout_s
        try:
            conn = await pool.acquire(timeout=self._connect_timeout_s + timeout)
        except TimeoutError:
            raise TimeoutError(
                f"no connection of the pool (pool_max={self._pool_max}) free or made within "
                f"{self._connect_timeout_s + timeout:g} s") from None
        try:
            return await getattr(conn, method)(*args, timeout=timeout)
        except TimeoutError:
            # The server may be alive but slow (overloaded): its query would run on
            # after the socket closes, and each retry would add one. Cancelled from
            # another connection, in the background, within connect_timeout_s.
            pid = conn.get_server_pid()
            conn.terminate()
            task = asyncio.ensure_future(self._cancel_backend(pid))
            self._cancelling.add(task)
            task.add_done_callback(self._cancelling.discard)
            raise
        finally:
            await pool.release(conn, timeout=timeout)

    async def _cancel_backend(self, pid: int) -> None:
        """Ask the server to cancel the query of backend ``pid`` (a timed-out read);
        bounded by connect_timeout_s; a failure (the server hung) is only logged."""
        pool = self._pool
        if pool is None:
            return
        bound = self._connect_timeout_s
        try:
            async with asyncio.timeout(bound):
                async with pool.acquire() as conn:
                    await conn.fetchval("SELECT pg_cancel_backend($1)", pid)
        except Exception as exc:
            logger.debug("state_store_cancel_failed", extra={
                "store": repr(self), "pid": pid, "error": repr(exc)[:200]})

    async def load_history(self, trace_id: str) -> list[StoredEvent]:
        """The events of ``trace_id`` in order of occurrence (all fields restored).

        Raises:
            StateStoreError: also when a block of the trace cannot be decoded.
        """
        await self._ready()
        if self._unstorable(trace_id):
            return []
        rows = await self._query("loading a trace", "fetch", self._sql_history, trace_id)
        events: list[StoredEvent] = []
        for block_id, data in rows:
            events += self._events(block_id, data)
        return events

    async def load_history_page(self, trace_id: str, *, offset: int = 0,
                                limit: int) -> list[StoredEvent]:
        """At most ``limit`` events of ``trace_id`` after the first ``offset`` (see TraceStore).

        Only the blocks holding those events are read (sought on the
        ``(trace_key, first)`` index), and only the events returned are built.

        Raises:
            ValueError: ``limit < 1`` or ``offset < 0``.
            StateStoreError: also when one of those blocks cannot be decoded.
        """
        check_page(offset, limit)
        await self._ready()
        if self._unstorable(trace_id):
            return []
        rows = await self._query("loading a trace", "fetch", self._sql_history_page,
                                 trace_id, offset, limit)
        events: list[StoredEvent] = []
        if not rows:
            return events
        skip = offset - rows[0][1]  # events of the first block before the page
        for block_id, _, data in rows:
            items = self._rows(block_id, data)
            if skip >= len(items):
                skip -= len(items)
                continue
            events += self._events(block_id, items[skip:skip + limit - len(events)])
            skip = 0
            if len(events) == limit:
                break
        return events

    def _rows(self, block_id: int, data: str) -> list[Row]:
        """A block's rows (see :meth:`_events` for the errors)."""
        with self._reading(block_id):
            return decode_block(data)

    def _events(self, block_id: int, data: str | list[Row]) -> list[StoredEvent]:
        """The events of a block (or of some of its rows).

        Raises:
            StateStoreError: the block cannot be decoded (the message names it).
        """
        with self._reading(block_id):
            return events_of(decode_block(data) if isinstance(data, str) else data)

    @contextlib.contextmanager
    def _reading(self, block_id: int) -> Iterator[None]:
        try:
            yield
        except BlockError as exc:
            raise StateStoreError(
                f"Postgres at {self._where} (schema {self.schema!r}): event block "
                f"{block_id} (blocks.id) cannot be read: {exc}") from exc

    async def list_traces(self, filter: TraceFilter | None = None) -> list[TraceSummary]:
        """Summaries matching ``filter`` (default: the 50 newest), as ``filter.apply`` orders.

        Ties are broken like the in-memory store's stable sort: the trace stored
        first comes first.
        """
        f = filter or TraceFilter()
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        where = []
        if f.status is not None:
            where.append(f"status = {arg(f.status)}")
        if f.node is not None:
            where.append(f"{arg(f.node)} = ANY(nodes)")
        if f.has_errors is not None:
            where.append("error_count > 0" if f.has_errors else "error_count = 0")
        if f.since is not None:
            where.append(f"started_ts >= {arg(float(f.since))}")
        if f.until is not None:
            where.append(f"started_ts < {arg(float(f.until))}")
        if f.order == "slowest":
            # Same arithmetic as TraceSummary.duration_ms, so equal floats tie alike.
            order = "(ended_ts - started_ts) * 1000.0 DESC, started_ts DESC, first_seen"
        else:
            order = "started_ts DESC, first_seen"
        sql = (f"SELECT {_SUMMARY_COLUMNS} FROM {self._s}.traces"
               f"{' WHERE ' + ' AND '.join(where) if where else ''}"
               f" ORDER BY {order} LIMIT {arg(f.limit)}")
        await self._ready()
        if f.node is not None and self._unstorable(f.node):
            return []
        rows = await self._query("listing traces", "fetch", sql, *args)
        return [_summary(row) for row in rows]

    async def get_trace(self, trace_id: str) -> TraceSummary | None:
        """The summary of ``trace_id``, or None."""
        await self._ready()
        if self._unstorable(trace_id):
            return None
        row = await self._query(
            "reading a trace summary", "fetchrow",
            f"SELECT {_SUMMARY_COLUMNS} FROM {self._s}.traces WHERE trace_id = $1", trace_id)
        return None if row is None else _summary(row)

    async def resolve_trace_id(self, prefix: str) -> list[str]:
        """Trace ids starting with ``prefix`` (at most 10, sorted by code point)."""
        await self._ready()
        if self._unstorable(prefix):
            return []
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = await self._query(
            "resolving a trace id", "fetch",
            f"SELECT trace_id FROM {self._s}.traces WHERE trace_id LIKE $1 ESCAPE '\\' "
            f"ORDER BY trace_id LIMIT 10", pattern)
        return [str(row[0]) for row in rows]

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        """Store ``binding`` now (bindings are not buffered); a repeated one is stored once.

        Raises:
            StoreUnavailable: also when the store is read-only.
            StateStoreError: a binding Postgres cannot hold, naming the field: a
                ``trace_id`` that is not a str, another id that is neither None nor
                a str, or a value holding NUL, a lone surrogate or (a database not
                in UTF-8) a character its encoding lacks. Checked before sending.
        """
        self._writable()
        await self.open()
        problem = self._binding_problem(binding)
        if problem is not None:
            raise StateStoreError(
                f"Postgres at {self._where} (schema {self.schema!r}) cannot store the "
                f"remote binding of trace {str(binding.trace_id)[:80]!r}: {problem}")
        # An older version's value btrees (their index row limit, ~2.7 KB after
        # compression) refuse a long binding: what the server refused, and the fix.
        with _reworded(asyncpg.ProgramLimitExceededError, lambda cause: (
                f"Postgres at {self._where} (schema {self.schema!r}) cannot store the "
                f"remote binding of trace {str(binding.trace_id)[:80]!r}: its ids are too "
                f"long for the bindings indexes an older version made ({cause}); run "
                "`pf migrate --store <this store's URL>` to give the schema indexes "
                "without that limit")):
            # Idempotent (ON CONFLICT DO NOTHING): safe to send again on a stale connection.
            await self._query(
                "saving a remote binding", "execute",
                f"INSERT INTO {self._s}.bindings (trace_id, context_id, task_id, agent_url) "
                f"VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                binding.trace_id, binding.context_id, binding.task_id, binding.agent_url)

    async def load_bindings(self, *, trace_id: str | None = None,
                            context_id: str | None = None,
                            task_id: str | None = None) -> list[RemoteBinding]:
        """Bindings matching every given id, in the order they were saved.

        Raises:
            ValueError: no id was given.
        """
        if trace_id is None and context_id is None and task_id is None:
            raise ValueError("load_bindings needs trace_id, context_id or task_id")
        given = {"trace_id": trace_id, "context_id": context_id, "task_id": task_id}
        where, args = [], []
        for column, value in given.items():
            if value is not None:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        await self.open()
        if any(self._unstorable(value) for value in args):
            return []
        rows = await self._query(
            "loading remote bindings", "fetch",
            f"SELECT trace_id, context_id, task_id, agent_url FROM {self._s}.bindings "
            f"WHERE {' AND '.join(where)} ORDER BY id", *args)
        return [RemoteBinding(row[0], row[1], row[2], row[3]) for row in rows]

    # -- follow -------------------------------------------------------------------

    async def follow(self, trace_id: str | None = None) -> AsyncGenerator[StoredEvent, None]:
        """Yield each event of ``trace_id`` (or of every trace) once it is committed.

        Events written by any store on this schema, in any process, are yielded,
        in order of occurrence; only events committed after the follow started
        listening are (read ``load_history`` first for the past). Ends when this
        store is closed. Uses a connection of its own; close the iterator
        (``aclose()``, or ``contextlib.aclosing``) to release it early.

        Raises:
            StoreUnavailable: the server cannot be reached, or the listening
                connection was lost (re-follow from the last event seen).
        """
        await self.open()
        wake: asyncio.Queue[str | None] = asyncio.Queue()

        def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            wake.put_nowait(payload)

        def on_lost(_conn: Any) -> None:
            wake.put_nowait(_LISTENER_LOST)

        with self._errors("starting to follow"):
            conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout_s,
                                         server_settings={"application_name": "penguiflow"})
        try:
            with self._errors("starting to follow"):
                # LISTEN before reading the high-water mark: a batch committed in
                # between is then either below the mark or announced.
                await conn.add_listener(self._channel, on_notify)
                conn.add_termination_listener(on_lost)
                # Every trace: the last block id; one trace: the index of its next
                # event (see _sql_follow_trace).
                last = int(await (conn.fetchval(self._sql_last_block) if trace_id is None
                                  else conn.fetchval(self._sql_trace_end, trace_id)))
            self._follow_wakes.add(wake)
            while True:
                payloads = [await wake.get()]
                while not wake.empty():  # one query for a burst of notifications
                    payloads.append(wake.get_nowait())
                if None in payloads:
                    return
                if _LISTENER_LOST in payloads:
                    raise StoreUnavailable(
                        f"lost the listening connection to Postgres at {self._where}; "
                        f"follow again (from load_history) once the server is back")
                if trace_id is not None and not any(_mentions(p, trace_id) for p in payloads):
                    continue
                with self._errors("following"):
                    rows = await (conn.fetch(self._sql_follow_all, last) if trace_id is None
                                  else conn.fetch(self._sql_follow_trace, trace_id, last))
                for row in rows:
                    events = self._events(row[0], row[-1])
                    # Advanced before yielding: the consumer may stop at any event.
                    last = row[0] if trace_id is None else row[1] + row[2]
                    for event in events:
                        yield event
        finally:
            self._follow_wakes.discard(wake)
            try:
                await asyncio.wait_for(conn.close(), 5.0)
            except Exception:
                conn.terminate()  # the server is gone or slow: drop the socket


# -- helpers ------------------------------------------------------------------------


_READ_ONLY: Final = "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"


async def _read_only(conn: Any) -> None:
    """Make ``conn``'s session read-only (a read-only store's pool ``init``)."""
    await conn.execute(_READ_ONLY)


async def _reset_read_only(conn: Any) -> None:
    """The pool's reset of a read-only store's connection: asyncpg's own (its RESET
    ALL would make the session writable again), then read-only again; one round trip."""
    await conn.execute(f"{conn.get_reset_query() or ''};{_READ_ONLY}")


@contextlib.contextmanager
def _reworded(cause: type[BaseException],
              message: Callable[[str], str]) -> Iterator[None]:
    """Re-raise a StateStoreError caused by a driver error of type ``cause`` as a
    StateStoreError of ``message(<the driver's first line>)``: one that names the fix."""
    try:
        yield
    except StateStoreError as exc:
        if not isinstance(exc.__cause__, cause):
            raise
        first_line = str(exc.__cause__).splitlines()[0] if str(exc.__cause__) else ""
        raise StateStoreError(message(first_line)) from exc.__cause__


def split_schema(dsn: str) -> tuple[str, str | None]:
    """``dsn`` without its ``schema`` query parameter, and that parameter's value (None
    without one). The rest of the DSN is kept as written (only the pair is cut out).

    Raises:
        ValueError: ``schema`` is given more than once.
    """
    start = dsn.find("?")
    if start < 0:
        return dsn, None
    end = dsn.find("#", start)
    end = len(dsn) if end < 0 else end
    kept: list[str] = []
    found: list[str] = []
    for pair in dsn[start + 1:end].split("&"):
        key, eq, value = pair.partition("=")
        if unquote_plus(key).strip() == "schema":
            found.append(unquote_plus(value) if eq else "")
        else:
            kept.append(pair)
    if not found:
        return dsn, None
    if len(found) > 1:
        raise ValueError(f"the DSN names its schema {len(found)} times; give schema= once")
    if not found[0].strip():
        # An unset variable in a URL (?schema=$APP_SCHEMA) must not write into the
        # default schema, shared with every other store of the database.
        raise ValueError("the DSN's schema= is empty; name the schema (schema=NAME), or "
                         "leave the parameter out for the default 'penguiflow'")
    query = "&".join(pair for pair in kept if pair)
    return dsn[:start] + ("?" + query if query else "") + dsn[end:], found[0]


def _summary(row: Any) -> TraceSummary:
    return TraceSummary(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                        row[8], tuple(sorted(row[9])), events_lost=row[10])


def _mentions(payload: str | None, trace_id: str) -> bool:
    if payload is None or payload == ANY_TRACE:
        return True
    try:
        return trace_id in json.loads(payload)
    except ValueError:  # not ours: check rather than miss an event
        return True
