"""Replay a labelled trace through the rule router and the learned router and compare them.

    python -m loom_ros.router.evaluate [--events 20000] [--seed 0] [--policy config/policy.yaml]

The learned router is trained from a router history (SQLite) filled by replaying the first half
of the trace. Its operating point is set on the next quarter to the rule router's accuracy there,
and both routers are scored on the last quarter, held out: cloud calls, cost, and accuracy (a
Local answer is right when the local model was; Cloud and Hybrid answers are the cloud's). The
comparison is cost at equal accuracy (the RouteLLM trade-off).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from loom_ros.bus.event import Privacy
from loom_ros.router.decision import CLOUD_ROUTES, Route, RouteRequest, Spend, decide
from loom_ros.router.history import Outcome, RouterHistory
from loom_ros.router.learned import LearnedRouter
from loom_ros.router.policy import PolicyFile, load_policy
from loom_ros.router.trace import generate

REPO_CONFIG = Path(__file__).resolve().parents[2] / 'config' / 'policy.yaml'


def _request(row: dict) -> RouteRequest:
    return RouteRequest(event_type=row['event_type'], privacy=Privacy(row['privacy']),
                        local_confidence=row['local_confidence'],
                        latency_budget_ms=row['latency_budget_ms'],
                        payload_bytes=row['payload_bytes'])


def score(rows: list[dict], route_of, policy: PolicyFile) -> dict:
    """Replay rows through `route_of(request, routing_policy, cost)`; count calls, cost, accuracy."""
    cloud_calls = correct = 0
    cost = 0.0
    routes = {r.value: 0 for r in Route}
    for row in rows:
        request = _request(row)
        routing = policy.policy_for(request.event_type)
        call_cost = policy.cost_of(routing.cloud_model)
        decision = route_of(request, routing, call_cost)
        routes[decision.route.value] += 1
        if decision.route in CLOUD_ROUTES:
            cloud_calls += 1
            cost += call_cost
            correct += row['cloud_ok']
        else:
            correct += row['local_ok']
    return {'events': len(rows), 'cloud_calls': cloud_calls, 'cost': round(cost, 4),
            'accuracy': round(correct / len(rows), 4), 'routes': routes}


def train_from_history(rows: list[dict], policy: PolicyFile, db_path: str) -> LearnedRouter:
    """Replay training rows into a real router history, then train from what it holds."""
    history = RouterHistory(db_path, policy.budget.period_s)
    for row in rows:
        request = _request(row)
        routing = policy.policy_for(request.event_type)
        decision = decide(request, routing, cloud_cost=policy.cost_of(routing.cloud_model))
        history.record_decision(row['event_id'], row['event_id'], request, decision)
        history.record_outcome(Outcome(row['event_id'], row['event_type'], 'local', 0.0, 0.0,
                                       row['local_ok'], row['local_confidence']))
    training = history.training_rows()
    history.close()
    return LearnedRouter.fit(training)


def evaluate(events: int = 20000, seed: int = 0, policy_path: str | Path = REPO_CONFIG) -> dict:
    """Half the trace trains, a quarter sets the operating point, a quarter is held out."""
    policy = load_policy(policy_path)
    trace = generate(events, seed)
    train, tune, test = trace[: events // 2], trace[events // 2: 3 * events // 4], \
        trace[3 * events // 4:]
    with tempfile.TemporaryDirectory() as tmp:
        learned = train_from_history(train, policy, str(Path(tmp) / 'history.db'))

    def rules(request, routing, cost):
        return decide(request, routing, cloud_cost=cost, spend=Spend())

    def ml(request, routing, cost):
        return learned.decide(request, routing, cloud_cost=cost, spend=Spend())

    free = [r for r in tune if r['privacy'] == 0 and r['latency_budget_ms'] > 100]
    target = score(free, rules, policy)['accuracy']
    learned.calibrate(free, [r['cloud_ok'] for r in free], target_accuracy=target)
    result = {'events': events, 'seed': seed, 'train_events': len(train),
              'tune_events': len(tune), 'test_events': len(test),
              'learned_p_local': round(learned.p_local, 4),
              'rules': score(test, rules, policy), 'learned': score(test, ml, policy)}
    r, m = result['rules'], result['learned']
    result['cost_saving'] = round(1 - m['cost'] / r['cost'], 4) if r['cost'] else 0.0
    result['cloud_call_saving'] = round(1 - m['cloud_calls'] / r['cloud_calls'], 4) \
        if r['cloud_calls'] else 0.0
    result['accuracy_delta'] = round(m['accuracy'] - r['accuracy'], 4)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--events', type=int, default=20000)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--policy', default=str(REPO_CONFIG))
    parser.add_argument('--json', action='store_true', help='print the result as JSON')
    args = parser.parse_args(argv)
    result = evaluate(args.events, args.seed, args.policy)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"held-out events: {result['test_events']} (trained on {result['train_events']}, "
          f"operating point set on {result['tune_events']})")
    print(f"{'router':<8} {'cloud calls':>12} {'cost':>9} {'accuracy':>9}   routes")
    for name in ('rules', 'learned'):
        s = result[name]
        print(f"{name:<8} {s['cloud_calls']:>12} {s['cost']:>9.3f} {s['accuracy']:>9.4f}   "
              f"{s['routes']}")
    print(f"learned router: {result['cost_saving']:.1%} lower cloud cost, "
          f"{result['cloud_call_saving']:.1%} fewer cloud calls, accuracy "
          f"{result['accuracy_delta']:+.4f} vs the rules")
    return 0


if __name__ == '__main__':
    sys.exit(main())
