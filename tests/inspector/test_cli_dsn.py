"""A Postgres URL the driver cannot parse: one line, exit 2, no part of the password.

A password with an unencoded ``/`` or ``#`` ends the URL's host part early: the
store's description showed the rest of it as host and path, and the driver's
``ValueError`` (which quotes a piece) went out as a traceback. Nothing here
reaches a server: every URL fails while it is parsed.
"""

from __future__ import annotations

import pytest

from penguiflow.state import StateStoreError, StoreUnavailable
from penguiflow_exporters.postgres import PostgresStateStore
from penguiflow_inspector.cli import main

URLS = [
    "postgresql://pf:S3C/RETpw@127.0.0.1:5432/db",  # / in the password
    "postgresql://pf:S3C#RETpw@127.0.0.1:5432/db",  # # in the password
    "postgresql://pf:S3CRETpw@[::1/db",  # an IPv6 host never closed
    "postgresql://pf:S3CRETpw@127.0.0.1:99999/db",  # no such port
    "postgresql://pf:S3C@RET?pw@127.0.0.1:5432/db",  # @ and ? in the password
]
PIECES = ("S3C", "RETpw", "RET?pw")


@pytest.mark.parametrize("url", URLS)
async def test_the_store_says_what_to_fix_and_nothing_of_the_password(url: str) -> None:
    store = PostgresStateStore(url, writer="loop")
    assert not any(piece in repr(store) for piece in PIECES), repr(store)
    with pytest.raises(StateStoreError) as info:
        await store.open()
    await store.close()
    message = str(info.value)
    assert "percent-encode" in message and "\n" not in message
    assert not isinstance(info.value, StoreUnavailable)  # retrying cannot help
    assert not any(piece in message for piece in PIECES), message
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("url", URLS)
def test_pf_prints_one_line_and_exits_2(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["traces", "--store", url]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pf traces: "), err
    assert "percent-encode" in err
    assert not any(piece in err for piece in PIECES), err


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://app@db.example:5432/traces?application_name=svc@prod",
     "postgresql://app@db.example:5432/traces"),
    ("postgresql://app:pw@db:5432/t?sslrootcert=/etc/ssl/ca@2024.pem",
     "postgresql://app@db:5432/t"),
    ("postgresql://db.example:5432/traces?application_name=svc@prod",  # user: PGUSER
     "postgresql://db.example:5432/traces"),
])
def test_an_at_sign_in_a_query_value_keeps_the_description(url: str, shown: str) -> None:
    # The check for a password cut at a reserved character took these valid URLs for
    # such, and every message lost the host it names.
    assert repr(PostgresStateStore(url)).startswith(f"PostgresStateStore({shown!r}")


async def test_a_password_cut_at_a_question_mark_is_not_shown_as_a_port() -> None:
    # "pf:2024?S3C=RETpw@host": the URL's host part ends at the ?, so "pf:2024" looked
    # like a host and port, and the description showed the password's "2024". (The
    # driver reads it that way too: here that host is not found; nothing is shown.)
    url = "postgresql://pf:2024?S3C=RETpw@127.0.0.1:5432/db"
    store = PostgresStateStore(url, writer="loop", connect_timeout_s=2.0)
    assert "2024" not in repr(store)
    with pytest.raises(StateStoreError) as info:
        await store.open()
    await store.close()
    assert "2024" not in str(info.value) and "RETpw" not in str(info.value)
