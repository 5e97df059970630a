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

    Events are not validated here (the bus does that, as for any received event). The loop is
    written out (no helper calls per field): this is the subscriber's hot path."""
    data = bytes(data)
    size = len(data)
    if size < 4 or data[0] != 0 or data[1] not in (0, 1):
        raise WireError('not a CDR encapsulation header')
    e = '<' if data[1] == 1 else '>'
    u32 = struct.Struct(e + 'I').unpack_from
    u64x2 = struct.Struct(e + 'QQ').unpack_from
    i64 = struct.Struct(e + 'q').unpack_from
    f32u32 = struct.Struct(e + 'fI').unpack_from
    i32b = struct.Struct(e + 'iB').unpack_from
    privacy_of = _PRIVACY.get
    new_event = Event
    try:
        # header: stamp (8 bytes at offset 4), frame_id; positions count from the buffer start,
        # alignment from the end of the 4-byte encapsulation header.
        (n,) = u32(data, 12)
        pos = 16 + n
        pos += (4 - pos % 8) % 8                       # align 8 relative to offset 4
        bus_id, first_seq = u64x2(data, pos)
        if bus_id in skip_bus_ids:
            return None
        (count,) = u32(data, pos + 16)
        pos += 20
        if count > size:   # each event takes well over one byte
            raise WireError(f'{count} events cannot fit in {size} bytes')
        events = []
        append = events.append
        for _ in range(count):
            pos += -pos % 4 + 8                        # align 4, skip header.stamp
            (n,) = u32(data, pos)
            frame_id = data[pos + 4:pos + 3 + n].decode('utf-8', 'replace')
            pos += 4 + n
            pos += -pos % 4
            (n,) = u32(data, pos)
            event_id = data[pos + 4:pos + 3 + n].decode('utf-8', 'replace')
            pos += 4 + n
            pos += -pos % 4
            (n,) = u32(data, pos)
            event_type = data[pos + 4:pos + 3 + n].decode('utf-8', 'replace')
            pos += 4 + n
            pos += (4 - pos % 8) % 8
            (timestamp_ms,) = i64(data, pos)
            (n,) = u32(data, pos + 8)
            source = data[pos + 12:pos + 11 + n].decode('utf-8', 'replace')
            pos += 12 + n
            pos += -pos % 4
            (n_meta,) = u32(data, pos)
            pos += 4
            if n_meta > size:
                raise WireError('metadata count runs past the end of the message')
            metadata = {}
            for _ in range(n_meta):
                pos += -pos % 4
                (n,) = u32(data, pos)
                key = data[pos + 4:pos + 3 + n].decode('utf-8', 'replace')
                pos += 4 + n
                pos += -pos % 4
                (n,) = u32(data, pos)
                metadata[key] = data[pos + 4:pos + 3 + n].decode('utf-8', 'replace')
                pos += 4 + n
            pos += -pos % 4
            (n,) = u32(data, pos)
            payload = data[pos + 4:pos + 4 + n]
            pos += 4 + n
            pos += -pos % 4
            confidence, n_tags = f32u32(data, pos)
            pos += 8
            if n_tags > size:
                raise WireError('tag count runs past the end of the message')
            tags = []
            for _ in range(n_tags):
                pos += -pos % 4
                (n,) = u32(data, pos)
                tags.append(data[pos + 4:pos + 3 + n].decode('utf-8', 'replace'))
                pos += 4 + n
            pos += -pos % 4
            priority, privacy_value = i32b(data, pos)
            pos += 5
            pos += (4 - pos % 8) % 8 + 16              # align 8, then bus_id and seq
            if pos > size:
                raise WireError('event runs past the end of the message')
            append(new_event(
                event_type, source, payload, event_id, timestamp_ms, metadata,
                _from_float32(confidence), tags, priority,
                privacy_of(privacy_value, privacy_value), frame_id))
    except (struct.error, IndexError) as exc:
        raise WireError(f'message ends early: {exc}') from None
    return bus_id, first_seq, events
