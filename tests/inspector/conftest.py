"""Fixtures for the ``pf`` tests, borrowed from the exporters suite (nothing is copied).

``tests/exporters`` holds the real OTLP/HTTP receiver (``otlp_receiver.py``) and
the Postgres fixture (``pg_dsn``: ``$TEST_PG_DSN``, else a throwaway cluster,
else skip -- or fail under ``CI=true``). Its directory goes on ``sys.path`` and
its conftest is loaded under a distinct module name so the fixtures can be
re-exported here.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from inspector_support import fresh_database

_EXPORTERS = Path(__file__).resolve().parents[1] / "exporters"
if str(_EXPORTERS) not in sys.path:
    sys.path.insert(0, str(_EXPORTERS))

_spec = importlib.util.spec_from_file_location("pf_exporters_test_fixtures",
                                               _EXPORTERS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

otlp_receiver = _fixtures.otlp_receiver
pg_dsn = _fixtures.pg_dsn


@pytest.fixture
def pg_database(pg_dsn: str) -> Iterator[str]:
    """A fresh, empty Postgres database, dropped after the test; yields its URL."""
    with fresh_database(pg_dsn, "pf_cli") as url:
        yield url
