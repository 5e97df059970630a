"""Every rule branch and every boundary of the seed's routing algorithm, privacy over everything."""
import math

import pytest
from hypothesis import given, strategies as st

from loom_ros.bus.event import Privacy
from loom_ros.router.decision import (
    CLOUD_ROUTES, Decision, RequestError, Route, RouteRequest, Spend, decide,
)
from loom_ros.router.policy import RoutingPolicy

POLICY = RoutingPolicy(threshold=0.8, hybrid_floor=0.5, latency_local_ms=100, cost_cap=0.01)


def route(conf=0.3, cost=0.002, spend=None, policy=POLICY, **request) -> Decision:
    req = RouteRequest(event_type='speech.utterance', local_confidence=conf, **request)
    return decide(req, policy, cloud_cost=cost, spend=spend)


@pytest.mark.parametrize('conf, budget, cost, expected, rule', [
    (0.95, math.inf, 0.002, Route.LOCAL, 'threshold'),
    (0.8, math.inf, 0.002, Route.LOCAL, 'threshold'),           # exactly at the threshold
    (0.7999, math.inf, 0.002, Route.HYBRID, 'hybrid'),
    (0.3, 99.9, 0.002, Route.LOCAL, 'latency'),
    (0.3, 100.0, 0.002, Route.CLOUD, 'default'),                # a budget of exactly 100 ms
    (0.6, math.inf, 0.011, Route.LOCAL_FALLBACK, 'cost'),
    (0.6, math.inf, 0.01, Route.HYBRID, 'hybrid'),              # cost exactly at the cap
    (0.5, math.inf, 0.002, Route.CLOUD, 'default'),             # exactly 0.5 is not hybrid
    (0.5001, math.inf, 0.002, Route.HYBRID, 'hybrid'),
    (0.0, math.inf, 0.002, Route.CLOUD, 'default'),
])
def test_rules_and_boundaries(conf, budget, cost, expected, rule):
    decision = route(conf, cost, latency_budget_ms=budget)
    assert (decision.route, decision.rule) == (expected, rule)
    assert decision.reason  # every decision explains itself


def test_reasons_name_the_values_compared():
    assert route(0.92).reason == 'local confidence 0.920 >= threshold 0.800'
    assert route(0.3, latency_budget_ms=40).reason.startswith('latency budget 40 ms < 100 ms')
    assert route(0.6, cost=0.05).reason == 'cloud cost 0.05 > cap 0.01: local fallback'
    assert route(0.6).values == {'confidence': 0.6, 'hybrid_floor': 0.5, 'threshold': 0.8}


def test_no_local_capability_goes_to_the_cloud_without_running_local_inference():
    def must_not_run(_):
        raise AssertionError('local inference ran')
    req = RouteRequest(event_type='x', local_supported=False)
    decision = decide(req, POLICY, cloud_cost=0.002, local_infer=must_not_run)
    assert (decision.route, decision.rule, decision.cloud_cost) == (Route.CLOUD, 'capability', 0.002)


def test_local_inference_supplies_the_confidence_when_missing():
    req = RouteRequest(event_type='x')
    assert decide(req, POLICY, cloud_cost=0.0, local_infer=lambda r: 0.92).route is Route.LOCAL
    with pytest.raises(RequestError, match='no local inference'):
        decide(req, POLICY, cloud_cost=0.0)
    with pytest.raises(RequestError, match='returned confidence'):
        decide(req, POLICY, cloud_cost=0.0, local_infer=lambda r: float('nan'))


def test_budget_exactly_reached_is_allowed_and_exceeded_falls_back():
    assert route(0.6, cost=0.002, spend=Spend(4.998, 5.0)).route is Route.HYBRID
    decision = route(0.6, cost=0.002, spend=Spend(4.999, 5.0))
    assert (decision.route, decision.rule) == (Route.LOCAL_FALLBACK, 'budget')


@given(privacy=st.sampled_from([Privacy.PRIVATE, Privacy.LOCAL_ONLY]),
       conf=st.floats(0, 1), supported=st.booleans(), budget=st.floats(0, 1e6),
       cost=st.floats(0, 1), threshold=st.floats(0.5, 1), floor=st.floats(0, 0.5))
def test_private_and_local_only_never_reach_the_cloud(privacy, conf, supported, budget, cost,
                                                      threshold, floor):
    policy = RoutingPolicy(threshold=threshold, hybrid_floor=floor, cost_cap=1.0)
    decision = route(conf, cost, policy=policy, privacy=privacy, local_supported=supported,
                     latency_budget_ms=budget)
    assert decision.route not in CLOUD_ROUTES and decision.rule == 'privacy'
    assert decision.upload == 'none'


def test_sensitive_goes_up_only_as_embeddings_or_not_at_all():
    assert route(0.3, privacy=Privacy.SENSITIVE).upload == 'embedding'
    assert route(0.3, privacy=Privacy.PUBLIC).upload == 'raw'
    strict = RoutingPolicy(sensitive_upload='none')
    assert route(0.3, policy=strict, privacy=Privacy.SENSITIVE).route is Route.LOCAL


@pytest.mark.parametrize('request_fields, message', [
    (dict(event_type=''), 'event_type'),
    (dict(event_type='x', local_confidence=1.5), 'local_confidence'),
    (dict(event_type='x', local_confidence=float('nan')), 'local_confidence'),
    (dict(event_type='x', latency_budget_ms=-1), 'latency_budget_ms'),
    (dict(event_type='x', privacy=9), 'privacy'),
])
def test_bad_requests_are_refused_with_the_field(request_fields, message):
    with pytest.raises(RequestError, match=message):
        decide(RouteRequest(**request_fields), POLICY, cloud_cost=0.0)
