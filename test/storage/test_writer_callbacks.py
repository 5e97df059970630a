"""The group-commit writer's done callbacks (how an agent host acknowledges events without
waiting on each commit) and stop_when_full (nothing queued behind a full batch lands after
it), on real SQLite files."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from loom_ros.storage.errors import StorageFullError
from loom_ros.storage.storage import Storage, StorageConfig
from loom_ros.storage.writer import GroupCommitWriter


def test_callbacks_run_once_each_after_the_commit_in_submission_order(tmp_path):
    with Storage(StorageConfig(str(tmp_path), unit='u', max_delay_ms=1.0)) as storage:
        seen, lock, done = [], threading.Lock(), threading.Event()

        def on_done(i, ticket):
            # Committed when told: the reader (committed rows only) already has it.
            rows = storage.query("select value from kv where ns = 'n' and key = ?", (str(i),))
            with lock:
                seen.append((i, ticket.error(), len(rows)))
                if len(seen) == 500:
                    done.set()
        for i in range(500):
            ticket = storage.kv.put('n', str(i), i)
            ticket.add_done_callback(lambda t, i=i: on_done(i, t))
        assert done.wait(60)
        assert seen == [(i, None, 1) for i in range(500)]
        # A ticket whose batch has settled calls back at once, on the caller's thread.
        ticket = storage.kv.put('n', 'last', 1)
        assert ticket.wait_settled(60)
        here = []
        ticket.add_done_callback(lambda t: here.append(threading.current_thread()))
        assert here == [threading.current_thread()]


def test_a_callback_added_while_its_batch_settles_waits_for_those_queued_before(tmp_path):
    """Found in CI: a batch was done, its writer thread was still running the callbacks of
    tickets 1..125, and the caller added ticket 126's, which ran at once on the caller's
    thread, ahead of them. Held here: the writer is held in its gate while two writes queue
    into one batch; then that batch's first callback holds the writer thread between `done`
    and `settled` while the caller adds the second write's."""
    conn = sqlite3.connect(str(tmp_path / 'w.db'), check_same_thread=False, isolation_level=None)
    conn.execute('create table t (v integer)')
    gate_open, in_gate = threading.Event(), threading.Event()
    order, release, entered = [], threading.Event(), threading.Event()

    def gate():
        in_gate.set()
        assert gate_open.wait(60)
    writer = GroupCommitWriter(conn, max_delay_s=0.0, gate=gate)
    try:
        writer.execute('insert into t (v) values (?)', (0,))
        assert in_gate.wait(60)             # the first batch is taken; the next one fills
        one = writer.execute('insert into t (v) values (?)', (1,))
        two = writer.execute('insert into t (v) values (?)', (2,))

        def first(_t):
            entered.set()
            assert release.wait(60)
            order.append(1)
        one.add_done_callback(first)
        gate_open.set()
        assert entered.wait(60)             # the batch is done; its first callback is running
        assert two.done() and not two.wait_settled(0)
        two.add_done_callback(lambda _t: order.append(2))
        assert order == []                  # queued behind the running one, not run here
        release.set()
        assert two.wait_settled(60)
        assert order == [1, 2]
    finally:
        gate_open.set()
        release.set()
        writer.close()
        conn.close()


def test_flush_returns_only_once_the_acknowledgements_have_run(tmp_path):
    # A host counts an event handled in the done callback; flush() (a host settling, the agents
    # benchmark counting) must see every count. The callback is slow on purpose: flush returned
    # when the batch was committed but before its callbacks ran (counts came up short).
    with Storage(StorageConfig(str(tmp_path), unit='u', max_delay_ms=1.0)) as storage:
        acked = []

        def slow_ack(ticket):
            time.sleep(0.05)
            acked.append(ticket.error())
        for i in range(20):
            storage.kv.put('n', str(i), i).add_done_callback(slow_ack)
        storage.flush()
        assert acked == [None] * 20

def test_stop_when_full_fails_every_batch_after_a_full_one_until_resumed(tmp_path):
    # Tables take 128 KiB; a 256 KiB cap fills after a few hundred KiB of rows.
    with Storage(StorageConfig(str(tmp_path), unit='u', max_db_bytes=256 * 1024)) as storage:
        writer = storage.writer
        writer.stop_when_full = True
        big = 'x' * 3000
        acknowledged, failed = [], None
        for i in range(400):
            ticket = storage.kv.put('n', str(i), big)
            try:
                ticket.wait(30)
                acknowledged.append(i)
            except StorageFullError as exc:
                failed = (i, exc)
                break
        assert failed is not None and acknowledged == list(range(failed[0]))
        # A small write would fit, but follows a lost one: refused, with why.
        with pytest.raises(StorageFullError, match='writes stopped'):
            storage.kv.put('n', 'small', 1).wait(30)
        assert storage.kv.get('n', 'small') is None
        assert sorted(map(int, storage.kv.keys('n'))) == acknowledged   # nothing committed lost
        writer.resume()
        storage.kv.put('n', 'small', 1).wait(30)
        assert storage.kv.get('n', 'small') == (1, 1)


def test_a_disk_filling_during_the_savepoint_rerun_stops_writes_too(tmp_path):
    # Review finding: a batch with one bad write is re-run with a savepoint per write; when the
    # disk filled during that re-run, stop_when_full was not set and a later write committed
    # after a lost one. The first batch is held (the gate) so both writes share the next one.
    with Storage(StorageConfig(str(tmp_path), unit='u', max_db_bytes=256 * 1024)) as storage:
        writer = storage.writer
        writer.stop_when_full = True
        held, release, gate = threading.Event(), threading.Event(), writer.gate

        def holding():
            if not release.is_set():
                held.set()
                release.wait(30)
            if gate is not None:
                gate()
        writer.gate = holding
        first = storage.kv.put('n', 'first', 1)
        assert held.wait(30)
        bad = writer.execute('insert into kv (ns, key, value) values (null, null, null)')
        big = storage.kv.put('n', 'big', 'x' * 400_000)   # more than the cap leaves
        release.set()
        first.wait(30)
        for ticket in (bad, big):   # full during the re-run: nothing of the batch is stored
            with pytest.raises(StorageFullError):
                ticket.wait(30)
        with pytest.raises(StorageFullError, match='writes stopped'):
            storage.kv.put('n', 'later', 1).wait(30)
        assert storage.kv.get('n', 'later') is None and storage.kv.get('n', 'big') is None
