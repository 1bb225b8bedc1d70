"""Fixtures for the distributed suite (see dist_support for the helpers).

``redis_url`` (session): ``$TEST_REDIS_URL`` if set, else a throwaway
``redis-server`` on a free loopback port; where neither can be had the tests are
skipped -- or fail when ``CI=true``. ``own_redis`` (function): a server of the
test's own, with AOF persistence, for tests that restart it. ``namespace``: a
fresh one per test, so that tests never see each other's streams. ``workers``:
the list tests add their ``dist_support.Worker`` processes to; any still running
at the end is killed. ``redis``: a client of ``redis_url``, closed after the test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from dist_support import RedisServer, Worker, no_redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
        return
    try:
        server = RedisServer()
        url = server.start()
    except RuntimeError as exc:
        no_redis(f"TEST_REDIS_URL is unset and {exc}")
    try:
        yield url
    finally:
        server.remove()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    try:
        server = RedisServer(aof=True)
        server.start()
    except RuntimeError as exc:
        no_redis(str(exc))
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def workers() -> AsyncIterator[list[Worker]]:
    started: list[Worker] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()
