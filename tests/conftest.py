"""How pytest-xdist spreads the suite (CI runs ``-n 2 --dist loadgroup``).

Each test file is one unit of work, so a module's fixtures and the children
``run_ahead`` starts stay on one worker. The exception is the files that use the
shared PostgreSQL or Redis server (``TEST_PG_DSN``, ``TEST_REDIS_URL``). Together
they form one unit, run one after another on one worker, because some of their
tests act on the whole server: they terminate every idle ``penguiflow``
connection or every writer connection, kill every Redis client, pause Redis
writes, or set Redis's ``maxmemory``. Run beside them on the other worker, a
store's ``follow()`` or a bus test would lose its connection for a reason that
is not its own.

A file is put in that unit when its text names either server. Erring towards
including a file costs balance only; leaving one out would cost a flaky CI.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

#: The group of the files that share the servers.
SHARED_SERVERS = "shared-servers"
_NAMES_A_SERVER = re.compile(r"pg_dsn|pg_database|postgres|redis", re.IGNORECASE)
#: Files whose tests reach a shared server without naming one: the examples
#: inherit TEST_PG_DSN (distributed_redis_pg stores its traces there).
_ALSO_SHARED = frozenset({"test_examples.py"})


@cache
def _shares_a_server(path: Path) -> bool:
    return path.name in _ALSO_SHARED or bool(_NAMES_A_SERVER.search(path.read_text()))


def pytest_configure(config: pytest.Config) -> None:
    # xdist registers it too; said here so that the suite runs without xdist.
    config.addinivalue_line("markers", "xdist_group(name): tests xdist runs on one worker")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks (--dist loadgroup)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            group = (SHARED_SERVERS if _shares_a_server(item.path)
                     else item.nodeid.split("::", 1)[0])
            item.add_marker(pytest.mark.xdist_group(group))
