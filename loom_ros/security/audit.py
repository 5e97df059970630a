"""The audit log: every capability refusal and every actuator command, one row each, in an
append-only SQLite table (sqlite-utils, WAL) that operators query by plugin, kind and time.

An AuditLog instance is itself a PluginContext.audit_sink (`log(record)`). Writes are committed
one by one and serialized by a lock, so any thread may write; a write that cannot be stored
raises AuditError, so the caller fails closed (an actuator command that cannot be audited is not
executed). Rows cannot be updated or deleted: SQLite triggers refuse it. Secrets never reach
the file: every string is cut to MAX_FIELD_CHARS, then masked by telemetry's rules (a field
whose name designates a secret is replaced whole; bearer tokens, API keys and sensitive
key=value pairs inside any string are masked).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import sqlite_utils

from loom_ros.telemetry.logs import mask_text, mask_value

TABLE = 'audit'
MAX_FIELD_CHARS = 2000   # of any one string in a record, cut before masking
MAX_DEPTH = 8            # of nested fields kept


def _bounded(value, depth: int = 0):
    """`value` with every string cut and nesting limited, so masking's cost is bounded."""
    if isinstance(value, str):
        return value[:MAX_FIELD_CHARS]
    if depth >= MAX_DEPTH:
        return '<nested too deep>'
    if isinstance(value, dict):
        return {str(k)[:MAX_FIELD_CHARS]: _bounded(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_bounded(v, depth + 1) for v in value]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return str(value)[:MAX_FIELD_CHARS]


class AuditError(RuntimeError):
    """The audit log cannot be opened or written; says which file and why."""


class AuditLog:
    """Append-only audit records: (ts_ms, plugin, kind, fields as JSON)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            if self.path != ':memory:':
                Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
                self.path = str(Path(self.path).expanduser())
            conn = sqlite3.connect(self.path, check_same_thread=False)
            self.db = sqlite_utils.Database(conn)
            if self.path != ':memory:':
                self.db.enable_wal()
            conn.execute('pragma synchronous=NORMAL')
            self.db[TABLE].create({'id': int, 'ts_ms': int, 'plugin': str, 'kind': str,
                                   'fields': str}, pk='id', if_not_exists=True)
            self.db[TABLE].create_index(['plugin', 'ts_ms'], if_not_exists=True)
            self.db[TABLE].create_index(['kind', 'ts_ms'], if_not_exists=True)
            for op in ('update', 'delete'):
                conn.execute(f'create trigger if not exists {TABLE}_no_{op} before {op} on '
                             f"{TABLE} begin select raise(abort, 'the audit log is append-only');"
                             ' end')
            conn.commit()
        except (sqlite3.Error, OSError) as exc:
            raise AuditError(f'audit log {self.path}: cannot open: {exc}') from None
        self._conn = conn
        self._lock = threading.Lock()
        self.written = 0

    # -- writing -------------------------------------------------------------------------------
    def append(self, plugin: str, kind: str, ts_ms: int | None = None, **fields) -> int:
        """Store one record and commit it; returns its row id."""
        if not kind or not isinstance(kind, str):
            raise AuditError(f'audit record for {plugin!r} has no kind')
        ts = int(ts_ms) if ts_ms is not None else time.time_ns() // 1_000_000
        plugin, kind = mask_text(str(plugin)[:MAX_FIELD_CHARS]), mask_text(kind[:MAX_FIELD_CHARS])
        body = json.dumps(mask_value(_bounded(fields)), separators=(',', ':'), sort_keys=True,
                          default=str)
        with self._lock:
            try:
                cursor = self._conn.execute(
                    f'insert into {TABLE} (ts_ms, plugin, kind, fields) values (?, ?, ?, ?)',
                    (ts, plugin, kind, body))
                self._conn.commit()
            except sqlite3.Error as exc:
                self._conn.rollback()
                raise AuditError(f'audit log {self.path}: cannot write a {kind!r} record of '
                                 f'{plugin!r}: {exc}') from None
            self.written += 1
            return cursor.lastrowid

    def __call__(self, record: dict) -> None:
        """The PluginContext.audit_sink form: {'ts_ms', 'plugin', 'kind', **fields}."""
        record = dict(record)
        self.append(record.pop('plugin', ''), record.pop('kind', ''), record.pop('ts_ms', None),
                    **record)

    # -- reading -------------------------------------------------------------------------------
    def query(self, plugin: str = '', kind: str = '', since_ms: int = 0,
              until_ms: int = 2**63 - 1, limit: int = 1000) -> list[dict]:
        """Records in time order (oldest first), filtered by plugin, kind and [since, until]."""
        where, args = ['ts_ms >= :s', 'ts_ms <= :u'], {'s': since_ms, 'u': until_ms,
                                                        'limit': int(limit)}
        if plugin:
            where.append('plugin = :plugin')
            args['plugin'] = plugin
        if kind:
            where.append('kind = :kind')
            args['kind'] = kind
        with self._lock:
            rows = list(self.db.query(
                f'select id, ts_ms, plugin, kind, fields from {TABLE} where {" and ".join(where)} '
                'order by ts_ms, id limit :limit', args))
        return [{**row, 'fields': json.loads(row['fields'])} for row in rows]

    def count(self, plugin: str = '', kind: str = '') -> int:
        return len(self.query(plugin, kind, limit=2**62))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def default_path() -> str:
    return os.path.expanduser('~/.loom/audit.db')
