"""The bridge's pure core: keys, the codec, allow/deny and the privacy gate, the bounded outbox,
and what Bridge.send/receive count. (The Zenoh side is covered across processes in
test_bridge_node.py; here a recording transport stands in for the network.)"""
from collections import Counter

import numpy
import pytest
from hypothesis import given, strategies as st

from harness import recording_bridge

from loom_ros.bridge import codec
from loom_ros.bridge.core import BridgeConfig
from loom_ros.bridge.gate import PrivacyGate
from loom_ros.bridge.keys import (RobotIdError, fleet_key_expr, parse_robot_key, robot_key,
                                  validate_robot_id)
from loom_ros.bridge.outbox import Outbox, Pending
from loom_ros.bus.event import Event, EventRejected, Privacy
from loom_ros.bus.names import TopicNameError
from loom_ros.bus.qos import QosLevel
from loom_ros.router.policy import parse_policy


def embedding(type: str, count: int = 1, dim: int = 8, **fields) -> Event:
    """A Sensitive event carrying what the robot's embedder makes: unit float32 vectors."""
    vectors = numpy.random.default_rng(0).normal(size=(count, dim))
    vectors /= numpy.linalg.norm(vectors, axis=1, keepdims=True)
    return Event(type=type, payload=vectors.astype('<f4').tobytes(), privacy=Privacy.SENSITIVE,
                 metadata={'dim': str(dim), 'count': str(count), 'dtype': 'float32',
                           **fields.pop('metadata', {})}, **fields)


def test_keys():
    assert robot_key('r1', 'agent.counter.intent') == 'loom/r1/agent/counter/intent'
    assert fleet_key_expr('agent.*.intent') == 'loom/*/agent/*/intent'
    assert parse_robot_key('loom/r-2/camera/front/face') == ('r-2', 'camera.front.face')
    for bad in ('', 'a/b', '*', 'cloud', 'x' * 65, 'r 1'):
        with pytest.raises(RobotIdError):
            validate_robot_id(bad)
    # 'loom/r1/fleet/robot.move' named the same topic as 'loom/r1/fleet/robot/move', which the
    # router's per-chunk rules see as another key
    for bad in ('loom/r1', 'other/r1/a', 'loom/r1/9a', 'loom/r1/fleet/robot.move',
                'loom/r1/fleet.robot.move'):
        with pytest.raises(TopicNameError):
            parse_robot_key(bad)


text = st.text(max_size=20)


@given(st.builds(Event, type=st.text(min_size=1, max_size=20), source=text,
                 payload=st.binary(max_size=200), metadata=st.dictionaries(text, text, max_size=4),
                 confidence=st.floats(0.0, 1.0), tags=st.lists(text, max_size=3),
                 priority=st.integers(-2**31, 2**31 - 1), privacy=st.sampled_from(Privacy),
                 frame_id=text, timestamp_ms=st.integers(0, 2**63 - 1)))
def test_codec_round_trip_keeps_every_field(event):
    assert codec.decode(codec.encode(event)) == event


@given(st.builds(Event, type=st.text(min_size=1, max_size=20), source=text,
                 id=st.text(min_size=1, max_size=20),
                 metadata=st.dictionaries(text, text, max_size=4),
                 confidence=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0, 1])),
                 tags=st.lists(text, max_size=3), priority=st.integers(-2**31, 2**31 - 1),
                 privacy=st.sampled_from(Privacy), frame_id=text,
                 timestamp_ms=st.integers(0, 2**63 - 1)))
def test_codec_writes_exactly_what_the_json_encoder_writes(event):
    """The fast header (no dict, no encoder call) is byte for byte the JSON encoder's, so a
    receiver of either cannot tell them apart (escapes, non-ASCII, an int confidence)."""
    header = codec._JSON({
        'id': event.id, 'type': event.type, 'ts': event.timestamp_ms, 'src': event.source,
        'md': event.metadata, 'conf': event.confidence, 'tags': event.tags,
        'pri': event.priority, 'prv': int(event.privacy), 'frame': event.frame_id}).encode()
    assert codec.encode(event) == (bytes((codec.VERSION,)) + len(header).to_bytes(4, 'big')
                                   + header + event.payload)


@pytest.mark.parametrize('data', [b'', b'\x01\x00', b'\x02\x00\x00\x00\x02{}',
                                  b'\x01\x00\x00\x00\x09{"id":1}', b'\x01\x00\x00\x00\x02{}',
                                  b'\x01\x00\x00\x00\x05[1,2]'])
def test_codec_refuses_malformed_samples(data):
    with pytest.raises(EventRejected):
        codec.decode(data)


def test_outbox_bound_order_and_per_key_hold():
    box = Outbox(3)
    for i in range(4):
        dropped = box.add(Pending('a' if i % 2 else 'b', bytes([i]), QosLevel.BATCHED))
    assert dropped == 1 and box.dropped == 1 and len(box) == 3
    assert [i.data for i in box.items] == [b'\x01', b'\x02', b'\x03']   # the oldest went
    sent = []
    assert box.drain(lambda item: item.key == 'a', lambda item: sent.append(item.data)) == 2
    assert sent == [b'\x01', b'\x03'] and [i.data for i in box.items] == [b'\x02']

    def failing(item):
        raise ConnectionError('gone')
    with pytest.raises(ConnectionError):
        box.drain(lambda item: True, failing)
    assert [i.data for i in box.items] == [b'\x02'] and box.holds('b')


def make_bridge(policy=None, bound=100):
    levels = {'sensor': QosLevel.REALTIME, 'log': QosLevel.BACKGROUND}
    return recording_bridge(
        {'out_allow': ['agent.*.intent', 'sensor.**', 'log.**'], 'out_deny': ['log.secret'],
         'buffer_max_events': bound},
        {'rules': [{'key': 'fleet.**', 'privacy': 'public', 'rate': 1000}]},
        lambda t: levels.get(t.split('.')[0], QosLevel.BATCHED), PrivacyGate(policy))


def test_outbox_holds_at_most_its_bytes():
    """The outbox was bounded in events only: 10,000 waiting 4 MiB events (a new topic nobody
    listens to yet) held 40 GiB. Past the byte bound the oldest go, counted; an event larger
    than the bound alone is not kept; draining and purging give the bytes back."""
    box = Outbox(100, max_bytes=10)
    assert box.add(Pending('a', b'1234', QosLevel.BATCHED)) == 0
    assert box.add(Pending('b', b'5678', QosLevel.BATCHED, 'alice')) == 0
    assert box.add(Pending('a', b'90ab', QosLevel.BATCHED)) == 1   # 12 > 10: the oldest goes
    assert [i.data for i in box.items] == [b'5678', b'90ab'] and box.bytes == 8
    assert box.add(Pending('c', b'x' * 11, QosLevel.BATCHED)) == 1  # alone over the bound
    assert box.bytes == 8 and len(box) == 2 and box.dropped == 2
    assert box.purge('alice') == 1 and box.bytes == 4
    assert box.drain(lambda item: True, lambda item: None) == 1 and box.bytes == 0
    assert not box.per_key
    # through the bridge: counted as dropped_outbox_full, the node's parameter in the config
    bridge, transport, _ = recording_bridge({'out_allow': ['agent.*.intent'],
                                             'buffer_max_bytes': 3000})
    for i in range(5):   # nobody listens: each waits in the outbox
        assert bridge.send(Event(type='t', payload=b'x' * 1000), 'agent.a.intent') == 'buffered'
    assert len(bridge.outbox) == 2 and bridge.stats['dropped_outbox_full'] == 3
    assert bridge.outbox.bytes <= 3000


def test_outbox_drain_limit_keeps_the_rest_in_order():
    """The bridge drains at most a batch per executor callback, so a big backlog cannot hold
    the executor (and a SIGTERM) for long: the rest keeps its order for the next call."""
    box = Outbox(10)
    for i in range(6):
        box.add(Pending('a' if i % 3 else 'b', bytes([i]), QosLevel.BATCHED))
    sent = []
    assert box.drain(lambda item: item.key == 'a', lambda item: sent.append(item.data), 2) == 2
    assert sent == [b'\x01', b'\x02']
    assert [i.data for i in box.items] == [b'\x00', b'\x03', b'\x04', b'\x05']
    assert box.drain(lambda item: True, lambda item: sent.append(item.data), 3) == 3
    assert [i.data for i in box.items] == [b'\x05'] and box.per_key['a'] == 1
    assert 'b' not in box.per_key


def test_privacy_gate_and_patterns_whatever_the_config():
    bridge, transport, audit = make_bridge()
    transport.listening.add('loom/r1/agent/a/intent')
    verdicts = [bridge.send(Event(type='t', privacy=p), 'agent.a.intent')
                for p in (Privacy.PRIVATE, Privacy.LOCAL_ONLY, Privacy.SENSITIVE, Privacy.PUBLIC)]
    assert verdicts == ['refused_private', 'refused_local_only', 'refused_sensitive_raw', 'sent']
    assert bridge.send(embedding('t.embedding'), 'agent.a.intent') == 'sent'
    assert [r['reason'] for r in audit] == ['private', 'local_only', 'sensitive_raw']
    assert bridge.send(Event(type='t'), 'log.secret') == 'denied'
    assert bridge.send(Event(type='t'), 'camera.front') == 'denied'
    # A policy with sensitive_upload: none keeps even embeddings home, for that event type only.
    strict = parse_policy({'event_types': {'speech': {'sensitive_upload': 'none'}}})
    bridge, transport, audit = make_bridge(strict)
    transport.listening.add('loom/r1/agent/a/intent')
    assert bridge.send(embedding('speech'), 'agent.a.intent') == 'refused_sensitive_policy_none'
    assert bridge.send(embedding('face.embedding'), 'agent.a.intent') == 'sent'


def test_embedding_shape_digits_are_ascii_only():
    """'²'.isdigit() is true and int('²') raised out of the gate: the event was dropped by the
    bus's guard without the privacy refusal being audited."""
    from loom_ros.bridge.gate import is_embedding
    for dim, count in (('²', '1'), ('8', '³'), ('٨', '1')):
        assert is_embedding(embedding('t.embedding', metadata={'dim': dim, 'count': count})) \
            is False
    assert is_embedding(embedding('t.embedding'))


def test_sensitive_events_never_leave_in_clear_unless_sealing_is_off():
    """The fleet set-up left the cloud's certificate off a robot: `seal_sensitive: auto` then
    sent Sensitive embeddings in clear, for every operator on the router to read. Now they stay
    on the robot (counted, audited); only seal_sensitive: off (seal_required False) sends them."""
    from loom_ros.bridge.bridge_node import sealing_check
    from loom_ros.telemetry.diagnostics import OK, WARN
    bridge, transport, audit = recording_bridge({'out_allow': ['agent.*.intent']},
                                                seal_required=True)
    transport.listening.add('loom/r1/agent/a/intent')
    assert bridge.send(embedding('t.embedding'), 'agent.a.intent') == 'refused_unsealed'
    assert bridge.send(Event(type='t'), 'agent.a.intent') == 'sent'   # Public still goes
    assert [r['reason'] for r in audit] == ['unsealed']
    assert [key for key, _, _ in transport.puts] == ['loom/r1/agent/a/intent']
    assert bridge.stats['refused_unsealed'] == 1
    bridge, transport, audit = recording_bridge({'out_allow': ['agent.*.intent']})
    transport.listening.add('loom/r1/agent/a/intent')
    assert bridge.send(embedding('t.embedding'), 'agent.a.intent') == 'sent'   # off: in clear
    assert sealing_check('auto', False).level == WARN
    assert sealing_check('off', False).level == WARN
    assert sealing_check('auto', True).level == OK


def test_a_data_subjects_events_leave_only_with_fleet_consent(tmp_path):
    """loom.subject on an event: it leaves the robot only with that subject's fleet consent
    (the registry read at every event); other purposes do not count; hostile ids stay."""
    from loom_ros.security.audit import AuditLog
    from loom_ros.storage.consent import ConsentRegistry, SubjectRefs
    audit_log = AuditLog(tmp_path / 'audit.db')
    registry = ConsentRegistry(tmp_path / 'consent.db', audit=audit_log,
                               refs=SubjectRefs.at(tmp_path / 'keys'))
    reader = ConsentRegistry(tmp_path / 'consent.db', read_only=True)   # as the node opens it
    bridge, transport, audit = make_bridge()
    bridge.gate = PrivacyGate(None, reader.lookup)
    transport.listening.add('loom/r1/agent/a/intent')

    def send(subject, **fields):
        return bridge.send(Event(type='t', metadata={'loom.subject': subject}, **fields),
                           'agent.a.intent')
    assert send('alice') == 'refused_no_fleet_consent'
    registry.grant('alice', 'cloud', 'test:app')          # another purpose: still refused
    assert send('alice') == 'refused_no_fleet_consent'
    registry.grant('alice', 'fleet', 'test:app')
    assert send('alice') == 'sent'
    assert send('alice', privacy=Privacy.PRIVATE) == 'refused_private'   # privacy first
    for hostile in ('../x', 'a' * 10_000, '', 'bob\n'):
        assert send(hostile) == 'refused_no_fleet_consent'
    registry.withdraw('alice', 'fleet', 'test:app')
    assert send('alice') == 'refused_no_fleet_consent'
    assert [r['reason'] for r in audit].count('no_fleet_consent') == 7
    # Without a registry at all: fail closed for subjects, anonymous events unaffected.
    bridge.gate = PrivacyGate()
    assert send('alice') == 'refused_no_fleet_consent'
    assert bridge.send(Event(type='t'), 'agent.a.intent') == 'sent'
    for held in (reader, registry, audit_log):
        held.close()


def waiting_of(bridge) -> dict:
    """Data subject -> events of theirs waiting in the outbox."""
    return dict(Counter(item.subject for item in bridge.outbox.items if item.subject))


def test_consent_withdrawn_while_waiting_keeps_what_waits_home(tmp_path):
    """Review finding: consent was read only as an event was sent, so what then waited in a
    batch or the outbox left after the subject withdrew it. Both are asked again as they go:
    the subject's waiting events are dropped (counted, audited), everyone else's go."""
    from loom_ros.bridge.core import Bridge
    from loom_ros.security.audit import AuditLog
    from loom_ros.storage.consent import ConsentRegistry, SubjectRefs
    audit_log = AuditLog(tmp_path / 'audit.db')
    registry = ConsentRegistry(tmp_path / 'consent.db', audit=audit_log,
                               refs=SubjectRefs.at(tmp_path / 'keys'))
    reader = ConsentRegistry(tmp_path / 'consent.db', read_only=True)
    for who in ('alice', 'bob'):
        registry.grant(who, 'fleet', 'test:app')
    bridge, transport, audit = recording_bridge(
        {'out_allow': ['agent.**']}, gate=PrivacyGate(None, reader.lookup), batch_max_events=10)
    assert isinstance(bridge, Bridge)

    def send(subject, topic='agent.a.intent'):
        event = Event(type='t', metadata={'loom.subject': subject} if subject else {})
        return event.id, bridge.send(event, topic)
    # in a batch: the key is listened to, the batch not yet full
    transport.listening.add('loom/r1/agent/a/intent')
    batched = [send(who) for who in ('alice', 'bob', None, 'alice')]
    assert [how for _id, how in batched] == ['batched'] * 4
    # in the outbox: nobody listens to this key yet
    waiting = [send(who, 'agent.b.intent') for who in ('alice', 'bob', 'alice')]
    assert [how for _id, how in waiting] == ['buffered'] * 3 and waiting_of(bridge) == {
        'alice': 2, 'bob': 1}
    registry.withdraw('alice', 'fleet', 'test:app')
    assert bridge.flush_batches() == 2
    transport.listening.add('loom/r1/agent/b/intent')
    assert bridge.flush() == 1
    sent = {event_id for _key, event_id, _level in transport.puts}
    expected = {batched[1][0], batched[2][0], waiting[1][0]}
    assert sent == expected, (sent, expected)
    assert bridge.stats['dropped_consent_withdrawn'] == 4 and not waiting_of(bridge)
    withdrawn = [r for r in audit if r['reason'] == 'consent_withdrawn_while_waiting']
    assert [r['subject_events'] for r in withdrawn] == [4]   # the batch's and the outbox's
    assert all('alice' not in str(r) for r in withdrawn)
    # The outbox alone: asked only as its events would go, then all of theirs are dropped.
    later = [send(who, 'agent.c.intent') for who in ('bob', None, 'bob')]
    registry.withdraw('bob', 'fleet', 'test:app')
    assert bridge.flush() == 0   # nobody listens yet: nothing asked, nothing dropped
    assert waiting_of(bridge) == {'bob': 2}
    transport.listening.add('loom/r1/agent/c/intent')
    assert bridge.flush() == 1 and transport.puts[-1][1] == later[1][0]
    assert bridge.stats['dropped_consent_withdrawn'] == 6 and len(bridge.outbox) == 0
    assert [r['subject_events'] for r in audit
            if r['reason'] == 'consent_withdrawn_while_waiting'] == [4, 2]
    for held in (reader, registry, audit_log):
        held.close()


def test_buffering_by_level_and_flush_in_order():
    bridge, transport, _ = make_bridge(bound=3)
    transport.connected = False
    assert bridge.send(Event(type='imu'), 'sensor.imu') == 'dropped_disconnected'
    events = [Event(type='t') for _ in range(4)]
    assert [bridge.send(e, 'agent.a.intent') for e in events] == ['buffered'] * 4
    assert bridge.stats['dropped_outbox_full'] == 1
    transport.connected = True
    assert bridge.flush() == 0  # connected, but nobody listens yet: still held
    transport.listening.add('loom/r1/agent/a/intent')
    late = Event(type='t')
    assert bridge.send(late, 'agent.a.intent') == 'buffered'  # behind its key's queue
    bridge.flush()
    assert [p[1] for p in transport.puts] == [e.id for e in events[2:]] + [late.id]
    assert bridge.send(Event(type='imu'), 'sensor.imu') == 'sent'  # realtime: straight out


def test_receive_only_this_robots_allowed_wellformed_events_and_no_echo():
    bridge, transport, _ = make_bridge()
    event = Event(type='cmd', payload=b'go')
    assert bridge.receive('loom/r1/fleet/cmd', codec.encode(event)) == ('fleet.cmd', event)
    assert bridge.receive('loom/r2/fleet/cmd', codec.encode(event)) is None
    assert bridge.receive('loom/r1/agent/a/intent', codec.encode(event)) is None
    assert bridge.receive('loom/r1/fleet/cmd', b'junk') is None
    assert bridge.receive('nonsense', b'') is None
    assert {k: bridge.stats[k] for k in ('received', 'rejected_other_robot', 'denied_inbound',
                                         'rejected_malformed', 'rejected_key')} == dict.fromkeys(
        ('received', 'rejected_other_robot', 'denied_inbound', 'rejected_malformed',
         'rejected_key'), 1)
    # What came in is never sent back out, even on a topic allowed outbound.
    assert bridge.send(event, 'agent.a.intent') == 'echo_skipped'


def test_config_errors_name_the_key():
    base = {'robot_id': 'r1', 'out_allow': ['a'], 'out_deny': [], 'buffer_max_events': 10}
    for change, words in [({'robot_id': 'a/b'}, 'robot_id'), ({'out_allow': ['a/b']}, 'a/b'),
                          ({'buffer_max_events': 0}, 'buffer_max_events')]:
        with pytest.raises(ValueError, match=words):
            BridgeConfig.from_params({**base, **change})
