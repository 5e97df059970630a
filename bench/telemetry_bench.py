"""Benchmark of telemetry's cost on the event bus, against the bus without it, in the same run.

    python bench/telemetry_bench.py            # ~1 minute
    python bench/telemetry_bench.py --quick    # a short smoke run

Publishes through the intra-process fast path (one inline subscriber in the same process: the
path where the bus's own cost is most visible) with: telemetry absent (baseline), tracing off but
latency histograms on, tracing on at sample ratio 0 and 1 (file exporter), and both; plus raw
rclpy publish for reference, and the cost of a histogram record. Scenarios alternate in rounds so
machine load hits them alike. Writes bench/results/telemetry.json and telemetry.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PAYLOAD = b'x' * 100
TOPIC = 'bench.telemetry'


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1))))]


def publish_run(bus, count: int) -> list[float]:
    """Per-publish wall time in microseconds for `count` events (each a fresh Event)."""
    from loom_ros.bus.event import Event
    publish = bus.publish
    clock = time.perf_counter_ns
    out = []
    for _ in range(count):
        event = Event(type='bench', payload=PAYLOAD)
        t0 = clock()
        publish(TOPIC, event, 'realtime')
        out.append((clock() - t0) / 1000.0)
    return out


def raw_run(pub, count: int) -> list[float]:
    from loom_msgs.msg import Event as EventMsg
    clock = time.perf_counter_ns
    out = []
    for i in range(count):
        msg = EventMsg(id=str(i), type='bench', payload=PAYLOAD, confidence=1.0)
        t0 = clock()
        pub.publish(msg)
        out.append((clock() - t0) / 1000.0)
    return out


def run_publish(quick: bool) -> list[dict]:
    import rclpy
    from rclpy.node import Node

    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.qos import to_qos_profile
    from loom_ros.telemetry import tracing
    from loom_ros.telemetry.metrics import MetricsRegistry
    rclpy.init()
    node = Node('telemetry_bench')
    bus = EventBus(node)
    received = [0]
    bus.subscribe(TOPIC, lambda e, t: received.__setitem__(0, received[0] + 1), 'realtime')
    raw_pub = node.create_publisher(__import__('loom_msgs.msg', fromlist=['Event']).Event,
                                    'bench/telemetry_raw', to_qos_profile('realtime'))
    registry = MetricsRegistry('/telemetry_bench')
    span_file = Path(tempfile.mkdtemp(prefix='loom_tel_bench_')) / 'spans.jsonl'

    def setup(name):
        tracing.shutdown()
        bus.metrics = registry if 'histograms' in name else None
        if 'sample 0' in name:
            tracing.configure(tracing.TracingConfig('file', str(span_file), sample_ratio=0.0))
        elif 'sample 1' in name:
            tracing.configure(tracing.TracingConfig('file', str(span_file), sample_ratio=1.0))

    scenarios = ['bus, telemetry absent (baseline)', 'bus + latency histograms, tracing off',
                 'bus, tracing on, sample 0', 'bus, tracing on, sample 1',
                 'bus + latency histograms, tracing on, sample 1', 'raw rclpy publish (reference)']
    count, rounds = (2000, 2) if quick else (5000, 4)
    samples: dict[str, list[float]] = {s: [] for s in scenarios}
    means: dict[str, list[float]] = {s: [] for s in scenarios}
    for _ in range(rounds):
        for name in scenarios:
            setup(name)
            run = (lambda n: raw_run(raw_pub, n)) if name.startswith('raw') else \
                (lambda n: publish_run(bus, n))
            run(300)  # warm-up
            values = run(count)
            samples[name].extend(values)
            means[name].append(statistics.fmean(values))
    tracing.shutdown()
    spans_written = sum(1 for _ in open(span_file)) if span_file.exists() else 0
    base = statistics.median(means[scenarios[0]])
    rows = []
    for name in scenarios:
        mean = statistics.median(means[name])
        vals = samples[name]
        rows.append({'scenario': name, 'events': len(vals), 'mean_us': round(mean, 2),
                     'ratio_to_baseline': round(mean / base, 2),
                     'added_us': round(mean - base, 2),
                     'p50_us': round(pct(vals, 50), 2), 'p99_us': round(pct(vals, 99), 2),
                     'max_us': round(max(vals), 1)})
    rows.append({'scenario': 'spans written at sample 1', 'spans': spans_written})
    # The guard the hot path pays with telemetry off.
    guard_ns = min(timeit.repeat('_t.ENABLED or b.metrics is not None',
                                 globals={'_t': tracing, 'b': bus}, number=200000, repeat=5)) \
        / 200000 * 1e9
    rows.append({'scenario': 'tracing-off guard (per publish and per delivery)',
                 'ns': round(guard_ns, 1)})
    bus.destroy()
    node.destroy_node()
    rclpy.try_shutdown()
    return rows


def run_histogram(quick: bool) -> list[dict]:
    import random

    from loom_ros.telemetry.metrics import Histogram, MetricsRegistry, Sketch
    n = 200000 if quick else 1000000
    values = [random.lognormvariate(0, 1.5) for _ in range(10000)]
    rows = []

    def per_op(stmt, glb, number):
        return min(timeit.repeat(stmt, globals=glb, number=number, repeat=3)) / number * 1e9

    sketch, hist, reg = Sketch(), Histogram(), MetricsRegistry()
    rows.append({'operation': 'Sketch.add (no lock)',
                 'ns': round(per_op('add(v)', {'add': sketch.add, 'v': 3.7}, n), 1)})
    rows.append({'operation': 'Histogram.record (locked)',
                 'ns': round(per_op('rec(v)', {'rec': hist.record, 'v': 3.7}, n), 1)})
    rows.append({'operation': "registry.topic_histogram(name, topic).record (the bus's path)",
                 'ns': round(per_op("th('handle_latency_ms', 'camera.front').record(v)",
                                    {'th': reg.topic_histogram, 'v': 3.7}, n), 1)})
    full = Sketch()
    for v in values:
        full.add(v)
    rows.append({'operation': 'quantile(0.99) of a 10k-sample sketch',
                 'ns': round(per_op('q(0.99)', {'q': full.quantile}, 20000), 1)})
    for t in range(20):
        for v in values[:500]:
            reg.topic_histogram('handle_latency_ms', f'topic.{t}').record(v)
            reg.inc('events_received', topic=f'topic.{t}')
    rows.append({'operation': 'registry snapshot, 20 topics (what loom/metrics does per period)',
                 'ns': round(per_op('s()', {'s': reg.snapshot}, 200), 1)})
    return rows


def write_markdown(results: dict, path: Path) -> None:
    m = results['machine']
    lines = ['# Telemetry benchmark', '',
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}; "
             f"Python {m['python']}, rclpy {m['rclpy']}, {m['rmw']}, {m['executor']}; {m['date']}.",
             '', f"{os.environ.get('LOOM_BENCH_NOTE', 'taken with nothing else running')}: "
             'absolute numbers move between machines and days; the ratios within one run are '
             'what to read.', '',
             '## Publish cost (intra-process, one inline subscriber, 100-byte payload)', '',
             'Per publish, including the in-process delivery (and the HandleEvent span and '
             'histogram records when on). Baseline: the same bus with no telemetry attached.', '',
             '| scenario | events | mean us | ratio | added us | P50 / P99 / max us |',
             '| --- | --- | --- | --- | --- | --- |']
    for r in results['publish']:
        if 'mean_us' in r:
            lines.append(f"| {r['scenario']} | {r['events']} | {r['mean_us']:.2f} | "
                         f"{r['ratio_to_baseline']:.2f} | {r['added_us']:+.2f} | "
                         f"{r['p50_us']:.1f} / {r['p99_us']:.1f} / {r['max_us']:.0f} |")
    for r in results['publish']:
        if 'ns' in r:
            lines.append(f"\n{r['scenario']}: {r['ns']} ns.")
        elif 'spans' in r:
            lines.append(f"\nSpans written at sample ratio 1 (all rounds): {r['spans']}.")
    lines += ['', '## Histogram', '', '| operation | ns per call |', '| --- | --- |']
    for r in results['histogram']:
        lines.append(f"| {r['operation']} | {r['ns']:.0f} |")
    lines.append('')
    path.write_text('\n'.join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--out', default=str(HERE / 'results'))
    args = parser.parse_args()
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    from bus_bench import machine
    results = {'machine': machine(), 'quick': args.quick,
               'publish': run_publish(args.quick), 'histogram': run_histogram(args.quick)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'telemetry.json').write_text(json.dumps(results, indent=1))
    write_markdown(results, out / 'telemetry.md')
    print((out / 'telemetry.md').read_text())
    return 0


if __name__ == '__main__':
    sys.exit(main())
