"""Node health on /diagnostics (diagnostic_msgs/DiagnosticArray) with reasons an operator can act on.

Checks are pure functions returning a CheckResult (level, message, key values); the stateful
ones (drops rising) are small classes. `DiagnosticsReporter` is the ROS shell: it runs a node's
registered checks every period and publishes one DiagnosticStatus per check, named
`<node>: <check>`, so `ros2 topic echo /diagnostics`, rqt_robot_monitor and the diagnostic
aggregator work unchanged. A check that raises is reported as ERROR with the exception.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from collections.abc import Callable

OK, WARN, ERROR, STALE = 0, 1, 2, 3
LEVEL_NAMES = {OK: 'OK', WARN: 'WARN', ERROR: 'ERROR', STALE: 'STALE'}
DIAGNOSTICS_TOPIC = '/diagnostics'


@dataclass
class CheckResult:
    level: int
    message: str
    values: dict[str, str] = field(default_factory=dict)

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES[self.level]


# -- pure checks ---------------------------------------------------------------------------------
def queue_check(depth: int, capacity: int, warn_fraction: float = 0.8,
                error_fraction: float = 0.95, what: str = 'queue') -> CheckResult:
    """A bounded queue close to full: its consumer is slower than its producers."""
    values = {'depth': str(depth), 'capacity': str(capacity)}
    if capacity <= 0:
        return CheckResult(OK, f'{what}: unbounded', values)
    fill = depth / capacity
    values['fill'] = f'{fill:.2f}'
    if fill >= error_fraction:
        return CheckResult(ERROR, f'{what} full ({depth}/{capacity}): the handler cannot keep up; '
                           'events are being dropped or blocking publishers. Speed up the handler, '
                           'raise queue_size or add sampling/rate limits', values)
    if fill >= warn_fraction:
        return CheckResult(WARN, f'{what} near full ({depth}/{capacity}): the handler is falling '
                           'behind; drops start when it is full', values)
    return CheckResult(OK, f'{what} {depth}/{capacity}', values)


MAX_QUEUE_VALUES = 8   # queues named in a queues_check's values: the fullest ones


def queues_check(queues: dict[str, tuple[int, int]], warn_fraction: float = 0.8,
                 error_fraction: float = 0.95) -> CheckResult:
    """The worst of several queues ({name: (depth, capacity)}). Its values name the
    MAX_QUEUE_VALUES fullest queues (depth and capacity) and count the rest, so the report of a
    host with 1,000 agents' mailboxes stays a few dozen key-values (it was 2,000, about 10 ms of
    the executor's thread each second)."""
    if not queues:
        return CheckResult(OK, 'no bounded queues')
    fills = [((d / c) if c > 0 else 0.0, name, d, c) for name, (d, c) in queues.items()]
    fullest = heapq.nlargest(MAX_QUEUE_VALUES, fills, key=lambda f: f[0])
    worst_fill, worst_name, worst_depth, worst_capacity = fullest[0]
    worst = queue_check(worst_depth, worst_capacity, warn_fraction, error_fraction,
                        f'queue {worst_name}')
    values = {'queues': str(len(queues)),
              'over_warn': str(sum(1 for f in fills if f[0] >= warn_fraction)),
              'depth_total': str(sum(f[2] for f in fills))}
    for _fill, name, depth, capacity in fullest:
        values[f'{name}.depth'] = str(depth)
        values[f'{name}.capacity'] = str(capacity)
    return CheckResult(worst.level, worst.message if worst.level else
                       f'{len(queues)} queues below {warn_fraction:.0%}', values)


class DropsRising:
    """Drops per second since the previous check: WARN above warn_per_s, ERROR above error_per_s.
    Feed it a monotonic total (lost + overflowed + refused events)."""

    def __init__(self, warn_per_s: float = 0.0, error_per_s: float = 100.0,
                 what: str = 'events'):
        self.warn_per_s = warn_per_s
        self.error_per_s = error_per_s
        self.what = what
        self._last: tuple[float, float] | None = None

    def update(self, total: float, now: float | None = None) -> CheckResult:
        now = time.monotonic() if now is None else now
        last, self._last = self._last, (total, now)
        values = {'total': f'{total:g}'}
        if last is None or now <= last[1]:
            return CheckResult(OK, f'{total:g} {self.what} dropped so far', values)
        rate = max(0.0, total - last[0]) / (now - last[1])
        values['per_s'] = f'{rate:.1f}'
        if rate > self.error_per_s:
            return CheckResult(ERROR, f'{self.what} dropped at {rate:.1f}/s (over '
                               f'{self.error_per_s:g}/s): subscribers are far behind or inputs are '
                               'malformed; see loom/bus/stats for which subscription', values)
        if rate > self.warn_per_s:
            return CheckResult(WARN, f'drops rising: {rate:.1f} {self.what}/s; check loom/bus/stats '
                               '(lost, overflow, rejected) for the subscription or reason', values)
        return CheckResult(OK, f'no new drops ({total:g} so far)', values)


def plugin_check(name: str, healthy: bool | None, detail: str = '') -> CheckResult:
    """A plugin's health() as a diagnostic: unknown (no answer) is WARN, unhealthy is ERROR."""
    values = {'plugin': name}
    if healthy is None:
        return CheckResult(WARN, f'plugin {name} did not report health'
                           + (f': {detail}' if detail else ''), values)
    if not healthy:
        return CheckResult(ERROR, f'plugin {name} unhealthy: {detail or "no detail"}; its events '
                           'fail until it recovers or is restarted', values)
    return CheckResult(OK, f'plugin {name} healthy' + (f': {detail}' if detail else ''), values)


def budget_check(spend: float, limit: float, warn_fraction: float = 0.8) -> CheckResult:
    """Cloud spend against the period's budget: over budget means cloud routes are refused."""
    values = {'spend': f'{spend:.4f}', 'limit': f'{limit:.4f}'}
    if limit <= 0 or math.isinf(limit):
        return CheckResult(OK, f'cloud spend {spend:.4f} (no budget limit)', values)
    fraction = spend / limit
    values['fraction'] = f'{fraction:.2f}'
    if fraction >= 1.0:
        return CheckResult(ERROR, f'cloud over budget: spent {spend:.4f} of {limit:.4f} this period;'
                           ' cloud routes fall back to local until the period ends. Raise '
                           'budget.limit in the policy file or route fewer types to the cloud',
                           values)
    if fraction >= warn_fraction:
        return CheckResult(WARN, f'cloud spend at {fraction:.0%} of budget ({spend:.4f} of '
                           f'{limit:.4f})', values)
    return CheckResult(OK, f'cloud spend {spend:.4f} of {limit:.4f}', values)


def persistence_check(lag_s: float, warn_s: float = 1.0, error_s: float = 5.0,
                      what: str = 'state') -> CheckResult:
    """How far persisted state trails what was handled (e.g. oldest uncommitted event's age)."""
    values = {'lag_s': f'{lag_s:.3f}'}
    if lag_s >= error_s:
        return CheckResult(ERROR, f'{what} persistence lagging {lag_s:.1f} s (over {error_s:g} s): '
                           'the disk is slow or full; a crash now loses that much', values)
    if lag_s >= warn_s:
        return CheckResult(WARN, f'{what} persistence lagging {lag_s:.1f} s', values)
    return CheckResult(OK, f'{what} persisted (lag {lag_s:.3f} s)', values)


def run_check(check: Callable[[], CheckResult]) -> CheckResult:
    try:
        result = check()
    except Exception as exc:  # a broken check is itself a finding, not a crash
        return CheckResult(ERROR, f'check failed: {exc!r}')
    if not isinstance(result, CheckResult):
        return CheckResult(ERROR, f'check returned {type(result).__name__}, not a CheckResult')
    return result


# -- ROS shell -------------------------------------------------------------------------------------
def to_status(node_name: str, check_name: str, result: CheckResult, hardware_id: str = ''):
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
    return DiagnosticStatus(level=bytes([result.level]), name=f'{node_name}: {check_name}',
                            message=result.message[:1024], hardware_id=hardware_id,
                            values=[KeyValue(key=k, value=v) for k, v in result.values.items()])


def level_of(status) -> int:
    level = status.level
    return level[0] if isinstance(level, (bytes, bytearray)) else int(level)


class DiagnosticsReporter:
    """Runs a node's checks every `period_s` and publishes them on /diagnostics."""

    def __init__(self, node, period_s: float = 1.0, hardware_id: str = ''):
        from diagnostic_msgs.msg import DiagnosticArray
        self.node = node
        self.hardware_id = hardware_id or node.get_fully_qualified_name()
        self.checks: dict[str, Callable[[], CheckResult]] = {}
        self.last: dict[str, CheckResult] = {}
        # Default QoS of /diagnostics in the ROS tools: reliable, volatile, depth 10.
        self.publisher = node.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, 10)
        self.timer = node.create_timer(period_s, self.publish) if period_s > 0 else None

    def add_check(self, name: str, check: Callable[[], CheckResult]) -> None:
        self.checks[name] = check

    def remove_check(self, name: str) -> None:
        self.checks.pop(name, None)

    def run(self) -> dict[str, CheckResult]:
        self.last = {name: run_check(check) for name, check in list(self.checks.items())}
        return self.last

    def publish(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        results = self.run()
        msg = DiagnosticArray()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        name = self.node.get_fully_qualified_name()
        msg.status = [to_status(name, check, result, self.hardware_id)
                      for check, result in results.items()]
        self.publisher.publish(msg)

    def destroy(self) -> None:
        if self.timer is not None:
            self.node.destroy_timer(self.timer)
        self.node.destroy_publisher(self.publisher)
