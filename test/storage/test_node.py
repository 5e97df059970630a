"""The storage node in its own process: it finds the unit databases under its root, runs the
lifecycle on its timer, publishes StorageStats and answers StorageQuery, as `ros2 service call`
would ask it; budgets show on /diagnostics."""
from __future__ import annotations

import json
import signal
import time

from loom_ros.bus.event import Event
from loom_ros.bus.qos import to_qos_profile
from loom_ros.storage.storage import Storage, StorageConfig

OLD_MS = 1_700_000_000_000   # 2023-11: past the 1-day warm age at once


def call(ros, client, request):
    return ros.call(client, request, 'storage/query')


def test_node_moves_publishes_and_answers_queries(ros, spawn, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from loom_msgs.msg import StorageStats
    from loom_msgs.srv import StorageQuery
    # written then (the store's clock: the lifecycle ages rows from when they were written)
    now = [OLD_MS]
    with Storage(StorageConfig(root=str(tmp_path), unit='host1'), clock=lambda: now[0]) as s:
        for i in range(30):
            now[0] = OLD_MS + i * 1000
            s.episodes.record('greeter', Event(type='speech.heard', source='mic', id=f'old{i}',
                                                payload=b'someone asked for a coffee %d' % i,
                                                timestamp_ms=OLD_MS + i * 1000))
        now[0] = time.time_ns() // 1_000_000
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
                 '-p', 'storage.budget.total_bytes:=100000000',
                 '-p', 'storage.lifecycle.cold_s:=1e10')   # 2020 stays cold, not archived
    ros.wait_for(lambda: any(m.memories > 0 for m in stats), 'a round that made memories',
                 alive=[proc])
    last = stats[-1]
    tiers = {t.name: t for t in last.tiers}
    buckets = len({(OLD_MS + i * 1000) // 60_000 for i in range(30)})   # bucket_s 60
    assert (last.condensed, last.memories) == (30, buckets)
    assert tiers['warm'].rows == 1 and tiers['cold'].rows == buckets
    assert last.total_budget_bytes == 100000000 and 0 < last.total_bytes < 100000000
    found = call(ros, client, StorageQuery.Request(kind='memories', query='coffee', limit=10))
    assert found.ok, found.error
    memories = [json.loads(r) for r in found.results]
    assert {(m['unit'], m['type']) for m in memories} == {('host1', 'speech.heard')}
    assert sum(m['count'] for m in memories) == 30 and 'coffee' in memories[0]['summary']
    warm = call(ros, client, StorageQuery.Request(kind='episodes', agent_id='greeter'))
    assert [json.loads(r)['event_id'] for r in warm.results] == ['now']
    bad = call(ros, client, StorageQuery.Request(kind='everything'))
    assert not bad.ok and 'episodes or memories' in bad.error
    ros.wait_for(lambda: any(st.name.endswith('storage budget') and 'total' in st.message
                             for d in diagnostics for st in d.status), 'the budget check',
                 alive=[proc])
    ros.wait_for(lambda: any(st.name.endswith('storage clock') and 'believable' in st.message
                             for d in diagnostics for st in d.status), 'the clock check',
                 alive=[proc])
    proc.popen.send_signal(signal.SIGINT)
    code, _, err = proc.finish()
    assert code == 0, err


def test_consent_service_changes_are_audited_and_the_chain_head_is_published(ros, spawn,
                                                                             tmp_path):
    """storage/consent as `ros2 service call` would use it: the change holds for `loom consent`
    too (one registry), is audited, and the audit head on audit/head verifies the log; hostile
    requests are refused with a reason and change nothing."""
    import subprocess
    import sys

    from loom_msgs.srv import Consent
    from std_msgs.msg import String

    from harness import REPO, loom_cli
    heads = []
    ros.node.create_subscription(String, '/s2/audit/head', heads.append,
                                 to_qos_profile('background'))
    client = ros.node.create_client(Consent, '/s2/storage/consent')
    proc = spawn('-m', 'loom_ros.storage.ros2.node', '--ros-args', '-r', '__ns:=/s2',
                 '-p', f'storage.root:={tmp_path}', '-p', 'storage.embedder:=hash',
                 '-p', 'storage.stats_period_s:=0.2')

    def ask(action, subject, purpose='', source='app:nurse_station'):
        return ros.call(client, Consent.Request(action=action, subject=subject, purpose=purpose,
                                                source=source), 'storage/consent', alive=[proc])
    shown = ask('show', 'alice', 'cloud')
    assert shown.ok and json.loads(shown.states[0])['granted'] is False
    granted = ask('grant', 'alice', 'cloud')
    assert granted.ok and json.loads(granted.states[0])['asked'] is True
    # The same registry as the command line's.
    out = subprocess.run([sys.executable, *loom_cli('consent', 'show', 'alice', 'cloud', '--root',
                                                    str(tmp_path), '--json')],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)['consent']['cloud']['granted'], out
    withdrawn = ask('withdraw', 'alice')   # every purpose
    assert withdrawn.ok and len(withdrawn.states) == 5
    assert not any(json.loads(s)['granted'] for s in withdrawn.states)
    # Hostile requests: refused, nothing recorded for them.
    for action, subject, purpose in [('grant', '../etc', 'cloud'), ('grant', 'bob', 'everything'),
                                     ('delete', 'bob', 'cloud'), ('grant', 'bob', ''),
                                     ('grant', 'b' * 5000, 'cloud')]:
        bad = ask(action, subject, purpose)
        assert not bad.ok and bad.error, (action, subject[:20], purpose)
    assert not json.loads(ask('show', 'bob', 'cloud').states[0])['asked']
    # 1 grant + 5 withdrawals audited; the published head verifies the whole log.
    ros.wait_for(lambda: heads and heads[-1].data.startswith('6:'), 'the audit head after 6 '
                 'changes', alive=[proc])
    verify = subprocess.run([sys.executable, *loom_cli('audit', 'verify', '--db',
                                                       str(tmp_path / 'audit.db'), '--head',
                                                       heads[-1].data)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    proc.popen.send_signal(signal.SIGINT)
    code, _, err = proc.finish()
    assert code == 0, err
