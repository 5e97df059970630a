"""Decoding a serialized loom_msgs/EventBatch (CDR, as Fast DDS puts it on the wire) straight into
Loom Events.

Why: rclpy turns a received EventBatch into nested Python message objects first (about 11 µs per
event here), then Loom turns those into Events. That conversion capped a subscriber at ~30k
events/s across processes. Taking the raw bytes (`raw=True` subscriptions) and reading the
fields with struct skips the intermediate objects. The wire type stays EventBatch, so
`ros2 topic echo` and non-Loom subscribers are unaffected.

XCDR1 (the encoding rmw_fastrtps uses for ROS 2 messages): a 4-byte encapsulation header
(byte 1: 0 = big endian, 1 = little endian), then the fields in order, each aligned to its own
size (at most 8) relative to the end of that header; strings are a uint32 length counting the
trailing NUL, then the bytes and the NUL; sequences are a uint32 count, then the elements.
"""
from __future__ import annotations

import struct

from loom_ros.bus.event import Event, Privacy, _from_float32


class WireError(ValueError):
    """Bytes that are not a well-formed EventBatch."""


_PRIVACY = {p.value: p for p in Privacy}


def decode_event_batch(data: bytes, skip_bus_ids=()) -> tuple[int, int, list[Event]] | None:
    """(bus_id, first_seq, events) from a serialized EventBatch; WireError when malformed; None
    when its bus_id is in `skip_bus_ids` (a batch from this process: only its header is read).

    Events are not validated here (the bus does that, as for any received event)."""
    view = memoryview(data)
    size = len(view)
    if size < 4 or view[0] != 0 or view[1] not in (0, 1):
        raise WireError('not a CDR encapsulation header')
    endian = '<' if view[1] == 1 else '>'
    u32 = struct.Struct(endian + 'I').unpack_from
    i32 = struct.Struct(endian + 'i').unpack_from
    u64 = struct.Struct(endian + 'Q').unpack_from
    i64 = struct.Struct(endian + 'q').unpack_from
    f32 = struct.Struct(endian + 'f').unpack_from
    base = 4
    pos = base

    def align(pos: int, n: int) -> int:
        rem = (pos - base) % n
        return pos + (n - rem if rem else 0)

    def string(pos: int) -> tuple[str, int]:
        pos = align(pos, 4)
        (length,) = u32(view, pos)
        pos += 4
        end = pos + length
        if length == 0 or end > size:
            raise WireError('string runs past the end of the message')
        return bytes(view[pos:end - 1]).decode('utf-8', 'replace'), end

    try:
        # header: stamp (int32 sec, uint32 nanosec), frame_id
        pos += 8
        _, pos = string(pos)
        pos = align(pos, 8)
        bus_id, first_seq = u64(view, pos)[0], u64(view, pos + 8)[0]
        if bus_id in skip_bus_ids:
            return None
        pos += 16
        (count,) = u32(view, pos)
        pos += 4
        if count > size:   # each event takes well over one byte
            raise WireError(f'{count} events cannot fit in {size} bytes')
        events = []
        for _ in range(count):
            pos = align(pos, 4)
            pos += 8                                   # header.stamp
            frame_id, pos = string(pos)
            event_id, pos = string(pos)
            event_type, pos = string(pos)
            pos = align(pos, 8)
            (timestamp_ms,) = i64(view, pos)
            pos += 8
            source, pos = string(pos)
            pos = align(pos, 4)
            (n_meta,) = u32(view, pos)
            pos += 4
            if n_meta > size:
                raise WireError('metadata count runs past the end of the message')
            metadata = {}
            for _ in range(n_meta):
                key, pos = string(pos)
                metadata[key], pos = string(pos)
            pos = align(pos, 4)
            (n_payload,) = u32(view, pos)
            pos += 4
            if pos + n_payload > size:
                raise WireError('payload runs past the end of the message')
            payload = bytes(view[pos:pos + n_payload])
            pos += n_payload
            pos = align(pos, 4)
            (confidence,) = f32(view, pos)
            pos += 4
            (n_tags,) = u32(view, pos)
            pos += 4
            if n_tags > size:
                raise WireError('tag count runs past the end of the message')
            tags = []
            for _ in range(n_tags):
                tag, pos = string(pos)
                tags.append(tag)
            pos = align(pos, 4)
            (priority,) = i32(view, pos)
            privacy_value = view[pos + 4]
            pos = align(pos + 5, 8) + 16               # privacy, then bus_id and seq
            if pos > size:
                raise WireError('event runs past the end of the message')
            events.append(Event(
                type=event_type, source=source, payload=payload, id=event_id,
                timestamp_ms=timestamp_ms, metadata=metadata,
                confidence=_from_float32(confidence), tags=tags, priority=priority,
                privacy=_PRIVACY.get(privacy_value, privacy_value), frame_id=frame_id))
    except (struct.error, IndexError) as exc:
        raise WireError(f'message ends early: {exc}') from None
    return bus_id, first_seq, events
