"""Fuzzing the CDR EventBatch reader (issue 13, standing test): arbitrary bytes and damaged
valid encodings give a result or a WireError, never another exception; whatever it returns,
the bus's validation then accepts or rejects with EventRejected."""
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_ros.bus.event import Event, EventRejected, Privacy
from loom_ros.bus.wire import WireError, decode_event_batch

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

text = st.text(max_size=12)
events = st.builds(
    Event, type=st.text(min_size=1, max_size=12), source=text, payload=st.binary(max_size=32),
    id=st.text(min_size=1, max_size=12), timestamp_ms=st.integers(0, 2**63 - 1),
    metadata=st.dictionaries(text, text, max_size=3), confidence=st.floats(0.0, 1.0, width=32),
    tags=st.lists(text, max_size=3), priority=st.integers(-2**31, 2**31 - 1),
    privacy=st.sampled_from(list(Privacy)), frame_id=text)


def _serialized(batch_events, bus_id=1, first_seq=1):
    from rclpy.serialization import serialize_message

    from loom_msgs.msg import EventBatch
    return serialize_message(EventBatch(bus_id=bus_id, first_seq=first_seq,
                                        events=[e.to_msg() for e in batch_events]))


def _decode_and_validate(data: bytes) -> None:
    try:
        decoded = decode_event_batch(data)
    except WireError:
        return
    assert decoded is not None
    for event in decoded[2]:
        try:
            event.validate()
        except EventRejected:
            pass


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data):
    _decode_and_validate(data)


@FUZZ
@given(st.binary(max_size=256))
def test_arbitrary_bytes_behind_a_valid_header(tail):
    _decode_and_validate(b'\x00\x01\x00\x00' + tail)


@FUZZ
@given(st.lists(events, min_size=1, max_size=3), st.integers(0, 2**32 - 1),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       st.sampled_from(['flip', 'truncate', 'insert', 'u32']))
def test_damaged_valid_encodings(batch_events, seed, edits, how):
    data = bytearray(_serialized(batch_events))
    rng = random.Random(seed)
    for pos, value in edits:
        pos %= len(data)
        if how == 'flip':
            data[pos] = value
        elif how == 'truncate':
            del data[pos:]
            break
        elif how == 'insert':
            data[pos:pos] = bytes([value])
        else:   # a length or count turned huge or odd
            data[pos:pos + 4] = rng.choice([b'\xff\xff\xff\xff', b'\xff\xff\xff\x7f',
                                            b'\x00\x00\x00\x80', b'\x01\x00\x00\x00'])
        if len(data) < 4:
            break
    _decode_and_validate(bytes(data))
