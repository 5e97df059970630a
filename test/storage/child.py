"""A real process using the storage layer, for the SIGKILL tests: `write` commits events through
the group-commit writer and prints each acknowledged event id; `move <step>` runs one lifecycle
step in a loop with an advancing clock and prints a line per move."""
from __future__ import annotations

import sys

from loom_ros.bus.event import Event
from loom_ros.storage.backend.local import LocalObjectStore
from loom_ros.storage.cold import IndexParams
from loom_ros.storage.embedding import HashEmbedder
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.lifecycle import Lifecycle, LifecycleParams, TierPolicy
from loom_ros.storage.storage import Storage, StorageConfig

BASE_MS = 1_700_000_000_000   # after the lifecycle's clock floor (2023-01-01)


def params(batch: int = 40) -> LifecycleParams:
    return LifecycleParams(default=TierPolicy(warm_s=60, cold_s=3600, archive_s=0), bucket_s=5,
                           move_batch=batch)


def write(root: str, agents: int) -> None:
    storage = Storage(StorageConfig(root=root, unit='kill', max_delay_ms=1.0))
    n = 0
    print('ready', flush=True)
    while True:
        tickets = []
        for _ in range(200):
            agent = f'a{n % agents}'
            event = Event(type='test.count', source='child', payload=b'{"n":%d}' % n,
                          id=f'ev{n}', timestamp_ms=BASE_MS + n)
            tickets.append((event.id, storage.agent_state.commit(agent, {'n': n}, n, event.id,
                                                                 [event])))
            n += 1
        for event_id, ticket in tickets:
            ticket.wait()
            sys.stdout.write(event_id + '\n')
        sys.stdout.flush()


def move(root: str, step: str) -> None:
    # warm: from after the last event the test wrote (4,000 a 100 ms apart), as a clock that
    # is not behind what the store holds: every warm row is due, 40 a move
    now = [BASE_MS + (600_000 if step == 'warm' else 3_600_000)]
    lifecycle = Lifecycle(StorageLayout.at(root), 'kill', LocalObjectStore(
        StorageLayout.at(root).objects), HashEmbedder(), params(),
        index_params=IndexParams(train_at=10**9), clock=lambda: now[0])
    print('ready', flush=True)
    while True:
        now[0] += 1000 if step == 'warm' else 20000
        report = getattr(lifecycle, {'warm': 'move_warm', 'cold': 'move_cold'}[step])()
        lifecycle.unsaved and lifecycle.save_index()
        print('moved', report.condensed + report.archived + report.deleted, flush=True)


if __name__ == '__main__':
    if sys.argv[1] == 'write':
        write(sys.argv[2], int(sys.argv[3]))
    else:
        move(sys.argv[2], sys.argv[3])
