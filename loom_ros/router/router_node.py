"""Router node: the `router/route` service (loom_msgs/Route), every decision on `router/decisions`,
outcomes from agents and plugins on `router/outcomes`, running statistics on `router/stats`.

A lifecycle node: configure loads and validates the policy file and opens the SQLite history,
activate starts answering, deactivate refuses requests (ok=false, error says why), cleanup closes
the history. Changing the `policy_file` parameter at run time reloads the policy; a bad file is
refused with its key and reason and the old policy stays.

Decisions are made by one `LocalRouter` (router/local.py) around the history: the service uses
it, and so do agents in the same process through `in_process()` (`loom bringup --composition`),
without a service round trip; both kinds are published on `router/decisions`.
"""
from __future__ import annotations

import math
import sqlite3
import sys
import time
from collections import Counter

from rcl_interfaces.msg import SetParametersResult
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from loom_ros.bus import topics
from loom_ros.bus.event import Privacy
from loom_ros.bus.executor import ReleasingLifecycleNode, run_lifecycle_node
from loom_ros.bus.qos import to_qos_profile
from loom_ros.bus.replies import PROBE_ANSWER, is_probe
from loom_ros.config.params import ConfigError, ParamSpec, config_dir, declare_parameters
from loom_ros.config.paths import usable_file
from loom_ros.router.decision import RequestError
from loom_ros.router.history import Outcome, RouterHistory
from loom_ros.router.local import LocalRouter, RouteAnswer, RouteQuery, RouterRefused
from loom_ros.router.messages import (MAX_FIELD_CHARS, DecisionMessageError, decision_msg,
                                      decision_of)
from loom_ros.router.policy import PolicyError, PolicyFile, load_policy
from loom_ros.storage.layout import derived
from loom_ros.storage.consent import ConsentError, ConsentRegistry, consent_path, load_defaults
from loom_ros.telemetry import tracing
from loom_ros.telemetry.diagnostics import WARN, CheckResult, budget_check
from loom_ros.telemetry.node_telemetry import attach_telemetry
from loom_ros.telemetry.logs import mask_node_logger

PARAMETERS = [
    ParamSpec('policy_file', "Routing policy YAML; '' means the shipped config/policy.yaml"),
    ParamSpec('history_db', "SQLite file of decisions and outcomes; '~' expands ('' = "
              "<storage.root>/router.db)", read_only=True),
    ParamSpec('stats_period_s', 'Seconds between RouterStats messages', read_only=True,
              min_value=0.01, max_value=3600.0),
    ParamSpec('autostart', 'Configure and activate on start when run standalone', read_only=True),
]


class _TraceCarrier:
    """The part of an Event tracing reads: metadata with the caller's traceparent."""

    def __init__(self, traceparent: str):
        self.metadata = {tracing.TRACEPARENT: traceparent}


class RouterNode(ReleasingLifecycleNode, LifecycleNode):

    def __init__(self, **kwargs):
        super().__init__('router', **kwargs)
        mask_node_logger(self)   # every log line masked from the first (issue 13, fault 10)
        self.params = declare_parameters(self, 'router', PARAMETERS)
        self.policy: PolicyFile | None = None
        self.history: RouterHistory | None = None
        self.consent: ConsentRegistry | None = None
        self.hosted_decisions = 0     # recorded from agent hosts that route in-process
        self.rejected_decisions = 0
        self.route_refused: Counter = Counter()   # router/route requests refused, by field
        self.probes = 0               # empty Route requests answered (bus/replies.py)
        self.local: LocalRouter | None = None   # the decision path, made on configure
        self._active = False
        self._service = None  # set on configure; None means nothing to release
        self.configure_error = ''   # why the last configure failed (loom bringup prints it)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.telemetry = attach_telemetry(self, 'router')  # /diagnostics, loom/metrics, tracing
        self.telemetry.add_check('cloud budget', self._budget_check)
        self.telemetry.registry.collectors.append(self._collect_metrics)

    # -- lifecycle ------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from loom_msgs.msg import RouteDecision, RouteOutcome, RouterStats
        from loom_msgs.srv import Route
        self.configure_error = ''
        try:
            self.policy = self._load(self.get_parameter('policy_file').value)
            db = derived(self.params['history_db'], self.telemetry.layout.router_history)
            if db != ':memory:':
                db = str(usable_file(db, 'router.history_db'))
            self.history = RouterHistory(db, self.policy.budget.period_s, shared=True)
            # Read-only: the storage node and `loom consent` write it; a change holds at the
            # next decision.
            self.consent = ConsentRegistry(consent_path(self.telemetry.layout.root),
                                           load_defaults(config_dir() / 'consent.yaml'),
                                           read_only=True)
        except (PolicyError, ConfigError, ConsentError, OSError, sqlite3.Error) as exc:
            self.configure_error = str(exc) if not isinstance(exc, sqlite3.Error) else \
                f"router.history_db {self.params['history_db']}: cannot open: {exc}"
            self.get_logger().error(f'cannot configure: {self.configure_error}')
            return TransitionCallbackReturn.FAILURE
        self.decisions_pub = self.create_lifecycle_publisher(
            RouteDecision, topics.ROUTER_DECISIONS, to_qos_profile('batched'))
        self.stats_pub = self.create_lifecycle_publisher(
            RouterStats, topics.ROUTER_STATS, to_qos_profile('realtime'))
        self._service = self.create_service(Route, topics.ROUTER_ROUTE, self._on_route)
        self._outcomes = self.create_subscription(RouteOutcome, topics.ROUTER_OUTCOMES,
                                                  self._on_outcome, to_qos_profile('batched'))
        self._hosted = self.create_subscription(RouteDecision, topics.ROUTER_DECISIONS,
                                                self._on_decision, to_qos_profile('batched'))
        self._stats_timer = self.create_timer(self.params['stats_period_s'], self._publish_stats)
        self.local = LocalRouter(self.policy, self.history, on_decision=self._publish_decision,
                                 consent=self.consent.lookup)
        self.get_logger().info(f'configured: {self.history.decisions} decisions in history, '
                               f'spend this period {self.history.spend():g}')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = True
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        return super().on_deactivate(state)

    def _release(self) -> None:
        if self._service is not None:
            self.destroy_service(self._service)
            self.destroy_subscription(self._outcomes)
            self.destroy_subscription(self._hosted)
            self.destroy_timer(self._stats_timer)
            self.destroy_lifecycle_publisher(self.decisions_pub)
            self.destroy_lifecycle_publisher(self.stats_pub)
            self._service = None
        if self.history is not None:
            local, self.local = self.local, None
            if local is not None:
                with local.lock:   # an in-process caller mid-decision finishes first
                    local.history = None
            self.history.close()
            self.history = None
        if self.consent is not None:
            self.consent.close()
            self.consent = None

    # -- policy -------------------------------------------------------------------------------
    def _load(self, path: str) -> PolicyFile:
        return load_policy(path or config_dir() / 'policy.yaml')

    def _on_set_parameters(self, params) -> SetParametersResult:
        for param in params:
            if param.name == 'policy_file' and self.policy is not None:
                try:
                    self.policy = self._load(param.value)
                except PolicyError as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
                if self.local is not None:
                    self.local.policy = self.policy
                self.get_logger().info(f'policy reloaded from {param.value or "default"}')
        return SetParametersResult(successful=True)

    # -- telemetry ----------------------------------------------------------------------------
    def _budget_check(self) -> CheckResult:
        local = self.local
        if local is None or local.history is None:
            return CheckResult(WARN, 'router not configured: no history or policy loaded yet')
        with local.lock:   # reported, and what this period's cloud decisions still reserve
            spend = local.history.spend() + local.reserved()
        return budget_check(spend, local.policy.budget.limit)

    def _collect_metrics(self, registry) -> None:
        local = self.local
        if local is None or local.history is None:
            return
        with local.lock:
            decisions, rates = local.history.decisions, local.history.rates()
            spend = local.history.spend()
        registry.set_total('route_decisions', decisions)
        for route, rate in rates.items():
            registry.set_gauge('route_rate', rate, route=route)
            reserved, refused = local.reserved(), dict(local.outcomes_refused)
        registry.set_gauge('cloud_spend', spend)
        registry.set_gauge('cloud_reserved', reserved)
        registry.set_gauge('cloud_budget_limit', local.policy.budget.limit)
        registry.set_total('route_decisions_refused', self.rejected_decisions)
        for reason, count in list(self.route_refused.items()):
            registry.set_total('route_requests_refused', count, reason=reason)
        for reason, count in refused.items():
            registry.set_total('route_outcomes_refused', count, reason=reason)

    # -- in-process callers ------------------------------------------------------------------
    def in_process(self) -> 'InProcessRouter':
        """A router port for agents in this process: decisions without the service."""
        return InProcessRouter(self)

    # -- service ------------------------------------------------------------------------------
    def _on_route(self, req, resp):
        if is_probe(req):   # a client's first exchange (bus/replies.py): no decision, no span
            self.probes += 1
            resp.ok, resp.error = False, PROBE_ANSWER
            return resp
        start = time.perf_counter()
        carrier = _TraceCarrier(req.traceparent) if req.traceparent else None
        with tracing.span(tracing.ROUTE_DECISION, carrier, kind='SERVER', attributes={
                'loom.event.id': req.event_id, 'loom.event.type': req.event_type,
                'loom.agent.id': req.agent_id}) as span:
            resp = self._route(req, resp)
            span.set_attribute('loom.route', resp.route if resp.ok else 'refused')
            span.set_attribute('loom.route.rule', resp.rule)
        self.telemetry.registry.histogram('route_decision_ms').record(
            (time.perf_counter() - start) * 1000.0)
        return resp

    def _route(self, req, resp):
        if not self._active:
            resp.ok, resp.error = False, 'router is not active (lifecycle state is not active)'
            return resp
        for name in ('event_id', 'event_type', 'agent_id'):   # a subject is judged (consent)
            if len(getattr(req, name)) > MAX_FIELD_CHARS:   # before a log, a row or a reason
                self.route_refused[name] += 1
                resp.ok, resp.error = False, f'{name}: longer than {MAX_FIELD_CHARS} characters'
                return resp
        query = RouteQuery(
            event_id=req.event_id, event_type=req.event_type, agent_id=req.agent_id,
            privacy=_privacy(req.privacy) if req.has_privacy else Privacy.PRIVATE,
            local_supported=req.local_supported,
            local_confidence=float(req.local_confidence) if req.has_local_confidence else None,
            latency_budget_ms=req.latency_budget_ms if req.has_latency_budget else None,
            payload_bytes=req.payload_bytes, subject=req.subject)
        try:
            answer = self.local.decide(query)
        except (RequestError, PolicyError) as exc:
            self.route_refused['request'] += 1
            resp.ok, resp.error = False, str(exc)
            return resp
        resp.ok, resp.decision_id = True, answer.decision_id
        resp.route, resp.confidence = answer.route, answer.confidence
        resp.rule, resp.reason, resp.upload = answer.rule, answer.reason, answer.upload
        resp.cloud_model, resp.cloud_cost = answer.cloud_model, answer.cloud_cost
        return resp

    def _publish_decision(self, query: RouteQuery, answer: RouteAnswer) -> None:
        self.decisions_pub.publish(decision_msg(query, answer, self.get_clock().now().to_msg()))

    def _on_decision(self, msg) -> None:
        """A decision an agent host made in-process (frame_id names it): into the history, so
        every decision is in one place wherever it was made, filed under its data subject as
        this router files its own (with `store` consent, else NOT_KEPT: never anonymous, so never
        a training row, and erased with the subject). Bad ones are counted, not kept."""
        local = self.local
        if not msg.header.frame_id or local is None or local.history is None:
            return
        try:
            decision_id, event_id, request, decision = decision_of(msg)
            with local.lock:
                if local.history is not None:
                    local.history.record_decision(decision_id, event_id, request, decision,
                                                  subject=local.filed_under(request.subject))
            self.hosted_decisions += 1
        except (DecisionMessageError, ValueError, sqlite3.Error) as exc:
            self.rejected_decisions += 1
            if self.rejected_decisions <= 10 or self.rejected_decisions % 1000 == 0:
                self.get_logger().warning(f'a decision on {topics.ROUTER_DECISIONS} refused '
                                          f'({self.rejected_decisions} so far): '
                                          f'{str(exc)[:200]}')

    def _on_outcome(self, msg) -> None:
        local = self.local
        if local is None or local.history is None:
            return
        refused = local.report(Outcome(
            msg.decision_id, msg.event_type, msg.backend, msg.latency_ms, msg.cost, msg.success,
            float(msg.confidence),
            bool(msg.local_good_enough) if msg.has_local_verdict else None,
            bool(msg.names_subject)))
        if refused:
            count = sum(local.outcomes_refused.values())
            if count <= 10 or count % 1000 == 0:
                self.get_logger().warning(f'an outcome on {topics.ROUTER_OUTCOMES} refused '
                                          f'({refused}; {count} so far)')

    def _publish_stats(self) -> None:
        from loom_msgs.msg import RouterStats
        local = self.local
        if local is None or local.history is None:
            return
        with local.lock:
            history = local.history
            rates, decisions = history.rates(), history.decisions
            # with what this period's unreported cloud decisions are estimated to cost: the
            # agent hosts that route in-process decide on it
            spend, outcomes = history.spend() + local.reserved(), history.outcomes
        msg = RouterStats(decisions=decisions, local_rate=rates['local'],
                          cloud_rate=rates['cloud'], hybrid_rate=rates['hybrid'],
                          fallback_rate=rates['local_fallback'], spend=spend,
                          budget_limit=local.policy.budget.limit, outcomes=outcomes)
        msg.header.stamp = self.get_clock().now().to_msg()
        self.stats_pub.publish(msg)


class InProcessRouter:
    """The router port agents in the router's process use (agents/behavior.py RouterPort):
    the node's own decision path and lifecycle state, no serialization."""

    def __init__(self, node: RouterNode):
        self.node = node

    def route(self, query: RouteQuery) -> RouteAnswer:
        local = self.node.local
        if not self.node._active or local is None:
            raise RouterRefused('router refused: router is not active (lifecycle state is not '
                                'active)')
        try:
            return local.route(query)
        except (RequestError, PolicyError) as exc:
            raise RouterRefused(f'router refused: {exc}') from None

    def report(self, outcome: Outcome) -> None:
        local = self.node.local
        if local is not None and local.history is not None:
            local.report(outcome)


def _privacy(value: int):
    try:
        return Privacy(value)
    except ValueError:
        return value  # RouteRequest.check() refuses it with the reason


def main(args=None) -> int:
    return run_lifecycle_node(RouterNode, args)


if __name__ == '__main__':
    sys.exit(main())
