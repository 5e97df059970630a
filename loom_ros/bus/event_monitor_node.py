"""Event monitor node: subscribes to a Loom topic pattern and reports live event rates.

What `loom demo` watches; also handy on a robot (`ros2 run loom event_monitor`) beside
`ros2 topic echo`. Reports go to stdout (text or JSON lines) and to the node's logger.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter

from rclpy.node import Node

from loom_ros.bus.bus import create_bus
from loom_ros.bus.event import Event
from loom_ros.bus.executor import run_node
from loom_ros.config.params import ParamSpec, declare_parameters
from loom_ros.telemetry.diagnostics import OK, WARN, CheckResult
from loom_ros.telemetry.logs import mask_node_logger

PARAMETERS = [
    ParamSpec('pattern', 'Loom topic pattern to watch (* one segment, ** any)', read_only=True),
    ParamSpec('report_period_s', 'Seconds between rate reports', read_only=True,
              min_value=0.05, max_value=3600.0),
    ParamSpec('json_output', 'Print reports as JSON lines instead of text', read_only=True),
]


class EventMonitorNode(Node):

    def __init__(self, **kwargs):
        super().__init__('event_monitor', **kwargs)
        mask_node_logger(self)   # every log line masked from the first (issue 13, fault 10)
        self.bus = create_bus(self, 'event_monitor')
        params = declare_parameters(self, 'event_monitor', PARAMETERS)
        self._json = bool(params['json_output'])
        self._window: Counter = Counter()
        self._latency_ms: dict[str, float] = {}
        self._last = time.monotonic()
        self.bus.subscribe(params['pattern'], self._on_event)
        self.create_timer(params['report_period_s'], self._report)
        self._pattern = params['pattern']
        self._last_event = time.monotonic()
        self.bus.telemetry.add_check('events', self._events_check)

    def _events_check(self) -> CheckResult:
        """WARN when nothing matched the pattern for 5 s: publishers down or a QoS/domain mismatch."""
        idle = time.monotonic() - self._last_event
        if idle > 5.0:
            return CheckResult(WARN, f'no events on {self._pattern!r} for {idle:.0f} s: are the '
                               'publishers running, in this ROS_DOMAIN_ID and namespace?')
        return CheckResult(OK, f'receiving on {self._pattern!r}')

    def _on_event(self, event: Event, topic: str) -> None:
        self._last_event = time.monotonic()
        self._window[topic] += 1
        self._latency_ms[topic] = time.time() * 1000.0 - event.timestamp_ms

    def _report(self) -> None:
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        rates = {t: n / elapsed for t, n in sorted(self._window.items())}
        self._window.clear()
        report = {'rates': {t: round(r, 1) for t, r in rates.items()},
                  'total_rate': round(sum(rates.values()), 1),
                  'age_ms': {t: round(v, 2) for t, v in sorted(self._latency_ms.items())},
                  'received': dict(self.bus.stats.received),
                  'rejected': dict(self.bus.stats.rejected)}
        if self._json:
            print(json.dumps(report), flush=True)
        else:
            line = '  '.join(f'{t} {r:.1f}/s' for t, r in rates.items()) or 'no events'
            print(f'[event_monitor] {line}  | total {report["total_rate"]:.1f} ev/s  '
                  f'rejected {sum(self.bus.stats.rejected.values())}', file=sys.stdout, flush=True)


def main(args=None):
    run_node(EventMonitorNode, args)


if __name__ == '__main__':
    main()
