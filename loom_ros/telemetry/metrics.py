"""Metrics of a Loom node: counters with rates, gauges, and histograms with real percentiles,
per node and per topic; process resource use; export on `loom/metrics` and to Prometheus.

Histograms keep log-spaced buckets (the DDSketch scheme): bounded memory, O(1) record, and any
quantile within a known relative error (1% by default) of the true sample value, never an average.
Each histogram records into a sketch for the current period (reset when the node publishes its
metrics, so P50/P99/max describe the last period), folded at each reset into a sketch since start
(what Prometheus scrapes). Recording is on every bus delivery's path, so a value is only appended
to a short list, and the list is folded into the sketch FOLD_AT values at a time (with numpy) or
when the histogram is read: about a third of a per-value add.

The pure parts (Histogram, MetricsRegistry, BusMetrics, ResourceSampler, to_prometheus) need no
rclpy; `MetricsPublisher` is the thin ROS shell.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy

from loom_ros.telemetry import tracing

METRICS_TOPIC = 'loom/metrics'   # a plain ROS topic (loom_msgs/Metrics), not a Loom event topic

COUNTER, GAUGE, HISTOGRAM = 0, 1, 2   # loom_msgs/MetricSample kinds
# Values a histogram holds unfolded (bounded memory: 8 bytes each plus the list's).
FOLD_AT = 512
# Topics, and apart subscription patterns, with series of their own in one registry
# (telemetry.metrics.max_topics); later ones share the OTHER_TOPICS / OTHER_SUBSCRIPTIONS
# series. Topic names come from the bus, where publishers choose them: without a bound, a node
# kept and published a series set per topic ever seen (1,000 agents' topics and subscriptions:
# 11,000 series, 130 ms of its executor's thread every period).
MAX_TOPICS = 128
OTHER_TOPICS = '(other topics)'
OTHER_SUBSCRIPTIONS = '(other subscriptions)'


class Sketch:
    """Log-bucketed quantile sketch: relative error `precision` for values above `floor`."""

    __slots__ = ('_gamma', '_inv_log_gamma', '_floor', 'buckets', 'zeros', 'count', 'sum',
                 'min', 'max')

    def __init__(self, precision: float = 0.01, floor: float = 1e-9):
        if not 0.0 < precision < 1.0:
            raise ValueError(f'histogram precision must be in (0, 1), got {precision!r}')
        self._gamma = (1.0 + precision) / (1.0 - precision)
        self._inv_log_gamma = 1.0 / math.log(self._gamma)
        self._floor = floor
        self.buckets: dict[int, int] = {}
        self.zeros = 0     # values <= floor (reported as 0)
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, value: float) -> None:
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        if value <= self._floor:
            self.zeros += 1
        else:
            index = math.ceil(math.log(value) * self._inv_log_gamma)
            buckets = self.buckets
            buckets[index] = buckets.get(index, 0) + 1

    # Below this many values a loop of add() is cheaper than numpy's fixed cost per call (about
    # 80 us): a node with 1,000 topics folds 2,000 histograms of a few values each per period,
    # which took 267 ms of every second through numpy.
    VECTOR_AT = 64

    def add_many(self, values) -> None:
        """add() for each of `values`, vectorised when there are many. A value that is not
        finite (which no duration is) is left out rather than poisoning sum and the buckets."""
        if len(values) < self.VECTOR_AT:
            isfinite, add = math.isfinite, self.add
            for value in values:
                value = float(value)
                if isfinite(value):
                    add(value)
            return
        a = numpy.asarray(values, dtype=numpy.float64)
        if a.size and not numpy.isfinite(a).all():
            a = a[numpy.isfinite(a)]
        if not a.size:
            return
        self.count += int(a.size)
        self.sum += float(a.sum())
        self.min = min(self.min, float(a.min()))
        self.max = max(self.max, float(a.max()))
        above = a[a > self._floor]
        self.zeros += int(a.size - above.size)
        if above.size:
            index = numpy.ceil(numpy.log(above) * self._inv_log_gamma).astype(numpy.int64)
            buckets = self.buckets
            for i, n in zip(*(x.tolist() for x in numpy.unique(index, return_counts=True))):
                buckets[i] = buckets.get(i, 0) + n

    def merge(self, other: 'Sketch') -> None:
        """Add another sketch of the same precision (bucket counts add exactly)."""
        if other._gamma != self._gamma:
            raise ValueError('cannot merge sketches of different precision')
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.zeros += other.zeros
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float:
        """The value of rank floor(q * (count - 1)) (numpy's method='lower'), within the relative
        error; nan when empty. Results are clamped to the exact min and max."""
        if not self.count:
            return math.nan
        if not 0.0 <= q <= 1.0:
            raise ValueError(f'quantile must be in [0, 1], got {q!r}')
        if q == 1.0:
            return self.max
        if q == 0.0:
            return self.min
        rank = int(q * (self.count - 1))
        seen = self.zeros
        if rank < seen:
            return max(self.min, 0.0) if self.min <= self._floor else self.min
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen > rank:
                estimate = 2.0 * self._gamma ** index / (self._gamma + 1.0)
                return min(max(estimate, self.min), self.max)
        return self.max

    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan


class Histogram:
    """Thread-safe histogram: `record(value)`; `snapshot(reset_period=True)` for the period's
    count/P50/P99/max; `total` is the sketch since start. Recorded values wait in a list of at
    most FOLD_AT and are folded into the period's sketch together (see the module's docstring);
    every read folds them first."""

    def __init__(self, precision: float = 0.01, lock: threading.Lock | None = None):
        self.precision = precision
        self._lock = lock or threading.Lock()   # shared by a DeliveryHistograms pair
        self._pending: list[float] = []
        self.period = Sketch(precision)
        self.total = Sketch(precision)

    def record(self, value: float) -> None:
        with self._lock:
            pending = self._pending
            pending.append(value)
            if len(pending) >= FOLD_AT:
                self.period.add_many(pending)
                pending.clear()

    def _fold(self) -> None:
        """Pending values into the period's sketch (the lock held)."""
        if self._pending:
            self.period.add_many(self._pending)
            self._pending.clear()

    def snapshot(self, reset_period: bool = True) -> dict:
        """The current period's summary; with reset_period, the period is folded into `total`
        and a new one starts."""
        with self._lock:
            self._fold()
            sketch = self.period
            if reset_period:
                self.period = Sketch(self.precision)
                self.total.merge(sketch)
        return summarize(sketch)

    def cumulative(self) -> Sketch:
        """Everything recorded since start (total plus the current period), as a new sketch."""
        with self._lock:
            self._fold()
            merged = Sketch(self.precision)
            merged.merge(self.total)
            merged.merge(self.period)
        return merged


class DeliveryHistograms:
    """A topic's handle_latency_ms and event_age_ms, recorded together under one lock (the bus's
    delivery hook records both for every event). Two histograms made apart (with locks of their
    own) are recorded one by one."""

    __slots__ = ('handle', 'age', '_lock', '_handle_pending', '_age_pending')

    def __init__(self, handle: Histogram, age: Histogram):
        self.handle, self.age = handle, age
        self._lock = handle._lock if handle._lock is age._lock else None
        self._handle_pending, self._age_pending = handle._pending, age._pending

    def record(self, handle_ms: float, age_ms: float) -> None:
        if self._lock is None:
            self.handle.record(handle_ms)
            self.age.record(age_ms)
            return
        with self._lock:
            handle, age = self._handle_pending, self._age_pending
            handle.append(handle_ms)
            age.append(age_ms)
            if len(handle) >= FOLD_AT or len(age) >= FOLD_AT:
                self.handle._fold()
                self.age._fold()


def summarize(sketch: Sketch) -> dict:
    return {'count': sketch.count, 'p50': sketch.quantile(0.5), 'p99': sketch.quantile(0.99),
            'max': sketch.max if sketch.count else math.nan, 'mean': sketch.mean()}


Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict) -> Labels:
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


@dataclass
class Sample:
    """One metric in a snapshot (the pure form of loom_msgs/MetricSample)."""

    name: str
    kind: int
    labels: dict[str, str] = field(default_factory=dict)
    value: float = 0.0        # counter: total since start; gauge: current value; histogram: mean
    rate: float = 0.0         # counter: per second over the last period
    count: int = 0            # histogram: samples in the last period
    p50: float = math.nan
    p99: float = math.nan
    max: float = math.nan


class MetricsRegistry:
    """A node's metrics. Counters are totals (`inc`, or `set_total` for totals kept elsewhere,
    such as the bus's counters); rates come from the difference between two snapshots."""

    def __init__(self, node: str = '', max_topics: int = MAX_TOPICS):
        self.node = node
        self.max_topics = max(0, int(max_topics))
        self._topics: dict[str, None] = {}   # topics with their own series, first come
        self._subscriptions: dict[str, None] = {}   # the same for subscription patterns
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[tuple[str, Labels], float] = {}
        self._histograms: dict[tuple[str, Labels], Histogram] = {}
        self._prev_counters: dict[tuple[str, Labels], float] = {}
        self._prev_time: float | None = None
        self.collectors: list = []   # callables(registry) run before each snapshot
        self._topic_cache: dict[tuple[str, str], Histogram] = {}
        self._delivery_cache: dict[str, DeliveryHistograms] = {}

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        key = (name, _labels(labels))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def set_total(self, name: str, total: float, **labels) -> None:
        with self._lock:
            self._counters[(name, _labels(labels))] = float(total)

    def set_gauge(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._gauges[(name, _labels(labels))] = float(value)

    def histogram(self, name: str, precision: float = 0.01, *, _lock=None, **labels) -> Histogram:
        key = (name, _labels(labels))
        hist = self._histograms.get(key)
        if hist is None:
            with self._lock:
                hist = self._histograms.setdefault(key, Histogram(precision, _lock))
        return hist

    def topic_label(self, topic: str) -> str:
        """The `topic` label of a topic's series: the topic itself for the first `max_topics`
        topics this registry sees, OTHER_TOPICS for any later one (its counts and latencies
        are summed there). A topic keeps the label it first got, so folded totals only grow."""
        return self._admit(self._topics, topic, OTHER_TOPICS)

    def subscription_label(self, pattern: str) -> str:
        """topic_label for the `subscription` label (its own `max_topics` patterns)."""
        return self._admit(self._subscriptions, pattern, OTHER_SUBSCRIPTIONS)

    def _admit(self, admitted: dict, value: str, other: str) -> str:
        if value in admitted:
            return value
        if len(admitted) >= self.max_topics:
            return other
        with self._lock:
            if len(admitted) < self.max_topics:
                admitted[value] = None
        return value if value in admitted else other

    def topic_histogram(self, name: str, topic: str) -> Histogram:
        """histogram(name, topic=topic) through a cache: the bus calls this per delivery."""
        key = (name, topic)
        hist = self._topic_cache.get(key)
        if hist is None:
            label = self.topic_label(topic)
            hist = self.histogram(name, topic=label)
            if label == topic:   # the cache stays bounded: folded topics look theirs up again
                self._topic_cache[key] = hist
        return hist

    def delivery_histograms(self, topic: str) -> DeliveryHistograms:
        """handle_latency_ms and event_age_ms of `topic` as one pair sharing a lock, through one
        cache lookup: the bus's delivery hook records both on every event."""
        pair = self._delivery_cache.get(topic)
        if pair is None:
            label = self.topic_label(topic)
            pair = self._delivery_cache.get(label)
            if pair is None:
                lock = threading.Lock()
                pair = DeliveryHistograms(
                    self.histogram('handle_latency_ms', topic=label, _lock=lock),
                    self.histogram('event_age_ms', topic=label, _lock=lock))
                with self._lock:   # two threads may both have made one: the first one stays
                    pair = self._delivery_cache.setdefault(label, pair)
        return pair

    def counter(self, name: str, **labels) -> float:
        return self._counters.get((name, _labels(labels)), 0.0)

    def gauge(self, name: str, **labels) -> float:
        return self._gauges.get((name, _labels(labels)), math.nan)

    def collect(self) -> None:
        for collector in list(self.collectors):
            collector(self)

    def snapshot(self, now: float | None = None, reset_period: bool = True) -> list[Sample]:
        """Every metric now; counter rates over the time since the previous snapshot."""
        self.collect()
        now = time.monotonic() if now is None else now
        with self._lock:
            elapsed = (now - self._prev_time) if self._prev_time is not None else 0.0
            counters = dict(self._counters)
            gauges = dict(self._gauges)
            histograms = dict(self._histograms)
            prev, self._prev_counters, self._prev_time = self._prev_counters, counters, now
        samples = []
        for (name, labels), total in sorted(counters.items()):
            delta = total - prev.get((name, labels), 0.0)
            rate = delta / elapsed if elapsed > 0 and delta >= 0 else 0.0
            samples.append(Sample(name, COUNTER, dict(labels), total, rate))
        for (name, labels), value in sorted(gauges.items()):
            samples.append(Sample(name, GAUGE, dict(labels), value))
        for (name, labels), hist in sorted(histograms.items()):
            s = hist.snapshot(reset_period)
            samples.append(Sample(name, HISTOGRAM, dict(labels), s['mean'], 0.0, s['count'],
                                  s['p50'], s['p99'], s['max']))
        return samples

    def histograms(self) -> dict[tuple[str, Labels], Histogram]:
        return dict(self._histograms)

    def counters(self) -> dict[tuple[str, Labels], float]:
        return dict(self._counters)

    def gauges(self) -> dict[tuple[str, Labels], float]:
        return dict(self._gauges)


# -- sources -------------------------------------------------------------------------------------
class BusMetrics:
    """Reads an EventBus's counters into a registry at snapshot time: nothing on the hot path.

    events_published / events_received per topic, events_dropped / events_shed / queue_depth /
    queue_capacity per subscription pattern (and topics_refused, once a pattern met the bus's
    max_pattern_topics), events_rejected per reason, tracestate_dropped (this process's events
    whose tracestate failed tracing's check, once there is one). Topics and patterns past the
    registry's max_topics are summed into one series each, and so are subscriptions of one
    pattern; the counts of a subscription that goes away stay in its label's totals, so a counter
    never goes back (Prometheus would read a reset)."""

    def __init__(self, bus):
        self.bus = bus
        self._last: dict = {}                   # subscription -> (label, its last counts)
        self._departed: dict[str, list] = {}    # label -> counts of subscriptions gone
        # A Prometheus scrape (its HTTP thread) and the Metrics message (the executor) may
        # collect at once: two passes would both move a departed subscription's counts
        self._collecting = threading.Lock()

    def __call__(self, registry: MetricsRegistry) -> None:
        with self._collecting:
            self._collect(registry)

    def _collect(self, registry: MetricsRegistry) -> None:
        stats = self.bus.stats
        for name, counts in (('events_published', stats.published),
                             ('events_received', stats.received)):
            for label, n in _by_label(registry, counts).items():
                registry.set_total(name, n, topic=label)
        for reason, n in list(stats.rejected.items()):
            registry.set_total('events_rejected', n, reason=reason)
        dropped = tracing.tracestate_dropped()   # process-wide: shown once it happened
        if dropped:
            registry.set_total('tracestate_dropped', dropped)
        # label -> [dropped, shed, delivered, depth, capacity, topics refused]
        folded: dict[str, list] = {label: [*counts, None, None, 0]
                                   for label, counts in self._departed.items()}
        last = {}
        before = self._last
        for sub in list(stats.subscriptions):
            c = sub.counters
            # A subscription keeps its label (its pattern and the registry's admissions do not
            # change): looked up once, not each snapshot for each of 1,000 subscriptions.
            label = before[sub][0] if sub in before else \
                registry.subscription_label(sub.pattern.text)
            counts = flow_totals(c)
            last[sub] = label, counts
            row = folded.setdefault(label, [0, 0, 0, None, None, 0])
            for i in range(3):
                row[i] += counts[i]
            if sub.queue is not None:
                row[3] = (row[3] or 0) + len(sub.queue)
                row[4] = (row[4] or 0) + sub.policy.queue_size
            # matching topics past bus.max_pattern_topics, left unattached
            row[5] += getattr(sub, 'topics_refused', 0)
        for sub, (label, counts) in self._last.items():
            if sub not in last:   # gone since the last snapshot: its counts stay counted
                kept = self._departed.setdefault(label, [0, 0, 0])
                row = folded.setdefault(label, [0, 0, 0, None, None, 0])
                for i in range(3):
                    kept[i] += counts[i]
                    row[i] += counts[i]
        self._last = last
        for label, (dropped, shed, delivered, depth, capacity, refused) in folded.items():
            registry.set_total('events_dropped', dropped, subscription=label)
            registry.set_total('events_shed', shed, subscription=label)
            registry.set_total('events_delivered', delivered, subscription=label)
            if depth is not None:   # summed over the folded ones that have a queue
                registry.set_gauge('queue_depth', depth, subscription=label)
                registry.set_gauge('queue_capacity', capacity, subscription=label)
            # once set, kept current (back to 0 when the topics or the subscription go)
            if refused or not math.isnan(registry.gauge('topics_refused', subscription=label)):
                registry.set_gauge('topics_refused', refused, subscription=label)


def flow_totals(c) -> tuple[int, int, int]:
    """(dropped, shed, delivered) of a subscription's FlowCounters. Dropped: events that never
    reached a handler (dropped_oldest, overflow, lost); shed: thinned on purpose by a policy
    (sampled_out, rate_limited, folded). Fields read directly: this runs per subscription."""
    return (c.dropped_oldest + c.overflow + c.lost, c.sampled_out + c.rate_limited + c.folded,
            c.delivered)


def _by_label(registry: MetricsRegistry, counts) -> dict[str, int]:
    """Per-topic totals summed per topic label (the topics past max_topics into one)."""
    out: dict[str, int] = {}
    for topic, n in list(counts.items()):
        label = registry.topic_label(topic)
        out[label] = out.get(label, 0) + n
    return out


def bus_drop_total(bus) -> int:
    """Every event a bus lost or refused so far (what the drops-rising diagnostic watches)."""
    stats = bus.stats
    total = sum(stats.rejected.values())
    for sub in list(stats.subscriptions):
        total += flow_totals(sub.counters)[0]
    return total


class ResourceSampler:
    """Process CPU % (of one core, since the previous sample), RSS and threads, via psutil.
    GPU: none measured (no GPU on the target machines); reported as absent, not as zero."""

    def __init__(self, pid: int | None = None):
        import psutil
        self._process = psutil.Process(pid or os.getpid())
        self._process.cpu_percent(None)   # primes the first interval

    def __call__(self, registry: MetricsRegistry) -> None:
        with self._process.oneshot():
            registry.set_gauge('process_cpu_percent', self._process.cpu_percent(None))
            registry.set_gauge('process_rss_bytes', self._process.memory_info().rss)
            registry.set_gauge('process_threads', self._process.num_threads())


# -- Prometheus ------------------------------------------------------------------------------------
_PROM: dict = {}   # one HTTP server per process: 'registry', 'server', 'port', 'sources'


def _prom_name(name: str) -> str:
    return 'loom_' + ''.join(ch if ch.isalnum() else '_' for ch in name)


def to_prometheus(registries: list[MetricsRegistry]):
    """Prometheus metric families for the given registries (label `node` added). Histograms are
    summaries (quantiles 0.5 / 0.99 / 1.0 since start, with _count and _sum)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
    from prometheus_client.samples import Sample as PromSample
    families: dict[str, object] = {}

    def family(kind, name, doc, labels):
        key = (kind, name)
        fam = families.get(key)
        if fam is None:
            fam = families[key] = kind(_prom_name(name), doc, labels=labels)
        return fam

    for reg in registries:
        for (name, labels), total in sorted(reg.counters().items()):
            keys = ['node', *(k for k, _ in labels)]
            family(CounterMetricFamily, name, f'Loom counter {name}', keys).add_metric(
                [reg.node, *(v for _, v in labels)], total)
        for (name, labels), value in sorted(reg.gauges().items()):
            keys = ['node', *(k for k, _ in labels)]
            family(GaugeMetricFamily, name, f'Loom gauge {name}', keys).add_metric(
                [reg.node, *(v for _, v in labels)], value)
        for (name, labels), hist in sorted(reg.histograms().items()):
            keys = ['node', *(k for k, _ in labels)]
            values = [reg.node, *(v for _, v in labels)]
            fam = family(SummaryMetricFamily, name, f'Loom histogram {name}', keys)
            total = hist.cumulative()
            quantiles = [(q, total.quantile(q)) for q in (0.5, 0.99, 1.0)]
            count, total_sum = total.count, total.sum
            fam.add_metric(values, count_value=count, sum_value=total_sum)
            for q, v in quantiles:
                fam.samples.append(PromSample(fam.name, dict(zip(keys, values), quantile=str(q)),
                                              v, None))
    return list(families.values())


class _Collector:
    def __init__(self, sources: list[MetricsRegistry]):
        self.sources = sources

    def collect(self):
        from prometheus_client.core import CounterMetricFamily
        for reg in list(self.sources):
            reg.collect()
        families = to_prometheus(list(self.sources))
        server = _PROM.get('server')
        if server is not None:
            families.append(CounterMetricFamily(
                'loom_prometheus_connections_refused', 'Connections to this endpoint closed at '
                'once: max_connections were open', value=server.refused))
            families.append(CounterMetricFamily(
                'loom_prometheus_requests_timed_out', 'Connections closed for sending no whole '
                'request within the timeout (or stalling its answer)', value=server.timed_out))
        return families


# The endpoint's bounds: every connection is a thread, and a client that connected and never
# finished its request held one forever (300 idle half-requests: 300 threads).
PROM_TIMEOUT_S = 5.0        # to send the whole request; also each send of the answer
PROM_MAX_CONNECTIONS = 16   # open at once; more are closed at once (a scraper needs one)


def _bounded_server(addr: str, port: int, app, timeout_s: float, max_connections: int):
    """A thread-per-connection WSGI server (as prometheus_client's start_http_server makes)
    that gives each connection `timeout_s` and keeps at most `max_connections` open: a
    connection over the cap is closed on accept (counted in `refused`), one that times out is
    closed quietly (counted in `timed_out`)."""
    # Imported here, as prometheus_client is: only a node that serves pays for http.server.
    from wsgiref.simple_server import WSGIRequestHandler

    from prometheus_client.exposition import ThreadingWSGIServer

    class BoundedHandler(WSGIRequestHandler):
        """prometheus_client's WSGI handler (quiet) with one deadline for the whole request
        and the server's timeout on each send of the answer.

        The deadline is a timer that shuts the connection down: a socket timeout is renewed
        by every byte that arrives (a client sending one now and then inside it was never cut
        off, and 16 of them kept every scrape answered 503), and checking a deadline between
        reads misses the many receives inside one readline."""

        def setup(self) -> None:
            self.timeout = None   # the request's deadline is the timer's (below)
            super().setup()
            self._state_lock = threading.Lock()
            self._request_in = self._expired = False
            self._deadline = threading.Timer(self.server.timeout_s, self._expire)
            self._deadline.daemon = True
            self._deadline.start()

        def _expire(self) -> None:
            with self._state_lock:
                if self._request_in:
                    return
                self._expired = True
            self.server.count_timeout()
            try:
                self.connection.shutdown(socket.SHUT_RDWR)   # its reads end at once
            except OSError:
                pass

        def get_environ(self):
            with self._state_lock:
                if self._expired:
                    raise ConnectionAbortedError('request not received within the timeout')
                self._request_in = True
            # The request is in: each send of the answer gets the whole timeout
            self.connection.settimeout(self.server.timeout_s)
            return super().get_environ()

        def finish(self) -> None:
            self._deadline.cancel()
            super().finish()

        def log_message(self, format, *args) -> None:   # noqa: A002 (the base class's name)
            pass

    family, _type, _proto, _name, sockaddr = socket.getaddrinfo(
        addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class BoundedServer(ThreadingWSGIServer):
        address_family = family
        # socketserver's 5 dropped a burst's SYNs (a scrape behind them waited 1 s for the
        # retry): accepting is cheap now that an extra connection is closed at once
        request_queue_size = 64

        def __init__(self):
            self.timeout_s = float(timeout_s)
            self.refused = self.timed_out = 0
            self._slots = threading.BoundedSemaphore(max_connections)
            self._count_lock = threading.Lock()
            super().__init__((sockaddr[0], port), BoundedHandler)

        def process_request(self, request, client_address):
            if not self._slots.acquire(blocking=False):
                with self._count_lock:
                    self.refused += 1
                try:   # a word for the scraper, if its socket takes it now; never waited on
                    request.setblocking(False)
                    request.send(b'HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n'
                                 b'Connection: close\r\n\r\n')
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:   # no thread started: its slot is free again
                self._slots.release()
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._slots.release()

        def count_timeout(self) -> None:
            with self._count_lock:
                self.timed_out += 1

        def handle_error(self, request, client_address):
            error = sys.exc_info()[1]
            if isinstance(error, OSError):   # timed out, reset, cut off: the client's doing
                if isinstance(error, TimeoutError):   # an answer it would not take
                    self.count_timeout()
                return
            super().handle_error(request, client_address)

    server = BoundedServer()
    server.set_app(app)
    return server


def serve_prometheus(registry: MetricsRegistry, port: int, addr: str = '127.0.0.1',
                     timeout_s: float = PROM_TIMEOUT_S,
                     max_connections: int = PROM_MAX_CONNECTIONS) -> int:
    """Expose `registry` (and every other registry served in this process) on
    http://addr:port/metrics; one server per process, later registries join it. Returns the port.
    Unauthenticated: loopback unless the caller names another address. Each connection has
    `timeout_s` to send its request, and at most `max_connections` are open at once (both fixed
    by the call that starts the server)."""
    from prometheus_client import CollectorRegistry, make_wsgi_app
    if not _PROM:
        if not timeout_s > 0 or int(max_connections) < 1:
            raise ValueError('serve_prometheus: timeout_s > 0 and max_connections >= 1')
        sources: list[MetricsRegistry] = []
        prom_registry = CollectorRegistry(auto_describe=False)
        prom_registry.register(_Collector(sources))
        server = _bounded_server(addr, port, make_wsgi_app(prom_registry), timeout_s,
                                 int(max_connections))
        threading.Thread(target=server.serve_forever, name='loom-prometheus',
                         daemon=True).start()
        _PROM.update(registry=prom_registry, server=server, port=server.server_address[1],
                     sources=sources, addr=addr)
    elif port and port != _PROM['port']:
        raise OSError(f'this process already serves Prometheus metrics on port {_PROM["port"]}; '
                      f'cannot also serve on {port}')
    elif addr != _PROM['addr']:   # a later node's address would be silently not the one served
        raise OSError(f'this process already serves Prometheus metrics on {_PROM["addr"]}; '
                      f'cannot also serve on {addr}')
    if registry not in _PROM['sources']:
        _PROM['sources'].append(registry)
    return _PROM['port']


def stop_serving(registry: MetricsRegistry) -> None:
    if _PROM and registry in _PROM['sources']:
        _PROM['sources'].remove(registry)
        if not _PROM['sources']:
            _PROM['server'].shutdown()
            _PROM['server'].server_close()
            _PROM.clear()


# -- ROS shell -------------------------------------------------------------------------------------
def to_msg(node_name: str, period_s: float, samples: list[Sample], stamp=None):
    from loom_msgs.msg import KeyValue, MetricSample, Metrics
    msg = Metrics()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.node = node_name
    msg.period_s = float(period_s)
    for s in samples:
        msg.samples.append(MetricSample(
            name=s.name, kind=s.kind, labels=[KeyValue(key=k, value=v) for k, v in s.labels.items()],
            value=_finite(s.value), rate=_finite(s.rate), count=int(s.count), p50=_finite(s.p50),
            p99=_finite(s.p99), max=_finite(s.max)))
    return msg


def from_msg(msg, text=str, max_samples: int | None = None,
             max_labels: int | None = None) -> list[Sample]:
    """The samples of a loom_msgs/Metrics, at most `max_samples` of them with `max_labels`
    labels each (None: all), `text` applied to every name, label key and value (loom status
    makes a peer's text safe to print)."""
    return [Sample(text(s.name), s.kind,
                   {text(kv.key): text(kv.value) for kv in s.labels[:max_labels]}, s.value,
                   s.rate, s.count, s.p50, s.p99, s.max) for s in msg.samples[:max_samples]]


def _finite(value: float) -> float:
    return float(value) if value is not None else math.nan


class MetricsPublisher:
    """Publishes a registry's snapshot on loom/metrics every `period_s`."""

    def __init__(self, node, registry: MetricsRegistry, period_s: float):
        from loom_msgs.msg import Metrics

        from loom_ros.bus.qos import QosLevel, to_qos_profile
        self.node = node
        self.registry = registry
        self.period_s = period_s
        self.publisher = node.create_publisher(Metrics, METRICS_TOPIC,
                                               to_qos_profile(QosLevel.REALTIME))
        self.timer = node.create_timer(period_s, self.publish)

    def publish(self) -> None:
        samples = self.registry.snapshot()
        self.publisher.publish(to_msg(self.node.get_fully_qualified_name(), self.period_s, samples,
                                      self.node.get_clock().now().to_msg()))

    def destroy(self) -> None:
        self.node.destroy_timer(self.timer)
        self.node.destroy_publisher(self.publisher)


# -- the bus's delivery hook ---------------------------------------------------------------------
def observed_call(sub, event, topic: str, _perf=time.perf_counter, _wall=time.time) -> None:
    """Deliver one event to a bus subscription inside a HandleEvent span (when tracing is on) and
    record the handler's latency and the event's age (when the bus has a registry). The bus calls
    this instead of delivering directly only when one of the two is on: it runs per event, so
    its lookups are cached (MetricsRegistry.delivery_histograms) and recording is an append."""
    registry = sub._bus.metrics
    start = _perf()
    if tracing.ENABLED and tracing.wants_handle_span(event):
        with tracing.handle_span(topic, event, sub.pattern.text):
            sub._deliver(event, topic)
    else:
        sub._deliver(event, topic)
    if registry is not None:
        elapsed_ms = (_perf() - start) * 1000.0
        age_ms = _wall() * 1000.0 - event.timestamp_ms
        registry.delivery_histograms(topic).record(elapsed_ms, age_ms if age_ms > 0 else 0.0)
