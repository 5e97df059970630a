"""The raw EventBatch decoder: the same events as rclpy's own deserialization for any event
(hypothesis), a clear WireError (never another exception) for damaged bytes, and a bus that
counts a malformed batch from the wire and keeps delivering."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.wire import WireError, decode_event_batch

text = st.text(max_size=12)
events = st.builds(
    Event, type=st.text(min_size=1, max_size=12), source=text, payload=st.binary(max_size=64),
    id=st.text(min_size=1, max_size=12), timestamp_ms=st.integers(0, 2**63 - 1),
    metadata=st.dictionaries(text, text, max_size=3),
    confidence=st.floats(0.0, 1.0, width=32), tags=st.lists(text, max_size=3),
    priority=st.integers(-2**31, 2**31 - 1), privacy=st.sampled_from(list(Privacy)),
    frame_id=text)


def serialized(batch_events, bus_id=0, first_seq=0, frame_id=''):
    from rclpy.serialization import serialize_message

    from loom_msgs.msg import EventBatch
    batch = EventBatch(bus_id=bus_id, first_seq=first_seq, events=[e.to_msg() for e in batch_events])
    batch.header.frame_id = frame_id
    return serialize_message(batch)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events, max_size=5), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), text)
def test_decodes_what_rclpy_decodes(batch_events, bus_id, first_seq, frame_id):
    from rclpy.serialization import deserialize_message

    from loom_msgs.msg import EventBatch
    data = serialized(batch_events, bus_id, first_seq, frame_id)
    got_bus, got_seq, got = decode_event_batch(data)
    reference = deserialize_message(data, EventBatch)
    assert (got_bus, got_seq) == (reference.bus_id, reference.first_seq) == (bus_id, first_seq)
    assert got == [Event.from_msg(m) for m in reference.events]


def test_skips_batches_from_this_process_after_the_header():
    data = serialized([Event(type='a')], bus_id=42)
    assert decode_event_batch(data, skip_bus_ids={42}) is None
    assert decode_event_batch(data, skip_bus_ids={7})[0] == 42


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_damaged_bytes_give_a_wire_error(data):
    good = bytearray(serialized([Event(type='t', payload=b'xy', tags=['a'], metadata={'k': 'v'}),
                                 Event(type='u')], bus_id=1))
    cut = data.draw(st.integers(0, len(good) - 1))
    with pytest.raises(WireError):
        decode_event_batch(bytes(good[:cut]))   # every truncation is refused, not misread
    spot = data.draw(st.integers(4, len(good) - 4))
    good[spot:spot + 4] = struct.pack('<I', data.draw(st.integers(2**20, 2**32 - 1)))
    try:
        decode_event_batch(bytes(good))          # a wild length or count: refused, or harmless
    except WireError:
        pass


def test_bus_counts_a_malformed_batch_and_keeps_delivering(ros, bus):
    from rclpy.node import Node

    from loom_msgs.msg import EventBatch
    from loom_ros.bus.event import RejectReason
    from loom_ros.bus.qos import to_qos_profile
    got = []
    bus.subscribe('wire.test', lambda e, t: got.append(e.id), 'batched')
    node = Node('wire_sender', context=ros.node.context)
    try:
        pub = node.create_publisher(EventBatch, 'loom/wire/test', to_qos_profile('batched'))
        ros.wait_for(lambda: pub.get_subscription_count() >= 1, 'the bus subscription')
        pub.publish(b'\x00\x01\x00\x00' + b'\xff' * 12)       # a CDR header, then garbage
        pub.publish(serialized([Event(type='ok', id='after')], bus_id=9))
        ros.wait_for(lambda: got == ['after'], 'the good batch after the bad one')
        assert bus.stats.rejected[RejectReason.BAD_FIELD.value] == 1
    finally:
        node.destroy_node()
