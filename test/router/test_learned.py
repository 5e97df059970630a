"""The learned router: trained from a real SQLite history, bounded by the hard rules, and cheaper
than the rule router at equal accuracy on held-out data."""
import math

from hypothesis import given, settings, strategies as st

from harness import REPO
from loom_ros.bus.event import Privacy
from loom_ros.router.decision import CLOUD_ROUTES, RouteRequest, Spend
from loom_ros.router.evaluate import evaluate, train_from_history
from loom_ros.router.policy import RoutingPolicy, load_policy
from loom_ros.router.trace import generate

POLICY = load_policy(REPO / 'config' / 'policy.yaml')


def test_beats_the_rules_on_cost_at_equal_accuracy_on_held_out_data():
    result = evaluate(events=20000, seed=0)
    rules, learned = result['rules'], result['learned']
    assert learned['cost'] < rules['cost'] and learned['cloud_calls'] < rules['cloud_calls']
    assert learned['accuracy'] >= rules['accuracy']
    assert result['cost_saving'] > 0 and result['test_events'] == 5000


def test_trains_from_the_history_database(tmp_path):
    rows = generate(2000, seed=3)
    router = train_from_history(rows, POLICY, str(tmp_path / 'h.db'))
    assert set(router.event_types) == {r['event_type'] for r in rows}
    import sqlite_utils
    db = sqlite_utils.Database(tmp_path / 'h.db')
    assert db['decisions'].count == 2000 and db['outcomes'].count == 2000


ROUTER = train_from_history(generate(4000, seed=5), POLICY, ':memory:')


@settings(max_examples=200)
@given(conf=st.floats(0, 1), event_type=st.sampled_from(
    ['face.detected', 'speech.utterance', 'imu.gesture', 'scene.describe', 'unknown']),
       privacy=st.sampled_from([Privacy.PRIVATE, Privacy.LOCAL_ONLY]), p_local=st.floats(0, 1))
def test_never_overrides_privacy(conf, event_type, privacy, p_local):
    ROUTER.p_local = p_local
    decision = ROUTER.decide(RouteRequest(event_type=event_type, privacy=privacy,
                                          local_confidence=conf), RoutingPolicy(), cloud_cost=0.0)
    assert decision.route not in CLOUD_ROUTES and decision.rule == 'learned:privacy'


def test_hard_rules_still_fire_and_reasons_say_learned():
    ROUTER.p_local = 0.9
    req = RouteRequest(event_type='face.detected', local_confidence=0.2)
    over_budget = ROUTER.decide(req, RoutingPolicy(), cloud_cost=0.002, spend=Spend(5.0, 5.0))
    assert over_budget.rule == 'learned:budget'
    fast = ROUTER.decide(RouteRequest(event_type='face.detected', local_confidence=0.2,
                                      latency_budget_ms=20), RoutingPolicy(), cloud_cost=0.0)
    assert fast.rule == 'learned:latency' and fast.confidence == 0.2
    ROUTER.p_local = 0.0
    trusting = ROUTER.decide(req, RoutingPolicy(), cloud_cost=0.0)
    assert trusting.rule == 'learned:threshold' and 'learned P(local good)' in trusting.reason
    assert math.isclose(trusting.confidence, 0.2)


def test_fast_probability_equals_scikit_learn():
    rows = generate(200, seed=9)
    expected = ROUTER.predict(rows)
    for row, p in zip(rows, expected):
        assert math.isclose(ROUTER.probability(row['event_type'], row['local_confidence'],
                                               row['payload_bytes'], row['latency_budget_ms']),
                            p, rel_tol=1e-9, abs_tol=1e-12)
