"""Event <-> Zenoh payload: every Event field and its metadata, carried intact.

Layout (version 1): one byte 0x01, a 4-byte big-endian length, a compact UTF-8 JSON header with
every field but the payload, then the payload's raw bytes (no base64: camera-sized payloads stay
their size). Decoding validates the event, so a malformed sample is a counted EventRejected.

Decoding is bounded before anything is parsed: a header longer than MAX_HEADER_BYTES (what the
largest event the bus accepts needs) or a sample longer than header plus the payload limit is
refused unread, and every failure of the JSON parser (RecursionError from `[` nested 200,000
deep included) is the same EventRejected, so no sample can raise anything else.
"""
from __future__ import annotations

import json
import struct

from loom_ros.bus.event import (
    DEFAULT_MAX_PAYLOAD_BYTES, MAX_ID_CHARS, MAX_METADATA_ITEMS, MAX_METADATA_VALUE_CHARS,
    MAX_NAME_CHARS, MAX_TAGS, MAX_TYPE_CHARS, Event, EventRejected, Privacy, RejectReason,
)

VERSION = 1
ENCODING = 'application/x-loom-event'
_HEAD = struct.Struct('>BI')
# The longest header a valid event can have: every string at its bound, six bytes per character
# (a control character escaped as \\u0000), plus the JSON around them.
MAX_HEADER_BYTES = 6 * (MAX_ID_CHARS + MAX_TYPE_CHARS + 2 * MAX_NAME_CHARS
                        + MAX_METADATA_ITEMS * (MAX_NAME_CHARS + MAX_METADATA_VALUE_CHARS)
                        + MAX_TAGS * MAX_NAME_CHARS) + 4096


def encode(event: Event) -> bytes:
    header = json.dumps({
        'id': event.id, 'type': event.type, 'ts': event.timestamp_ms, 'src': event.source,
        'md': event.metadata, 'conf': event.confidence, 'tags': event.tags, 'pri': event.priority,
        'prv': int(event.privacy), 'frame': event.frame_id,
    }, separators=(',', ':'), ensure_ascii=False).encode()
    return b''.join((_HEAD.pack(VERSION, len(header)), header, bytes(event.payload)))


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
