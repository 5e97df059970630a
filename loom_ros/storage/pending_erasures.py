"""The robot's queue of fleet erasures still owed a cloud receipt (issue 17): when `forget` asks
the cloud tier to erase a subject and no valid signed receipt comes back (no server answered in
time, the link is down, a server refused), the request must not stop at the robot. Its entry
stays here, under the storage root, until a retry gets the receipt; the storage node retries
(fleet_erasure.retry_pending) and `loom storage stats` / /diagnostics show what is owed.

Owned by storage/fleet_erasure.py (the only writer: `loom forget` and the storage node through
it). Kept in its own file `<root>/fleet_erasures.db`, opened by sqlite.open_database through
direct.DirectDatabase (each write committed before it returns; several processes may share it).
An entry names the subject only by its keyed hash (`subject_ref`, what the erase request sends),
never by its id, so it holds nothing `forget` would have to erase. Bounded: at most MAX_PENDING
open entries (one per subject: a second forget of the same subject reuses it) and MAX_DONE
finished ones (the oldest finished go first); write-ahead: an entry is added before the fleet is
asked, so a process that dies while asking leaves it pending, never lost."""
from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loom_ros.storage.direct import DirectDatabase
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.sqlite import open_database

FILE = 'fleet_erasures.db'
MAX_PENDING = 10_000     # open entries: one per subject still owed a receipt
MAX_DONE = 1_000         # finished entries kept (what was retried, for stats and inspection)
MAX_ERROR_CHARS = 500
MAX_WHO_CHARS = 64
MAX_SERVERS = 64
# A keyed hash as SubjectRefs.ref makes it: never a raw subject id (the queue is not erased).
_REF = re.compile(r'hs256:[0-9a-f]{32}\Z')
DDL = [
    'create table if not exists fleet_erasures (id integer primary key, subject_ref text not '
    'null, requested_by text not null, erasure_audit_id integer not null, created_ms integer '
    'not null, attempts integer not null default 0, next_ms integer not null, last_ms integer '
    "not null default 0, last_status text not null default '', last_error text not null "
    "default '', done_ms integer not null default 0, request_id text not null default '', "
    # the cloud servers whose verified receipts came already (JSON list; fleet_servers set)
    "servers text not null default '[]')",
    # one open entry per subject
    'create unique index if not exists fleet_erasures_open on fleet_erasures (subject_ref) '
    'where done_ms = 0',
    'create index if not exists fleet_erasures_due on fleet_erasures (done_ms, next_ms)',
]


def pending_path(root: str | os.PathLike) -> Path:
    """Where the queue lives under a storage root."""
    return StorageLayout.at(root).root / FILE


@dataclass(frozen=True)
class Backoff:
    """Delay before the n-th retry: first_s, doubled per failed attempt, at most max_s."""

    first_s: float = 30.0
    max_s: float = 3600.0

    def __post_init__(self):
        if not 0 < self.first_s <= self.max_s:
            raise ValueError('retry back-off: 0 < first <= max seconds')

    def delay_ms(self, attempts: int) -> int:
        return int(min(self.max_s, self.first_s * 2 ** min(max(attempts - 1, 0), 40)) * 1000)


@dataclass(frozen=True)
class Entry:
    id: int
    subject_ref: str
    requested_by: str
    erasure_audit_id: int
    created_ms: int
    attempts: int
    next_ms: int
    last_status: str
    last_error: str
    servers: tuple = ()


COLUMNS = ('id, subject_ref, requested_by, erasure_audit_id, created_ms, attempts, next_ms, '
           'last_status, last_error, servers')


def entry_of(row: dict) -> Entry:
    try:
        names = json.loads(row['servers'])
    except ValueError:
        names = []
    names = tuple(n for n in names if isinstance(n, str))[:MAX_SERVERS] \
        if isinstance(names, list) else ()
    return Entry(**{**row, 'servers': names})


class PendingErasures:
    """The queue on one storage root; `clock()` gives wall milliseconds (injected in tests)."""

    def __init__(self, root: str | os.PathLike, *, backoff: Backoff = Backoff(),
                 clock: Callable[[], int] | None = None, max_pending: int = MAX_PENDING,
                 max_done: int = MAX_DONE):
        self.db = DirectDatabase(pending_path(root), DDL, clock=clock, synchronous='FULL')
        self.clock, self.backoff = self.db.clock, backoff
        self.max_pending, self.max_done = max_pending, max_done

    def add(self, subject_ref: str, requested_by: str, erasure_audit_id: int) -> int:
        """Note that `subject_ref`'s fleet erasure is owed (before the fleet is asked); the
        entry's id. A subject already pending keeps its entry (and its age), due at once, but
        as a new request: the receipts and attempts of the earlier one are cleared (servers
        that answered it never erased what was sent since) and it names the new erasure.
        StorageError when MAX_PENDING entries are open or the file cannot take it."""
        if not isinstance(subject_ref, str) or not _REF.match(subject_ref):
            raise StorageError('fleet erasure queue: subject_ref must be a keyed hash '
                               '(hs256: and 32 hex digits), never a subject id')
        who = str(requested_by)[:MAX_WHO_CHARS]
        now = int(self.clock())
        found = self._open(subject_ref)
        if found is not None:
            self.db.write("update fleet_erasures set next_ms = ?, requested_by = ?, "
                          "erasure_audit_id = ?, attempts = 0, servers = '[]' where id = ?",
                          (now, who, int(erasure_audit_id), found))
            return found
        if self.count() >= self.max_pending:
            raise StorageError(f'fleet erasure queue: {self.max_pending} erasures already '
                               'pending (is the cloud tier reachable?); this one is not queued')
        try:
            return int(self.db.write(
                'insert into fleet_erasures (subject_ref, requested_by, erasure_audit_id, '
                'created_ms, next_ms) values (?, ?, ?, ?, ?)',
                (subject_ref, who, int(erasure_audit_id), now, now)).row_id)
        except StorageError:
            found = self._open(subject_ref)   # another process queued it meanwhile
            if found is None:
                raise
            return found

    def _open(self, subject_ref: str) -> int | None:
        rows = self.db.query('select id from fleet_erasures where subject_ref = ? and '
                             'done_ms = 0', (subject_ref,))
        return rows[0]['id'] if rows else None

    def failed(self, entry_id: int, status: str, error: str, servers=()) -> int:
        """One more attempt without every valid receipt: due again after the back-off; when.
        `servers`: those whose receipts came so far (kept for the next attempts)."""
        now = int(self.clock())
        rows = self.db.query('select attempts from fleet_erasures where id = ?', (entry_id,))
        attempts = (rows[0]['attempts'] if rows else 0) + 1
        due = now + self.backoff.delay_ms(attempts)
        names = json.dumps(sorted(str(n)[:64] for n in servers)[:MAX_SERVERS])
        self.db.write('update fleet_erasures set attempts = ?, next_ms = ?, last_ms = ?, '
                      'last_status = ?, last_error = ?, servers = ? where id = ? and done_ms = 0',
                      (attempts, due, now, str(status)[:40], str(error)[:MAX_ERROR_CHARS],
                       names, entry_id))
        return due

    def done(self, entry_id: int, request_id: str) -> None:
        """A valid receipt came: finished (kept among the last MAX_DONE, then dropped)."""
        now = int(self.clock())
        self.db.write("update fleet_erasures set attempts = attempts + 1, done_ms = ?, "
                      "last_ms = ?, last_status = 'done', last_error = '', request_id = ? "
                      'where id = ?', (max(now, 1), now, str(request_id)[:64], entry_id))
        self.db.write('delete from fleet_erasures where done_ms > 0 and id not in (select id '
                      'from fleet_erasures where done_ms > 0 order by done_ms desc, id desc '
                      'limit ?)', (self.max_done,))

    def due(self, limit: int, every: bool = False) -> list[Entry]:
        """Open entries whose retry is due now (`every`: all open ones, back-off or not), the
        longest waiting first; at most `limit`."""
        rows = self.db.query(
            f'select {COLUMNS} from fleet_erasures where done_ms = 0 and next_ms <= ? order by '
            'next_ms, id limit ?', (2**62 if every else int(self.clock()), max(0, int(limit))))
        return [entry_of(r) for r in rows]

    def get(self, entry_id: int) -> Entry | None:
        rows = self.db.query(f'select {COLUMNS} from fleet_erasures where id = ?', (entry_id,))
        return entry_of(rows[0]) if rows else None

    def count(self) -> int:
        return self.db.query('select count(*) as n from fleet_erasures where done_ms = 0')[0]['n']

    def summary(self) -> dict:
        return summary_of(self.db.query)

    def close(self) -> None:
        self.db.close()


SUMMARY_SQL = (
    'select count(*) filter (where done_ms = 0) as pending, '
    'coalesce(min(created_ms) filter (where done_ms = 0), 0) as oldest_ms, '
    'coalesce(min(next_ms) filter (where done_ms = 0), 0) as next_ms, '
    'coalesce(sum(attempts) filter (where done_ms = 0), 0) as attempts, '
    'count(*) filter (where done_ms > 0) as done from fleet_erasures')
LAST_ERROR_SQL = ("select last_error from fleet_erasures where done_ms = 0 and last_error != '' "
                  'order by last_ms desc limit 1')


def summary_of(query: Callable[[str], list]) -> dict:
    """{pending, oldest_ms, next_ms, attempts, done, last_error} through `query(sql) -> rows`."""
    row = dict(query(SUMMARY_SQL)[0])
    last = query(LAST_ERROR_SQL)
    row['last_error'] = dict(last[0])['last_error'] if last else ''
    return row


def read_summary(root: str | os.PathLike) -> dict:
    """The queue's summary read-only (nothing created): all zero when there is no queue."""
    path = pending_path(root)
    if not path.is_file():
        return {'pending': 0, 'oldest_ms': 0, 'next_ms': 0, 'attempts': 0, 'done': 0,
                'last_error': ''}
    conn = open_database(path, read_only=True)
    conn.row_factory = sqlite3.Row
    try:
        return summary_of(lambda sql: conn.execute(sql).fetchall())
    except sqlite3.DatabaseError as exc:
        raise StorageError(f'{path}: cannot read: {exc}') from None
    finally:
        conn.close()
