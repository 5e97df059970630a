"""Zenoh key expressions for bridged Loom topics: `loom/<robot_id>/<topic path>`.

The robot id is one key segment, so `loom/*/agent/*/intent` is every robot's agents' intents and
two robots on one Zenoh network never share a key. Pure Python.
"""
from __future__ import annotations

import re

from loom_ros.bus.names import ZENOH_PREFIX, TopicNameError, TopicPattern, validate_topic

_ROBOT_ID = re.compile(r'[A-Za-z0-9][A-Za-z0-9_\-]*\Z')
MAX_ROBOT_ID = 64


class RobotIdError(ValueError):
    """A robot id that cannot be one Zenoh key segment; says why."""


def validate_robot_id(robot_id: object) -> str:
    if not isinstance(robot_id, str) or not robot_id:
        raise RobotIdError(f'robot_id must be a non-empty string, got {robot_id!r}')
    if len(robot_id) > MAX_ROBOT_ID or not _ROBOT_ID.match(robot_id):
        raise RobotIdError(f'robot_id {robot_id!r}: use at most {MAX_ROBOT_ID} letters, digits, '
                           "'_' or '-', starting with a letter or digit (it is one Zenoh key "
                           'segment: no /, *, $, ? or #)')
    if robot_id == 'cloud':
        raise RobotIdError("robot_id 'cloud' is reserved for the cloud tier (loom/cloud/...)")
    return robot_id


def robot_key(robot_id: str, topic: str) -> str:
    """`agent.counter.intent` on robot `r1` -> `loom/r1/agent/counter/intent`."""
    return f"{ZENOH_PREFIX}/{robot_id}/{validate_topic(topic).replace('.', '/')}"


def robot_key_expr(robot_id: str, pattern: str | TopicPattern) -> str:
    """A Loom pattern (`agent.*.intent`, `fleet.**`) as a key expression under one robot."""
    parsed = pattern if isinstance(pattern, TopicPattern) else TopicPattern.parse(pattern)
    return f"{ZENOH_PREFIX}/{robot_id}/{'/'.join(parsed.segments)}"


def fleet_key_expr(pattern: str | TopicPattern) -> str:
    """The same pattern on every robot: `agent.*.intent` -> `loom/*/agent/*/intent`."""
    return robot_key_expr('*', pattern)


def parse_robot_key(key: str) -> tuple[str, str]:
    """`loom/r1/agent/counter/intent` -> ('r1', 'agent.counter.intent'); TopicNameError if not one."""
    parts = str(key).split('/')
    if len(parts) < 3 or parts[0] != ZENOH_PREFIX:
        raise TopicNameError(key, f"not a bridged key: expected '{ZENOH_PREFIX}/<robot_id>/<topic>'")
    try:
        validate_robot_id(parts[1])
    except RobotIdError as exc:
        raise TopicNameError(key, str(exc)) from None
    if any('.' in chunk for chunk in parts[2:]):   # one key, one topic: a.b/c would be a/b.c
        raise TopicNameError(key, "a key chunk holds '.': topic segments are its chunks")
    return parts[1], validate_topic('.'.join(parts[2:]))
