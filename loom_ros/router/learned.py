"""The seed's "ML-based" router: a classifier trained from the router's history predicts whether
local inference will be good enough for an event, and routes on that prediction.

It never overrides the hard rules: the prediction stands in for the local confidence inside the
same rule chain (`decision.decide`), so privacy, capability, latency, cost and budget still fire
first and no learned score can send a Private event to the cloud. Its operating point (the
probability at which it trusts local) is chosen on training data to reach a target accuracy with
as few cloud calls as possible. Pure Python (scikit-learn, numpy), no rclpy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from sklearn.linear_model import LogisticRegression

from loom_ros.router.decision import Decision, RouteRequest, Spend, decide
from loom_ros.router.policy import RoutingPolicy


@dataclass
class LearnedRouter:
    model: LogisticRegression
    event_types: list[str]
    p_local: float = 0.5     # trust local at or above this predicted probability
    hybrid_band: float = 0.3  # below p_local by at most this: hybrid
    _weights: list | None = None
    _bias: float = 0.0

    # -- features ---------------------------------------------------------------------------
    def features(self, event_type: str, local_confidence: float, payload_bytes: int,
                 latency_budget_ms: float | None) -> list[float]:
        onehot = [1.0 if event_type == t else 0.0 for t in self.event_types]
        conf = float(local_confidence)
        budget = 10.0 if latency_budget_ms is None or math.isinf(latency_budget_ms) else min(
            latency_budget_ms, 10000.0) / 1000.0
        # Type-specific slopes let the model learn each local model's own calibration.
        return [*onehot, *(conf * o for o in onehot), *(conf * conf * o for o in onehot), conf,
                math.log1p(payload_bytes), budget]

    # -- training -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, rows: list[dict], seed: int = 0) -> 'LearnedRouter':
        """Rows: event_type, local_confidence, payload_bytes, latency_budget_ms, local_ok."""
        if len({bool(r['local_ok']) for r in rows}) < 2:
            raise ValueError('training needs events where local was right and where it was wrong')
        router = cls(LogisticRegression(max_iter=1000, random_state=seed),
                     sorted({r['event_type'] for r in rows}))
        x = np.array([router.features(r['event_type'], r['local_confidence'], r['payload_bytes'],
                                      r['latency_budget_ms']) for r in rows])
        router.model.fit(x, np.array([bool(r['local_ok']) for r in rows]))
        return router

    def probability(self, event_type: str, local_confidence: float, payload_bytes: int,
                    latency_budget_ms: float | None) -> float:
        """One prediction with the fitted coefficients in plain Python: scikit-learn's
        predict_proba costs ~100 us of input checking per call, this ~5 us (same number)."""
        if self._weights is None:
            self._weights = [float(w) for w in self.model.coef_[0]]
            self._bias = float(self.model.intercept_[0])
        z = self._bias + sum(w * x for w, x in zip(
            self._weights, self.features(event_type, local_confidence, payload_bytes,
                                         latency_budget_ms)))
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def predict(self, rows: list[dict]) -> np.ndarray:
        x = np.array([self.features(r['event_type'], r['local_confidence'], r['payload_bytes'],
                                    r['latency_budget_ms']) for r in rows])
        return self.model.predict_proba(x)[:, 1]

    def calibrate(self, rows: list[dict], cloud_ok: list[bool], target_accuracy: float) -> float:
        """Lowest-cloud operating point whose accuracy on `rows` reaches `target_accuracy`:
        local when the predicted probability >= p_local, else the cloud's answer."""
        p = self.predict(rows)
        local_ok = np.array([bool(r['local_ok']) for r in rows])
        cloud = np.array(cloud_ok, dtype=bool)
        best = 0.0
        for candidate in sorted(set(np.round(p, 4)) | {1.01}, reverse=True):
            correct = np.where(p >= candidate, local_ok, cloud)
            if correct.mean() >= target_accuracy:
                best = candidate  # lower keeps more local; keep going while accuracy holds
            else:
                break
        self.p_local = float(best) if best else 1.01
        return self.p_local

    # -- deciding -----------------------------------------------------------------------------
    def decide(self, request: RouteRequest, policy: RoutingPolicy, *, cloud_cost: float,
               spend: Spend | None = None, consent=None) -> Decision:
        """The rule chain with the predicted probability in place of the raw confidence
        (`consent`: the registry's lookup, as for decision.decide)."""
        if request.local_confidence is None:
            return decide(request, policy, cloud_cost=cloud_cost, spend=spend, consent=consent)
        p = self.probability(request.event_type, request.local_confidence,
                             request.payload_bytes, request.latency_budget_ms)
        learned_policy = policy.model_copy(update={
            'threshold': min(1.0, self.p_local),
            'hybrid_floor': max(0.0, min(1.0, self.p_local) - self.hybrid_band)})
        decision = decide(replace(request, local_confidence=p), learned_policy,
                          cloud_cost=cloud_cost, spend=spend, consent=consent)
        return replace(decision, confidence=request.local_confidence,
                       rule=f'learned:{decision.rule}',
                       reason=decision.reason.replace('local confidence',
                                                      'learned P(local good)'))
