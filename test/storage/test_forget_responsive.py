"""The storage node stays responsive during an erasure: storage/forget runs on a thread and an
executor of its own, so get_state (what the lifecycle manager polls, counting a node dead after
heartbeat_timeout_s without an answer), storage/query and a lifecycle transition are answered
while a forget is in progress, and the forget still completes with a correct receipt (and does
not start the moves again on a node deactivated meanwhile).

The erasure is held in progress by a real means: the Zenoh bridge process it must ask to drop
the subject's waiting events is frozen (SIGSTOP), so storage/forget waits for it (up to
forget.bridge_timeout_s, set far beyond the test's bound). That a forget is in progress is seen,
not assumed: the subject's rows are already gone from the unit database (the local erasure ran)
while the forget has not answered, and cannot until the bridge is thawed (SIGCONT)."""
from __future__ import annotations

import json
import signal
import sqlite3

import yaml

from harness import WAIT_LIMIT_S, free_port
from test_erasure import Subject, hits, plant, scan


def params_file(tmp_path, name: str, values: dict):
    path = tmp_path / f'{name}_params.yaml'
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': values}}))
    return path


def subject_rows(db, subject: str) -> int:
    """Episodes of `subject` in a unit database, read-only (the erasure rewrites the file)."""
    conn = sqlite3.connect(f'file:{db}?mode=ro', uri=True)
    try:
        return conn.execute('select count(*) from episodes where subject = ?',
                            (subject,)).fetchone()[0]
    finally:
        conn.close()


def test_get_state_and_queries_are_answered_while_a_forget_runs(ros, spawn, tmp_path):
    from lifecycle_msgs.msg import State, Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from loom_msgs.msg import StorageStats
    from loom_msgs.srv import Forget, StorageQuery
    from loom_ros.bus.qos import to_qos_profile
    root = tmp_path / 'root'
    a, b = Subject('A'), Subject('B')
    expected = plant(root, [a, b])
    db = root / 'db' / 'host1.db'
    assert subject_rows(db, a.id) > 0

    inbound = tmp_path / 'inbound.yaml'
    inbound.write_text('rules: []\n')
    # No Zenoh router: the bridge keeps retrying its connection and serves zenoh_bridge/forget.
    bridge = spawn('-m', 'loom_ros.bridge.bridge_node', '--ros-args', '-r', '__ns:=/fr',
                   '--params-file', str(params_file(tmp_path, 'bridge', {
                       'robot_id': 'robot1', 'mode': 'client',
                       'connect': [f'tcp/127.0.0.1:{free_port()}'], 'insecure': True,
                       'seal_sensitive': 'off', 'inbound_file': str(inbound),
                       'storage': {'root': str(root)}})))
    storage = spawn('-m', 'loom_ros.storage.ros2.node', '--ros-args', '-r', '__ns:=/fr',
                    '-r', '__node:=storage',   # as loom bringup starts it
                    '--params-file', str(params_file(tmp_path, 'storage', {
                        'storage': {'root': str(root), 'embedder': 'hash',
                                    'stats_period_s': 0.2, 'move_period_s': 0.2,
                                    # rounds run (and must pause), but move nothing planted
                                    'lifecycle': {'warm_s': 1e10, 'cold_s': 1e10}},
                        'forget': {'bridge_timeout_s': 600.0}})))
    alive = [bridge, storage]
    stats = []
    ros.node.create_subscription(StorageStats, '/fr/storage/stats', stats.append,
                                 to_qos_profile('batched'))
    forget = ros.node.create_client(Forget, '/fr/storage/forget')
    get_state = ros.node.create_client(GetState, '/fr/storage/get_state')
    change = ros.node.create_client(ChangeState, '/fr/storage/change_state')

    def transition(which: int):
        return ChangeState.Request(transition=Transition(id=which))
    query = ros.node.create_client(StorageQuery, '/fr/storage/query')
    try:
        ros.wait_for(lambda: stats and stats[-1].rounds >= 1, 'a lifecycle round (active)',
                     alive=alive)
        # Erasing nobody (safe to repeat) until the bridge answered it settles discovery, the
        # storage node's path to the bridge included: the forget below is asked once.
        warm = {}

        def bridge_reached() -> bool:
            answer = ros.call(forget, Forget.Request(subject='nobody', requested_by='dpo:test'),
                              'storage/forget', alive=alive)
            assert answer.ok, answer.error
            warm.update(json.loads(answer.receipt)['counts'])
            return 'bridge_outbox' in warm
        ros.wait_for(bridge_reached, 'storage/forget to reach the bridge', alive=alive)
        assert warm['bridge_outbox'] == 0

        bridge.popen.send_signal(signal.SIGSTOP)
        pending = forget.call_async(Forget.Request(subject=a.id, requested_by='dpo:test'))
        ros.wait_for(lambda: subject_rows(db, a.id) == 0, "the local erasure of A's rows",
                     alive=[storage])
        assert not pending.done()   # it waits for the frozen bridge: the forget is in progress

        state = ros.call(get_state, GetState.Request(), 'storage/get_state', alive=[storage])
        assert state.current_state.id == State.PRIMARY_STATE_ACTIVE
        busy = ros.call(query, StorageQuery.Request(kind='episodes', agent_id='agent1'),
                        'storage/query', alive=[storage])
        assert not busy.ok and 'erasure is running' in busy.error
        # A transition not allowed now (safe to repeat) settles discovery; then a deactivate,
        # asked once, is carried out while the erasure runs.
        assert not ros.call(change, transition(Transition.TRANSITION_CONFIGURE),
                            'storage/change_state', alive=[storage]).success
        moved = change.call_async(transition(Transition.TRANSITION_DEACTIVATE))
        ros.wait_for(moved.done, 'a deactivate during the erasure', alive=[storage])
        assert moved.result().success
        assert not pending.done()   # all answered while the forget was still in progress

        bridge.popen.send_signal(signal.SIGCONT)
        ros.wait_for(pending.done, 'the forget to complete', alive=alive)
    finally:
        if bridge.popen.poll() is None:
            bridge.popen.send_signal(signal.SIGCONT)
    answer = pending.result()
    assert answer.ok, answer.error
    receipt = json.loads(answer.receipt)
    assert receipt['counts']['bridge_outbox'] == 0
    for tier, n in expected[a.id].items():
        assert receipt['counts'][tier] == n, tier
    blob = scan(root)
    assert hits(blob, a) == [] and hits(blob, b) == sorted(b.canaries)

    # Still inactive (the forget started nothing), then active again: the databases are open
    # again and the moves run again.
    state = ros.call(get_state, GetState.Request(), 'storage/get_state', alive=[storage])
    assert state.current_state.id == State.PRIMARY_STATE_INACTIVE
    idle = ros.call(query, StorageQuery.Request(kind='episodes', agent_id='agent1'),
                    'storage/query', alive=[storage])
    assert not idle.ok and 'not active' in idle.error
    moved = change.call_async(transition(Transition.TRANSITION_ACTIVATE))
    ros.wait_for(moved.done, 'activate', alive=[storage])
    assert moved.result().success
    seen = len(stats)
    after = ros.call(query, StorageQuery.Request(kind='episodes', agent_id='agent1'),
                     'storage/query', alive=[storage])
    assert after.ok, after.error
    found = '\n'.join(after.results).encode()
    assert hits(found, a) == [] and b.canaries['warm0'] in found and b.canaries['warm1'] in found
    ros.wait_for(lambda: any(m.rounds > stats[seen].rounds for m in stats[seen + 1:]),
                 'lifecycle rounds after the erasure', alive=[storage])
    storage.popen.send_signal(signal.SIGINT)
    code, _, err = storage.finish(WAIT_LIMIT_S)
    assert code == 0, err
