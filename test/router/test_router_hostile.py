"""What anyone on the bus can send the router (router/outcomes, router/decisions): a forged or
bounded-breaking outcome is refused and counted, never charged; each decision is charged once;
cloud decisions reserve their estimate until their outcome, so a burst cannot pass the budget;
no row claims a cloud route for a Private event. Real SQLite history, no rclpy."""
import math
import time
import types

import pytest

from loom_ros.bus.event import Privacy
from loom_ros.router.history import Outcome, RouterHistory
from loom_ros.router.local import OUTCOME_COST_FACTOR, LocalRouter, RouteQuery
from loom_ros.router.messages import DecisionMessageError, decision_of
from loom_ros.router.policy import PolicyFile

POLICY = PolicyFile.model_validate({
    'default': {'cloud_model': 'cloud-default'}, 'models': {'cloud-default': 0.002},
    'budget': {'period_s': 86400, 'limit': 5.0}})
CLOUD = dict(event_type='speech.utterance', privacy=Privacy.PUBLIC, local_confidence=0.1)


@pytest.fixture
def router(tmp_path):
    history = RouterHistory(tmp_path / 'router.db', POLICY.budget.period_s)
    yield LocalRouter(POLICY, history)
    history.close()


def outcome(decision_id: str, cost: float, **fields) -> Outcome:
    return Outcome(decision_id, fields.get('event_type', 'speech.utterance'),
                   fields.get('backend', 'cloud'), 10.0, cost, True, 0.9)


def test_forged_costs_are_refused_counted_and_never_charged(router):
    answer = router.route(RouteQuery(event_id='e', **CLOUD))
    assert router.history.spend() == 0.0 and router.reserved() == pytest.approx(0.002)
    for cost in (-1e9, -math.inf, math.inf, math.nan, OUTCOME_COST_FACTOR * 0.002 * 1.01):
        assert router.report(outcome(answer.decision_id, cost)) == 'cost'
    assert router.report(outcome('x' * 300, 0.001)) == 'field'
    assert router.report(outcome('', 0.001)) == 'field'
    assert dict(router.outcomes_refused) == {'cost': 5, 'field': 2}
    assert router.history.spend() == 0.0 and router.history.outcomes == 0
    # the real one is charged once; a second report of the same decision is refused
    assert router.report(outcome(answer.decision_id, 0.003)) == ''
    assert router.report(outcome(answer.decision_id, 0.003)) == 'duplicate'
    assert router.history.spend() == pytest.approx(0.003) and router.reserved() == 0.0


def test_an_outcome_of_no_decision_is_not_charged(router):
    assert router.report(outcome('never-decided', 0.019)) == ''   # kept, charged to nothing
    assert router.history.spend() == 0.0


def test_a_burst_of_decisions_cannot_pass_the_budget_before_its_outcomes(tmp_path):
    """1,000 decisions made before any outcome all went to the cloud at 4.99 of 5.0."""
    history = RouterHistory(tmp_path / 'router.db', POLICY.budget.period_s)
    router = LocalRouter(POLICY, history)
    first = router.route(RouteQuery(event_id='first', **CLOUD))
    assert router.report(outcome(first.decision_id, 0.02)) == ''   # spend 0.02 reported
    routes = [router.route(RouteQuery(event_id=f'e{i}', **CLOUD)).route for i in range(3000)]
    clouds = routes.count('cloud')
    assert clouds == int((5.0 - 0.02) / 0.002 + 1e-9) and routes[-1] == 'local_fallback'
    assert history.spend() + router.reserved() <= 5.0 + 1e-9
    # a new period: what the last one reserved is not charged
    router.clock = lambda: (int(time.time() // 86400) + 1) * 86400.0 + 1
    assert router.reserved() == 0.0
    history.close()


def test_a_decision_no_router_could_make_is_refused():
    msg = types.SimpleNamespace(
        decision_id='d', event_id='e', event_type='t', agent_id='a', privacy=int(Privacy.PRIVATE),
        route='cloud', confidence=0.5, rule='default', reason='r', upload='raw',
        cloud_model='m', cloud_cost=0.002, has_local_confidence=False, local_confidence=0.0,
        has_latency_budget=False, latency_budget_ms=0.0, payload_bytes=0, subject='')
    with pytest.raises(DecisionMessageError, match='no router sends Private'):
        decision_of(msg)
    msg.privacy = int(Privacy.LOCAL_ONLY)
    with pytest.raises(DecisionMessageError):
        decision_of(msg)
    msg.route = 'local_fallback'   # what rule 1 does make
    assert decision_of(msg)[3].route.value == 'local_fallback'
