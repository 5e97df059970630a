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
"""
from __future__ import annotations

import os
from pathlib import Path

from loom_ros.storage import schema
from loom_ros.storage.direct import DirectDatabase
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import DEFAULT_ROOT, StorageLayout
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
        self._store = AuditStore(self._db)
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

    def close(self) -> None:
        self._db.close()


def default_path() -> str:
    """The audit log under the default storage root (<root>/audit.db)."""
    return str(StorageLayout.at(DEFAULT_ROOT).audit)
