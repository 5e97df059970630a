"""The seed's Event structure as a self-validating dataclass, and its loom_msgs/Event conversion.

Validation happens at the edges (publish, receive) so one malformed event is refused with a
reason that can be counted, and never reaches an agent or crashes the bus.
"""
from __future__ import annotations

import itertools
import json
import math
import numbers
import time
import uuid
from array import array
from functools import lru_cache
from dataclasses import dataclass, field
from enum import Enum, IntEnum

import numpy

DEFAULT_MAX_PAYLOAD_BYTES = 4 * 1024 * 1024  # one uncompressed 1280x1024 RGB frame fits
# Bounds on the other fields, so a hostile event cannot make a log line, a key or a parser huge
# (an id of a megabyte froze a node's log masking). Generous for any real event.
MAX_ID_CHARS = 256
MAX_TYPE_CHARS = 256
MAX_NAME_CHARS = 256             # source, frame_id, each tag, each metadata key
MAX_METADATA_ITEMS = 64
MAX_METADATA_VALUE_CHARS = 4096
MAX_TAGS = 64
_INT32 = (-2**31, 2**31 - 1)
_INT64_MAX = 2**63 - 1


class Privacy(IntEnum):
    """Privacy tiers; values equal loom_msgs/Event PRIVACY_* constants."""

    PUBLIC = 0
    SENSITIVE = 1
    PRIVATE = 2
    LOCAL_ONLY = 3


class RejectReason(str, Enum):
    """Why the bus refused something; every refusal is counted under one of these."""

    MISSING_ID = 'missing_id'
    MISSING_TYPE = 'missing_type'
    BAD_CONFIDENCE = 'bad_confidence'
    WRONG_TYPE = 'wrong_type'
    OVERSIZE_PAYLOAD = 'oversize_payload'
    OVERSIZE_FIELD = 'oversize_field'    # id, type, a name, metadata or tags past their bound
    BAD_FIELD = 'bad_field'
    UNKNOWN_QOS = 'unknown_qos'
    BAD_TOPIC = 'bad_topic'
    CALLBACK_ERROR = 'callback_error'
    PUBLISH_FAILED = 'publish_failed'  # DDS refused the write (a reliable reader far behind)


class EventRejected(ValueError):
    """An event the bus refuses, with a countable reason and a message that says why."""

    def __init__(self, reason: RejectReason, message: str):
        super().__init__(f'{reason.value}: {message}')
        self.reason = reason


def _show(value, limit: int = 64) -> str:
    """repr of a refused value for an error message, cut to `limit` characters."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**limit \
        else f'<int of {value.bit_length()} bits>'
    return text if len(text) <= limit else f'{text[:limit]}...({len(text)} chars)'


@lru_cache(maxsize=4096)
def _from_float32(value: float) -> float:
    """The shortest decimal that is the same float32: 0.7 comes back as 0.7, not 0.69999998."""
    return float(str(numpy.float32(value)))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(1)


def new_event_id() -> str:
    """Unique across processes: a random per-process prefix and a counter (10x cheaper than a
    fresh UUID per event, which mattered on the publish path)."""
    return f'{_ID_PREFIX}{next(_ID_COUNTER):x}'



@dataclass(slots=True)
class Event:
    """One Loom event. Only `type` is required; id and timestamp are filled in."""

    type: str
    source: str = ''
    payload: bytes = b''
    id: str = field(default_factory=new_event_id)
    timestamp_ms: int = field(default_factory=now_ms)
    metadata: dict[str, str] = field(default_factory=dict)
    confidence: float = 1.0
    tags: list[str] = field(default_factory=list)
    priority: int = 0
    privacy: Privacy = Privacy.PUBLIC
    frame_id: str = ''

    # -- validation -------------------------------------------------------------------------
    def validate(self, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> 'Event':
        """Raise EventRejected naming the first problem; return self when the event is sound."""
        # Fast path for the common, well-typed event; anything unusual gets the checks below,
        # which name the problem.
        conf, ts, pri = self.confidence, self.timestamp_ms, self.priority
        if (type(self.id) is str and 0 < len(self.id) <= MAX_ID_CHARS
                and type(self.type) is str and 0 < len(self.type) <= MAX_TYPE_CHARS
                and type(self.source) is str and len(self.source) <= MAX_NAME_CHARS
                and type(self.frame_id) is str and len(self.frame_id) <= MAX_NAME_CHARS
                and type(ts) is int and 0 <= ts <= _INT64_MAX
                and type(conf) is float and 0.0 <= conf <= 1.0
                and type(pri) is int and _INT32[0] <= pri <= _INT32[1]
                and type(self.payload) is bytes and len(self.payload) <= max_payload_bytes
                and type(self.metadata) is dict and len(self.metadata) <= MAX_METADATA_ITEMS
                and type(self.tags) is list and len(self.tags) <= MAX_TAGS
                and type(self.privacy) is Privacy
                and all(type(k) is str and type(v) is str and len(k) <= MAX_NAME_CHARS
                        and len(v) <= MAX_METADATA_VALUE_CHARS for k, v in self.metadata.items())
                and all(type(t) is str and len(t) <= MAX_NAME_CHARS for t in self.tags)):
            return self
        if not isinstance(self.id, str) or not self.id:
            raise EventRejected(RejectReason.MISSING_ID, 'event has no id (a non-empty string)')
        if len(self.id) > MAX_ID_CHARS:   # before any message quotes the id
            raise EventRejected(RejectReason.OVERSIZE_FIELD, f'id of {len(self.id)} characters '
                                f'exceeds the limit of {MAX_ID_CHARS} ({self.id[:32]!r}...)')
        if not isinstance(self.type, str) or not self.type:
            raise EventRejected(RejectReason.MISSING_TYPE, f'event {self.id} has no type')
        if len(self.type) > MAX_TYPE_CHARS:
            raise EventRejected(RejectReason.OVERSIZE_FIELD, f'event {self.id}: type of '
                                f'{len(self.type)} characters exceeds the limit of '
                                f'{MAX_TYPE_CHARS}')
        for name in ('source', 'frame_id'):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise EventRejected(RejectReason.BAD_FIELD, f'{name} must be a string, '
                                    f'got {type(value).__name__}')
            if len(value) > MAX_NAME_CHARS:
                raise EventRejected(RejectReason.OVERSIZE_FIELD, f'event {self.id}: {name} of '
                                    f'{len(value)} characters exceeds the limit of '
                                    f'{MAX_NAME_CHARS}')
        ts = self.timestamp_ms
        if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= _INT64_MAX:
            raise EventRejected(RejectReason.BAD_FIELD,
                                f'timestamp_ms must be a non-negative int64, got {_show(ts)}')
        conf = self.confidence
        if isinstance(conf, bool) or not isinstance(conf, numbers.Real) \
                or not (isinstance(conf, float) or -1 <= conf <= 2) \
                or not math.isfinite(conf) or not 0.0 <= conf <= 1.0:
            raise EventRejected(RejectReason.BAD_CONFIDENCE,
                                f'confidence must be a finite number in [0, 1], got {_show(conf)}')
        pri = self.priority
        if isinstance(pri, bool) or not isinstance(pri, int) or not _INT32[0] <= pri <= _INT32[1]:
            raise EventRejected(RejectReason.BAD_FIELD,
                                f'priority must be an int32, got {_show(pri)}')
        if not isinstance(self.payload, (bytes, bytearray, memoryview)):
            raise EventRejected(RejectReason.BAD_FIELD,
                                f'payload must be bytes, got {type(self.payload).__name__}')
        if len(self.payload) > max_payload_bytes:
            raise EventRejected(RejectReason.OVERSIZE_PAYLOAD,
                                f'payload of {len(self.payload)} bytes exceeds the limit of '
                                f'{max_payload_bytes} bytes')
        if not isinstance(self.metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise EventRejected(RejectReason.BAD_FIELD, 'metadata must map strings to strings')
        if len(self.metadata) > MAX_METADATA_ITEMS or not all(
                len(k) <= MAX_NAME_CHARS and len(v) <= MAX_METADATA_VALUE_CHARS
                for k, v in self.metadata.items()):
            raise EventRejected(RejectReason.OVERSIZE_FIELD, f'event {self.id}: metadata is '
                                f'limited to {MAX_METADATA_ITEMS} items, keys of '
                                f'{MAX_NAME_CHARS} and values of {MAX_METADATA_VALUE_CHARS} '
                                'characters')
        if not isinstance(self.tags, (list, tuple)) or not all(isinstance(t, str) for t in self.tags):
            raise EventRejected(RejectReason.BAD_FIELD, 'tags must be a list of strings')
        if len(self.tags) > MAX_TAGS or not all(len(t) <= MAX_NAME_CHARS for t in self.tags):
            raise EventRejected(RejectReason.OVERSIZE_FIELD, f'event {self.id}: tags are '
                                f'limited to {MAX_TAGS} of {MAX_NAME_CHARS} characters')
        try:
            Privacy(self.privacy)
        except (ValueError, TypeError):   # TypeError: an unhashable value from a decoder
            raise EventRejected(RejectReason.BAD_FIELD,
                                f'privacy must be one of {[p.name for p in Privacy]}, '
                                f'got {_show(self.privacy)}') from None
        return self

    # -- payload helpers --------------------------------------------------------------------
    @classmethod
    def with_json(cls, type: str, data: object, **fields) -> 'Event':
        """An event whose payload is `data` as compact UTF-8 JSON."""
        return cls(type=type, payload=json.dumps(data, separators=(',', ':')).encode(), **fields)

    def json(self) -> object:
        return json.loads(self.payload)

    def copy(self) -> 'Event':
        """A copy whose metadata and tags are its own (and whose payload is immutable bytes): one
        receiver's changes stay its own. In a process, every subscriber of a topic is handed
        the publisher's object, and agents on one topic share one delivery."""
        payload = self.payload
        if type(payload) is not bytes:
            payload = bytes(payload)
        return Event(self.type, self.source, payload, self.id, self.timestamp_ms,
                     dict(self.metadata), self.confidence, list(self.tags), self.priority,
                     self.privacy, self.frame_id)

    # -- loom_msgs/Event conversion -----------------------------------------------------------
    def to_msg(self):
        """The loom_msgs/Event for this event (bus_id and seq are left 0 for the bus to set)."""
        if _fast_to_msg_ok():
            return _fast_to_msg(self)
        return self._to_msg_public()

    def _to_msg_public(self):
        from loom_msgs.msg import Event as EventMsg
        from loom_msgs.msg import KeyValue
        msg = EventMsg()
        msg.header.stamp.sec, ms = divmod(self.timestamp_ms, 1000)
        msg.header.stamp.nanosec = ms * 1_000_000
        msg.header.frame_id = self.frame_id
        msg.id = self.id
        msg.type = self.type
        msg.timestamp_ms = self.timestamp_ms
        msg.source = self.source
        msg.metadata = [KeyValue(key=k, value=v) for k, v in self.metadata.items()]
        msg.payload = bytes(self.payload)
        msg.confidence = float(self.confidence)
        msg.tags = list(self.tags)
        msg.priority = self.priority
        msg.privacy = int(self.privacy)
        return msg

    @classmethod
    def from_msg(cls, msg) -> 'Event':
        """Build an Event from a loom_msgs/Event without validating it (call validate())."""
        try:
            privacy = Privacy(msg.privacy)
        except ValueError:
            privacy = msg.privacy  # kept as is so validate() can name it
        return cls(
            id=msg.id,
            type=msg.type,
            timestamp_ms=msg.timestamp_ms,
            source=msg.source,
            metadata={kv.key: kv.value for kv in msg.metadata},
            payload=msg.payload.tobytes(),
            confidence=_from_float32(msg.confidence),
            tags=list(msg.tags),
            priority=msg.priority,
            privacy=privacy,
            frame_id=msg.header.frame_id,
        )

    @classmethod
    def from_dict(cls, data: dict) -> 'Event':
        """Inverse of to_dict for hand-written events (`loom pub`): payload as text, privacy by name."""
        if not isinstance(data, dict):
            raise EventRejected(RejectReason.WRONG_TYPE, f'expected a JSON object, got {data!r}')
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise EventRejected(RejectReason.BAD_FIELD, f'unknown event fields: {", ".join(unknown)}')
        fields = dict(data)
        if 'type' not in fields:
            raise EventRejected(RejectReason.MISSING_TYPE, 'event has no type')
        if isinstance(fields.get('payload'), str):
            fields['payload'] = fields['payload'].encode()
        elif isinstance(fields.get('payload'), (dict, list)):
            try:
                fields['payload'] = json.dumps(fields['payload'], separators=(',', ':')).encode()
            except (TypeError, ValueError, RecursionError) as exc:   # not JSON-shaped
                raise EventRejected(RejectReason.BAD_FIELD,
                                    f'payload is not JSON: {str(exc)[:200]}') from None
        if isinstance(fields.get('privacy'), str):
            try:
                fields['privacy'] = Privacy[fields['privacy'].upper()]
            except KeyError:
                raise EventRejected(RejectReason.BAD_FIELD,
                                    f"privacy must be one of {[p.name for p in Privacy]}, "
                                    f"got {fields['privacy']!r}") from None
        return cls(**fields)

    def to_dict(self) -> dict:
        """A JSON-friendly view (payload as text when it is UTF-8, else its size)."""
        try:
            payload: object = bytes(self.payload).decode()
        except UnicodeDecodeError:
            payload = f'<{len(self.payload)} bytes>'
        return {'id': self.id, 'type': self.type, 'timestamp_ms': self.timestamp_ms,
                'source': self.source, 'metadata': dict(self.metadata), 'payload': payload,
                'confidence': self.confidence, 'tags': list(self.tags), 'priority': self.priority,
                'privacy': Privacy(self.privacy).name, 'frame_id': self.frame_id}


# -- fast message construction ----------------------------------------------------------------
# rclpy's generated message classes spend most of a conversion in __init__ and property setters
# (about 7 us per Event here). Filling the generated slots directly takes under 2 us. The slot
# layout is rosidl_generator_py's, so it is checked once against the public path and never used
# if the two disagree.
_FAST_OK: list[bool] = []


_MSG_CLASSES: list = []


def _msg_classes():
    if not _MSG_CLASSES:
        from builtin_interfaces.msg import Time
        from loom_msgs.msg import Event as EventMsg
        from loom_msgs.msg import KeyValue
        from std_msgs.msg import Header
        _MSG_CLASSES.extend((Time, Header, KeyValue, EventMsg))
    return _MSG_CLASSES


def _fast_to_msg(event: Event):
    Time, Header, KeyValue, EventMsg = _MSG_CLASSES or _msg_classes()
    new = object.__new__
    sec, ms = divmod(event.timestamp_ms, 1000)
    stamp = new(Time)
    stamp._check_fields, stamp._sec, stamp._nanosec = False, sec, ms * 1_000_000
    header = new(Header)
    header._check_fields, header._stamp, header._frame_id = False, stamp, event.frame_id
    metadata = []
    for key, value in event.metadata.items():
        kv = new(KeyValue)
        kv._check_fields, kv._key, kv._value = False, key, value
        metadata.append(kv)
    msg = new(EventMsg)
    msg._check_fields = False
    msg._header = header
    msg._id = event.id
    msg._type = event.type
    msg._timestamp_ms = event.timestamp_ms
    msg._source = event.source
    msg._metadata = metadata
    msg._payload = array('B', event.payload)
    msg._confidence = float(event.confidence)
    msg._tags = list(event.tags)
    msg._priority = event.priority
    msg._privacy = int(event.privacy)
    msg._bus_id = 0
    msg._seq = 0
    return msg


def _fast_to_msg_ok() -> bool:
    if not _FAST_OK:
        probe = Event(type='probe', source='s', payload=b'\x01\x02', metadata={'k': 'v'},
                      confidence=0.5, tags=['t'], priority=-3, privacy=Privacy.PRIVATE,
                      frame_id='f', timestamp_ms=1_234_567)
        try:
            ok = _fast_to_msg(probe) == probe._to_msg_public()
        except (AttributeError, TypeError):
            ok = False
        _FAST_OK.append(ok)
    return _FAST_OK[0]
