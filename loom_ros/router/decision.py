"""The router's decision core: the seed's rule-based algorithm, explainable, with no rclpy.

The rules run in the seed's order and the first that fires decides:

1. privacy      Private or LocalOnly              -> Local (LocalFallback if no local capability)
   consent      the event's data subject has no cloud consent -> the same, as if LocalOnly
2. capability   no local capability                -> Cloud
3. local quick inference gives a confidence (passed in, or computed by `local_infer`)
4. threshold    confidence >= threshold            -> Local   (exactly at the threshold: Local)
5. latency      latency budget < latency_local_ms  -> Local   (exactly 100 ms: not this rule)
6. cost         cloud cost > cost_cap              -> LocalFallback (exactly at the cap: allowed)
   budget       spend + cost > budget limit        -> LocalFallback (exactly reaching it: allowed)
7. hybrid       hybrid_floor < confidence < threshold -> Hybrid (exactly 0.5: not Hybrid)
8. default                                         -> Cloud

Private and LocalOnly events never get a cloud route, whatever a policy says: rule 1 runs before
everything else and no later rule can override it. Sensitive events may go to the cloud, but only
as embeddings (`upload='embedding'`), unless the policy says `sensitive_upload: none`, which
keeps them local like Private. Every decision names the rule that fired and the values compared.

Consent: an event that names a data subject (bus/privacy.py SUBJECT_METADATA_KEY, carried here as
`subject`) goes to the cloud only when `consent(subject, 'cloud')` (passed in: the consent
registry's lookup) says granted. No lookup, a lookup that fails, or a subject id that is not
valid all keep it local (fail closed); the reason names the consent, not the subject.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from loom_ros.bus.event import Privacy
from loom_ros.bus.privacy import ConsentState, Purpose, SubjectError, check_subject
from loom_ros.router.policy import RoutingPolicy

# The consent registry's lookup (storage/consent.py ConsentRegistry.lookup): (subject, purpose).
ConsentLookup = Callable[[str, str], ConsentState]


class Route(str, Enum):
    LOCAL = 'local'
    CLOUD = 'cloud'
    HYBRID = 'hybrid'
    LOCAL_FALLBACK = 'local_fallback'


CLOUD_ROUTES = (Route.CLOUD, Route.HYBRID)


class RequestError(ValueError):
    """A route request the router cannot decide on; says which field and why."""


@dataclass(frozen=True)
class RouteRequest:
    """What the router needs to know about one event and its context."""

    event_type: str
    agent_id: str = ''
    privacy: Privacy = Privacy.PUBLIC
    local_supported: bool = True
    local_confidence: float | None = None  # None: ask local_infer
    latency_budget_ms: float = math.inf     # inf: no deadline
    payload_bytes: int = 0
    subject: str = ''                       # the data subject the event names ('' anonymous)

    def check(self) -> 'RouteRequest':
        if not isinstance(self.event_type, str) or not self.event_type:
            raise RequestError('event_type must be a non-empty string')
        if not isinstance(self.subject, str):
            raise RequestError(f'subject must be a string, got {type(self.subject).__name__}')
        try:
            Privacy(self.privacy)
        except ValueError:
            raise RequestError(f'privacy must be one of {[p.name for p in Privacy]}, '
                               f'got {self.privacy!r}') from None
        conf = self.local_confidence
        if conf is not None and (not isinstance(conf, (int, float)) or not math.isfinite(conf)
                                 or not 0.0 <= conf <= 1.0):
            raise RequestError(f'local_confidence must be in [0, 1], got {conf!r}')
        budget = self.latency_budget_ms
        if not isinstance(budget, (int, float)) or math.isnan(budget) or budget < 0:
            raise RequestError(f'latency_budget_ms must be >= 0, got {budget!r}')
        return self


@dataclass(frozen=True)
class Decision:
    route: Route
    confidence: float          # the local confidence the decision used (1.0 when not needed)
    rule: str                  # which rule fired
    reason: str                # the rule and the values it compared, in words
    upload: str = 'raw'        # what a cloud route may send: raw | embedding | none
    cloud_model: str = ''
    cloud_cost: float = 0.0    # estimated cost of the cloud call this route makes (0 if none)
    values: dict = field(default_factory=dict)


@dataclass
class Spend:
    """Cloud spend in the current budget period (the caller persists and resets it)."""

    so_far: float = 0.0
    limit: float = math.inf


def decide(request: RouteRequest, policy: RoutingPolicy, *, cloud_cost: float,
           spend: Spend | None = None,
           local_infer: Callable[[RouteRequest], float] | None = None,
           consent: ConsentLookup | None = None) -> Decision:
    """Apply the rules in the seed's order; the first that fires decides. `consent` answers
    whether a data subject allows cloud use (needed only for events that name one)."""
    request.check()
    spend = spend or Spend()
    privacy = Privacy(request.privacy)
    model = policy.cloud_model

    def local(rule, reason, conf=1.0, **values):
        return Decision(Route.LOCAL, conf, rule, reason, upload='none', values=values)

    # 1. privacy: nothing Private or LocalOnly leaves the robot.
    keep_local = privacy in (Privacy.PRIVATE, Privacy.LOCAL_ONLY) or (
        privacy is Privacy.SENSITIVE and policy.sensitive_upload == 'none')
    if keep_local:
        if request.local_supported:
            return local('privacy', f'privacy is {privacy.name}: never leaves the robot',
                         privacy=privacy.name)
        return Decision(Route.LOCAL_FALLBACK, 0.0, 'privacy',
                        f'privacy is {privacy.name} and there is no local capability: '
                        'the cloud is not allowed, so the caller must degrade locally',
                        upload='none', values={'privacy': privacy.name})
    # 1b. consent: a subject without cloud consent is treated as LocalOnly.
    refusal = _without_cloud_consent(request.subject, consent)
    if refusal is not None:
        why, values = refusal
        if request.local_supported:
            return local('consent', f'{why}: treated as LocalOnly, never leaves the robot',
                         **values)
        return Decision(Route.LOCAL_FALLBACK, 0.0, 'consent',
                        f'{why}: treated as LocalOnly and there is no local capability, so the '
                        'caller must degrade locally', upload='none', values=values)
    upload = 'embedding' if privacy is Privacy.SENSITIVE else 'raw'

    # 2. capability
    if not request.local_supported:
        return Decision(Route.CLOUD, 0.0, 'capability', 'no local model for '
                        f'{request.event_type}: cloud ({model}, cost {cloud_cost:g})',
                        upload=upload, cloud_model=model, cloud_cost=cloud_cost,
                        values={'local_supported': False})

    # 3. local quick inference
    conf = request.local_confidence
    if conf is None:
        if local_infer is None:
            raise RequestError('local_confidence is missing and no local inference is available')
        conf = float(local_infer(request))
        if not math.isfinite(conf) or not 0.0 <= conf <= 1.0:
            raise RequestError(f'local inference returned confidence {conf!r}, not in [0, 1]')

    # 4. threshold
    if conf >= policy.threshold:
        return local('threshold', f'local confidence {conf:.3f} >= threshold '
                     f'{policy.threshold:.3f}', conf, confidence=conf, threshold=policy.threshold)

    # 5. latency budget
    if request.latency_budget_ms < policy.latency_local_ms:
        return local('latency', f'latency budget {request.latency_budget_ms:g} ms < '
                     f'{policy.latency_local_ms:g} ms: no time for a cloud round trip', conf,
                     latency_budget_ms=request.latency_budget_ms,
                     latency_local_ms=policy.latency_local_ms)

    # 6. cost: per call, then the period's budget
    if cloud_cost > policy.cost_cap:
        return Decision(Route.LOCAL_FALLBACK, conf, 'cost',
                        f'cloud cost {cloud_cost:g} > cap {policy.cost_cap:g}: local fallback',
                        upload='none', values={'cloud_cost': cloud_cost, 'cost_cap': policy.cost_cap})
    if spend.so_far + cloud_cost > spend.limit:
        return Decision(Route.LOCAL_FALLBACK, conf, 'budget',
                        f'spend {spend.so_far:g} + {cloud_cost:g} would exceed the budget '
                        f'{spend.limit:g}: local fallback', upload='none',
                        values={'spend': spend.so_far, 'cloud_cost': cloud_cost,
                                'budget': spend.limit})

    # 7. hybrid
    if policy.hybrid_floor < conf < policy.threshold:
        return Decision(Route.HYBRID, conf, 'hybrid',
                        f'{policy.hybrid_floor:g} < local confidence {conf:.3f} < threshold '
                        f'{policy.threshold:g}: answer locally now, refine in the cloud',
                        upload=upload, cloud_model=model, cloud_cost=cloud_cost,
                        values={'confidence': conf, 'hybrid_floor': policy.hybrid_floor,
                                'threshold': policy.threshold})

    # 8. default
    return Decision(Route.CLOUD, conf, 'default',
                    f'local confidence {conf:.3f} <= {policy.hybrid_floor:g}: cloud ({model})',
                    upload=upload, cloud_model=model, cloud_cost=cloud_cost,
                    values={'confidence': conf, 'hybrid_floor': policy.hybrid_floor})


def _without_cloud_consent(subject: str, consent: ConsentLookup | None
                           ) -> tuple[str, dict] | None:
    """None when the event may go to the cloud as far as consent goes (anonymous, or granted),
    else (why, values). Fails closed: no lookup, a failing one or an invalid id keep it local."""
    if not subject:
        return None
    purpose = Purpose.CLOUD.value
    try:
        check_subject(subject)
    except SubjectError:
        return ('the event names a data subject that is not a valid id, so no cloud consent '
                'can be found', {'consent': purpose, 'granted': False, 'valid_subject': False})
    if consent is None:
        return ('the event names a data subject and this router has no consent registry',
                {'consent': purpose, 'granted': False})
    try:
        state = consent(subject, purpose)
        if state.granted is True:
            return None
        return (f'no cloud consent for the data subject ({state.describe()})',
                {'consent': purpose, 'granted': False, 'asked': bool(state.asked),
                 'source': str(state.source)[:64], 'changed_ms': int(state.changed_ms)})
    except Exception as exc:   # noqa: BLE001 - whatever the registry raises, fail closed
        return (f'the consent registry cannot answer ({type(exc).__name__}: {str(exc)[:120]})',
                {'consent': purpose, 'granted': False})
