"""Helpers of the store contract suite (a uniquely named module, imported by tests)."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import importlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from penguiflow.state import EventRecord

#: ``sqlite``: SQLiteStateStore with its default writer process; ``sqlite-thread``: the
#: same store writing on its worker thread (``writer="thread"``). ``postgres`` /
#: ``postgres-loop``: PostgresStateStore with its writer process / on the event loop.
STORE_KINDS = ("memory", "sqlite", "sqlite-thread", "postgres", "postgres-loop")
_THREAD_WRITER: dict[str, type[Any]] = {}


def store_class(kind: str) -> type[Any]:
    """The store class of ``kind`` (imported lazily)."""
    if kind == "sqlite-thread":
        if kind not in _THREAD_WRITER:
            base = store_class("sqlite")

            class ThreadWriterSQLiteStateStore(base):  # type: ignore[misc,valid-type]
                def __init__(self, *args: Any, writer: str = "thread", **kwargs: Any) -> None:
                    super().__init__(*args, writer=writer, **kwargs)

            _THREAD_WRITER[kind] = ThreadWriterSQLiteStateStore
        return _THREAD_WRITER[kind]
    if kind == "postgres-loop":
        if kind not in _THREAD_WRITER:
            pg = store_class("postgres")

            class LoopWriterPostgresStateStore(pg):  # type: ignore[misc,valid-type]
                def __init__(self, *args: Any, writer: str = "loop", **kwargs: Any) -> None:
                    super().__init__(*args, writer=writer, **kwargs)

            _THREAD_WRITER[kind] = LoopWriterPostgresStateStore
        return _THREAD_WRITER[kind]
    if kind == "memory":
        from penguiflow.state import InMemoryStateStore

        return InMemoryStateStore
    if kind == "sqlite":
        module = importlib.import_module("penguiflow_exporters.sqlite")
        return module.SQLiteStateStore  # type: ignore[no-any-return]
    if kind == "postgres":
        module = importlib.import_module("penguiflow_exporters.postgres")
        return module.PostgresStateStore  # type: ignore[no-any-return]
    raise AssertionError(kind)


async def drop_schemas(dsn: str, schemas: list[str]) -> None:
    """Drop test schemas (and everything in them)."""
    if not schemas:
        return
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def unique_schema() -> str:
    return f"pf_test_{uuid.uuid4().hex[:16]}"


class PgCluster:
    """A throwaway Postgres cluster: ``initdb`` + ``pg_ctl`` as user ``postgres``, trust
    auth, 127.0.0.1 on a free port, no fsync; ``stop()`` removes it.

    Raises (from the constructor and ``start``): ``RuntimeError`` saying why no
    cluster can be started here (no Postgres binaries, not root, initdb failed).
    """

    def __init__(self) -> None:
        initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not initdbs:
            raise RuntimeError("/usr/lib/postgresql/*/bin/initdb is missing")
        if os.geteuid() != 0:
            raise RuntimeError("starting a cluster needs root (runuser)")
        self._bindir = Path(initdbs[-1]).parent
        self._tmp = ""
        self._started = False
        self.port = 0

    def _ctl(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self._bindir / "pg_ctl"),
                        "-D", os.path.join(self._tmp, "data"), *args],
                       check=True, capture_output=True, timeout=120)

    def start(self) -> str:
        """Create and start the cluster; its DSN."""
        self._tmp = tempfile.mkdtemp(prefix="pf-pgtest.")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        try:
            shutil.chown(self._tmp, user="postgres")
            subprocess.run(
                ["runuser", "-u", "postgres", "--", str(self._bindir / "initdb"), "-D",
                 os.path.join(self._tmp, "data"), "-A", "trust", "-U", "postgres",
                 "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"],
                check=True, capture_output=True, timeout=120)
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self._tmp} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            self._ctl("-l", os.path.join(self._tmp, "pg.log"), "-w", "-t", "60",
                      "-o", options, "start")
            self._started = True
        except (OSError, LookupError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            self.stop()
            raise RuntimeError(f"could not start a throwaway cluster: {exc!r} "
                               f"{detail.decode(errors='replace').strip()}") from exc
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def restart(self) -> None:
        """Restart the server (fast shutdown: sessions are terminated); blocks until up."""
        # -l again: else the new server writes its log to our pipe, which then never closes.
        self._ctl("-l", os.path.join(self._tmp, "pg.log"), "-m", "fast", "-w", "-t", "60",
                  "restart")

    def stop(self) -> None:
        """Stop the server (immediate) and remove its files; idempotent."""
        if self._started:
            self._started = False
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._ctl("-m", "immediate", "stop")
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = ""


class StoreFactory:
    """Builds stores of one kind for one test and closes / cleans them up at teardown.

    ``await make(cls=None, same_as=None, **options)`` returns an opened store:
    ``cls`` a subclass of :attr:`cls` (for fault injection), ``same_as`` an earlier
    store whose database (file or schema) the new one shares (not for memory),
    ``options`` passed to the constructor (buffered stores only).
    """

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.cls = store_class(kind)
        self._tmp_path = tmp_path
        self._dsn = request.getfixturevalue("pg_dsn") if kind.startswith("postgres") else None
        self._stores: list[Any] = []
        self._where: dict[int, Any] = {}
        self._schemas: list[str] = []

    @property
    def buffered(self) -> bool:
        return self.kind != "memory"

    @property
    def dsn(self) -> str:
        assert self._dsn is not None
        return self._dsn

    def register_schema(self, schema: str) -> None:
        """Have ``schema`` dropped at teardown (for stores built elsewhere)."""
        self._schemas.append(schema)

    def build(self, cls: type[Any] | None = None, *, same_as: Any = None,
              **options: Any) -> Any:
        """An unopened store (closed and cleaned up at teardown)."""
        cls = cls or self.cls
        if self.kind == "memory":
            assert same_as is None, "memory stores cannot share data"
            assert not options, f"InMemoryStateStore takes no options: {options}"
            store = cls()
        elif self.kind.startswith("sqlite"):
            name = f"traces-{len(self._stores)}.db" if self._stores else "traces.db"
            where = self._where[id(same_as)] if same_as is not None else self._tmp_path / name
            store = cls(where, **options)
        else:
            where = self._where[id(same_as)] if same_as is not None else unique_schema()
            if same_as is None:
                self._schemas.append(where)
            store = cls(self.dsn, schema=where, **options)
            self._where[id(store)] = where
        if self.kind.startswith("sqlite"):
            self._where[id(store)] = where
        self._stores.append(store)
        return store

    async def make(self, cls: type[Any] | None = None, *, same_as: Any = None,
                   **options: Any) -> Any:
        store = self.build(cls, same_as=same_as, **options)
        opener: Callable[[], Awaitable[Any]] | None = getattr(store, "open", None)
        if opener is not None:
            await opener()
        else:
            await store.__aenter__()
        return store

    async def close(self) -> None:
        for store in reversed(self._stores):
            with contextlib.suppress(Exception):
                await store.close()
        if self._dsn is not None:
            await drop_schemas(self._dsn, self._schemas)


# -- old-format fixtures ----------------------------------------------------------------
# Schemas 2 and 3 kept the runtime's payload fields as columns; the migration tests
# write such rows by hand, split the way those stores split a StoredEvent's payload.

_STANDARD = frozenset({
    "ts", "event", "node_name", "node_id", "trace_id", "latency_ms", "q_depth_in",
    "q_depth_out", "q_depth_total", "outgoing", "queue_maxsize", "attempt", "trace_inflight",
    "trace_cancelled", "trace_pending",
})


def runtime_columns(ev: Any) -> tuple[Any, ...] | None:
    """``(latency_ms, q_in, q_out, outgoing, maxsize, inflight, cancelled, pending, extra)``
    of ``ev``'s payload, or None when the payload is not exactly a runtime payload.

    ``extra`` is a dict of the remaining items (possibly empty).
    """
    p = ev.payload
    try:
        q_in = p["q_depth_in"]
        q_out = p["q_depth_out"]
        outgoing = p["outgoing"]
        maxsize = p["queue_maxsize"]
        inflight = p["trace_inflight"]
        cancelled = p["trace_cancelled"]
        latency = p["latency_ms"]
        if (p["ts"] != ev.ts or p["event"] != ev.kind or p["node_name"] != ev.node_name
                or p["node_id"] != ev.node_id or p["trace_id"] != ev.trace_id
                or p["attempt"] != ev.attempt or type(p["attempt"]) is not int):
            return None
    except (KeyError, TypeError):
        return None
    # Exact types only: the columns give back ints, a bool and a float or None.
    if (type(q_in) is not int or type(q_out) is not int or type(outgoing) is not int
            or type(maxsize) is not int or type(inflight) is not int
            or type(cancelled) is not bool or p["q_depth_total"] != q_in + q_out
            or not (latency is None or type(latency) is float)):
        return None
    pending = p.get("trace_pending")
    if (pending is None and "trace_pending" in p) or (
            pending is not None and type(pending) is not int):
        return None  # an explicit None is not rebuilt (the runtime omits the key)
    # 14 standard keys, 15 with trace_pending: only longer payloads have extras.
    extra: dict[str, Any] = {k: v for k, v in p.items() if k not in _STANDARD} \
        if len(p) > (14 if pending is None else 15) else {}
    return latency, q_in, q_out, outgoing, maxsize, inflight, cancelled, pending, extra


def fields(trace: str | None, seq: int, kind: str = "node_start", *, flow: str = "flow-r",
           node: str = "a", extra: dict[str, Any] | None = None) -> EventRecord:
    """A runtime EventRecord, as PenguiFlow hands it to ``save_event_fields``."""
    return EventRecord(trace, 1000.0 + seq, kind, node, f"{node}-id", f"inv{seq}", ("p",),
                       f"s{seq}", None, seq, 0, 999.0 + seq, "demo", flow, 0.25, 1, 2, 1, 64,
                       3, False, None if seq % 2 else 2, extra)


async def kill_writer_mid_batch(store: Any, events: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Save ``events`` and flush them, killing ``store``'s writer process (SIGKILL) once
    their batch is handed to it; the flush absorbs the loss (logged and counted)."""
    from penguiflow_exporters._writer_proc import AsyncWriterProcess

    writer = store._proc_writer
    assert writer is not None and writer.pid is not None
    sending = asyncio.Event()
    exchange = AsyncWriterProcess._exchange

    async def signalling_exchange(self: Any, proc: Any, op: bytes, payload: bytes) -> Any:
        if op == b"W":
            sending.set()  # the batch is handed to this very process
            await asyncio.sleep(0)  # let the test kill it first
        return await exchange(self, proc, op, payload)

    with monkeypatch.context() as patch:
        patch.setattr(AsyncWriterProcess, "_exchange", signalling_exchange)
        await store.save_events(events)
        flushing = asyncio.ensure_future(store.flush())
        await sending.wait()
        os.kill(writer.pid, signal.SIGKILL)
        await flushing
