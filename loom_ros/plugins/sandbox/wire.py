"""How events and answers cross a sandbox boundary: Events as JSON objects, and length-prefixed
JSON frames on a byte stream (the subprocess pipes).

One codec for both sandboxes so a plugin answers the same way wherever it runs. An answer is
`{"ok": true, "error": "", "events": [{"type": ..., "payload": ...}, ...]}`; an event's payload is
`payload` (UTF-8 text, or a JSON object/list which is stored as compact JSON) or `payload_b64`.

What the other side sends is bounded before it is parsed (parse_json): the frame's size
(MAX_FRAME_BYTES, refused from its header, before the body is read), its element count
(MAX_JSON_ELEMENTS) and its nesting (MAX_JSON_DEPTH). A 57 MiB frame of nested empty lists took a
host to 1.5 GB when parsed.
"""
from __future__ import annotations

import base64
import json
import struct
from typing import Any, BinaryIO

from loom_ros.bus.event import (DEFAULT_MAX_PAYLOAD_BYTES, MAX_METADATA_ITEMS,
                                MAX_METADATA_VALUE_CHARS, MAX_NAME_CHARS, MAX_TAGS, Event,
                                EventRejected, Privacy)
from loom_ros.plugins.contract import HealthState, HealthStatus, PluginResponse

# What a frame must hold: one event with the largest payload (4 MiB, 5.6 MiB as base64) and its
# metadata and tags at their bounds, every character escaped as \uXXXX (1.7 MiB): 7.3 MiB; 8 MiB
# leaves room for the other fields. The events of one answer share it: an answer of several large
# payloads does not fit (the worker answers a failure that says so).
_LARGEST_EVENT_BYTES = (-(-DEFAULT_MAX_PAYLOAD_BYTES // 3) * 4
                        + 6 * (MAX_METADATA_ITEMS * (MAX_NAME_CHARS + MAX_METADATA_VALUE_CHARS)
                               + MAX_TAGS * MAX_NAME_CHARS))
MAX_FRAME_BYTES = 8 * 1024 * 1024
assert MAX_FRAME_BYTES > _LARGEST_EVENT_BYTES + 64 * 1024
# Parsed JSON costs up to ~20 times its text ('[],' is 3 bytes and a 64-byte list object): an
# upper bound on the elements (each ',' '[' '{' byte, strings included, so it over-counts) keeps
# a frame's parse within a few tens of MB. An answer of 256 events with 64 metadata items and 64
# tags each has about 40,000.
MAX_JSON_ELEMENTS = 200_000
MAX_JSON_DEPTH = 64   # an answer is 4 deep; json.loads itself stops near 1,000 (RecursionError)
_HEADER = struct.Struct('>I')


class WireError(ValueError):
    """A frame or answer that does not follow the protocol (the other side is broken)."""


def event_to_wire(event: Event, text_payload: bool = False) -> dict[str, Any]:
    """The event as a JSON object. `payload` comes first (the WASM examples look for it) as text
    when `text_payload` and it is UTF-8, else `payload_b64`."""
    out: dict[str, Any] = {}
    payload = bytes(event.payload)
    if text_payload:
        try:
            out['payload'] = payload.decode()
        except UnicodeDecodeError:
            out['payload_b64'] = base64.b64encode(payload).decode()
    else:
        out['payload_b64'] = base64.b64encode(payload).decode()
    out.update({'type': event.type, 'id': event.id, 'source': event.source,
                'timestamp_ms': event.timestamp_ms, 'metadata': dict(event.metadata),
                'confidence': event.confidence, 'tags': list(event.tags),
                'priority': event.priority, 'privacy': Privacy(event.privacy).name,
                'frame_id': event.frame_id})
    return out


def event_from_wire(data: Any, default_source: str = '') -> Event:
    """An Event from a JSON object; EventRejected (a ValueError) says what is wrong."""
    if not isinstance(data, dict):
        raise WireError(f'an event must be a JSON object, got {type(data).__name__}')
    fields = dict(data)
    if 'payload_b64' in fields:
        if 'payload' in fields:
            raise WireError('an event has both payload and payload_b64')
        try:
            fields['payload'] = base64.b64decode(fields.pop('payload_b64'), validate=True)
        except (ValueError, TypeError) as exc:
            raise WireError(f'payload_b64 is not base64: {exc}') from None
    fields.setdefault('source', default_source)
    event = Event.from_dict(fields)  # unknown fields, bad privacy: EventRejected
    return event.validate()


def response_to_wire(response: PluginResponse) -> dict[str, Any]:
    return {'ok': response.ok, 'error': response.error,
            'events': [event_to_wire(e) for e in response.events]}


def response_from_wire(data: Any, source: str) -> PluginResponse:
    """A PluginResponse from an answer; a malformed answer becomes a failure that says why."""
    try:
        if not isinstance(data, dict):
            raise WireError(f'the answer must be a JSON object, got {type(data).__name__}')
        unknown = sorted(set(data) - {'ok', 'error', 'events'})
        if unknown:
            raise WireError(f'unknown answer fields: {", ".join(unknown)}')
        ok, error, events = data.get('ok', True), data.get('error', ''), data.get('events', [])
        if not isinstance(ok, bool) or not isinstance(error, str) or not isinstance(events, list):
            raise WireError('ok must be a boolean, error a string and events a list')
        return PluginResponse(ok=ok, error=error,
                              events=[event_from_wire(e, source) for e in events])
    except (WireError, EventRejected, TypeError) as exc:
        return PluginResponse.failure(f'plugin {source!r} sent a malformed answer: {exc}')


def health_to_wire(health: HealthStatus) -> dict[str, Any]:
    return {'state': HealthState(health.state).value, 'message': health.message,
            'details': {str(k): str(v) for k, v in health.details.items()}}


def health_from_wire(data: Any) -> HealthStatus:
    try:
        return HealthStatus(HealthState(data['state']), str(data.get('message', '')),
                            {str(k): str(v) for k, v in dict(data.get('details', {})).items()})
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        return HealthStatus(HealthState.FAILED, f'malformed health answer: {exc}')


def _count_elements(body: bytes) -> None:
    """WireError when `body` may hold more than MAX_JSON_ELEMENTS elements (C-speed counts)."""
    elements = body.count(b',') + body.count(b'[') + body.count(b'{')
    if elements > MAX_JSON_ELEMENTS:
        raise WireError(f'malformed answer (too many elements): {elements} separators or '
                        f'containers, over {MAX_JSON_ELEMENTS}')


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed value (iterative: no recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:
            todo.extend((child, depth + 1) for child in item
                        if isinstance(child, (dict, list)))
    return deepest


def parse_json(body: bytes) -> Any:
    """JSON from the other side of a sandbox, within MAX_JSON_ELEMENTS and MAX_JSON_DEPTH;
    WireError otherwise. json.loads raises RecursionError (not ValueError) for deep nesting."""
    _count_elements(body)
    try:
        value = json.loads(body)
    except RecursionError:
        raise WireError('malformed answer (too deep): nesting beyond what the JSON parser '
                        'takes') from None
    except ValueError as exc:
        raise WireError(f'malformed answer (not JSON): {exc}') from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise WireError(f'malformed answer (too deep): nesting over {MAX_JSON_DEPTH} levels')
    return value


def write_frame(stream: BinaryIO, message: Any) -> None:
    """One message: a 4-byte big-endian length, then that many bytes of UTF-8 JSON. WireError,
    before anything is written, for a message the other side would refuse."""
    body = json.dumps(message, separators=(',', ':')).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise WireError(f'message of {len(body)} bytes exceeds {MAX_FRAME_BYTES}')
    _count_elements(body)
    stream.write(_HEADER.pack(len(body)) + body)
    stream.flush()


def read_frame(stream: BinaryIO) -> Any:
    """The next message, or None at end of stream; WireError for a truncated or bad frame. A
    frame over MAX_FRAME_BYTES is refused from its header, before its body is read."""
    header = _read_exactly(stream, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise WireError(f'frame of {length} bytes exceeds {MAX_FRAME_BYTES}')
    body = _read_exactly(stream, length)
    if body is None:
        raise WireError(f'stream ended inside a frame of {length} bytes')
    return parse_json(body)


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    chunks, got = [], 0
    while got < size:
        chunk = stream.read(size - got)
        if not chunk:
            if got:
                raise WireError(f'stream ended after {got} of {size} bytes')
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b''.join(chunks)
