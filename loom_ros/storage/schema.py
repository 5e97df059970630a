"""The tables of one storage database (one per writing process). Created if missing; a file
from a newer Loom is refused rather than misread."""
from __future__ import annotations

import sqlite3
import time
import uuid

from loom_ros.storage.errors import StorageError

# The inserts of episode rows (stores.EpisodeStore), which the writer's span keeper reads
# (spans.py: agent_id first, time_ms third).
EPISODE_INSERT = ('insert into episodes (agent_id, event_id, time_ms, type, source, tags, '
                  'payload, bytes) values (?, ?, ?, ?, ?, ?, ?, ?)')
# with the event's data subject (loom.subject metadata), which erasure and export go by
EPISODE_INSERT_SUBJECT = ('insert into episodes (agent_id, event_id, time_ms, type, source, '
                          'tags, payload, bytes, subject) values (?, ?, ?, ?, ?, ?, ?, ?, ?)')
# with the time this store wrote the row (`stored_ms`, stored_stamp): what the lifecycle ages
# the row by (time_ms is the publisher's stamp, kept for queries by time). The two above leave
# stored_ms 0 (unknown): the lifecycle stamps such a row when it first sees it.
EPISODE_INSERT_STORED = ('insert into episodes (agent_id, event_id, time_ms, type, source, '
                         'tags, payload, bytes, subject, stored_ms) values '
                         '(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)')
EPISODE_INSERTS = (EPISODE_INSERT, EPISODE_INSERT_SUBJECT, EPISODE_INSERT_STORED)

# 2: episode_agents (each agent's time span) bounds every per-agent query. A Loom of version 1
# would write episodes without widening the spans, and queries would miss its rows, so it must
# refuse a file this one has opened: the version is raised on open, after the migration.
# 3: `stored_ms` on episodes, cold memories and archive files (STORED_TABLES); a Loom of
# version 2 would age them by the publisher's stamp again.
VERSION = 3

# A clock before this is not believable (a robot without a real-time clock boots at 1970): the
# store stamps its rows 0 (unknown) and the lifecycle ages nothing (lifecycle.py). Older than
# any file this Loom can hold; the storage tests' epoch (2023-11-14) is after it.
CLOCK_FLOOR_MS = 1_672_531_200_000       # 2023-01-01 00:00 UTC
MAX_TIME_MS = 32_503_680_000_000         # 3000-01-01 00:00 UTC: later is not a time either


def bounded_ms(value) -> int:
    """A timestamp brought into [0, MAX_TIME_MS] before arithmetic (a publisher's stamp may be
    negative, near 2**63 or not an int: 0 then)."""
    if type(value) is not int:
        try:
            value = int(value)
        except (TypeError, ValueError, OverflowError):
            return 0
    return 0 if value < 0 else MAX_TIME_MS if value > MAX_TIME_MS else value


def stored_stamp(value) -> int:
    """The write time a row is stamped with: the store's clock, or 0 (unknown) when that clock
    is not believable (before CLOCK_FLOOR_MS, after MAX_TIME_MS, not a number)."""
    value = bounded_ms(value)
    return value if value >= CLOCK_FLOOR_MS and value < MAX_TIME_MS else 0

DDL = [
    'create table if not exists meta (key text primary key, value text not null)',
    # KV: agent state and other small records, JSON with a schema version per row.
    'create table if not exists kv (ns text not null, key text not null, schema int not null, '
    'value text not null, updated_ms int not null, primary key (ns, key)) without rowid',
    # Warm tier: full events.
    'create table if not exists episodes (id integer primary key, agent_id text not null, '
    'event_id text not null, time_ms int not null, type text not null, source text not null, '
    'tags text not null, payload text not null, bytes int not null, '
    "subject text not null default '', stored_ms int not null default 0)",
    # One index, time first, so every insert lands at its right edge: an index led by agent_id
    # takes each batch's rows at as many places as it has agents, and with 1,000 agents every
    # commit rewrote hundreds of index pages into the WAL; commits fell from 74,000 to 14,000
    # rows/s as the table grew to 300,000 rows (bench/storage_bench.py `growth`). A query for
    # one agent scans the time range in this index (agent_id is in it: no table read for
    # another agent's rows). Files from before lose the old two indexes when opened.
    'drop index if exists episodes_agent_time',
    'drop index if exists episodes_time',
    'create index if not exists episodes_time_agent on episodes (time_ms, agent_id)',
    # Which agents have episodes and between which times (one row per agent, written with the
    # episodes): a question about an agent with none is answered here, and a query for one
    # agent scans only its time span in the index. Bounds, not counts: rows moved or erased
    # leave them as they were. Filled from the episodes once, for a file from before.
    'create table if not exists episode_agents (agent_id text primary key, '
    'first_ms int not null, last_ms int not null) without rowid',
    'insert or ignore into episode_agents (agent_id, first_ms, last_ms) select agent_id, '
    'min(time_ms), max(time_ms) from episodes where not exists (select 1 from episode_agents) '
    'group by agent_id',
    # The data subjects whose events wrote a KV row (an agent's state after handling them):
    # erasing one deletes the rows it wrote to (what a state holds of a person cannot be told
    # apart from the rest of it).
    'create table if not exists kv_subjects (ns text not null, key text not null, '
    'subject text not null, primary key (ns, key, subject)) without rowid',
    'create index if not exists kv_subjects_subject on kv_subjects (subject)',
    # Events of data subjects without `store` consent: counted, never kept (no payload, no id,
    # no subject): per agent, event type and UTC day.
    'create table if not exists withheld (agent_id text not null, type text not null, '
    'day text not null, events int not null, primary key (agent_id, type, day)) without rowid',
    # Cold tier: events condensed into memories; the vector is an int8 code (see cold.py).
    'create table if not exists cold (id integer primary key, agent_id text not null, '
    'type text not null, source text not null, first_ms int not null, last_ms int not null, '
    'count int not null, summary text not null, code blob not null, bytes int not null, '
    "subject text not null default '', stored_ms int not null default 0)",
    'create index if not exists cold_last on cold (last_ms)',
    'create index if not exists cold_agent_first on cold (agent_id, first_ms)',
    # Every change of the cold rows, in the transaction that made it: the index replays it.
    'create table if not exists cold_log (seq integer primary key autoincrement, op int not null, '
    'id int not null)',
    # Archive files in the object store: pending until the rows they hold left the database.
    'create table if not exists archive (key text primary key, state text not null, '
    'tier text not null, first_ms int not null, last_ms int not null, rows int not null, '
    'bytes int not null, created_ms int not null, stored_ms int not null default 0)',
    'create index if not exists archive_last on archive (last_ms)',
    'create table if not exists blobs (key text primary key, bytes int not null, '
    'content_type text not null, created_ms int not null)',
    # Semantic memory (knowledge graph + fact vectors, as agents/memory.py keeps them).
    'create table if not exists facts (id integer primary key, agent_id text not null, '
    'subject text not null, relation text not null, object text not null, provenance text not null, '
    'time_ms int not null, vector blob not null)',
    'create index if not exists facts_agent_subject on facts (agent_id, subject)',
    'create index if not exists facts_agent_object on facts (agent_id, object)',
]

# Router history (router/history.py opens a file of only these, named by the router's history_db).
ROUTER_DDL = [
    'create table if not exists decisions (id text primary key, time real, event_id text, '
    'event_type text, agent_id text, privacy int, route text, rule text, confidence real, '
    'cloud_cost real, local_confidence real, payload_bytes int, latency_budget_ms real, '
    "subject text not null default '')",
    'create table if not exists outcomes (decision_id text, time real, event_type text, '
    'backend text, latency_ms real, cost real, success int, confidence real)',
    'create index if not exists outcomes_time on outcomes (time)',
    'create index if not exists outcomes_backend on outcomes (backend, event_type)',
    # one outcome per decision (RouterHistory.record_outcome looks it up)
    'create index if not exists outcomes_decision on outcomes (decision_id)',
]

# Audit: append-only, enforced by triggers (security/audit.py opens a file of only these, the
# audit_db that several processes share), and one hash chain over every record (auditchain.py):
# `hash` is linked in the transaction that inserts the row. `audit_meta` keeps where the chain
# starts: id 1 for a new file, the next id for a file written before the chain (set once, by the
# first open; its older rows stay as they were, without hashes, and verify says they are not
# covered). A file whose audit table predates the hash column gets it from AUDIT_UPGRADE.
# `pre_chain` keeps how many records lay before the chain start when this was first noted (set
# once; a file chained before it was noted gets the count on its next open): verify fails when
# more lie there (a record planted before the chain, where no hash covers it). A trigger
# refuses, in SQLite, a record below the chain start or not after the last one; it is an AFTER
# trigger because a BEFORE one sees -1 as the id SQLite is about to assign (an insert without an
# id, as an old Loom makes, lands at the end and is taken).
AUDIT_DDL = [
    'create table if not exists audit (id integer primary key, ts_ms int not null, '
    'plugin text not null, kind text not null, fields text not null, hash text)',
    'create index if not exists audit_plugin on audit (plugin, ts_ms)',
    'create index if not exists audit_kind on audit (kind, ts_ms)',
    "create trigger if not exists audit_no_update before update on audit begin "
    "select raise(abort, 'the audit log is append-only'); end",
    "create trigger if not exists audit_no_delete before delete on audit begin "
    "select raise(abort, 'the audit log is append-only'); end",
    'create table if not exists audit_meta (key text primary key, value text not null)',
    "insert or ignore into audit_meta (key, value) select 'chain_start', "
    'coalesce(max(id), 0) + 1 from audit',
    "insert or ignore into audit_meta (key, value) select 'pre_chain', count(*) from audit "
    "where id < (select cast(value as integer) from audit_meta where key = 'chain_start')",
    "create trigger if not exists audit_append_at_end after insert on audit when new.id < "
    "coalesce((select cast(value as integer) from audit_meta where key = 'chain_start'), 1) "
    'or new.id < (select max(id) from audit) begin '
    "select raise(abort, 'the audit log is append-only: a record goes after the last one, "
    "from the chain start on'); end",
    "create trigger if not exists audit_meta_no_update before update on audit_meta begin "
    "select raise(abort, 'the audit log is append-only'); end",
    "create trigger if not exists audit_meta_no_delete before delete on audit_meta begin "
    "select raise(abort, 'the audit log is append-only'); end",
]
AUDIT_UPGRADE = 'alter table audit add column hash text'   # when pragma table_info has no hash

# The data subject (bus/privacy.py SUBJECT_METADATA_KEY) of what a row holds, '' when anonymous:
# erasure and export (storage/erasure.py) find a person's rows by it. Files from before it get
# the column (ALTER TABLE) when opened; the index is made once the column exists.
SUBJECT_TABLES = ('episodes', 'cold', 'decisions')
# The episodes that name a data subject, by event id (EpisodeStore.origin: the subject of a
# fact's provenance event when this process did not note it, from before a restart or never
# seen): without it every such fact scanned the whole warm tier (4-8 ms at 600,000 rows).
# Partial: an anonymous episode answers like an unknown one, so only named episodes enter it. Its
# cost is index pages per commit (one place per publishing process): with one episode in ten
# named, a third to a half less of the raw commit rate at 100 rows a commit; on every row, half
# (bench/storage_bench.py `growth`). Built once when a file from before is opened.
EPISODES_BY_EVENT = ("create index if not exists episodes_event on episodes (event_id) "
                     "where subject != ''")


def upgrade_subjects(conn: sqlite3.Connection) -> None:
    """Add the `subject` column (and its index) to each of SUBJECT_TABLES the file has; call
    inside the transaction that creates the tables."""
    for table in SUBJECT_TABLES:
        columns = {r[1] for r in conn.execute(f'pragma table_info({table})')}
        if not columns:
            continue
        if 'subject' not in columns:
            conn.execute(f"alter table {table} add column subject text not null default ''")
        conn.execute(f'create index if not exists {table}_subject on {table} (subject)')
    if 'subject' in {r[1] for r in conn.execute('pragma table_info(episodes)')}:
        conn.execute(EPISODES_BY_EVENT)
    # facts: `subject` is the graph's; the data subject of the event a fact came from is
    # `data_subject` (so a fact is still found once its event left the warm tier)
    columns = {r[1] for r in conn.execute('pragma table_info(facts)')}
    if columns:
        if 'data_subject' not in columns:
            conn.execute("alter table facts add column data_subject text not null default ''")
        conn.execute('create index if not exists facts_data_subject on facts (data_subject)')

# The tables the lifecycle ages by `stored_ms` (when this store wrote the row, or, for a cold
# memory and an archive file, the newest of the rows they hold), with the event time a file from
# before version 3 had aged them by. stored_ms of cold and archive is indexed (the lifecycle and
# the budgets take their oldest first, and only the lifecycle writes them); that of episodes is
# not (an index costs the hot write path 10-18 % of its raw rate): the lifecycle walks episodes
# by id, which is the order they were written in.
STORED_TABLES = (('episodes', 'time_ms'), ('cold', 'last_ms'), ('archive', 'last_ms'))
STORED_INDEXES = ('create index if not exists cold_stored on cold (stored_ms)',
                  'create index if not exists archive_stored on archive (stored_ms)')


def upgrade_stored(conn: sqlite3.Connection, now_ms: int | None = None) -> None:
    """Add `stored_ms` to each of STORED_TABLES the file has (inside the transaction that
    creates the tables). A row from before gets its event time when that lies between
    CLOCK_FLOOR_MS and now (what it was aged by until now: its age is kept), else now, the
    latest it can have been written (a stamp from 1970 or the far future is not believed, and
    its age starts at the upgrade), or 0 (unknown, stamped by the lifecycle) when this clock is
    not believable itself."""
    now = stored_stamp(int(time.time() * 1000) if now_ms is None else now_ms)
    for table, time_col in STORED_TABLES:
        columns = {r[1] for r in conn.execute(f'pragma table_info({table})')}
        if columns and 'stored_ms' not in columns:
            conn.execute(f'alter table {table} add column stored_ms int not null default 0')
            conn.execute(f'update {table} set stored_ms = case when {time_col} between ? and ? '
                         f'then {time_col} else ? end', (CLOCK_FLOOR_MS, max(now, 0), now))
    for statement in STORED_INDEXES:
        table = statement.split(' on ')[1].split()[0]
        if any(r[1] == 'stored_ms' for r in conn.execute(f'pragma table_info({table})')):
            conn.execute(statement)


DDL = DDL + ROUTER_DDL + AUDIT_DDL


def create(conn: sqlite3.Connection, statements: list[str]) -> None:
    """Create what `statements` describe, if missing, in one transaction."""
    conn.execute('BEGIN IMMEDIATE')
    try:
        for statement in statements:
            conn.execute(statement)
        upgrade_subjects(conn)
        upgrade_stored(conn)
        conn.execute('COMMIT')
    except BaseException:
        conn.execute('ROLLBACK')
        raise


def ensure(conn: sqlite3.Connection, path, now_ms: int | None = None) -> None:
    """Create the tables (one transaction) and check the file's version. `now_ms`: the
    clock a file from before version 3 is upgraded at (upgrade_stored; None: the wall clock)."""
    conn.execute('BEGIN IMMEDIATE')
    try:
        for statement in DDL:
            conn.execute(statement)
        upgrade_subjects(conn)
        upgrade_stored(conn, now_ms)
        # which database this is: a cold index file names it, so one of another unit with the
        # same shape is not taken for this one's (storage/cold.py)
        conn.execute("insert or ignore into meta values ('database_id', ?)", (uuid.uuid4().hex,))
        row = conn.execute("select value from meta where key = 'version'").fetchone()
        found = _version(row[0], path) if row is not None else None
        if found is None:
            conn.execute("insert into meta values ('version', ?)", (str(VERSION),))
        elif found > VERSION:
            raise StorageError(f'{path}: storage version {found} is newer than this Loom '
                               f'({VERSION}); refusing to touch it')
        elif found < VERSION:   # migrated above, in this transaction
            conn.execute("update meta set value = ? where key = 'version'", (str(VERSION),))
        conn.execute('COMMIT')
    except BaseException:
        conn.execute('ROLLBACK')
        raise


def _version(value, path) -> int:
    """The file's storage version; a value that is not one is refused, quoted bounded."""
    try:
        return int(str(value)[:20])
    except ValueError:
        raise StorageError(f'{path}: storage version {str(value)[:40]!r} is not a number; the '
                           'file was left as it is') from None
