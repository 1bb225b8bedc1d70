"""Helpers shared by the ``pf`` tests (a module name unique across the test folders)."""

from __future__ import annotations

import asyncio
import contextlib
import io
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


class FollowingStderr(io.StringIO):
    """``pf tail``'s stderr: ``following`` is set once it prints its following line
    (it has read what was already stored), and ``said`` once it prints text holding
    ``phrase``, when one is given."""

    def __init__(self, phrase: str | None = None) -> None:
        super().__init__()
        self.following = asyncio.Event()
        self.said = asyncio.Event()
        self._phrase = phrase

    def write(self, text: str) -> int:
        if "following" in text:
            self.following.set()
        if self._phrase is not None and self._phrase in text:
            self.said.set()
        return super().write(text)
