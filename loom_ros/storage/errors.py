"""The storage layer's errors: each says which file and why, so an operator can act on it."""
from __future__ import annotations

import sqlite3


class StorageError(RuntimeError):
    """Something Loom cannot store or read; the message names the file and the reason."""


class StorageFullError(StorageError):
    """Writes are refused: the disk (or the configured byte budget) is full. Nothing committed
    before is lost; free space or raise the budget, then writes resume."""


class CorruptRecordError(StorageError):
    """A stored record (or file) that cannot be decoded; it is left as is for inspection."""


class IndexMismatchError(StorageError):
    """The cold tier's vector index does not match its rows; `loom storage compact
    --rebuild-index` rebuilds it from the rows (no re-embedding)."""


def is_full(exc: BaseException) -> bool:
    """SQLite's 'database or disk is full' (SQLITE_FULL), whether from the disk or max_page_count."""
    if isinstance(exc, OSError):
        import errno
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(exc, 'sqlite_errorcode', None)
    return code == sqlite3.SQLITE_FULL or 'database or disk is full' in str(exc)
