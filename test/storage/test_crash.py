"""SIGKILL a real process in the middle of group commits and of each lifecycle move, reopen, and
check: integrity_check ok, every acknowledged write there, nothing lost or counted twice across
tiers, the cold index in line with its rows."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loom_ros.bus.event import Event
from loom_ros.storage.backend.local import LocalObjectStore
from loom_ros.storage.cold import IndexParams
from loom_ros.storage.embedding import HashEmbedder
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.lifecycle import Lifecycle
from loom_ros.storage.sqlite import integrity_ok
from loom_ros.storage.storage import Storage, StorageConfig

sys.path.insert(0, str(Path(__file__).parent))
import child  # noqa: E402

CHILD = str(Path(__file__).parent / 'child.py')
LIMIT_S = 60.0


def start(*args) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, CHILD, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'ready', proc.stderr.read()
    return proc


def read_until(proc, lines: int) -> list[str]:
    """Lines the child printed until at least `lines` (bounded by LIMIT_S), then SIGKILL."""
    out, deadline = [], time.monotonic() + LIMIT_S
    while len(out) < lines:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f'child exited: {proc.stderr.read()[-2000:]}')
        out.append(line.strip())
        assert time.monotonic() < deadline, 'child too slow'
    os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read()   # what it printed before dying was acknowledged too
    proc.wait()
    return out + [line for line in rest.split('\n') if line]


def test_sigkill_during_group_commit_loses_nothing_acknowledged(tmp_path):
    proc = start('write', str(tmp_path), '50')
    acked = read_until(proc, 3000)
    db = StorageLayout.at(tmp_path).database('kill')
    assert integrity_ok(db) == 'ok'
    storage = Storage(StorageConfig(root=str(tmp_path), unit='kill'))
    try:
        rows = storage.query('select event_id from episodes')
        ids = [r['event_id'] for r in rows]
        assert len(ids) == len(set(ids)), 'an episode stored twice'
        missing = set(acked) - set(ids)
        assert not missing, f'{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:3]}'
        # State and episodes commit together: each agent's state is at its last stored event.
        stored = {int(i[2:]) for i in ids}
        for n in range(50):
            state, events = storage.agent_state.load(f'a{n}')
            mine = [i for i in stored if i % 50 == n]
            assert state == {'n': max(mine)} and events == max(mine)
    finally:
        storage.close()


def fill(root, n: int) -> None:
    """`n` events, each written by the store at its own time (what the lifecycle ages by)."""
    now = [child.BASE_MS]
    with Storage(StorageConfig(root=str(root), unit='kill'), clock=lambda: now[0]) as storage:
        for i in range(n):
            now[0] = child.BASE_MS + i * 100
            ticket = storage.episodes.record(f'a{i % 3}', Event(
                type='test.count', source='s', payload=b'{"n":%d}' % i, id=f'ev{i}',
                timestamp_ms=child.BASE_MS + i * 100))
        ticket.wait()


def accounted(root) -> int:
    """Events in warm + events condensed in cold + events in archive files, after recovery."""
    layout = StorageLayout.at(root)
    assert integrity_ok(layout.database('kill')) == 'ok'
    objects = LocalObjectStore(layout.objects)
    lifecycle = Lifecycle(layout, 'kill', objects, HashEmbedder(), child.params(),
                          index_params=IndexParams(train_at=10**9))
    try:
        c = lifecycle.conn
        assert lifecycle.index.ntotal == c.execute('select count(*) from cold').fetchone()[0]
        warm = c.execute('select count(*), count(distinct event_id) from episodes').fetchone()
        assert warm[0] == warm[1]
        cold = c.execute('select coalesce(sum(count), 0) from cold').fetchone()[0]
        keys = [k for (k,) in c.execute("select key from archive where state = 'done'")]
        assert c.execute("select count(*) from archive where state != 'done'").fetchone()[0] == 0
        assert sorted(keys) == [k for k, _ in objects.list('archive/')], 'archive files != rows'
        archived = 0
        for key in keys:
            for line in gzip.decompress(objects.get(key)).splitlines():
                archived += json.loads(line).get('count', 1)
        return warm[0] + cold + archived
    finally:
        lifecycle.close()


@pytest.mark.parametrize('step', ['warm', 'cold'])
def test_sigkill_during_lifecycle_moves_keeps_one_copy(tmp_path, step):
    n = 4000
    fill(tmp_path, n)
    if step == 'cold':   # make cold memories first, in this process
        layout = StorageLayout.at(tmp_path)
        now = [child.BASE_MS + n * 100 + 61_000]
        lifecycle = Lifecycle(layout, 'kill', LocalObjectStore(layout.objects), HashEmbedder(),
                              child.params(400), index_params=IndexParams(train_at=10**9),
                              clock=lambda: now[0])
        while lifecycle.move_warm().condensed:
            pass
        lifecycle.close()
    moved = []   # over the three runs: the last may find everything already moved
    for _round in range(3):   # kill it three times at different points
        proc = start('move', str(tmp_path), step)
        moved += read_until(proc, 3 + 4 * _round)
        assert accounted(tmp_path) == n
    assert sum(int(line.split()[1]) for line in moved) > 0, 'the children moved nothing'
    db = StorageLayout.at(tmp_path).database('kill')
    import sqlite3
    with sqlite3.connect(db) as conn:
        table = 'cold' if step == 'warm' else 'archive'
        assert conn.execute(f'select count(*) from {table}').fetchone()[0] > 0
