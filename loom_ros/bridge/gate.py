"""What may cross the bridge: allow/deny patterns per direction, and the privacy gate.

The privacy gate is the last word on the way out, whatever the patterns say: Private and
LocalOnly events never leave the robot. Sensitive events follow the router's policy
(config/policy.yaml, per event type): `sensitive_upload: none` keeps them home; `embedding`
lets out only events that carry an embedding (metadata `loom.upload: embedding`), never raw data.
Pure Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.names import TopicPattern

UPLOAD_KEY = 'loom.upload'          # metadata key a producer sets on an embedding-only event
UPLOAD_EMBEDDING = 'embedding'


@dataclass(frozen=True)
class DirectionRules:
    """A topic crosses in one direction when an allow pattern matches and no deny pattern does."""

    allow: tuple[TopicPattern, ...] = ()
    deny: tuple[TopicPattern, ...] = ()

    @classmethod
    def parse(cls, allow, deny=()) -> 'DirectionRules':
        return cls(tuple(TopicPattern.parse(p) for p in allow),
                   tuple(TopicPattern.parse(p) for p in deny))

    def allows(self, topic: str) -> bool:
        return (any(p.matches(topic) for p in self.allow)
                and not any(p.matches(topic) for p in self.deny))

    def first_allow(self, topic: str) -> int | None:
        """Index of the first allow pattern matching `topic` (None when none does)."""
        return next((i for i, p in enumerate(self.allow) if p.matches(topic)), None)


@dataclass(frozen=True)
class BridgeRules:
    out: DirectionRules = field(default_factory=DirectionRules)
    inbound: DirectionRules = field(default_factory=DirectionRules)


class PrivacyGate:
    """Decides whether one outbound event may leave; returns None or the refusal reason."""

    def __init__(self, policy=None):
        self.policy = policy  # a router PolicyFile, or None for the shipped default (embedding)

    def sensitive_upload(self, event_type: str) -> str:
        if self.policy is None:
            return UPLOAD_EMBEDDING
        return self.policy.policy_for(event_type).sensitive_upload

    def refusal(self, event: Event) -> str | None:
        privacy = event.privacy
        if privacy is Privacy.PUBLIC:
            return None
        if privacy is Privacy.PRIVATE:
            return 'private'
        if privacy is Privacy.LOCAL_ONLY:
            return 'local_only'
        if privacy is Privacy.SENSITIVE:
            if self.sensitive_upload(event.type) == 'none':
                return 'sensitive_policy_none'
            if event.metadata.get(UPLOAD_KEY) != UPLOAD_EMBEDDING:
                return 'sensitive_raw'
            return None
        return 'unknown_privacy'  # never guess: an unreadable tier stays home
