"""Start a module's child Pythons ahead of its tests, two at a time (one per xdist worker).

The doc-block and example tests each wait on one child Python that spends most of
its ~1 s starting up (imports, and coverage's start when it measures children).
Run one after another, the machine's second core sat idle for ~60 s of CI. Here
the first such test starts every selected child through a small pool, and each
test then waits on its own child's result and asserts on it as before: the same
commands, the same timeouts, the same checks, only the waiting overlaps.

Only the tests selected for the session are started (``-k`` picks one: one child
runs). A child that times out fails its own test with ``subprocess.TimeoutExpired``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

# Two at a time: the second core's worth. More only queue on a 2-core machine and
# stretch each child's wall time (some examples bound their own run). Under
# pytest-xdist (CI runs `-n 2`) the other worker already has the second core, so
# each worker takes its share of the cores.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
WORKERS = max(1, min(2, (os.cpu_count() or 1) // max(1, _XDIST_WORKERS)))

Command = Callable[[Any], tuple[list[str], dict[str, Any]]]


def run_ahead(request: pytest.FixtureRequest, test_name: str, argname: str,
              command: Command) -> Iterator[dict[Any, Future[subprocess.CompletedProcess[str]]]]:
    """A module fixture's body: start ``command(param)`` for each selected test
    ``test_name`` of the requesting module, keyed by its ``argname`` parameter.

    ``command`` gives ``(argv, keyword arguments of subprocess.run)``; the runs
    capture text output and never raise on a non-zero exit (the test checks it).
    Children not started yet when the module ends are cancelled."""
    params = [item.callspec.params[argname] for item in request.session.items
              if isinstance(item, pytest.Function) and item.module is request.module
              and item.originalname == test_name]
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="run-ahead")
    runs: dict[Any, Future[subprocess.CompletedProcess[str]]] = {}
    for param in params:
        if param not in runs:
            argv, kwargs = command(param)
            runs[param] = pool.submit(subprocess.run, argv, capture_output=True, text=True,
                                      check=False, **kwargs)
    try:
        yield runs
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
