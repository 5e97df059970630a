"""An agent's persistent state in SQLite (sqlite-utils over a connection from the storage layer's
one opener, loom_ros/storage/sqlite.py: WAL, synchronous=NORMAL, busy timeout, byte cap),
committed in one transaction per handled event (or per interval) together with that event's
episode, restored on configure. A row from an older schema is upgraded; a corrupt row is a clear
error, never a silent reset."""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path

import sqlite_utils

from loom_ros.storage.errors import StorageError
from loom_ros.storage.sqlite import open_database

SCHEMA_VERSION = 2  # 1 had no event counter


class StateError(RuntimeError):
    """State that cannot be loaded or saved; says why."""


class StateStore:
    def __init__(self, path: str | Path, agent_id: str, max_bytes: int = 0):
        self.agent_id = agent_id
        # Dispatcher workers and services share the connection; Agent serializes it with a lock.
        # WAL + NORMAL: a killed process (even SIGKILL) loses nothing committed; only a power
        # cut may lose the last transactions. Without it every event waits for an fsync (~1.5 ms
        # here), which caps a process at a few hundred agent-events/s. With max_bytes SQLite
        # fails writes with 'database or disk is full', as a full disk does. No quick check on
        # open (it reads the whole file: seconds for a large episode log at every configure).
        try:
            conn = open_database(path, synchronous='NORMAL', max_bytes=max_bytes, check=False)
        except StorageError as exc:
            raise StateError(f'agent {agent_id}: cannot open its state: {exc}') from None
        self.db = sqlite_utils.Database(conn)
        self.db['agent_state'].create({
            'agent_id': str, 'schema': int, 'state': str, 'events': int, 'last_event_id': str,
            'updated_ms': int}, pk='agent_id', if_not_exists=True)

    def load(self) -> tuple[dict, int]:
        """(state, events handled) as last committed; ({}, 0) for a new agent."""
        rows = list(self.db.query('select * from agent_state where agent_id = ?', [self.agent_id]))
        if not rows:
            return {}, 0
        row = rows[0]
        try:
            state = json.loads(row['state'])
        except (TypeError, ValueError) as exc:
            raise StateError(f'agent {self.agent_id}: stored state is corrupt ({exc}); it was left '
                             'as is for inspection') from None
        if not isinstance(state, dict):
            raise StateError(f'agent {self.agent_id}: stored state is not an object')
        if row['schema'] == 1:  # older rows: upgrade in place
            row['events'] = state.pop('_events', 0)
        elif row['schema'] != SCHEMA_VERSION:
            raise StateError(f'agent {self.agent_id}: state schema {row["schema"]} is newer than '
                             f'this Loom ({SCHEMA_VERSION})')
        return state, int(row['events'] or 0)

    def commit(self, state: dict, events: int, last_event_id: str) -> None:
        """One transaction with everything written on this connection since the last one (the
        episodes of these events, facts): after it returns, a SIGKILL cannot lose this state,
        and before it, a SIGKILL loses those episodes with it. A prepared statement, not
        sqlite-utils' upsert, which costs 6x more per call here."""
        conn = self.db.conn
        try:
            if not conn.in_transaction:
                conn.execute('BEGIN')
            conn.execute(
                'insert into agent_state (agent_id, schema, state, events, last_event_id, '
                'updated_ms) values (?, ?, ?, ?, ?, ?) on conflict(agent_id) do update set '
                'schema = excluded.schema, state = excluded.state, events = excluded.events, '
                'last_event_id = excluded.last_event_id, updated_ms = excluded.updated_ms',
                [self.agent_id, SCHEMA_VERSION, json.dumps(state, separators=(',', ':')),
                 events, last_event_id, time.time_ns() // 1_000_000])
            conn.commit()
        except Exception as exc:  # disk full, read-only file...: the caller decides what next
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            raise StateError(f'agent {self.agent_id}: cannot persist state: {exc}') from exc

    def close(self) -> None:
        self.db.close()
