"""Benchmark of the Zenoh bridge and the cloud tier against raw Zenoh, measured in the same run.

    python bench/bridge_bench.py            # a few minutes (longer on a loaded machine)
    python bench/bridge_bench.py --quick    # smaller counts
    python bench/bridge_bench.py --render   # bridge.md again from bridge.json (LOOM_BENCH_NOTE)

Processes on loopback: a Zenoh router (loom_ros.bridge.zenoh_router), the bridge node, loom_cloud;
this process publishes on the robot's bus (rclpy) and subscribes on Zenoh. Baselines: raw Zenoh
put -> router -> subscriber for the same encoded events, and a raw Zenoh get answered by a bare
queryable. Composed rows: the bridge node in this process (as `loom bringup --composition` runs
it), the events handed to it in-process by the bus, no DDS hop; then this process and the router
are the only busy ones, as for raw Zenoh. Latency: the publisher's CLOCK_MONOTONIC stamp (in the event's metadata) to the Zenoh
callback, one clock across processes on one host. Everything runs twice in the same run: with
mutual TLS and the router's access control (the default, credentials in a temporary folder), and
over plain TCP (--insecure), so TLS's cost is measured. Writes bench/results/bridge.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
os.environ.setdefault('ROS_DOMAIN_ID', str(150 + os.getpid() % 50))
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'

from bus_bench import machine, summarize  # noqa: E402
from loom_ros.bus.qos import fastdds_environment, to_qos_profile  # noqa: E402
from loom_ros.config.params import config_dir  # noqa: E402

# What every Loom process runs with (bring-up sets it): Fast DDS with Loom's profile (a 16 MB
# shared-memory segment, a 4096-deep port queue). With the builtin 512 KB segment a best-effort
# burst of 10,000 events lost a third of them in DDS, before any reader could take them. This
# process and the bridge (which inherits the environment) both use it.
os.environ.update(fastdds_environment(os.environ, config_dir()))

STAMP = 'bench.t_ns'
PAYLOAD = b'x' * 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def start(args, ready=True):
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True, cwd=REPO)
    if ready:
        line = proc.stdout.readline()
        if not line.startswith('{'):
            raise SystemExit(f'{args} did not start: {line}')
    return proc


class Sink:
    """Counts a key's events as they arrive and, while `record`, their latency. By default the
    samples are Loom's codec; `count` and `events` read another format (the relay's CDR)."""

    def __init__(self, session, key_expr, count=None, events=None):
        from loom_ros.bridge import codec
        self.count, self.lat_us, self.first, self.last = 0, [], None, None
        self.record = False
        # The bridge sends a Batched topic's events as one sample (codec version 2): counted
        # per event, from the count in its first bytes.
        count, events = count or codec.event_count, events or codec.decode_all

        def on(sample):
            now = time.monotonic_ns()
            data = sample.payload.to_bytes()
            self.count += count(data)
            self.first = self.first or now
            self.last = now
            if self.record:
                for event in events(data):
                    self.lat_us.append((now - int(event.metadata[STAMP])) / 1000.0)
        self.sub = session.declare_subscriber(key_expr, on)


# The floor of any bridge in its own process: a relay that does nothing but rclpy's raw take of
# each DDS message and one Zenoh put of its bytes (no decode, no checks, no gate, no counters),
# with the bridge's reader depth and Zenoh options. Its rows say what the DDS hop itself costs
# on this machine, next to the bridge's.
RELAY = '''
import json, sys
sys.path.insert(0, {repo!r})
import rclpy, zenoh
from rclpy.node import Node
from loom_msgs.msg import Event, EventBatch
from loom_ros.bridge.zenoh_link import session_config
from loom_ros.bus.executor import make_executor
from loom_ros.bus.names import to_ros_topic
from loom_ros.bus.qos import to_qos_profile, to_zenoh_options, wire_type
from loom_ros.security import keys
rclpy.init()
node = Node('raw_relay', namespace='/bench')
session = zenoh.open(session_config('client', [{ep!r}], identity=keys.load({fleet!r}, 'bench_tool')
                                    if {secure!r} else None))
pub = session.declare_publisher({key!r}, **to_zenoh_options({level!r}))
profile = to_qos_profile({level!r})
profile.depth = {depth!r}
node.create_subscription(Event if wire_type({level!r}) == 'Event' else EventBatch,
                         to_ros_topic({topic!r}), lambda data: pub.put(data), profile, raw=True)
executor = make_executor()
executor.add_node(node)
print(json.dumps({{'ready': True}}), flush=True)
while True:   # turns, as Loom's nodes spin (this rclpy's EventsExecutor.spin() ran no callback)
    executor.spin_once(timeout_sec=0.5)
'''
RELAY_TOPICS = {'batched': 'bench.relay.batched', 'realtime': 'bench.relay.realtime'}


def _relay_count(level: str):
    """The relay's samples are CDR: an Event is one; an EventBatch says its count at byte 36
    (after the header Loom's bus writes, frame_id empty)."""
    if level == 'realtime':
        return lambda data: 1
    import struct
    return lambda data: struct.unpack_from('<I', data, 36)[0]


def _relay_events(level: str):
    from loom_ros.bus.wire import decode_event_batch, decode_event_message
    if level == 'realtime':
        return lambda data: [decode_event_message(data)[2]]
    return lambda data: decode_event_batch(data)[2]


def wait(cond, limit=30.0, spin=None):
    deadline = time.monotonic() + limit
    while not cond() and time.monotonic() < deadline:
        if spin:
            spin()
        else:
            time.sleep(0.005)
    return cond()


def cpu_seconds(pid: int | str | None) -> float:
    """CPU time (user + system) a process has used: this one when `pid` is None; a string
    'PID/task/TID' is one thread of it (the bridge's main thread runs all its Python)."""
    if pid is None:
        return time.process_time()
    fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


# A burst that lost events is over when nothing more arrived for this long.
QUIET_S = 2.0


def measure(publish, sink, spin, idle, n_burst, n_paced, rate_hz, cpu_of: dict,
            bridge_sent=None):
    """Throughput of a burst, and each process's CPU time per event until the burst's last
    event arrived (comparable even when other work shares the machine), then latency at a paced
    rate. `spin` runs between publishes and must not block; `idle(limit_s)` runs while waiting
    and may block up to limit_s, so a waiting publisher leaves the CPU to the processes it waits
    for. `bridge_sent()`: the bridge's `sent` counter (fresh), so a burst's losses split into
    those before the bridge (DDS) and after it (Zenoh)."""
    from loom_ros.bus.event import Event
    base = sink.count
    sent0 = bridge_sent() if bridge_sent else None

    def cpu_now():
        return {name: cpu_seconds(pid) for name, pid in cpu_of.items()}
    cpu0 = cpu_now()
    t0 = time.monotonic_ns()
    for i in range(n_burst):
        publish(Event(type='b', payload=PAYLOAD, metadata={STAMP: str(time.monotonic_ns())}))
        if i % 200 == 0:
            spin()
    seen, cpu1, changed_at = None, cpu0, time.monotonic()
    deadline = changed_at + 20.0
    while sink.count - base < n_burst and time.monotonic() < deadline:
        if sink.count != seen:   # CPU read as events arrive, so idle time after the last is not
            seen, cpu1, changed_at = sink.count, cpu_now(), time.monotonic()
        elif time.monotonic() - changed_at > QUIET_S:
            break                # the rest was lost
        idle(0.005)
    got = sink.count - base
    if got >= n_burst:
        cpu1 = cpu_now()
    bridge_put = bridge_sent() - sent0 if bridge_sent else None
    elapsed = max(1e-9, (sink.last - t0) / 1e9)
    cpu_us = {name: round((cpu1[name] - cpu0[name]) / max(got, 1) * 1e6, 1) for name in cpu_of}
    sink.record, sink.lat_us = True, []
    period = 1.0 / rate_hz
    next_t = time.monotonic()
    for _ in range(n_paced):
        publish(Event(type='b', payload=PAYLOAD, metadata={STAMP: str(time.monotonic_ns())}))
        next_t += period
        while (left := next_t - time.monotonic()) > 0:
            idle(left)
    wait(lambda: len(sink.lat_us) >= n_paced, 10.0, lambda: idle(0.005))
    sink.record = False
    return {'burst_sent': n_burst, 'burst_received': got, 'bridge_put': bridge_put,
            'events_per_s': round(got / elapsed, 1), 'cpu_us_per_event': cpu_us,
            'latency': summarize(sink.lat_us)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--only', choices=('tls', 'tcp'),
                        help='one transport, printed only (for profiling; writes no results)')
    parser.add_argument('--no-cloud', action='store_true',
                        help='skip the cloud round trips (printed only; writes no results)')
    parser.add_argument('--profile', metavar='DIR',
                        help='run the bridge process under cProfile, writing DIR/bridge_<transport>'
                             '.prof at its exit (printed only; writes no results)')
    parser.add_argument('--render', action='store_true',
                        help='write results/bridge.md again from results/bridge.json (its note '
                             'replaced by LOOM_BENCH_NOTE when set); measures nothing')
    args = parser.parse_args()
    if args.render:
        results = json.loads((HERE / 'results' / 'bridge.json').read_text())
        results['note'] = os.environ.get('LOOM_BENCH_NOTE', results['note'])
        (HERE / 'results' / 'bridge.json').write_text(json.dumps(results, indent=2) + '\n')
        (HERE / 'results' / 'bridge.md').write_text(render(results))
        return
    n_burst, n_paced, n_rt = (2000, 500, 100) if args.quick else (10000, 2000, 500)

    import rclpy
    from rclpy.signals import SignalHandlerOptions
    from loom_ros.security import keys

    tmp = Path(tempfile.mkdtemp())
    fleet = tmp / 'keys'
    ids = keys.ensure_local(fleet, {'router': 'router', 'bench': 'robot', 'cloud': 'cloud',
                                    'bench_tool': 'operator', COMPOSED_ROBOT: 'robot'})
    results = {'machine': machine(), 'note': os.environ.get('LOOM_BENCH_NOTE', 'taken with nothing else running'), 'counts': {
                   'burst': n_burst, 'paced': n_paced, 'round_trips': n_rt}}
    # The Zenoh subscriber counting arrivals lives in this process, beside the publisher: its
    # callbacks need the GIL, which a publishing loop hands over only every switch interval
    # (5 ms by default). Raw puts release it inside Zenoh; the bus publisher holds it, so its
    # subscriber fell behind and the router dropped Realtime samples addressed to this process
    # (the bridge had sent them). 0.5 ms, for both paths.
    sys.setswitchinterval(0.0005)
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    if args.only or args.no_cloud or args.profile:   # a partial run: printed, never results
        for transport in (args.only,) if args.only else ('tls', 'tcp'):
            part = run(transport, fleet, ids, tmp, n_burst, n_paced, n_rt, not args.no_cloud,
                       args.profile)
            for level in ('batched', 'realtime'):
                r = part[f'raw_zenoh_{level}']
                for path in ('bridge', 'composed', 'relay'):
                    b = part[f'{path}_{level}']
                    print(f"{transport} {level}: {path} {b['events_per_s']} ev/s "
                          f"({b['burst_received']}/{b['burst_sent']}, put by the bridge "
                          f"{b['bridge_put']}, cpu us/event "
                          f"{b['cpu_us_per_event']}), raw {r['events_per_s']} "
                          f"({r['burst_received']}/{r['burst_sent']}, {r['cpu_us_per_event']}), "
                          f"ratio {b['events_per_s'] / max(r['events_per_s'], 1e-9):.3f}")
        rclpy.try_shutdown()
        return
    for transport in ('tls', 'tcp'):
        results[transport] = run(transport, fleet, ids, tmp, n_burst, n_paced, n_rt)
    rclpy.try_shutdown()
    for transport in ('tls', 'tcp'):
        ratios(results[transport])
    # TLS's cost: plain TCP over mutual TLS, per path (events/s) and P50 latency.
    results['tls_cost'] = {name: {
        'events_per_s_tls_over_tcp': round(results['tls'][name]['events_per_s'] /
                                           max(results['tcp'][name]['events_per_s'], 1e-9), 3),
        'p50_tls_over_tcp': round(results['tls'][name]['latency']['p50_us'] /
                                  max(results['tcp'][name]['latency']['p50_us'], 1e-9), 2)}
        for name in PATHS}
    results['tls_cost'].update({name: {'p50_tls_over_tcp': round(
        results['tls'][name]['p50_us'] / max(results['tcp'][name]['p50_us'], 1e-9), 2)}
        for name in ROUND_TRIPS})
    out = HERE / 'results'
    out.mkdir(exist_ok=True)
    (out / 'bridge.json').write_text(json.dumps(results, indent=2) + '\n')
    (out / 'bridge.md').write_text(render(results))
    print(render(results))


PATHS = ('bridge_batched', 'composed_batched', 'relay_batched', 'raw_zenoh_batched',
         'bridge_realtime', 'composed_realtime', 'relay_realtime', 'raw_zenoh_realtime')
COMPOSED_ROBOT = 'benchc'   # the composed bridge's robot id and namespace (its own identity)
ROUND_TRIPS = ('cloud_intent', 'cloud_embed', 'raw_zenoh_get')


def run(transport: str, fleet: Path, ids: dict, tmp: Path, n_burst: int, n_paced: int,
        n_rt: int, cloud: bool = True, profile: str | None = None) -> dict:
    """Router, bridge and cloud processes over `transport` (tls: mutual TLS and access control;
    tcp: --insecure), then every measurement; the processes are stopped before it returns.
    `profile`: a folder where the bridge process writes its cProfile statistics."""
    import yaml
    import zenoh
    from loom_ros.bridge import codec
    from loom_ros.bridge.zenoh_link import session_config
    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.executor import make_executor
    from loom_ros.bus.qos import TopicQosTable, to_zenoh_options
    from loom_ros.cloud.client import CloudClient
    from loom_ros.config.params import node_defaults
    import rclpy
    secure = transport == 'tls'
    flags = ['--keys-dir', str(fleet)] + ([] if secure else ['--insecure'])
    (tmp / 'fleet.yaml').write_text(yaml.safe_dump({'grants': {'bench_tool': {
        'serve': ['loom/raw/**'], 'query': ['loom/raw/**']}}}))   # the raw get's echo
    identity = ids['bench_tool'] if secure else None
    port = free_port()
    ep = f'{transport}/127.0.0.1:{port}'
    procs = [start(['-m', 'loom_ros.bridge.zenoh_router', '--listen', ep, *flags,
                    '--fleet', str(tmp / 'fleet.yaml')])]
    params = tmp / f'bridge_{transport}.yaml'
    params.write_text(yaml.safe_dump({'/**': {'ros__parameters': {
        'robot_id': 'bench', 'connect': [ep], 'out_allow': ['agent.*.intent', 'sensor.**'],
        'audit_db': str(tmp / f'audit_{transport}.db'),
        'keys_dir': str(fleet), 'insecure': not secure, 'seal_sensitive': 'off',
        'buffer_max_events': 100000, 'status_period_s': 0.1}}}))
    profiler = []
    if profile:
        Path(profile).mkdir(parents=True, exist_ok=True)
        # The main thread's CPU time (not wall time, which a shared machine inflates), written
        # when the node exits on the benchmark's SIGTERM.
        out = str(Path(profile) / f'bridge_{transport}.prof')
        profiler = ['-c', 'import cProfile, runpy, sys, time\n'
                    'sys.argv = ["loom_ros.bridge.bridge_node", *sys.argv[1:]]\n'
                    'p = cProfile.Profile(time.thread_time)\n'
                    'p.enable()\n'
                    'try:\n'
                    '    runpy.run_module("loom_ros.bridge.bridge_node", run_name="__main__")\n'
                    'except SystemExit:\n'
                    '    pass\n'
                    f'finally:\n'
                    f'    p.disable()\n'
                    f'    p.dump_stats({out!r})\n']
    bridge = profiler or ['-m', 'loom_ros.bridge.bridge_node']
    procs.append(start([*bridge, '--ros-args', '-r', '__ns:=/bench', '--params-file',
                        str(params)], ready=False))
    # The server's per-client rate limit (config/cloud.yaml) would answer `busy` to a benchmark.
    from loom_ros.config.params import config_dir
    cloud_config = yaml.safe_load((config_dir() / 'cloud.yaml').read_text())
    cloud_config.setdefault('limits', {}).update(rate_per_s=1e6, burst=1e6)
    (tmp / 'cloud.yaml').write_text(yaml.safe_dump(cloud_config))
    if cloud:
        procs.append(start(['-m', 'loom_ros.cloud.server', '--connect', ep, *flags,
                            '--config', str(tmp / 'cloud.yaml')]))
    results: dict = {'transport': transport}
    node = sub_s = pub_s = None
    try:
        node = rclpy.create_node(f'bridge_bench_{transport}', namespace='/bench')
        executor = make_executor()
        executor.add_node(node)
        defaults = node_defaults('bridge_bench')
        bus = EventBus(node, topic_qos=TopicQosTable(defaults['bus.topic_qos'],
                                                     defaults['bus.default_qos']))
        spin = lambda: executor.spin_once(timeout_sec=0.0)  # noqa: E731
        from std_msgs.msg import String
        status = {'n': 0, 'sent': 0}

        def on_status(msg):
            status.update(n=status['n'] + 1, sent=json.loads(msg.data).get('sent', 0))
        node.create_subscription(String, 'zenoh_bridge/status', on_status,
                                 to_qos_profile('realtime'))   # as the bridge publishes it

        def bridge_sent() -> int:
            """The bridge's `sent` from a status message newer than this call."""
            seen = status['n']
            wait(lambda: status['n'] > seen + 1, 10.0,
                 lambda: executor.spin_once(timeout_sec=0.05))
            return status['sent']
        # Waiting, the bus side blocks in the executor (as a robot app does; it returns as soon
        # as a callback ran), as the raw side sleeps: a busy wait here took a core from the
        # bridge it waits for.
        idle = lambda limit_s: executor.spin_once(timeout_sec=limit_s)  # noqa: E731
        sub_s = zenoh.open(session_config('client', [ep], identity=identity))
        pub_s = zenoh.open(session_config('client', [ep], identity=identity))

        for topic, key, level in [('agent.bench.intent', 'loom/bench/agent/bench/intent', 'batched'),
                                  ('sensor.imu.motion', 'loom/bench/sensor/imu/motion', 'realtime')]:
            sink = Sink(sub_s, key)
            pub = bus.publisher_for(topic)
            if not wait(lambda: pub.get_subscription_count() >= 1, 30.0, spin):
                raise SystemExit('the bridge never subscribed')
            from loom_ros.bus.event import Event
            warm = lambda: bus.publish(topic, Event(type='w', metadata={STAMP: '0'}))  # noqa
            wait(lambda: sink.count > 0, 30.0, lambda: (warm(), spin(), time.sleep(0.01)))
            cpu_of = {'bench': None, 'bridge': procs[1].pid, 'router': procs[0].pid,
                      'bridge_main': f'{procs[1].pid}/task/{procs[1].pid}',
                      'bench_main': f'{os.getpid()}/task/{os.getpid()}'}
            through = measure(lambda e: bus.publish(topic, e), sink, spin, idle, n_burst,
                              n_paced, 1000, cpu_of, bridge_sent)
            raw_sink = Sink(sub_s, f'loom/raw/{level}')
            raw_pub = pub_s.declare_publisher(f'loom/raw/{level}', **to_zenoh_options(level))
            wait(lambda: raw_pub.matching_status.matching, 10.0)
            print(f'{transport} {level}: raw', file=sys.stderr, flush=True)
            # The raw publisher paces with short sleeps: a bare busy loop would hold the GIL the
            # Zenoh callback threads need (the bus side releases it inside rclpy's spin_once).
            raw_spin = lambda: time.sleep(0.0001)  # noqa: E731
            raw = measure(lambda e: raw_pub.put(codec.encode(e)), raw_sink, raw_spin,
                          lambda limit_s: raw_spin(), n_burst, n_paced, 1000, cpu_of)
            print(f'{transport} {level}: through the bridge {through}', file=sys.stderr,
                  flush=True)
            results[f'bridge_{level}'] = through
            results[f'raw_zenoh_{level}'] = raw
            results[f'relay_{level}'] = run_relay(level, ep, fleet, secure, bus, sub_s, spin,
                                                  idle, procs[0].pid, n_burst, n_paced)
            print(f"{transport} {level}: relay {results[f'relay_{level}']}", file=sys.stderr,
                  flush=True)

        results.update(run_composed(transport, ep, fleet, tmp, secure, sub_s, procs[0].pid,
                                    n_burst, n_paced, profile))
        if not cloud:
            return results
        # Cloud round trip vs a raw get answered by a bare queryable (same router, same sizes).
        client = CloudClient.from_keys(pub_s, fleet, 'bench_tool')
        echo = sub_s.declare_queryable('loom/raw/echo', lambda q: q.reply(q.key_expr, q.payload))
        wait(lambda: client.infer('intent', {'text': 'warm up'}, 5000).ok, 30.0)
        body = b'{"text":"will it rain today"}'
        server_us: list[float] = []   # the model's own time (and queue), as the server says

        def infer(task: str) -> bool:
            got = client.infer(task, {'text': 'will it rain today'}, 5000)
            server_us.append(got.server_ms * 1000.0)
            return got.ok
        for name, call in [
            ('cloud_intent', lambda: infer('intent')),
            ('cloud_embed', lambda: infer('embed')),
            ('raw_zenoh_get', lambda: len(list(pub_s.get('loom/raw/echo', payload=body,
                                                         timeout=5.0))) == 1),
        ]:
            lat, server_us[:] = [], []
            for _ in range(n_rt):
                t = time.perf_counter_ns()
                assert call(), name
                lat.append((time.perf_counter_ns() - t) / 1000.0)
            results[name] = summarize(lat)
            if server_us:
                results[name]['server'] = summarize(server_us)
            print(f'{transport} {name}: {results[name]}', file=sys.stderr, flush=True)
        del echo
    finally:
        for session in (sub_s, pub_s):
            if session is not None:
                session.close()
        if node is not None:
            node.destroy_node()
        for proc in reversed(procs):  # cloud, bridge, then the router they are connected to
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                results.setdefault('shutdown', []).append(
                    f'{proc.args[2][:40]} ignored SIGTERM for 10 s')
                proc.kill()
                proc.wait()
    return results


def run_relay(level: str, ep: str, fleet: Path, secure: bool, bus, sub_s, spin, idle,
              router_pid: int, n_burst: int, n_paced: int) -> dict:
    """The relay rows (RELAY): this process's bus publishes as for the bridge rows, on a topic
    only the relay reads; the relay process is stopped before it returns."""
    from loom_ros.bridge.bridge_node import OUT_READER_DEPTH
    from loom_ros.bus.event import Event
    key, topic = f'loom/raw/relay_{level}', RELAY_TOPICS[level]
    relay = start(['-c', RELAY.format(repo=str(REPO), ep=ep, fleet=str(fleet), secure=secure,
                                      key=key, level=level, depth=OUT_READER_DEPTH,
                                      topic=topic)])
    try:
        sink = Sink(sub_s, key, _relay_count(level), _relay_events(level))
        pub = bus.publisher_for(topic, level)
        if not wait(lambda: pub.get_subscription_count() >= 1, 30.0, spin):
            raise SystemExit('the relay never subscribed')
        warm = lambda: bus.publish(topic, Event(type='w', metadata={STAMP: '0'}), level)  # noqa
        wait(lambda: sink.count > 0, 30.0, lambda: (warm(), spin(), time.sleep(0.01)))
        cpu_of = {'bench': None, 'bridge': relay.pid, 'router': router_pid,
                  'bridge_main': f'{relay.pid}/task/{relay.pid}',
                  'bench_main': f'{os.getpid()}/task/{os.getpid()}'}
        return measure(lambda e: bus.publish(topic, e, level), sink, spin, idle, n_burst,
                       n_paced, 1000, cpu_of)
    finally:
        relay.terminate()
        try:
            relay.wait(timeout=10)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()


def run_composed(transport: str, ep: str, fleet: Path, tmp: Path, secure: bool, sub_s,
                 router_pid: int, n_burst: int, n_paced: int, profile: str | None) -> dict:
    """The composed rows: the bridge node built in this process from the node table (what
    `loom bringup --composition` does), spun by its own executor on its own thread, and an app
    node whose bus hands it the events in-process (on this thread: the bridge's send and Zenoh
    put run here). `profile`: cProfile of this thread's CPU over each burst, written to
    DIR/composed_<transport>_<level>.prof."""
    import threading

    import rclpy
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter
    from rclpy.task import Future

    from loom_ros.bringup.nodes import by_name
    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.event import Event
    from loom_ros.bus.executor import finalize_node, make_executor, spin_until
    from loom_ros.bus.qos import TopicQosTable
    from loom_ros.config.params import node_defaults
    ns = f'/{COMPOSED_ROBOT}'
    inbound = tmp / 'inbound_none.yaml'
    inbound.write_text('rules: []\n')
    params = {'robot_id': COMPOSED_ROBOT, 'connect': [ep],
              'out_allow': ['agent.*.intent', 'sensor.**'], 'inbound_file': str(inbound),
              'audit_db': str(tmp / f'audit_composed_{transport}.db'), 'keys_dir': str(fleet),
              'insecure': not secure, 'seal_sensitive': 'off', 'buffer_max_events': 100000,
              'status_period_s': 0.1, 'autostart': False}
    bridge = by_name('zenoh_bridge').load_class()(
        namespace=ns, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    for step in ('configure', 'activate'):
        if getattr(bridge, f'trigger_{step}')() != TransitionCallbackReturn.SUCCESS:
            raise SystemExit(f'composed bridge: {step} failed ({bridge.configure_error})')
    bridge_exec = make_executor()
    bridge_exec.add_node(bridge)
    stop = Future()
    thread = threading.Thread(target=spin_until, args=(bridge_exec, stop), daemon=True,
                              name='spin-zenoh_bridge')
    thread.start()
    app = rclpy.create_node('bench_app', namespace=ns)
    app_exec = make_executor()
    app_exec.add_node(app)
    defaults = node_defaults('bridge_bench')
    bus = EventBus(app, topic_qos=TopicQosTable(defaults['bus.topic_qos'],
                                                defaults['bus.default_qos']))
    spin = lambda: app_exec.spin_once(timeout_sec=0.0)  # noqa: E731
    idle = lambda limit_s: app_exec.spin_once(timeout_sec=limit_s)  # noqa: E731

    def bridge_sent() -> int:
        with bridge._lock:
            return bridge.bridge.stats['sent']
    results = {}
    try:
        for topic, key, level in [
                ('agent.bench.intent', f'loom/{COMPOSED_ROBOT}/agent/bench/intent', 'batched'),
                ('sensor.imu.motion', f'loom/{COMPOSED_ROBOT}/sensor/imu/motion', 'realtime')]:
            sink = Sink(sub_s, key)
            pub = bus.publisher_for(topic)
            if not wait(lambda: pub.get_subscription_count() >= 1, 30.0, spin):
                raise SystemExit('the composed bridge never subscribed')
            warm = lambda: bus.publish(topic, Event(type='w', metadata={STAMP: '0'}))  # noqa
            wait(lambda: sink.count > 0, 30.0, lambda: (warm(), spin(), time.sleep(0.01)))
            intra0 = bus.stats.intra_process
            cpu_of = {'bench': None, 'router': router_pid,
                      'bench_main': f'{os.getpid()}/task/{threading.get_native_id()}'}
            profiler = None
            if profile:
                import cProfile
                profiler = cProfile.Profile(time.thread_time)
                profiler.enable()
            got = measure(lambda e: bus.publish(topic, e), sink, spin, idle, n_burst, n_paced,
                          1000, cpu_of, bridge_sent)
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(str(Path(profile) / f'composed_{transport}_{level}.prof'))
            # Every event went in-process: none through DDS to the bridge.
            got['intra_process'] = bus.stats.intra_process - intra0
            print(f'{transport} {level}: composed {got}', file=sys.stderr, flush=True)
            results[f'composed_{level}'] = got
    finally:
        bus.destroy()
        app_exec.shutdown()
        app.destroy_node()
        stop.set_result(True)
        thread.join(10.0)
        bridge_exec.shutdown()
        finalize_node(bridge)
        bridge.destroy_node()
    return results


def ratios(results: dict) -> None:
    """Bridge (and composed bridge) over raw Zenoh, per level, and the cloud round trip over
    a raw get."""
    for level in ('batched', 'realtime'):
        r = results[f'raw_zenoh_{level}']
        for path, name in (('bridge', f'ratio_{level}'), ('composed', f'ratio_composed_{level}'),
                           ('relay', f'ratio_relay_{level}')):
            b = results[f'{path}_{level}']
            results[name] = {
                'throughput': round(b['events_per_s'] / max(r['events_per_s'], 1e-9), 3),
                'p50_latency': round(b['latency']['p50_us'] / max(r['latency']['p50_us'], 1e-9),
                                     2)}
    results['ratio_cloud_intent_p50'] = round(results['cloud_intent']['p50_us'] /
                                              results['raw_zenoh_get']['p50_us'], 2)
    # The target: a cloud round trip within 2x of a raw get plus the model's own time.
    for name in ('cloud_intent', 'cloud_embed'):
        if 'server' in results[name]:
            results[f'ratio_{name}_over_get_plus_model'] = round(
                results[name]['p50_us'] / (results['raw_zenoh_get']['p50_us']
                                           + results[name]['server']['p50_us']), 2)


def render(r: dict) -> str:
    m = r['machine']
    tls, tcp, cost = r['tls'], r['tcp'], r['tls_cost']
    lines = ['# Zenoh bridge and cloud tier benchmark', '',
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}; Python "
             f"{m['python']}, rclpy {m['rclpy']}, {m['rmw']}, {m['executor']}; {m['date']}.", '',
             f"**{r['note']}.**", '',
             'Through the bridge: this process publishes on the robot bus (DDS) -> bridge process '
             '-> Zenoh router process -> a Zenoh subscriber here. Raw: Zenoh put -> router -> '
             'subscriber, same encoded events and QoS, one sample per event as a robot app '
             'would put them. So the bridge path does more work per event than raw Zenoh: this '
             'process validates each event and writes it to DDS (CDR bytes, in EventBatches of '
             '100 on the Batched topic), and the bridge process takes it from DDS, checks it '
             'again, runs the privacy gate and re-encodes it for Zenoh; on a 2-core machine that '
             'is three busy processes against raw\'s two. The bridge sends a Batched topic\'s '
             'events as one sample per batch (codec version 2; Realtime one per event, express). '
             'Both sides use what a Loom process runs with: Fast DDS with config/fastdds.xml '
             '(bring-up sets it), the bridge\'s DDS readers 10000 deep. While waiting, this '
             'process blocks (the bus side in the executor, raw in short sleeps) and it hands the '
             'GIL over every 0.5 ms, so the Zenoh subscriber here keeps up on both paths. '
             'Latency at 1000 events/s, microseconds. '
             'TLS: mutual TLS with the router\'s access control (the default); TCP: --insecure. '
             'Both in the same run, TLS first. "put by bridge": how many of the burst the bridge '
             'took from DDS and put on Zenoh (its `sent` counter), so a loss shows on which side '
             'of the bridge it happened. Composed (composed_*): the bridge node runs in this '
             'process, built from the node table as `loom bringup --composition` builds it and '
             'spun on its own thread; this process\'s bus hands it each event in-process on the '
             'publishing thread (no DDS hop, no second decode), so, as for raw Zenoh, only this '
             'process and the router are busy; it still validates, gates and encodes every '
             'event and keeps every counter. Relay (relay_*): the floor of any bridge in its '
             'own process: a plain rclpy node that takes each DDS message raw and puts its bytes '
             'on Zenoh, nothing else (no decode, check, gate or counter), with the bridge\'s '
             'reader depth and Zenoh options; this process publishes to it as to the bridge. '
             'In the CPU tables its process is under "bridge".', '',
             '| path | burst sent | put by bridge TLS | put by bridge TCP | received TLS | '
             'received TCP | events/s TLS | events/s TCP | P50 TLS | P50 TCP | P99 TLS | P99 TCP |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for name in PATHS:
        a, b = tls[name], tcp[name]
        put_a, put_b = ('-' if x.get('bridge_put') is None else x['bridge_put'] for x in (a, b))
        lines.append(f"| {name} | {a['burst_sent']} | {put_a} | {put_b} | {a['burst_received']} | "
                     f"{b['burst_received']} | {a['events_per_s']} | {b['events_per_s']} | "
                     f"{a['latency']['p50_us']} | {b['latency']['p50_us']} | "
                     f"{a['latency']['p99_us']} | {b['latency']['p99_us']} |")
    for label, x in (('TLS', tls), ('TCP', tcp)):
        for path, prefix in (('bridge', 'ratio_'), ('composed bridge', 'ratio_composed_'),
                             ('relay (the floor of a bridge in its own process)',
                              'ratio_relay_')):
            lines += ['', f'Ratios {path} / raw over {label}: ' + '; '.join(
                f"{lv}: throughput {x[f'{prefix}{lv}']['throughput']}, P50 latency "
                f"{x[f'{prefix}{lv}']['p50_latency']}" for lv in ('batched', 'realtime')) + '.']
    lines += ['', 'CPU time per delivered event in the burst, microseconds (user + system, every '
              'thread, until the last event arrived; comparable across runs on a shared machine, '
              'unlike events/s). "bridge main" is the bridge process\'s main thread alone (all '
              'its Python: DDS take, decode, bus, gate, encode, Zenoh put); the rest of "bridge" '
              'is Fast DDS\'s and Zenoh\'s own threads (TLS included). "main" is this '
              'process\'s main thread: the publisher, and in the composed rows also the bridge\'s '
              'whole send path (gate, encode, Zenoh put), which runs on the publisher\'s thread. '
              '"total": this process + bridge + router.', '']
    for label, x in (('TLS', tls), ('TCP', tcp)):
        lines += [f'{label}:', '',
                  '| path | this process | main | bridge | bridge main | router | total |',
                  '| --- | --- | --- | --- | --- | --- | --- |']
        for name in PATHS:
            c = x[name]['cpu_us_per_event']
            total = round(c['bench'] + c.get('bridge', 0.0) + c['router'], 1)
            lines.append(f"| {name} | {c['bench']} | {c.get('bench_main', '-')} | "
                         f"{c.get('bridge', '-')} | {c.get('bridge_main', '-')} | "
                         f"{c['router']} | {total} |")
        lines.append('')
    lines.pop()
    lines += ['', 'Batched events wait up to bus.batch_max_age_ms (10 ms) for their EventBatch on '
              'the DDS hop.', '',
              '| round trip | P50 TLS | P50 TCP | P99 TLS | P99 TCP | calls |',
              '| --- | --- | --- | --- | --- | --- |']
    for name in ROUND_TRIPS:
        a, b = tls[name], tcp[name]
        lines.append(f"| {name} | {a['p50_us']} | {b['p50_us']} | {a['p99_us']} | "
                     f"{b['p99_us']} | {a['n']} |")
    lines += ['', "TLS's cost (TLS over TCP): " + '; '.join(
        f"{name} " + ', '.join(f'{k.replace("_tls_over_tcp", "")} {v}' for k, v in c.items())
        for name, c in cost.items()) + '.']
    for label, x in (('TLS', tls), ('TCP', tcp)):
        if x.get('shutdown'):
            lines += ['', f"Shutdown ({label}): {'; '.join(x['shutdown'])} (killed)."]
    lines += ['', 'Cloud intent request (MiniLM embedding + classifier in loom_cloud, signed both '
              f"ways) over a raw get to a bare queryable, P50 ratio: TLS "
              f"{tls['ratio_cloud_intent_p50']}, TCP {tcp['ratio_cloud_intent_p50']}."]
    if 'server' in tls['cloud_intent'] and 'server' in tcp['cloud_intent']:
        lines += ['', "The model's own time (the server's `server_ms` in each answer: the task "
                  'and any wait in its queue), P50 / P99 microseconds, and the round trip over '
                  "a raw get plus the model's time (P50; the target is at most 2):", '',
                  '| round trip | model P50 TLS | model P50 TCP | model P99 TLS | model P99 TCP | '
                  'over get + model TLS | over get + model TCP |',
                  '| --- | --- | --- | --- | --- | --- | --- |']
        for name in ('cloud_intent', 'cloud_embed'):
            a, b = tls[name]['server'], tcp[name]['server']
            lines.append(f"| {name} | {a['p50_us']} | {b['p50_us']} | {a['p99_us']} | "
                         f"{b['p99_us']} | {tls[f'ratio_{name}_over_get_plus_model']} | "
                         f"{tcp[f'ratio_{name}_over_get_plus_model']} |")
    lines.append('')
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
