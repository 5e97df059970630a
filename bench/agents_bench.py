"""Benchmark of the agent runtime at scale: N agents hosted in one AgentNode (counter behavior,
state and episode committed per event through the host's storage unit and its group-commit
writer) in one process, fed by one publisher through the intra-process fast path.

    python bench/agents_bench.py [--agents 10 100 1000] [--feeds streams broadcast]
                                 [--seconds 5] [--rate 10] [--workers 1] [--hosts 2]

Reports per N: RSS after start-up and at the end, dispatch latency (mailbox arrival to handler)
P50/P99/max, agent-events handled per second (handled = committed: counted when the commit's
ticket is done), and the writer's batches. Baseline in the same run: the RSS of N plain rclpy
nodes with one subscription each (what N agents would cost with no Loom at all).
Targets (issue 16): 1,000 agents at 10 events/s each handle every offered event with dispatch
P99 < 5 ms and RSS < 1 GB; 100 agents on one broadcast topic: dispatch P99 < 2 ms.
With --hosts H > 1 the largest N also runs split over H agent-host processes, fed over DDS.
Writes bench/results/agents.md and agents.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bus_bench import machine, rss_kb, summarize  # noqa: E402


def run_loom(n: int, seconds: float, rate: float, feed: str, workers: int,
             warmup_s: float = 1.0) -> dict:
    """N agents hosted in one AgentNode (one bus, one dispatcher). `feed`: 'streams' gives each
    agent its own topic and spreads the events evenly (N x rate events/s in all); 'broadcast'
    sends every event to every agent at once (bursts of N)."""
    import rclpy
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from loom_ros.agents.agent_node import AgentNode
    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.event import Event
    from loom_ros.bus.executor import make_executor
    tmp = Path(tempfile.mkdtemp())
    topic = (lambda i: f'bench.agents.s{i}') if feed == 'streams' else (lambda i: 'bench.agents')
    # Block style: the agents file's reader bounds flow-style brackets per file.
    (tmp / 'agents.yaml').write_text('agents:\n' + ''.join(
        f'  - id: a{i}\n    behavior: counter\n    subscriptions:\n      - {topic(i)}\n'
        '    qos: realtime\n    mailbox_size: 100000\n' for i in range(n)))
    rclpy.init()
    rss_before = rss_kb()
    started = time.monotonic()
    host = AgentNode(node_name='agent_host', parameter_overrides=[
        Parameter('agents', value='*'), Parameter('workers', value=workers),
        Parameter('agents_file', value=str(tmp / 'agents.yaml')),
        Parameter('storage.root', value=str(tmp / 'storage'))])
    host.trigger_configure()
    host.trigger_activate()
    agents = list(host.agents.values())
    setup_s = time.monotonic() - started
    feeder = Node('bench_feeder')
    bus = EventBus(feeder)
    executor = make_executor()
    executor.add_node(feeder)
    executor.add_node(host)
    rss_started = rss_kb()

    def plan(duration: float, label: str) -> tuple[list, float]:
        """(topic, agents reached, event id) to send over `duration` s, and the send rate."""
        if feed == 'streams':
            return [(topic(i % n), 1, f'{label}{i}') for i in range(int(duration * rate * n))], \
                rate * n
        return [('bench.agents', n, f'{label}{i}') for i in range(int(duration * rate))], rate

    def send(sends: list, total_rate: float, until: int) -> tuple[float, list]:
        """Publish on schedule, then spin until `until` agent-events are handled; the start,
        and how long after its scheduled time each publish returned (us): with `workers: 0`
        the handlers ran inside it, so a host that falls behind shows here, not in dispatch."""
        for t in {t for t, _, _ in sends}:   # publishers exist before the clock starts
            bus.publisher_for(t, 'realtime')
        late = []
        start = time.monotonic()
        for i, (t, _, event_id) in enumerate(sends):
            bus.publish(t, Event(type='tick', id=event_id), 'realtime')
            late.append((time.monotonic() - start - i / total_rate) * 1e6)
            target = start + (i + 1) / total_rate
            while time.monotonic() < target:
                executor.spin_once(timeout_sec=max(0.0, target - time.monotonic()))
        deadline = time.monotonic() + 120
        while sum(a.stats['handled'] for a in agents) < until and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.01)
        return start, late

    # Warm-up: each agent's first events take first-use paths (its first state keys, the first
    # statements); measured apart, then the measured run starts from empty mailboxes.
    warm, warm_rate = plan(warmup_s, 'w')
    warm_expected = sum(k for _, k, _ in warm)
    _, warm_late = send(warm, warm_rate, warm_expected)
    warm_handled = sum(a.stats['handled'] for a in agents)
    warm_dispatch = [x for a in agents for x in a.dispatch_us]
    for agent in agents:
        agent.dispatch_us.clear()
    sends, total_rate = plan(seconds, 't')
    expected = sum(k for _, k, _ in sends)
    start, late = send(sends, total_rate, warm_handled + expected)
    elapsed = time.monotonic() - start
    handled = sum(a.stats['handled'] for a in agents) - warm_handled
    writer = host.storage.writer
    dispatch = [x for a in agents for x in a.dispatch_us]
    result = {'agents': n, 'feed': feed, 'workers': workers, 'agent_events_expected': expected,
              'agent_events_handled': handled, 'handled_per_s': round(handled / elapsed, 1),
              'warmup_s': warmup_s, 'warmup_expected': warm_expected,
              'warmup_handled': warm_handled, 'warmup_dispatch': summarize(warm_dispatch),
              'setup_s': round(setup_s, 1), 'rss_before_mb': round(rss_before / 1024, 1),
              'rss_started_mb': round(rss_started / 1024, 1),
              'rss_end_mb': round(rss_kb() / 1024, 1), 'dispatch': summarize(dispatch),
              'late': summarize(late), 'warmup_late': summarize(warm_late),
              'commits': writer.batches, 'writes': writer.writes}
    host.trigger_deactivate()
    host.trigger_cleanup()
    rclpy.try_shutdown()
    return result


# The hosts' loop (code templates below): spin until all that was sent is taken (`{taken}`, an
# expression), or the stop file says to give up. Counted every 20 ms, not after each callback: a
# sum over 1,000 agents per event taken cost a host more than the events did. CPU from the first
# event on (matching 1,000 topics costs CPU before it).
SPIN_UNTIL_TAKEN = '''cpu = None
check = 0.0
while True:
    executor.spin_once(timeout_sec=0.02)
    if time.monotonic() >= check:
        taken = {taken}
        if cpu is None and taken:
            cpu = time.process_time()
        if taken >= {expected} or os.path.exists({stop!r}):
            break
        check = time.monotonic() + 0.02
done = time.time()
'''

HOST = '''
import gc, json, os, sys, time
sys.path.insert(0, {here!r})
import rclpy
from rclpy.parameter import Parameter
from loom_ros.agents.agent_node import AgentNode
from loom_ros.bus.executor import make_executor
from bus_bench import rss_kb
rclpy.init()
host = AgentNode(node_name='agent_host_{k}', parameter_overrides=[
    Parameter('agents', value='*'), Parameter('workers', value={workers}),
    Parameter('agents_file', value={agents_file!r}),
    Parameter('storage.root', value={root!r})])
host.trigger_configure()
host.trigger_activate()
agents = list(host.agents.values())
e2e_ms = []   # publish to handler start, from the event's timestamp_ms (whole ms when built)


def timed(handle):
    def run(event, arrived):
        e2e_ms.append(time.time() * 1000.0 - event.timestamp_ms)
        return handle(event, arrived)
    return run


for agent in agents:   # instrumentation only: the agent's own handler runs unchanged
    agent._handle = timed(agent._handle)
executor = make_executor()
executor.add_node(host)
print(json.dumps({{'ready': len(agents), 'rss_started_mb': round(rss_kb() / 1024, 1)}}), flush=True)
''' + SPIN_UNTIL_TAKEN + '''dispatch = [round(x) for a in agents for x in a.dispatch_us]
with open({result!r}, 'w') as out:   # a file: the samples are more than a pipe holds
    json.dump({{'handled': sum(a.stats['handled'] for a in agents), 'dispatch': dispatch,
               'done_wall': done, 'rss_end_mb': round(rss_kb() / 1024, 1),
               'commits': host.storage.writer.batches, 'end_to_end_ms': e2e_ms,
               'cpu_s': time.process_time() - (cpu or 0.0)}}, out)
os._exit(0)   # tearing hundreds of agents down measures nothing
'''


def _spawn_hosts(codes: list[str]) -> tuple[list, list[dict], float]:
    """One process per code string; (the processes, their ready lines, seconds until all were
    ready)."""
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for code in codes]
    return procs, [json.loads(p.stdout.readline()) for p in procs], time.monotonic() - started


def _wait_matched(pubs, count: int) -> None:
    """Until every publisher has `count` subscriptions (5 minutes at most)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and any(p.get_subscription_count() < count for p in pubs):
        time.sleep(0.1)


def _feed(count: int, total_rate: float, publish, executor) -> tuple[float, float, float]:
    """publish(j) for j in range(count) on schedule (total_rate a second), spinning `executor`
    between; (wall start, the feeder's CPU, its seconds)."""
    start, start_wall, cpu = time.monotonic(), time.time(), time.process_time()
    for j in range(count):
        publish(j)
        target = start + (j + 1) / total_rate
        while (left := target - time.monotonic()) > 0:
            executor.spin_once(timeout_sec=min(left, 0.001))
    return start_wall, time.process_time() - cpu, time.monotonic() - start


def _collect(procs: list, tmp: Path, hosts: int) -> list[dict]:
    """The hosts' results. A host ends once it has taken all it was sent; one that lost events
    on the way (best effort) is stopped 120 s after the last was sent, and its count says so."""
    stop_at = time.monotonic() + 120
    while any(p.poll() is None for p in procs) and time.monotonic() < stop_at:
        time.sleep(0.05)
    (tmp / 'stop').touch()
    for p in procs:
        p.wait(60)
    return [json.loads((tmp / f'result_{k}.json').read_text()) for k in range(hosts)]


def _end_to_end(results: list[dict]) -> dict:
    """Publish to handler (Loom) or callback (raw rclpy) over all hosts, in microseconds. From
    the event's timestamp_ms, whole milliseconds when the feeder built it, so each sample reads
    0-1 ms high, on both sides alike."""
    return summarize([x * 1000.0 for r in results for x in r['end_to_end_ms']])


def run_hosts(n: int, hosts: int, seconds: float, rate: float, feed: str, workers: int,
              qos: str = 'batched') -> dict:
    """N agents split over `hosts` agent-host processes (agent i in host i % hosts), as the
    lifecycle manager's agent groups run them; this process publishes over DDS once every
    host's subscriptions have matched. At `qos` batched (reliable): realtime is best effort,
    and across processes on 2 busy cores it lost a third of the events."""
    import rclpy
    from rclpy.node import Node

    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.event import Event
    from loom_ros.bus.executor import make_executor
    tmp = Path(tempfile.mkdtemp())
    topic = (lambda i: f'bench.agents.s{i}') if feed == 'streams' else (lambda i: 'bench.agents')
    if feed == 'streams':
        sends = [(topic(i % n), i % n) for i in range(int(seconds * rate * n))]
        total_rate = rate * n
    else:
        sends = [('bench.agents', -1) for _ in range(int(seconds * rate))]
        total_rate = rate
    codes = []
    for k in range(hosts):
        ids = [i for i in range(n) if i % hosts == k]
        (tmp / f'agents_{k}.yaml').write_text('agents:\n' + ''.join(
            f'  - id: a{i}\n    behavior: counter\n    subscriptions:\n      - {topic(i)}\n'
            f'    qos: {qos}\n    mailbox_size: 100000\n' for i in ids))
        expected = sum(1 for _, i in sends if i == -1 or i % hosts == k) * \
            (len(ids) if feed == 'broadcast' else 1)
        codes.append(HOST.format(here=str(HERE), k=k, workers=workers,
                                 taken="sum(a.stats['handled'] for a in agents)",
                                 agents_file=str(tmp / f'agents_{k}.yaml'),
                                 root=str(tmp / f'storage_{k}'), expected=expected,
                                 stop=str(tmp / 'stop'), result=str(tmp / f'result_{k}.json')))
    procs, ready, setup_s = _spawn_hosts(codes)
    rclpy.init()
    feeder = Node('bench_feeder')
    bus = EventBus(feeder)
    pubs = {t: bus.publisher_for(t, qos) for t, _ in sends}
    _wait_matched(pubs.values(), hosts if feed == 'broadcast' else 1)
    executor = make_executor()   # the bus's timers (a Batched topic's flush by age)
    executor.add_node(feeder)
    start_wall, feeder_cpu, feeder_s = _feed(
        len(sends), total_rate,
        lambda j: bus.publish(sends[j][0], Event(type='tick', id=f't{j}'), qos), executor)
    bus.flush()
    results = _collect(procs, tmp, hosts)
    elapsed = max(r['done_wall'] for r in results) - start_wall
    handled = sum(r['handled'] for r in results)
    expected = len(sends) * (n if feed == 'broadcast' else 1)
    bus.destroy()
    feeder.destroy_node()
    rclpy.try_shutdown()
    return {'agents': n, 'feed': feed, 'hosts': hosts, 'workers': workers,
            'agent_events_expected': expected, 'agent_events_handled': handled,
            'handled_per_s': round(handled / elapsed, 1), 'setup_s': round(setup_s, 1),
            'rss_started_mb': round(sum(r['rss_started_mb'] for r in ready), 1),
            'rss_end_mb': round(sum(r['rss_end_mb'] for r in results), 1),
            'dispatch': summarize([x for r in results for x in r['dispatch']]),
            'end_to_end': _end_to_end(results),
            'commits': sum(r['commits'] for r in results),
            'receiver_cpu_us': round(1e6 * sum(r['cpu_s'] for r in results) / max(handled, 1), 1),
            'feeder_cpu_us': round(1e6 * feeder_cpu / len(sends), 1),
            'sent_per_s': round(len(sends) / feeder_s, 1)}


RAW_HOST = '''
import json, os, sys, time, rclpy
from rclpy.experimental import EventsExecutor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from loom_msgs.msg import Event
sys.path.insert(0, {here!r})
from bus_bench import rss_kb
rclpy.init()
node = Node('raw_host_{k}')
got = [0]
e2e_ms = []   # publish to this callback, from the event's timestamp_ms (as the Loom hosts)
def count(msg):
    got[0] += 1
    e2e_ms.append(time.time() * 1000.0 - msg.timestamp_ms)
qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                 history=HistoryPolicy.KEEP_LAST)
subs = [node.create_subscription(Event, t, count, qos) for t in {topics!r}]
executor = EventsExecutor()
executor.add_node(node)
print(json.dumps({{'ready': len(subs), 'rss_started_mb': round(rss_kb() / 1024, 1)}}), flush=True)
''' + SPIN_UNTIL_TAKEN + '''with open({result!r}, 'w') as out:
    json.dump({{'handled': got[0], 'done_wall': done, 'rss_end_mb': round(rss_kb() / 1024, 1),
               'cpu_s': time.process_time() - (cpu or 0.0), 'end_to_end_ms': e2e_ms}}, out)
os._exit(0)
'''


def run_raw_hosts(n: int, hosts: int, seconds: float, rate: float) -> dict:
    """The baseline of `run_hosts` with feed streams: the same N topics, rate and split over
    `hosts` processes, but plain rclpy on both sides (loom_msgs/Event, reliable, a callback that
    only counts; publishers in this process, one message per event, as fast as the schedule
    lets). What rclpy and DDS alone cost for this fan-in on this machine."""
    import rclpy
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

    from loom_msgs.msg import Event as EventMsg
    from loom_ros.bus.names import to_ros_topic
    from loom_ros.bus.executor import make_executor
    tmp = Path(tempfile.mkdtemp())
    topics = [to_ros_topic(f'bench.raw.s{i}') for i in range(n)]
    sends = [i % n for i in range(int(seconds * rate * n))]
    procs, ready, setup_s = _spawn_hosts([
        RAW_HOST.format(here=str(HERE), k=k, taken='got[0]',
                        topics=[topics[i] for i in range(n) if i % hosts == k],
                        expected=sum(1 for i in sends if i % hosts == k), stop=str(tmp / 'stop'),
                        result=str(tmp / f'result_{k}.json')) for k in range(hosts)])
    rclpy.init()
    from rclpy.node import Node
    feeder = Node('raw_feeder')
    qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                     history=HistoryPolicy.KEEP_LAST)
    pubs = [feeder.create_publisher(EventMsg, t, qos) for t in topics]
    _wait_matched(pubs, 1)
    executor = make_executor()
    executor.add_node(feeder)
    msg = EventMsg()
    msg.type, msg.source = 'tick', 'bench'
    total_rate = rate * n

    def publish(j: int) -> None:
        msg.id = f't{j}'
        msg.timestamp_ms = int(time.time() * 1000)   # as a Loom Event is stamped when built
        pubs[sends[j]].publish(msg)
    start_wall, feeder_cpu, feeder_s = _feed(len(sends), total_rate, publish, executor)
    results = _collect(procs, tmp, hosts)
    elapsed = max(r['done_wall'] for r in results) - start_wall
    handled = sum(r['handled'] for r in results)
    feeder.destroy_node()
    rclpy.try_shutdown()
    return {'agents': n, 'feed': 'raw rclpy', 'hosts': hosts, 'agent_events_expected': len(sends),
            'agent_events_handled': handled, 'handled_per_s': round(handled / elapsed, 1),
            'end_to_end': _end_to_end(results),
            'setup_s': round(setup_s, 1),
            'rss_started_mb': round(sum(r['rss_started_mb'] for r in ready), 1),
            'rss_end_mb': round(sum(r['rss_end_mb'] for r in results), 1),
            'receiver_cpu_us': round(1e6 * sum(r['cpu_s'] for r in results) / max(handled, 1), 1),
            'feeder_cpu_us': round(1e6 * feeder_cpu / len(sends), 1),
            'sent_per_s': round(len(sends) / feeder_s, 1)}


def run_core(n: int, rounds: int = 10) -> dict:
    """The runtime without ROS: N agents, `rounds` events each handled in turn on this thread
    (submit, move on), then until every commit is done; CPU and wall per event. Raw baseline in
    the same process: the same state upsert + episode insert, one SQLite transaction per event
    (WAL, synchronous=NORMAL), as each agent's own file did before the layer."""
    import sqlite3

    from loom_ros.agents.behavior import behavior_entry_points
    from loom_ros.agents.config import AgentConfig
    from loom_ros.agents.runtime import Agent
    from loom_ros.bus.event import Event
    from loom_ros.bus.executor import HEAP
    from loom_ros.config.params import node_defaults
    from loom_ros.storage.storage import Storage, StorageConfig
    tmp = Path(tempfile.mkdtemp())
    storage = Storage(StorageConfig(str(tmp), unit='core', max_delay_ms=1.0, hot_max_events=0))
    behaviors = behavior_entry_points()
    agents = [Agent(AgentConfig(id=f'a{i}', behavior='counter', subscriptions=['t'],
                                mailbox_size=100000), storage, lambda *a: None,
                    behaviors=behaviors) for i in range(n)]
    for agent in agents:
        agent.configure()
        agent.activate()
        for r in range(rounds):
            agent.offer(Event(type='tick', id=f'{agent.id}-{r}'))
    total = n * rounds
    # As an active host runs (AgentNode.on_activate): the configured heap frozen, no full
    # garbage-collection pass on CPython's schedule (they took about 40 % of this loop's CPU),
    # young passes as config/loom.yaml sets them for an active host.
    HEAP.settle('core')
    HEAP.hold_full_passes('core', node_defaults('agent')['gc_young_threshold'])
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        for agent in agents:
            agent.handle_one()
    submitted = time.perf_counter()
    storage.flush()
    done, cpu_done = time.perf_counter(), time.process_time()
    HEAP.unsettle('core')
    assert sum(a.stats['handled'] for a in agents) == total
    commits = storage.writer.batches
    storage.close()
    conn = sqlite3.connect(tmp / 'raw.db', isolation_level=None)
    conn.execute('pragma journal_mode=wal')
    conn.execute('pragma synchronous=normal')
    conn.execute('create table kv (ns text, key text, schema int, value text, updated_ms int, '
                 'primary key (ns, key)) without rowid')
    conn.execute('create table episodes (id integer primary key, agent_id text, event_id text, '
                 'time_ms int, type text, source text, tags text, payload text, bytes int)')
    raw_wall, raw_cpu = time.perf_counter(), time.process_time()
    for i in range(total):
        conn.execute('begin')
        conn.execute('insert into kv values (?, ?, 2, ?, 0) on conflict (ns, key) do update set '
                     'value = excluded.value', ('agent_state', f'a{i % n}',
                                                json.dumps({'state': {'total': i}, 'events': i})))
        conn.execute('insert into episodes (agent_id, event_id, time_ms, type, source, tags, '
                     "payload, bytes) values (?, ?, 0, 'tick', '', '[]', '', 64)",
                     (f'a{i % n}', f'e{i}'))
        conn.execute('commit')
    raw_done, raw_cpu_done = time.perf_counter(), time.process_time()
    return {'agents': n, 'events': total, 'commits': commits,
            'worker_us': round(1e6 * (submitted - wall) / total, 1),
            'committed_us': round(1e6 * (done - wall) / total, 1),
            'cpu_us': round(1e6 * (cpu_done - cpu) / total, 1),
            'raw_us': round(1e6 * (raw_done - raw_wall) / total, 1),
            'raw_cpu_us': round(1e6 * (raw_cpu_done - raw_cpu) / total, 1)}


RAW = '''
import json, os, sys, rclpy
from rclpy.node import Node
from std_msgs.msg import String
sys.path.insert(0, {here!r})
from bus_bench import rss_kb
rclpy.init()
before = rss_kb()
nodes = []
for i in range({n}):
    node = Node(f'raw{{i}}')
    node.create_subscription(String, 'bench/raw', lambda m: None, 10)
    nodes.append(node)
print(json.dumps({{'rss_before_mb': round(before / 1024, 1), 'rss_started_mb': round(rss_kb() / 1024, 1)}}), flush=True)
os._exit(0)   # tearing 1,000 nodes down takes minutes and measures nothing
'''


def run_raw(n: int) -> dict:
    """The baseline's RSS; {} when it could not finish (1,000 plain nodes took over 15 minutes
    to create on the loaded 2-core machine)."""
    try:
        out = subprocess.run([sys.executable, '-c', RAW.format(n=n, here=str(HERE))],
                             capture_output=True, text=True, check=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _one_run(args, n: int, feed: str) -> dict | None:
    """One run in its own process (RSS is not shared between runs): its JSON line, or None
    (its stderr printed) when it failed."""
    run = subprocess.run([sys.executable, __file__, str(n), feed, '--seconds', str(args.seconds),
                          '--rate', str(args.rate), '--workers', str(args.workers),
                          '--warmup', str(args.warmup)],
                         capture_output=True, text=True, timeout=1800)
    if run.returncode:
        print(run.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def _late(run: dict) -> str:
    late = run.get('late')
    if not late:
        return '-'
    return f"{late['p50_us']:.0f} / {late['p99_us']:.0f} / {late['max_us']:.0f} us"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--agents', type=int, nargs='+', default=[10, 100, 1000])
    parser.add_argument('--feeds', nargs='+', default=['streams', 'broadcast'])
    parser.add_argument('--seconds', type=float, default=5.0)
    parser.add_argument('--rate', type=float, default=10.0, help='events/s per agent')
    parser.add_argument('--warmup', type=float, default=1.0,
                        help='seconds of the same feed before the measured run (reported apart)')
    parser.add_argument('--workers', type=int, default=1,
                        help="the host's dispatcher threads; 0: handlers on the delivering thread")
    parser.add_argument('--hosts', type=int, default=2,
                        help='also run the largest N split over this many agent-host processes '
                        '(0: not)')
    parser.add_argument('--out', default=str(HERE / 'results'))
    parser.add_argument('_one', nargs='*', help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    if args._one:  # one run per process, so RSS is not shared between runs
        n, feed = args._one
        if feed == 'core':
            print(json.dumps(run_core(int(n))))
            return 0
        if feed.startswith('hosts:'):   # hosts:<count>:<feed>; feed 'raw': the rclpy baseline
            _, count, kind = feed.split(':')
            if kind == 'raw':
                print(json.dumps(run_raw_hosts(int(n), int(count), args.seconds, args.rate)))
                return 0
            print(json.dumps(run_hosts(int(n), int(count), args.seconds, args.rate, kind,
                                       args.workers)))
            return 0
        print(json.dumps(run_loom(int(n), args.seconds, args.rate, feed, args.workers,
                                  args.warmup)))
        return 0
    rows, raw = [], {}
    for n in args.agents:   # Loom first, the baselines after: each its own process
        for feed in args.feeds:
            loom = _one_run(args, n, feed)
            if loom is None:
                return 1
            row = {'loom': loom}
            rows.append(row)
            print(json.dumps(row), flush=True)
    multi = []
    for feed in args.feeds if args.hosts > 1 else ():   # the largest N over several hosts
        n = max(args.agents)
        run = _one_run(args, n, f'hosts:{args.hosts}:{feed}')
        if run is None:
            return 1
        multi.append(run)
        print(json.dumps(multi[-1]), flush=True)
    if args.hosts > 1 and 'streams' in args.feeds:   # its baseline: plain rclpy, same fan-in
        run = _one_run(args, max(args.agents), f'hosts:{args.hosts}:raw')
        if run is None:
            return 1
        multi.append(run)
        print(json.dumps(multi[-1]), flush=True)
    cores = []
    for n in args.agents:   # the runtime's cost per event without ROS, against raw SQLite
        core = subprocess.run([sys.executable, __file__, str(n), 'core'], capture_output=True,
                              text=True, timeout=1800)
        if core.returncode:
            print(core.stderr[-3000:], file=sys.stderr)
            return 1
        cores.append(json.loads(core.stdout.strip().splitlines()[-1]))
        print(json.dumps(cores[-1]), flush=True)
    for n in args.agents:
        raw[n] = run_raw(n)
        print(json.dumps({'raw': n, **raw[n]}), flush=True)
    for row in rows:
        row['raw'] = raw[row['loom']['agents']]
    results = {'machine': machine(), 'seconds': args.seconds, 'rate': args.rate,
               'warmup_s': args.warmup,
               'workers': args.workers, 'rows': rows, 'hosts': multi, 'core': cores}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'agents.json').write_text(json.dumps(results, indent=1))
    m = results['machine']
    lines = ['# Agent runtime benchmark', '',
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}; Python "
             f"{m['python']}, rclpy {m['rclpy']}, {m['rmw']}, {m['executor']}; {m['date']}.", '',
             f"N agents hosted in one AgentNode (`agents: '*'`, one bus, "
             + ('handlers run on the thread that delivers the event (`workers: 0`)'
                if args.workers == 0 else f'a dispatcher with {args.workers} worker thread(s)')
             + '), counter behavior, state and episode committed per '
             'event as one write to the host\'s storage unit (`<storage.root>/db/agent_host.db`, '
             'one group-commit writer for all agents; the worker submits and moves on, the event '
             'counts as handled when its commit is done). '
             f"Each agent gets {args.rate:g} events/s for {args.seconds:g} s "
             'from a publisher in the same process (intra-process fast path), after '
             f'{args.warmup:g} s of the same feed whose dispatch is reported apart (an '
             "agent's first events take first-use paths: its first state keys, the first "
             'statements); the measured run starts once the warm-up is handled. `streams`: each '
             'agent has its own topic and the events are spread evenly; `broadcast`: one topic, '
             'every event reaches all N agents at the same instant (bursts of N). Dispatch = '
             'mailbox arrival to handler start. Behind schedule: how long after its scheduled '
             'time each publish returned (with `workers: 0` the handlers ran inside it, so a '
             'host that cannot keep up shows here, where dispatch would not). Baseline: N plain '
             'rclpy nodes with one subscription each, in another process.', '',
             '| agents | feed | RSS Loom (started / end) | RSS raw rclpy nodes | start-up | dispatch P50 / P99 / max | behind schedule P50 / P99 / max | agent-events handled/s | handled | commits | warm-up dispatch P50 / P99 / max |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for row in rows:
        lo, ra = row['loom'], row['raw']
        d, w = lo['dispatch'], lo['warmup_dispatch']
        lines.append(f"| {lo['agents']} | {lo['feed']} | {lo['rss_started_mb']} / "
                     f"{lo['rss_end_mb']} MB | {ra.get('rss_started_mb', 'timed out')} MB | "
                     f"{lo['setup_s']} s | "
                     f"{d['p50_us']:.0f} / {d['p99_us']:.0f} / {d['max_us']:.0f} us | "
                     f"{_late(lo)} | {lo['handled_per_s']:.0f} | "
                     f"{lo['agent_events_handled']}/{lo['agent_events_expected']} | "
                     f"{lo['commits']} | {w['p50_us']:.0f} / {w['p99_us']:.0f} / "
                     f"{w['max_us']:.0f} us |")
    if multi:
        lines += ['', f'The largest N split over {args.hosts} agent-host processes (agent i in '
                  f'host i mod {args.hosts}, each an AgentNode with its own storage unit and '
                  'writer), as the lifecycle manager runs agent groups; the publisher is this '
                  'process, over DDS at QoS batched (reliable; realtime is best effort and lost '
                  'a third of the events across processes here), once every subscription has '
                  'matched. Dispatch still counts from mailbox arrival, after the batch\'s '
                  'wait. RSS is the hosts\' sum; handled/s counts until the last host '
                  'committed all it was sent.', '',
                  'The `raw rclpy` row is the baseline of the streams row: the same topics, '
                  'rate and split, plain rclpy on both sides (loom_msgs/Event, reliable, a '
                  'callback that only counts). Publish to handler: from the event\'s '
                  'timestamp_ms (whole milliseconds, taken when the feeder built it, so 0-1 ms '
                  'high) to the agent\'s handler starting, or to the raw callback: what DDS, '
                  'the host\'s queues and the machine\'s load add, end to end. CPU per event: all the receiving processes\' '
                  'CPU from their first event to done, over the events they took; the '
                  'feeder\'s while it published. sent/s: the feeder\'s rate (the schedule asks '
                  'for N x rate).', '',
                  '| agents | feed | hosts | RSS (started / end, all hosts) | start-up | '
                  'dispatch P50 / P99 / max | publish to handler P50 / P99 / max | '
                  'agent-events handled/s | vs raw rclpy | handled | '
                  'commits | CPU / event receivers, feeder | sent/s |',
                  '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
        raw_rate = next((lo['handled_per_s'] for lo in multi if lo['feed'] == 'raw rclpy'),
                        None)
        for lo in multi:
            d, e = lo.get('dispatch'), lo.get('end_to_end')
            ratio = (f"{lo['handled_per_s'] / raw_rate:.2f}x" if raw_rate and
                     lo['feed'] in ('streams', 'raw rclpy') else '-')
            lines.append(f"| {lo['agents']} | {lo['feed']} | {lo['hosts']} | "
                         f"{lo['rss_started_mb']} / {lo['rss_end_mb']} MB | {lo['setup_s']} s | "
                         + (f"{d['p50_us']:.0f} / {d['p99_us']:.0f} / {d['max_us']:.0f} us | "
                            if d else '- | ')
                         + (f"{e['p50_us']:.0f} / {e['p99_us']:.0f} / {e['max_us']:.0f} us | "
                            if e else '- | ')
                         + f"{lo['handled_per_s']:.0f} | {ratio} | "
                         f"{lo['agent_events_handled']}/{lo['agent_events_expected']} | "
                         f"{lo.get('commits', '-')} | {lo.get('receiver_cpu_us', '-')}, "
                         f"{lo.get('feeder_cpu_us', '-')} us | {lo.get('sent_per_s', '-')} |")
    lines += ['', 'Cost per event without ROS (`core`: the agents handled in turn on one thread, '
              'each submitting its commit and moving on; then until every commit is done), '
              'against raw SQLite in the same process: the same state upsert and episode insert, '
              'one transaction per event (WAL, synchronous=NORMAL), which is what each agent\'s '
              'own file cost before the storage layer.', '',
              '| agents | events | commits | worker wall / event | until committed / event | '
              'CPU / event | raw SQLite wall / CPU per event |',
              '| --- | --- | --- | --- | --- | --- | --- |']
    for c in cores:
        lines.append(f"| {c['agents']} | {c['events']} | {c['commits']} | {c['worker_us']} us | "
                     f"{c['committed_us']} us | {c['cpu_us']} us | {c['raw_us']} / "
                     f"{c['raw_cpu_us']} us |")
    (out / 'agents.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
