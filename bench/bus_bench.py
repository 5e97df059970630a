"""Benchmark of the Loom event bus against raw rclpy, measured in the same run.

    python bench/bus_bench.py                 # everything (~3 minutes, with the 60 s soak)
    python bench/bus_bench.py --quick         # a short smoke run (soak 10 s)
    python bench/bus_bench.py latency         # one part: latency | throughput | soak

Writes bench/results/bus.json and bench/results/bus.md (with the machine described).
Raw rclpy publishes the same loom_msgs/Event content with the same QoS profile and the same
executor (EventsExecutor where present); ratios are Loom / raw. Latency is measured from the
publisher's CLOCK_MONOTONIC stamp (carried in the event's metadata) to the subscriber callback,
which is one clock across processes on one host.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAYLOAD = b'x' * 100  # the ENVIRONMENT measurements used 100-byte strings
STAMP_KEY = 'bench.t_ns'


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float('nan')
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1))))]


def summarize(latencies_us: list[float]) -> dict:
    return {'n': len(latencies_us), 'p50_us': round(percentile(latencies_us, 50), 1),
            'p99_us': round(percentile(latencies_us, 99), 1),
            'max_us': round(max(latencies_us), 1) if latencies_us else float('nan')}


class Reservoir:
    """A fixed-size uniform sample of a stream (Algorithm R), so a long run's latency record does
    not grow the subscriber's memory (which the soak measures)."""

    def __init__(self, capacity: int = 50000, seed: int = 1):
        import random
        self.capacity, self.count, self.items, self.max = capacity, 0, [], float('nan')
        self._rand = random.Random(seed).random

    def append(self, value: float) -> None:
        self.count += 1
        self.max = value if self.count == 1 else max(self.max, value)
        if len(self.items) < self.capacity:
            self.items.append(value)
        else:
            slot = int(self._rand() * self.count)
            if slot < self.capacity:
                self.items[slot] = value

    def __len__(self) -> int:
        return self.count


def rss_kb(pid: int | str = 'self') -> int:
    with open(f'/proc/{pid}/status') as status:
        for line in status:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


# -- endpoints: the same traffic through Loom and through raw rclpy ---------------------------
class LoomSide:
    def __init__(self, node, level: str, topic: str):
        from loom_ros.bus.bus import EventBus
        from loom_ros.bus.names import to_ros_topic
        self.bus = EventBus(node, batch_max_events=100, batch_max_age_ms=10.0)
        self.level, self.topic = level, topic
        self.ros_topic = to_ros_topic(topic)

    def publisher(self):
        from loom_ros.bus.event import Event
        self.bus.publisher_for(self.topic, self.level)
        publish, level, topic = self.bus.publish, self.level, self.topic

        def send():
            publish(topic, Event(type='bench', payload=PAYLOAD,
                                 metadata={STAMP_KEY: str(time.monotonic_ns())}), level)
        return send, self.bus.publisher_for(self.topic, self.level)

    def subscribe(self, on_stamp):
        self.bus.subscribe(self.topic, lambda e, t: on_stamp(int(e.metadata[STAMP_KEY])),
                           self.level)

    def flush(self):
        self.bus.flush()


class RawSide:
    def __init__(self, node, level: str, topic: str):
        from loom_ros.bus.names import to_ros_topic
        from loom_ros.bus.qos import to_qos_profile
        self.node = node
        self.qos = to_qos_profile(level)
        self.topic = self.ros_topic = to_ros_topic(topic) + '_raw'

    def publisher(self):
        from loom_msgs.msg import Event as EventMsg
        from loom_msgs.msg import KeyValue
        pub = self.node.create_publisher(EventMsg, self.topic, self.qos)
        msg = EventMsg(id='raw', type='bench', source='bench', payload=PAYLOAD, confidence=1.0)

        from rclpy.impl.implementation_singleton import rclpy_implementation
        rcl_error = rclpy_implementation.RCLError

        def send():
            msg.metadata = [KeyValue(key=STAMP_KEY, value=str(time.monotonic_ns()))]
            try:
                pub.publish(msg)
            except rcl_error:  # Fast DDS: a reliable reader too far behind; the event is lost
                pass
        return send, pub

    def subscribe(self, on_stamp):
        from loom_msgs.msg import Event as EventMsg
        self.node.create_subscription(
            EventMsg, self.topic, lambda m: on_stamp(int(m.metadata[0].value)), self.qos)

    def flush(self):
        pass


SIDES = {'loom': LoomSide, 'raw': RawSide}


def make_node(name: str):
    from rclpy.node import Node
    return Node(name)


# -- subscriber process --------------------------------------------------------------------------
def run_subscriber(args) -> None:
    """A subscriber in its own process: counts, records latency, reports JSON on stdout."""
    import rclpy
    from loom_ros.bus.executor import make_executor
    rclpy.init()
    node = make_node(f'bench_sub_{os.getpid()}')
    side = SIDES[args.side](node, args.level, args.topic)
    latencies = Reservoir()
    first = last = 0.0

    def on_stamp(sent_ns: int) -> None:
        nonlocal first, last
        now = time.monotonic_ns()
        latencies.append((now - sent_ns) / 1000.0)
        first = first or now / 1e9
        last = now / 1e9
    side.subscribe(on_stamp)
    executor = make_executor()
    executor.add_node(node)
    # The publisher exists before this process starts: say ready once this side has discovered
    # it too. Best effort sent before the reader's side of the match is lost, and a fixed wait
    # for it was too short in a loaded full test run (a row received nothing).
    deadline = time.monotonic() + 60.0
    while node.count_publishers(side.ros_topic) < 1 and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.01)
    print('ready', flush=True)
    cpu_start = time.process_time()
    idle_limit = args.idle
    deadline = time.monotonic() + args.max_seconds
    while time.monotonic() < deadline:
        before = len(latencies)
        executor.spin_once(timeout_sec=0.05)
        if len(latencies) >= args.count:
            break
        if latencies and len(latencies) == before and time.monotonic() - last > idle_limit:
            break
    n = len(latencies)
    cpu = time.process_time() - cpu_start
    print(json.dumps({'received': n, 'first': first, 'last': last, 'cpu_s': cpu,
                      'latency': {**summarize(latencies.items), 'n': latencies.count,
                                  'max_us': round(latencies.max, 1)},
                      'rss_kb': rss_kb()}), flush=True)
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()


def spawn_subscriber(side: str, level: str, topic: str, count: int, idle: float = 1.5,
                     max_seconds: float = 120.0) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, __file__, '_sub', '--side', side, '--level', level, '--topic', topic,
         '--count', str(count), '--idle', str(idle), '--max-seconds', str(max_seconds)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'ready'
    return proc


# -- scenarios -------------------------------------------------------------------------------
class Bench:
    def __init__(self):
        import rclpy
        from loom_ros.bus.executor import make_executor
        rclpy.init()
        self.executor = make_executor()
        self.serial = 0

    def topic(self, kind: str) -> str:
        self.serial += 1
        return f'bench.{kind}{os.getpid()}n{self.serial}'

    def spin_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.001)

    def wait_matched(self, pub, n: int, limit: float = 30.0) -> None:
        end = time.monotonic() + limit
        while pub.get_subscription_count() < n:
            if time.monotonic() > end:
                raise RuntimeError(f'only {pub.get_subscription_count()} of {n} subscribers matched')
            self.executor.spin_once(timeout_sec=0.01)
        self.spin_for(0.1)  # each subscriber said ready once it had discovered the publisher

    def drive(self, send, side, count: int, rate: float) -> float:
        """Publish `count` events at `rate` per second, or flat out (rate 0, giving this thread's
        executor a turn every 100 events for timers). Returns the publish seconds."""
        start = time.monotonic()
        spin_once = self.executor.spin_once
        chunk = max(1, int(rate / 1000)) if rate else 100
        for i in range(0, count, chunk):
            for _ in range(min(chunk, count - i)):
                send()
            if not rate:
                spin_once(timeout_sec=0)
                continue
            target = start + (i + chunk) / rate
            while True:
                left = target - time.monotonic()
                if left <= 0:
                    break
                spin_once(timeout_sec=min(left, 0.001))
        side.flush()
        return time.monotonic() - start

    def in_process(self, kind: str, level: str, n_subs: int, count: int, rate: float) -> dict:
        topic = self.topic(kind)
        pub_node = make_node(f'bench_pub{self.serial}')
        sub_nodes = [make_node(f'bench_sub{self.serial}_{i}') for i in range(n_subs)]
        pub_side = SIDES[kind](pub_node, level, topic)
        received = [[] for _ in range(n_subs)]
        last = [0.0]

        def on_stamp(t, r):
            now = time.monotonic_ns()
            r.append((now - t) / 1000.0)
            last[0] = now / 1e9
        for i, node in enumerate(sub_nodes):
            side = SIDES[kind](node, level, topic)
            side.subscribe(lambda t, r=received[i]: on_stamp(t, r))
        # Subscribers spin on their own thread, publishers on this one: a two-executor process.
        from loom_ros.bus.executor import make_executor
        sub_executor = make_executor()
        for node in sub_nodes:
            sub_executor.add_node(node)
        stop = threading.Event()

        def spin_subs():
            while not stop.is_set():
                sub_executor.spin_once(timeout_sec=0.01)
        spinner = threading.Thread(target=spin_subs, daemon=True)
        spinner.start()
        self.executor.add_node(pub_node)
        send, pub = pub_side.publisher()
        if kind == 'raw':
            self.wait_matched(pub, n_subs)
        start = time.monotonic()
        seconds = self.drive(send, pub_side, count, rate)
        idle_since = time.monotonic()
        while min(len(r) for r in received) < count and time.monotonic() - idle_since < 0.5:
            before = sum(len(r) for r in received)
            self.executor.spin_once(timeout_sec=0.01)
            if sum(len(r) for r in received) != before:
                idle_since = time.monotonic()
        stop.set()
        spinner.join()
        self.executor.remove_node(pub_node)
        sub_executor.shutdown()
        for node in [pub_node, *sub_nodes]:
            node.destroy_node()
        got = [len(r) for r in received]
        lat = [x for r in received for x in r]
        return {'sent': count, 'publish_eps': round(count / seconds, 1),
                'received_per_sub': got,
                'throughput_eps': round(min(got) / max(last[0] - start, 1e-9), 1),
                'latency': summarize(lat)}

    def cross_process(self, kind: str, level: str, n_subs: int, count: int, rate: float) -> dict:
        topic = self.topic(kind)
        pub_node = make_node(f'bench_pub{self.serial}')
        side = SIDES[kind](pub_node, level, topic)
        self.executor.add_node(pub_node)
        send, pub = side.publisher()
        procs = [spawn_subscriber(kind, level, topic, count) for _ in range(n_subs)]
        self.wait_matched(pub, n_subs)
        start = time.monotonic()
        cpu_start = time.process_time()
        seconds = self.drive(send, side, count, rate)
        pub_cpu = time.process_time() - cpu_start
        self.spin_for(0.2)
        reports = [json.loads(p.communicate(timeout=180)[0].strip().splitlines()[-1]) for p in procs]
        self.executor.remove_node(pub_node)
        pub_node.destroy_node()
        rates = [r['received'] / max(r['last'] - start, 1e-9) for r in reports]
        return {'sent': count, 'publish_eps': round(count / seconds, 1),
                'pub_cpu_us_per_event': round(pub_cpu / count * 1e6, 2),
                'sub_cpu_us_per_event': round(max(r['cpu_s'] / max(r['received'], 1)
                                                  for r in reports) * 1e6, 2),
                'received_per_sub': [r['received'] for r in reports],
                'throughput_eps': round(min(rates), 1),
                'latency': {k: max(r['latency'][k] for r in reports) if k != 'n' else
                            sum(r['latency']['n'] for r in reports)
                            for k in ('n', 'p50_us', 'p99_us', 'max_us')}}


def run_latency(bench: Bench, quick: bool) -> list[dict]:
    rows = []
    count = 500 if quick else 3000
    for where in ('in_process', 'cross_process'):
        for level in ('realtime', 'batched', 'background'):
            row = {'scenario': 'latency @1k ev/s', 'where': where, 'level': level, 'subs': 1}
            for kind in ('loom', 'raw'):
                row[kind] = getattr(bench, where)(kind, level, 1, count, 1000.0)
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def run_overhead(bench: Bench, quick: bool) -> list[dict]:
    """CPU per event at a rate both sides sustain (5k ev/s), across processes: the bus's cost."""
    rows = []
    count = 5000 if quick else 20000
    for level in ('realtime', 'batched', 'background'):
        row = {'scenario': 'overhead @5k ev/s', 'where': 'cross_process', 'level': level,
               'subs': 1}
        for kind in ('loom', 'raw'):
            row[kind] = bench.cross_process(kind, level, 1, count, 5000.0)
        rows.append(row)
        lo, ra = row['loom'], row['raw']
        print(f"overhead {level:<10} pub CPU/event loom {lo['pub_cpu_us_per_event']} us raw "
              f"{ra['pub_cpu_us_per_event']} us | sub CPU/event loom {lo['sub_cpu_us_per_event']}"
              f" us raw {ra['sub_cpu_us_per_event']} us", flush=True)
    return rows


def run_throughput(bench: Bench, quick: bool) -> list[dict]:
    rows = []
    count = 5000 if quick else 30000
    for where, subs in (('in_process', 1), ('in_process', 3), ('cross_process', 1),
                        ('cross_process', 3)):
        for level in ('realtime', 'batched', 'background'):
            row = {'scenario': 'throughput, flat out', 'where': where, 'level': level,
                   'subs': subs}
            for kind in ('loom', 'raw'):
                row[kind] = getattr(bench, where)(kind, level, subs, count, 0.0)
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def run_soak(bench: Bench, quick: bool) -> dict:
    """Loom batched at 10k events/s for 60 s across two processes; RSS of both, every second."""
    seconds = 10 if quick else 60
    rate = 10000.0
    pub_node = make_node('bench_soak_pub')
    topic = bench.topic('soak')
    side = LoomSide(pub_node, 'batched', topic)
    bench.executor.add_node(pub_node)
    send, pub = side.publisher()
    count = int(rate * seconds)
    sub = spawn_subscriber('loom', 'batched', topic, count, idle=3.0, max_seconds=seconds + 60)
    bench.wait_matched(pub, 1)
    samples = []
    start = time.monotonic()
    for second in range(seconds):
        bench.drive(send, side, int(rate), rate)
        samples.append({'t_s': second + 1, 'pub_rss_kb': rss_kb(), 'sub_rss_kb': rss_kb(sub.pid)})
    elapsed = time.monotonic() - start
    report = json.loads(sub.communicate(timeout=120)[0].strip().splitlines()[-1])
    bench.executor.remove_node(pub_node)
    pub_node.destroy_node()
    warm = samples[min(5, len(samples) - 1)]
    last = samples[-1]
    result = {'seconds': seconds, 'target_eps': rate, 'achieved_publish_eps':
              round(count / elapsed, 1), 'received': report['received'], 'sent': count,
              'latency': report['latency'], 'samples': samples,
              'pub_rss_growth_kb_after_warmup': last['pub_rss_kb'] - warm['pub_rss_kb'],
              'sub_rss_growth_kb_after_warmup': last['sub_rss_kb'] - warm['sub_rss_kb']}
    print(f"soak: {result['received']}/{count} received, pub RSS {warm['pub_rss_kb']}->"
          f"{last['pub_rss_kb']} kB, sub RSS {warm['sub_rss_kb']}->{last['sub_rss_kb']} kB",
          flush=True)
    return result


def _line(row: dict) -> str:
    loom, raw = row['loom'], row['raw']
    return (f"{row['scenario']:<22} {row['where']:<13} {row['level']:<10} subs={row['subs']} "
            f"loom {loom['throughput_eps']:>9.0f} ev/s p99 {loom['latency']['p99_us']:>8.1f} us | "
            f"raw {raw['throughput_eps']:>9.0f} ev/s p99 {raw['latency']['p99_us']:>8.1f} us")


def machine() -> dict:
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
                if l.startswith('model name')), platform.processor())
    mem_kb = next(int(l.split()[1]) for l in open('/proc/meminfo') if l.startswith('MemTotal'))
    from importlib.metadata import version
    return {'cpu': cpu, 'cores': os.cpu_count(), 'memory_gb': round(mem_kb / 2**20, 1),
            'os': platform.platform(), 'python': platform.python_version(),
            'rclpy': version('rclpy'), 'rmw': os.environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp'),
            'executor': _executor_name(), 'date': time.strftime('%Y-%m-%d')}


def _executor_name() -> str:
    try:
        from rclpy.experimental import EventsExecutor  # noqa: F401
        return 'EventsExecutor'
    except ImportError:
        return 'SingleThreadedExecutor'


def write_markdown(results: dict, path: Path) -> None:
    m = results['machine']
    lines = ['# Event bus benchmark', '',
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}; "
             f"Python {m['python']}, rclpy {m['rclpy']}, {m['rmw']}, {m['executor']}; {m['date']}.",
             '', f"**{results.get('note', 'load not recorded')}.**",
             '', 'Loom vs raw rclpy publishing the same loom_msgs/Event content (100-byte payload)'
             ' with the same QoS profile and executor, in the same run. Ratio: Loom / raw; '
             'latency in microseconds.', '']
    for part in ('latency', 'throughput'):
        rows = results.get(part)
        if not rows:
            continue
        lines += [f'## {part.capitalize()}', '',
                  '| where | level | subs | Loom delivered ev/s | raw delivered ev/s | ratio | Loom publish ev/s | raw publish ev/s | Loom P50 / P99 / max | raw P50 / P99 / max | Loom received | raw received |',
                  '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
        for r in rows:
            lo, ra = r['loom'], r['raw']
            ratio = lo['throughput_eps'] / ra['throughput_eps'] if ra['throughput_eps'] else float('nan')
            fmt = lambda l: f"{l['p50_us']:.0f} / {l['p99_us']:.0f} / {l['max_us']:.0f}"
            lines.append(f"| {r['where']} | {r['level']} | {r['subs']} | {lo['throughput_eps']:.0f} "
                         f"| {ra['throughput_eps']:.0f} | {ratio:.2f} | {lo['publish_eps']:.0f} | "
                         f"{ra['publish_eps']:.0f} | {fmt(lo['latency'])} | "
                         f"{fmt(ra['latency'])} | {min(lo['received_per_sub'])}/{lo['sent']} | "
                         f"{min(ra['received_per_sub'])}/{ra['sent']} |")
        lines.append('')
    rows = results.get('overhead')
    if rows:
        lines += ['## Overhead: CPU per event at 5k events/s across processes', '',
                  '| level | Loom pub CPU/event | raw pub CPU/event | ratio | Loom sub CPU/event | '
                  'raw sub CPU/event | ratio | Loom received | raw received |',
                  '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
        for r in rows:
            lo, ra = r['loom'], r['raw']
            lines.append(
                f"| {r['level']} | {lo['pub_cpu_us_per_event']:.1f} us | {ra['pub_cpu_us_per_event']:.1f} us"
                f" | {lo['pub_cpu_us_per_event'] / ra['pub_cpu_us_per_event']:.2f} | "
                f"{lo['sub_cpu_us_per_event']:.1f} us | {ra['sub_cpu_us_per_event']:.1f} us | "
                f"{lo['sub_cpu_us_per_event'] / ra['sub_cpu_us_per_event']:.2f} | "
                f"{min(lo['received_per_sub'])}/{lo['sent']} | {min(ra['received_per_sub'])}/{ra['sent']} |")
        lines.append('')
    soak = results.get('soak')
    if soak:
        first, last = soak['samples'][0], soak['samples'][-1]
        lines += ['## Soak: batched, 10k events/s, across processes', '',
                  f"{soak['received']}/{soak['sent']} events received over {soak['seconds']} s "
                  f"(publisher achieved {soak['achieved_publish_eps']:.0f} ev/s); latency P50 / P99 "
                  f"/ max {soak['latency']['p50_us']:.0f} / {soak['latency']['p99_us']:.0f} / "
                  f"{soak['latency']['max_us']:.0f} us.", '',
                  '| | RSS at 1 s | RSS after warm-up (6 s) | RSS at end | growth after warm-up |',
                  '| --- | --- | --- | --- | --- |']
        warm = soak['samples'][min(5, len(soak['samples']) - 1)]
        for who in ('pub', 'sub'):
            lines.append(f"| {who} | {first[who + '_rss_kb']} kB | {warm[who + '_rss_kb']} kB | "
                         f"{last[who + '_rss_kb']} kB | {soak[who + '_rss_growth_kb_after_warmup']} kB |")
        lines.append('')
    path.write_text('\n'.join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('parts', nargs='*', default=['latency', 'overhead', 'throughput', 'soak'])
    parser.add_argument('--quick', action='store_true', help='short run (smoke test)')
    parser.add_argument('--out', default=str(HERE / 'results'), help='folder for bus.json/.md')
    sub_args = None
    if len(sys.argv) > 1 and sys.argv[1] == '_sub':
        sub = argparse.ArgumentParser()
        for name in ('--side', '--level', '--topic'):
            sub.add_argument(name)
        sub.add_argument('--count', type=int)
        sub.add_argument('--idle', type=float)
        sub.add_argument('--max-seconds', type=float)
        sub_args = sub.parse_args(sys.argv[2:])
        run_subscriber(sub_args)
        return 0
    args = parser.parse_args()
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    bench = Bench()
    results = {'machine': machine(), 'quick': args.quick,
               'note': os.environ.get('LOOM_BENCH_NOTE', 'taken with nothing else running')}
    if 'latency' in args.parts:
        results['latency'] = run_latency(bench, args.quick)
    if 'overhead' in args.parts:
        results['overhead'] = run_overhead(bench, args.quick)
    if 'throughput' in args.parts:
        results['throughput'] = run_throughput(bench, args.quick)
    if 'soak' in args.parts:
        results['soak'] = run_soak(bench, args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'bus.json').write_text(json.dumps(results, indent=1))
    write_markdown(results, out / 'bus.md')
    print(f'results: {out / "bus.md"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
