"""The Event dataclass: validation reasons, and lossless conversion to and from loom_msgs/Event."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from loom_ros.bus.event import Event, EventRejected, Privacy, RejectReason


def full_event(**overrides):
    fields = dict(id='evt-1', type='face.detected', timestamp_ms=1_732_000_000_123,
                  source='camera_front', metadata={'traceparent': '00-ab-cd-01', 'model': 'fd'},
                  payload=b'\x00\x01binary\xff', confidence=0.92, tags=['face', 'front'],
                  priority=5, privacy=Privacy.SENSITIVE, frame_id='camera_optical')
    fields.update(overrides)
    return Event(**fields)


def test_msg_round_trip_keeps_every_seed_field():
    event = full_event()
    msg = event.to_msg()
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1_732_000_000, 123_000_000)
    assert msg.header.frame_id == 'camera_optical'
    back = Event.from_msg(msg)
    assert back == event  # confidence is float32 on the wire, and 0.92 comes back as 0.92


@given(payload=st.binary(max_size=2048),
       confidence=st.floats(0.0, 1.0, width=32),
       priority=st.integers(-2**31, 2**31 - 1),
       tags=st.lists(st.text(max_size=8), max_size=4),
       metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=4),
       privacy=st.sampled_from(list(Privacy)))
def test_round_trip_property(payload, confidence, priority, tags, metadata, privacy):
    event = full_event(payload=payload, confidence=confidence, priority=priority, tags=tags,
                       metadata=metadata, privacy=privacy)
    back = Event.from_msg(event.to_msg()).validate()
    assert np.float32(back.confidence) == np.float32(confidence)  # same float32 on the wire
    back.confidence = confidence
    assert back == event


@pytest.mark.parametrize('overrides, reason', [
    (dict(id=''), RejectReason.MISSING_ID),
    (dict(id=None), RejectReason.MISSING_ID),
    (dict(type=''), RejectReason.MISSING_TYPE),
    (dict(confidence=math.nan), RejectReason.BAD_CONFIDENCE),
    (dict(confidence=math.inf), RejectReason.BAD_CONFIDENCE),
    (dict(confidence=1.5), RejectReason.BAD_CONFIDENCE),
    (dict(confidence='high'), RejectReason.BAD_CONFIDENCE),
    (dict(payload='text, not bytes'), RejectReason.BAD_FIELD),
    (dict(payload=b'x' * 101), RejectReason.OVERSIZE_PAYLOAD),
    (dict(priority=2**31), RejectReason.BAD_FIELD),
    (dict(priority=1.5), RejectReason.BAD_FIELD),
    (dict(timestamp_ms=-1), RejectReason.BAD_FIELD),
    (dict(metadata={'k': 1}), RejectReason.BAD_FIELD),
    (dict(tags='face'), RejectReason.BAD_FIELD),
    (dict(privacy=9), RejectReason.BAD_FIELD),
    (dict(source=3), RejectReason.BAD_FIELD),
])
def test_bad_events_are_refused_with_a_reason(overrides, reason):
    with pytest.raises(EventRejected) as info:
        full_event(**overrides).validate(max_payload_bytes=100)
    assert info.value.reason is reason
    assert str(info.value).startswith(reason.value + ':')


def test_numpy_float_confidence_is_accepted():
    assert full_event(confidence=np.float32(0.5)).validate().confidence == 0.5


def test_from_dict_for_hand_written_events():
    event = Event.from_dict({'type': 'cmd', 'payload': {'say': 'hi'}, 'privacy': 'local_only'})
    assert event.json() == {'say': 'hi'} and event.privacy is Privacy.LOCAL_ONLY
    with pytest.raises(EventRejected, match='unknown event fields: colour'):
        Event.from_dict({'type': 'x', 'colour': 'red'})
    with pytest.raises(EventRejected, match='privacy must be one of'):
        Event.from_dict({'type': 'x', 'privacy': 'secret'})


def test_fast_conversion_equals_the_public_message_api():
    from loom_ros.bus.event import _fast_to_msg_ok
    assert _fast_to_msg_ok()  # else to_msg quietly uses the slower public path
    event = full_event()
    assert event.to_msg() == event._to_msg_public()
