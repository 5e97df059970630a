"""Disk budgets: what each tier and the whole root use, the WARN (80 %) / ERROR (95 %) check with
the numbers, and the gate that stops writes when the total budget is spent. Loom's own databases
count their pages in use (from the header, checked against the file), so deletions count at once
and no connection is needed; every other file, side files and plugin data included, counts its
size."""
from __future__ import annotations

import os
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
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


# A walk of the root stops past this many entries (files and folders): a root that holds more
# is measured as over any budget (BudgetGate), since what the rest holds is unknown.
MAX_WALK_ENTRIES = 1_000_000


def _db_file_bytes(path: str | os.PathLike, size: int) -> int:
    """A database file's pages in use (header: size in pages minus free pages, times the page
    size), so rows the lifecycle deleted count at once; its size when the header is not
    SQLite's or does not describe this file (size in pages times page size is not the file's
    size, or the in-header size is stale), so a file that only claims free pages counts whole."""
    try:
        with open(path, 'rb') as stream:
            head = stream.read(100)
    except OSError:
        return size
    if len(head) < 100 or not head.startswith(b'SQLite format 3\0'):
        return size
    page = struct.unpack_from('>H', head, 16)[0]
    page = 65536 if page == 1 else page
    pages, free = struct.unpack_from('>I', head, 28)[0], struct.unpack_from('>I', head, 36)[0]
    counter, valid_for = struct.unpack_from('>I', head, 24)[0], struct.unpack_from('>I', head, 92)[0]
    if counter != valid_for or pages * page != size or free > pages:
        return size
    return (pages - free) * page


def db_used_bytes(path: str | os.PathLike) -> int:
    """One database's use: its file (pages in use, see _db_file_bytes) plus its WAL."""
    used = 0
    for suffix in ('', '-wal'):
        try:
            size = os.stat(f'{path}{suffix}').st_size
        except OSError:
            continue
        used += _db_file_bytes(path, size) if not suffix else size
    return used


@dataclass(frozen=True)
class RootUsage:
    """A walk's result: `complete` is False when it stopped at `max_entries` (bytes is then
    what the part walked holds, a lower bound); `sizes`: the file size the walk saw of each
    path it was asked to note (absent: not found)."""

    bytes: int
    entries: int
    complete: bool
    sizes: dict = field(default_factory=dict)


def measure_root(layout: StorageLayout, extra: int = 0, archive_walked: bool = False,
                 max_entries: int = MAX_WALK_ENTRIES, noted=()) -> RootUsage:
    """Every file under the root (agents, unit databases, cold indexes, audit, consent, router
    history, blobs, recordings, traces, plugin data, ...), links not followed. SQLite databases
    (`*.db`) count their pages in use; every other file, WAL, shared-memory and journal files
    included, counts its size, and so does everything under `<root>/plugins` (plugins write
    there: a plugin's file counts what it takes on disk, whatever its header says). The archive
    objects are `extra` (the databases account for them, wherever the object store keeps them),
    so `objects/archive` is not walked, unless `archive_walked` (a writer that reads no archive
    table: the local files are what it counts). The walk stops past `max_entries`."""
    total, entries, noted, sizes = 0, 0, frozenset(str(n) for n in noted), {}
    skip = None if archive_walked else layout.objects / 'archive'
    plugins = str(layout.root / 'plugins')
    for folder, dirs, files in os.walk(layout.root, followlinks=False):
        if skip is not None and Path(folder) == skip:
            dirs[:] = []
            continue
        entries += len(dirs) + len(files)
        if entries > max_entries:
            return RootUsage(total + extra, entries, False, sizes)
        headers_read = not (folder == plugins or folder.startswith(plugins + os.sep))
        for name in files:
            path = os.path.join(folder, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            if path in noted:
                sizes[path] = info.st_size
            total += (_db_file_bytes(path, info.st_size) if headers_read and name.endswith('.db')
                      else info.st_size)
    return RootUsage(total + extra, entries, True, sizes)


def root_used_bytes(layout: StorageLayout, extra: int = 0, archive_walked: bool = False) -> int:
    """measure_root's bytes (a lower bound when the walk stopped at MAX_WALK_ENTRIES)."""
    return measure_root(layout, extra, archive_walked).bytes


def _size(path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


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
    budget is spent. The first call measures (a walk of the root: database headers, sizes of
    the rest); later ones read the last measurement and, once it is `period_s` old, start the
    next one on a thread of its own, so a large root never stalls a batch. A walk's CPU stays
    a small share: the next starts no sooner than `WALK_SHARE`'s inverse times the last one's
    duration, and no later than MAX_WALK_INTERVAL_S. Between walks, what the `watched` files
    (the writer's own database and WAL: `watch`) grew since the last walk counts at once, so
    a writer's own batches never go unseen for long. A root too large to walk
    (MAX_WALK_ENTRIES) counts as over budget."""

    WALK_SHARE = 0.05
    MAX_WALK_INTERVAL_S = 30.0

    def __init__(self, layout: StorageLayout, total_bytes: int, extra_bytes=None,
                 period_s: float = 0.5, monotonic=time.monotonic,
                 max_entries: int = MAX_WALK_ENTRIES, background: bool = True):
        """`extra_bytes`: archive bytes the databases account for (None: the local archive
        files are walked instead; archives on S3 then do not count). `background`: False
        measures in the caller (tests that step a clock)."""
        self.layout, self.total, self.extra = layout, int(total_bytes), extra_bytes
        self.period_s, self.monotonic = period_s, monotonic
        self.max_entries, self.background = max_entries, background
        self.usage: RootUsage | None = None
        self.refused, self.measures = 0, 0
        self._next = 0.0
        self._measuring = False
        self._lock = threading.Lock()
        self._watched: dict[str, int] = {}   # path -> its size at the last walk

    def watch(self, *paths) -> None:
        """Files whose growth since the last walk counts at every call (a stat each)."""
        with self._lock:
            for path in paths:
                self._watched.setdefault(str(path), _size(path))

    def _grown(self) -> int:
        """What the watched files together grew since the last walk: together, since a
        checkpoint moves pages from the WAL into the database (the WAL cut back, the database
        grown) and counted apart that would count them twice (a false full stops the writer)."""
        watched = list(self._watched.items())
        return max(0, sum(_size(path) for path, _at in watched) - sum(at for _p, at in watched))

    @property
    def used(self) -> int:
        return self.usage.bytes + self._grown() if self.usage is not None else 0

    def measure(self) -> RootUsage:
        started = self.monotonic()
        with self._lock:
            watched = list(self._watched)
        extra = 0 if self.extra is None else int(self.extra())
        # the watched files' baselines are the sizes the walk itself saw (growth during the
        # walk is then in the walk alone, never counted twice: a false full stops a writer)
        usage = measure_root(self.layout, extra, archive_walked=self.extra is None,
                             max_entries=self.max_entries, noted=watched)
        finished = self.monotonic()
        with self._lock:
            self.usage, self.measures = usage, self.measures + 1
            self._watched.update({path: usage.sizes.get(path, 0) for path in watched})
            self._next = finished + min(self.MAX_WALK_INTERVAL_S, max(
                self.period_s, (finished - started) / self.WALK_SHARE))
            self._measuring = False
        return usage

    def _measure_quietly(self) -> None:
        try:
            self.measure()
        except Exception:  # noqa: BLE001 - an unreadable root: the last measurement stands
            with self._lock:
                self._measuring = False
                self._next = self.monotonic() + self.period_s

    def __call__(self) -> None:
        if self.total <= 0:
            return
        with self._lock:
            first = self.usage is None
            stale = not self._measuring and self.monotonic() >= self._next
            if stale and not first:
                self._measuring = True
        if first:
            self.measure()
        elif stale:
            try:
                if not self.background:
                    raise RuntimeError('measured in the caller')
                threading.Thread(target=self._measure_quietly, name='loom-budget-walk',
                                 daemon=True).start()
            except RuntimeError:   # no thread to be had (or none wanted): measure here
                self._measure_quietly()
        with self._lock:   # the walk and its baselines are replaced together
            usage, grown = self.usage, self._grown()
        if not usage.complete:
            self.refused += 1
            raise StorageFullError(
                f'storage root {self.layout.root}: more than {self.max_entries:,} files and '
                'folders under it, too many to measure against storage.budget.total_bytes; '
                'writes stop until some are removed; nothing committed is lost')
        used = usage.bytes + grown
        if used >= self.total:
            self.refused += 1
            raise StorageFullError(
                f'storage root {self.layout.root}: {used:,} of {self.total:,} bytes '
                'budget used (storage.budget.total_bytes); writes stop until the lifecycle '
                'frees archive or cold data or the budget is raised; nothing committed is lost')
