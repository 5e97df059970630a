"""The data lifecycle of one storage database: warm events (full, in SQLite) older than warm_s
are condensed into cold memories (vector + what/when/source/how many; raw payloads dropped),
cold memories older than cold_s go to compressed append-only archive files in the object store,
archive files older than archive_s are deleted. A policy per agent or event type keeps, skips or
shortens tiers. Every move is one SQLite transaction (archive files are written before, as
`pending`, and only count once that transaction commits), runs off the hot path in small
batches, and reads ages from an injected clock. Past a budget, the oldest archive then cold data
goes first; agent state, audit and router history are never deleted by the lifecycle.

Ages are measured from `stored_ms`: when this store wrote the row (its own clock then; for a
cold memory or an archive file, the newest of the rows it holds), never from the event's
`time_ms`, which its publisher wrote (an event stamped 1970 or 2**63 ages like any other; its
time_ms stays what queries by time see). Episodes are walked in id order, the order they were
written in (no index on stored_ms on the hot write path). A row stamped 0 (written while the
writer's clock was not believable, or by an older writer) is stamped with the first believable
round's clock when the lifecycle reaches it: its age starts then, never earlier.

The clock is checked at every move (`clock_now`); a move whose clock is not believable ages
nothing and counts the round in MoveReport.clock_untrusted (once per round); `clock_status`
says why and counts the episodes (the storage node WARNs on /diagnostics once per episode).
The wall clock is held against a monotonic clock (CLOCK_BOOTTIME: it never steps and counts
suspend): the first believable reading fixes their offset, and only a step found moves it.
- Before CLOCK_FLOOR_MS (2023-01-01; a robot without a real-time clock boots at 1970) or past
  year 3000: not believable (and not a reading the offset is taken from).
- A step: the offset moved by more than clock_tolerance_s (against the fixed offset, so steps
  under the tolerance add up and are found together). That round is skipped and the rows the
  old clock stamped are shifted by the step, so each row's age is the real time it has been
  held. Forward: every row stamped below what the old clock reads now (or the new clock read
  at the previous check, whichever is later). Back: every episode committed by the previous
  check (the writer stamps a row in its transaction), every row stamped after now, every cold
  memory and archive file. A row whose clock cannot be told (written between the previous
  check and the step) is left or shifted the way that makes it younger, never older. A step
  back and its correction cancel out.
- A step while no lifecycle ran: the offset, the boot's id and the newest episode id are kept
  in `meta` (the mark, written every minute and with every shift, in the shift's transaction:
  a restart never shifts twice); the next open on the same boot finds the step as above. On
  another boot nothing relates the clocks: a forward step cannot be told from time that
  passed (rows age as if it had), and a step back is caught by the next rule.
- Behind what this store already holds by more than clock_tolerance_s (the newest stored_ms,
  the last believable round's clock, also the mark): the clock went back where it could not
  be measured. Rows stamped ahead of it look younger than they are, which never deletes early;
  once the clock has run behind for clock_settle_s of the monotonic clock it is believed, the
  rows stamped after it are restamped to it (their ages restart: later, never earlier), and
  the moves go on.
Without a monotonic clock (an injected wall clock alone) steps are not found. So no row is
moved or deleted before it has been held its tier's age in real elapsed time (within the
tolerance), whatever the wall clock did, but for a forward step across a reboot.

Timestamps are bounded (schema.bounded_ms) before any arithmetic: days of keys, summaries and
buckets of a stamp before 1970 or past year 3000 use the bound.

One mover per database at a time (an flock on <root>/cold/<unit>.lock)."""
from __future__ import annotations

import calendar
import fcntl
import fnmatch
import gzip
import json
import math
import os
import re
import sqlite3
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from loom_ros.config.params import read_yaml, refuse_unknown_keys
from loom_ros.security.keyring import day_of
from loom_ros.storage.backend.encrypted import EncryptedObjectStore
from loom_ros.storage.backend.local import LinkRefusedError
from loom_ros.storage.base import ObjectStore
from loom_ros.storage.budget import Budgets, budget_check, root_used_bytes
from loom_ros.storage.cold import ADD, REMOVE, ColdIndex, IndexParams, decode, encode
from loom_ros.storage.errors import StorageError, is_full, StorageFullError
from loom_ros.storage.layout import StorageLayout, check_name
from loom_ros.storage.rowcipher import RowCipher, check_marker, cold_context, episode_context
from loom_ros.storage.schema import CLOCK_FLOOR_MS, MAX_TIME_MS, bounded_ms
from loom_ros.storage.sqlite import open_database
from loom_ros.telemetry.diagnostics import ERROR, OK, WARN, CheckResult

DAY_S = 86400.0
MAX_ARCHIVE_BYTES = 256 * 1024 * 1024    # of an archive file once decompressed (gzip bombs)
MAX_ARCHIVE_LINE = 16 * 1024 * 1024
MAX_DUE_PAGES = 20   # pages of move_batch rows one move looks at for due rows (then resumes)
_START = (-2**63, 0)   # before every (time, id)
MAX_AGE_S = 1000 * 365.25 * DAY_S   # a tier age past this is this (TierPolicy)
_YEAR_1_MS = -62_135_596_800_000   # 0001-01-01 UTC: the earliest day a key can be named by
MARK_KEY = 'lifecycle_clock_ms'   # meta: the last believable round's clock (restarts check it)
MARK_EVERY_MS = 60_000            # how often that mark is written (one small write)
_BOOT_TOKEN = re.compile(r'[0-9A-Za-z-]{1,64}')
SHIFT_KEY = 'lifecycle_shift'     # meta: a restamp after a clock step under way (_restamp)
# The restamps a plan may name: (set expression, where, number of arguments). A plan in meta
# names one of these, never SQL: a damaged value is refused, not run.
RESTAMPS = {
    'ahead': ('min(stored_ms + ?, ?)', 'stored_ms >= ? and stored_ms < ?', 4),
    'back': ('max(stored_ms + ?, ?)', 'stored_ms >= ?', 3),
    'back_episodes': ('max(stored_ms + ?, ?)', 'stored_ms >= ? and (id <= ? or stored_ms > ?)',
                      5),
    'settle': ('?', 'stored_ms > ?', 2),
}
_STAMPED = ('episodes', 'cold', 'archive')
MAX_SHIFT_PLAN = 16_384           # characters of that plan read back
_BOOTTIME = getattr(time, 'CLOCK_BOOTTIME', None)


def boottime() -> float:
    """Seconds of a clock that never steps and counts time suspended (CLOCK_BOOTTIME; the
    monotonic clock where there is none): what a wall-clock step is measured against."""
    return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


_WALL = object()   # Lifecycle's monotonic default: boottime with the wall clock, none injected
_BOOT_ID = '/proc/sys/kernel/random/boot_id'


def boot_id() -> str | None:
    """This boot's id (Linux: a random UUID per boot), what tells whether a monotonic reading
    kept from an earlier process is of this boot; None where there is none."""
    try:
        with open(_BOOT_ID, 'rb') as f:
            text = f.read(64).decode('ascii', 'replace').strip()
    except OSError:
        return None
    return text if _BOOT_TOKEN.fullmatch(text) else None


def _span(ms: int) -> str:
    """A duration for a message: '5.0 years', '3.2 days', '90 s'."""
    s = abs(ms) / 1000
    for unit, size in (('years', 365.25 * 86400), ('days', 86400), ('hours', 3600)):
        if s >= size:
            return f'{s / size:.1f} {unit}'
    return f'{s:.0f} s'


@dataclass(frozen=True)
class TierPolicy:
    """Ages in seconds since the row was stored. cold/archive False skip that tier; archive_s 0
    keeps archive files until the budget needs the space. An age past MAX_AGE_S (a 'for ever'
    written as 1e17) is MAX_AGE_S: the age in ms stays an integer SQLite can compare."""

    warm_s: float = DAY_S
    cold_s: float = 30 * DAY_S
    archive_s: float = 0.0
    cold: bool = True
    archive: bool = True

    def __post_init__(self):
        for name in ('warm_s', 'cold_s', 'archive_s'):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not value <= MAX_AGE_S:   # NaN too: not an age, kept for ever
                object.__setattr__(self, name, MAX_AGE_S)


@dataclass(frozen=True)
class PolicyRule:
    agent: str = '*'
    type: str = '*'
    policy: TierPolicy = TierPolicy()


_RULE_KEYS = {'agent', 'type', 'warm_s', 'cold_s', 'archive_s', 'cold', 'archive'}
MAX_RULES = 256


def load_policies(path: str, default: TierPolicy) -> list[PolicyRule]:
    """Rules from a YAML list (first match wins): `- {type: 'sensor.imu.*', cold: false,
    archive: false, warm_s: 600}`. Bad files raise StorageError naming the rule and key."""
    if not path:
        return []
    data = read_yaml(path, StorageError)
    if data is None:
        return []
    if not isinstance(data, list) or len(data) > MAX_RULES:
        raise StorageError(f'{path}: expected a list of at most {MAX_RULES} rules')
    rules = []
    for n, item in enumerate(data):
        if not isinstance(item, dict):
            raise StorageError(f'{path}: rule {n}: expected a mapping')
        refuse_unknown_keys(item, _RULE_KEYS, f'{path}: rule {n}', StorageError)
        changes = {}
        for key in ('warm_s', 'cold_s', 'archive_s'):
            if key in item:
                value = item[key]
                if (isinstance(value, bool) or not isinstance(value, (int, float))
                        or not math.isfinite(value) or value < 0):
                    raise StorageError(f'{path}: rule {n}: {key} must be a finite number >= 0, '
                                       f'got {str(value)[:40]}')
                changes[key] = float(value)
        for key in ('cold', 'archive'):
            if key in item:
                if not isinstance(item[key], bool):
                    raise StorageError(f'{path}: rule {n}: {key} must be true or false')
                changes[key] = item[key]
        patterns = [str(item.get(k, '*'))[:256] for k in ('agent', 'type')]
        rules.append(PolicyRule(patterns[0], patterns[1], replace(default, **changes)))
    return rules


@dataclass
class LifecycleParams:
    hot_s: float = 300.0
    default: TierPolicy = TierPolicy()
    rules: list = field(default_factory=list)
    bucket_s: float = 60.0        # events of one agent, type and source per bucket -> one memory
    move_batch: int = 5000        # rows per move transaction
    summary_chars: int = 200      # of a payload quoted in a memory's summary
    save_every: int = 50000       # cold changes between index saves (and at every run's end)
    # the clock (module docstring): a step or a lag smaller than this is believed (NTP slews,
    # a writer's stamp read just before ours); a clock behind what the store holds is believed
    # after this long on the monotonic clock
    clock_tolerance_s: float = 60.0
    clock_settle_s: float = 3600.0


@dataclass
class MoveReport:
    condensed: int = 0       # warm events -> cold
    memories: int = 0        # cold memories made
    archived: int = 0        # rows written to archive files
    deleted: int = 0         # rows deleted for age (policy without a later tier)
    archive_deleted: int = 0  # archive files deleted (age or budget)
    budget_deleted: int = 0  # cold rows deleted for the budget
    consent_deleted: int = 0  # due rows (warm events, cold memories) of data subjects without
    #                          `store` consent: deleted at the move, neither condensed nor archived
    clock_untrusted: int = 0  # rounds whose moves aged nothing: the clock was not believable
    budget_unreachable: int = 0  # rounds past the total budget that deleted nothing for it:
    #                             what the budget may not delete (state, warm, ...) exceeds it
    seconds: float = 0.0

    def add(self, other: 'MoveReport') -> None:
        for key in self.__dataclass_fields__:
            setattr(self, key, getattr(self, key) + getattr(other, key))


def _policy(rules, default, agent: str, type_: str) -> TierPolicy:
    for rule in rules:
        if fnmatch.fnmatchcase(agent, rule.agent) and fnmatch.fnmatchcase(type_, rule.type):
            return rule.policy
    return default


def _day_ms(day: str | None) -> int:
    """The first ms of a UTC day 'YYYY-MM-DD' (0 for none)."""
    if not day:
        return 0
    try:
        return int(calendar.timegm(time.strptime(day, '%Y-%m-%d'))) * 1000
    except (TypeError, ValueError):
        return 0


def _iso(ms: int) -> str:
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(bounded_ms(ms) / 1000))


@dataclass
class ClockStatus:
    """The lifecycle's view of its clock: `trusted` at the last check, else `reason`;
    `episodes`: how many times it stopped being believable (a step counts one); `skipped`:
    rounds that aged nothing for it; `last_reason` stays once the episode is over."""

    trusted: bool = True
    reason: str = ''
    last_reason: str = ''
    episodes: int = 0
    skipped: int = 0
    since_ms: int = 0


class Lifecycle:
    """Moves data between the tiers of one unit database; also serves cold-memory searches."""

    def __init__(self, layout: StorageLayout, unit: str, objects: ObjectStore, embedder,
                 params: LifecycleParams | None = None, budgets: Budgets | None = None,
                 index_params: IndexParams | None = None, clock: Callable[[], int] | None = None,
                 synchronous: str = 'NORMAL', read_only: bool = False, rebuild: bool = False,
                 check: bool = True, consent=None, monotonic=_WALL, boot=_WALL):
        """`clock`: the wall clock in ms (None: the system's). `monotonic`: seconds of a clock
        that never steps, what a step of the wall clock is told by (default: boottime() with
        the system's wall clock; none when a wall clock is injected alone: steps are then not
        detected). `boot`: this boot's id, what says whether the monotonic reading a previous
        process left is comparable (default: boot_id() with the default monotonic clock, else
        none: a step while no lifecycle ran is then not found). `check`: run SQLite's quick check on open (reads every page: a damaged file is a
        clear error here); erasure skips it, its VACUUM reads every page and fails the same.
        `consent`: the consent registry (anything with `lookup(subject, purpose)`) a move asks
        whether a row's data subject still gives `store` consent; None: the root's registry,
        read-only, with the shipped defaults (what Storage asks when it writes), opened at the
        first move that needs it."""
        self.layout, self.unit = layout, check_name(unit, 'storage unit')
        self.objects, self.embedder = objects, embedder
        self.params, self.budgets = params or LifecycleParams(), budgets or Budgets()
        self.clock = clock or (lambda: time.time_ns() // 1_000_000)
        self.monotonic = (boottime if clock is None else None) if monotonic is _WALL \
            else monotonic
        self._boot = (boot_id() if monotonic is _WALL and clock is None else None) \
            if boot is _WALL else boot
        if self._boot is not None and not _BOOT_TOKEN.fullmatch(str(self._boot)):
            self._boot = None
        self.clock_status = ClockStatus()
        self._base: int | None = None   # wall - monotonic (ms): moved only by a step found
        self._checked_mono = 0          # the monotonic clock (ms) at the previous check
        self._checked_id = self._base_id = 0   # the newest episode id then (committed by it)
        self._shift_pending = False     # a restamp plan in meta not run to its end yet
        self._move_top = 0              # the newest episode id when the clock was last read
        self._behind_since: float | None = None   # monotonic s since the clock runs behind
        self._last_trusted = 0                # the last believable check's wall clock
        self._mark = self._mark_written = 0   # meta MARK_KEY as read / last written
        self._last_step: int | None = None    # the last move (_round_now) and its verdict
        self._last_refused = self._round_counted = False
        self.path = layout.database(unit)
        if not self.path.is_file():
            raise StorageError(f'{self.path}: no such storage database')
        self.read_only = read_only
        self.index = ColdIndex(layout.cold_index(unit), index_params or IndexParams())
        self.totals = MoveReport()
        self.unsaved = 0
        self._lock_fd = -1
        self._consent, self._own_consent = consent, None
        self._cursor: dict[str, tuple] = {}   # where the next look for due rows resumes
        self.links_refused = 0   # archive objects recovery did not follow (links): left alone
        self.sealed_unreadable = 0   # retention rounds that shredded no day key: a unit
        #                              database of the root could not be read
        self.budget_floor: dict | None = None   # set by enforce_budgets: the total unreachable
        # Payloads and summaries in SQLite under the subject's key when archives are encrypted
        # (one setting, storage.encryption.enabled: docs/encryption.md).
        self.cipher = RowCipher(objects.keyring if isinstance(objects, EncryptedObjectStore)
                                else None)
        if read_only:   # a reader (CLI, tools): no lock, no recovery, never saves
            self.conn = open_database(self.path, read_only=True)
            self.index.load(self.conn)
            return
        lock_path = layout.cold_index(unit).with_suffix('.lock')
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:   # e.g. <root>/cold is a file
            folder = lock_path.parent
            what = 'is not a folder' if folder.exists() and not folder.is_dir() else \
                f'cannot be used: {exc.strerror or exc}'
            raise StorageError(f'{folder}: the cold tier\'s folder (index and lifecycle lock) '
                               f'{what}; move it aside') from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise StorageError(f'{self.path}: another process runs its lifecycle') from None
        self.conn = None
        try:
            self.conn = open_database(self.path, synchronous=synchronous, check=check)
            from loom_ros.storage import schema
            schema.ensure(self.conn, self.path, now_ms=self.clock())
            self._read_mark()
            self._shift_pending = self.conn.execute(   # a restamp a crash cut short: resumed
                'select 1 from meta where key = ?', (SHIFT_KEY,)).fetchone() is not None
            self._check_encryption()
            self.recover()
            if rebuild:   # loom storage compact --rebuild-index: a new index from the rows
                self.index.rebuild(self.conn)
                self.save_index(force=True)
            else:
                self.index.load(self.conn)
        except BaseException:
            if self.conn is not None:
                self.conn.close()
            os.close(self._lock_fd)
            raise

    def _check_encryption(self) -> None:
        """Rows encrypted before and no key now: refused (this would condense them into
        plaintext memories beside them); with the key, the database is marked."""
        check_marker(self.conn, self.path, self.cipher.on)

    # -- recovery --------------------------------------------------------------------------------
    def _prefix(self) -> str:
        return f'archive/{self.unit}/'

    def recover(self) -> int:
        """Undo archive writes a crash left pending (their rows are still in their tier) and drop
        archive objects no row knows (a crash between a delete's commit and the object's)."""
        undone = 0
        # the local store lists no link and walks into none (backend/local.py), so a link
        # planted under the object root cannot make this delete a file elsewhere; what it
        # refused is counted
        refused = getattr(self._store(), 'refused', 0)
        for (key,) in self.conn.execute("select key from archive where state = 'pending'").fetchall():
            try:
                self.objects.delete(key)
            except LinkRefusedError:   # a link planted above it: never followed, left as is
                pass
            self.conn.execute('delete from archive where key = ?', (key,))
            undone += 1
        known = {k for (k,) in self.conn.execute('select key from archive')}
        for key, _size in self.objects.list(self._prefix()):
            if key not in known:
                try:
                    self.objects.delete(key)
                except LinkRefusedError:
                    continue
                undone += 1
        self.links_refused += getattr(self._store(), 'refused', 0) - refused
        return undone

    def _store(self) -> ObjectStore:
        """The store underneath encryption (what lists and deletes files)."""
        return self.objects.inner if isinstance(self.objects, EncryptedObjectStore) \
            else self.objects

    # -- the clock -------------------------------------------------------------------------------
    SHIFT_ROWS = 20_000   # rows (by rowid) a restamp transaction

    def _read_mark(self) -> None:
        """The mark a previous check left in `meta`: 'wall_ms [monotonic_ms boot episode_id]'
        (an older Loom wrote the wall alone). On the same boot (the monotonic clock runs on)
        it gives the wall clock's offset from the monotonic one then, so a step while no
        lifecycle ran is found like one while it runs."""
        row = self.conn.execute('select value from meta where key = ?', (MARK_KEY,)).fetchone()
        parts = str(row[0])[:200].split() if row is not None else []
        try:
            self._mark = self._mark_written = bounded_ms(int(parts[0][:20])) if parts else 0
        except ValueError:
            return
        if len(parts) != 4 or self.monotonic is None or self._boot is None \
                or parts[2] != self._boot:
            return
        try:
            mono_ms, last_id = int(parts[1][:20]), int(parts[3][:20])
        except ValueError:
            return
        if CLOCK_FLOOR_MS <= self._mark < MAX_TIME_MS and 0 <= mono_ms < MAX_TIME_MS:
            self._base, self._checked_mono, self._base_id = self._mark - mono_ms, mono_ms, last_id

    def _mark_op(self, wall: int, mono_ms: int | None) -> tuple:
        """The mark's write: the monotonic reading kept is the one the offset gives for `wall`
        (a drift under the tolerance is not carried into the next process's offset)."""
        if mono_ms is None or self._boot is None or self._base is None:
            value = str(wall)
        else:
            value = f'{wall} {wall - self._base} {self._boot} {self._checked_id}'
        return ('insert into meta (key, value) values (?, ?) on conflict (key) do update set '
                'value = excluded.value', (MARK_KEY, value))

    def _write_mark(self, wall: int, mono_ms: int | None) -> None:
        """Best effort (a busy file: the next minute's round writes it)."""
        try:
            self.conn.execute(*self._mark_op(wall, mono_ms))
        except sqlite3.Error:
            return
        self._mark = self._mark_written = wall

    def clamp_ids(self, conn: sqlite3.Connection) -> None:
        """Call inside a transaction that deleted episodes: SQLite gives the ids above the
        newest left again (no AUTOINCREMENT), so the ids the back-step rule takes as written
        by the old clock (the previous check's, and the mark's for the next open) are lowered
        to it; lowering only leaves a row younger, never older."""
        top = conn.execute('select max(id) from episodes').fetchone()[0] or 0
        self._base_id, self._checked_id = min(self._base_id, top), min(self._checked_id, top)
        row = conn.execute('select value from meta where key = ?', (MARK_KEY,)).fetchone()
        parts = str(row[0])[:200].split() if row is not None else []
        if len(parts) == 4 and (not parts[3].isdigit() or int(parts[3][:20]) > top):
            conn.execute('update meta set value = ? where key = ?',
                         (' '.join(parts[:3] + [str(top)]), MARK_KEY))
        # and a restamp still under way: its episodes' bounds too
        row = conn.execute('select value from meta where key = ?', (SHIFT_KEY,)).fetchone()
        if row is None:
            return
        try:
            plan = self._read_plan(row[0])
        except StorageError:   # damaged: resuming it refuses it, with the message
            return
        for entry in plan:
            if entry[0] == 'episodes':   # rows above `top` from now on are new-clock rows
                entry[4] = min(entry[4], top)
                if entry[1] == 'back_episodes':
                    entry[2][3] = min(entry[2][3], top)
        conn.execute('update meta set value = ? where key = ?', (json.dumps(plan), SHIFT_KEY))

    def _newest_held(self) -> int:
        """The latest time this store knows it has seen: the newest stored_ms of its rows (the
        last episode written, the newest cold memory and archive file) and the last believable
        round's clock (this process's, or the mark a previous one left)."""
        c = self.conn
        found = [self._mark, self._last_trusted]
        for sql in ('select stored_ms from episodes order by id desc limit 1',
                    'select max(stored_ms) from cold', 'select max(stored_ms) from archive'):
            row = c.execute(sql).fetchone()
            if row is not None and row[0] is not None:
                found.append(bounded_ms(row[0]))
        return max(found)

    def _restamp(self, updates: list, wall: int, mono_ms: int | None) -> None:
        """`updates`: (table, kind of RESTAMPS, arguments). Rare (a clock step) but it may
        concern every row, so it runs SHIFT_ROWS rows a transaction (a million rows in one had
        held the writers for seconds and grown the WAL by hundreds of MB): the plan, bounded to
        the rows there now, is written with the mark of the new clock in one transaction, each
        chunk with its progress, and a plan a crash cut short is resumed on open. So a step is
        shifted once, never twice, and nothing ages before the whole plan ran."""
        conn, plan = self.conn, []
        try:
            conn.execute('BEGIN IMMEDIATE')
            for table, kind, args in updates:
                top = conn.execute(f'select max(rowid) from {table}').fetchone()[0]
                if top is not None:
                    plan.append([table, kind, list(args), 0, top])
            conn.execute('insert into meta (key, value) values (?, ?) on conflict (key) do '
                         'update set value = excluded.value', (SHIFT_KEY, json.dumps(plan)))
            conn.execute(*self._mark_op(wall, mono_ms))
            conn.execute('COMMIT')
        except sqlite3.Error as exc:
            self._abort(None)
            raise self._error('restamping rows after a clock step', exc) from None
        self._mark = self._mark_written = wall
        self._shift_pending = True
        self._resume_shift()

    def _read_plan(self, text) -> list:
        """The restamp plan kept in meta, checked entry by entry (StorageError if damaged)."""
        try:
            plan = json.loads(str(text)[:MAX_SHIFT_PLAN])
            if type(plan) is not list or len(plan) > len(_STAMPED):
                raise ValueError('not a list of at most three entries')
            for entry in plan:
                if type(entry) is not list or len(entry) != 5:
                    raise ValueError('an entry is not [table, kind, arguments, after, top]')
                table, kind, args, after, top = entry
                if table not in _STAMPED or kind not in RESTAMPS:
                    raise ValueError(f'{str(table)[:20]!r} {str(kind)[:20]!r}')
                if type(args) is not list or len(args) != RESTAMPS[kind][2] or not all(
                        type(a) is int and abs(a) < 2**62 for a in args):
                    raise ValueError(f'arguments of {kind}')
                if not all(type(v) is int and 0 <= v < 2**63 for v in (after, top)):
                    raise ValueError('row ids')
        except (ValueError, RecursionError) as exc:
            raise StorageError(f'{self.path}: meta {SHIFT_KEY} (a clock restamp under way) is '
                               f'damaged ({str(exc)[:80]}); rows may be half shifted: delete '
                               'the key to go on') from None
        return plan

    def _resume_shift(self) -> None:
        """Run what is left of a restamp plan (`_restamp`), a chunk per transaction: the next
        SHIFT_ROWS rows that exist (sparse ids cost nothing), never past the rows there now."""
        conn = self.conn
        row = conn.execute('select value from meta where key = ?', (SHIFT_KEY,)).fetchone()
        if row is None:
            self._shift_pending = False
            return
        plan = self._read_plan(row[0])
        try:
            for entry in plan:
                table, kind, args, after, top = entry
                sets, where, _n = RESTAMPS[kind]
                while True:
                    conn.execute('BEGIN IMMEDIATE')
                    last = conn.execute(
                        f'select max(rowid) from (select rowid from {table} where rowid > ? and '
                        'rowid <= ? order by rowid limit ?)', (after, top, self.SHIFT_ROWS)
                    ).fetchone()[0]
                    if last is None:
                        conn.execute('ROLLBACK')
                        break
                    conn.execute(f'update {table} set stored_ms = {sets} where ({where}) and '
                                 'rowid > ? and rowid <= ?', (*args, after, last))
                    entry[3] = after = last
                    conn.execute('update meta set value = ? where key = ?',
                                 (json.dumps(plan), SHIFT_KEY))
                    conn.execute('COMMIT')
            conn.execute('delete from meta where key = ?', (SHIFT_KEY,))
            self._shift_pending = False
        except sqlite3.Error as exc:
            self._abort(None)
            raise self._error('restamping rows after a clock step (resumed at the next round)',
                              exc) from None

    def _shift(self, step: int, wall: int, mono_ms: int, elapsed: int) -> str:
        """Rows of the clock before a step of `step` ms (found against the monotonic clock)
        shifted by it, so their ages are the real time they have been held; returns why the
        round is skipped. Forward: every row stamped below what the old clock reads now, or
        what the new one read at the previous check, whichever is later (rows of the new clock
        in that window are shifted too: younger, never older). Back: every episode committed
        by the previous check (it was stamped in its transaction, by the old clock), any row
        stamped after now (only the old clock wrote those), every cold memory and archive file
        (the lifecycle makes them from rows it already checked); an episode of the old clock
        written since the previous check and stamped before now is left: younger by the step,
        never older."""
        floor, top = CLOCK_FLOOR_MS, MAX_TIME_MS - 1
        if step > 0:
            before = max(wall - step, wall - elapsed) + 1
            updates = [(t, 'ahead', (step, top, floor, before)) for t in _STAMPED]
            shift_trusted = floor <= self._last_trusted < before
            why = (f'the wall clock jumped {_span(step)} ahead of the monotonic clock (to '
                   f'{_iso(wall)}); rows written before it keep their real ages')
        else:
            updates = [('episodes', 'back_episodes', (step, floor, floor, self._base_id, wall)),
                       ('cold', 'back', (step, floor, floor)),
                       ('archive', 'back', (step, floor, floor))]
            shift_trusted = self._last_trusted >= floor
            why = (f'the wall clock stepped back {_span(step)} (to {_iso(wall)}) against the '
                   'monotonic clock; rows written before it keep their real ages')
        old_base = self._base
        self._base += step      # the mark written with the plan is of the new offset
        try:
            self._restamp(updates, wall, mono_ms)
        except BaseException:
            if not self._shift_pending:   # no plan: the step is found again at the next check
                self._base = old_base
            raise                          # else the plan is resumed at the next check
        finally:
            if self._base != old_base and shift_trusted:
                self._last_trusted = max(floor, min(self._last_trusted + step, top))
        return why

    def clock_now(self) -> int | None:
        """The wall clock (ms) when it is believable, else None: nothing may be aged by it (the
        rules are the module docstring's). A step found here shifts the rows it concerns first;
        if that fails, the step is found again at the next check."""
        if self._shift_pending:   # no row ages before a restamp ran to its end
            self._resume_shift()
        tol = max(0, int(self.params.clock_tolerance_s * 1000))
        # the newest episode first, then the clock: what was committed by now was stamped by
        # the clock of this check or an earlier one (the next check's back step shifts it)
        row = self.conn.execute('select id from episodes order by id desc limit 1').fetchone()
        newest_id = self._move_top = row[0] if row is not None else 0
        raw = self.clock()
        wall = bounded_ms(raw) if type(raw) is int or (type(raw) is float and math.isfinite(raw)) \
            else -1
        mono = self.monotonic() if self.monotonic is not None else None
        mono_ms = int(mono * 1000) if mono is not None else None
        in_range = CLOCK_FLOOR_MS <= wall < MAX_TIME_MS
        reason = ''
        if mono_ms is not None and in_range:
            if self._base is None:     # the first believable reading (this boot) sets it
                self._base = wall - mono_ms
            else:
                step = wall - mono_ms - self._base
                if abs(step) > tol:
                    elapsed = max(0, mono_ms - self._checked_mono)
                    self._checked_id = newest_id
                    reason = self._shift(step, wall, mono_ms, elapsed)
                    self._behind_since = None
            self._checked_mono, self._checked_id = mono_ms, newest_id
            self._base_id = newest_id
        if reason:
            pass
        elif wall < 0:
            reason = 'the wall clock did not give a number'
        elif wall < CLOCK_FLOOR_MS:
            reason = (f'the wall clock reads {_iso(wall)}, before {_iso(CLOCK_FLOOR_MS)}: '
                      'not set yet (no real-time clock?)')
        elif wall >= MAX_TIME_MS:
            reason = f'the wall clock reads past {_iso(MAX_TIME_MS)}'
        else:
            high = self._newest_held()
            if wall < high - tol:
                if mono is not None and self._behind_since is None:
                    self._behind_since = mono
                if mono is not None and mono - self._behind_since >= \
                        self.params.clock_settle_s:
                    # believed from now on: what was stamped after it restarts its age now
                    self._restamp([(t, 'settle', (wall, wall)) for t in _STAMPED], wall,
                                  mono_ms)
                    self._last_trusted, self._behind_since = wall, None
                    reason = (f'the wall clock ran {_span(high - wall)} behind what this store '
                              f'holds for {_span(int(self.params.clock_settle_s * 1000))}: '
                              f'believed from now on, rows stamped after {_iso(wall)} restamped')
                else:
                    reason = (f'the wall clock reads {_iso(wall)}, {_span(high - wall)} behind '
                              f'what this store already holds ({_iso(high)}): it went back')
            else:
                self._behind_since = None
        status = self.clock_status
        if reason:
            if status.trusted:
                status.episodes += 1
                status.since_ms = max(0, wall)
            status.trusted, status.reason, status.last_reason = False, reason, reason
            return None
        status.trusted, status.reason = True, ''
        self._last_trusted = max(self._last_trusted, wall)
        if wall - self._mark_written >= MARK_EVERY_MS or wall < self._mark_written:
            self._write_mark(wall, mono_ms)
        # cold memories and archive files stamped 0 (upgraded while the clock was not
        # believable): their ages start now (indexed: a look that finds none costs nothing)
        for table in ('cold', 'archive'):
            if self.conn.execute(f'select 1 from {table} where stored_ms < ? limit 1',
                                 (CLOCK_FLOOR_MS,)).fetchone():
                self.conn.execute(f'update {table} set stored_ms = ? where stored_ms < ?',
                                  (wall, CLOCK_FLOOR_MS))
        # ages by the earlier of the wall clock and the monotonic one at the fixed offset: a
        # clock that swings within the tolerance (stamped at -tol, read at +tol) ages a row
        # at most the tolerance early, not twice it
        if mono_ms is not None and self._base is not None:
            return min(wall, mono_ms + self._base)
        return wall

    STEPS = ('warm', 'cold', 'archive')   # the moves of a round, in their order

    def _round_now(self, step: str) -> tuple[int | None, MoveReport]:
        """(the move's clock, or None: skip it) and its report. A round is the moves in STEPS
        order (run_once, StorageService.run_round); a move repeated after one that moved
        something is the same round, one earlier in the order (or repeated after a skip)
        starts the next. Once a move of a round was skipped the rest of it is too, and the
        round counts once in clock_untrusted."""
        k, last, refused = self.STEPS.index(step), self._last_step, self._last_refused
        same = last is not None and (k > last or (k == last and not refused))
        self._last_step = k
        if same and refused:
            return None, MoveReport()
        if not same:
            self._round_counted = False
        now = self.clock_now()
        self._last_refused = now is None
        report = MoveReport()
        if now is None and not self._round_counted:
            report.clock_untrusted = 1
            self.clock_status.skipped += 1
            self._round_counted = True
        return now, report

    # -- one round -------------------------------------------------------------------------------
    def run_once(self, max_moves: int = 20) -> MoveReport:
        """Up to `max_moves` move transactions, then budgets, then the index save."""
        started, report = time.perf_counter(), MoveReport()
        for step in (self.move_warm, self.move_cold, self.expire_archive):
            for _ in range(max_moves):
                done = step()
                report.add(done)
                if not any((done.condensed, done.archived, done.deleted, done.archive_deleted,
                            done.consent_deleted)):
                    break
        report.add(self.enforce_budgets())
        self.index.maybe_train(self.conn)
        self.save_index()
        report.seconds = time.perf_counter() - started
        self.totals.add(report)
        return report

    def _youngest(self, age_attr: str) -> float:
        p = self.params
        return min([getattr(p.default, age_attr)] + [getattr(r.policy, age_attr)
                                                     for r in p.rules])

    EPISODE_COLS = ('id, agent_id, type, source, time_ms, payload, tags, event_id, subject, '
                    'stored_ms')
    COLD_COLS = ('id, agent_id, type, source, first_ms, last_ms, count, summary, subject, '
                 'stored_ms')

    def _due_warm(self, now: int) -> list:
        """Up to move_batch episodes whose policy says they are due by their stored_ms, in id
        order (the order they were written in) from where the previous look stopped, round to
        the oldest again. A lap ends at the first episode younger than the youngest warm_s of
        any policy (those after it were written later). A look reads at most MAX_DUE_PAGES
        pages of (id, agent, type, stored_ms) and the next one resumes after the last row it
        read, so rows a longer policy keeps delay the others' due rows by a few moves and never
        block them. Episodes stamped 0 or outside [CLOCK_FLOOR_MS, MAX_TIME_MS) (unknown) are
        stamped `now` here: their age starts now."""
        p, out, unknown = self.params, [], []
        horizon = now - int(self._youngest('warm_s') * 1000)
        start = after = self._cursor.get('episodes', 0)
        end = None        # the second lap (from the oldest) stops where the first one began
        for _page in range(MAX_DUE_PAGES):
            # never past the episodes committed before this move's clock was read: one the
            # writer commits now may be stamped by a clock that just stepped back
            upper = self._move_top if end is None else min(end, self._move_top)
            rows = self.conn.execute(
                'select id, agent_id, type, stored_ms from episodes where id > ? and id <= ? '
                'order by id limit ?', (after, upper, p.move_batch)).fetchall()
            young = False
            for row_id, agent, type_, stored in rows:
                if type(stored) is not int or not CLOCK_FLOOR_MS <= stored < MAX_TIME_MS:
                    unknown.append(row_id)
                    after = row_id
                    continue
                if stored >= horizon:
                    young = True
                    break
                after = row_id
                policy = _policy(p.rules, p.default, agent, type_)
                if stored < now - int(policy.warm_s * 1000):
                    out.append((row_id, policy))
                    if len(out) >= p.move_batch:
                        self._cursor['episodes'] = after
                        return self._episode_rows(out, unknown, now)
            if young or len(rows) < p.move_batch:   # the end of this lap
                if end is not None or start == 0:
                    self._cursor['episodes'] = 0   # every row looked at: from the oldest next
                    return self._episode_rows(out, unknown, now)
                end, after = start, 0              # round to the oldest, up to where it began
        self._cursor['episodes'] = after
        return self._episode_rows(out, unknown, now)

    def _episode_rows(self, due: list, unknown: list, now: int) -> list:
        """(row, policy) of the due ids, rows as EPISODE_COLS; the unknown ones stamped."""
        if unknown:
            try:
                self.conn.execute('BEGIN IMMEDIATE')
                self.conn.executemany('update episodes set stored_ms = ? where id = ?',
                                      [(now, i) for i in unknown])
                self.conn.execute('COMMIT')
            except sqlite3.Error as exc:
                self._abort(None)
                raise self._error('stamping episodes of unknown write time', exc) from None
        policies, out = dict(due), []
        ids = [i for i, _ in due]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            out += [(row, policies[row[0]]) for row in self.conn.execute(
                f'select {self.EPISODE_COLS} from episodes where id in '
                f'({",".join("?" * len(chunk))}) order by id', chunk)]
        return out

    def _due(self, now: int, table: str, age_attr: str) -> list:
        """Up to move_batch rows of `table` (cold) whose policy says they are due by their
        stored_ms, in (stored_ms, id) order from where the previous look stopped, round to the
        oldest again (keyset pages on the cold_stored index). A look reads at most
        MAX_DUE_PAGES pages and the next one resumes after the last row it read, so rows a
        longer policy keeps (however many, of whichever agent) delay the others' due rows by a
        few moves and never block them: every due row is reached within a full cycle."""
        p, out = self.params, []
        cols, at, time_col = self.COLD_COLS, 9, 'stored_ms'
        horizon = now - int(self._youngest(age_attr) * 1000)
        start = after = self._cursor.get(table, _START)
        end = None        # the second lap (from the oldest) stops where the first one began
        for _page in range(MAX_DUE_PAGES):
            upper, args = '', [horizon, after[0], after[0], after[1]]
            if end is not None:
                upper = f' and ({time_col} < ? or ({time_col} = ? and id <= ?))'
                args += [end[0], end[0], end[1]]
            rows = self.conn.execute(
                f'select {cols} from {table} where {time_col} < ? and ({time_col} > ? or '
                f'({time_col} = ? and id > ?)){upper} order by {time_col}, id limit ?',
                (*args, p.move_batch)).fetchall()
            for row in rows:
                after = (row[at], row[0])
                policy = _policy(p.rules, p.default, row[1], row[2])
                age_ms = int(getattr(policy, age_attr) * 1000)
                if row[at] < now - age_ms:
                    out.append((row, policy))
                    if len(out) >= p.move_batch:
                        self._cursor[table] = after
                        return out
            if len(rows) < p.move_batch:   # the end of this lap
                if end is not None or start == _START:
                    self._cursor[table] = _START   # every row looked at: from the oldest next
                    return out
                end, after = start, _START         # round to the oldest, up to where it began
        self._cursor[table] = after
        return out

    # -- consent ---------------------------------------------------------------------------------
    def _consent_registry(self):
        if self._consent is None:
            from loom_ros.config.params import config_dir
            from loom_ros.storage.consent import (ConsentError, ConsentRegistry, consent_path,
                                                  load_defaults)
            try:
                self._consent = self._own_consent = ConsentRegistry(
                    consent_path(self.layout.root), load_defaults(config_dir() / 'consent.yaml'),
                    read_only=True)
            except ConsentError as exc:
                raise StorageError(f'storage consent defaults: {exc}') from None
        return self._consent

    def _without_consent(self, subjects, what: str) -> set[str]:
        """The data subjects among `subjects` without `store` consent now (as Storage asks
        when it writes: the registry's answer, else its default; an id that is not valid has
        none). A registry that cannot be read raises StorageError: nothing is moved and
        nothing deleted on a guess."""
        from loom_ros.storage.consent import ConsentError, SubjectError
        subjects = {s for s in subjects if s}
        if not subjects:
            return set()
        registry, out = self._consent_registry(), set()
        for subject in subjects:
            try:
                if not registry.lookup(subject, 'store').granted:
                    out.add(subject)
            except (SubjectError, ConsentError):
                out.add(subject)
            except (StorageError, sqlite3.Error) as exc:
                raise StorageError(f'{self.path}: {what}: the consent registry cannot be read '
                                   f'({str(exc)[:200]}); nothing moved') from None
        return out

    @staticmethod
    def _count_withheld(conn, withheld: dict) -> None:
        """Add dropped events to the `withheld` counts (per agent, type and UTC day), as the
        writer counts an event it did not keep (stores.EpisodeStore)."""
        conn.executemany(
            'insert into withheld (agent_id, type, day, events) values (?, ?, ?, ?) '
            'on conflict (agent_id, type, day) do update set events = events + excluded.events',
            [(*k, n) for k, n in withheld.items()])

    def move_warm(self) -> MoveReport:
        """Warm events past warm_s: condensed into cold memories, archived raw (cold skipped) or
        deleted (cold and archive skipped); one transaction. Events of a data subject without
        `store` consent now (withdrawn since they were written) are deleted, neither condensed
        nor archived, and counted in `withheld`."""
        now, report = self._round_now('warm')
        if now is None:
            return report
        due = self._due_warm(now)
        if not due:
            return report
        refused = self._without_consent((row[8] for row, _ in due), 'warm -> cold move')
        withheld: dict = {}
        if refused:
            for row, _ in due:
                if row[8] in refused:
                    day = (row[1], row[2], day_of(bounded_ms(row[4])))
                    withheld[day] = withheld.get(day, 0) + 1
        gone = [row[0] for row, _ in due]   # every due row leaves the warm tier
        due = [(row, policy) for row, policy in due if row[8] not in refused]
        groups: dict = {}
        raw, drop = [], []
        bucket_ms = max(1, int(self.params.bucket_s * 1000))
        if self.cipher.on:   # what the memory quotes and the archive keeps: the plaintext
            due = [(self._open_episode(row), policy) for row, policy in due]
        for row, policy in due:
            if policy.cold:
                # per data subject too: one memory never mixes two people (erasure, export)
                key = (row[1], row[2], row[3], row[4] // bucket_ms, row[8])
                groups.setdefault(key, []).append(row)
            elif policy.archive:
                raw.append(row)
            else:
                drop.append(row[0])
        # each memory's rows in time order (due rows come in the order they were written)
        memories = [self._condense(sorted(rows, key=lambda r: (r[4], r[0])))
                    for rows in groups.values()]
        vectors = (np.asarray(self.embedder.embed([m['summary'] for m in memories]), np.float32)
                   if memories else None)
        codes = encode(vectors) if memories else []
        key = self._put_archive('warm', [self._raw_record(r) for r in raw],
                                [r[9] for r in raw]) if raw else None
        conn = self.conn
        ids = []
        try:
            conn.execute('BEGIN IMMEDIATE')
            for memory, code in zip(memories, codes):
                m = memory
                summary = self.cipher.seal(m['summary'], cold_context(
                    m['agent_id'], m['type'], m['source'], m['first_ms'], m['last_ms'],
                    m['subject']), m['subject'], bounded_ms(m['last_ms']))
                cursor = conn.execute(
                    'insert into cold (agent_id, type, source, first_ms, last_ms, count, summary, '
                    'code, bytes, subject, stored_ms) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                    (m['agent_id'], m['type'], m['source'], m['first_ms'], m['last_ms'],
                     m['count'], summary, code, len(m['summary']) + len(code) + 64,
                     m['subject'], m['stored_ms']))
                ids.append(cursor.lastrowid)
            conn.executemany('insert into cold_log (op, id) values (?, ?)',
                             [(ADD, i) for i in ids])
            conn.executemany('delete from episodes where id = ?', [(i,) for i in gone])
            self.clamp_ids(conn)
            if withheld:
                self._count_withheld(conn, withheld)
            if key:
                conn.executemany("update archive set state = 'done' where key = ?",
                                 [(k,) for k in key])
            conn.execute('COMMIT')
        except sqlite3.Error as exc:
            self._abort(key)
            raise self._error('warm -> cold move', exc) from None
        self.index.replay(conn)
        self.unsaved += len(ids)
        report.condensed = sum(len(g) for g in groups.values())
        report.memories, report.archived, report.deleted = len(memories), len(raw), len(drop)
        report.consent_deleted = sum(withheld.values())
        return report

    def move_cold(self) -> MoveReport:
        """Cold memories past cold_s: to an archive file, or deleted when archive is skipped.
        Memories of a data subject without `store` consent now are deleted, not archived, and
        their events counted in `withheld`."""
        now, report = self._round_now('cold')
        if now is None:
            return report
        due = self._due(now, 'cold', 'cold_s')
        if not due:
            return report
        refused = self._without_consent((row[8] for row, _ in due), 'cold move')
        withheld: dict = {}
        for row, _ in due:
            if row[8] in refused:
                day = (row[1], row[2], day_of(bounded_ms(row[4])))
                withheld[day] = withheld.get(day, 0) + int(row[6] or 0)
        keep = [row for row, policy in due if policy.archive and row[8] not in refused]
        key = self._put_archive('cold', [self._cold_record(r) for r in keep],
                                [r[9] for r in keep]) if keep else None
        self._delete_cold([row[0] for row, _ in due], key, withheld)
        report.consent_deleted = sum(1 for row, _ in due if row[8] in refused)
        report.archived = len(keep)
        report.deleted = len(due) - len(keep) - report.consent_deleted
        return report

    def _delete_cold(self, ids: list[int], archive_key: list[str] | None = None,
                     withheld: dict | None = None) -> None:
        conn = self.conn
        try:
            conn.execute('BEGIN IMMEDIATE')
            conn.executemany('delete from cold where id = ?', [(i,) for i in ids])
            conn.executemany('insert into cold_log (op, id) values (?, ?)',
                             [(REMOVE, i) for i in ids])
            if withheld:
                self._count_withheld(conn, withheld)
            if archive_key:
                conn.executemany("update archive set state = 'done' where key = ?",
                                 [(k,) for k in archive_key])
            conn.execute('COMMIT')
        except sqlite3.Error as exc:
            self._abort(archive_key)
            raise self._error('cold move', exc) from None
        self.index.replay(conn)
        self.unsaved += len(ids)

    def expire_archive(self) -> MoveReport:
        """Archive files held archive_s (by stored_ms) deleted; encrypted, the day keys of the
        days before both that horizon and the oldest time any row still held, in any unit
        database of the root, was sealed by (an event stamped 1970 is held its tiers' ages like
        any other: its day's key with it; another unit's late event keeps its day's)."""
        age = self.params.default.archive_s
        if age <= 0:
            return MoveReport()
        now, report = self._round_now('archive')
        if now is None:
            return report
        horizon = now - int(age * 1000)
        rows = self.conn.execute(
            "select key from archive where state = 'done' and stored_ms < ? order by stored_ms "
            'limit 100', (horizon,)).fetchall()
        for (key,) in rows:
            self._drop_archive(key)
            report.archive_deleted += 1
        if self.encrypted:   # retention: anonymous days past archive_s are shredded for good
            oldest = self._oldest_sealed()
            if oldest is not None:
                self.objects.keyring.destroy_days_before(min(horizon, oldest))
        return report

    # What a day key seals and the lifecycle holds, by table: the time its day is named by (an
    # index's first entry). Every unit database of the root is read: the keyring is the root's,
    # one for all of them. An anonymous blob is not held by this: past archive_s its day key
    # goes (docs/encryption.md, retention).
    SEALED_TIMES = (('episodes', 'time_ms'), ('cold', 'last_ms'), ('archive', 'last_ms'))

    def _oldest_sealed(self) -> int | None:
        """The earliest time a row still held in any unit database of this root was sealed by
        (an episode's time_ms, a cold memory's or archive file's last_ms),
        bounded to [year 1, MAX_TIME_MS] (what a day key can be named by); None when a
        database cannot be read (then no day key is destroyed this round)."""
        found = [MAX_TIME_MS]
        paths = set(self.layout.databases()) | {self.path}
        for path in sorted(paths):
            own = path == self.path
            try:
                conn = self.conn if own else open_database(path, read_only=True, check=False)
            except StorageError:
                self.sealed_unreadable += 1
                return None
            try:
                tables = {n for (n,) in conn.execute(
                    "select name from sqlite_master where type = 'table'")}
                for table, column in self.SEALED_TIMES:
                    if table not in tables:
                        continue
                    row = conn.execute(f'select min({column}) from {table}').fetchone()
                    if row is not None and row[0] is not None:
                        value = row[0] if type(row[0]) is int else bounded_ms(row[0])
                        found.append(max(_YEAR_1_MS, min(value, MAX_TIME_MS)))
            except sqlite3.Error:
                self.sealed_unreadable += 1
                return None
            finally:
                if not own:
                    conn.close()
        return min(found)

    def _drop_archive(self, key: str) -> None:
        """The row goes first (one transaction), then the object; recover() drops an object a
        crash left without its row."""
        self.conn.execute('delete from archive where key = ?', (key,))
        self.objects.delete(key)

    # -- archive files ---------------------------------------------------------------------------
    @property
    def encrypted(self) -> bool:
        """Archive files go through an encrypting object store (storage.encryption.enabled)."""
        return isinstance(self.objects, EncryptedObjectStore)

    def _subjects(self, tier: str, records: list[dict]) -> None:
        """Name each record's data subject (`subject` column of its table, when it has one)."""
        table = 'episodes' if tier == 'warm' else 'cold'
        if not any(r[1] == 'subject' for r in self.conn.execute(f'pragma table_info({table})')):
            return
        ids = [r['id'] for r in records]
        found = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            found.update(self.conn.execute(
                f'select id, subject from {table} where id in ({",".join("?" * len(chunk))})',
                chunk).fetchall())
        for record in records:
            if found.get(record['id']):
                record['subject'] = found[record['id']]

    def _put_archive(self, tier: str, records: list[dict], stored: list[int]) -> list[str]:
        """Write compressed JSON-lines files as `pending` (committed first, so a crash before
        the move's commit is undone by recover()). Encrypted, one file per data subject (under
        its key) and per UTC day for anonymous records (under the day's key), so destroying a
        key shreds exactly that subject's or day's archives. `stored`: each record's stored_ms
        (a file is aged by its newest)."""
        self._subjects(tier, records)
        if not self.encrypted:
            return [self._put_archive_file(tier, records, None, max(stored))]
        groups: dict[tuple, list[dict]] = {}
        newest: dict[tuple, int] = {}
        for record, at in zip(records, stored):
            subject = record.get('subject')
            # by the day of last_ms: a day's key is shredded only once that day is past
            # archive_s and before every row still held (expire_archive)
            group = ('s', subject) if subject else ('d', day_of(bounded_ms(record['last_ms'])))
            groups.setdefault(group, []).append(record)
            newest[group] = max(newest.get(group, at), at)
        keys: list[str] = []
        try:
            for (kind, name), group in groups.items():
                keys.append(self._put_archive_file(tier, group, name if kind == 's' else None,
                                                   newest[(kind, name)]))
        except BaseException:
            self._abort(keys)
            raise
        return keys

    def _put_archive_file(self, tier: str, records: list[dict], subject: str | None,
                          stored_ms: int) -> str:
        """`stored_ms`: what the file is aged by (the newest stored_ms of the rows it holds)."""
        first = min(r['first_ms'] for r in records)
        last = max(r['last_ms'] for r in records)
        key = f'{self._prefix()}{tier}/{bounded_ms(first):013d}-{uuid.uuid4().hex[:12]}.jsonl.gz'
        body = gzip.compress(b''.join(json.dumps(r, separators=(',', ':')).encode() + b'\n'
                                      for r in records), compresslevel=6)
        try:
            self.conn.execute(
                'insert into archive (key, state, tier, first_ms, last_ms, rows, bytes, '
                "created_ms, stored_ms) values (?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
                (key, tier, first, last, len(records), len(body), self.clock(), stored_ms))
        except sqlite3.Error as exc:
            raise self._error('archive', exc) from None
        try:
            if self.encrypted:
                self.objects.put(key, body, subject=subject, time_ms=bounded_ms(last))
            else:
                self.objects.put(key, body)
        except BaseException:
            # the put failed (a full disk, the store down): its pending row goes too, or every
            # failed round left one until the next open's recovery (the rows stay in their tier)
            try:
                self.conn.execute('delete from archive where key = ?', (key,))
            except sqlite3.Error:
                pass
            raise
        return key

    def read_archive(self, key: str) -> list[dict]:
        """The records of one archive file (decrypted when encrypted: a destroyed key raises
        keyring.ShreddedError, a tampered file DecryptError), decompressed within bounds."""
        data = self.objects.get(key)
        out, inflater, pending, total = [], zlib.decompressobj(16 + zlib.MAX_WBITS), b'', 0
        try:
            while not inflater.eof:
                chunk = inflater.decompress(data, 1 << 20)
                data = inflater.unconsumed_tail
                if not chunk and not data:
                    break
                total += len(chunk)
                if total > MAX_ARCHIVE_BYTES:
                    raise StorageError(f'archive {key}: more than {MAX_ARCHIVE_BYTES} bytes '
                                       'once decompressed; not read')
                pending += chunk
                lines = pending.split(b'\n')
                pending = lines.pop()
                if len(pending) > MAX_ARCHIVE_LINE:
                    raise StorageError(f'archive {key}: a line longer than {MAX_ARCHIVE_LINE}')
                records = [json.loads(line) for line in lines if line]
                if not all(type(r) is dict for r in records):
                    raise ValueError('a record that is not a JSON object')
                out += records
        except (zlib.error, ValueError) as exc:
            raise StorageError(f'archive {key}: damaged ({exc})') from None
        if not inflater.eof or pending.strip():
            raise StorageError(f'archive {key}: truncated')
        return out

    def _abort(self, key: list[str] | None) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute('ROLLBACK')
        except sqlite3.Error:
            pass
        for one in key or ():
            self.objects.delete(one)
            try:
                self.conn.execute('delete from archive where key = ?', (one,))
            except sqlite3.Error:
                pass

    def _error(self, what: str, exc: Exception) -> StorageError:
        if is_full(exc):
            return StorageFullError(f'{self.path}: {what}: disk or budget full ({exc}); nothing '
                                    'moved, nothing lost')
        return StorageError(f'{self.path}: {what} failed: {exc}')

    @staticmethod
    def _raw_record(row) -> dict:
        return {'id': row[0], 'agent_id': row[1], 'type': row[2], 'source': row[3],
                'first_ms': row[4], 'last_ms': row[4], 'event_id': row[7],
                'tags': json.loads(row[6]), 'payload': row[5]}

    def _open_episode(self, row) -> tuple:
        """A due episode row with its payload decrypted ('' when its key was destroyed: an
        erased subject's row left in a copy is dropped, never condensed)."""
        payload = self.cipher.open_or_none(row[5], episode_context(row[1], row[7], row[4],
                                                                   row[8]))
        return (*row[:5], payload or '', *row[6:])

    def _cold_record(self, row) -> dict:
        summary = self.cipher.open_or_none(row[7], cold_context(*row[1:6], row[8]))
        return {'id': row[0], 'agent_id': row[1], 'type': row[2], 'source': row[3],
                'first_ms': row[4], 'last_ms': row[5], 'count': row[6],
                'summary': summary or ''}

    def _condense(self, rows) -> dict:
        n, cut = len(rows), self.params.summary_chars
        agent, type_, source = rows[0][1], rows[0][2], rows[0][3]
        first, last = rows[0], rows[-1]
        text = f'{n} {type_} event{"s" if n > 1 else ""} from {source or "?"} for {agent} ' \
               f'{_iso(first[4])} to {_iso(last[4])}: {first[5][:cut]}'
        if n > 1:
            text += f' ... {last[5][:cut]}'
        return {'agent_id': agent, 'type': type_, 'source': source, 'first_ms': first[4],
                'last_ms': last[4], 'count': n, 'summary': text, 'subject': first[8],
                'stored_ms': max(r[9] for r in rows)}

    # -- budgets ---------------------------------------------------------------------------------
    def usage(self) -> dict[str, dict]:
        """rows, bytes and oldest (ms) per tier, plus state and the measured total."""
        c = self.conn
        warm = c.execute('select count(*), coalesce(sum(bytes), 0), min(time_ms) '
                         'from episodes').fetchone()
        tiers = self.budgeted_usage()
        state = c.execute('select count(*), coalesce(sum(length(value)), 0), min(updated_ms) '
                          'from kv').fetchone()
        # events of data subjects without store consent: counted, not kept (stores.EpisodeStore)
        withheld = c.execute('select coalesce(sum(events), 0), count(*), min(day) from withheld'
                             ).fetchone() if self._has_table('withheld') else (0, 0, None)
        # blobs (blobs.py): shown, not budgeted (a budget deletes archive and cold data only)
        blobs = c.execute('select count(*), coalesce(sum(bytes), 0), min(created_ms) from blobs'
                          ).fetchone() if self._has_table('blobs') else (0, 0, None)
        out = {'warm': {'rows': warm[0], 'bytes': warm[1], 'oldest_ms': warm[2] or 0},
               **tiers,
               'state': {'rows': state[0], 'bytes': state[1], 'oldest_ms': state[2] or 0},
               'withheld': {'rows': withheld[0], 'bytes': 0, 'oldest_ms': _day_ms(withheld[2])},
               'blobs': {'rows': blobs[0], 'bytes': blobs[1], 'oldest_ms': blobs[2] or 0}}
        out['total'] = {'bytes': root_used_bytes(self.layout, tiers['archive']['bytes'])}
        return out

    def budgeted_usage(self) -> dict[str, dict]:
        """rows, bytes and oldest (ms) of the tiers a budget deletes from: cold (its rows and
        the vector index) and archive (its files)."""
        c = self.conn
        cold = c.execute('select count(*), coalesce(sum(bytes), 0), min(first_ms) '
                         'from cold').fetchone()
        arch = c.execute("select count(*), coalesce(sum(bytes), 0), min(first_ms), "
                         "coalesce(sum(rows), 0) from archive where state = 'done'").fetchone()
        return {'cold': {'rows': cold[0], 'bytes': cold[1] + self.index.memory_bytes(),
                         'oldest_ms': cold[2] or 0},
                'archive': {'rows': arch[3], 'files': arch[0], 'bytes': arch[1],
                            'oldest_ms': arch[2] or 0}}

    def _has_table(self, name: str) -> bool:
        return self.conn.execute("select 1 from sqlite_master where type = 'table' and name = ?",
                                 (name,)).fetchone() is not None

    def checks(self) -> list:
        """Budget checks per tier and in total (WARN 80 %, ERROR 95 %), and the total's floor
        (floor_check) when the last budget pass found it unreachable."""
        u, b = self.usage(), self.budgets
        out = [budget_check(f'storage {tier}', u[tier]['bytes'], b.of(tier), b.warn_fraction,
                            b.error_fraction) for tier in ('warm', 'cold', 'archive')]
        out.append(budget_check('storage total', u['total']['bytes'], b.total_bytes,
                                b.warn_fraction, b.error_fraction))
        floor = floor_check([self])
        if floor is not None:
            out.append(floor)
        return out

    def state_bytes(self) -> int:
        """Bytes of the KV rows (agent state), which no budget deletes."""
        return int(self.conn.execute('select coalesce(sum(length(value)), 0) from kv'
                                     ).fetchone()[0])

    def enforce_budgets(self) -> MoveReport:
        """This unit's data against the budgets (`enforce_budgets` below, over one unit; the
        storage service runs it over every unit of the root)."""
        return enforce_budgets([self], self.budgets, self.layout)

    def checkpoint(self) -> None:
        """Move the WAL into the database (what a deletion freed shows in its header)."""
        if not self.read_only:
            self.conn.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchall()

    def oldest_archive(self) -> tuple | None:
        """(stored_ms, bytes, key) of the oldest archive file (by when it was stored), or None."""
        return self.conn.execute("select stored_ms, bytes, key from archive where state = 'done' "
                                 'order by stored_ms limit 1').fetchone()

    def oldest_cold(self, limit: int, share: int = 0) -> list[tuple]:
        """(stored_ms, id, bytes) of the oldest cold memories (by when they were stored), the
        bytes with `share` added (each one's part of the vector index, which cold's usage
        counts)."""
        return [(stored, i, max(1, int(size or 0) + share)) for stored, i, size in
                self.conn.execute('select stored_ms, id, bytes from cold order by stored_ms, id '
                                  'limit ?', (limit,))]

    # -- the index -------------------------------------------------------------------------------
    def save_index(self, force: bool = False) -> None:
        """Save when it changed; then trim the log it now covers."""
        if self.read_only or not (force or self.unsaved):
            return
        self.index.save()
        self.unsaved = 0
        self.conn.execute('delete from cold_log where seq <= ?', (self.index.seq,))

    def rebuild_index(self) -> None:
        self.index.rebuild(self.conn)
        self.save_index(force=True)

    def search(self, text: str = '', vector=None, k: int = 10, start_ms: int = 0,
               end_ms: int = 2**63 - 1, agent_id: str = '', type: str = '',
               exact_limit: int = 20000) -> list[dict]:
        """Cold memories closest in meaning to `text` (or `vector`) within [start_ms, end_ms],
        best first, re-ranked exactly on the stored codes."""
        if vector is None:
            vector = np.asarray(self.embedder.embed([text]), np.float32)[0]
        vector = np.asarray(vector, np.float32)
        k = max(1, min(int(k), 1000))
        where, args = ['last_ms >= ?', 'first_ms <= ?'], [int(start_ms), int(end_ms)]
        if agent_id:
            where.append('agent_id = ?')
            args.append(agent_id)
        if type:
            where.append('type = ?')
            args.append(type)
        filtered = len(where) > 2 or start_ms > 0 or end_ms < 2**63 - 1
        cols = 'id, agent_id, type, source, first_ms, last_ms, count, summary, code, subject'
        if filtered and self.conn.execute(
                f'select count(*) from (select 1 from cold where {" and ".join(where)} limit ?)',
                (*args, exact_limit + 1)).fetchone()[0] <= exact_limit:
            rows = self.conn.execute(f'select {cols} from cold where {" and ".join(where)}',
                                     args).fetchall()
        else:
            rows, want = [], k * self.index.params.rerank
            for _ in range(3):
                ids = self.index.candidates(vector, want)
                rows = self._rows(ids, cols, where, args)
                if len(rows) >= k or len(ids) < want:
                    break
                want *= 10
        if not rows:
            return []
        scores = decode([r[8] for r in rows], self.index.params.dim) @ vector
        out = []
        for i in np.argsort(-scores):
            row = rows[i]
            summary = self.cipher.open_or_none(row[7], cold_context(*row[1:6], row[9]))
            if summary is None:   # its subject's key was destroyed
                continue
            out.append({'id': row[0], 'agent_id': row[1], 'type': row[2], 'source': row[3],
                        'first_ms': row[4], 'last_ms': row[5], 'count': row[6],
                        'summary': summary, 'score': float(scores[i])})
            if len(out) >= k:
                break
        return out

    def _rows(self, ids, cols, where, args) -> list:
        out = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            out += self.conn.execute(
                f'select {cols} from cold where id in ({",".join("?" * len(chunk))}) and '
                f'{" and ".join(where)}', (*chunk, *args)).fetchall()
        return out

    def close(self) -> None:
        try:
            if not self.read_only:
                self.save_index()
        finally:
            self.conn.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
            if self._own_consent is not None:
                self._own_consent.close()
                self._own_consent = None


def enforce_budgets(lifecycles: list, budgets: Budgets, layout: StorageLayout) -> MoveReport:
    """Past the total budget: the oldest archive files, then the oldest cold memories, go, the
    oldest first across `lifecycles` (the units of one root); past the archive (cold) budget,
    the oldest archive files (cold memories) only. As many as the excess measured once at the
    start, counted by the bytes each deletion accounts for (an archive file's; a cold row's and
    its share of the index). Not by measuring the files again after each deletion: a deletion
    goes to the WAL first, so the files grow until a checkpoint, and a loop that re-measured
    them deleted every archive file and cold memory for being 8 KiB over. The files' total
    counts each WAL, which only a checkpoint moves into its database and cuts back: with the
    WALs the measure is an upper bound, so the WALs are checkpointed (which makes the units'
    writers wait) only when it is past the total budget's warning fraction (what /diagnostics
    and the writers' gate would report), then measured again; and after deleting, so the next
    round measures what the deletions freed. The tiers' budgets count rows, not files. Agent
    state, audit and router history are never deleted here.

    When what this pass may not delete (the root's files less its archive and cold data: agent
    state, warm events, audit, ...) alone is at or past the total budget, deleting every archive
    file and cold memory would still leave the root past it: nothing is deleted for the total
    (it used to delete them all, every round, to no purpose), the round is counted in
    `budget_unreachable` and each unit's `budget_floor` holds the numbers (`floor_check` makes
    them an ERROR); the writers' gates stop writes at the total as before, and the tier budgets
    still hold."""
    report, b = MoveReport(), budgets
    live = [lc for lc in lifecycles if not lc.read_only]
    for lc in live:
        lc.budget_floor = None
    if not live or not (b.total_bytes or b.archive_bytes or b.cold_bytes):
        return report
    usages = [lc.budgeted_usage() for lc in live]   # not usage(): it measures the root again
    archive_used = sum(u['archive']['bytes'] for u in usages)
    cold_used = sum(u['cold']['bytes'] for u in usages)

    def excess(used: int, budget: int) -> int:
        return max(0, used - budget) if budget else 0
    used = root_used_bytes(layout, archive_used)
    if b.total_bytes and used >= b.warn_fraction * b.total_bytes:   # perhaps the WALs' pages
        for lc in live:
            lc.checkpoint()
        used = root_used_bytes(layout, archive_used)
    total = excess(used, b.total_bytes)
    kept = used - archive_used - cold_used
    if total and kept >= b.total_bytes:   # past the budget whatever goes: none goes for it
        floor = {'used_bytes': used, 'budget_bytes': b.total_bytes, 'kept_bytes': kept,
                 'state_bytes': sum(lc.state_bytes() for lc in live),
                 'deletable_bytes': archive_used + cold_used}
        for lc in live:
            lc.budget_floor = floor
        report.budget_unreachable = 1
        total = 0
    archive = max(excess(archive_used, b.archive_bytes), total)
    while archive > 0:   # the total's excess comes from the archive first
        found = [(row, lc) for lc in live for row in [lc.oldest_archive()] if row is not None]
        if not found:
            break
        (_last, size, key), lc = min(found, key=lambda f: f[0][0])
        lc._drop_archive(key)
        report.archive_deleted += 1
        archive -= int(size or 0)
        total -= int(size or 0)
    cold = max(excess(sum(u['cold']['bytes'] for u in usages), b.cold_bytes), total)
    shares = {lc: lc.index.memory_bytes() // max(1, u['cold']['rows'])
              for lc, u in zip(live, usages)}
    while cold > 0:      # then from the oldest cold memories
        batch = [(row, lc) for lc in live
                 for row in lc.oldest_cold(max(1, lc.params.move_batch // 10), shares[lc])]
        if not batch:
            break
        chosen: dict[Lifecycle, list] = {}
        for (_last, row_id, size), lc in sorted(batch, key=lambda f: f[0][:2]):
            chosen.setdefault(lc, []).append(row_id)
            cold -= size
            if cold <= 0:
                break
        for lc, ids in chosen.items():
            lc._delete_cold(ids)
            report.budget_deleted += len(ids)
    if report.archive_deleted or report.budget_deleted:
        for lc in live:
            lc.checkpoint()
    return report


def floor_check(lifecycles) -> CheckResult | None:
    """ERROR with the numbers when the last budget pass (enforce_budgets) found the total budget
    unreachable: what it may not delete alone is past it; None otherwise."""
    for lc in lifecycles:
        f = getattr(lc, 'budget_floor', None)
        if f:
            return CheckResult(ERROR, (
                f"storage total: {f['used_bytes']:,} of {f['budget_bytes']:,} bytes, and "
                f"{f['kept_bytes']:,} of them (agent state {f['state_bytes']:,} bytes, warm "
                'events, audit, consent and other files) are not the budget\'s to delete: '
                f"deleting all {f['deletable_bytes']:,} bytes of archive and cold data would "
                'not bring the root under it, so none is deleted for it; writes stop at the '
                'budget: raise storage.budget.total_bytes or free space'),
                {k: str(v) for k, v in f.items()})
    return None


def clock_check(lifecycles: dict, reported: dict, skipped: int = 0) -> tuple[CheckResult, list]:
    """The storage node's 'storage clock' check over its units' lifecycles ({unit: Lifecycle}):
    WARN while one finds its clock not believable (it ages nothing), and once for an episode
    that began and ended since the last call (a step: one round skipped); OK otherwise. Also
    the lines to log: one per new episode. `reported` ({unit: episodes seen}) is updated."""
    values, warned, lines = {'rounds_skipped': str(skipped)}, [], []
    for unit in sorted(lifecycles):
        status = lifecycles[unit].clock_status
        new = status.episodes > reported.get(unit, 0)
        reported[unit] = status.episodes
        if new:
            lines.append(f'storage {unit}: clock not believable, nothing aged: '
                         f'{status.last_reason}')
        if not status.trusted or new:
            warned.append(f'{unit}: {status.last_reason} ({status.skipped} rounds aged nothing)')
    if warned:
        return CheckResult(WARN, 'storage clock not believable, nothing aged: '
                           + '; '.join(warned)[:900], values), lines
    return CheckResult(OK, f'storage clock believable ({skipped} rounds skipped before)',
                       values), lines
