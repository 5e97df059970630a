"""Disk budgets: what each tier and the whole root use, the WARN (80 %) / ERROR (95 %) check with
the numbers, and the gate that stops writes when the total budget is spent. Usage of a database
is read from its header (pages in use, not free pages) plus its WAL, so deletions count at once
and no connection is needed."""
from __future__ import annotations

import os
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from loom_ros.storage.errors import StorageFullError
from loom_ros.storage.layout import StorageLayout
from loom_ros.telemetry.diagnostics import ERROR, OK, WARN, CheckResult

TIERS = ('warm', 'cold', 'archive')


@dataclass
class Budgets:
    """Bytes; 0 means no limit."""

    total_bytes: int = 0
    warm_bytes: int = 0
    cold_bytes: int = 0
    archive_bytes: int = 0
    warn_fraction: float = 0.80
    error_fraction: float = 0.95

    def of(self, tier: str) -> int:
        return int(getattr(self, f'{tier}_bytes'))


def db_used_bytes(path: str | os.PathLike) -> int:
    """Pages in use (header: size in pages minus free pages) times the page size, plus the WAL."""
    try:
        with open(path, 'rb') as stream:
            head = stream.read(100)
    except OSError:
        return 0
    if len(head) < 100 or not head.startswith(b'SQLite format 3\0'):
        try:
            return os.stat(path).st_size
        except OSError:
            return 0
    page = struct.unpack_from('>H', head, 16)[0]
    page = 65536 if page == 1 else page
    pages, free = struct.unpack_from('>I', head, 28)[0], struct.unpack_from('>I', head, 36)[0]
    used = max(0, pages - free) * page
    try:
        used += os.stat(f'{path}-wal').st_size
    except OSError:
        pass
    return used


def root_used_bytes(layout: StorageLayout, extra: int = 0, archive_walked: bool = False) -> int:
    """Every file under the root (agents, unit databases, cold indexes, audit, consent, router
    history, blobs, recordings, traces, plugin data, ...): SQLite databases (`*.db`) by pages in
    use plus their WAL, other files by size; links are not followed. The archive objects are
    `extra` (the databases account for them, wherever the object store keeps them), so
    `objects/archive` is not walked, unless `archive_walked` (a writer that reads no archive
    table: the local files are what it counts)."""
    total = 0
    skip = None if archive_walked else layout.objects / 'archive'
    for folder, dirs, files in os.walk(layout.root, followlinks=False):
        if skip is not None and Path(folder) == skip:
            dirs[:] = []
            continue
        for name in files:
            if name.endswith(('-wal', '-shm', '-journal')):
                continue   # with their database
            path = os.path.join(folder, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            total += db_used_bytes(path) if name.endswith('.db') else info.st_size
    return total + extra


def budget_check(name: str, used: int, budget: int, warn: float = 0.8,
                 error: float = 0.95) -> CheckResult:
    """WARN from `warn`, ERROR from `error` of the budget, with the numbers."""
    values = {'used_bytes': str(used), 'budget_bytes': str(budget)}
    if budget <= 0:
        return CheckResult(OK, f'{name}: {used:,} bytes (no budget)', values)
    fill = used / budget
    values['fill'] = f'{fill:.3f}'
    text = f'{name}: {used:,} of {budget:,} bytes ({100 * fill:.1f} %)'
    if fill >= error:
        return CheckResult(ERROR, f'{text}: past {100 * error:.0f} %; archive then cold data is '
                           'being deleted and writes stop at 100 %: raise the budget or free space',
                           values)
    if fill >= warn:
        return CheckResult(WARN, f'{text}: past {100 * warn:.0f} %', values)
    return CheckResult(OK, text, values)


class BudgetGate:
    """Called by the writer before each batch: raises StorageFullError while the root's total
    budget is spent. Measures at most every `period_s` (a walk of the root: file headers of the
    databases, sizes of the rest)."""

    def __init__(self, layout: StorageLayout, total_bytes: int, extra_bytes=None,
                 period_s: float = 0.5, monotonic=time.monotonic):
        """`extra_bytes`: archive bytes the databases account for (None: the local archive
        files are walked instead; archives on S3 then do not count)."""
        self.layout, self.total, self.extra = layout, int(total_bytes), extra_bytes
        self.period_s, self.monotonic = period_s, monotonic
        self._next, self.used, self.refused = 0.0, 0, 0
        self._lock = threading.Lock()

    def measure(self) -> int:
        if self.extra is None:
            self.used = root_used_bytes(self.layout, archive_walked=True)
        else:
            self.used = root_used_bytes(self.layout, self.extra())
        return self.used

    def __call__(self) -> None:
        if self.total <= 0:
            return
        with self._lock:
            now = self.monotonic()
            if now >= self._next:
                self.measure()
                self._next = now + self.period_s
            if self.used >= self.total:
                self.refused += 1
                raise StorageFullError(
                    f'storage root {self.layout.root}: {self.used:,} of {self.total:,} bytes '
                    'budget used (storage.budget.total_bytes); writes stop until the lifecycle '
                    'frees archive or cold data or the budget is raised; nothing committed is lost')
