"""Helpers shared by the ``pf`` tests (a module name unique across the test folders)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def fresh_database(pg_dsn: str, prefix: str) -> Iterator[str]:
    """Create a fresh, empty Postgres database next to ``pg_dsn``; yield its URL; drop it."""
    import asyncpg

    database = f"{prefix}_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{database}"'))
    try:
        yield pg_dsn.rsplit("/", 1)[0] + f"/{database}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
