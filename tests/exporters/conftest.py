"""Fixtures for the store contract suite: a Postgres DSN and one store per backend.

``pg_dsn`` (session): ``$TEST_PG_DSN`` if set; else a throwaway cluster
(``initdb`` + ``pg_ctl`` as user ``postgres``, trust auth, 127.0.0.1, a free
port, stopped and removed at session end) when the Postgres binaries exist and
we are root; else the Postgres cases are skipped -- or fail when ``CI=true``.

``store`` is parametrised over ``memory``, ``sqlite`` and ``postgres``; the
SQLite/Postgres modules are imported lazily, so the memory cases run on their own.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from otlp_receiver import OTLPReceiver
from store_support import STORE_KINDS, StoreFactory


def _no_postgres(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but no Postgres for the store tests: {reason}", pytrace=False)
    pytest.skip(f"no Postgres: {reason} (set TEST_PG_DSN=postgresql://...)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A DSN of a Postgres server that tests may create schemas in."""
    dsn = os.environ.get("TEST_PG_DSN")
    if dsn:
        yield dsn
        return
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdbs:
        _no_postgres("TEST_PG_DSN is unset and /usr/lib/postgresql/*/bin/initdb is missing")
    if os.geteuid() != 0:
        _no_postgres("TEST_PG_DSN is unset and starting a cluster needs root (runuser)")
    bindir = Path(initdbs[-1]).parent
    tmp = tempfile.mkdtemp(prefix="pf-pgtest.")
    data = os.path.join(tmp, "data")
    port = _free_port()
    started = False
    try:
        shutil.chown(tmp, user="postgres")
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(bindir / "initdb"), "-D", data, "-A", "trust",
             "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"],
            check=True, capture_output=True, timeout=120)
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {tmp} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "-D", data,
             "-l", os.path.join(tmp, "pg.log"), "-w", "-t", "60", "-o", options, "start"],
            check=True, capture_output=True, timeout=120)
        started = True
    except (OSError, LookupError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(tmp, ignore_errors=True)
        _no_postgres(f"could not start a throwaway cluster: {exc!r} "
                     f"{detail.decode(errors='replace').strip()}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(
                ["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "-D", data,
                 "-m", "immediate", "stop"],
                check=False, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The backend under test (override with ``parametrize("store_kind", ...)``)."""
    return str(request.param)


@pytest.fixture
async def make_store(store_kind: str, tmp_path: Path,
                     request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    factory = StoreFactory(store_kind, tmp_path, request)
    try:
        yield factory
    finally:
        await factory.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> Any:
    """An opened store of the parametrised kind; closed (and its schema dropped) at teardown.

    memory: ``InMemoryStateStore()``; sqlite: ``SQLiteStateStore(tmp_path / "traces.db")``;
    postgres: ``PostgresStateStore(dsn, schema=<unique>)``.
    """
    return await make_store.make()


# -- OpenTelemetry: a real OTLP receiver, and global state put back after each test --


@pytest.fixture
def otlp_receiver() -> Iterator[OTLPReceiver]:
    """A live OTLP/HTTP receiver on 127.0.0.1 (see ``otlp_receiver.py``)."""
    receiver = OTLPReceiver().start()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture
def otel_globals() -> Iterator[None]:
    """Let a test set OTel's global tracer/meter providers, and undo it afterwards.

    The API sets each global provider once per process (``_TRACER_PROVIDER_SET_ONCE``
    / ``_METER_PROVIDER_SET_ONCE``) and has no public reset, so this fixture saves
    the private module globals, gives the test a fresh "never set" state, and
    restores the saved ones -- the same thing OTel's own test utilities do
    (``opentelemetry.test.globals_test.reset_trace_globals``). Tests that do not
    need the globals pass providers explicitly (``set_global=False``) instead.
    """
    from opentelemetry import trace
    from opentelemetry.metrics import _internal as metrics_internal
    from opentelemetry.util._once import Once

    saved = (trace._TRACER_PROVIDER_SET_ONCE, trace._TRACER_PROVIDER,
             metrics_internal._METER_PROVIDER_SET_ONCE, metrics_internal._METER_PROVIDER,
             metrics_internal._PROXY_METER_PROVIDER)
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    metrics_internal._METER_PROVIDER_SET_ONCE = Once()
    metrics_internal._METER_PROVIDER = None
    # The proxy meter provider binds to the first real provider for good; give the
    # test its own so meters created elsewhere stay unbound.
    metrics_internal._PROXY_METER_PROVIDER = metrics_internal._ProxyMeterProvider()
    try:
        yield
    finally:
        (trace._TRACER_PROVIDER_SET_ONCE, trace._TRACER_PROVIDER,
         metrics_internal._METER_PROVIDER_SET_ONCE, metrics_internal._METER_PROVIDER,
         metrics_internal._PROXY_METER_PROVIDER) = saved
