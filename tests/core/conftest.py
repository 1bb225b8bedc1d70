from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pfcore_support import Recorder


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Any]]:
    """``start(flow, registry=...)`` runs a flow; every started flow is stopped at teardown."""
    started: list[Any] = []

    def _start(flow: Any, **kwargs: Any) -> Any:
        flow.run(**kwargs)
        started.append(flow)
        return flow

    yield _start
    for flow in started:
        await asyncio.wait_for(flow.stop(), 5.0)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
