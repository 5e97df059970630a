"""Benchmark of the agent runtime at scale: N agents (AgentNode, counter behavior, state
committed per event) in one process, fed by one publisher through the intra-process fast path.

    python bench/agents_bench.py [--agents 100 1000] [--seconds 5] [--rate 50]

Reports per N: RSS after start-up and at the end, dispatch latency (mailbox arrival to handler)
P50/P99/max, and agent-events handled per second. Baseline in the same run: the RSS of N plain
rclpy nodes with one subscription each (what N agents would cost with no Loom at all).
Targets (issue 4): dispatch P99 < 1 ms at 100 agents; 1,000 agents under 1 GB.
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


def run_loom(n: int, seconds: float, rate: float) -> dict:
    import rclpy
    from rclpy.node import Node

    from loom_ros.agents.agent_node import AgentNode
    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.event import Event
    from loom_ros.bus.executor import make_executor
    from rclpy.parameter import Parameter
    tmp = Path(tempfile.mkdtemp())
    (tmp / 'agents.yaml').write_text('agents:\n' + ''.join(
        f'  - {{id: a{i}, behavior: counter, subscriptions: [bench.agents], qos: batched}}\n'
        for i in range(n)))
    rclpy.init()
    rss_before = rss_kb()
    started = time.monotonic()
    agents = []
    for i in range(n):
        agent = AgentNode(f'a{i}', parameter_overrides=[
            Parameter('agent_id', value=f'a{i}'),
            Parameter('agents_file', value=str(tmp / 'agents.yaml')),
            Parameter('state_dir', value=str(tmp / 'state'))])
        agent.trigger_configure()
        agent.trigger_activate()
        agents.append(agent)
    setup_s = time.monotonic() - started
    feeder = Node('bench_feeder')
    bus = EventBus(feeder)
    executor = make_executor()
    executor.add_node(feeder)
    rss_started = rss_kb()
    count = int(seconds * rate)
    start = time.monotonic()
    for i in range(count):
        bus.publish('bench.agents', Event(type='tick', id=f't{i}'), 'batched')
        target = start + (i + 1) / rate
        while time.monotonic() < target:
            executor.spin_once(timeout_sec=max(0.0, min(0.001, target - time.monotonic())))
    deadline = time.monotonic() + 60
    while sum(a.stats['handled'] for a in agents) < n * count and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    handled = sum(a.stats['handled'] for a in agents)
    dispatch = [x for a in agents for x in a.dispatch_us]
    result = {'agents': n, 'events_published': count, 'agent_events_handled': handled,
              'handled_per_s': round(handled / elapsed, 1), 'setup_s': round(setup_s, 1),
              'rss_before_mb': round(rss_before / 1024, 1),
              'rss_started_mb': round(rss_started / 1024, 1),
              'rss_end_mb': round(rss_kb() / 1024, 1), 'dispatch': summarize(dispatch)}
    for agent in agents:
        agent.trigger_deactivate()
        agent.trigger_cleanup()
        agent.destroy_node()
    rclpy.try_shutdown()
    return result


RAW = '''
import json, sys, rclpy
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
print(json.dumps({{'rss_before_mb': round(before / 1024, 1), 'rss_started_mb': round(rss_kb() / 1024, 1)}}))
'''


def run_raw(n: int) -> dict:
    out = subprocess.run([sys.executable, '-c', RAW.format(n=n, here=str(HERE))],
                         capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--agents', type=int, nargs='+', default=[100, 1000])
    parser.add_argument('--seconds', type=float, default=5.0)
    parser.add_argument('--rate', type=float, default=50.0)
    parser.add_argument('--out', default=str(HERE / 'results'))
    parser.add_argument('_one', nargs='?', help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    if args._one:  # one N per process, so RSS is not shared between runs
        print(json.dumps(run_loom(int(args._one), args.seconds, args.rate)))
        return 0
    rows = []
    for n in args.agents:
        loom = subprocess.run([sys.executable, __file__, str(n), '--seconds', str(args.seconds),
                               '--rate', str(args.rate)], capture_output=True, text=True,
                              timeout=1800)
        if loom.returncode:
            print(loom.stderr[-3000:], file=sys.stderr)
            return 1
        row = {'loom': json.loads(loom.stdout.strip().splitlines()[-1]), 'raw': run_raw(n)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    results = {'machine': machine(), 'seconds': args.seconds, 'rate': args.rate, 'rows': rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'agents.json').write_text(json.dumps(results, indent=1))
    m = results['machine']
    lines = ['# Agent runtime benchmark', '',
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}; Python "
             f"{m['python']}, rclpy {m['rclpy']}, {m['rmw']}, {m['executor']}; {m['date']}.", '',
             f"One process; one publisher sends {args.rate:g} events/s for {args.seconds:g} s to "
             'every agent (intra-process fast path); each agent commits its state per event. '
             'Baseline: N plain rclpy nodes with one subscription each, in another process.', '',
             '| agents | RSS Loom (started) | RSS raw rclpy nodes | start-up | dispatch P50 / P99 / max | agent-events handled/s | handled |',
             '| --- | --- | --- | --- | --- | --- | --- |']
    for row in rows:
        lo, ra = row['loom'], row['raw']
        d = lo['dispatch']
        lines.append(f"| {lo['agents']} | {lo['rss_started_mb']} MB | {ra['rss_started_mb']} MB | "
                     f"{lo['setup_s']} s | {d['p50_us']:.0f} / {d['p99_us']:.0f} / {d['max_us']:.0f}"
                     f" us | {lo['handled_per_s']:.0f} | {lo['agent_events_handled']}/"
                     f"{lo['agents'] * lo['events_published']} |")
    (out / 'agents.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
