"""The total budget's measurement under attack (review findings): files that only claim to be
small, side files with no database, a root too large to walk, and the walk's cost and place
(never inline in a batch once the first measurement is in)."""
from __future__ import annotations

import sqlite3
import struct
import threading
import time

import pytest

from loom_ros.storage.budget import BudgetGate, measure_root, root_used_bytes
from loom_ros.storage.errors import StorageFullError
from loom_ros.storage.layout import StorageLayout


def _database(path, blob_bytes: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute('create table t (x blob)')
        conn.execute('insert into t values (zeroblob(?))', (blob_bytes,))
    conn.close()


def _claim_all_pages_free(path) -> None:
    """A valid SQLite header whose free-page count says every page but one is free."""
    data = bytearray(path.read_bytes())
    pages = struct.unpack_from('>I', data, 28)[0]
    struct.pack_into('>I', data, 36, pages - 1)
    path.write_bytes(bytes(data))


def test_a_file_that_only_claims_free_pages_counts_whole_in_plugin_data(tmp_path):
    layout = StorageLayout.at(tmp_path)
    forged = tmp_path / 'plugins' / 'evil' / 'cache.db'
    _database(forged, 400_000)
    _claim_all_pages_free(forged)
    assert root_used_bytes(layout) >= forged.stat().st_size >= 400_000


def test_a_header_that_does_not_describe_its_file_counts_the_file(tmp_path):
    """Outside plugin data too: a SQLite header followed by more bytes than it says."""
    layout = StorageLayout.at(tmp_path)
    real = tmp_path / 'traces' / 'x.db'
    _database(real, 0)
    real.write_bytes(real.read_bytes() + b'\0' * 300_000)
    assert root_used_bytes(layout) >= 300_000


def test_side_files_count_with_or_without_their_database(tmp_path):
    layout = StorageLayout.at(tmp_path)
    for name, size in (('lone.db-wal', 50_000), ('lone.db-shm', 32_768),
                       ('gone.db-journal', 70_000), ('plugins/p/x-wal', 90_000)):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b'w' * size)
    assert root_used_bytes(layout) == 50_000 + 32_768 + 70_000 + 90_000


def test_loom_databases_still_count_pages_in_use_so_deletions_count_at_once(tmp_path):
    layout = StorageLayout.at(tmp_path)
    path = tmp_path / 'db' / 'unit.db'
    _database(path, 500_000)
    before = root_used_bytes(layout)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute('delete from t')
    conn.close()
    assert path.stat().st_size >= 500_000           # the file keeps its free pages
    assert root_used_bytes(layout) < before - 400_000


def test_a_root_too_large_to_walk_stops_writes_with_a_clear_error(tmp_path):
    layout = StorageLayout.at(tmp_path)
    folder = tmp_path / 'plugins' / 'many'
    folder.mkdir(parents=True)
    for i in range(30):
        (folder / f'f{i}').write_bytes(b'')
    usage = measure_root(layout, max_entries=20)
    assert not usage.complete and usage.entries > 20
    assert measure_root(layout, max_entries=100).complete
    gate = BudgetGate(layout, total_bytes=10**12, max_entries=20, background=False)
    with pytest.raises(StorageFullError, match='too many to measure'):
        gate()
    assert gate.refused == 1


class _Clock:
    def __init__(self):
        self.now = 0.0
        self.step = 0.0     # added on every read: a walk that takes time

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_walk_waits_for_its_period_and_a_slow_walk_waits_longer(tmp_path):
    layout = StorageLayout.at(tmp_path)
    (tmp_path / 'a').write_bytes(b'a' * 100)
    clock = _Clock()
    gate = BudgetGate(layout, total_bytes=1000, period_s=0.5, monotonic=clock, background=False)
    gate()
    assert (gate.measures, gate.used) == (1, 100)
    (tmp_path / 'b').write_bytes(b'b' * 5000)
    clock.now = 0.4
    gate()                                  # within the period: the last measurement stands
    assert gate.measures == 1
    clock.now, clock.step = 0.6, 1.0        # this walk takes 1 s (two reads of the clock)
    with pytest.raises(StorageFullError, match='of 1,000 bytes budget used'):
        gate()
    assert gate.measures == 2
    clock.step = 0.0
    clock.now = 10.0                        # 0.5 s period, but the walk took 1 s: 20 s after
    with pytest.raises(StorageFullError):
        gate()
    assert gate.measures == 2
    clock.now = 24.0                        # the walk ended at 3.6 s: due at 23.6 s
    with pytest.raises(StorageFullError):
        gate()
    assert gate.measures == 3


def test_after_the_first_measurement_a_walk_never_runs_in_the_batch(tmp_path):
    """The writer's batch goes on with the last measurement while a walk is under way."""
    layout = StorageLayout.at(tmp_path)
    (tmp_path / 'a').write_bytes(b'a' * 100)
    release, walking = threading.Event(), threading.Event()
    calls = []

    def archive_bytes() -> int:          # called at the start of every measurement
        calls.append(1)
        if len(calls) > 1:
            walking.set()
            assert release.wait(60)
        return 0

    clock = _Clock()
    gate = BudgetGate(layout, total_bytes=1000, extra_bytes=archive_bytes, monotonic=clock)
    gate()
    (tmp_path / 'b').write_bytes(b'b' * 5000)
    clock.now = 1.0
    gate()                                  # starts the walk and returns at once
    assert walking.wait(60)
    gate()                                  # a walk under way: no second one
    assert len(calls) == 2 and gate.measures == 1
    release.set()
    deadline = time.monotonic() + 60
    while gate.measures < 2 and time.monotonic() < deadline:
        release.wait(0.01)
    assert gate.measures == 2
    with pytest.raises(StorageFullError):
        gate()


def test_between_walks_the_writers_own_growth_counts_at_once(tmp_path):
    """Review finding: after a walk the gate saw nothing until the next one (20x the walk's
    duration), so a writer's own batches could run far past the budget meanwhile."""
    layout = StorageLayout.at(tmp_path)
    own = tmp_path / 'db' / 'unit.db'
    own.parent.mkdir(parents=True)
    own.write_bytes(b'')
    clock = _Clock()
    gate = BudgetGate(layout, total_bytes=100_000, monotonic=clock, background=False)
    gate.watch(own, f'{own}-wal')
    gate()
    assert gate.measures == 1
    (tmp_path / 'db' / 'unit.db-wal').write_bytes(b'w' * 60_000)   # the writer's batches
    gate()
    own.write_bytes(b'd' * 50_000)                                  # a checkpoint moved them
    with pytest.raises(StorageFullError, match='110,000 of 100,000 bytes'):
        gate()
    assert gate.measures == 1                                       # no walk was due


def test_a_checkpoint_moving_the_wal_into_the_database_is_not_counted_twice(tmp_path):
    """The WAL cut back (TRUNCATE) and the database grown by what it held: no growth, so no
    false full (which would stop the agent host's writer until it is reconfigured)."""
    layout = StorageLayout.at(tmp_path)
    own = tmp_path / 'db' / 'unit.db'
    own.parent.mkdir(parents=True)
    own.write_bytes(b'd' * 10_000)
    wal = tmp_path / 'db' / 'unit.db-wal'
    wal.write_bytes(b'w' * 70_000)
    clock = _Clock()
    gate = BudgetGate(layout, total_bytes=100_000, monotonic=clock, background=False)
    gate.watch(own, wal)
    gate()
    assert gate.used == 80_000
    own.write_bytes(b'd' * 80_000)   # the checkpoint: pages into the database ...
    wal.write_bytes(b'')             # ... and the WAL truncated
    gate()
    assert gate.used == 80_000 and gate.refused == 0


def test_walks_are_never_further_apart_than_the_cap(tmp_path):
    layout = StorageLayout.at(tmp_path)
    clock = _Clock()
    gate = BudgetGate(layout, total_bytes=10**9, monotonic=clock, background=False)
    clock.step = 100.0                       # a walk of 100 s would wait 2,000 s
    gate()
    clock.step = 0.0
    clock.now += BudgetGate.MAX_WALK_INTERVAL_S + 1
    gate()
    assert gate.measures == 2


def test_a_thread_that_cannot_start_measures_in_the_caller(tmp_path, monkeypatch):
    layout = StorageLayout.at(tmp_path)
    clock = _Clock()
    gate = BudgetGate(layout, total_bytes=1000, monotonic=clock)
    gate()
    (tmp_path / 'big').write_bytes(b'b' * 5000)
    clock.now = 10.0

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, 'start', no_thread)
    with pytest.raises(StorageFullError):
        gate()
    assert gate.measures == 2 and not gate._measuring


def test_growth_while_the_root_is_walked_is_counted_once(tmp_path):
    """Review finding: the baselines were taken before the walk, so what the WAL grew while it
    ran was in the walk and again in the growth: 80,000 bytes counted as 110,000 (full)."""
    layout = StorageLayout.at(tmp_path)
    wal = tmp_path / 'db' / 'unit.db-wal'
    wal.parent.mkdir(parents=True)
    wal.write_bytes(b'w' * 50_000)

    def meanwhile() -> int:               # runs in the measurement, before the walk proper
        with open(wal, 'ab') as out:
            out.write(b'w' * 30_000)       # the writer's batches land during it
        return 0

    gate = BudgetGate(layout, total_bytes=100_000, extra_bytes=meanwhile, monotonic=_Clock(),
                      background=False)
    gate.watch(wal)
    gate()
    assert gate.used == 80_000 == wal.stat().st_size and gate.refused == 0
