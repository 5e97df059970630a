"""The router's memory: decisions and reported outcomes, the spend in the current budget period,
and running statistics. Survives restarts; no rclpy here.

The tables, their SQL and the file's pragmas are the storage layer's (stores.RouterHistoryStore
over direct.DirectDatabase, opened by the one SQLite opener: WAL, synchronous=NORMAL, so a crash
of the process loses nothing committed and a decision costs no fsync); this is the router's
handle on its `history_db` file, taking its own types (RouteRequest, Decision, Outcome)."""
from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass

from loom_ros.router.decision import Decision, Route, RouteRequest
from loom_ros.storage import schema
from loom_ros.storage.direct import DirectDatabase
from loom_ros.storage.errors import StorageError
from loom_ros.storage.stores import SUBJECT_NOT_KEPT as NOT_KEPT, RouterHistoryStore


class OutcomeRefused(ValueError):
    """An outcome the history does not keep; `reason` names the check it failed (a counter
    label: cost, field, duplicate, unknown_decision)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class HistoryError(sqlite3.DatabaseError):
    """The history file cannot be opened, read or written; names the file and why. An
    sqlite3.Error, as the router's history always raised, so its callers keep handling it."""


@contextmanager
def _history_errors():
    try:
        yield
    except StorageError as exc:
        raise HistoryError(str(exc)) from None


@dataclass(frozen=True)
class Outcome:
    decision_id: str
    event_type: str
    backend: str          # local | cloud
    latency_ms: float
    cost: float
    success: bool         # the route ran and answered (not whether the answer was right)
    confidence: float
    # Was the local answer good enough (None: nobody had a reference to compare it with; see
    # loom_msgs/RouteOutcome), and did the routed event name a data subject. Carried on
    # router/outcomes for training (router/train_recorded.py); this history does not keep them.
    local_good_enough: bool | None = None
    names_subject: bool = False


class RouterHistory:
    """Each record is committed before it returns; usable from any thread (the database holds
    one lock). `shared` is kept for callers that say they share it across threads: every
    RouterHistory may be. `db.query(sql, params)` reads it (rows as dicts)."""

    def __init__(self, path: str | os.PathLike, budget_period_s: float, shared: bool = False):
        self.period_s = budget_period_s
        with _history_errors():
            self.db = DirectDatabase(path, schema.ROUTER_DDL)
            self._store = RouterHistoryStore(self.db, budget_period_s)

    def record_decision(self, decision_id: str, event_id: str, request: RouteRequest,
                        decision: Decision, now: float | None = None,
                        subject: str | None = None) -> None:
        """`subject`: the data subject to file the row under (None: the request's)."""
        with _history_errors():
            self._store.record_decision(
                decision_id, event_id, request.event_type, request.agent_id,
                int(request.privacy), decision.route.value, decision.rule, decision.confidence,
                decision.cloud_cost, request.local_confidence, request.payload_bytes,
                request.latency_budget_ms, now,
                subject=request.subject if subject is None else subject)

    def record_outcome(self, outcome: Outcome, now: float | None = None) -> None:
        """OutcomeRefused for a second outcome of one decision: each is charged once (a
        forged repeat of a real decision's id would add its cost again and again)."""
        with _history_errors():
            if self._store.has_outcome(outcome.decision_id):
                raise OutcomeRefused('duplicate', f'decision {outcome.decision_id[:64]!r} '
                                     'already has its outcome')
            self._store.record_outcome(outcome.decision_id, outcome.event_type, outcome.backend,
                                       outcome.latency_ms, outcome.cost, outcome.success,
                                       outcome.confidence, now)

    def has_decision(self, decision_id: str) -> bool:
        with _history_errors():
            return self._store.has_decision(decision_id)

    def spend(self, now: float | None = None) -> float:
        """Cloud spend reported in the current budget period (periods start at multiples of it),
        by outcomes of the decisions held here."""
        with _history_errors():
            return self._store.spend(now)

    def rates(self) -> dict[str, float]:
        total = sum(self._store.routes.values())
        return {route.value: (self._store.routes[route.value] / total if total else 0.0)
                for route in Route}

    def backend_stats(self, event_type: str, backend: str) -> dict:
        """Running performance per backend and event type (what the learned router trains on)."""
        with _history_errors():
            return self._store.backend_stats(event_type, backend)

    def training_rows(self) -> list[dict]:
        """Decisions joined with what local inference turned out to be: the learned router's
        data."""
        with _history_errors():
            return self._store.training_rows()

    @property
    def routes(self):
        return self._store.routes

    @property
    def outcomes(self) -> int:
        return self._store.outcomes

    @property
    def decisions(self) -> int:
        return sum(self._store.routes.values())

    def close(self) -> None:
        self.db.close()
