"""The router's decision path for a caller in the same process: what `router/route` answers,
without a service round trip or serialization. No rclpy.

`RouteQuery` is what a caller asks about one event and `RouteAnswer` what it gets back (the
fields of loom_msgs/Route's response); both are plain data, so an agent's router port can be
this `LocalRouter` or a service client (agents/flows/link.py) and the behavior cannot tell.

A LocalRouter is passed to whoever uses it (never found through a global). With a history it
records decisions and outcomes and charges the spend like the router node; that history's
SQLite connection must be usable from the calling threads (`RouterHistory(shared=True)`). It
publishes nothing itself: the router node runs its own decisions through one (its service and
in-process callers share one history and one lock) and publishes them through `on_decision`.
An agent host in another process runs one without a history (agents/flows/link.py
HostedRouter): the spend then comes from `spend` (what the router node last reported) and the
decisions go to the router node through `on_decision`, so a camera frame is routed without a
service round trip (issue 15).
"""
from __future__ import annotations

import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from loom_ros.bus.event import Privacy
from loom_ros.bus.privacy import Purpose, check_subject
from loom_ros.config.params import by_node, config_dir, load_params_file, node_defaults
from loom_ros.router.decision import CLOUD_ROUTES, Decision, RouteRequest, Spend, decide
from loom_ros.router.history import NOT_KEPT, Outcome, OutcomeRefused, RouterHistory
from loom_ros.router.policy import PolicyFile, load_policy
from loom_ros.telemetry import tracing


ROUTER_NODE = 'router'   # whose parameters (config/loom.yaml section) name the policy file
MAX_OUTCOME_FIELD_CHARS = 256   # an outcome's ids, type and backend
# An outcome may report up to this many times the dearest model's cost per call (a real call
# can cost more than the policy's estimate); more, or a negative or non-finite cost, is refused:
# one forged outcome of -1e9 had zeroed the spend, one of +inf spent the whole period.
OUTCOME_COST_FACTOR = 10.0
MAX_RESERVED = 100_000   # cloud decisions awaiting their outcome, charged in the meantime


def policy_path_of_files(params_files=(), defaults_path: str | None = None) -> str:
    """The policy file a router node started with these ROS params files would load: the
    defaults, then each file's `/**` and router sections in order (as ROS applies them); ''
    means the shipped config/policy.yaml."""
    merged = dict(node_defaults(ROUTER_NODE, defaults_path))
    for path in params_files:
        sections = by_node(load_params_file(path))
        merged.update(sections.get('/**', {}))
        merged.update(sections.get(ROUTER_NODE, {}))
    return str(merged.get('policy_file') or config_dir() / 'policy.yaml')


class RouterRefused(RuntimeError):
    """The router did not decide: not active, or the query was invalid; says why."""


@dataclass(frozen=True)
class RouteQuery:
    """One event's routing question (Route.srv's request, minus the trace carrier)."""

    event_id: str
    event_type: str
    agent_id: str = ''
    privacy: Privacy = Privacy.SENSITIVE    # unknown: may leave only as an embedding
    local_confidence: float | None = None   # None: the caller has no local estimate
    latency_budget_ms: float | None = None  # None: no deadline
    local_supported: bool = True
    payload_bytes: int = 0
    subject: str = ''                       # the event's loom.subject ('' = anonymous)

    def request(self) -> RouteRequest:
        """The router core's request; RequestError (a ValueError) when a field is invalid."""
        budget = math.inf if self.latency_budget_ms is None else self.latency_budget_ms
        return RouteRequest(event_type=self.event_type, agent_id=self.agent_id,
                            privacy=self.privacy, local_supported=self.local_supported,
                            local_confidence=self.local_confidence, latency_budget_ms=budget,
                            payload_bytes=self.payload_bytes, subject=self.subject).check()


@dataclass(frozen=True)
class RouteAnswer:
    """A decision with its id (outcomes name it): Route.srv's response fields when ok."""

    decision_id: str
    route: str                  # local | cloud | hybrid | local_fallback
    rule: str
    reason: str
    upload: str = 'raw'         # what a cloud route may send: raw | embedding | none
    confidence: float = 1.0
    cloud_model: str = ''
    cloud_cost: float = 0.0

    @classmethod
    def of(cls, decision_id: str, decision: Decision) -> 'RouteAnswer':
        return cls(decision_id, decision.route.value, decision.rule, decision.reason,
                   decision.upload, float(decision.confidence), decision.cloud_model,
                   float(decision.cloud_cost))


class LocalRouter:
    """decide() under a policy file, with an optional history (decisions, outcomes, spend).
    Thread-safe: one lock around the history, since dispatcher workers call it concurrently."""

    def __init__(self, policy: PolicyFile, history: RouterHistory | None = None,
                 on_decision: Callable[[RouteQuery, RouteAnswer], None] | None = None,
                 spend: Callable[[], float] | None = None,
                 consent: Callable[[str, str], object] | None = None):
        """`spend`: the cloud spend of the budget period when there is no history (else 0).
        `consent`: the consent registry's lookup (subject, purpose); None: events that name a
        subject stay local (fail closed)."""
        self.policy = policy
        self.consent = consent
        self.history = history
        self.on_decision = on_decision   # e.g. the router node publishing router/decisions
        self.spend = spend
        self.decisions = 0
        self.outcomes = 0
        self.subjects_not_kept = 0   # decisions recorded without their subject (no store consent)
        self.outcomes_refused: Counter = Counter()   # by the check they failed
        self.clock = time.time
        # Cloud and hybrid decisions of this budget period not yet reported: their estimated
        # cost counts toward the budget until their outcome does (1,000 decisions made before
        # any outcome had all gone to the cloud past the limit).
        self._reserved: dict[str, float] = {}
        self._reserved_period = -1
        self._reserved_total = 0.0
        self.reservations_dropped = 0
        self.lock = threading.Lock()   # around the history: callers reading it take it too

    @classmethod
    def from_file(cls, path, history: RouterHistory | None = None) -> 'LocalRouter':
        """PolicyError names the file, the key and the reason."""
        return cls(load_policy(path), history)

    def route(self, query: RouteQuery) -> RouteAnswer:
        """The decision, in a RouteDecision span; RequestError or PolicyError (ValueErrors)
        with the field and reason for a bad query."""
        with tracing.span(tracing.ROUTE_DECISION, attributes={
                'loom.event.id': query.event_id, 'loom.event.type': query.event_type,
                'loom.agent.id': query.agent_id}) as span:
            answer = self.decide(query)
            span.set_attribute('loom.route', answer.route)
            span.set_attribute('loom.route.rule', answer.rule)
        return answer

    def decide(self, query: RouteQuery) -> RouteAnswer:
        """The decision without a span of its own (the router node's service opens one that
        joins the caller's trace), recorded and handed to `on_decision`."""
        request = query.request()
        policy = self.policy.policy_for(request.event_type, request.agent_id)
        with self.lock:
            spent = self.history.spend() if self.history is not None else \
                float(self.spend()) if self.spend is not None else 0.0
            spend = Spend(spent + self._reserved_now(), self.policy.budget.limit)
            decision = decide(request, policy, cloud_cost=self.policy.cost_of(
                policy.cloud_model), spend=spend, consent=self.consent)
            decision_id = uuid.uuid4().hex
            if decision.route in CLOUD_ROUTES and decision.cloud_cost > 0:
                self._reserve(decision_id, float(decision.cloud_cost))
            if self.history is not None:
                self.history.record_decision(decision_id, query.event_id, request, decision,
                                             subject=self.filed_under(request.subject))
            self.decisions += 1
        answer = RouteAnswer.of(decision_id, decision)
        if self.on_decision is not None:
            self.on_decision(query, answer)
        return answer

    def filed_under(self, subject: str) -> str:
        """The data subject a history row may name: a valid id with `store` consent; else
        NOT_KEPT (counted): storage keeps no id of someone who did not consent to it, nor an
        invalid one, yet the row still says it was someone's (never training data). For every
        decision filed, this router's or one an agent host made (the router node's
        router/decisions); call it holding `lock`."""
        if not subject:
            return ''
        try:
            check_subject(subject)
            if self.consent is not None and self.consent(subject, Purpose.STORE.value).granted:
                return subject
        except Exception:  # noqa: BLE001 - an invalid id or an unreadable registry: not kept
            pass
        self.subjects_not_kept += 1
        return NOT_KEPT

    def _reserved_now(self) -> float:
        """What this period's unreported cloud decisions are estimated to cost (lock held)."""
        period = int(self.clock() // self.policy.budget.period_s)
        if period != self._reserved_period:   # a new period: last period's are not charged
            self._reserved.clear()
            self._reserved_period, self._reserved_total = period, 0.0
        return self._reserved_total

    def reserved(self) -> float:
        """This period's estimate for cloud decisions not reported yet (call holding `lock`)."""
        return self._reserved_now()

    def _reserve(self, decision_id: str, cost: float) -> None:
        if len(self._reserved) >= MAX_RESERVED:   # the oldest unreported one goes (counted)
            oldest = next(iter(self._reserved))
            self._reserved_total -= self._reserved.pop(oldest)
            self.reservations_dropped += 1
        self._reserved[decision_id] = cost
        self._reserved_total += cost

    def check_outcome(self, outcome: Outcome) -> None:
        """OutcomeRefused (its reason a counter label) for an outcome no route could have
        produced: fields past their bounds, or a cost that is negative, not finite, or above
        OUTCOME_COST_FACTOR times the dearest model's."""
        for name in ('decision_id', 'event_type', 'backend'):
            value = getattr(outcome, name)
            if not isinstance(value, str) or len(value) > MAX_OUTCOME_FIELD_CHARS:
                raise OutcomeRefused('field', f'outcome {name}: not a string of at most '
                                     f'{MAX_OUTCOME_FIELD_CHARS} characters')
        if not outcome.decision_id:
            raise OutcomeRefused('field', 'outcome decision_id: empty')
        cost = float(outcome.cost)
        ceiling = OUTCOME_COST_FACTOR * max(self.policy.models.values(), default=0.0)
        if not (math.isfinite(cost) and 0.0 <= cost <= ceiling):
            raise OutcomeRefused('cost', f'outcome cost {cost!r} is not in [0, {ceiling:g}] '
                                 f'({OUTCOME_COST_FACTOR:g}x the dearest model)')

    def report(self, outcome: Outcome) -> str:
        """An executed route's outcome (spend, latency): recorded when there is a history.
        Returns '' when taken, else the reason it was refused (counted in outcomes_refused):
        one bad report never raises into the agent that made it."""
        with self.lock:
            try:
                self.check_outcome(outcome)
                if self.history is not None:
                    self.history.record_outcome(outcome)
            except OutcomeRefused as exc:
                self.outcomes_refused[exc.reason] += 1
                return exc.reason
            cost = self._reserved.pop(outcome.decision_id, None)
            if cost is not None:
                self._reserved_total -= cost
            self.outcomes += 1
        return ''
