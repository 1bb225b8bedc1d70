"""PostgresStateStore at the server's limits and on odd input, against a real server
(the ``pg_dsn`` fixture; see test_postgres_store.py for ``make``, ``sql``, ``schema``):
block sizes, a server that stops answering, ids the server cannot hold, DSN options."""

from __future__ import annotations

import itertools
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
import test_postgres_store as pgs

import penguiflow_exporters._pg_write as pg_write

# The Postgres suite's fixtures, used here too.
writer, make, sql, schema = pgs.writer, pgs.make, pgs.sql, pgs.schema
ev = pgs.ev


# -- block size ----------------------------------------------------------------------


async def test_a_block_over_the_byte_cap_is_cut_and_every_event_stored(
        make: Any, sql: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """One trace's share of a batch larger than a COPY row may be (1 GB on a real
    server, BLOCK_BYTES lowered here) is stored in several blocks, none over the cap,
    and reads back whole; it was one block, which the server refused, and the batch
    was lost."""
    monkeypatch.setattr(pg_write, "BLOCK_BYTES", 20_000, raising=False)
    store = await make()
    events = [ev("big", i, payload={"s": chr(0x4e00 + i) * 2_000 + str(i)}) for i in range(30)]
    events.append(ev("small", 0, flow="flow-2"))
    for event in events:
        await store.save_event(event)
    await store.flush()
    assert store.failures["events_lost"] == 0
    assert await store.load_history("big") == events[:-1]
    assert await store.load_history("small") == events[-1:]
    page = await store.load_history_page("big", offset=7, limit=11)
    assert page == events[7:18]
    rows = await sql.fetch(
        f'SELECT first, n, octet_length(data) AS size FROM "{store.schema}".blocks '
        f"WHERE trace_key = (SELECT first_seen FROM \"{store.schema}\".traces "
        f"WHERE trace_id = 'big') ORDER BY first")
    assert len(rows) > 1
    assert all(row["size"] <= 20_000 for row in rows)
    assert [row["first"] for row in rows] == list(
        itertools.accumulate([0] + [row["n"] for row in rows[:-1]]))
    assert sum(row["n"] for row in rows) == 30
    summary = await store.get_trace("big")
    assert summary is not None and summary.event_count == 30

