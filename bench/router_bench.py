"""Benchmark of the router's decisions: in-process (rules and learned) and through the Route
service across processes, each beside a baseline measured in the same run.

    python bench/router_bench.py [--quick]     # writes bench/results/router.md and router.json

Baselines: in-process, an empty Python call with the same arguments (the timing floor); through
the service, a raw rclpy std_srvs/Trigger service in another process (the ROS round-trip floor).
Targets (issue 5): decision P99 < 200 us in-process, < 2 ms through the service.
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
from bus_bench import machine, summarize  # noqa: E402  (same machine record and percentiles)


def timed(fn, items) -> list[float]:
    out = []
    for item in items:
        start = time.perf_counter_ns()
        fn(item)
        out.append((time.perf_counter_ns() - start) / 1000.0)
    return out


def in_process(n: int) -> dict:
    from loom_ros.bus.event import Privacy
    from loom_ros.router.decision import RouteRequest, Spend, decide
    from loom_ros.router.evaluate import REPO_CONFIG, train_from_history
    from loom_ros.router.policy import load_policy
    from loom_ros.router.trace import generate
    policy = load_policy(REPO_CONFIG)
    rows = generate(n, seed=1)
    requests = [RouteRequest(event_type=r['event_type'], privacy=Privacy(r['privacy']),
                             local_confidence=r['local_confidence'],
                             latency_budget_ms=r['latency_budget_ms'],
                             payload_bytes=r['payload_bytes']) for r in rows]
    learned = train_from_history(generate(4000, seed=2), policy, ':memory:')
    spend = Spend(1.0, policy.budget.limit)

    def rules(req):
        routing = policy.policy_for(req.event_type, req.agent_id)
        return decide(req, routing, cloud_cost=policy.cost_of(routing.cloud_model), spend=spend)

    def ml(req):
        routing = policy.policy_for(req.event_type, req.agent_id)
        return learned.decide(req, routing, cloud_cost=policy.cost_of(routing.cloud_model),
                              spend=spend)

    def empty(req):
        return None
    return {'baseline_empty_call': summarize(timed(empty, requests)),
            'rules': summarize(timed(rules, requests)),
            'learned': summarize(timed(ml, requests))}


TRIGGER_SERVER = '''
import rclpy
from rclpy.node import Node
from std_srvs.srv import Trigger
from loom_ros.bus.executor import make_executor, spin_until
from loom_ros.bringup.stop_signals import on_stop_signal
from rclpy.task import Future
rclpy.init()
node = Node('raw_trigger')
node.create_service(Trigger, 'bench/raw_trigger', lambda req, resp: (setattr(resp, 'success', True), resp)[1])
stop = Future()
on_stop_signal(lambda signum: stop.done() or stop.set_result(True))
ex = make_executor(); ex.add_node(node)
print('ready', flush=True)
spin_until(ex, stop)
'''


def through_service(n: int) -> dict:
    import rclpy
    from loom_msgs.srv import Route
    from rclpy.node import Node
    from std_srvs.srv import Trigger

    from loom_ros.bus.executor import make_executor
    tmp = tempfile.mkdtemp()
    router = subprocess.Popen([sys.executable, '-m', 'loom_ros.router.router_node', '--ros-args',
                               '-r', '__ns:=/bench', '-p', f'history_db:={tmp}/router.db'])
    raw = subprocess.Popen([sys.executable, '-c', TRIGGER_SERVER], stdout=subprocess.PIPE, text=True)
    assert raw.stdout.readline().strip() == 'ready'
    rclpy.init()
    node = Node('router_bench')
    executor = make_executor()
    executor.add_node(node)
    route = node.create_client(Route, '/bench/router/route')
    trigger = node.create_client(Trigger, 'bench/raw_trigger')

    def call(client, request):
        future = client.call_async(request)
        while not future.done():
            executor.spin_once(timeout_sec=0.01)
        return future.result()
    try:
        for client in (route, trigger):
            end = time.monotonic() + 30
            while not client.service_is_ready():
                if time.monotonic() > end:
                    raise RuntimeError('service did not appear')
                executor.spin_once(timeout_sec=0.05)
        request = Route.Request(event_id='b', event_type='speech.utterance', has_privacy=True, privacy=0,
                                local_supported=True, has_local_confidence=True,
                                local_confidence=0.7)
        for _ in range(50):  # warm both paths and let discovery settle
            call(route, request)
            call(trigger, Trigger.Request())
        results = {
            'baseline_raw_trigger': summarize(timed(lambda _: call(trigger, Trigger.Request()),
                                                    range(n))),
            'route_service': summarize(timed(lambda _: call(route, request), range(n))),
        }
    finally:
        for proc in (router, raw):
            proc.send_signal(2)
            proc.wait(timeout=10)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return results


def write_markdown(results: dict, path: Path) -> None:
    m = results['machine']
    fmt = lambda s: f"{s['p50_us']:.1f} | {s['p99_us']:.1f} | {s['max_us']:.1f}"
    lines = ['# Router benchmark', '',
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}; "
             f"Python {m['python']}, rclpy {m['rclpy']}, {m['rmw']}, {m['executor']}; {m['date']}.",
             '', 'Latency in microseconds. Targets: P99 < 200 us in-process, < 2000 us through '
             'the service.', '', '| path | P50 | P99 | max | calls |', '| --- | --- | --- | --- | --- |']
    for group in ('in_process', 'service'):
        for name, s in results[group].items():
            lines.append(f"| {group}: {name} | {fmt(s)} | {s['n']} |")
    ip, sv = results['in_process'], results['service']
    lines += ['', f"Service round trip over raw rclpy Trigger, P50 ratio: "
              f"{sv['route_service']['p50_us'] / sv['baseline_raw_trigger']['p50_us']:.2f} "
              f"(the difference is decision, SQLite write of the decision, and the "
              f"router/decisions publish); rules P99 {ip['rules']['p99_us']:.0f} us, learned P99 "
              f"{ip['learned']['p99_us']:.0f} us in-process.", '']
    path.write_text('\n'.join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--out', default=str(HERE / 'results'))
    args = parser.parse_args()
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    n_local, n_service = (2000, 200) if args.quick else (20000, 2000)
    results = {'machine': machine(), 'in_process': in_process(n_local),
               'service': through_service(n_service)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'router.json').write_text(json.dumps(results, indent=1))
    write_markdown(results, out / 'router.md')
    print((out / 'router.md').read_text())
    return 0


if __name__ == '__main__':
    sys.exit(main())
