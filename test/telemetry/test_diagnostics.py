"""Diagnostics: each check switches OK / WARN / ERROR under induced conditions (pure), a broken
check is an ERROR, and a real router process reports the cloud budget going from OK to WARN to
ERROR on /diagnostics as outcomes with costs arrive."""
from __future__ import annotations

from loom_ros.telemetry.diagnostics import (
    ERROR, MAX_QUEUE_VALUES, OK, WARN, CheckResult, DropsRising, budget_check, level_of, persistence_check,
    plugin_check, queue_check, queues_check, run_check,
)


def test_queue_near_full_then_full():
    assert queue_check(10, 100).level == OK
    warn = queue_check(85, 100)
    assert warn.level == WARN and 'near full (85/100)' in warn.message
    full = queue_check(100, 100)
    assert full.level == ERROR and 'raise queue_size' in full.message
    assert queue_check(5, 0).level == OK
    worst = queues_check({'camera.**': (1, 100), 'agent.*.action': (99, 100)})
    assert worst.level == ERROR and 'agent.*.action' in worst.message
    assert queues_check({}).level == OK


def test_queues_check_names_only_the_fullest_queues():
    """1,000 agents' mailboxes: the report names the MAX_QUEUE_VALUES fullest (the one past
    warn among them, whatever its place in the dict) and counts the rest, so its size does not
    grow with the host."""
    queues = {f'a{i}': (i % 7, 100) for i in range(1000)}
    queues['a500'] = (90, 100)     # the one near full
    queues['a999'] = (50, 100)
    result = queues_check(queues)
    assert result.level == WARN and 'queue a500 near full (90/100)' in result.message
    named = {k.rsplit('.', 1)[0] for k in result.values if k.endswith('.depth')}
    assert len(named) == MAX_QUEUE_VALUES and {'a500', 'a999'} <= named
    assert result.values['a500.depth'] == '90' and result.values['a500.capacity'] == '100'
    assert result.values['queues'] == '1000' and result.values['over_warn'] == '1'
    assert result.values['depth_total'] == str(sum(d for d, _ in queues.values()))
    assert len(result.values) == 3 + 2 * MAX_QUEUE_VALUES
    few = queues_check({'x': (1, 10), 'y': (0, 0)})   # fewer than the bound: all named
    assert few.level == OK and few.values['x.depth'] == '1' and few.values['y.capacity'] == '0'


def test_drops_rising_switches_with_the_rate():
    drops = DropsRising(warn_per_s=0.0, error_per_s=100.0)
    assert drops.update(0, now=0.0).level == OK
    assert drops.update(0, now=1.0).level == OK
    rising = drops.update(5, now=2.0)
    assert rising.level == WARN and '5.0' in rising.message and 'loom/bus/stats' in rising.message
    assert drops.update(1000, now=3.0).level == ERROR
    assert drops.update(1000, now=4.0).level == OK   # stopped rising


def test_plugin_budget_and_persistence():
    assert plugin_check('face', True).level == OK
    assert plugin_check('face', None, 'timeout after 1 s').level == WARN
    bad = plugin_check('face', False, 'model file truncated')
    assert bad.level == ERROR and 'model file truncated' in bad.message
    assert budget_check(1.0, 5.0).level == OK
    assert budget_check(4.5, 5.0).level == WARN
    over = budget_check(5.2, 5.0)
    assert over.level == ERROR and 'over budget' in over.message and 'budget.limit' in over.message
    assert budget_check(100.0, 0.0).level == OK   # no limit configured
    assert persistence_check(0.01).level == OK
    assert persistence_check(2.0).level == WARN
    assert persistence_check(9.0).level == ERROR


def test_a_broken_check_is_an_error_not_a_crash():
    assert run_check(lambda: 1 / 0).level == ERROR
    assert 'ZeroDivisionError' in run_check(lambda: 1 / 0).message
    assert run_check(lambda: 'fine').level == ERROR
    assert run_check(lambda: CheckResult(OK, 'x')).level == OK


def test_router_reports_budget_levels_on_diagnostics(ros, spawn, tmp_path):
    """The budget counts what was reported and what this period's cloud decisions still
    reserve (an outcome counts only for a decision the router made: router/outcomes is open to
    anyone on the bus)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from loom_msgs.msg import RouteOutcome
    from loom_msgs.srv import Route

    from loom_ros.bus.qos import to_qos_profile
    levels: list[tuple[int, str]] = []

    def on_diag(msg):
        for status in msg.status:
            if status.name == '/router: cloud budget':
                levels.append((level_of(status), status.message))

    policy = tmp_path / 'policy.yaml'
    policy.write_text('default: {cloud_model: cloud-default}\nmodels: {cloud-default: 0.002}\n'
                      'budget: {period_s: 86400, limit: 0.0095}\n')
    sub = ros.node.create_subscription(DiagnosticArray, '/diagnostics', on_diag, 10)
    pub = ros.node.create_publisher(RouteOutcome, 'router/outcomes', to_qos_profile('batched'))
    client = ros.node.create_client(Route, 'router/route')
    router = spawn('-m', 'loom_ros.router.router_node', '--ros-args',
                   '-p', f'history_db:={tmp_path / "router.db"}', '-p', f'policy_file:={policy}',
                   '-p', 'telemetry.diagnostics.period_s:=0.2')
    try:
        ros.wait_for(lambda: levels and levels[-1][0] == OK, 'an OK budget report',
                     alive=[router])
        ros.first_exchange(client, alive=[router])
        decisions = []
        for i in range(4):   # 4 cloud calls of 0.002 reserved: 0.008 of 0.0095, 84%
            future = client.call_async(Route.Request(
                event_id=f'e{i}', event_type='speech.utterance', local_supported=True,
                has_privacy=True,
                has_local_confidence=True, local_confidence=0.1))
            ros.wait_for(future.done, 'a Route answer', alive=[router])
            assert future.result().route == 'cloud', future.result()
            decisions.append(future.result().decision_id)
        ros.wait_for(lambda: levels[-1][0] == WARN, 'WARN near the budget', alive=[router])
        assert '84%' in levels[-1][1]
        ros.wait_for(lambda: pub.get_subscription_count() > 0, 'the router on router/outcomes')
        pub.publish(RouteOutcome(decision_id='forged', event_type='speech.utterance',
                                 backend='cloud', latency_ms=1.0, cost=0.01, success=True))
        # one call cost twice its estimate: 0.004 + the others' 0.006 = 0.010 of 0.0095
        pub.publish(RouteOutcome(decision_id=decisions[0], event_type='speech.utterance',
                                 backend='cloud', latency_ms=100.0, cost=0.004, success=True,
                                 confidence=0.9))
        ros.wait_for(lambda: levels[-1][0] == ERROR, 'ERROR over budget', alive=[router])
        assert 'cloud over budget: spent 0.0100 of 0.0095' in levels[-1][1]   # no forgery in it
    finally:
        ros.node.destroy_client(client)
        ros.node.destroy_subscription(sub)
        ros.node.destroy_publisher(pub)
