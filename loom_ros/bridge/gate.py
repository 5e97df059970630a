"""What may cross the bridge: allow/deny patterns per direction, and the privacy gate.

The privacy gate is the last word on the way out, whatever the patterns say: Private and
LocalOnly events never leave the robot. An event's privacy is the strictest of its privacy field
and any privacy its metadata states. Sensitive events follow the router's policy
(config/policy.yaml, per event type): `sensitive_upload: none` keeps them home; `embedding`
lets out only embeddings, never raw data. The gate decides that from the event itself, not from a
flag any publisher could set: an `*.embedding` event whose payload is exactly the float32 vectors
its `dim` and `count` say, finite and unit-length (what the robot's embedder makes); text or audio
read as float32 is neither. Pure Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.names import TopicPattern
from loom_ros.bus.privacy import PRIVACY_METADATA_KEYS, SUBJECT_METADATA_KEY, effective_privacy

# An event carrying any of these is looked at closely; others that are Public pass at once.
GATED_KEYS = frozenset(PRIVACY_METADATA_KEYS) | {SUBJECT_METADATA_KEY}
NO_FLEET_CONSENT = 'no_fleet_consent'
FLEET = 'fleet'   # the consent purpose for data that leaves the robot to the fleet

UPLOAD_EMBEDDING = 'embedding'      # the policy value that lets Sensitive embeddings out
EMBEDDING_SUFFIX = '.embedding'     # e.g. text.embedding (plugins/perception)
MAX_EMBEDDING_DIM = 4096
UNIT_NORM_TOLERANCE = 1e-3


def is_embedding(event: Event) -> bool:
    """True when the payload itself is L2-normalised float32 vectors of the stated shape."""
    md = event.metadata
    if not event.type.endswith(EMBEDDING_SUFFIX) or md.get('dtype', 'float32') != 'float32':
        return False
    dim, count = str(md.get('dim', ''))[:6], str(md.get('count', '1'))[:6]
    if not (dim.isascii() and dim.isdigit() and count.isascii() and count.isdigit()):
        # ascii: '²'.isdigit() is true and int('²') raises
        return False
    dim, count = int(dim), int(count)
    if not (0 < dim <= MAX_EMBEDDING_DIM and count > 0 and len(event.payload) == 4 * dim * count):
        return False
    vectors = numpy.frombuffer(bytes(event.payload), dtype='<f4').reshape(count, dim)
    if not numpy.isfinite(vectors).all():
        return False
    norms = numpy.linalg.norm(vectors.astype(numpy.float64), axis=1)
    return bool(numpy.all(numpy.abs(norms - 1.0) <= UNIT_NORM_TOLERANCE))


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
    """Outbound patterns; what comes in is the inbound contract's (bridge/inbound.py)."""

    out: DirectionRules = field(default_factory=DirectionRules)


class PrivacyGate:
    """Decides whether one outbound event may leave; returns None or the refusal reason. An
    event naming a data subject (loom.subject) leaves only with that subject's fleet consent
    (`consent`: the consent registry's lookup; none, a failing lookup or an invalid id: it
    stays, fail closed)."""

    def __init__(self, policy=None, consent=None):
        self.policy = policy  # a router PolicyFile, or None for the shipped default (embedding)
        self.consent = consent

    def sensitive_upload(self, event_type: str) -> str:
        if self.policy is None:
            return UPLOAD_EMBEDDING
        return self.policy.policy_for(event_type).sensitive_upload

    def refusal(self, event: Event) -> str | None:
        md = event.metadata
        if (event.privacy is Privacy.PUBLIC and type(md) is dict
                and md.keys().isdisjoint(GATED_KEYS)):
            return None   # the common case, decided without an enum call per event
        refusal = self._privacy_refusal(event)
        if refusal is None and SUBJECT_METADATA_KEY in md:
            refusal = self._consent_refusal(md[SUBJECT_METADATA_KEY])
        return refusal

    def _privacy_refusal(self, event: Event) -> str | None:
        try:
            Privacy(event.privacy)
        except ValueError:
            return 'unknown_privacy'  # never guess: an unreadable tier stays home
        privacy = effective_privacy(event)
        if privacy is Privacy.PUBLIC:
            return None
        if privacy is Privacy.PRIVATE:
            return 'private'
        if privacy is Privacy.LOCAL_ONLY:
            return 'local_only'
        if self.sensitive_upload(event.type) == 'none':
            return 'sensitive_policy_none'
        if not is_embedding(event):
            return 'sensitive_raw'
        return None

    def refusal_of_subject(self, subject) -> str | None:
        """Whether events of `subject` may still leave (None) or why not, asked afresh."""
        return self._consent_refusal(subject)

    def _consent_refusal(self, subject) -> str | None:
        if self.consent is None or not isinstance(subject, str):
            return NO_FLEET_CONSENT
        try:
            granted = self.consent(subject, FLEET).granted   # the id is checked there
        except Exception:  # noqa: BLE001 - invalid id or unreadable registry: it stays home
            return NO_FLEET_CONSENT
        return None if granted else NO_FLEET_CONSENT
