"""PenguiFlow exporters: durable StateStores (SQLite, Postgres), OpenTelemetry set-up
(``otel``) and log correlation (``logging``).

Dependency direction: this package depends on ``penguiflow``; the core never
imports it.

Choosing a store by URL (``open_store``): ``memory://``,
``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``, and
``postgresql://user@host:port/db``. Without a URL, the environment variable
``PENGUIFLOW_STORE`` decides, else the embedded default
``sqlite:///.penguiflow/traces.db`` (relative to the working directory).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from penguiflow.state import TraceStore

# Nothing from penguiflow is imported at module level: the SQLite store's writer
# process imports this package and must start in milliseconds, not the ~0.7 s
# that importing the core takes (see _sqlite_write).

__all__ = ["DEFAULT_STORE_URL", "default_store", "default_store_url", "open_store"]

DEFAULT_STORE_URL = "sqlite:///.penguiflow/traces.db"
_SCHEMES = "memory://, sqlite:///path/to/file.db, postgresql://user@host:port/db"


def default_store_url() -> str:
    """``$PENGUIFLOW_STORE`` if set and non-empty, else :data:`DEFAULT_STORE_URL`."""
    return os.environ.get("PENGUIFLOW_STORE") or DEFAULT_STORE_URL


def open_store(url: str | None = None, **options: Any) -> TraceStore:
    """Build (not yet open) the store a URL names; use it as ``async with``.

    Args:
        url: the store URL; None means :func:`default_store_url`.
        **options: passed to the store's constructor (e.g. ``on_full="drop"``,
            ``close_timeout_s=10``). ``readonly=True`` opens a durable store for
            reading only: it never creates or alters anything, and refuses a
            missing, empty or foreign database with one clear line.

    Raises:
        ValueError: the URL's scheme is not one of the supported ones.
    """
    url = url or default_store_url()
    if url == "memory://" or url.startswith("memory:"):
        from penguiflow.state import InMemoryStateStore

        options.pop("readonly", None)  # nothing to protect: it starts empty
        return InMemoryStateStore()
    if url.startswith("sqlite://"):
        from .sqlite import SQLiteStateStore

        path = url[len("sqlite://"):]
        # sqlite:///rel.db -> "rel.db"; sqlite:////abs.db -> "/abs.db"
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise ValueError(f"store URL {url!r} has no file path; e.g. sqlite:///traces.db")
        return SQLiteStateStore(path, **options)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStateStore

        return PostgresStateStore(url, **options)
    raise ValueError(f"unsupported store URL {url!r}; use one of: {_SCHEMES}")


async def default_store() -> TraceStore:
    """Open the store ``$PENGUIFLOW_STORE`` names (else the SQLite default).

    A zero-argument factory for ``penguiflow-admin``, which takes
    ``--state-store package.module:callable``::

        penguiflow-admin history <trace_id> --state-store penguiflow_exporters:default_store
    """
    store = open_store()
    opener = getattr(store, "open", None)
    if opener is not None:
        await opener()
    return store
