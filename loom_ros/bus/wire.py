"""loom_msgs/Event and EventBatch as CDR bytes (as Fast DDS puts them on the wire), read straight
into Loom Events and written straight from them.

Why: rclpy turns a received EventBatch into nested Python message objects first (about 11 µs per
event here), then Loom turns those into Events; that capped a subscriber at ~30k events/s across
processes. Taking the raw bytes (`raw=True` subscriptions) and reading the fields with struct
skips the intermediate objects; a single Event read by rclpy's deserializer cost more still.
On the way out, rclpy's conversion of a message object to C (before serialization) cost about
19 µs per event in an EventBatch and 60 µs per Event here; writing the CDR bytes with struct and
handing them to `Publisher.publish(bytes)` costs a few. The wire types stay Event and
EventBatch, so `ros2 topic echo` and non-Loom subscribers are unaffected. The bus checks once per
process that rclpy reads these bytes back as the same message (bus.EventBus), and uses rclpy's
own path if it does not.

XCDR1 (the encoding rmw_fastrtps uses for ROS 2 messages): a 4-byte encapsulation header
(byte 1: 0 = big endian, 1 = little endian), then the fields in order, each aligned to its own
size (at most 8) relative to the end of that header; strings are a uint32 length counting the
trailing NUL, then the bytes and the NUL; sequences are a uint32 count, then the elements.
The encoder writes little endian with zero padding, and cuts each string at its first NUL as
rclpy does (C strings).
"""
from __future__ import annotations

import struct
from functools import lru_cache

from loom_ros.bus.event import Event, Privacy, _from_float32


class WireError(ValueError):
    """Bytes that are not a well-formed EventBatch."""


_PRIVACY = {p.value: p for p in Privacy}


# -- encoding -----------------------------------------------------------------------------------
ENCAPSULATION = b'\x00\x01\x00\x00'   # CDR, little endian
# An EventBatch's header (stamp, frame_id '', bus_id, first_seq) and event count take bytes 4-40,
# so its first event starts 8-aligned and every later one 4 past an 8-alignment (each event
# ends with two uint64s). Positions below count from the buffer's start, as in the decoder.
BATCH_FIRST_EVENT_POS = 40
EVENT_POS = 4
_PAD = (b'', b'\0', b'\0\0', b'\0\0\0', b'\0\0\0\0', b'\0' * 5, b'\0' * 6, b'\0' * 7)
_ZERO4 = _PAD[4]
_U32 = struct.Struct('<I').pack
_STAMP = struct.Struct('<II').pack       # sec as rclpy writes an int32 it was given too wide
_Q = struct.Struct('<q').pack
_QQ = struct.Struct('<QQ').pack
_F32U32 = struct.Struct('<fI').pack
_I32B = struct.Struct('<iB').pack
_BATCH_HEAD = struct.Struct('<II4s4xQQI').pack
_U32_MASK = 0xFFFFFFFF


# The NUL that ends a CDR string and the padding after it up to the next 4-byte boundary, by the
# string's UTF-8 length mod 4 (a string starts 4-aligned: its length field is a uint32).
_NUL_PAD = (b'\0\0\0\0', b'\0\0\0', b'\0\0', b'\0')


def _padded(text: str) -> bytes:
    """A CDR string (length, UTF-8, NUL), cut at the first NUL as rclpy's C strings are, and the
    zero padding that follows it up to 4-alignment; UnicodeEncodeError for a lone surrogate
    (rclpy raises it too). Every field after a string in an Event starts 4-aligned (or
    8-aligned, which the caller adds), so the padding depends on the string alone and is
    remembered with it."""
    data = text.encode()
    if b'\0' in data:
        data = data[:data.index(b'\0')]
    return _U32(len(data) + 1) + data + _NUL_PAD[len(data) & 3]


# Types, sources, frame ids, metadata keys and tags repeat from event to event: their encoding is
# remembered (bounded: a publisher inventing names only churns the cache). Ids and metadata
# values rarely repeat and are encoded each time.
_repeated = lru_cache(maxsize=4096)(_padded)


def encode_event(event: Event, bus_id: int, seq: int, pos: int = EVENT_POS) -> bytes:
    """One loom_msgs/Event's CDR bytes (no encapsulation header) for a message that starts at
    `pos` in its buffer (only pos % 8 matters: EVENT_POS for a lone Event, BATCH_FIRST_EVENT_POS
    for the first of a batch, EVENT_POS for the others). The event must have passed validate();
    UnicodeEncodeError for a string UTF-8 cannot hold. Written out: the publisher's hot path.

    Each string carries its own padding (_padded), so only two places need the position: the
    int64 timestamp and the trailing uint64s, 8-aligned relative to the end of the 4-byte
    encapsulation header (a position = 4 mod 8 from the buffer's start)."""
    repeated, padded = _repeated, _padded
    sec, ms = divmod(event.timestamp_ms, 1000)
    head = b''.join((_STAMP(sec & _U32_MASK, ms * 1_000_000), repeated(event.frame_id),
                     padded(event.id), repeated(event.type)))
    metadata, payload, tags = event.metadata, event.payload, event.tags
    if type(payload) is not bytes:   # a bytearray or memoryview validate() let through
        payload = bytes(payload)
    parts = [head, _ZERO4 if (pos + len(head)) & 7 == 0 else b'',
             _Q(event.timestamp_ms), repeated(event.source), _U32(len(metadata)),
             *[repeated(key) + padded(value) for key, value in metadata.items()],
             _U32(len(payload)), payload, _PAD[-len(payload) & 3],
             _F32U32(event.confidence, len(tags)), *map(repeated, tags),
             _I32B(event.priority, event.privacy)]
    end = pos + sum(map(len, parts))   # just after the privacy byte
    parts.append(_PAD[(4 - end) & 7])
    parts.append(_QQ(bus_id, seq))
    return b''.join(parts)


def encode_event_message(event: Event, bus_id: int, seq: int) -> bytes:
    """A serialized loom_msgs/Event, ready for `Publisher.publish(bytes)`."""
    return ENCAPSULATION + encode_event(event, bus_id, seq, EVENT_POS)


def encode_event_batch(encoded_events: list[bytes], bus_id: int, first_seq: int,
                       stamp_ns: int) -> bytes:
    """A serialized loom_msgs/EventBatch (header frame_id '') around events encode_event wrote,
    the first at BATCH_FIRST_EVENT_POS and the others at EVENT_POS."""
    sec, ns = divmod(stamp_ns, 1_000_000_000)
    return b''.join((ENCAPSULATION, _BATCH_HEAD(sec & _U32_MASK, ns, _U32(1), bus_id, first_seq,
                                                len(encoded_events)), *encoded_events))


# -- decoding -----------------------------------------------------------------------------------
def decode_event_message(data: bytes) -> tuple[int, int, Event]:
    """(bus_id, seq, event) from a serialized loom_msgs/Event; WireError when malformed. The
    event is not validated (the bus does that)."""
    data = bytes(data)
    if len(data) < 4 or data[0] != 0 or data[1] not in (0, 1):
        raise WireError('not a CDR encapsulation header')
    events, end = _decode_events(data, EVENT_POS, 1, '<' if data[1] == 1 else '>')
    bus_id, seq = struct.unpack_from('<QQ' if data[1] == 1 else '>QQ', data, end - 16)
    return bus_id, seq, events[0]


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
    except struct.error as exc:
        raise WireError(f'message ends early: {exc}') from None
    return bus_id, first_seq, _decode_events(data, pos + 20, count, e)[0]


def _decode_events(data: bytes, pos: int, count: int, e: str) -> tuple[list[Event], int]:
    """`count` Events from `pos` on, and where the last one ended. The loop is written out (no
    helper calls per field): this is the subscriber's hot path. Positions count from the buffer's
    start; 4-alignment is the same from there, 8-alignment is relative to offset 4 (a position
    = 4 mod 8): `(p + 3) & -4` aligns p to 4, `((p + 3) & -8) + 4` to 8, so a string whose
    length field is at p and holds n bytes (NUL included) is followed by `(p + n + 7) & -4`."""
    size = len(data)
    u32 = struct.Struct(e + 'I').unpack_from
    i64u32 = struct.Struct(e + 'qI').unpack_from
    f32u32 = struct.Struct(e + 'fI').unpack_from
    i32b = struct.Struct(e + 'iB').unpack_from
    privacy_of = _PRIVACY.get
    new_event = Event
    from_float32 = _from_float32
    try:
        if count > size:
            raise WireError(f'{count} events cannot fit in {size} bytes')
        events = []
        append = events.append
        for _ in range(count):
            pos = ((pos + 3) & -4) + 8                 # align 4, skip header.stamp
            (n,) = u32(data, pos)
            frame_id = data[pos + 4:pos + 3 + n].decode('utf-8', 'replace')
            pos = (pos + n + 7) & -4                   # past the string, aligned 4
            (n,) = u32(data, pos)
            event_id = data[pos + 4:pos + 3 + n].decode('utf-8', 'replace')
            pos = (pos + n + 7) & -4
            (n,) = u32(data, pos)
            event_type = data[pos + 4:pos + 3 + n].decode('utf-8', 'replace')
            pos = ((pos + n + 7) & -8) + 4             # past it, aligned 8 (from offset 4)
            timestamp_ms, n = i64u32(data, pos)
            source = data[pos + 12:pos + 11 + n].decode('utf-8', 'replace')
            pos = (pos + n + 15) & -4
            (n_meta,) = u32(data, pos)
            pos += 4
            if n_meta > size:
                raise WireError('metadata count runs past the end of the message')
            metadata = {}
            for _ in range(n_meta):
                (n,) = u32(data, pos)
                key = data[pos + 4:pos + 3 + n].decode('utf-8', 'replace')
                pos = (pos + n + 7) & -4
                (n,) = u32(data, pos)
                metadata[key] = data[pos + 4:pos + 3 + n].decode('utf-8', 'replace')
                pos = (pos + n + 7) & -4
            (n,) = u32(data, pos)
            payload = data[pos + 4:pos + 4 + n]
            pos = (pos + n + 7) & -4
            confidence, n_tags = f32u32(data, pos)
            pos += 8
            if n_tags > size:
                raise WireError('tag count runs past the end of the message')
            tags = []
            for _ in range(n_tags):
                (n,) = u32(data, pos)
                tags.append(data[pos + 4:pos + 3 + n].decode('utf-8', 'replace'))
                pos = (pos + n + 7) & -4
            priority, privacy_value = i32b(data, pos)
            pos = ((pos + 8) & -8) + 20                # align 8 (from offset 4), bus_id and seq
            if pos > size:
                raise WireError('event runs past the end of the message')
            append(new_event(
                event_type, source, payload, event_id, timestamp_ms, metadata,
                from_float32(confidence), tags, priority,
                privacy_of(privacy_value, privacy_value), frame_id))
    except (struct.error, IndexError) as exc:
        raise WireError(f'message ends early: {exc}') from None
    return events, pos
