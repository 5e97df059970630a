"""Database query tool: read-only SQL on one configured SQLite file, bounded in rows and time.

Query (`tool.db.query`): `{"sql": "select ...", "params": [...] or {...}}`. Result
(`tool.db.result`): `{"columns": [...], "rows": [[...], ...], "truncated": bool}`.
Three locks keep it read-only: the file is opened `file:...?mode=ro`, an SQLite authorizer
refuses every statement that is not a read (writes, ATTACH, PRAGMA, schema changes) with a
clear error, and one statement per query.

Bounded in time and memory, whatever the SQL: SQLite's progress handler interrupts a query past
`timeout_ms` (checked every PROGRESS_STEPS virtual-machine steps, so while it runs, not after);
no string or blob may exceed `max_value_bytes` (SQLITE_LIMIT_LENGTH: `randomblob(1e9)` fails at
once instead of taking a GB), nor a row have more than MAX_COLUMNS columns; this connection's
page cache is capped and temporary tables go to disk; the SQL text is at most MAX_SQL_CHARS
before SQLite parses it; LIKE/GLOB patterns are short; printf/format are refused (one call can
run for seconds between progress checks). At most `max_rows` rows and
`max_result_bytes` of values come back (`truncated` says there were more). Needs `storage.read`.
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import (
    Capability, HealthStatus, Plugin, PluginContext, PluginError, PluginMetadata, PluginResponse,
    PluginType,
)
from loom_ros.plugins.tools import ToolInputError, read_query, result_event
from loom_ros.storage.errors import StorageError
from loom_ros.storage.sqlite import open_database

QUERY = 'tool.db.query'
RESULT = 'tool.db.result'
MAX_SQL_CHARS = 10_000
MAX_PARAMS = 100
PROGRESS_STEPS = 1000
CACHE_KIB = 2048   # this connection's page cache
MAX_COLUMNS = 128  # a fetched row holds at most MAX_COLUMNS * max_value_bytes
MAX_LIKE_PATTERN = 200   # LIKE/GLOB patterns backtrack: their length is bounded
# Functions whose one call can run for seconds regardless of the value limit (printf pads its
# width character by character), which the progress handler, running between steps, cannot stop.
SLOW_FUNCTIONS = frozenset({'printf', 'format'})

_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                 getattr(sqlite3, 'SQLITE_RECURSIVE', 33)}
# SQLite's authorizer action codes (sqlite3.h); the module's SQLITE_* names mix in error codes.
_ACTION_NAMES = dict(enumerate((
    'COPY', 'CREATE_INDEX', 'CREATE_TABLE', 'CREATE_TEMP_INDEX', 'CREATE_TEMP_TABLE',
    'CREATE_TEMP_TRIGGER', 'CREATE_TEMP_VIEW', 'CREATE_TRIGGER', 'CREATE_VIEW', 'DELETE',
    'DROP_INDEX', 'DROP_TABLE', 'DROP_TEMP_INDEX', 'DROP_TEMP_TABLE', 'DROP_TEMP_TRIGGER',
    'DROP_TEMP_VIEW', 'DROP_TRIGGER', 'DROP_VIEW', 'INSERT', 'PRAGMA', 'READ', 'SELECT',
    'TRANSACTION', 'UPDATE', 'ATTACH', 'DETACH', 'ALTER_TABLE', 'REINDEX', 'ANALYZE',
    'CREATE_VTABLE', 'DROP_VTABLE', 'FUNCTION', 'SAVEPOINT', 'RECURSIVE')))


class DbQueryTool(Plugin):
    metadata = PluginMetadata(
        name='db_query', version='0.1.0', type=PluginType.TOOL,
        capabilities=(Capability.STORAGE_READ,), reads=(QUERY,), writes=(RESULT,),
        description='Read-only SQL on a configured SQLite file, bounded rows and time.')

    def init(self, ctx: PluginContext) -> None:
        super().init(ctx)
        database = ctx.config.get('database', '')
        if not database:
            raise PluginError("db_query config: 'database' (an SQLite file) is required")
        self.path = Path(os.path.expanduser(database))
        self.max_rows = int(ctx.config.get('max_rows', 1000))
        self.timeout_s = float(ctx.config.get('timeout_ms', 1000)) / 1000.0
        self.max_value_bytes = int(ctx.config.get('max_value_bytes', 256 << 10))
        self.max_result_bytes = int(ctx.config.get('max_result_bytes', 4 << 20))
        if min(self.max_rows, self.timeout_s, self.max_value_bytes, self.max_result_bytes) <= 0:
            raise PluginError('db_query config: max_rows, timeout_ms, max_value_bytes and '
                              'max_result_bytes must be positive')
        self.clock = time.monotonic
        ctx.require(Capability.STORAGE_READ, detail=str(self.path))
        if not self.path.is_file():
            raise PluginError(f'db_query: database {self.path} does not exist')
        try:
            # The storage layer's one opener (mode=ro URI); no quick check of a user's database.
            self.conn = open_database(self.path, read_only=True, check=False)
            self.conn.execute('select count(*) from sqlite_master').fetchone()
            self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.max_value_bytes)
            self.conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_CHARS * 4)
            self.conn.setlimit(sqlite3.SQLITE_LIMIT_COLUMN, MAX_COLUMNS)
            self.conn.setlimit(sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, MAX_LIKE_PATTERN)
            self.conn.execute('pragma query_only = 1')
            self.conn.execute(f'pragma cache_size = -{CACHE_KIB}')
            self.conn.execute('pragma temp_store = file')
        except (sqlite3.Error, StorageError) as exc:
            raise PluginError(f'db_query: cannot open {self.path} read-only: {exc}') from None
        self._denied: list[str] = []
        self.conn.set_authorizer(self._authorize)
        self.answered = self.refused = 0

    def _authorize(self, action, arg1, arg2, _db, _trigger):
        if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in SLOW_FUNCTIONS:
            self._denied.append(f'FUNCTION {arg2} (one uninterruptible step: '
                                f'printf("%.*c", 2000000000) ran for 34 s)')
            return sqlite3.SQLITE_DENY
        if action in _READ_ACTIONS:
            return sqlite3.SQLITE_OK
        self._denied.append(f'{_ACTION_NAMES.get(action, action)} {arg1 or ""}'.strip())
        return sqlite3.SQLITE_DENY

    def handle_event(self, event: Event) -> PluginResponse:
        try:
            query = read_query(event, QUERY)
            sql, params = query.get('sql'), query.get('params', [])
            if not isinstance(sql, str) or not sql.strip():
                raise ToolInputError('sql must be a non-empty string')
            if len(sql) > MAX_SQL_CHARS:
                raise ToolInputError(f'sql of {len(sql)} characters exceeds {MAX_SQL_CHARS}')
            if not isinstance(params, (list, dict)):
                raise ToolInputError('params must be a list or an object')
            if len(params) > MAX_PARAMS:
                raise ToolInputError(f'{len(params)} params exceed {MAX_PARAMS}')
        except ToolInputError as exc:
            self.refused += 1
            return PluginResponse.failure(str(exc))
        self._denied.clear()
        clock = self.clock
        deadline = clock() + self.timeout_s
        self.conn.set_progress_handler(lambda: int(clock() > deadline), PROGRESS_STEPS)
        cursor = None
        rows, size, truncated = [], 0, False
        try:
            cursor = self.conn.execute(sql, params)
            columns = [d[0] for d in cursor.description or ()]
            for row in cursor:   # one at a time: what is held is bounded by rows and bytes
                size += sum(_size(v) for v in row)
                if len(rows) == self.max_rows or size > self.max_result_bytes:
                    truncated = True
                    break
                rows.append(row)
        except sqlite3.DatabaseError as exc:
            self.refused += 1
            if self._denied and self._denied[0].startswith('FUNCTION'):
                return PluginResponse.failure(f'db_query: refused {self._denied[0]}')
            if self._denied:
                return PluginResponse.failure(f'db_query is read-only: refused '
                                              f'{", ".join(self._denied)} ({exc})')
            if 'interrupted' in str(exc):
                return PluginResponse.failure(f'db_query: query stopped after the '
                                              f'{self.timeout_s * 1000:g} ms limit')
            if 'too big' in str(exc):
                return PluginResponse.failure(f'db_query: a value would exceed the '
                                              f'{self.max_value_bytes} byte limit ({exc})')
            return PluginResponse.failure(f'db_query: {exc}')
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            self.refused += 1  # e.g. two statements, wrong parameter count
            return PluginResponse.failure(f'db_query: {exc}')
        finally:
            if cursor is not None:
                cursor.close()
            self.conn.set_progress_handler(None, 0)
        self.answered += 1
        return PluginResponse(events=[result_event(RESULT, {
            'columns': columns, 'rows': [list(_jsonable(v) for v in r) for r in rows],
            'truncated': truncated}, self.metadata.name)])

    def health(self) -> HealthStatus:
        return HealthStatus(details={'database': str(self.path), 'answered': str(self.answered),
                                     'refused': str(self.refused)})

    def shutdown(self) -> None:
        if getattr(self, 'conn', None) is not None:
            self.conn.close()
            self.conn = None


def _size(value) -> int:
    """Bytes a value holds (a number counts as 8)."""
    return len(value) if isinstance(value, (str, bytes)) else 8


def _jsonable(value):
    if isinstance(value, bytes):
        return f'<{len(value)} bytes>'
    return value
