"""A database written in place: each write is its own transaction, committed before write()
returns. For the files components still name by path rather than by storage unit: the audit log
(`audit_db`, shared by every process that audits: SQLite assigns the row ids, several writers
wait on each other through the busy timeout) and the router's history (`history_db`). Opened by
the one opener (sqlite.open_database: WAL, synchronous, busy timeout, quick check), tables from
schema.py, and used through the same stores as a unit database (stores.AuditStore,
stores.RouterHistoryStore), so no component keeps its own SQL or pragmas."""
from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Sequence

from loom_ros.storage import schema
from loom_ros.storage.errors import StorageError, StorageFullError, is_full
from loom_ros.storage.sqlite import open_database
from loom_ros.storage.writer import CommittedTicket


class DirectDatabase:
    """`write` and `query` on one file, from any thread (one lock)."""

    def __init__(self, path: str | os.PathLike, statements: list[str],
                 clock: Callable[[], int] | None = None, synchronous: str = 'NORMAL'):
        from loom_ros.storage.storage import wall_ms
        self.path = str(path)
        self.clock = clock or wall_ms
        self.conn = open_database(path, synchronous=synchronous)
        try:
            schema.create(self.conn, statements)
        except sqlite3.Error as exc:
            self.conn.close()
            raise self._error('cannot create the tables', exc) from None
        self.conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()

    def _error(self, what: str, exc: BaseException) -> StorageError:
        if is_full(exc):
            return StorageFullError(f'{self.path}: disk or budget full: {exc}')
        return StorageError(f'{self.path}: {what}: {exc}')

    def write(self, sql: str, params: Sequence = ()) -> CommittedTicket:
        """Run and commit one statement; its ticket is already done (row_id: the new rowid)."""
        with self._lock:
            try:
                self.conn.execute('BEGIN IMMEDIATE')
                cursor = self.conn.execute(sql, params)
                self.conn.execute('COMMIT')
            except sqlite3.Error as exc:
                try:
                    if self.conn.in_transaction:
                        self.conn.execute('ROLLBACK')
                except sqlite3.Error:
                    pass   # closed, or the rollback failed too: nothing of it was committed
                raise self._error('write failed', exc) from None
            return CommittedTicket(cursor.lastrowid)

    def query(self, sql: str, params=()) -> list[dict]:
        """Committed rows, as dicts."""
        with self._lock:
            try:
                return [dict(r) for r in self.conn.execute(sql, params).fetchall()]
            except sqlite3.DatabaseError as exc:
                raise self._error('cannot read', exc) from None

    def next_id(self, table: str) -> None:
        """None: the database assigns ids (other processes may write the same file)."""
        return None

    def close(self) -> None:
        with self._lock:
            self.conn.close()
