"""The router's ROS messages built and read in one place: RouteDecision for router/decisions,
published by the router node and by every agent host that routes in-process (HostedRouter), and
read back by the router node, whose history keeps every decision wherever it was made (the
learned router trains on them)."""
from __future__ import annotations

import math

from loom_msgs.msg import RouteDecision

from loom_ros.bus.event import Privacy
from loom_ros.router.decision import CLOUD_ROUTES, Decision, Route, RouteRequest
from loom_ros.router.local import RouteAnswer, RouteQuery

MAX_FIELD_CHARS = 256     # ids, types, rule names read from a decision message
MAX_REASON_CHARS = 2000


def decision_msg(query: RouteQuery, answer: RouteAnswer, stamp, frame_id: str = ''):
    """RouteDecision for router/decisions; `frame_id`: the node that decided when it is not
    the router node (an agent host's full name)."""
    msg = RouteDecision(
        decision_id=answer.decision_id, event_id=query.event_id, event_type=query.event_type,
        agent_id=query.agent_id, privacy=int(query.privacy), route=answer.route,
        confidence=answer.confidence, rule=answer.rule, reason=answer.reason,
        upload=answer.upload, cloud_model=answer.cloud_model, cloud_cost=answer.cloud_cost,
        has_local_confidence=query.local_confidence is not None,
        local_confidence=float(query.local_confidence or 0.0),
        has_latency_budget=query.latency_budget_ms is not None,
        latency_budget_ms=float(query.latency_budget_ms or 0.0),
        payload_bytes=max(0, min(int(query.payload_bytes), 2**32 - 1)),
        subject=query.subject)   # whose it is: the router node's history files it under them
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    return msg


class DecisionMessageError(ValueError):
    """A RouteDecision that cannot be a history row; says which field."""


def _text(value: str, name: str, limit: int = MAX_FIELD_CHARS) -> str:
    if len(value) > limit:
        raise DecisionMessageError(f'{name}: longer than {limit} characters')
    return value


def _number(value: float, name: str, low: float = 0.0, high: float = math.inf) -> float:
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise DecisionMessageError(f'{name}: {value!r} is not in [{low}, {high}]')
    return value


def decision_of(msg) -> tuple[str, str, RouteRequest, Decision]:
    """(decision_id, event_id, request, decision) of a RouteDecision from another node, checked
    before it reaches the history: bounded strings, finite numbers, a known route and privacy.
    `request.subject` is the data subject the decided event names ('' none), bounded but not
    judged: whoever keeps it decides what it may file (LocalRouter.filed_under)."""
    try:
        route = Route(msg.route)
        privacy = Privacy(msg.privacy)
    except ValueError:
        raise DecisionMessageError(f'route {msg.route[:40]!r} or privacy {msg.privacy} is not '
                                   'known') from None
    request = RouteRequest(
        event_type=_text(msg.event_type, 'event_type'), agent_id=_text(msg.agent_id, 'agent_id'),
        privacy=privacy,
        local_confidence=(_number(msg.local_confidence, 'local_confidence', 0.0, 1.0)
                          if msg.has_local_confidence else None),
        latency_budget_ms=(_number(msg.latency_budget_ms, 'latency_budget_ms')
                           if msg.has_latency_budget else math.inf),
        payload_bytes=int(msg.payload_bytes), subject=_text(msg.subject, 'subject'))
    if route in CLOUD_ROUTES and privacy >= Privacy.PRIVATE:
        # rule 1 runs first everywhere: no router could have made this (a forged row that
        # poisons the audit trail, the rates and the learned router's data)
        raise DecisionMessageError(f'route {route.value} for a {privacy.name} event: no router '
                                   'sends Private or LocalOnly events to the cloud')
    decision = Decision(route, _number(msg.confidence, 'confidence', 0.0, 1.0),
                        _text(msg.rule, 'rule'), _text(msg.reason, 'reason', MAX_REASON_CHARS),
                        cloud_cost=_number(msg.cloud_cost, 'cloud_cost'))
    return (_text(msg.decision_id, 'decision_id'), _text(msg.event_id, 'event_id'), request,
            decision)
