"""The data lifecycle of one storage database: warm events (full, in SQLite) older than warm_s
are condensed into cold memories (vector + what/when/source/how many; raw payloads dropped),
cold memories older than cold_s go to compressed append-only archive files in the object store,
archive files older than archive_s are deleted. A policy per agent or event type keeps, skips or
shortens tiers. Every move is one SQLite transaction (archive files are written before, as
`pending`, and only count once that transaction commits), runs off the hot path in small
batches, and reads ages from an injected clock. Past a budget, the oldest archive then cold data
goes first; agent state, audit and router history are never deleted by the lifecycle.

One mover per database at a time (an flock on <root>/cold/<unit>.lock)."""
from __future__ import annotations

import calendar
import fcntl
import fnmatch
import gzip
import json
import math
import os
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
from loom_ros.storage.sqlite import open_database

DAY_S = 86400.0
MAX_ARCHIVE_BYTES = 256 * 1024 * 1024    # of an archive file once decompressed (gzip bombs)
MAX_ARCHIVE_LINE = 16 * 1024 * 1024
MAX_DUE_PAGES = 20   # pages of move_batch rows one move looks at for due rows (then resumes)
_START = (-2**63, 0)   # before every (time, id)


@dataclass(frozen=True)
class TierPolicy:
    """Ages in seconds since the event. cold/archive False skip that tier; archive_s 0 keeps
    archive files until the budget needs the space."""

    warm_s: float = DAY_S
    cold_s: float = 30 * DAY_S
    archive_s: float = 0.0
    cold: bool = True
    archive: bool = True


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
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(ms / 1000))


class Lifecycle:
    """Moves data between the tiers of one unit database; also serves cold-memory searches."""

    def __init__(self, layout: StorageLayout, unit: str, objects: ObjectStore, embedder,
                 params: LifecycleParams | None = None, budgets: Budgets | None = None,
                 index_params: IndexParams | None = None, clock: Callable[[], int] | None = None,
                 synchronous: str = 'NORMAL', read_only: bool = False, rebuild: bool = False,
                 check: bool = True, consent=None):
        """`check`: run SQLite's quick check on open (reads every page: a damaged file is a
        clear error here); erasure skips it, its VACUUM reads every page and fails the same.
        `consent`: the consent registry (anything with `lookup(subject, purpose)`) a move asks
        whether a row's data subject still gives `store` consent; None: the root's registry,
        read-only, with the shipped defaults (what Storage asks when it writes), opened at the
        first move that needs it."""
        self.layout, self.unit = layout, check_name(unit, 'storage unit')
        self.objects, self.embedder = objects, embedder
        self.params, self.budgets = params or LifecycleParams(), budgets or Budgets()
        self.clock = clock or (lambda: time.time_ns() // 1_000_000)
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
            schema.ensure(self.conn, self.path)
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

    def _due(self, table: str, time_col: str, age_attr: str, skip_ok) -> list:
        """Up to move_batch rows whose policy says they are due, in (time, id) order from where
        the previous look stopped, round to the oldest again (keyset pages). A look reads at
        most MAX_DUE_PAGES pages and the next one resumes after the last row it read, so rows a
        longer policy keeps (however many, of whichever agent) delay the others' due rows by a
        few moves and never block them: every due row is reached within a full cycle."""
        p, now, out = self.params, self.clock(), []
        youngest = min([getattr(p.default, age_attr)] + [getattr(r.policy, age_attr)
                                                         for r in p.rules])
        cols = ('id, agent_id, type, source, time_ms, payload, tags, event_id, subject'
                if table == 'episodes' else
                'id, agent_id, type, source, first_ms, last_ms, count, summary, subject')
        at = 4 if table == 'episodes' else 5   # the row's time (the column paged by)
        horizon = now - int(youngest * 1000)
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
                if row[at] < now - age_ms and skip_ok(policy):
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
        due = self._due('episodes', 'time_ms', 'warm_s', lambda policy: True)
        report = MoveReport()
        if not due:
            return report
        refused = self._without_consent((row[8] for row, _ in due), 'warm -> cold move')
        withheld: dict = {}
        if refused:
            for row, _ in due:
                if row[8] in refused:
                    day = (row[1], row[2], day_of(row[4]))
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
        memories = [self._condense(rows) for rows in groups.values()]
        vectors = (np.asarray(self.embedder.embed([m['summary'] for m in memories]), np.float32)
                   if memories else None)
        codes = encode(vectors) if memories else []
        key = self._put_archive('warm', [self._raw_record(r) for r in raw]) if raw else None
        conn = self.conn
        ids = []
        try:
            conn.execute('BEGIN IMMEDIATE')
            for memory, code in zip(memories, codes):
                m = memory
                summary = self.cipher.seal(m['summary'], cold_context(
                    m['agent_id'], m['type'], m['source'], m['first_ms'], m['last_ms'],
                    m['subject']), m['subject'], m['last_ms'])
                cursor = conn.execute(
                    'insert into cold (agent_id, type, source, first_ms, last_ms, count, summary, '
                    'code, bytes, subject) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                    (m['agent_id'], m['type'], m['source'], m['first_ms'], m['last_ms'],
                     m['count'], summary, code, len(m['summary']) + len(code) + 64,
                     m['subject']))
                ids.append(cursor.lastrowid)
            conn.executemany('insert into cold_log (op, id) values (?, ?)',
                             [(ADD, i) for i in ids])
            conn.executemany('delete from episodes where id = ?', [(i,) for i in gone])
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
        due = self._due('cold', 'last_ms', 'cold_s', lambda policy: True)
        report = MoveReport()
        if not due:
            return report
        refused = self._without_consent((row[8] for row, _ in due), 'cold move')
        withheld: dict = {}
        for row, _ in due:
            if row[8] in refused:
                day = (row[1], row[2], day_of(row[4]))
                withheld[day] = withheld.get(day, 0) + int(row[6] or 0)
        keep = [row for row, policy in due if policy.archive and row[8] not in refused]
        key = self._put_archive('cold', [self._cold_record(r) for r in keep]) if keep else None
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
        report = MoveReport()
        age = self.params.default.archive_s
        if age <= 0:
            return report
        rows = self.conn.execute(
            "select key from archive where state = 'done' and last_ms < ? order by last_ms "
            'limit 100', (self.clock() - int(age * 1000),)).fetchall()
        for (key,) in rows:
            self._drop_archive(key)
            report.archive_deleted += 1
        if self.encrypted:   # retention: anonymous days past archive_s are shredded for good
            self.objects.keyring.destroy_days_before(self.clock() - int(age * 1000))
        return report

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

    def _put_archive(self, tier: str, records: list[dict]) -> list[str]:
        """Write compressed JSON-lines files as `pending` (committed first, so a crash before
        the move's commit is undone by recover()). Encrypted, one file per data subject (under
        its key) and per UTC day for anonymous records (under the day's key), so destroying a
        key shreds exactly that subject's or day's archives."""
        self._subjects(tier, records)
        if not self.encrypted:
            return [self._put_archive_file(tier, records, None)]
        groups: dict[tuple, list[dict]] = {}
        for record in records:
            subject = record.get('subject')
            # by the day of last_ms: a day key is shredded only once the day ended more than
            # archive_s ago, so never before a file under it expired
            groups.setdefault(('s', subject) if subject else ('d', day_of(record['last_ms'])),
                              []).append(record)
        keys: list[str] = []
        try:
            for (kind, name), group in groups.items():
                keys.append(self._put_archive_file(tier, group, name if kind == 's' else None))
        except BaseException:
            self._abort(keys)
            raise
        return keys

    def _put_archive_file(self, tier: str, records: list[dict], subject: str | None) -> str:
        first = min(r['first_ms'] for r in records)
        last = max(r['last_ms'] for r in records)
        key = f'{self._prefix()}{tier}/{first:013d}-{uuid.uuid4().hex[:12]}.jsonl.gz'
        body = gzip.compress(b''.join(json.dumps(r, separators=(',', ':')).encode() + b'\n'
                                      for r in records), compresslevel=6)
        try:
            self.conn.execute("insert into archive values (?, 'pending', ?, ?, ?, ?, ?, ?)",
                              (key, tier, first, last, len(records), len(body), self.clock()))
        except sqlite3.Error as exc:
            raise self._error('archive', exc) from None
        try:
            if self.encrypted:
                self.objects.put(key, body, subject=subject, time_ms=last)
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
                'last_ms': last[4], 'count': n, 'summary': text, 'subject': first[8]}

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
        """Budget checks per tier and in total (WARN 80 %, ERROR 95 %)."""
        u, b = self.usage(), self.budgets
        out = [budget_check(f'storage {tier}', u[tier]['bytes'], b.of(tier), b.warn_fraction,
                            b.error_fraction) for tier in ('warm', 'cold', 'archive')]
        out.append(budget_check('storage total', u['total']['bytes'], b.total_bytes,
                                b.warn_fraction, b.error_fraction))
        return out

    def enforce_budgets(self) -> MoveReport:
        """This unit's data against the budgets (`enforce_budgets` below, over one unit; the
        storage service runs it over every unit of the root)."""
        return enforce_budgets([self], self.budgets, self.layout)

    def checkpoint(self) -> None:
        """Move the WAL into the database (what a deletion freed shows in its header)."""
        if not self.read_only:
            self.conn.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchall()

    def oldest_archive(self) -> tuple | None:
        """(last_ms, bytes, key) of the oldest archive file, or None."""
        return self.conn.execute("select last_ms, bytes, key from archive where state = 'done' "
                                 'order by last_ms limit 1').fetchone()

    def oldest_cold(self, limit: int, share: int = 0) -> list[tuple]:
        """(last_ms, id, bytes) of the oldest cold memories, the bytes with `share` added (each
        one's part of the vector index, which cold's usage counts)."""
        return [(last, i, max(1, int(size or 0) + share)) for last, i, size in self.conn.execute(
            'select last_ms, id, bytes from cold order by last_ms, id limit ?', (limit,))]

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
    state, audit and router history are never deleted here."""
    report, b = MoveReport(), budgets
    live = [lc for lc in lifecycles if not lc.read_only]
    if not live or not (b.total_bytes or b.archive_bytes or b.cold_bytes):
        return report
    usages = [lc.budgeted_usage() for lc in live]   # not usage(): it measures the root again
    archive_used = sum(u['archive']['bytes'] for u in usages)

    def excess(used: int, budget: int) -> int:
        return max(0, used - budget) if budget else 0
    used = root_used_bytes(layout, archive_used)
    if b.total_bytes and used >= b.warn_fraction * b.total_bytes:   # perhaps the WALs' pages
        for lc in live:
            lc.checkpoint()
        used = root_used_bytes(layout, archive_used)
    total = excess(used, b.total_bytes)
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
