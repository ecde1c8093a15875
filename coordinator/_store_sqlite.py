"""SQLite behind `Store`: one file in the data directory, WAL, the shared migrations.

One connection, used synchronously under a lock: every call is a short indexed transaction
(well under a millisecond), which costs the trio loop less than a hop to a worker thread, and a
single writer is all SQLite allows anyway. The SQL itself is `SqlStore`'s (_store_sql.py).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._changes import Kind
from ._model import Conflict
from ._store_sql import MIGRATIONS, SqlStore, Tx

__all__ = ["MIGRATIONS", "SqliteStore"]


class SqliteStore(SqlStore):
    """`Store` on one SQLite file. `prefixes` are fixed at the first open (kept in `meta`)."""

    def __init__(self, path: str | Path, mesh_ipv4: str = "10.250.0.0/16",
                 mesh_ipv6: str = "fd7a:f1ee:7000::/48") -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: durable but for power loss, which may take the last commits back. That
        # is fine for reports and logs (the next one restates them) but not for what hands out
        # or takes back a credential: those transactions commit under FULL (`durable=True`).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        try:
            self._open(str(path), mesh_ipv4, mesh_ipv6)
        except BaseException:
            self._db.close()
            raise

    def _dialect(self, statement: str) -> str:
        return statement  # the migrations are written in SQLite's words

    @contextmanager
    def _tx(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: the write lock from the start. `durable` commits under
        `synchronous=FULL`, which fsyncs the WAL at the commit."""
        with self._lock:
            if durable:  # a connection-level setting; SQLite takes it outside a transaction
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                if "UNIQUE constraint failed" not in str(exc):
                    raise
                raise Conflict(f"already exists ({exc})") from None
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")

    # One process owns a SQLite file: no other replica keeps anything of it in memory, so a
    # write has nobody to tell (no change feed).
    def _notify(self, c: Tx, kind: Kind, fleet: str = "", device: str = "") -> None:
        return

    def _notify_device(self, c: Tx, kind: Kind, device_id: str) -> None:
        return

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
