"""Event <-> Zenoh payload: every Event field and its metadata, carried intact.

Layout (version 1): one byte 0x01, a 4-byte big-endian length, a compact UTF-8 JSON header with
every field but the payload, then the payload's raw bytes (no base64: camera-sized payloads stay
their size). Decoding validates the event, so a malformed sample is a counted EventRejected.
"""
from __future__ import annotations

import json
import struct

from loom_ros.bus.event import DEFAULT_MAX_PAYLOAD_BYTES, Event, EventRejected, Privacy, RejectReason

VERSION = 1
ENCODING = 'application/x-loom-event'
_HEAD = struct.Struct('>BI')


def encode(event: Event) -> bytes:
    header = json.dumps({
        'id': event.id, 'type': event.type, 'ts': event.timestamp_ms, 'src': event.source,
        'md': event.metadata, 'conf': event.confidence, 'tags': event.tags, 'pri': event.priority,
        'prv': int(event.privacy), 'frame': event.frame_id,
    }, separators=(',', ':'), ensure_ascii=False).encode()
    return b''.join((_HEAD.pack(VERSION, len(header)), header, bytes(event.payload)))


def decode(data: bytes, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Event:
    """The Event in `data`, validated; EventRejected (bad_field) says what is wrong."""
    data = bytes(data)
    if len(data) < _HEAD.size:
        raise EventRejected(RejectReason.BAD_FIELD, f'bridge sample of {len(data)} bytes is '
                            'shorter than its header')
    version, length = _HEAD.unpack_from(data)
    if version != VERSION:
        raise EventRejected(RejectReason.BAD_FIELD, f'bridge sample version {version}, '
                            f'this bridge reads version {VERSION}')
    end = _HEAD.size + length
    if end > len(data):
        raise EventRejected(RejectReason.BAD_FIELD, f'bridge sample truncated: header says '
                            f'{length} bytes, {len(data) - _HEAD.size} present')
    try:
        h = json.loads(data[_HEAD.size:end])
        privacy = Privacy(h['prv'])
        event = Event(type=h['type'], source=h['src'], payload=data[end:], id=h['id'],
                      timestamp_ms=h['ts'], metadata=h['md'], confidence=h['conf'],
                      tags=h['tags'], priority=h['pri'], privacy=privacy, frame_id=h['frame'])
    except (ValueError, KeyError, TypeError) as exc:
        raise EventRejected(RejectReason.BAD_FIELD,
                            f'bridge sample header is not a Loom event: {exc!r}') from None
    if isinstance(event.confidence, int) and not isinstance(event.confidence, bool):
        event.confidence = float(event.confidence)
    return event.validate(max_payload_bytes)
