"""The audit log: every capability refusal, every actuator command and every privacy refusal, one
row each, in an append-only SQLite table that operators query by plugin, kind and time.

The table, its append-only triggers, the bounding and masking of records and the queries are
the storage layer's (loom_ros/storage: stores.AuditStore over direct.DirectDatabase, opened by
the one SQLite opener); this module is the security-facing handle on the `audit_db` file that
several processes share. An AuditLog is itself a PluginContext.audit_sink (`log(record)`). Each
record is committed before append() returns, from any thread; a record that cannot be stored
raises AuditError, so the caller fails closed (an actuator command that cannot be audited is not
executed). Rows cannot be updated or deleted: SQLite triggers refuse it. Secrets never reach the
file: every string is cut, then masked by telemetry's rules.

Since the triggers stop no one who opens the file and drops them, every record is also a link of
one SHA-256 hash chain (storage/auditchain.py): `verify` (and `loom audit verify`) finds an
edited, deleted or reordered record and names it; `head()` is what to publish or note elsewhere
so that a cut tail or a recomputed chain shows too. Opening a log whose last record does not
link to the one before it is refused (AuditError): nothing is appended to a visibly broken chain.
A record can only be added after the last one (a trigger), and `verify` fails on a record found
before the chain start that was not there when the chain started (schema.AUDIT_DDL).
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from loom_ros.storage import auditchain, schema
from loom_ros.storage.auditchain import Head, Verdict
from loom_ros.storage.direct import DirectDatabase
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import DEFAULT_ROOT, StorageLayout
from loom_ros.storage.sqlite import open_database
from loom_ros.storage.stores import AuditStore


class AuditError(RuntimeError):
    """The audit log cannot be opened or written; says which file and why."""


class AuditLog:
    """Append-only audit records: (ts_ms, plugin, kind, fields as JSON)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path) if str(path) == ':memory:' else str(Path(path).expanduser())
        try:
            self._db = DirectDatabase(self.path, schema.AUDIT_DDL)
        except (StorageError, OSError) as exc:
            raise AuditError(f'audit log {self.path}: cannot open: {exc}') from None
        try:
            self._store = AuditStore(self._db)
            broken = self._store.check_tail()
            self.chain_start = self._store.chain_start()
            # records written before the file had a chain (not covered by it)
            self.before_chain = self._store.count_before_chain()
        except StorageError as exc:
            self._db.close()
            raise AuditError(f'audit log {self.path}: cannot open: {exc}') from None
        if broken:
            self._db.close()
            raise AuditError(f'audit log {self.path}: refusing to append to a broken chain: '
                             f'{broken}; run `loom audit verify --db {self.path}`, keep the file '
                             'for inspection and give the log a new file')
        self.written = 0

    def append(self, plugin: str, kind: str, ts_ms: int | None = None, **fields) -> int:
        """Store one record and commit it; returns its row id."""
        try:
            row_id, _committed = self._store.append(plugin, kind, ts_ms, **fields)
        except StorageError as exc:
            if 'has no kind' in str(exc):
                raise AuditError(str(exc)) from None
            raise AuditError(f'audit log {self.path}: cannot write a {str(kind)[:80]!r} record '
                             f'of {str(plugin)[:80]!r}: {exc}') from None
        self.written += 1
        return row_id

    def __call__(self, record: dict) -> None:
        """The PluginContext.audit_sink form: {'ts_ms', 'plugin', 'kind', **fields}."""
        record = dict(record)
        self.append(record.pop('plugin', ''), record.pop('kind', ''), record.pop('ts_ms', None),
                    **record)

    def query(self, plugin: str = '', kind: str = '', since_ms: int = 0,
              until_ms: int = 2**63 - 1, limit: int = 1000) -> list[dict]:
        """Records in time order (oldest first), filtered by plugin, kind and [since, until]."""
        return self._store.query(plugin, kind, since_ms, until_ms, limit)

    def count(self, plugin: str = '', kind: str = '') -> int:
        return self._store.count(plugin, kind)

    def head(self) -> Head | None:
        """The chain's last record (id, hash): what to publish or note elsewhere."""
        try:
            return self._store.head()
        except StorageError as exc:
            raise AuditError(f'audit log {self.path}: cannot read: {exc}') from None

    def verify(self, published: Head | None = None) -> Verdict:
        """Every link checked; with `published` (a head noted before), that record too; and
        no more records before the chain start than when it started."""
        try:
            return self._store.verify(published)
        except StorageError as exc:
            raise AuditError(f'audit log {self.path}: cannot read: {exc}') from None

    def close(self) -> None:
        self._db.close()


def default_path() -> str:
    """The audit log under the default storage root (<root>/audit.db)."""
    return str(StorageLayout.at(DEFAULT_ROOT).audit)


def verify_file(path: str | os.PathLike, published: Head | None = None) -> Verdict:
    """Check a log's chain without changing the file (a read-only open: no upgrade, no
    tables created). AuditError when it cannot be read or is not an audit log."""
    conn = _open_read_only(path)
    try:
        if 'hash' not in _columns(conn):
            return Verdict(False, bad_id=0, reason='the file has no hash chain (written before '
                           'Loom had one): open it once with this Loom, e.g. start any auditing '
                           'node, and the chain starts at the next record')
        start = _chain_start(conn)
        rows = conn.execute('select id, ts_ms, plugin, kind, fields, hash from audit order by id')
        return auditchain.verify(rows, start, published, _meta(conn, 'pre_chain'))
    except sqlite3.Error as exc:
        raise AuditError(f'audit log {path}: cannot read: {exc}') from None
    finally:
        conn.close()


def read_head(path: str | os.PathLike) -> tuple[Head | None, int]:
    """(the chain's head, records in the file), read-only; head None: no chained record."""
    conn = _open_read_only(path)
    try:
        count = conn.execute('select count(*) from audit').fetchone()[0]
        if 'hash' not in _columns(conn):
            return None, count
        row = conn.execute('select id, hash from audit order by id desc limit 1').fetchone()
        if row is None or row['hash'] is None:
            return None, count
        return Head(int(row['id']), str(row['hash'])), count
    except sqlite3.Error as exc:
        raise AuditError(f'audit log {path}: cannot read: {exc}') from None
    finally:
        conn.close()


def _open_read_only(path) -> sqlite3.Connection:
    path = Path(path).expanduser()
    try:
        conn = open_database(path, read_only=True)
    except StorageError as exc:
        raise AuditError(f'audit log {path}: cannot open: {exc}') from None
    conn.row_factory = sqlite3.Row
    if not conn.execute("select 1 from sqlite_master where type = 'table' and name = 'audit'"
                        ).fetchone():
        conn.close()
        raise AuditError(f'{path}: not an audit log (no audit table)')
    return conn


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {r['name'] for r in conn.execute("select name from pragma_table_info('audit')")}


def _chain_start(conn: sqlite3.Connection) -> int | None:
    return _meta(conn, 'chain_start')


def _meta(conn: sqlite3.Connection, key: str) -> int | None:
    """An audit_meta number (None: no such table or row, or not a number)."""
    if not conn.execute("select 1 from sqlite_master where type = 'table' and "
                        "name = 'audit_meta'").fetchone():
        return None
    return _meta_int(conn.execute('select value from audit_meta where key = ?',
                                  (key,)).fetchall())


def _meta_int(rows) -> int | None:
    try:
        return int(rows[0]['value']) if rows else None
    except (TypeError, ValueError):
        return None
