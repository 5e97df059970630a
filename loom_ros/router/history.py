"""The router's memory: decisions and reported outcomes in SQLite (sqlite-utils, WAL), the spend in
the current budget period, and running statistics. Survives restarts; no rclpy here."""
from __future__ import annotations

import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from loom_ros.router.decision import Decision, Route, RouteRequest


@dataclass(frozen=True)
class Outcome:
    decision_id: str
    event_type: str
    backend: str          # local | cloud
    latency_ms: float
    cost: float
    success: bool
    confidence: float


class RouterHistory:
    """Not locked itself: with `shared=True` the connection may be used from other threads,
    and the caller serializes access (LocalRouter holds one lock around it)."""

    def __init__(self, path: str | Path, budget_period_s: float, shared: bool = False):
        if str(path) != ':memory:':
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite_utils.Database(sqlite3.connect(str(path), check_same_thread=not shared))
        if str(path) != ':memory:':
            self.db.enable_wal()
            # WAL + NORMAL: a crash of the process loses nothing committed; a power cut may lose
            # the last few decisions. Saves an fsync per decision (measured: bench/router_bench).
            self.db.execute('PRAGMA synchronous=NORMAL')
        self.period_s = budget_period_s
        self.db['decisions'].create({
            'id': str, 'time': float, 'event_id': str, 'event_type': str, 'agent_id': str,
            'privacy': int, 'route': str, 'rule': str, 'confidence': float, 'cloud_cost': float,
            'local_confidence': float, 'payload_bytes': int, 'latency_budget_ms': float,
        }, pk='id', if_not_exists=True)
        self.db['outcomes'].create({
            'decision_id': str, 'time': float, 'event_type': str, 'backend': str,
            'latency_ms': float, 'cost': float, 'success': int, 'confidence': float,
        }, if_not_exists=True)
        self.db['outcomes'].create_index(['time'], if_not_exists=True)
        self.db['outcomes'].create_index(['backend', 'event_type'], if_not_exists=True)
        self.routes: Counter = Counter(
            {row['route']: row['n'] for row in self.db.query(
                'select route, count(*) as n from decisions group by route')})
        self.outcomes = self.db['outcomes'].count

    def record_decision(self, decision_id: str, event_id: str, request: RouteRequest,
                        decision: Decision, now: float | None = None) -> None:
        self.db['decisions'].insert({
            'id': decision_id, 'time': now or time.time(), 'event_id': event_id,
            'event_type': request.event_type, 'agent_id': request.agent_id,
            'privacy': int(request.privacy), 'route': decision.route.value, 'rule': decision.rule,
            'confidence': decision.confidence, 'cloud_cost': decision.cloud_cost,
            'local_confidence': request.local_confidence, 'payload_bytes': request.payload_bytes,
            # SQLite has no infinity literal in JSON terms; no deadline is stored as NULL.
            'latency_budget_ms': (None if request.latency_budget_ms == float('inf')
                                  else request.latency_budget_ms)})
        self.routes[decision.route.value] += 1

    def record_outcome(self, outcome: Outcome, now: float | None = None) -> None:
        self.db['outcomes'].insert({**outcome.__dict__, 'success': int(outcome.success),
                                    'time': now or time.time()})
        self.outcomes += 1

    def spend(self, now: float | None = None) -> float:
        """Cloud spend reported in the current budget period (periods start at multiples of it)."""
        now = now or time.time()
        start = now - (now % self.period_s)
        row = next(self.db.query('select coalesce(sum(cost), 0) as s from outcomes '
                                 'where time >= ?', [start]))
        return float(row['s'])

    def rates(self) -> dict[str, float]:
        total = sum(self.routes.values())
        return {route.value: (self.routes[route.value] / total if total else 0.0)
                for route in Route}

    def backend_stats(self, event_type: str, backend: str) -> dict:
        """Running performance per backend and event type (what the learned router trains on)."""
        row = next(self.db.query(
            'select count(*) as n, avg(latency_ms) as latency_ms, avg(cost) as cost, '
            'avg(success) as success_rate, avg(confidence) as confidence from outcomes '
            'where event_type = ? and backend = ?', [event_type, backend]))
        return dict(row)

    def training_rows(self) -> list[dict]:
        """Decisions joined with what local inference turned out to be: the learned router's data."""
        return list(self.db.query(
            'select d.event_type, d.privacy, d.local_confidence, d.payload_bytes, '
            'd.latency_budget_ms, o.success as local_ok from decisions d join outcomes o '
            "on o.decision_id = d.id where o.backend = 'local' and d.local_confidence is not null"))

    @property
    def decisions(self) -> int:
        return sum(self.routes.values())

    def close(self) -> None:
        self.db.close()
