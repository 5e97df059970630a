"""`loom status` (console script `loom_status`): a live terminal view of a running Loom system.

Reads what the nodes already publish: loom/metrics (events/s per topic, latencies, queue depths,
drops, CPU and memory per node), router/stats (routes taken, cloud spend) and /diagnostics
(plugin health and every other check). Nothing runs inside the nodes for it.

    loom_status                 # redraws every second until Ctrl-C
    loom_status --once          # waits for the nodes' metrics, prints one table, exits
    loom_status --duration 10   # plain text every --period seconds for 10 s (logs, tests)
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import threading
import time
from collections import defaultdict

from loom_ros.bringup.stop_signals import stop_event
from loom_ros.bus.topics import ROUTER_STATS
from loom_ros.telemetry.diagnostics import LEVEL_NAMES, level_of
from loom_ros.telemetry.metrics import COUNTER, GAUGE, HISTOGRAM, METRICS_TOPIC, from_msg

STALE_AFTER_S = 5.0
MAX_PERIOD_S = 60.0        # a peer's period_s beyond this does not keep its entry alive longer
HEALTH_STALE_AFTER_S = 60.0   # a diagnostic not reported again in this long is dropped
# Any DDS peer can publish on loom/metrics and /diagnostics: what the view keeps is bounded
# (a peer inventing a new name per message grew it, and the table, without end).
MAX_NODES = 256
MAX_HEALTH = 256
MAX_SAMPLES = 4096         # samples kept from one Metrics message
MAX_LABELS = 16            # labels kept per sample (Loom's have one or two)
MAX_TEXT = 120             # characters of one peer-supplied field as printed
# C0 controls, DEL and C1 controls: ESC and the 8-bit CSI/OSC start terminal sequences (clear
# screen, window title, OSC 52 clipboard writes); BEL, CR and LF rewrite or forge lines. And
# Unicode's direction marks, embeddings, overrides and isolates, zero-width and invisible
# characters, line and paragraph separators: U+202E shows a name's text backwards and U+200B
# makes 'planner\u200b' print as 'planner', so a peer could make one node's line read as
# another's.
_CONTROL = re.compile('[\x00-\x1f\x7f-\x9f\u061c\u180e\u200b-\u200f\u2028-\u202e'
                      '\u2060-\u206f\ufeff\ufff9-\ufffb]')


def safe_text(text: object, limit: int = MAX_TEXT) -> str:
    """A peer's text as it may reach the operator's terminal: cut to `limit` characters (an
    ellipsis included) before anything else looks at it, and every control character shown as
    '?'."""
    text = text if isinstance(text, str) else str(text)
    if len(text) > limit:
        text = text[:limit - 1] + '\u2026'
    return _CONTROL.sub('?', text)


class StatusView:
    """What the terminal shows, built from messages; pure (render() needs no rclpy).

    Node names, labels and diagnostic names and messages come from any DDS peer: each is made
    safe (safe_text) as it arrives, so what is kept prints as it is; the entries kept are
    bounded (the least recently reported dropped first, stale ones expired); `dropped` counts
    what was dropped."""

    def __init__(self):
        self.metrics: dict[str, tuple[float, float, list]] = {}   # node -> (received, period, samples)
        self.router: dict | None = None
        # status name -> (level, message, received)
        self.health: dict[str, tuple[int, str, float]] = {}
        self.dropped = {'nodes': 0, 'health': 0, 'samples': 0}

    # -- inputs -----------------------------------------------------------------------------------
    def on_metrics(self, msg, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        node = safe_text(msg.node)
        period = float(msg.period_s)
        period = min(period, MAX_PERIOD_S) if period > 0 else 0.0   # NaN and <= 0 too
        self.dropped['samples'] += max(0, len(msg.samples) - MAX_SAMPLES)
        self.metrics.pop(node, None)   # re-inserted last: dicts keep the least recent first
        self.metrics[node] = (now, period, from_msg(msg, safe_text, MAX_SAMPLES, MAX_LABELS))
        self._expire_metrics(now)
        while len(self.metrics) > MAX_NODES:
            del self.metrics[next(iter(self.metrics))]
            self.dropped['nodes'] += 1

    def on_router_stats(self, msg) -> None:
        self.router = {'decisions': msg.decisions, 'local': msg.local_rate, 'cloud': msg.cloud_rate,
                       'hybrid': msg.hybrid_rate, 'fallback': msg.fallback_rate,
                       'spend': msg.spend, 'limit': msg.budget_limit}

    def on_diagnostics(self, msg, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        statuses = msg.status
        if len(statuses) > MAX_HEALTH:   # more than could be kept: the rest is not even read
            self.dropped['health'] += len(statuses) - MAX_HEALTH
            statuses = statuses[:MAX_HEALTH]
        for status in statuses:
            name = safe_text(status.name)
            self.health.pop(name, None)
            self.health[name] = (level_of(status), safe_text(status.message), now)
        self._expire_health(now)
        while len(self.health) > MAX_HEALTH:
            del self.health[next(iter(self.health))]
            self.dropped['health'] += 1

    # Nodes and diagnostics not reported for long are forgotten (not counted: they went quiet).
    def _expire_metrics(self, now: float) -> None:
        for node in [n for n, (seen, period, _) in self.metrics.items()
                     if now - seen > 2 * max(STALE_AFTER_S, 3 * period)]:
            del self.metrics[node]

    def _expire_health(self, now: float) -> None:
        for name in [n for n, (_, _, seen) in self.health.items()
                     if now - seen > HEALTH_STALE_AFTER_S]:
            del self.health[name]

    # -- output -----------------------------------------------------------------------------------
    def live_nodes(self, now: float | None = None) -> dict[str, list]:
        now = time.monotonic() if now is None else now
        return {node: samples for node, (seen, period, samples) in sorted(self.metrics.items())
                if now - seen <= max(STALE_AFTER_S, 3 * period)}

    def render(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        self._expire_metrics(now)
        self._expire_health(now)
        nodes = self.live_nodes(now)
        topics: dict[str, dict] = defaultdict(lambda: {'pub': 0.0, 'recv': 0.0, 'p50': math.nan,
                                                       'p99': math.nan, 'max': math.nan, 'n': 0})
        subs, procs = [], []
        for node, samples in nodes.items():
            by_sub: dict[str, dict] = defaultdict(dict)
            proc = {}
            for s in samples:
                topic = s.labels.get('topic')
                if s.kind == COUNTER and topic and s.name in ('events_published', 'events_received'):
                    topics[topic]['pub' if s.name == 'events_published' else 'recv'] += s.rate
                elif s.kind == HISTOGRAM and topic and s.name == 'handle_latency_ms' and s.count:
                    row = topics[topic]
                    row['n'] += s.count
                    for key in ('p50', 'p99', 'max'):   # the worst node for each column
                        value = getattr(s, key)
                        row[key] = value if math.isnan(row[key]) else max(row[key], value)
                elif 'subscription' in s.labels:
                    entry = by_sub[s.labels['subscription']]
                    if s.name == 'events_dropped':
                        entry['dropped'], entry['drop_rate'] = s.value, s.rate
                    elif s.name == 'queue_depth':
                        entry['depth'] = s.value
                    elif s.name == 'queue_capacity':
                        entry['capacity'] = s.value
                    elif s.name == 'events_delivered':
                        entry['delivered_rate'] = s.rate
                elif s.kind == GAUGE and s.name.startswith('process_'):
                    proc[s.name] = s.value
            for pattern, entry in sorted(by_sub.items()):
                subs.append((node, pattern, entry))
            procs.append((node, proc))

        out = [f'Loom status: {len(nodes)} node(s) reporting on {METRICS_TOPIC}']
        out.append('')
        out.append(f'{"TOPIC":<34} {"PUB/s":>9} {"RECV/s":>9} {"P50 ms":>8} {"P99 ms":>8} '
                   f'{"MAX ms":>8}')
        for topic, row in sorted(topics.items()):
            out.append(f'{topic:<34} {row["pub"]:>9.1f} {row["recv"]:>9.1f} {_ms(row["p50"])} '
                       f'{_ms(row["p99"])} {_ms(row["max"])}')
        if not topics:
            out.append('(no events yet)')
        out.append('')
        out.append(f'{"SUBSCRIPTION":<26} {"NODE":<24} {"QUEUE":>11} {"DELIV/s":>9} {"DROPS":>8} '
                   f'{"DROPS/s":>8}')
        for node, pattern, e in subs:
            queue = (f'{e.get("depth", 0):.0f}/{e["capacity"]:.0f}' if 'capacity' in e
                     else 'inline')
            out.append(f'{pattern:<26} {node:<24} {queue:>11} '
                       f'{e.get("delivered_rate", 0.0):>9.1f} {e.get("dropped", 0):>8.0f} '
                       f'{e.get("drop_rate", 0.0):>8.1f}')
        out.append('')
        out.append(f'{"NODE":<34} {"CPU %":>7} {"RSS MB":>8} {"THREADS":>8}')
        for node, proc in procs:
            out.append(f'{node:<34} {proc.get("process_cpu_percent", math.nan):>7.1f} '
                       f'{proc.get("process_rss_bytes", math.nan) / 2**20:>8.1f} '
                       f'{proc.get("process_threads", 0):>8.0f}')
        out.append('')
        if self.router is not None:
            r = self.router
            out.append(f'ROUTES  {r["decisions"]} decisions: local {r["local"]:.0%}  cloud '
                       f'{r["cloud"]:.0%}  hybrid {r["hybrid"]:.0%}  fallback {r["fallback"]:.0%}  '
                       f'| cloud spend {r["spend"]:.4f} of {r["limit"]:.4f}')
        else:
            out.append('ROUTES  (no router/stats)')
        out.append('')
        out.append('HEALTH (/diagnostics)')
        if not self.health:
            out.append('  (no reports yet)')
        for name, (level, message, _) in sorted(self.health.items(),
                                                key=lambda kv: (-kv[1][0], kv[0])):
            out.append(f'  {LEVEL_NAMES.get(level, str(level)):<6} {name}: {message}')
        if any(self.dropped.values()):
            d = self.dropped
            out.append(f'(dropped over the limits: {d["nodes"]} node(s) beyond {MAX_NODES}, '
                       f'{d["health"]} diagnostic(s) beyond {MAX_HEALTH}, {d["samples"]} '
                       f'sample(s) beyond {MAX_SAMPLES} per message)')
        return '\n'.join(out)


def _ms(value: float) -> str:
    return f'{"-":>8}' if value is None or math.isnan(value) else f'{value:>8.3f}'


def main(argv: list[str] | None = None) -> int:
    import rclpy
    from rclpy.signals import SignalHandlerOptions
    from rclpy.utilities import remove_ros_args
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog='loom_status', description=__doc__.splitlines()[0])
    parser.add_argument('--once', action='store_true',
                        help='print one table once the nodes have reported, then exit')
    parser.add_argument('--duration', type=float, default=0.0,
                        help='print plain text every --period seconds for this long, then exit')
    parser.add_argument('--period', type=float, default=1.0, help='seconds between redraws')
    parser.add_argument('--timeout', type=float, default=30.0,
                        help='--once: give up (exit 1) when no metrics arrive in this long')
    parser.add_argument('--settle', type=float, default=1.5,
                        help='--once: after the first metrics, wait this long for other nodes')
    parser.add_argument('--require-topic', action='append', default=[],
                        help='--once: also wait until this Loom topic shows up (repeatable)')
    args = parser.parse_args(remove_ros_args(['loom_status', *argv])[1:])
    # A peer's name in a script the terminal's encoding lacks is shown as '?', never a crash.
    if hasattr(sys.stdout, 'reconfigure'):
        sys.stdout.reconfigure(errors='replace')

    rclpy.init(args=['loom_status', *argv], signal_handler_options=SignalHandlerOptions.NO)
    from diagnostic_msgs.msg import DiagnosticArray
    from loom_msgs.msg import Metrics, RouterStats
    from rclpy.node import Node

    from loom_ros.bus.executor import make_executor
    from loom_ros.bus.qos import QosLevel, to_qos_profile
    node = Node('loom_status')
    view = StatusView()
    realtime = to_qos_profile(QosLevel.REALTIME)
    node.create_subscription(Metrics, METRICS_TOPIC, view.on_metrics, realtime)
    node.create_subscription(RouterStats, ROUTER_STATS, view.on_router_stats, realtime)
    node.create_subscription(DiagnosticArray, '/diagnostics', view.on_diagnostics, 10)
    executor = make_executor()
    executor.add_node(node)
    code = 0
    # Ctrl-C / SIGTERM end the loop between two spins (a KeyboardInterrupt raised inside a
    # callback the EventsExecutor runs left its shutdown hanging now and then).
    stop = stop_event()
    try:
        if args.once:
            code = _once(view, executor, args, stop)
        else:
            live = args.duration <= 0 and sys.stdout.isatty()
            end = time.monotonic() + args.duration if args.duration > 0 else math.inf
            next_draw = time.monotonic() + args.period
            while time.monotonic() < end and not stop.is_set():
                executor.spin_once(timeout_sec=0.05)
                if time.monotonic() >= next_draw:
                    next_draw += args.period
                    text = view.render()
                    if live:
                        sys.stdout.write('\x1b[H\x1b[2J' + text + '\n')
                    else:
                        sys.stdout.write(text + '\n\n')
                    sys.stdout.flush()
    finally:
        executor.remove_node(node)   # detached first: destroying a node an EventsExecutor still
        executor.shutdown()          # holds crashed once (SIGSEGV in destroy_node)
        node.destroy_node()
        rclpy.try_shutdown()
    return code


def _once(view: StatusView, executor, args, stop: threading.Event) -> int:
    deadline = time.monotonic() + args.timeout
    first = None

    def topics_seen() -> set[str]:
        return {s.labels.get('topic') for samples in view.live_nodes().values() for s in samples}

    while time.monotonic() < deadline:
        if stop.is_set():
            return 130
        executor.spin_once(timeout_sec=0.05)
        if first is None and view.metrics:
            first = time.monotonic()
        if (first is not None and time.monotonic() - first >= args.settle
                and set(args.require_topic) <= topics_seen()):
            print(view.render(), flush=True)
            return 0
    if first is not None:
        print(view.render(), flush=True)
        missing = sorted(set(args.require_topic) - topics_seen())
        print(f'loom_status: topics not seen within {args.timeout:g} s: {", ".join(missing)}',
              file=sys.stderr)
        return 1
    print(f'loom_status: no metrics on {METRICS_TOPIC} within {args.timeout:g} s: is a Loom node '
          'running in this ROS domain (and telemetry.metrics.period_s > 0)?', file=sys.stderr)
    return 1


if __name__ == '__main__':
    sys.exit(main())
