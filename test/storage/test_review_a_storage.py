"""Review findings on the storage layer, on real SQLite files: a batch that fails (not for a full
disk) stops the group-commit writer, so no later commit lands after a lost one; a blob delete is
ordered with the row writes around it, so put, delete, put leaves the last object and its row."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from harness import WAIT_LIMIT_S

from loom_ros.bus.event import Event
from loom_ros.storage.blobs import PUT_ROW
from loom_ros.storage.errors import StorageError
from loom_ros.storage.storage import Storage, StorageConfig

T0 = 1_700_000_000_000


def event(i: int) -> Event:
    return Event(type='test.count', source='mic', payload=b'{"n":%d}' % i, id=f'e{i}',
                 timestamp_ms=T0 + i)


def until(condition, what: str) -> None:
    """Wait for a condition another thread makes true (bounded; reaching the limit fails)."""
    deadline, pause = time.monotonic() + WAIT_LIMIT_S, threading.Event()
    while not condition():
        assert time.monotonic() < deadline, f'not within {WAIT_LIMIT_S} s: {what}'
        pause.wait(0.001)


def hold_writer(storage):
    """Hold the writer inside its next batch (its gate), so writes queue into the one after."""
    held, release = threading.Event(), threading.Event()

    def gate():
        if not release.is_set():
            held.set()
            assert release.wait(WAIT_LIMIT_S)
    storage.writer.gate = gate
    first = storage.kv.put('n', 'held', 1)
    assert held.wait(WAIT_LIMIT_S)
    return first, release


# -- 1. a failed batch stops the writer ---------------------------------------------------------
def test_a_batch_lost_to_a_held_lock_stops_every_later_commit_until_reopened(tmp_path):
    """An agent's commit (state + episode) lost to another writer's lock, then its next commit:
    that one counted the lost event, so it must not land (it did: e2 counted, its episode gone)."""
    config = StorageConfig(root=str(tmp_path), unit='host', max_delay_ms=0)
    with Storage(config) as storage:
        state = storage.agent_state
        state.commit('a', {'n': 1}, 1, 'e1', [event(1)]).wait(WAIT_LIMIT_S)
        # one bad write of its own fails alone, as before: the writer goes on
        bad = storage.writer.execute("insert into kv values ('n', 'x', 1, null, 0)")
        with pytest.raises(StorageError, match='NOT NULL'):
            bad.wait(WAIT_LIMIT_S)
        storage.kv.put('n', 'after-bad', 1).wait(WAIT_LIMIT_S)
        # a lock held past the busy timeout (0 here, 5 s in use) fails the whole batch
        storage.conn.execute('PRAGMA busy_timeout=0')
        other = sqlite3.connect(storage.path, isolation_level=None)
        other.execute('BEGIN IMMEDIATE')
        lost = state.commit('a', {'n': 2}, 2, 'e2', [event(2)])
        with pytest.raises(StorageError, match='locked'):
            lost.wait(WAIT_LIMIT_S)
        other.execute('ROLLBACK')
        other.close()
        later = state.commit('a', {'n': 3}, 3, 'e3', [event(3)])
        with pytest.raises(StorageError, match=r'writes stopped after a failed batch \(.*locked'):
            later.wait(WAIT_LIMIT_S)
        storage.writer.resume()   # frees a full-disk stop only
        with pytest.raises(StorageError, match='writes stopped'):
            storage.kv.put('n', 'k', 1).wait(WAIT_LIMIT_S)
        assert lost.error() is not None and 'locked' in str(lost.error())   # still says why
        assert state.load('a') == ({'n': 1}, 1)
        assert [e['event_id'] for e in storage.episodes.query('a')] == ['e1']
        assert storage.kv.get('n', 'k') is None
    with Storage(config) as storage:   # reopened: writes are taken again
        storage.agent_state.commit('a', {'n': 2}, 2, 'e2', [event(2)]).wait(WAIT_LIMIT_S)
        assert storage.agent_state.load('a') == ({'n': 2}, 2)


def test_a_stopped_writer_fails_the_writes_already_queued_behind_the_failure(tmp_path):
    """Writes queued while the failing batch ran land in the next batch: they fail too."""
    with Storage(StorageConfig(root=str(tmp_path), unit='host', max_delay_ms=0)) as storage:
        first, release = hold_writer(storage)
        storage.conn.execute('PRAGMA busy_timeout=0')
        other = sqlite3.connect(storage.path, isolation_level=None, check_same_thread=False)
        other.execute('BEGIN IMMEDIATE')   # the held batch will find the file locked
        # freed as soon as that batch failed, before the next one runs: nothing then stops
        # the next but the failure before it
        first.add_done_callback(lambda _t: other.execute('ROLLBACK'))
        queued = [storage.agent_state.commit('a', {'n': i}, i, f'e{i}', [event(i)])
                  for i in range(1, 4)]
        until(lambda: storage.writer.queued == 3, 'three commits queued')
        release.set()
        with pytest.raises(StorageError, match='locked'):
            first.wait(WAIT_LIMIT_S)
        for ticket in queued:
            with pytest.raises(StorageError, match='writes stopped'):
                ticket.wait(WAIT_LIMIT_S)
        assert not other.in_transaction
        other.close()
        assert storage.agent_state.load('a') == ({}, 0)
        assert storage.query('select count(*) from episodes')[0][0] == 0


# -- 2. blob deletes are ordered --------------------------------------------------------------
def test_put_delete_put_of_one_key_in_one_batch_keeps_the_last_object_and_its_row(tmp_path):
    """The delete's row ran after both puts' rows (grouped by SQL): the last object was left
    without a row. Now it is a barrier: row writes before it run first, those after it after."""
    with Storage(StorageConfig(root=str(tmp_path), unit='host', max_delay_ms=0)) as storage:
        blobs = storage.blobs
        key = blobs.put('frames', 'f.bin', b'v0').key
        first, release = hold_writer(storage)
        # a put of v1 (object, then its row; not waited), then the delete, then a put of v2
        storage.objects.put(key, b'v1-')
        put1 = storage.write(PUT_ROW, (key, 3, 'application/octet-stream', 1))
        deleting = threading.Thread(target=blobs.delete, args=(key,))
        deleting.start()
        until(lambda: storage.writer.queued == 2, 'the delete queued after the first put')
        storage.objects.put(key, b'v2--')
        put2 = storage.write(PUT_ROW, (key, 4, 'application/octet-stream', 2))
        release.set()
        for ticket in (first, put1, put2):
            ticket.wait(WAIT_LIMIT_S)
        deleting.join(WAIT_LIMIT_S)
        assert not deleting.is_alive()
        assert blobs.get(key) == b'v2--' and blobs.ref(key).bytes == 4
        assert [r.key for r in blobs.list('frames')] == [key]


def test_put_delete_put_through_the_blob_store_leaves_the_last_one(tmp_path):
    """The same sequence through BlobStore from threads racing on one key: whatever the order,
    the row and the object agree, and a final put, delete, put leaves exactly the last."""
    with Storage(StorageConfig(root=str(tmp_path), unit='host', max_delay_ms=1)) as storage:
        blobs = storage.blobs
        key = blobs.key('frames', 'f.bin')
        errors = []

        def churn(n: int) -> None:
            for i in range(40):
                try:
                    blobs.put('frames', 'f.bin', b'x' * (n * 100 + i + 1))
                    blobs.delete(key)
                except StorageError as exc:   # another thread deleted it first
                    if 'not stored' not in str(exc):
                        errors.append(exc)
        threads = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_LIMIT_S)
        assert not errors and not any(t.is_alive() for t in threads)
        rows = storage.query('select bytes from blobs where key = ?', (key,))
        assert storage.objects.exists(key) == bool(rows)
        if rows:
            assert len(blobs.get(key)) == rows[0]['bytes']
        blobs.put('frames', 'f.bin', b'first')
        blobs.delete(key)
        blobs.put('frames', 'f.bin', b'last!!')
        assert blobs.get(key) == b'last!!' and blobs.ref(key).bytes == 6
        assert storage.objects.get(key) == b'last!!'
