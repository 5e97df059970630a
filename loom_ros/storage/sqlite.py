"""The one place Loom opens SQLite: WAL, synchronous level, a busy timeout, an optional byte cap
(max_page_count, so a budget behaves like a full disk) and read-only opens for readers. A file
that is not a database, or one that fails its quick check, is a CorruptRecordError naming it."""
from __future__ import annotations

import os
import sqlite3
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
