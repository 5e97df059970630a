"""storage/forget end to end (issue 17), across real processes on loopback: the storage node,
the Zenoh bridge holding a subject's events in its outbox, a Zenoh router with mutual TLS and the
fleet's access control, and `loom_cloud` keeping its request log. Canaries of two subjects are
planted in every store under the root (test_erasure.plant), in cloud requests and in the
bridge's outbox; one call erases subject A everywhere, then every byte under the root and the
cloud's folder is scanned: none of A's canaries, all of B's. Plus the bridge's purge in its core
and hostile subject ids."""
from __future__ import annotations

import json
import signal
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from harness import WAIT_LIMIT_S, recording_bridge
from loom_ros.bridge.gate import PrivacyGate
from loom_ros.bridge.outbox import Outbox, Pending
from loom_ros.bus.event import Event
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, ConsentState, SubjectError
from loom_ros.bus.qos import QosLevel
from loom_ros.cloud.client import CloudClient, InferenceRequest, execute_route
from loom_ros.router.decision import Decision, Route
from loom_ros.security.audit import AuditLog
from loom_ros.storage.consent import ConsentRegistry, SubjectRefs, consent_path
from loom_ros.storage.fleet_erasure import forget_everywhere
from loom_ros.storage.layout import StorageLayout
from test_erasure import Subject, hits, plant, scan

# The cloud tests' fixtures (a fleet's keys, a router and loom_cloud processes): their folder is
# not on the path of a test in this one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'cloud'))
from cloud_fixtures import fleet, net  # noqa: E402,F401  (fixtures)


@pytest.fixture
def port():
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def speech(subject: Subject | None, text: str) -> Event:
    return Event(type='speech.utterance', source='mic', id=uuid.uuid4().hex,
                 payload=json.dumps({'text': text}).encode(),
                 metadata={SUBJECT_METADATA_KEY: subject.id} if subject else {})


def params_file(tmp_path: Path, name: str, values: dict) -> Path:
    path = tmp_path / f'{name}_params.yaml'
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': values}}))
    return path


def test_forget_service_erases_a_subject_on_the_robot_its_outbox_and_the_cloud(
        ros, spawn, net, fleet, port, tmp_path):
    import rclpy
    from std_msgs.msg import String

    from loom_msgs.srv import Forget, StorageQuery
    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.qos import TopicQosTable, to_qos_profile
    from loom_ros.config.params import node_defaults
    root = tmp_path / 'root'
    a, b = Subject('A'), Subject('B')
    expected = plant(root, [a, b])
    layout = StorageLayout.at(root)
    audit = AuditLog(layout.audit)
    consent = ConsentRegistry(consent_path(root), audit=audit, refs=SubjectRefs.at(layout.keys))
    for s in (a, b):   # their events may leave the robot (the bridge's privacy gate)
        consent.grant(s.id, 'fleet', 'cli:test')
    consent.close()
    audit.close()
    refs = SubjectRefs.at(layout.keys)   # the robot's subject key: what the cloud files under

    # The cloud keeps a request of each subject.
    cloud_dir = tmp_path / 'cloud_data'
    net.start('--data-dir', str(cloud_dir))
    client = CloudClient.from_keys(net.session('robot1'), fleet, 'robot1', ask_all=True)
    in_cloud = {s.id: f'CANARYCLOUD{uuid.uuid4().hex}' for s in (a, b)}
    for s in (a, b):
        result = execute_route(Decision(Route.CLOUD, 0.3, 'test', 'cloud', upload='raw'),
                               InferenceRequest('intent', f'is it sunny {in_cloud[s.id]}',
                                                latency_budget_ms=WAIT_LIMIT_S * 1000,
                                                subject_ref=refs.ref(s.id)),
                               lambda r: ({}, 0.0), client)
        assert result.backend == 'cloud', result.cloud_error
    cloud_bytes = scan(cloud_dir)
    assert all(c.encode() in cloud_bytes for c in in_cloud.values())

    # The bridge: nobody on the Zenoh side listens to speech, so the subjects' events wait.
    endpoint = f'tcp/127.0.0.1:{port}'
    inbound = tmp_path / 'inbound.yaml'
    inbound.write_text('rules: []\n')
    bridge = spawn('-m', 'loom_ros.bridge.bridge_node', '--ros-args', '-r', '__ns:=/fgt',
                   '--params-file', str(params_file(tmp_path, 'bridge', {
                       'robot_id': 'robot1', 'mode': 'client', 'connect': [endpoint],
                       'keys_dir': str(fleet), 'seal_sensitive': 'off',
                       'inbound_file': str(inbound), 'storage': {'root': str(root)},
                       'status_period_s': 0.05, 'bus': {'discovery_period_s': 0.1}})))
    status = {}
    ros.node.create_subscription(String, '/fgt/zenoh_bridge/status',
                                 lambda m: status.update(json.loads(m.data)),
                                 to_qos_profile('realtime'))
    node = rclpy.create_node('test_fgt', namespace='/fgt')
    ros.executor.add_node(node)
    defaults = node_defaults('loom_test')
    bus = EventBus(node, topic_qos=TopicQosTable(defaults['bus.topic_qos'],
                                                 defaults['bus.default_qos']),
                   discovery_period_s=0.1)
    pub = bus.publisher_for('mic.primary.speech')
    ros.wait_for(lambda: status.get('connected') and pub.get_subscription_count() >= 1,
                 'the bridge to connect and subscribe', alive=[bridge])
    for s, n in ((a, 3), (b, 2)):
        for _ in range(n):
            bus.publish('mic.primary.speech', speech(s, f'waiting {uuid.uuid4().hex}'))
    ros.wait_for(lambda: status.get('outbox') == 5, 'five events in the outbox', alive=[bridge])

    storage = spawn('-m', 'loom_ros.storage.ros2.node', '--ros-args', '-r', '__ns:=/fgt',
                    '--params-file', str(params_file(tmp_path, 'storage', {
                        'storage': {'root': str(root), 'embedder': 'hash',
                                    'stats_period_s': 0.2,   # no move: the planted tiers stay
                                    'lifecycle': {'warm_s': 1e10, 'cold_s': 1e10}},
                        'forget': {'fleet_connect': [endpoint], 'keys_dir': str(fleet),
                                   'identity': 'robot1', 'fleet_timeout_s': WAIT_LIMIT_S}})))
    alive = [bridge, storage]
    forget = ros.node.create_client(Forget, '/fgt/storage/forget')
    # A first call that erases nothing (safe to repeat) settles DDS's discovery race, so the
    # one below is asked once and its counts are its own.
    warm = ros.call(forget, Forget.Request(subject='nobody', requested_by='dpo:test'),
                    'storage/forget', alive=alive)
    assert warm.ok and warm.fleet_status == 'skipped', warm.error

    # Hostile subject ids: refused with the reason, nothing erased.
    for hostile in ('../etc', 'a' * 5000, '', 'x y', 'a/../../b'):
        bad = ros.call(forget, Forget.Request(subject=hostile, fleet=True), 'storage/forget',
                       alive=alive)
        assert not bad.ok and 'subject' in bad.error and not bad.receipt, hostile[:20]
    bad = ros.call(forget, Forget.Request(subject=a.id, fleet=True, fleet_timeout_s=-1.0),
                   'storage/forget', alive=alive)
    assert not bad.ok and 'fleet_timeout_s' in bad.error

    done = ros.call(forget, Forget.Request(subject=a.id, requested_by='dpo:test', fleet=True),
                    'storage/forget', resend_s=WAIT_LIMIT_S, alive=alive)
    assert done.ok, done.error
    receipt = json.loads(done.receipt)
    counts = {k: v for k, v in receipt['counts'].items() if v}
    # the planted data (with the fleet consent granted above) and the bridge's waiting events
    assert counts == {**expected[a.id], 'consent': expected[a.id]['consent'] + 1,
                      'bridge_outbox': 3}
    assert receipt['subject_ref'] == refs.ref(a.id) and receipt['notes'] == []
    assert not any('bridge outbox' in n for n in receipt['not_covered'])
    assert (done.fleet_status, done.fleet_error) == ('done', '')
    [cloud_receipt] = [json.loads(r) for r in done.fleet_receipts]
    assert cloud_receipt['signer'] == 'cloud'
    assert cloud_receipt['receipt']['counts'] == {'request_log': 1}
    assert cloud_receipt['receipt']['subject_ref'] == refs.ref(a.id)
    ros.wait_for(lambda: status.get('outbox') == 2 and status.get('forgotten') == 3,
                 "only B's events left in the outbox", alive=alive)

    # Every byte under the root and in the cloud's folder: none of A, all of B.
    after = scan(root)
    assert hits(after, a) == [], f'left behind: {hits(after, a)}'
    assert hits(after, b) == sorted(b.canaries)
    cloud_bytes = scan(cloud_dir)
    assert in_cloud[a.id].encode() not in cloud_bytes and in_cloud[b.id].encode() in cloud_bytes
    # The audit keeps tombstones: the keyed hash, who asked, counts, the cloud's signed receipt.
    log = AuditLog(layout.audit)
    beyond = log.query(plugin='erasure', kind='subject_erased_beyond_root')
    log.close()
    mine = [r['fields'] for r in beyond if r['fields']['subject_ref'] == refs.ref(a.id)]
    assert len(mine) == 1 and mine[0]['bridge_outbox'] == 3
    assert mine[0]['fleet_status'] == 'done' and mine[0]['requested_by'] == 'dpo:test'
    assert mine[0]['fleet_receipts'][0]['counts'] == {'request_log': 1}
    assert mine[0]['fleet_receipts'][0]['sig'] == cloud_receipt['sig']

    # The node works on after the erasure (its databases opened again): B's episodes answer.
    query = ros.node.create_client(StorageQuery, '/fgt/storage/query')
    found = ros.call(query, StorageQuery.Request(kind='episodes', limit=100), 'storage/query',
                     alive=alive)
    assert found.ok and found.results
    answered = '\n'.join(found.results)
    assert b.canaries['warm0'].decode() in answered
    assert a.canaries['warm0'].decode() not in answered
    bus.destroy()
    ros.executor.remove_node(node)
    node.destroy_node()
    for proc in (storage, bridge):
        proc.popen.send_signal(signal.SIGINT)
        code, _, err = proc.finish()
        assert code == 0, err


class Granted:
    @staticmethod
    def lookup(subject, purpose):
        return ConsentState(purpose, True, True, 'test')


def test_the_bridge_drops_a_subjects_waiting_events_from_batches_and_outbox():
    a, b = Subject('A'), Subject('B')
    bridge, transport, _ = recording_bridge({'out_allow': ['mic.**']},
                                            gate=PrivacyGate(None, Granted.lookup),
                                            batch_max_events=50)
    key = bridge.route('mic.one')[1]
    transport.listening.add(key)
    batched = [speech(s, 'x') for s in (a, b, a, None)]
    for e in batched:   # the key can go now: they wait in its batch
        assert bridge.send(e, 'mic.one') == 'batched'
    queued = [speech(s, 'y') for s in (a, b, None, a)]
    for e in queued:    # nobody listens: the outbox
        assert bridge.send(e, 'mic.two') == 'buffered'
    assert bridge.forget(a.id) == 4 and bridge.stats['forgotten'] == 4
    assert bridge.forget(a.id) == 0
    assert bridge.flush_batches() == 2
    transport.listening.add(bridge.route('mic.two')[1])
    assert bridge.flush() == 2
    kept = [e.id for e in batched + queued if e.metadata.get(SUBJECT_METADATA_KEY) != a.id]
    assert [put[1] for put in transport.puts] == kept
    # A spilled batch keeps its subjects: the key stops listening, the batch goes to the outbox.
    bridge.send(speech(a, 'z'), 'mic.one')
    transport.listening.discard(key)
    bridge.flush_batches()
    assert len(bridge.outbox) == 1 and bridge.forget(a.id) == 1 and len(bridge.outbox) == 0


def test_outbox_purge_keeps_the_others_in_order():
    box = Outbox(10)
    for i, who in enumerate('abab'):
        box.add(Pending(f'k{i % 2}', bytes([i]), QosLevel.BATCHED, who))
    assert box.purge('a') == 2 and box.purge('') == 0
    assert [i.data for i in box.items] == [b'\x01', b'\x03'] and dict(box.per_key) == {'k1': 2}


def test_forget_everywhere_refuses_hostile_ids_before_touching_anything(tmp_path):
    layout = StorageLayout.at(tmp_path / 'root')
    for hostile in ('../x', 'a' * 5000, 'x\0y', '', 'a/b'):
        with pytest.raises(SubjectError):
            forget_everywhere(layout, hostile, requested_by='dpo:test', audit=None,
                              refs=SubjectRefs(b'k' * 32))
    assert not layout.root.exists()
