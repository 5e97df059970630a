"""The one place Loom opens SQLite: WAL, synchronous level, a busy timeout, an optional byte cap
(max_page_count, so a budget behaves like a full disk) and read-only opens for readers. A file
that is not a database, or one that fails its quick check, is a CorruptRecordError naming it.
Checkpointer moves a writer's WAL checkpoints off its commits.

Modes: what Loom keeps is nobody else's business (episodes are plaintext unless encryption is
on). A database a writer creates is made 0600 before SQLite opens it (SQLite gives its -wal,
-shm and -journal files the database file's mode), whatever the umask (no umask change: it is
process-wide); the folders made for it are 0700 (make_folders). An existing database, -wal,
-shm or -journal that group or others may use is tightened (chmod go-rwx) when this user owns
it, refused otherwise (private_path); the storage root and its db/ folder likewise
(private_folder, called by Storage and StorageService). Read-only opens change no mode."""
from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
from pathlib import Path
from urllib.parse import quote

from loom_ros.storage.errors import CorruptRecordError, StorageError

SYNCHRONOUS = ('OFF', 'NORMAL', 'FULL', 'EXTRA')
_log = logging.getLogger('loom.storage')
FOLDER_MODE = 0o700    # the storage root and every folder made for a database
FILE_MODE = 0o600      # every database file (its -wal, -shm and -journal follow it)
DATABASE_SUFFIXES = ('', '-wal', '-shm', '-journal')


def make_folders(path: str | os.PathLike) -> Path:
    """`path` as a folder: each missing one on the way made 0700 (existing ones untouched)."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.parent != path:
        make_folders(path.parent)
    try:
        os.mkdir(path, FOLDER_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
    return path


def private_path(path: str | os.PathLike, what: str, *, strict: bool = True) -> None:
    """`path` (a file or folder that exists) made private if group or others may use it: this
    user's own is tightened (chmod go-rwx; where the file system refuses that, a warning is
    logged and it is used as it is); one of another user, or a shared sticky folder such as
    /tmp, is a StorageError (`strict`) or left as it is (not `strict`: a reader)."""
    try:
        info = os.stat(path)
    except OSError:
        return
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return
    if info.st_uid != os.geteuid():
        why = f'owned by uid {info.st_uid}, not this user (uid {os.geteuid()})'
    elif stat.S_ISDIR(info.st_mode) and mode & stat.S_ISVTX:
        why = 'a shared folder (sticky bit)'
    else:
        try:
            os.chmod(path, mode & ~0o077)
        except OSError as exc:   # a file system without modes (vfat, some shares): said, used
            _log.warning('%s: mode %04o lets group or others at %s and it cannot be tightened '
                         '(%s): keep storage.root on a file system with permissions', path, mode,
                         what, exc.strerror)
        return
    if strict:
        raise StorageError(f'{path}: mode {mode:04o} lets group or others at {what}; {why}. '
                           'Refusing it: chmod go-rwx it as its owner, or use a storage.root '
                           'of your own')


def private_folder(path: str | os.PathLike, what: str = 'the storage', *,
                   strict: bool = True) -> Path:
    """`path` made (0700) or, existing, made private as private_path says."""
    path = Path(path)
    try:
        make_folders(path)
    except OSError as exc:
        raise StorageError(f'{path}: cannot create: {exc.strerror}') from None
    private_path(path, what, strict=strict)
    return path


def _private_database(path: Path) -> None:
    """A new database file created 0600 before SQLite opens it (its -wal and -shm then get the
    same mode); an existing one and its companions made private (private_path, strict)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0) | \
        getattr(os, 'O_CLOEXEC', 0)
    try:
        os.close(os.open(path, flags, FILE_MODE))
    except FileExistsError:
        pass
    except OSError:
        return   # no such folder, no permission: SQLite's own open says so below
    for suffix in DATABASE_SUFFIXES:
        private_path(f'{path}{suffix}', 'this database')


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
                make_folders(path.parent)
                _private_database(path)
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
