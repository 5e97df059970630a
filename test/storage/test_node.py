"""The storage node in its own process: it finds the unit databases under its root, runs the
lifecycle on its timer, publishes StorageStats and answers StorageQuery, as `ros2 service call`
would ask it; budgets show on /diagnostics."""
from __future__ import annotations

import json
import signal

from loom_ros.bus.event import Event
from loom_ros.bus.qos import to_qos_profile
from loom_ros.storage.storage import Storage, StorageConfig

OLD_MS = 1_600_000_000_000   # 2020: past the 1-day warm age at once


def call(ros, client, request):
    ros.wait_for(lambda: client.service_is_ready(), 'the storage/query service')
    future = client.call_async(request)
    ros.wait_for(future.done, 'the StorageQuery response')
    return future.result()


def test_node_moves_publishes_and_answers_queries(ros, spawn, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from loom_msgs.msg import StorageStats
    from loom_msgs.srv import StorageQuery
    with Storage(StorageConfig(root=str(tmp_path), unit='host1')) as s:
        for i in range(30):
            s.episodes.record('greeter', Event(type='speech.heard', source='mic', id=f'old{i}',
                                                payload=b'someone asked for a coffee %d' % i,
                                                timestamp_ms=OLD_MS + i * 1000))
        s.episodes.record('greeter', Event(type='speech.heard', source='mic', id='now',
                                           payload=b'hello there')).wait(10)
    stats, diagnostics = [], []
    ros.node.create_subscription(StorageStats, '/s1/storage/stats', stats.append,
                                 to_qos_profile('batched'))
    ros.node.create_subscription(DiagnosticArray, '/diagnostics', diagnostics.append, 10)
    client = ros.node.create_client(StorageQuery, '/s1/storage/query')
    proc = spawn('-m', 'loom_ros.storage.ros2.node', '--ros-args', '-r', '__ns:=/s1',
                 '-p', f'storage.root:={tmp_path}', '-p', 'storage.embedder:=hash',
                 '-p', 'storage.move_period_s:=0.2', '-p', 'storage.stats_period_s:=0.2',
                 '-p', 'storage.budget.total_bytes:=100000000')
    ros.wait_for(lambda: any(m.memories > 0 for m in stats), 'a round that made memories',
                 alive=[proc])
    last = stats[-1]
    tiers = {t.name: t for t in last.tiers}
    assert last.condensed == 30 and tiers['warm'].rows == 1 and tiers['cold'].rows == 3
    assert last.total_budget_bytes == 100000000 and 0 < last.total_bytes < 100000000
    found = call(ros, client, StorageQuery.Request(kind='memories', query='coffee', limit=2))
    assert found.ok, found.error
    first = json.loads(found.results[0])
    assert first['unit'] == 'host1' and first['type'] == 'speech.heard' and first['count'] == 10
    warm = call(ros, client, StorageQuery.Request(kind='episodes', agent_id='greeter'))
    assert [json.loads(r)['event_id'] for r in warm.results] == ['now']
    bad = call(ros, client, StorageQuery.Request(kind='everything'))
    assert not bad.ok and 'episodes or memories' in bad.error
    ros.wait_for(lambda: any(st.name.endswith('storage budget') and 'total' in st.message
                             for d in diagnostics for st in d.status), 'the budget check',
                 alive=[proc])
    proc.popen.send_signal(signal.SIGINT)
    code, _, err = proc.finish()
    assert code == 0, err
