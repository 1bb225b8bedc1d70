"""Fixtures for the store contract suite: a Postgres DSN and one store per backend.

``pg_dsn`` (session): ``$TEST_PG_DSN`` if set; else a throwaway cluster
(store_support.PgCluster: ``initdb`` + ``pg_ctl`` as user ``postgres``, trust auth,
127.0.0.1, a free port, stopped and removed at session end) when the Postgres
binaries exist and we are root; else the Postgres cases are skipped -- or fail
when ``CI=true``. ``pg_cluster`` (module): a cluster of the module's own, for tests
that restart the server.

``store`` is parametrised over ``memory``, ``sqlite`` and ``postgres``; the
SQLite/Postgres modules are imported lazily, so the memory cases run on their own.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from otlp_receiver import OTLPReceiver
from store_support import STORE_KINDS, PgCluster, StoreFactory


def _no_postgres(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but no Postgres for the store tests: {reason}", pytrace=False)
    pytest.skip(f"no Postgres: {reason} (set TEST_PG_DSN=postgresql://...)")


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A DSN of a Postgres server that tests may create schemas in."""
    dsn = os.environ.get("TEST_PG_DSN")
    if dsn:
        yield dsn
        return
    try:
        cluster = PgCluster()
        dsn = cluster.start()
    except RuntimeError as exc:
        _no_postgres(f"TEST_PG_DSN is unset and {exc}")
    try:
        yield dsn
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PgCluster]:
    """A Postgres cluster of the module's own (not TEST_PG_DSN's), for tests that stop
    or restart the server; skipped where none can be started, or fails when ``CI=true``."""
    try:
        cluster = PgCluster()
        cluster.start()
    except RuntimeError as exc:
        _no_postgres(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()


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
