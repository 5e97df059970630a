"""Event <-> Zenoh payload: every Event field and its metadata, carried intact.

Layout (version 1): one byte 0x01, a 4-byte big-endian length, a compact UTF-8 JSON header with
every field but the payload, then the payload's raw bytes (no base64: camera-sized payloads stay
their size). Decoding validates the event, so a malformed sample is a counted EventRejected.

Decoding is bounded before anything is parsed: a header longer than MAX_HEADER_BYTES (what the
largest event the bus accepts needs) or a sample longer than header plus the payload limit is
refused unread, and every failure of the JSON parser (RecursionError from `[` nested 200,000
deep included) is the same EventRejected, so no sample can raise anything else.

Batch envelope (version 2), why: one Zenoh sample per event costs a put, a router hop and a
receiver callback each; the bridge sends a Batched topic's events as one sample instead. Layout:
one byte 0x02, a 4-byte big-endian event count, then per event a 4-byte length and its version-1
sample. `decode_all` reads either version; it bounds the sample (MAX_BATCH_BYTES), the count
(MAX_BATCH_EVENTS) and every length before reading, and refuses the whole sample if any event
in it is malformed. `decode` stays one event: a batch given to it is refused, counted as any
malformed sample.
"""
from __future__ import annotations

import json
import struct

from loom_ros.bus.event import (
    DEFAULT_MAX_PAYLOAD_BYTES, MAX_ID_CHARS, MAX_METADATA_ITEMS, MAX_METADATA_VALUE_CHARS,
    MAX_NAME_CHARS, MAX_TAGS, MAX_TYPE_CHARS, Event, EventRejected, Privacy, RejectReason,
)

VERSION = 1
BATCH_VERSION = 2
ENCODING = 'application/x-loom-event'
_HEAD = struct.Struct('>BI')
_LENGTH = struct.Struct('>I')
MAX_BATCH_EVENTS = 1000
MAX_BATCH_BYTES = 1 << 20   # the bridge's batches stay far below (bridge.core.BATCH_MAX_BYTES)
# One encoder for every event: json.dumps with options builds a new encoder per call.
_JSON = json.JSONEncoder(separators=(',', ':'), ensure_ascii=False).encode
# The string escaper that encoder uses (ensure_ascii=False): the fast path below writes the
# same bytes around it.
_STR = json.encoder.encode_basestring
# Each privacy tier as the JSON encoder writes it (int() of an IntEnum per event costs more).
_PRIVACY_TEXT = {p: str(int(p)) for p in Privacy}
# The longest header a valid event can have: every string at its bound, six bytes per character
# (a control character escaped as \\u0000), plus the JSON around them.
MAX_HEADER_BYTES = 6 * (MAX_ID_CHARS + MAX_TYPE_CHARS + 2 * MAX_NAME_CHARS
                        + MAX_METADATA_ITEMS * (MAX_NAME_CHARS + MAX_METADATA_VALUE_CHARS)
                        + MAX_TAGS * MAX_NAME_CHARS) + 4096


def encode(event: Event) -> bytes:
    """The version-1 sample of a validated event."""
    md, tags, conf = event.metadata, event.tags, event.confidence
    if (type(conf) is float and type(event.timestamp_ms) is int and type(event.priority) is int
            and type(md) is dict and type(tags) is list):
        # The plain shape every validated event has: the JSON encoder's own bytes (same key
        # order, escaping and float repr), written without building a dict per event (2.5x
        # cheaper; the bridge encodes every event it sends).
        esc, prv = _STR, _PRIVACY_TEXT.get(event.privacy) or int(event.privacy)
        header = (f'{{"id":{esc(event.id)},"type":{esc(event.type)},"ts":{event.timestamp_ms},'
                  f'"src":{esc(event.source)},"md":{{'
                  f'{",".join([f"{esc(k)}:{esc(v)}" for k, v in md.items()]) if md else ""}}},'
                  f'"conf":{float.__repr__(conf)},'
                  f'"tags":[{",".join(map(esc, tags)) if tags else ""}],'
                  f'"pri":{event.priority},"prv":{prv},'
                  f'"frame":{esc(event.frame_id)}}}').encode()
    else:
        header = _JSON({
            'id': event.id, 'type': event.type, 'ts': event.timestamp_ms, 'src': event.source,
            'md': md, 'conf': conf, 'tags': tags, 'pri': event.priority,
            'prv': int(event.privacy), 'frame': event.frame_id,
        }).encode()
    return b''.join((_HEAD.pack(VERSION, len(header)), header, bytes(event.payload)))


def encode_batch(samples: list[bytes]) -> bytes:
    """One version-2 sample holding `samples` (each what `encode` made), in order."""
    parts = [_HEAD.pack(BATCH_VERSION, len(samples))]
    for sample in samples:
        parts.append(_LENGTH.pack(len(sample)))
        parts.append(sample)
    return b''.join(parts)


def event_count(data: bytes) -> int:
    """How many events a sample says it holds (1 for version 1), read from its first 5 bytes
    only; 0 when it is neither version. For counting receivers; `decode_all` checks the rest."""
    if len(data) < _HEAD.size:
        return 0
    version, count = _HEAD.unpack_from(data)
    if version == VERSION:
        return 1
    return min(count, MAX_BATCH_EVENTS) if version == BATCH_VERSION else 0


def decode_all(data: bytes, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> list[Event]:
    """The events in a version-1 or version-2 sample, validated, in order; EventRejected for
    anything malformed (the whole sample). Raises nothing else."""
    if len(data) >= 1 and data[0] == VERSION:
        return [decode(data, max_payload_bytes)]
    if len(data) > MAX_BATCH_BYTES:
        raise EventRejected(RejectReason.OVERSIZE_PAYLOAD, f'bridge batch of {len(data)} bytes '
                            f'exceeds the limit of {MAX_BATCH_BYTES} bytes')
    data = bytes(data)
    if len(data) < _HEAD.size or data[0] != BATCH_VERSION:
        raise EventRejected(RejectReason.BAD_FIELD, 'bridge sample is neither an event '
                            f'(version {VERSION}) nor a batch (version {BATCH_VERSION})')
    _, count = _HEAD.unpack_from(data)
    if not 0 < count <= MAX_BATCH_EVENTS or count * (_LENGTH.size + _HEAD.size) > len(data):
        raise EventRejected(RejectReason.BAD_FIELD, f'bridge batch says {count} events: not '
                            f'1 to {MAX_BATCH_EVENTS} that fit in {len(data)} bytes')
    events, pos = [], _HEAD.size
    for _ in range(count):
        if pos + _LENGTH.size > len(data):
            raise EventRejected(RejectReason.BAD_FIELD, 'bridge batch truncated')
        (length,) = _LENGTH.unpack_from(data, pos)
        pos += _LENGTH.size
        if length > len(data) - pos:
            raise EventRejected(RejectReason.BAD_FIELD, f'bridge batch item of {length} bytes '
                                f'runs past the end ({len(data) - pos} left)')
        item = data[pos:pos + length]
        if item[:1] != bytes((VERSION,)):   # no batch inside a batch
            raise EventRejected(RejectReason.BAD_FIELD, 'bridge batch item is not an event')
        events.append(decode(item, max_payload_bytes))
        pos += length
    if pos != len(data):
        raise EventRejected(RejectReason.BAD_FIELD, f'{len(data) - pos} bytes after the last '
                            'event of a bridge batch')
    return events


def decode(data: bytes, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Event:
    """The Event in `data`, validated; EventRejected says what is wrong (bad_field for a
    malformed sample, oversize_* for one past a bound). Raises nothing else."""
    if len(data) > _HEAD.size + MAX_HEADER_BYTES + max_payload_bytes:
        raise EventRejected(RejectReason.OVERSIZE_PAYLOAD, f'bridge sample of {len(data)} bytes '
                            f'exceeds the limit of {_HEAD.size + MAX_HEADER_BYTES} + '
                            f'{max_payload_bytes} bytes')
    data = bytes(data)
    if len(data) < _HEAD.size:
        raise EventRejected(RejectReason.BAD_FIELD, f'bridge sample of {len(data)} bytes is '
                            'shorter than its header')
    version, length = _HEAD.unpack_from(data)
    if version != VERSION:
        raise EventRejected(RejectReason.BAD_FIELD, f'bridge sample version {version}, '
                            f'this bridge reads version {VERSION}')
    if length > MAX_HEADER_BYTES:
        raise EventRejected(RejectReason.OVERSIZE_FIELD, f'bridge sample header of {length} bytes '
                            f'exceeds the limit of {MAX_HEADER_BYTES}')
    end = _HEAD.size + length
    if end > len(data):
        raise EventRejected(RejectReason.BAD_FIELD, f'bridge sample truncated: header says '
                            f'{length} bytes, {len(data) - _HEAD.size} present')
    header = data[_HEAD.size:end]
    if header[:1] != b'{':   # a JSON object or nothing: `[[[...` is refused unparsed
        raise EventRejected(RejectReason.BAD_FIELD, 'bridge sample header is not a JSON object')
    try:
        h = json.loads(header)
        privacy = Privacy(h['prv'])
        event = Event(type=h['type'], source=h['src'], payload=data[end:], id=h['id'],
                      timestamp_ms=h['ts'], metadata=h['md'], confidence=h['conf'],
                      tags=h['tags'], priority=h['pri'], privacy=privacy, frame_id=h['frame'])
        if b'\\u' in header:   # an escaped lone surrogate would fail later, when DDS encodes it
            json.dumps(h, ensure_ascii=False).encode()
    except (ValueError, KeyError, TypeError, RecursionError, MemoryError) as exc:
        # RecursionError: deep nesting inside the object; ValueError covers bad UTF-8, lone
        # surrogates and integers too long to read.
        raise EventRejected(RejectReason.BAD_FIELD, 'bridge sample header is not a Loom event: '
                            f'{type(exc).__name__}: {str(exc)[:200]}') from None
    conf = event.confidence
    if isinstance(conf, int) and not isinstance(conf, bool) and -1 <= conf <= 2:
        event.confidence = float(conf)   # JSON writes 1.0 as 1; an out-of-range int is refused
    return event.validate(max_payload_bytes)
