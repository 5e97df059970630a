"""The event bus across processes over real DDS: fields intact, QoS as asked, patterns that match
topics created later, incompatible QoS that must not connect, and bad input counted, not fatal."""
import json
import math

import pytest
from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

from harness import loom_cli
from loom_ros.bus.event import Event, EventRejected, Privacy, RejectReason


def seed_event(**overrides):
    fields = dict(id='evt-42', type='face.detected', timestamp_ms=1_732_000_000_500,
                  source='camera_front', metadata={'model': 'short_range', 'k': 'v'},
                  payload=json.dumps({'expression': 'happy'}).encode(), confidence=0.92,
                  tags=['face', 'front'], priority=7, privacy=Privacy.SENSITIVE,
                  frame_id='camera_optical')
    fields.update(overrides)
    return Event(**fields)


def test_subscriber_process_sees_seed_fields_and_requests_the_qos_it_asked_for(ros, bus, spawn):
    echo = spawn(*loom_cli('echo', 'camera.front.face', '--count', '1', '--qos', 'realtime'))
    publisher = bus.publisher_for('camera.front.face', 'realtime')
    ros.wait_for(lambda: publisher.get_subscription_count() >= 1, 'echo to match', alive=[echo])
    sent = seed_event()
    # Realtime is best effort: publish until the subscriber has one, rather than trusting one send.
    ros.wait_for(lambda: echo.popen.poll() is not None, 'echo to receive an event',
                 spin=lambda: bus.publish('camera.front.face', sent, 'realtime'))
    code, out, err = echo.finish()
    assert code == 0, err
    got = json.loads(out.splitlines()[0])
    assert got == {'topic': 'camera.front.face', 'id': 'evt-42', 'type': 'face.detected',
                   'timestamp_ms': 1_732_000_000_500, 'source': 'camera_front',
                   'metadata': {'model': 'short_range', 'k': 'v'},
                   'payload': '{"expression": "happy"}', 'confidence': 0.92,
                   'tags': ['face', 'front'], 'priority': 7, 'privacy': 'SENSITIVE',
                   'frame_id': 'camera_optical'}


def test_publisher_process_offers_the_mapped_qos_and_events_arrive_intact(ros, bus, spawn):
    received = []
    sub = bus.subscribe('mic.primary.speech', lambda e, t: received.append(e), 'batched')
    event = {'id': 'utt-1', 'type': 'speech.utterance', 'source': 'mic', 'payload': 'hello',
             'confidence': 0.7, 'tags': ['speech'], 'priority': 2, 'metadata': {'lang': 'en'},
             'privacy': 'PRIVATE', 'timestamp_ms': 1234}
    # Keeps publishing until killed, so its endpoint is still in the graph when we look.
    pub = spawn(*loom_cli('pub', 'mic.primary.speech', json.dumps(event), '--qos', 'batched',
                          '--wait-subscribers', '1', '--count', '100000', '--rate', '20'))
    ros.wait_for(lambda: received, 'an event from the publisher process', alive=[pub])
    # The graph cache is fed by its own discovery topic and may trail the data path: wait for it.
    ros.wait_for(lambda: [i.node_name for i in ros.node.get_publishers_info_by_topic(
                 '/loom/mic/primary/speech')] == ['loom_pub'], 'the publisher node in the graph')
    infos = ros.node.get_publishers_info_by_topic('/loom/mic/primary/speech')
    assert len(infos) == 1 and infos[0].node_name == 'loom_pub'
    offered = infos[0].qos_profile
    assert offered.reliability == ReliabilityPolicy.RELIABLE
    assert offered.durability == DurabilityPolicy.VOLATILE
    pub.kill()
    assert Event.from_dict({**event, 'id': 'utt-1-0'}) == received[0]
    assert received[0].privacy is Privacy.PRIVATE
    assert set(sub.topics) == {'mic.primary.speech'}
    requested = [i for i in ros.node.get_subscriptions_info_by_topic('/loom/mic/primary/speech')
                 if i.node_name == 'loom_test']
    assert requested[0].qos_profile.reliability == ReliabilityPolicy.RELIABLE


def test_incompatible_qos_pair_does_not_connect_and_is_counted(ros, bus, spawn):
    # A best-effort (realtime) publisher cannot serve a reliable (background) subscription.
    pub = spawn(*loom_cli('pub', 'sensor.incompat', '{"type": "x"}', '--qos', 'realtime',
                          '--wait-subscribers', '1', '--timeout', '120'))
    sub = bus.subscribe('sensor.incompat', lambda e, t: None, 'background')
    endpoint = next(iter(bus._endpoints.values()))
    ros.wait_for(lambda: bus.stats.qos_incompatible['sensor.incompat'] >= 1,
                 'the incompatible-QoS event')
    ros.wait_for(lambda: len(ros.node.get_publishers_info_by_topic('/loom/sensor/incompat')) == 1,
                 'the publisher in the graph')
    assert endpoint.subscription.get_publisher_count() == 0
    assert pub.popen.poll() is None  # still waiting for a subscriber it can never match
    sub.close()


def test_pattern_subscription_matches_topics_created_later(ros, bus, spawn):
    seen = []
    sub = bus.subscribe('camera.**', lambda e, t: seen.append((t, e.id)))
    assert sub.topics == {}
    rear = spawn(*loom_cli('pub', 'camera.rear.depth', '{"type": "depth", "id": "d1"}',
                           '--wait-subscribers', '1'))
    # 'camera' is realtime (best effort): publish until one arrives instead of trusting one send.
    bare = spawn(*loom_cli('pub', 'camera', '{"type": "raw", "id": "c1"}', '--qos', 'realtime',
                           '--wait-subscribers', '1', '--count', '100000', '--rate', '50'))
    other = spawn(*loom_cli('pub', 'mic.rear', '{"type": "audio", "id": "m1"}',
                            '--wait-subscribers', '1', '--timeout', '120'))
    ros.wait_for(lambda: ('camera.rear.depth', 'd1') in seen, 'camera.rear.depth via pattern')
    ros.wait_for(lambda: any(t == 'camera' for t, _ in seen), "zero-segment match 'camera'")
    assert rear.finish()[0] == 0
    assert 'mic.rear' not in sub.topics and other.popen.poll() is None
    # camera.rear.depth defaults to realtime through the config's 'camera.**=realtime' entry.
    assert sub.topics['camera.rear.depth'].value == 'realtime'
    bare.kill()


def test_bad_events_from_another_process_are_counted_and_the_bus_keeps_running(ros, spawn):
    from loom_msgs.msg import Event as EventMsg

    from loom_ros.bus.qos import to_qos_profile
    echo = spawn(*loom_cli('echo', 'bad.input', '--count', '1', '--qos', 'background',
                           '--ros-args', '-p', 'bus.max_payload_bytes:=1024'))
    raw = ros.node.create_publisher(EventMsg, 'loom/bad/input', to_qos_profile('background'))
    ros.wait_for(lambda: raw.get_subscription_count() >= 1, 'echo to match the raw publisher',
                 alive=[echo])
    for bad in (seed_event(id=''), seed_event(confidence=math.nan),
                seed_event(payload=b'x' * 2048), seed_event(type='')):
        raw.publish(bad.to_msg())
    wrong_privacy = seed_event(id='bad-privacy').to_msg()
    wrong_privacy.privacy = 9
    raw.publish(wrong_privacy)
    raw.publish(seed_event(id='good').to_msg())
    code, out, err = echo.finish()
    ros.node.destroy_publisher(raw)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])['id'] == 'good'
    stats = json.loads(err.strip().splitlines()[-1])['stats']
    assert stats['rejected'] == {'missing_id': 1, 'bad_confidence': 1, 'oversize_payload': 1,
                                 'missing_type': 1, 'bad_field': 1}
    assert stats['received'] == {'bad.input': 1}


def test_bad_input_through_the_api_is_refused_counted_and_harmless(ros, bus):
    cases = [
        (lambda: bus.publish('ok.topic', {'type': 'dict'}), RejectReason.WRONG_TYPE),
        (lambda: bus.publish('ok.topic', Event(type='x'), qos='fast'), RejectReason.UNKNOWN_QOS),
        (lambda: bus.publish('bad..topic', Event(type='x')), RejectReason.BAD_TOPIC),
        (lambda: bus.subscribe('bad-name', print), RejectReason.BAD_TOPIC),
        (lambda: bus.publish(['not', 'a', 'name'], Event(type='x')), RejectReason.BAD_TOPIC),
        (lambda: bus.publish('ok.topic', Event(type='x', confidence=math.nan)),
         RejectReason.BAD_CONFIDENCE),
        (lambda: bus.publish('ok.topic', Event(type='x', payload=b'x' * (5 * 2**20))),
         RejectReason.OVERSIZE_PAYLOAD),
        (lambda: bus.publish('ok.topic', Event(type='x'), qos='background'),
         RejectReason.UNKNOWN_QOS),  # ok.topic is already published at batched by this node
    ]
    bus.publish('ok.topic', Event(type='x'))  # creates the publisher at the default level
    for call, reason in cases:
        with pytest.raises(EventRejected) as info:
            call()
        assert info.value.reason is reason
    assert bus.stats.rejected == {'wrong_type': 1, 'unknown_qos': 2, 'bad_topic': 3,
                                  'bad_confidence': 1, 'oversize_payload': 1}
    assert bus.stats.published == {'ok.topic': 1}


def test_a_failing_callback_is_counted_and_others_still_get_events(ros, bus):
    good = []

    def broken(event, topic):
        raise RuntimeError('plugin bug')
    bus.subscribe('local.loop', broken)
    bus.subscribe('local.loop', lambda e, t: good.append(e.id))
    publisher = bus.publisher_for('local.loop')
    ros.wait_for(lambda: publisher.get_subscription_count() >= 1, 'local subscription')
    bus.publish('local.loop', Event(type='x', id='one'))
    bus.publish('local.loop', Event(type='x', id='two'))
    ros.wait_for(lambda: good == ['one', 'two'], 'both events at the healthy callback')
    assert bus.stats.rejected['callback_error'] == 2
