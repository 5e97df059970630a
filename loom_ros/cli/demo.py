"""`loom demo`: the main job on simulated sensors, with a live view and a closing summary.

Today it runs, each in its own process: the sim_sensors node (publishes), the event_monitor node
(subscribes by pattern and reports rates, which this command shows live) and the counter agent
(a lifecycle AgentNode whose state and episodic memory persist in SQLite). Later issues add the
router's callers, plugins and the two seed flows to the same command.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loom_ros.config.params import DEFAULTS_FILE, config_dir

NODES = {
    'sim_sensors': 'loom_ros.sensors.sim_sensors_node',
    'event_monitor': 'loom_ros.bus.event_monitor_node',
    'agent_counter': 'loom_ros.agents.agent_node',
}


def add_parser(sub) -> None:
    demo = sub.add_parser('demo', help='run Loom on simulated sensors with a live view')
    demo.add_argument('--duration', type=float, default=20.0, help='seconds to run (default 20)')
    demo.add_argument('--params-file', default=None,
                      help=f'ROS params file (default: config/{DEFAULTS_FILE})')
    demo.add_argument('--stop-after-events', type=int, default=0, metavar='N',
                      help='stop early once N events have been received and the agent has sent '
                           'an intent (default: run the duration)')
    demo.add_argument('--output', default='demo_output',
                      help='folder for the summary JSON (default demo_output)')
    demo.set_defaults(run=run_demo)


def _spawn(module: str, params_file: str, extra: list[str], env: dict,
           log: Path | None = None) -> subprocess.Popen:
    """A node process; its output goes to `log` (so a full pipe never blocks it), else a pipe."""
    cmd = [sys.executable, '-m', module, '--ros-args', '--params-file', params_file, *extra]
    if log is None:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
    with open(log, 'w') as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def _stop(procs: dict[str, subprocess.Popen]) -> dict[str, int]:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    codes = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = proc.wait()
    return codes


def run_demo(args) -> int:
    params_file = args.params_file or str(config_dir() / DEFAULTS_FILE)
    env = dict(os.environ)
    env.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    print(f'Loom demo: event bus on simulated sensors for {args.duration:.0f} s '
          f'(ROS_DOMAIN_ID={env.get("ROS_DOMAIN_ID", "0")}, params {params_file})', flush=True)
    out = Path(args.output)
    (out / 'logs').mkdir(parents=True, exist_ok=True)
    agent_dir = out / 'agents'
    procs = {
        'sim_sensors': _spawn(NODES['sim_sensors'], params_file, [], env,
                              out / 'logs' / 'sim_sensors.log'),
        'event_monitor': _spawn(NODES['event_monitor'], params_file,
                                ['-p', 'event_monitor:json_output:=true'], env),
        # The counter agent from config/agents.yaml, with its state under the output folder.
        'agent_counter': _spawn(NODES['agent_counter'], params_file,
                                # node-qualified: a plain -p loses to the params file's section
                                ['-r', '__node:=agent', '-p', 'agent:agent_id:=counter',
                                 '-p', f'agent:state_dir:={agent_dir.resolve()}'], env,
                                out / 'logs' / 'agent_counter.log'),
    }
    monitor = procs['event_monitor']
    reports = []
    logs: list[str] = []
    interactive = sys.stdout.isatty()
    started = time.monotonic()
    interrupted = False
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l.rstrip('\n')) for l in monitor.stdout],
                     daemon=True).start()
    try:
        while time.monotonic() - started < args.duration:
            if any(p.poll() is not None for p in procs.values()):
                break
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if not line.startswith('{'):
                logs.append(line)
                continue
            report = json.loads(line)
            reports.append(report)
            _show(report, time.monotonic() - started, args.duration, interactive)
            # Early stop needs the whole pipeline to have worked: N events seen and at least one
            # intent from the agent (it sends one per 100 events handled and committed).
            if args.stop_after_events and \
                    sum(report['received'].values()) >= args.stop_after_events and \
                    report['received'].get('agent.counter.intent', 0) >= 1:
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        codes = _stop(procs)
        for name in ('sim_sensors', 'agent_counter'):
            text = (out / 'logs' / f'{name}.log').read_text(errors='replace')
            logs.extend(f'{name}: {l}' for l in text.splitlines() if l)
    if interactive:
        print()
    summary = _summary(reports, time.monotonic() - started, codes)
    summary['agent_counter'] = _agent_state(agent_dir / 'counter.db', 'counter')
    (out / 'bus_summary.json').write_text(json.dumps(summary, indent=2))
    _print_summary(summary, out / 'bus_summary.json')
    failed = {n: c for n, c in codes.items() if c not in (0, -signal.SIGINT)}
    short = args.stop_after_events and summary['events_total'] < args.stop_after_events
    if failed or not reports or short:
        print(f'demo failed: exit codes {codes}', file=sys.stderr)
        for line in logs[-20:]:
            print(f'  {line}', file=sys.stderr)
        return 1
    return 130 if interrupted else 0


def _show(report: dict, elapsed: float, duration: float, interactive: bool) -> None:
    rates = '  '.join(f'{t} {r:.0f}/s' for t, r in report['rates'].items()) or 'waiting for events'
    line = (f'[{elapsed:5.1f}/{duration:.0f} s] {rates}  | total {report["total_rate"]:.0f} ev/s'
            f'  rejected {sum(report["rejected"].values())}')
    print(f'\r{line:<110}' if interactive else line, end='' if interactive else '\n', flush=True)


def _summary(reports: list[dict], elapsed: float, codes: dict) -> dict:
    last = reports[-1] if reports else {'received': {}, 'rejected': {}}
    peak = max((r['total_rate'] for r in reports), default=0.0)
    ages = {}
    for report in reports:
        for topic, age in report['age_ms'].items():
            ages.setdefault(topic, []).append(age)
    return {
        'duration_s': round(elapsed, 1),
        'events_received': last['received'],
        'events_total': sum(last['received'].values()),
        'mean_rate': round(sum(last['received'].values()) / elapsed, 1) if elapsed else 0.0,
        'peak_rate': peak,
        'rejected': last['rejected'],
        'latest_event_age_ms_median': {t: sorted(v)[len(v) // 2] for t, v in ages.items()},
        'exit_codes': codes,
    }


def _agent_state(db_path: Path, agent_id: str) -> dict:
    """What the agent committed, read from its SQLite file after it stopped."""
    import sqlite3
    try:
        with sqlite3.connect(f'file:{db_path}?mode=ro', uri=True) as db:
            row = db.execute('select state, events from agent_state where agent_id = ?',
                             [agent_id]).fetchone()
            episodes = db.execute('select count(*) from episodes').fetchone()[0]
    except sqlite3.Error:
        return {}
    if row is None:
        return {}
    state = json.loads(row[0])
    return {'events_handled': row[1], 'counts': state.get('counts', {}), 'episodes': episodes,
            'state_file': str(db_path)}


def _print_summary(summary: dict, path: Path) -> None:
    print('\nLoom demo summary')
    print(f'  ran {summary["duration_s"]} s; {summary["events_total"]} events received across '
          f'processes (mean {summary["mean_rate"]} ev/s, peak {summary["peak_rate"]} ev/s)')
    for topic, count in sorted(summary['events_received'].items()):
        age = summary['latest_event_age_ms_median'].get(topic)
        print(f'  {topic:<24} {count:>8} events   publish-to-receive age ~{age} ms')
    agent = summary.get('agent_counter') or {}
    if agent:
        intents = summary['events_received'].get('agent.counter.intent', 0)
        print(f'  agent counter: handled {agent["events_handled"]} events {agent["counts"]}, '
              f'{agent["episodes"]} in episodic memory, sent {intents} intents; state persisted '
              f'in {agent["state_file"]}')
    rejected = sum(summary['rejected'].values())
    print(f'  rejected events: {rejected} {summary["rejected"] or ""}')
    print(f'  summary written to {path}')
