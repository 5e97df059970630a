"""A labelled trace generator for evaluating routers: events whose local models differ in how
well their confidence predicts being right, as real ones do.

Each event carries the local model's confidence, whether the local answer is actually right
(`local_ok`) and whether the cloud's is (`cloud_ok`), drawn once from a seeded generator, so a
trace is the same on every run. Per event type:
- face.detected: the local detector is underconfident (right far more often than it says);
- speech.utterance: the local recognizer is overconfident (right less often than it says);
- imu.gesture: calibrated;
- scene.describe: the local model is weak whatever it says.
A rule with one threshold cannot be right for all four; a learned router can.
"""
from __future__ import annotations

import math
import random

EVENT_TYPES = {
    #                 share  conf beta(a, b)  P(local right | conf)             payload bytes
    'face.detected': (0.40, (4.0, 3.0), lambda c: min(1.0, 0.55 + 0.45 * c), 20_000),
    'speech.utterance': (0.30, (6.0, 2.0), lambda c: c ** 3, 32_000),
    'imu.gesture': (0.20, (3.0, 3.0), lambda c: c, 600),
    'scene.describe': (0.10, (3.0, 2.0), lambda c: 0.25 * c, 150_000),
}
CLOUD_ACCURACY = 0.96


def generate(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    names = list(EVENT_TYPES)
    weights = [EVENT_TYPES[t][0] for t in names]
    trace = []
    for i in range(n):
        event_type = rng.choices(names, weights)[0]
        _, (a, b), p_right, payload = EVENT_TYPES[event_type]
        conf = round(rng.betavariate(a, b), 4)
        trace.append({
            'event_id': f'{seed}-{i}',
            'event_type': event_type,
            'local_confidence': conf,
            'payload_bytes': int(payload * rng.uniform(0.5, 1.5)),
            'latency_budget_ms': 50.0 if rng.random() < 0.05 else math.inf,
            'privacy': 2 if rng.random() < 0.05 else 0,  # 5 % Private
            'local_ok': rng.random() < p_right(conf),
            'cloud_ok': rng.random() < CLOUD_ACCURACY,
        })
    return trace
