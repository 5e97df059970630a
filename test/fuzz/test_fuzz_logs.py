"""Fuzzing log masking (issue 13, standing test): any text, any nested value, any event gives a
bounded masked result and never an exception."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_ros.bus.event import Event, Privacy
from loom_ros.telemetry import logs

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pieces = st.sampled_from(['password', '=', ': ', '"', 'token', 'eyJ', '.', '@', 'a', 'sk-',
                          'Bearer ', ' ', '\n', 'x' * 300, '-', 'api_key'])
hostile = st.builds(lambda parts, n: ''.join(parts) * n, st.lists(pieces, max_size=8),
                    st.integers(1, 300))
value = st.recursive(st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=8),
                               st.text(max_size=30), hostile),
                     lambda c: st.lists(c, max_size=70) | st.dictionaries(
                         st.one_of(st.text(max_size=10), hostile), c, max_size=70),
                     max_leaves=80)


@FUZZ
@given(st.one_of(st.text(), hostile))
def test_mask_text_is_bounded(text):
    assert len(logs.mask_text(text)) <= logs.MAX_TEXT_CHARS + 64


@settings(FUZZ, max_examples=80)
@given(value, st.one_of(st.none(), st.text(max_size=20)))
def test_mask_value_never_raises(data, name):
    logs.mask_value(data, name)


@FUZZ
@given(hostile, hostile, st.sampled_from(list(Privacy)))
def test_mask_event_never_raises(ident, text, privacy):
    logs.mask_event(Event(type=text, id=ident, source=text, payload=text.encode(),
                          metadata={text: ident}, tags=[text], privacy=privacy))
