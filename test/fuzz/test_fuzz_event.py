"""Fuzzing the Event edge (issue 13, standing test): any value in any field gives a valid Event or
an EventRejected, never another exception, and an accepted event is within every bound and
serializable. Deterministic (derandomize) so CI sees the same examples every run."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_ros.bus import event as ev
from loom_ros.bus.event import Event, EventRejected, Privacy

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

long_text = st.builds(lambda c, n: c * n, st.characters(), st.integers(0, 50_000))
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
                   st.just(10**400), st.floats(), st.text(max_size=20), long_text,
                   st.binary(max_size=20))
anything = st.recursive(scalar, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=10)
strings = st.one_of(st.text(max_size=30), long_text)
FIELDS = {
    'type': st.one_of(strings, anything), 'id': st.one_of(strings, anything),
    'source': st.one_of(strings, anything), 'frame_id': st.one_of(strings, anything),
    'payload': st.one_of(st.binary(max_size=64), anything),
    'timestamp_ms': st.one_of(st.integers(-2**64, 2**64), anything),
    'metadata': st.one_of(st.dictionaries(strings, strings, max_size=5),
                          st.dictionaries(st.text(max_size=4), st.text(max_size=4), min_size=60,
                                          max_size=70), anything),
    'confidence': st.one_of(st.floats(), anything), 'tags': st.one_of(st.lists(strings), anything),
    'priority': st.one_of(st.integers(-2**40, 2**40), anything),
    'privacy': st.one_of(st.sampled_from(list(Privacy)), st.integers(-3, 9), anything),
}


def _within_bounds(event: Event) -> None:
    assert 0 < len(event.id) <= ev.MAX_ID_CHARS and 0 < len(event.type) <= ev.MAX_TYPE_CHARS
    assert len(event.source) <= ev.MAX_NAME_CHARS and len(event.frame_id) <= ev.MAX_NAME_CHARS
    assert len(event.metadata) <= ev.MAX_METADATA_ITEMS and len(event.tags) <= ev.MAX_TAGS


@FUZZ
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_validate_accepts_or_rejects_anything(fields):
    event = Event(**{'type': 'fuzz', **fields})
    try:
        event.validate()
    except EventRejected as exc:
        assert len(str(exc)) < 1024   # a refusal never quotes a huge value
        return
    _within_bounds(event)


@FUZZ
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_from_dict_accepts_or_rejects_anything(fields):
    try:
        Event.from_dict(fields).validate()
    except EventRejected:
        pass


msg_text = st.one_of(st.text(max_size=20), st.builds(lambda n: 'x' * n, st.integers(0, 5000)))


@settings(FUZZ, max_examples=150)
@given(st.fixed_dictionaries({
    'id': msg_text, 'type': msg_text, 'source': msg_text, 'frame': msg_text,
    'ts': st.integers(0, 2**64 - 1), 'conf': st.floats(width=32),
    'metadata': st.lists(st.tuples(msg_text, msg_text), max_size=80),
    'tags': st.lists(msg_text, max_size=80), 'priority': st.integers(-2**31, 2**31 - 1),
    'privacy': st.integers(0, 255), 'payload': st.binary(max_size=64)}))
def test_from_msg_accepts_or_rejects_any_message(f):
    """Everything a DDS peer can put in a loom_msgs/Event."""
    from loom_msgs.msg import Event as EventMsg
    from loom_msgs.msg import KeyValue
    from rclpy.serialization import serialize_message
    msg = EventMsg(id=f['id'], type=f['type'], source=f['source'], timestamp_ms=f['ts'],
                   confidence=f['conf'], tags=f['tags'], priority=f['priority'],
                   privacy=f['privacy'], payload=f['payload'],
                   metadata=[KeyValue(key=k, value=v) for k, v in f['metadata']])
    msg.header.frame_id = f['frame']
    try:
        event = Event.from_msg(msg).validate()
    except EventRejected:
        return
    _within_bounds(event)
    serialize_message(event.to_msg())   # an accepted event can always be sent on
