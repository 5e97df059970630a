"""The consent registry: per data subject and purpose (store, cloud, recording, fleet, learning)
granted or withdrawn, with when and by whom, and a configured default for subjects never asked.
Whoever moves data asks it (`lookup(subject, purpose)`): the router, the bridge, the recorder,
storage, the learned router. Plain Python over SQLite; passed in, never global.

Kept in its own file, `<root>/consent.db` (opened by sqlite.open_database through
direct.DirectDatabase, shared by the CLI and every node): unlike the audit log it must be
erasable (forgetting a subject deletes its rows), and it is read on every routing decision, so
it stays small. Every change is also an audit record, written FIRST: when the audit log cannot
take it nothing changes (fail closed), and a crash between the two leaves an audit record of a
change that `show` does not list, never a change without a record. The audit record names the
subject by a keyed hash (`SubjectRefs`), not by its id, since the append-only log cannot forget.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loom_ros.bus.privacy import ConsentState, Purpose, SubjectError, check_subject
from loom_ros.config.params import ConfigError, read_yaml
from loom_ros.storage.direct import DirectDatabase
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.sqlite import open_database

PURPOSES = tuple(p.value for p in Purpose)
MAX_SOURCE_CHARS = 64
_SOURCE = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.:@+\-]{0,63}\Z')
SUBJECT_KEY_FILE = 'subject_ref.key'   # in <root>/keys: the key of the audit's subject hashes
KEY_BYTES = 32

# One row per change (the history proves when consent was given); the newest row of a
# (subject, purpose) is its state.
CONSENT_DDL = [
    'create table if not exists consent (id integer primary key, subject text not null, '
    'purpose text not null, granted int not null, source text not null, changed_ms int not null)',
    'create index if not exists consent_subject on consent (subject, purpose, id)',
]


class ConsentError(ValueError):
    """A consent change or setting that cannot be used; says which value and why."""


def consent_path(root: str | os.PathLike) -> Path:
    """Where the registry lives under a storage root."""
    return StorageLayout.at(root).root / 'consent.db'


def check_purpose(purpose: object) -> str:
    if purpose not in PURPOSES:
        raise ConsentError(f'purpose {str(purpose)[:40]!r}: one of {", ".join(PURPOSES)}')
    return str(purpose)


def check_source(source: object) -> str:
    """Who recorded a change: 1-64 of letters, digits, _ . : @ + - (e.g. cli:alice, app)."""
    if not isinstance(source, str) or not _SOURCE.match(source):
        raise ConsentError(f'source {str(source)[:40]!r}: 1-{MAX_SOURCE_CHARS} letters, digits '
                           'and _ . : @ + -')
    return source


def parse_defaults(data: object, origin: str = 'consent') -> dict[str, bool]:
    """{'defaults': {purpose: bool}} -> every purpose's default (a missing one: not granted)."""
    if data is None:
        data = {}
    if not isinstance(data, dict) or set(data) - {'defaults'}:
        raise ConsentError(f'{origin}: expected a mapping with one key, defaults')
    given = data.get('defaults') or {}
    if not isinstance(given, dict):
        raise ConsentError(f'{origin}: defaults must map purposes to true/false')
    for purpose, value in given.items():
        if purpose not in PURPOSES:
            raise ConsentError(f'{origin}: defaults.{str(purpose)[:40]}: not a purpose (one of '
                               f'{", ".join(PURPOSES)})')
        if not isinstance(value, bool):
            raise ConsentError(f'{origin}: defaults.{purpose}: true or false, got {value!r}'[:200])
    return {p: given.get(p, False) for p in PURPOSES}


def load_defaults(path: str | os.PathLike) -> dict[str, bool]:
    """The defaults file (config/consent.yaml as shipped); ConsentError names file and key."""
    try:
        data = read_yaml(path, ConsentError)
    except ConfigError as exc:
        raise ConsentError(str(exc)) from None
    return parse_defaults(data, str(path))


class SubjectRefs:
    """A keyed hash of a subject id (HMAC-SHA256), for records that outlive the subject's data
    (the audit log): the same subject always gives the same ref, and without the key no one can
    test names against it. The key is made on first use (0600, in the keys folder)."""

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ConsentError('a subject reference key has at least 16 bytes')
        self._key = key

    @classmethod
    def at(cls, keys_dir: str | os.PathLike) -> 'SubjectRefs':
        path = Path(os.path.expanduser(str(keys_dir))) / SUBJECT_KEY_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:   # ours to write; a process that lost the race reads it below
                with os.fdopen(fd, 'wb') as stream:
                    stream.write(secrets.token_bytes(KEY_BYTES))
                    stream.flush()
                    os.fsync(stream.fileno())
            with open(path, 'rb') as stream:
                key = stream.read(KEY_BYTES + 1)
        except OSError as exc:
            raise ConsentError(f'{path}: cannot read or create the subject key: '
                               f'{exc.strerror}') from None
        if len(key) != KEY_BYTES:   # a writer still at it, or a damaged file
            raise ConsentError(f'{path}: not a {KEY_BYTES}-byte key; remove it to make a new '
                               'one (old audit records then no longer match their subjects)')
        return cls(key)

    def ref(self, subject: str) -> str:
        digest = hmac.new(self._key, check_subject(subject).encode('ascii'), hashlib.sha256)
        return 'hs256:' + digest.hexdigest()[:32]


@dataclass(frozen=True)
class Change:
    """One recorded change of a subject's consent."""

    id: int
    purpose: str
    granted: bool
    source: str
    changed_ms: int


class ConsentRegistry:
    """lookup / grant / withdraw / show / history / erase on `<root>/consent.db`.

    `audit(record)` takes {'plugin', 'kind', **fields} (an AuditLog is one); `refs` gives the
    subject's keyed hash for it. `read_only`: for tools that only look (no file is created; a
    missing file means nobody was ever asked)."""

    def __init__(self, path: str | os.PathLike, defaults: dict[str, bool] | None = None, *,
                 audit: Callable[[dict], None] | None = None, refs: SubjectRefs | None = None,
                 clock: Callable[[], int] | None = None, read_only: bool = False):
        from loom_ros.storage.storage import wall_ms
        self.path = Path(os.path.expanduser(str(path)))
        self.defaults = parse_defaults({'defaults': dict(defaults or {})}, 'defaults')
        self.audit, self.refs = audit, refs
        self.clock = clock or wall_ms
        self.read_only = read_only
        self._db: DirectDatabase | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._changes = 0   # this registry's own changes (data_version does not count them)
        if not read_only:
            if audit is None or refs is None:
                raise ConsentError('a consent registry that records changes needs the audit '
                                   'log and the subject key (every change is audited)')
            self._db = DirectDatabase(self.path, CONSENT_DDL, clock=self.clock)
            self._db.query('pragma secure_delete = on')   # erased rows are overwritten

    # -- reading ---------------------------------------------------------------------------------
    def _query(self, sql: str, params=()) -> list[dict]:
        if self._db is not None:
            return self._db.query(sql, params)
        with self._lock:
            if self._reader is None:   # nobody asked yet; the file may appear at any time
                if not self.path.is_file():
                    return []
                self._reader = open_database(self.path, read_only=True)
            try:
                cursor = self._reader.execute(sql, params)
                names = [c[0] for c in cursor.description]
                return [dict(zip(names, row)) for row in cursor.fetchall()]
            except sqlite3.DatabaseError as exc:
                raise StorageError(f'{self.path}: cannot read: {exc}') from None

    def version(self) -> tuple:
        """Changes whenever a consent row may have changed: this registry's own changes, and
        `PRAGMA data_version`, which SQLite changes exactly when another connection (another
        process: `loom consent`, the storage node) committed to the file. A cache keyed on it
        (ConsentCache) is never stale: a withdrawal that returned holds from the next check."""
        if self._db is not None:
            row = self._db.query('pragma data_version')
            return self._changes, row[0]['data_version']
        with self._lock:
            if self._reader is None:
                if not self.path.is_file():
                    return self._changes, None
                self._reader = open_database(self.path, read_only=True)
            try:
                return self._changes, self._reader.execute('pragma data_version').fetchone()[0]
            except sqlite3.DatabaseError as exc:
                raise StorageError(f'{self.path}: cannot read: {exc}') from None

    def lookup(self, subject: str, purpose: str) -> ConsentState:
        """The subject's consent for the purpose: its last change, or the default. SubjectError
        or ConsentError for an invalid subject or purpose; StorageError when unreadable (a
        caller enforcing consent then treats the subject as not consenting)."""
        check_subject(subject)
        check_purpose(purpose)
        rows = self._query('select granted, source, changed_ms from consent where subject = ? '
                           'and purpose = ? order by id desc limit 1', (subject, purpose))
        if not rows:
            return ConsentState(purpose, self.defaults[purpose])
        row = rows[0]
        return ConsentState(purpose, bool(row['granted']), True, row['source'],
                            int(row['changed_ms']))

    def allows(self, subject: str, purpose: str) -> bool:
        return self.lookup(subject, purpose).granted

    def show(self, subject: str) -> dict[str, ConsentState]:
        return {purpose: self.lookup(subject, purpose) for purpose in PURPOSES}

    def history(self, subject: str, limit: int = 1000) -> list[Change]:
        check_subject(subject)
        rows = self._query('select id, purpose, granted, source, changed_ms from consent where '
                           'subject = ? order by id limit ?', (subject, int(limit)))
        return [Change(r['id'], r['purpose'], bool(r['granted']), r['source'], r['changed_ms'])
                for r in rows]

    # -- changing --------------------------------------------------------------------------------
    def grant(self, subject: str, purpose: str, source: str) -> ConsentState:
        return self.set(subject, purpose, True, source)

    def withdraw(self, subject: str, purpose: str, source: str) -> ConsentState:
        return self.set(subject, purpose, False, source)

    def set(self, subject: str, purpose: str, granted: bool, source: str) -> ConsentState:
        """Record a change: audited first (an audit failure changes nothing), then stored and
        committed before this returns. Takes effect on the next lookup of every process."""
        if self._db is None:
            raise ConsentError(f'{self.path}: opened read-only')
        check_subject(subject)
        check_purpose(purpose)
        check_source(source)
        if not isinstance(granted, bool):
            raise ConsentError(f'granted must be true or false, got {granted!r}'[:120])
        now = int(self.clock())
        self.audit({'plugin': 'consent', 'kind': 'consent_granted' if granted else
                    'consent_withdrawn', 'ts_ms': now, 'subject_ref': self.refs.ref(subject),
                    'purpose': purpose, 'source': source})
        try:
            self._db.write('insert into consent (subject, purpose, granted, source, changed_ms) '
                           'values (?, ?, ?, ?, ?)', (subject, purpose, int(granted), source, now))
        finally:
            self._changes += 1
        return ConsentState(purpose, granted, True, source, now)

    def erase(self, subject: str) -> int:
        """Forget a subject's consent rows (the right to erasure): deleted with secure_delete
        (overwritten, not only unlinked) and the WAL checkpointed. Returns the rows erased."""
        if self._db is None:
            raise ConsentError(f'{self.path}: opened read-only')
        check_subject(subject)
        count = len(self.history(subject, 10**9))
        try:
            self._db.write('delete from consent where subject = ?', (subject,))
        finally:
            self._changes += 1
        self._db.query('pragma wal_checkpoint(truncate)')
        return count

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None


class ConsentCache:
    """One purpose's answers per subject, for a caller that asks on every event (storage asks
    `store` for each episode). Bounded (`max_entries`; full: cleared) and never stale: every
    answer is dropped as soon as the registry's version() moves (a change by this process or a
    commit by any other), so a withdrawal holds for every write submitted after it returned.
    Fails closed: an invalid subject, or a registry that cannot be read, is not granted (and
    not cached). A source without version() (a plain lookup object) is asked every time."""

    def __init__(self, registry, purpose: str, max_entries: int = 4096):
        self.registry, self.purpose = registry, check_purpose(purpose)
        self.max_entries = max(1, int(max_entries))
        self._versioned = callable(getattr(registry, 'version', None))
        self._answers: dict[str, bool] = {}
        self._version = object()
        self._lock = threading.Lock()
        self.hits = self.misses = self.errors = 0

    def allows(self, subject: str) -> bool:
        with self._lock:
            if self._versioned:
                try:
                    version = self.registry.version()
                except StorageError:
                    self.errors += 1
                    return False
                if version != self._version:
                    self._answers.clear()
                    self._version = version
                found = self._answers.get(subject)
                if found is not None:
                    self.hits += 1
                    return found
            self.misses += 1
            try:
                granted = bool(self.registry.lookup(subject, self.purpose).granted)
            except (SubjectError, ConsentError, StorageError):
                self.errors += 1
                return False
            if self._versioned:
                if len(self._answers) >= self.max_entries:
                    self._answers.clear()
                self._answers[subject] = granted
            return granted


__all__ = ['ConsentCache', 'CONSENT_DDL', 'PURPOSES', 'Change', 'ConsentError', 'ConsentRegistry',
           'ConsentState', 'SubjectError', 'SubjectRefs', 'check_purpose', 'check_source',
           'consent_path', 'load_defaults', 'parse_defaults']
