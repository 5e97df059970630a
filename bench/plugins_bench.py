"""Benchmark of the plugin host: what a call costs in-process (direct, through the host, with
and without the capability guard), across processes (the HandleEvent service), and how fast the
audit log appends. Baselines are measured in the same run: the plugin's own handle_event called
bare, and (for the audit log) a bare SQLite insert+commit per row in WAL mode.

    python bench/plugins_bench.py            # ~1 minute
    python bench/plugins_bench.py --quick    # fewer iterations

Writes bench/results/plugins.json and bench/results/plugins.md (with the machine described).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from loom_ros.bus.event import Event  # noqa: E402
from loom_ros.plugins.host import PluginHost, parse_specs  # noqa: E402
from loom_ros.security.audit import AuditLog  # noqa: E402

WEATHER = {'forecasts': {'Lisbon': [{'summary': 'sunny', 'high_c': 24, 'low_c': 15}]}}


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1))))]


def summarize(us):
    return {'n': len(us), 'p50_us': round(percentile(us, 50), 1),
            'p99_us': round(percentile(us, 99), 1), 'max_us': round(max(us), 1)}


def timed(fn, n):
    out = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - start) / 1000.0)
    return out


def in_process(n: int) -> dict:
    query = Event.with_json('tool.weather.query', {'city': 'Lisbon'})
    guarded = PluginHost(parse_specs([{'name': 'weather', 'config': WEATHER}]))
    unguarded = PluginHost(parse_specs([{'name': 'weather', 'config': WEATHER}]), guard=False)
    guarded.start()
    unguarded.start()
    bare = guarded.slots['weather'].plugin
    handle = guarded.handles['weather']
    for fn in (lambda: bare.handle_event(query), lambda: guarded.handle('weather', query)):
        timed(fn, 200)  # warm up
    rows = {
        'bare handle_event (baseline)': summarize(timed(lambda: bare.handle_event(query), n)),
        'host.handle, guard off': summarize(timed(lambda: unguarded.handle('weather', query), n)),
        'host.handle, guard on': summarize(timed(lambda: guarded.handle('weather', query), n)),
        'registry handle (agent in process)': summarize(timed(lambda: handle.handle_event(query),
                                                              n)),
    }
    guarded.stop()
    unguarded.stop()
    return rows


def service(n: int) -> dict:
    """HandleEvent through the plugin_host's service, host in another process."""
    os.environ.setdefault('ROS_DOMAIN_ID', str(150 + os.getpid() % 50))
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    import rclpy
    from rclpy.node import Node

    from loom_msgs.srv import HandleEvent
    from loom_ros.bus.executor import make_executor
    tmp = Path(tempfile.mkdtemp(prefix='loom-plugins-bench-'))
    plugins = tmp / 'plugins.yaml'
    plugins.write_text(json.dumps({'plugins': [{'name': 'weather', 'config': WEATHER}]}))
    proc = subprocess.Popen([sys.executable, '-m', 'loom_ros.plugins.host_node', '--ros-args',
                             '-r', '__ns:=/bench', '-p', f'plugins_file:={plugins}',
                             '-p', f'audit_db:={tmp / "audit.db"}'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rclpy.init()
    node = Node('plugins_bench')
    executor = make_executor()
    executor.add_node(node)
    client = node.create_client(HandleEvent, '/bench/plugin_host/weather/handle_event')
    try:
        deadline = time.monotonic() + 60
        while not client.service_is_ready():
            if time.monotonic() > deadline:
                raise RuntimeError('the plugin host did not come up in 60 s')
            executor.spin_once(timeout_sec=0.05)
        request = HandleEvent.Request(
            event=Event.with_json('tool.weather.query', {'city': 'Lisbon'}).to_msg())

        def one():
            future = client.call_async(request)
            executor.spin_until_future_complete(future, timeout_sec=10)
            assert future.result().response.ok
        timed(one, 20)
        return {'HandleEvent service, host in another process': summarize(timed(one, n))}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


def audit(n: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix='loom-audit-bench-'))
    raw = sqlite3.connect(tmp / 'raw.db')
    raw.execute('pragma journal_mode=wal')
    raw.execute('pragma synchronous=NORMAL')
    raw.execute('create table audit (id integer primary key, ts_ms, plugin, kind, fields)')

    def bare():
        raw.execute('insert into audit (ts_ms, plugin, kind, fields) values (?, ?, ?, ?)',
                    (1, 'arm', 'actuator_command', '{"event_id":"e1"}'))
        raw.commit()
    log = AuditLog(tmp / 'audit.db')
    rows = {}
    for name, fn in (('bare sqlite insert+commit (baseline)', bare),
                     ('AuditLog.append', lambda: log.append('arm', 'actuator_command',
                                                            event_id='e1'))):
        start = time.perf_counter()
        us = timed(fn, n)
        rows[name] = {**summarize(us), 'per_s': round(n / (time.perf_counter() - start))}
    log.close()
    return rows


def machine() -> str:
    import rclpy  # noqa: F401
    cpu = platform.processor() or platform.machine()
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return (f'{cpu}, {os.cpu_count()} cores; {platform.platform()}; Python '
            f'{platform.python_version()}, rclpy 9.1.2, '
            f'{os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")}, '
            f'EventsExecutor; {time.strftime("%Y-%m-%d")}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    args = parser.parse_args()
    n = 2000 if args.quick else 20000
    results = {'machine': machine(), 'in_process': in_process(n),
               'service': service(200 if args.quick else 1000),
               'audit': audit(1000 if args.quick else 5000)}
    out = HERE / 'results'
    out.mkdir(exist_ok=True)
    (out / 'plugins.json').write_text(json.dumps(results, indent=2) + '\n')
    base = results['in_process']['bare handle_event (baseline)']['p50_us']
    lines = ['# Plugin host benchmark', '', f'Machine: {results["machine"]}.', '',
             'One call = one `tool.weather.query` into the weather tool (deterministic table).',
             'Ratio: P50 / the bare handle_event P50 of the same run. Numbers taken on a shared',
             'machine (other work running on the same cores) unless re-run by the lead.', '',
             '| path | n | P50 | P99 | max | ratio (P50) |',
             '| --- | --- | --- | --- | --- | --- |']
    for group in ('in_process', 'service'):
        for name, row in results[group].items():
            lines.append(f'| {name} | {row["n"]} | {row["p50_us"]} us | {row["p99_us"]} us | '
                         f'{row["max_us"]} us | {row["p50_us"] / base:.1f}x |')
    lines += ['', '| audit log | n | P50 | P99 | max | rows/s |',
              '| --- | --- | --- | --- | --- | --- |']
    for name, row in results['audit'].items():
        lines.append(f'| {name} | {row["n"]} | {row["p50_us"]} us | {row["p99_us"]} us | '
                     f'{row["max_us"]} us | {row["per_s"]} |')
    (out / 'plugins.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
