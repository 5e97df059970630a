"""A warm query the indexes cannot narrow (by type or source over a long range) is stopped past
a bound with a clear error, so the storage node never holds its lock through a long scan; a
narrow one answers, and the connection is left without the bound for the moves."""
from __future__ import annotations

import json

import pytest

from harness import WAIT_LIMIT_S, MsClock
from loom_ros.bus.event import Event
from loom_ros.storage.embedding import HashEmbedder
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.service import Settings, StorageService
from loom_ros.storage.storage import Storage, StorageConfig

T0 = 1_700_000_000_000


def test_a_scan_past_the_bound_is_stopped_with_what_to_narrow(tmp_path):
    clock = MsClock()
    with Storage(StorageConfig(root=str(tmp_path), unit='u'), clock=clock) as storage:
        ticket = None
        for i in range(3000):
            ticket = storage.episodes.record(f'a{i % 3}', Event(
                type='imu' if i % 1000 else 'rare', source='s', id=f'e{i}',
                timestamp_ms=T0 + i, payload=json.dumps({'i': i}).encode()))
        ticket.wait(WAIT_LIMIT_S)
        storage.flush()
    service = StorageService(Settings(StorageLayout.at(tmp_path)), embedder=HashEmbedder(),
                             clock=clock, read_only=True)
    try:
        assert len(service.query('episodes', type='rare')) == 3      # within the default bound
        service.max_query_steps = 5_000
        with pytest.raises(StorageError, match='scanned more than 5,000 steps.*shorter time '
                                               'range or an agent id'):
            service.query('episodes', type='rare')
        # narrowed by time, the same question answers under the same bound
        found = service.query('episodes', type='rare', start_ms=T0 + 990, end_ms=T0 + 1010)
        assert [r['event_id'] for r in found] == ['e1000']
        # the bound is the query's only: the connection runs unbounded afterwards
        conn = service.lifecycles['u'].conn
        assert conn.execute('select count(*) from episodes').fetchone()[0] == 3000
    finally:
        service.close()
