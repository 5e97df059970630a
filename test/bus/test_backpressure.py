"""Semantics of each backpressure policy, as properties: what is kept, in what order, and that
the counters always add up."""
import json
import threading

import pytest
from hypothesis import given, settings, strategies as st

from loom_ros.bus.backpressure import (
    BackpressurePolicy, DeliveryQueue, Flow, FlowCounters, PolicyError, fold,
)
from loom_ros.bus.event import Event, Privacy


def events(n, **kw):
    return [Event.with_json('imu', {'i': i, 'v': [i, 2 * i], 'name': f'e{i}'}, id=f'id{i}',
                            tags=[f't{i % 3}'], priority=i % 4, **kw) for i in range(n)]


def run(policy, items, times=None):
    flow = Flow(policy)
    out = []
    for i, event in enumerate(items):
        got = flow.offer(event, times[i] if times else float(i))
        if got is not None:
            out.append(got)
    return flow, out


@given(n=st.integers(0, 300), every=st.integers(1, 20))
def test_sampling_keeps_one_of_n_in_order(n, every):
    flow, out = run(BackpressurePolicy(sample_every=every), events(n))
    assert [e.id for e in out] == [f'id{i}' for i in range(0, n, every)]
    c = flow.counters
    assert c.received == n and c.passed == len(out) and c.sampled_out == n - len(out)


@given(gaps=st.lists(st.floats(0.0, 0.5, allow_nan=False), max_size=300),
       rate=st.floats(1.0, 200.0))
def test_rate_limit_never_exceeds_the_rate_and_counts_the_rest(gaps, rate):
    times, t = [], 0.0
    for gap in gaps:
        t += gap
        times.append(t)
    flow, out = run(BackpressurePolicy(max_rate_hz=rate), events(len(times)), times)
    kept_times = [times[int(e.id[2:])] for e in out]
    assert all(b - a >= 1.0 / rate for a, b in zip(kept_times, kept_times[1:]))
    assert flow.counters.rate_limited + flow.counters.passed == len(times)
    if times:
        assert len(out) <= (times[-1] - times[0]) * rate + 1


@given(n=st.integers(0, 200), window=st.integers(1, 25),
       reducer=st.sampled_from(['latest', 'mean', 'merge_tags', 'count']))
def test_count_windows_fold_every_event_exactly_once(n, window, reducer):
    flow, out = run(BackpressurePolicy(aggregate_count=window, reducer=reducer), events(n))
    assert len(out) == n // window
    assert [int(e.metadata['loom.folded']) for e in out] == [window] * (n // window)
    assert [e.metadata['loom.first_id'] for e in out] == [f'id{i}' for i in range(0, n - window + 1, window)][:len(out)]
    c = flow.counters
    assert c.folded == window * len(out) and c.aggregates == len(out)
    assert c.received == c.folded + len(flow._window)  # the rest waits in the open window


def test_reducers():
    window = events(4)
    mean = fold(window, 'mean')
    assert mean.json() == {'i': 1.5, 'v': [1.5, 3.0], 'name': 'e3'}
    assert fold(window, 'latest').json()['i'] == 3
    assert fold(window, 'merge_tags').tags == ['t0', 't1', 't2']
    assert fold(window, 'count').json() == {'count': 4, 'types': {'imu': 4}}
    assert all(fold(window, r).priority == 3 for r in ('latest', 'mean'))
    mixed = window + [Event(type='imu', payload=b'\xff not json', privacy=Privacy.PRIVATE)]
    folded = fold(mixed, 'mean')
    assert folded.metadata['loom.mean_skipped'] == '1' and folded.json()['i'] == 1.5
    assert folded.privacy is Privacy.PRIVATE  # as private as its most private part


def test_a_fold_keeps_stated_privacy_and_the_subjects_of_its_parts():
    """A fold is as private as its most private part, privacy stated in metadata included, and
    names the data subject of its parts: one subject is kept even when the latest part is
    anonymous; several become '..', which no consent check accepts (erasure and consent of each
    would otherwise lose the others' share)."""
    stated = Event(type='imu', payload=b'{"i": 1}', metadata={'privacy': 'local_only'})
    anonymous = Event(type='imu', payload=b'{"i": 2}')
    alice = Event(type='imu', payload=b'{"i": 3}', metadata={'loom.subject': 'alice'})
    bob = Event(type='imu', payload=b'{"i": 4}', metadata={'loom.subject': 'bob'})
    for reducer in ('latest', 'mean', 'count', 'merge_tags'):
        assert fold([stated, anonymous], reducer).privacy is Privacy.LOCAL_ONLY
        assert fold([alice, anonymous], reducer).metadata['loom.subject'] == 'alice'
        assert fold([alice, bob, anonymous], reducer).metadata['loom.subject'] == '..'
        assert 'loom.subject' not in fold([anonymous, stated], reducer).metadata
    assert alice.metadata == {'loom.subject': 'alice'}   # the parts are not changed


def test_time_window_closes_on_arrival_or_on_flush():
    flow = Flow(BackpressurePolicy(aggregate_window_s=1.0, reducer='count'))
    assert flow.offer(events(1)[0], 0.0) is None
    assert flow.offer(events(1)[0], 0.5) is None
    assert flow.flush_due(0.9) is None
    closed = flow.flush_due(1.0)
    assert closed.json()['count'] == 2 and flow.flush_due(5.0) is None
    flow.offer(events(1)[0], 2.0)
    assert flow.offer(events(1)[0], 3.5).json()['count'] == 2  # the late arrival closes it


@given(n=st.integers(0, 200), size=st.integers(1, 30))
def test_drop_oldest_keeps_the_newest_in_order(n, size):
    counters = FlowCounters()
    queue = DeliveryQueue(BackpressurePolicy(queue='drop_oldest', queue_size=size), counters)
    for event in events(n):
        assert queue.put(event)
    kept = []
    while len(queue):
        kept.append(queue.get().id)
    assert kept == [f'id{i}' for i in range(max(0, n - size), n)]
    assert counters.dropped_oldest == max(0, n - size)
    assert counters.queue_high_water == min(n, size)


def test_keep_all_blocks_for_room_then_refuses_and_counts():
    counters = FlowCounters()
    policy = BackpressurePolicy(queue='keep_all', queue_size=2, block_timeout_s=0.05)
    queue = DeliveryQueue(policy, counters)
    a, b, c, d = events(4)
    assert queue.put(a) and queue.put(b)
    assert not queue.put(c)  # nobody consumed within the timeout: refused, not buffered
    assert counters.overflow == 1 and len(queue) == 2
    # A consumer that makes room lets a blocked producer through, nothing lost.
    taken = threading.Event()
    slow = DeliveryQueue(BackpressurePolicy(queue='keep_all', queue_size=2, block_timeout_s=60),
                         counters)
    slow.put(a)
    slow.put(b)
    consumer = threading.Thread(target=lambda: (slow.get(), taken.set()))
    consumer.start()
    assert slow.put(d)  # waits until the consumer took one
    consumer.join()
    assert taken.is_set() and [slow.get().id, slow.get().id] == ['id1', 'id3']
    assert counters.overflow == 1


@pytest.mark.parametrize('text, message', [
    ('sample_every:0', 'sample_every must be an integer >= 1'),
    ('queue:lifo', 'queue must be one of inline, drop_oldest, keep_all'),
    ('reducer:median', 'reducer must be one of'),
    ('max_rate_hz:fast', "max_rate_hz: 'fast' is not a float"),
    ('colour:red', 'expected key:value with key one of'),
    ('queue_size:0', 'queue_size must be an integer >= 1'),
])
def test_bad_policies_are_refused_with_the_setting(text, message):
    with pytest.raises(PolicyError, match=message):
        BackpressurePolicy.parse(text)


def test_policy_parses_from_config_text():
    policy = BackpressurePolicy.parse('sample_every:10, queue:drop_oldest, queue_size:50, '
                                      'max_rate_hz:2.5')
    assert (policy.sample_every, policy.queue, policy.queue_size, policy.max_rate_hz) == (
        10, 'drop_oldest', 50, 2.5)
    assert BackpressurePolicy.parse('').is_passthrough
