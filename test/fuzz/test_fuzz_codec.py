"""Fuzzing the bridge codec (issue 13, standing test): any Zenoh sample, arbitrary bytes, a
damaged valid sample or a hostile JSON header, gives a valid Event or an EventRejected, never
another exception; an accepted event is serializable for the robot's bus."""
import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_ros.bridge import codec
from loom_ros.bus.event import Event, EventRejected, Privacy

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.just(10**400), st.floats(),
              st.text(max_size=20), st.builds(lambda n: 'x' * n, st.integers(0, 20_000))),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12)
KEYS = ('id', 'type', 'ts', 'src', 'md', 'conf', 'tags', 'pri', 'prv', 'frame')
good = {'id': 'e1', 'type': 'cmd', 'ts': 1, 'src': '', 'md': {}, 'conf': 1.0, 'tags': [],
        'pri': 0, 'prv': 0, 'frame': ''}


def _sample(header: bytes, payload: bytes = b'') -> bytes:
    return struct.pack('>BI', codec.VERSION, len(header)) + header + payload


def _decode(data: bytes) -> None:
    from rclpy.serialization import serialize_message
    try:
        event = codec.decode(data)
    except EventRejected:
        return
    serialize_message(event.to_msg())


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data):
    _decode(data)
    _decode(_sample(data))


@FUZZ
@given(st.fixed_dictionaries({}, optional={k: json_value for k in KEYS}), st.booleans(),
       st.binary(max_size=32))
def test_hostile_headers(fields, over_good, payload):
    header = json.dumps({**good, **fields} if over_good else fields).encode()
    _decode(_sample(header, payload))


@FUZZ
@given(st.integers(1, 300_000), st.sampled_from([b'[', b'{"a":', b'{"id":[']),
       st.sampled_from([b'', b'{', b'[', b'{"id":"\\ud800","type":"x"}']))
def test_deep_nesting_and_surrogates(depth, opener, prefix):
    _decode(_sample(prefix + opener * depth))


@FUZZ
@given(st.builds(Event, type=st.text(min_size=1, max_size=12), id=st.text(min_size=1, max_size=12),
                 metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
                 payload=st.binary(max_size=16), privacy=st.sampled_from(list(Privacy))),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       st.booleans())
def test_damaged_valid_samples(event, edits, truncate):
    data = bytearray(codec.encode(event))
    for pos, value in edits:
        pos %= len(data)
        if truncate:
            del data[pos:]
            break
        data[pos] = value
    _decode(bytes(data))
