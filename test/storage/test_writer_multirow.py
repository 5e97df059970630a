"""The writer's multi-row statements (one SQLite step for up to 1,024 rows, so a busy thread
beside the writer cannot make it wait for the GIL after every row) and the checkpointer that
keeps WAL checkpoints out of commits: same rows, same order, same upsert counts and the same
errors as executemany; a checkpoint failure is counted and the writer goes on."""
from __future__ import annotations

import sqlite3

import pytest

from loom_ros.bus.event import Event
from loom_ros.storage.errors import StorageError
from loom_ros.storage.sqlite import Checkpointer, open_database
from loom_ros.storage.storage import Storage, StorageConfig
from loom_ros.storage.stores import EpisodeStore, KVStore
from loom_ros.storage.writer import MultiRow


@pytest.fixture
def conn(tmp_path):
    c = open_database(tmp_path / 'm.db')
    c.execute('create table t (id integer primary key, a text not null, b int)')
    c.execute('create table w (k text primary key, n int not null)')
    yield c
    c.close()


def test_forms_it_widens_and_those_it_leaves_to_executemany():
    m = MultiRow()
    assert m.form(EpisodeStore.INSERT_SUBJECT)[3] == 9
    assert m.form(KVStore.PUT)[2].startswith(' on conflict(ns, key)')
    assert m.form(EpisodeStore.WITHHOLD)[1] == '(?, ?, ?, 1)'
    for sql in ('insert into audit (id, ts) select :a, :b', 'delete from t where id = ?',
                'insert into t (a, b) values (?, ?) on conflict(a) do update set b = ?',
                'insert into t (a, b) values (:a, :b)', 'update t set b = ? where a = ?',
                'insert into t (a, b) values (?1, ?2)'):
        assert m.form(sql) is None, sql


@pytest.mark.parametrize('n', [2, 3, 127, 128, 129, 1000, 1023, 1024, 1025, 2049, 3001])
def test_rows_and_order_match_executemany(conn, n):
    rows = [(f'r{i}', i) for i in range(n)]
    MultiRow().run(conn, 'insert into t (a, b) values (?, ?)', rows)
    assert conn.execute('select a, b from t order by id').fetchall() == rows


def test_the_variable_limit_caps_rows_per_statement(conn):
    seen = []
    conn.set_trace_callback(seen.append)
    MultiRow(max_variables=5).run(conn, 'insert into t (a, b) values (?, ?)',
                                  [(str(i), i) for i in range(7)])
    conn.set_trace_callback(None)
    assert [s.count('(') - 1 for s in seen] == [2, 2, 2, 1]     # 2 rows x 2 variables <= 5
    assert conn.execute('select count(*) from t').fetchone()[0] == 7


def test_upserts_with_repeated_keys_count_as_executemany_would(conn):
    sql = 'insert into w (k, n) values (?, 1) on conflict (k) do update set n = n + 1'
    MultiRow().run(conn, sql, [('x',), ('y',), ('x',), ('x',)])
    assert dict(conn.execute('select k, n from w').fetchall()) == {'x': 3, 'y': 1}


def test_bad_rows_fail_as_they_would_in_executemany(conn):
    sql = 'insert into t (a, b) values (?, ?)'
    with pytest.raises(sqlite3.ProgrammingError):
        MultiRow().run(conn, sql, [('a', 1), ('b',)])
    with pytest.raises(sqlite3.IntegrityError):
        MultiRow().run(conn, sql, [('a', 1), (None, 2)])


def test_one_bad_write_in_a_wide_batch_fails_alone(tmp_path):
    """The multi-row statement fails as a whole; the writer's savepoint rerun keeps the rest."""
    with Storage(StorageConfig(root=str(tmp_path), unit='m', max_delay_ms=50)) as s:
        good = [s.episodes.record('a', Event(type='x.y', source='s', id=f'e{i}', payload=b'{}',
                                             timestamp_ms=1_700_000_000_000 + i))
                for i in range(300)]
        bad = s.writer.submit(((EpisodeStore.INSERT, ('a', 'bad', 1, None, 's', '[]', '{}', 0)),))
        for ticket in good:
            ticket.wait(10)
        with pytest.raises(StorageError, match='NOT NULL'):
            bad.wait(10)
        assert s.query('select count(*) from episodes')[0][0] == 300


def test_checkpoints_run_beside_the_writer_and_a_failure_is_counted(tmp_path):
    with Storage(StorageConfig(root=str(tmp_path), unit='c')) as s:
        assert s.conn.execute('pragma wal_autocheckpoint').fetchone()[0] == \
            Checkpointer.BACKSTOP_PAGES
        assert s.conn.execute('pragma journal_size_limit').fetchone()[0] == \
            Checkpointer.BACKSTOP_PAGES * 4096
        for i in range(50):
            ticket = s.kv.put('n', f'k{i}', i)
        ticket.wait(10)
        busy, frames, copied = s.checkpointer.run_once()
        assert busy == 0 and frames > 0 and copied == frames
    # under a byte cap the backstop is a quarter of it (the WAL is outside the cap)
    with Storage(StorageConfig(root=str(tmp_path), unit='capped',
                               max_db_bytes=32 * 1024 * 1024)) as s:
        assert s.conn.execute('pragma wal_autocheckpoint').fetchone()[0] == 2048
    # a checkpointer whose connection fails: counted, never raised (its thread goes on)
    path = tmp_path / 'f.db'
    open_database(path).close()
    cp = Checkpointer(path, period_s=3600)     # turns driven here, not by its timer
    try:
        cp.tick()
        assert (cp.runs, cp.failures) == (1, 0)
        with cp._lock:
            cp._conn.close()    # every later checkpoint raises ProgrammingError
        cp.tick()
        cp.tick()
        assert cp.failures == 2 and 'closed' in cp.error
        assert cp._thread.is_alive()
    finally:
        cp.close()
    assert not cp._thread.is_alive()


def test_rows_that_are_not_plain_tuples_or_lists_go_to_executemany(conn):
    """Only tuple and list rows are widened (checked in C for every row): a named tuple, a row
    of another length among good ones, and a row that is not a sequence all get what
    executemany does with them, not a flattened guess."""
    from collections import namedtuple
    Row = namedtuple('Row', 'a b')
    seen = []
    conn.set_trace_callback(seen.append)
    MultiRow().run(conn, 'insert into t (a, b) values (?, ?)', [Row('n0', 0), Row('n1', 1)])
    conn.set_trace_callback(None)
    assert len(seen) == 2 and all(s.count('(') == 2 for s in seen)    # one row a statement
    assert conn.execute('select a, b from t order by id').fetchall() == [('n0', 0), ('n1', 1)]
    with pytest.raises(sqlite3.ProgrammingError):
        MultiRow().run(conn, 'insert into t (a, b) values (?, ?)', [('x', 1), ('y', 2, 3)])
    with pytest.raises((sqlite3.ProgrammingError, TypeError, ValueError)):
        MultiRow().run(conn, 'insert into t (a, b) values (?, ?)', [('x', 1), 7])
    # as executemany outside a transaction: the good row before the bad one went in (the
    # writer runs every batch in one transaction and rolls it back)
    assert conn.execute("select count(*) from t where a = 'x'").fetchone()[0] == 2
