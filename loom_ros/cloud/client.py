"""The robot's side of the cloud tier: `CloudClient` (Zenoh get with correlation ids, retries
within the latency budget, cost recorded) and `execute_route`, which runs what the router decided.

The router decides routes; callers execute them. `execute_route(decision, request, local_fn,
cloud_client)` runs Local / LocalFallback locally, Cloud in the cloud (falling back to local when
the cloud fails or runs out of budget), Hybrid as a local answer refined by the cloud, and returns
the answer with an Outcome for the router's `router/outcomes` topic. Only what privacy allows is
sent: Private and LocalOnly never; Sensitive only as an embedding computed here.
No rclpy (outcome_msg imports loom_msgs lazily).
"""
from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from loom_ros.bus.event import Privacy
from loom_ros.cloud.protocol import (
    KEY_PREFIX, RETRYABLE, ReplyInvalid, encode, parse_reply, task_key,
)
from loom_ros.router.decision import Route
from loom_ros.router.history import Outcome

MIN_ATTEMPT_MS = 5.0   # below this much budget left, another attempt cannot succeed


class UploadRefused(RuntimeError):
    """What a request would send is not allowed off the robot by its privacy tier."""


@dataclass
class CloudResult:
    ok: bool
    result: dict = field(default_factory=dict)
    error: str = ''
    code: str = ''          # timeout | no_server | unknown_task | bad_request | ... on failure
    latency_ms: float = 0.0
    cost: float = 0.0
    attempts: int = 0
    model: str = ''


class CloudClient:
    """Requests to the cloud server over a zenoh.Session (the caller owns the session)."""

    def __init__(self, session, *, prefix: str = KEY_PREFIX, embedder=None, retries: int = 2):
        self.session = session
        self.prefix = prefix
        self.embedder = embedder  # for Sensitive requests: embed here, send the vector
        self.retries = retries
        self.stats: Counter = Counter()
        self.spent = 0.0
        self.ledger: list[dict] = []  # per answered request: task, cost, latency (bounded)

    def infer(self, task: str, body: dict, budget_ms: float = 1000.0) -> CloudResult:
        """One request, retried on timeouts and transient errors while the budget lasts."""
        start = time.perf_counter()
        deadline = start + (budget_ms / 1000.0 if math.isfinite(budget_ms) else 30.0)
        result = CloudResult(False, code='budget', error=f'budget of {budget_ms:g} ms too small')
        attempts = 0
        while attempts <= self.retries:
            remaining_ms = (deadline - time.perf_counter()) * 1000.0
            if remaining_ms < MIN_ATTEMPT_MS:
                break
            attempts += 1
            result = self._attempt(task, body, remaining_ms)
            if result.ok or result.code not in RETRYABLE | {'timeout', 'no_server'}:
                break
            self.stats[f'retry_{result.code}'] += 1
            if result.code == 'no_server':  # nothing answered at once: wait a little, not spin
                time.sleep(min(0.05, max(0.0, deadline - time.perf_counter()) / 4))
        result.attempts = attempts
        result.latency_ms = (time.perf_counter() - start) * 1000.0
        self.stats['ok' if result.ok else f'failed_{result.code}'] += 1
        if result.ok:
            self.spent += result.cost
            self.ledger.append({'task': task, 'cost': result.cost,
                                'latency_ms': round(result.latency_ms, 3)})
            del self.ledger[:-1000]
        return result

    def _attempt(self, task: str, body: dict, timeout_ms: float) -> CloudResult:
        corr = uuid.uuid4().hex
        sent = time.perf_counter()
        try:
            replies = self.session.get(task_key(task, self.prefix),
                                       payload=encode({**body, 'id': corr}),
                                       timeout=timeout_ms / 1000.0)
            for reply in replies:
                ok = reply.ok
                data = _json(ok.payload if ok is not None else reply.err.payload)
                if data.get('id') != corr:
                    self.stats['mismatched_reply'] += 1  # not ours (a late answer): ignore it
                    continue
                if ok is not None:
                    return CloudResult(True, data.get('result', {}), cost=float(data.get('cost', 0)),
                                       model=str(data.get('model', '')))
                return CloudResult(False, code=str(data.get('code', 'error')),
                                   error=str(data.get('error', 'error reply')))
        except Exception as exc:  # session closed, bad key: a failure, not a crash
            return CloudResult(False, code='internal', error=f'{type(exc).__name__}: {exc}')
        waited_ms = (time.perf_counter() - sent) * 1000.0
        if waited_ms + 1.0 >= timeout_ms:
            return CloudResult(False, code='timeout',
                               error=f'no reply within {timeout_ms:.0f} ms')
        return CloudResult(False, code='no_server', error=f'no cloud server answers {task}')

    def body_for(self, task: str, text: str, privacy, upload: str) -> dict:
        """What may be sent for `text` at this privacy tier and upload mode (UploadRefused if nothing)."""
        privacy = Privacy(privacy)
        if privacy in (Privacy.PRIVATE, Privacy.LOCAL_ONLY) or upload == 'none':
            raise UploadRefused(f'{privacy.name} data never leaves the robot')
        if privacy is Privacy.SENSITIVE or upload == 'embedding':
            if task != 'intent':
                raise UploadRefused(f'Sensitive data goes up only as an embedding; task {task!r} '
                                    'needs the raw text')
            if self.embedder is None:
                raise UploadRefused('Sensitive data goes up only as an embedding, and this client '
                                    'has no local embedder')
            return {'embedding': [float(x) for x in self.embedder.embed([text])[0]]}
        return {'text': text}


@dataclass(frozen=True)
class InferenceRequest:
    task: str                         # embed | intent | chat
    text: str
    privacy: Privacy = Privacy.PUBLIC
    latency_budget_ms: float = 1000.0
    event_type: str = ''
    decision_id: str = ''


@dataclass
class RouteResult:
    route: str                        # what the router decided
    backend: str                      # what answered: local | cloud
    answer: dict
    confidence: float
    latency_ms: float
    cost: float
    fallback: bool = False            # the cloud was tried (or refused) and local answered
    cloud_error: str = ''
    outcome: Outcome | None = None


LocalFn = Callable[[InferenceRequest], tuple[dict, float]]  # -> (answer, confidence)


def execute_route(decision, request: InferenceRequest, local_fn: LocalFn,
                  cloud_client: CloudClient | None,
                  report: Callable[[Outcome], None] | None = None) -> RouteResult:
    """Run a router decision (a router Decision or a Route.srv response) for one request."""
    start = time.perf_counter()
    route = Route(getattr(decision.route, 'value', decision.route))
    upload = getattr(decision, 'upload', 'raw')
    decision_id = getattr(decision, 'decision_id', '') or request.decision_id

    def local(fallback=False, error='', cost=0.0, answer=None, conf=None):
        if answer is None:
            answer, conf = local_fn(request)
        return _finish(route, 'local', answer, conf, cost, fallback, error)

    def _finish(route, backend, answer, conf, cost, fallback, error):
        latency = (time.perf_counter() - start) * 1000.0
        outcome = Outcome(decision_id, request.event_type or request.task, backend, latency, cost,
                          True, float(conf))
        result = RouteResult(route.value, backend, answer, float(conf), latency, cost, fallback,
                             error, outcome)
        if report is not None:
            report(outcome)
        return result

    if route in (Route.LOCAL, Route.LOCAL_FALLBACK):
        return local(fallback=route is Route.LOCAL_FALLBACK)
    local_answer = local_conf = None
    if route is Route.HYBRID:  # answer locally now; the cloud refines within what is left
        local_answer, local_conf = local_fn(request)
    if cloud_client is None:
        return local(True, 'no cloud client', answer=local_answer, conf=local_conf)
    try:
        body = cloud_client.body_for(request.task, request.text, request.privacy, upload)
    except UploadRefused as exc:
        cloud_client.stats['upload_refused'] += 1
        return local(True, str(exc), answer=local_answer, conf=local_conf)
    spent_ms = (time.perf_counter() - start) * 1000.0
    cloud = cloud_client.infer(request.task, body, request.latency_budget_ms - spent_ms)
    if not cloud.ok:
        return local(True, f'{cloud.code}: {cloud.error}', cost=cloud.cost,
                     answer=local_answer, conf=local_conf)
    conf = float(cloud.result.get('confidence', 1.0))
    return _finish(route, 'cloud', cloud.result, conf, cloud.cost, False, '')


def outcome_msg(outcome: Outcome):
    """The loom_msgs/RouteOutcome for router/outcomes."""
    from loom_msgs.msg import RouteOutcome
    return RouteOutcome(decision_id=outcome.decision_id, event_type=outcome.event_type,
                        backend=outcome.backend, latency_ms=float(outcome.latency_ms),
                        cost=float(outcome.cost), success=bool(outcome.success),
                        confidence=float(outcome.confidence))


def _json(payload) -> dict:
    """The checked reply (protocol.parse_reply), or {} (ignored, counted) when unusable."""
    try:
        return parse_reply(payload.to_bytes())
    except (ReplyInvalid, AttributeError):
        return {}
