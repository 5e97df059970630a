"""Loom topic names and patterns, and their ROS 2 and Zenoh spellings.

A Loom topic is dot-separated (`camera.front.face`). On ROS 2 it is the *relative* topic
`loom/camera/front/face`, so a robot's namespace prefixes it and many robots share one domain;
on Zenoh it is the key expression `loom/camera/front/face`. Patterns use Zenoh's wildcards:
`*` is exactly one segment, `**` is zero or more. Pure Python: no rclpy here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

ROS_PREFIX = 'loom'
ZENOH_PREFIX = 'loom'
MAX_TOPIC_LENGTH = 200  # ROS caps fully qualified names at 255 characters; leave room for namespaces.

_SEGMENT = re.compile(r'[A-Za-z][A-Za-z0-9_]*\Z')


class TopicNameError(ValueError):
    """A Loom topic or pattern that cannot be mapped onto ROS 2 naming rules; says why."""

    def __init__(self, name: object, why: str):
        super().__init__(f'invalid Loom topic {name!r}: {why}')
        self.name = name
        self.why = why


def _check_segment(name: str, segment: str, index: int) -> None:
    if segment == '':
        where = 'starts with' if index == 0 else 'has an empty segment or ends with'
        raise TopicNameError(name, f"{where} '.' (segments are separated by single dots)")
    if segment[0].isdigit():
        raise TopicNameError(name, f"segment {segment!r} starts with a digit, which ROS 2 names forbid")
    if not _SEGMENT.match(segment):
        bad = sorted({c for c in segment if not (c.isascii() and (c.isalnum() or c == '_'))})
        raise TopicNameError(
            name, f'segment {segment!r} has characters ROS 2 names forbid: {"".join(bad)!r} '
                  '(use letters, digits and underscores)')
    if '__' in segment:
        raise TopicNameError(name, f"segment {segment!r} repeats '_', which ROS 2 names forbid")


def _check_text(name: object) -> None:
    """What topics and patterns share: a non-empty string of bounded length, dots not slashes."""
    if not isinstance(name, str):
        raise TopicNameError(name, f'expected a string, got {type(name).__name__}')
    if not name:
        raise TopicNameError(name, 'empty')
    if len(name) > MAX_TOPIC_LENGTH:
        raise TopicNameError(name, f'longer than {MAX_TOPIC_LENGTH} characters')
    if '/' in name:
        raise TopicNameError(name, "contains '/': Loom topics use dots (camera.front.face)")


def validate_topic(name: str) -> str:
    """Return `name` if it is a valid concrete Loom topic, else raise TopicNameError saying why."""
    if not isinstance(name, str):  # before the cache, which needs a hashable key
        raise TopicNameError(name, f'expected a string, got {type(name).__name__}')
    return _validate_topic(name)


@lru_cache(maxsize=4096)
def _validate_topic(name: str) -> str:
    _check_text(name)
    for i, segment in enumerate(name.split('.')):
        if segment in ('*', '**'):
            raise TopicNameError(name, f"wildcard {segment!r} is only allowed in subscription patterns")
        _check_segment(name, segment, i)
    return name


def to_ros_topic(name: str) -> str:
    """`camera.front.face` -> `loom/camera/front/face` (relative: the node's namespace prefixes it)."""
    return f"{ROS_PREFIX}/{validate_topic(name).replace('.', '/')}"


def to_zenoh_key(name: str) -> str:
    """`camera.front.face` -> `loom/camera/front/face` (the bridge adds the robot id, see bridge)."""
    return f"{ZENOH_PREFIX}/{validate_topic(name).replace('.', '/')}"


def ros_namespace_prefix(namespace: str) -> str:
    """The fully qualified prefix under which a node in `namespace` sees Loom topics."""
    namespace = namespace.rstrip('/')
    return f'{namespace}/{ROS_PREFIX}/'


def from_ros_topic(ros_topic: str, namespace: str = '/') -> str | None:
    """Inverse of to_ros_topic for a name seen in the graph; None if it is not a Loom topic there.

    Accepts the relative form (`loom/a/b`) and the fully qualified one (`/ns/loom/a/b`).
    """
    if ros_topic.startswith('/'):
        prefix = ros_namespace_prefix(namespace)
        if not ros_topic.startswith(prefix):
            return None
        rest = ros_topic[len(prefix):]
    elif ros_topic.startswith(ROS_PREFIX + '/'):
        rest = ros_topic[len(ROS_PREFIX) + 1:]
    else:
        return None
    name = rest.replace('/', '.')
    try:
        return validate_topic(name)
    except TopicNameError:
        return None


@dataclass(frozen=True)
class TopicPattern:
    """A subscription pattern: a concrete topic, or one with `*` / `**` segments."""

    text: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> 'TopicPattern':
        _check_text(text)
        segments = tuple(text.split('.'))
        for i, segment in enumerate(segments):
            if segment in ('*', '**'):
                if segment == '**' and i > 0 and segments[i - 1] == '**':
                    raise TopicNameError(text, "'**.**' is redundant; use a single '**'")
                continue
            if '*' in segment:
                raise TopicNameError(text, f"segment {segment!r}: '*' must stand alone in a segment")
            _check_segment(text, segment, i)
        return cls(text, segments)

    @property
    def is_wildcard(self) -> bool:
        return any(s in ('*', '**') for s in self.segments)

    def matches(self, topic: str) -> bool:
        return _match(self.segments, tuple(topic.split('.')))

    def to_zenoh_key_expr(self) -> str:
        return f"{ZENOH_PREFIX}/{'/'.join(self.segments)}"


@lru_cache(maxsize=8192)
def _match(pattern: tuple[str, ...], topic: tuple[str, ...]) -> bool:
    if not pattern:
        return not topic
    head, rest = pattern[0], pattern[1:]
    if head == '**':
        return any(_match(rest, topic[i:]) for i in range(len(topic) + 1))
    if not topic:
        return False
    return (head == '*' or head == topic[0]) and _match(rest, topic[1:])
