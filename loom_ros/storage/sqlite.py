"""The one place Loom opens SQLite: WAL, synchronous level, a busy timeout, an optional byte cap
(max_page_count, so a budget behaves like a full disk) and read-only opens for readers. A file
that is not a database, or one that fails its quick check, is a CorruptRecordError naming it.
Checkpointer moves a writer's WAL checkpoints off its commits."""
from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from urllib.parse import quote

from loom_ros.storage.errors import CorruptRecordError, StorageError

SYNCHRONOUS = ('OFF', 'NORMAL', 'FULL', 'EXTRA')


def open_database(path: str | os.PathLike, *, read_only: bool = False, synchronous: str = 'NORMAL',
                  max_bytes: int = 0, busy_timeout_ms: int = 5000,
                  check: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode (isolation_level=None: transactions are explicit BEGIN /
    COMMIT, so nothing commits behind the caller's back). WAL + synchronous=NORMAL: a killed
    process (even SIGKILL) loses nothing committed; only a power cut may lose the last
    transactions (use FULL where that matters: group commit makes its fsync affordable)."""
    memory = str(path) == ':memory:'   # a private, temporary database (tests, replays)
    path = Path(path)
    synchronous = str(synchronous).upper()
    if synchronous not in SYNCHRONOUS:
        raise StorageError(f'storage.synchronous {synchronous!r}: one of {", ".join(SYNCHRONOUS)}')
    try:
        if read_only:
            if not path.is_file():
                raise StorageError(f'{path}: no such database')
            conn = sqlite3.connect(read_only_uri(path), uri=True, isolation_level=None,
                                   check_same_thread=False)
        else:
            if not memory:
                path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    except OSError as exc:
        raise StorageError(f'{path}: cannot open: {exc.strerror}') from None
    except sqlite3.Error as exc:
        raise StorageError(f'{path}: cannot open: {exc}') from None
    try:
        conn.execute(f'PRAGMA busy_timeout={int(busy_timeout_ms)}')
        if check:
            row = conn.execute('PRAGMA quick_check(1)').fetchone()
            if row[0] != 'ok':
                raise CorruptRecordError(f'{path}: the database is damaged ({row[0]}); it was left '
                                         'as is for inspection')
        if not read_only and not memory:
            mode = conn.execute('PRAGMA journal_mode=WAL').fetchone()[0]
            if mode.lower() != 'wal':
                raise StorageError(f'{path}: cannot switch to WAL (journal_mode is {mode})')
            conn.execute(f'PRAGMA synchronous={synchronous}')
            if max_bytes:
                set_max_bytes(conn, max_bytes)
    except sqlite3.DatabaseError as exc:
        conn.close()
        text = str(exc)
        if 'not a database' in text or 'malformed' in text:
            raise CorruptRecordError(f'{path}: not a usable SQLite database ({text}); it was left '
                                     'as is for inspection') from None
        if 'readonly' in text or 'unable to open' in text:
            raise StorageError(f'{path}: cannot write there ({text})') from None
        raise StorageError(f'{path}: cannot open: {text}') from None
    except StorageError:
        conn.close()
        raise
    return conn


def read_only_uri(path: str | os.PathLike) -> str:
    """An SQLite URI that opens `path` read-only: writes fail in SQLite itself, whatever the SQL
    says ('?' or '#' in a path are quoted, not read as URI syntax)."""
    return f'file:{quote(os.path.abspath(os.path.expanduser(str(path))))}?mode=ro'


def set_max_bytes(conn: sqlite3.Connection, max_bytes: int) -> None:
    """Cap the main database file at about `max_bytes` (never below what it holds already)."""
    page = conn.execute('PRAGMA page_size').fetchone()[0]
    conn.execute(f'PRAGMA max_page_count={max(1, int(max_bytes) // page)}')


def file_bytes(path: str | os.PathLike) -> int:
    """A database's bytes on disk, with its WAL and shared-memory files."""
    total = 0
    for suffix in ('', '-wal', '-shm'):
        try:
            total += os.stat(f'{path}{suffix}').st_size
        except OSError:
            pass
    return total


def integrity_ok(path: str | os.PathLike) -> str:
    """'ok' or the first problem PRAGMA integrity_check reports."""
    conn = sqlite3.connect(read_only_uri(path), uri=True)
    try:
        return conn.execute('PRAGMA integrity_check(1)').fetchone()[0]
    finally:
        conn.close()


class Checkpointer:
    """Copies a database's WAL back into its file on a thread and connection of its own, so a
    checkpoint's fsyncs never stall a commit: SQLite's automatic checkpoint runs inside the
    COMMIT that crosses wal_autocheckpoint, and in the paced storage bench those commits took
    264-351 ms of wall time for 13-16 ms of CPU. Every `period_s` a PASSIVE checkpoint (it never
    blocks the writer nor waits for readers). The writer keeps SQLite's automatic checkpoint at
    `backstop_pages` (opened with `backstop()`), so the WAL stays bounded if this thread falls
    behind or fails; a failure is counted and kept in `error`, the thread goes on."""

    def __init__(self, path: str | os.PathLike, period_s: float = 0.25, name: str = 'storage'):
        self.path, self.period_s = Path(path), max(0.01, float(period_s))
        self.runs = self.failures = 0
        self.error = ''
        self._stop = threading.Event()
        self._conn = open_database(self.path, check=False)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f'{name}-checkpoint', daemon=True)
        try:
            self._thread.start()
        except BaseException:
            self._conn.close()
            raise

    BACKSTOP_PAGES = 16384   # 64 MB of 4 KB pages: SQLite's default is 1,000

    @classmethod
    def backstop(cls, conn: sqlite3.Connection, max_db_bytes: int = 0) -> int:
        """Move `conn`'s automatic checkpoint out to BACKSTOP_PAGES (the checkpointer does the
        rest), or to a quarter of a byte cap (`max_db_bytes`, which the WAL is outside of), at
        least SQLite's 1,000; the WAL file is cut back to that size when it restarts. Returns the
        pages."""
        page = conn.execute('PRAGMA page_size').fetchone()[0]
        pages = cls.BACKSTOP_PAGES
        if max_db_bytes:
            pages = max(1000, min(pages, int(max_db_bytes) // page // 4))
        conn.execute(f'PRAGMA wal_autocheckpoint={pages}')
        conn.execute(f'PRAGMA journal_size_limit={pages * page}')
        return pages

    def run_once(self) -> tuple[int, int, int]:
        """One PASSIVE checkpoint: (busy, WAL frames, frames copied into the file)."""
        with self._lock:
            if self._conn is None:
                return (0, 0, 0)
            row = self._conn.execute('PRAGMA wal_checkpoint(PASSIVE)').fetchone()
        self.runs += 1
        return tuple(row)

    def tick(self) -> None:
        """One turn of the thread: a checkpoint, a failure counted (never raised)."""
        try:
            self.run_once()
        except sqlite3.Error as exc:   # the writer's backstop still bounds the WAL
            self.failures += 1
            self.error = str(exc)[:200]

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.tick()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
