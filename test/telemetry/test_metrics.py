"""Metrics: percentiles against numpy on known inputs, counters and rates, bus counters, the
Prometheus endpoint over real HTTP, and the Metrics message round trip."""
from __future__ import annotations

import math
import urllib.request

import numpy
import pytest

from harness import free_port
from loom_ros.telemetry.metrics import (
    COUNTER, GAUGE, HISTOGRAM, Histogram, MetricsRegistry, ResourceSampler, Sketch, from_msg,
    serve_prometheus, stop_serving, to_msg,
)

PRECISION = 0.01


@pytest.mark.parametrize('name, values', [
    ('uniform', numpy.random.default_rng(1).uniform(0.1, 50.0, 20000)),
    ('lognormal latencies', numpy.random.default_rng(2).lognormal(0.0, 1.5, 50000)),
    ('heavy tail', numpy.concatenate([numpy.full(9900, 2.0), numpy.linspace(100, 5000, 100)])),
    ('integers 1..1000', numpy.arange(1, 1001, dtype=float)),
    ('with zeros', numpy.concatenate([numpy.zeros(300), numpy.arange(1, 701, dtype=float)])),
])
def test_quantiles_match_numpy_within_the_relative_error(name, values):
    sketch = Sketch(PRECISION)
    for v in values:
        sketch.add(float(v))
    assert sketch.count == len(values)
    assert sketch.max == values.max() and sketch.min == values.min()
    assert sketch.sum == pytest.approx(values.sum())
    for q in (0.01, 0.25, 0.5, 0.9, 0.99, 0.999):
        exact = numpy.percentile(values, q * 100, method='lower')
        assert sketch.quantile(q) == pytest.approx(exact, rel=PRECISION, abs=1e-12), (name, q)
    assert sketch.quantile(1.0) == values.max()


def test_histogram_reports_the_period_then_resets_and_keeps_the_total():
    hist = Histogram()
    for v in range(1, 101):
        hist.record(float(v))
    snap = hist.snapshot()
    assert snap['count'] == 100 and snap['max'] == 100.0
    assert snap['p50'] == pytest.approx(50, rel=PRECISION)
    assert snap['p99'] == pytest.approx(99, rel=PRECISION)
    assert snap['mean'] == pytest.approx(50.5)
    empty = hist.snapshot()
    assert empty['count'] == 0 and math.isnan(empty['p50'])
    assert hist.total.count == 100


def test_a_sketch_refuses_bad_arguments():
    with pytest.raises(ValueError, match='precision'):
        Sketch(0.0)
    sketch = Sketch()
    assert math.isnan(sketch.quantile(0.5))
    sketch.add(1.0)
    with pytest.raises(ValueError, match='quantile'):
        sketch.quantile(1.5)


def test_counters_give_rates_between_snapshots():
    reg = MetricsRegistry('/n')
    reg.inc('events_published', 10, topic='a.b')
    reg.snapshot(now=100.0)
    reg.inc('events_published', 50, topic='a.b')
    reg.set_total('events_received', 7, topic='a.b')
    reg.set_gauge('queue_depth', 3, subscription='a.*')
    reg.histogram('handle_latency_ms', topic='a.b').record(2.0)
    samples = {(s.name, tuple(s.labels.items())): s for s in reg.snapshot(now=102.0)}
    pub = samples[('events_published', (('topic', 'a.b'),))]
    assert pub.kind == COUNTER and pub.value == 60 and pub.rate == pytest.approx(25.0)
    assert samples[('events_received', (('topic', 'a.b'),))].rate == pytest.approx(3.5)
    assert samples[('queue_depth', (('subscription', 'a.*'),))].kind == GAUGE
    lat = samples[('handle_latency_ms', (('topic', 'a.b'),))]
    assert lat.kind == HISTOGRAM and lat.count == 1 and lat.p50 == pytest.approx(2.0, rel=0.01)


def test_resource_sampler_reads_this_process():
    reg = MetricsRegistry()
    reg.collectors.append(ResourceSampler())
    sum(i * i for i in range(200000))  # some CPU
    names = {s.name: s.value for s in reg.snapshot()}
    assert names['process_rss_bytes'] > 10 * 2**20
    assert names['process_threads'] >= 1
    assert names['process_cpu_percent'] >= 0.0


def test_prometheus_endpoint_serves_counters_gauges_and_quantiles():
    reg = MetricsRegistry('/robot1/agent')
    reg.set_total('events_published', 42, topic='camera.front')
    reg.set_gauge('queue_depth', 5, subscription='camera.**')
    hist = reg.histogram('handle_latency_ms', topic='camera.front')
    for v in range(1, 101):
        hist.record(float(v))
    port = serve_prometheus(reg, free_port(), addr='127.0.0.1')
    try:
        text = urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10).read().decode()
    finally:
        stop_serving(reg)
    assert 'loom_events_published_total{node="/robot1/agent",topic="camera.front"} 42.0' in text
    assert 'loom_queue_depth{node="/robot1/agent",subscription="camera.**"} 5.0' in text
    assert 'loom_handle_latency_ms_count{node="/robot1/agent",topic="camera.front"} 100.0' in text
    p99 = next(line for line in text.splitlines()
               if line.startswith('loom_handle_latency_ms{') and 'quantile="0.99"' in line)
    assert float(p99.split()[-1]) == pytest.approx(99.0, rel=PRECISION)


def test_metrics_message_round_trip():
    reg = MetricsRegistry('/n')
    reg.set_total('events_published', 3, topic='x.y')
    reg.histogram('handle_latency_ms', topic='x.y').record(1.5)
    samples = reg.snapshot()
    msg = to_msg('/n', 1.0, samples)
    assert msg.node == '/n' and len(msg.samples) == len(samples)
    back = from_msg(msg)
    assert [(s.name, s.kind, s.labels, s.count) for s in back] == \
        [(s.name, s.kind, s.labels, s.count) for s in samples]


def test_bus_counters_and_latency_histograms_from_a_real_bus(bus):
    from loom_ros.bus.event import Event
    from loom_ros.telemetry.metrics import BusMetrics
    reg = MetricsRegistry('/loom_test')
    reg.collectors.append(BusMetrics(bus))
    bus.metrics = reg
    got = []
    bus.subscribe('telemetry.probe', lambda e, t: got.append(e), 'realtime')
    reg.snapshot(now=0.0)
    for i in range(50):
        bus.publish('telemetry.probe', Event(type='probe'), 'realtime')
    assert len(got) == 50
    samples = {(s.name, tuple(s.labels.values())): s for s in reg.snapshot(now=2.0)}
    assert samples[('events_published', ('telemetry.probe',))].rate == pytest.approx(25.0)
    assert samples[('events_received', ('telemetry.probe',))].value == 50
    assert samples[('events_dropped', ('telemetry.probe',))].value == 0
    latency = samples[('handle_latency_ms', ('telemetry.probe',))]
    assert latency.count == 50 and 0 <= latency.p50 <= latency.p99 <= latency.max


def test_recorded_values_fold_in_batches_and_read_as_if_added_one_by_one():
    from loom_ros.telemetry.metrics import FOLD_AT
    values = numpy.concatenate([numpy.zeros(50), numpy.random.default_rng(3).lognormal(
        0.0, 1.5, 2 * FOLD_AT + 7)])
    hist, one_by_one = Histogram(PRECISION), Sketch(PRECISION)
    for v in values:
        hist.record(float(v))
        one_by_one.add(float(v))
    assert hist.period.count == 2 * FOLD_AT   # folded at FOLD_AT; the rest waits for a read
    merged = hist.cumulative()                # a read folds what waits
    assert merged.count == one_by_one.count == len(values)
    assert merged.zeros == one_by_one.zeros == 50
    assert (merged.min, merged.max) == (one_by_one.min, one_by_one.max)
    assert merged.sum == pytest.approx(one_by_one.sum)
    for q in (0.01, 0.5, 0.9, 0.99):
        exact = numpy.percentile(values, q * 100, method='lower')
        assert merged.quantile(q) == pytest.approx(exact, rel=PRECISION, abs=1e-12)
    snap = hist.snapshot()
    assert snap['count'] == len(values) and hist.total.count == len(values)


def test_a_value_that_is_not_finite_is_left_out_of_a_batch():
    for pad in (0, Sketch.VECTOR_AT):   # a short batch (a loop) and a long one (numpy)
        sketch = Sketch(PRECISION)
        sketch.add_many([1.0, math.nan, 2.0, math.inf, -math.inf] + [0.0] * pad)
        assert sketch.count == 2 + pad and sketch.sum == 3.0
        assert (sketch.min, sketch.max) == ((0.0, 2.0) if pad else (1.0, 2.0))


def test_short_and_long_batches_fill_the_same_buckets():
    """A batch under VECTOR_AT values is added in a loop, a longer one with numpy: the same
    counts, sums, extremes and quantiles either way (a node with 1,000 topics folds 2,000
    histograms of a few values each per period, where numpy's cost per call dominated)."""
    rng = numpy.random.default_rng(3)
    values = numpy.concatenate([rng.lognormal(0.0, 2.0, 5000), [0.0, 1e-12, 5.0]]).tolist()
    short, long = Sketch(PRECISION), Sketch(PRECISION)
    step = Sketch.VECTOR_AT - 1
    for i in range(0, len(values), step):
        short.add_many(values[i:i + step])
    long.add_many(values)
    assert (short.count, short.zeros, short.min, short.max) == \
        (long.count, long.zeros, long.min, long.max)
    assert short.sum == pytest.approx(long.sum)
    differ = sum(abs(short.buckets.get(k, 0) - long.buckets.get(k, 0))
                 for k in set(short.buckets) | set(long.buckets))
    assert differ <= 2   # at most a value on a bucket edge, where libm's and numpy's log differ
    for q in (0.01, 0.5, 0.9, 0.99):
        assert short.quantile(q) == pytest.approx(long.quantile(q), rel=2 * PRECISION)


def test_a_topics_delivery_histograms_record_together_and_read_apart():
    reg = MetricsRegistry('/n')
    apart = reg.histogram('handle_latency_ms', topic='made.first')   # its own lock
    for topic in ('a.b', 'made.first'):
        pair = reg.delivery_histograms(topic)
        assert reg.delivery_histograms(topic) is pair
        for v in range(1, 1001):
            pair.record(float(v), 2.0 * v)
    assert reg.histogram('handle_latency_ms', topic='made.first') is apart
    samples = {(s.name, s.labels['topic']): s for s in reg.snapshot()}
    for topic in ('a.b', 'made.first'):
        handle, age = samples[('handle_latency_ms', topic)], samples[('event_age_ms', topic)]
        assert handle.count == age.count == 1000
        assert handle.max == 1000.0 and age.max == 2000.0
        assert handle.p50 == pytest.approx(500, rel=PRECISION)
        assert age.p50 == pytest.approx(1000, rel=PRECISION)


def test_topics_past_max_topics_share_one_series_and_their_totals_only_grow(bus):
    """A publisher chooses topic names: a node keeps series for max_topics of them and sums
    the rest under OTHER_TOPICS, counts and latencies both, nothing lost from the sums."""
    from loom_ros.bus.event import Event
    from loom_ros.telemetry.metrics import OTHER_TOPICS, BusMetrics
    reg = MetricsRegistry('/loom_test', max_topics=3)
    reg.collectors.append(BusMetrics(bus))
    bus.metrics = reg
    got = []
    topics = [f'cap.t{i}' for i in range(10)]
    for topic in topics:   # in-process subscribers: delivered inside publish
        bus.subscribe(topic, lambda e, t: got.append(t), 'realtime')
    for round_ in range(2):
        for i, topic in enumerate(topics):
            for _ in range(i + 1):   # topic i gets i + 1 events a round
                bus.publish(topic, Event(type='probe'), 'realtime')
        samples = [s for s in reg.snapshot() if s.labels.get('topic', '').startswith(('cap.', '('))]
        labels = {s.labels['topic'] for s in samples}
        assert labels == {'cap.t0', 'cap.t1', 'cap.t2', OTHER_TOPICS}
        by = {(s.name, s.labels["topic"]): s for s in samples}
        for i in range(3):
            assert by[('events_published', f'cap.t{i}')].value == (round_ + 1) * (i + 1)
            assert by[('handle_latency_ms', f'cap.t{i}')].count == i + 1   # this period's
        other = sum(range(4, 11))   # topics 3..9
        assert by[('events_published', OTHER_TOPICS)].value == (round_ + 1) * other
        assert by[('events_received', OTHER_TOPICS)].value == (round_ + 1) * other
        assert by[('handle_latency_ms', OTHER_TOPICS)].count == other
        assert by[('event_age_ms', OTHER_TOPICS)].count == other
    assert len(got) == 2 * sum(range(1, 11))
    assert len(reg._delivery_cache) == 4   # three topics and the shared one, not ten


def test_max_topics_zero_sums_every_topic_into_one_series():
    reg = MetricsRegistry('/n', max_topics=0)
    for topic in ('a', 'b'):
        reg.delivery_histograms(topic).record(1.0, 2.0)
        reg.topic_histogram('x_ms', topic).record(3.0)
    samples = {(s.name, s.labels['topic']): s for s in reg.snapshot()}
    assert set(samples) == {('handle_latency_ms', '(other topics)'),
                            ('event_age_ms', '(other topics)'), ('x_ms', '(other topics)')}
    assert samples[('x_ms', '(other topics)')].count == 2


def test_subscriptions_past_max_topics_share_one_series(bus):
    from loom_ros.bus.event import Event
    from loom_ros.telemetry.metrics import OTHER_SUBSCRIPTIONS, BusMetrics
    reg = MetricsRegistry('/loom_test', max_topics=2)
    reg.collectors.append(BusMetrics(bus))
    for i in range(5):
        bus.subscribe(f'subcap.t{i}', lambda e, t: None, 'realtime')
        for _ in range(i + 1):
            bus.publish(f'subcap.t{i}', Event(type='probe'), 'realtime')
    delivered = {s.labels['subscription']: s.value for s in reg.snapshot()
                 if s.name == 'events_delivered' and 'subscription' in s.labels}
    mine = {k: v for k, v in delivered.items() if k.startswith('subcap.') or k.startswith('(')}
    own = sorted(k for k in mine if k.startswith('subcap.'))
    assert own == ['subcap.t0', 'subcap.t1'] and OTHER_SUBSCRIPTIONS in mine
    assert mine[OTHER_SUBSCRIPTIONS] == 3 + 4 + 5
    assert sum(mine.values()) == 15   # every delivery counted once, folded or not


def test_a_subscription_that_goes_away_keeps_its_counts_in_the_totals(bus):
    """Folded (and same-pattern) subscriptions are summed: one that goes away must not take
    its counts with it, or the counter would go back and Prometheus would read a reset."""
    from loom_ros.bus.event import Event
    from loom_ros.telemetry.metrics import OTHER_SUBSCRIPTIONS, BusMetrics
    reg = MetricsRegistry('/loom_test', max_topics=1)
    reg.collectors.append(BusMetrics(bus))
    subs = [bus.subscribe(f'gone.t{i}', lambda e, t: None, 'realtime') for i in range(3)]
    for i in range(3):
        for _ in range(10):
            bus.publish(f'gone.t{i}', Event(type='probe'), 'realtime')

    def delivered():
        return {s.labels['subscription']: s.value for s in reg.snapshot()
                if s.name == 'events_delivered' and 'subscription' in s.labels}
    assert delivered() == {'gone.t0': 10, OTHER_SUBSCRIPTIONS: 20}
    subs[2].close()
    bus.publish('gone.t1', Event(type='probe'), 'realtime')
    assert delivered() == {'gone.t0': 10, OTHER_SUBSCRIPTIONS: 21}   # 20 kept, one more
    subs[1].close()
    assert delivered() == {'gone.t0': 10, OTHER_SUBSCRIPTIONS: 21}


def test_topics_a_node_names_itself_keep_their_series_ahead_of_pattern_topics(ros, bus):
    """Topics reached through a pattern are anyone's to make: a flood of them delivered first
    cannot take the series of a topic the node subscribes to or publishes on by name."""
    from rclpy.node import Node

    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.event import Event
    from loom_ros.telemetry.metrics import OTHER_TOPICS, BusMetrics
    reg = MetricsRegistry('/loom_test', max_topics=3)
    reg.collectors.append(BusMetrics(bus))
    bus.metrics = reg
    bus.subscribe('own.in', lambda e, t: None, 'realtime')
    bus.publisher_for('own.out', 'realtime')
    flooder = Node('series_flooder', context=ros.node.context)
    other = EventBus(flooder)
    try:
        for i in range(4):
            other.publisher_for(f'flood.t{i}', 'realtime')
        sub = bus.subscribe('flood.*', lambda e, t: None, 'realtime')
        ros.wait_for(lambda: bus.refresh() is not None and len(sub.topics) == 4,
                     'the pattern to attach the flood topics')
        for i in range(4):   # delivered before any event of the node's own topics
            other.publish(f'flood.t{i}', Event(type='probe'), 'realtime')
        for topic in ('own.in', 'own.out'):
            bus.publish(topic, Event(type='probe'), 'realtime')
        samples = reg.snapshot()
        received = {s.labels['topic'] for s in samples if s.name == 'events_received'}
        handled = {s.labels['topic'] for s in samples if s.name == 'handle_latency_ms'}
        assert {'own.in', OTHER_TOPICS} <= received and {'own.in', OTHER_TOPICS} <= handled
        flood_named = {t for t in received | handled if t.startswith('flood.')}
        assert len(flood_named) == 1   # the one place the node's own topics left
        published = {s.labels['topic'] for s in samples if s.name == 'events_published'}
        assert 'own.out' in published
    finally:
        other.destroy()
        flooder.destroy_node()
