"""Writing MCAP files for the replay tests: good ones through the real recorder (McapRecorder),
hostile ones record by record with mcap's record classes (lengths, chunks and names chosen by
the test, as an attacker would)."""
from __future__ import annotations

import struct
from pathlib import Path

import zstandard
from mcap.data_stream import RecordBuilder
from mcap.opcode import Opcode
from mcap.records import Channel, Chunk, DataEnd, Header, Message, Schema

from loom_ros.replay.mcap_source import MAGIC

T0 = 1_700_000_000_000_000_000   # ns: the recordings' first message


def record_bytes(record) -> bytes:
    builder = RecordBuilder()
    record.write(builder)
    return builder.end()


def raw(opcode: int, body: bytes, length: int | None = None) -> bytes:
    """A record whose length field says `length` (default: the truth)."""
    return struct.pack('<BQ', opcode, len(body) if length is None else length) + body


def string_schema(schema_id: int = 1, name: str = 'std_msgs/msg/String',
                  text: str = 'string data\n') -> bytes:
    return record_bytes(Schema(id=schema_id, name=name, encoding='ros2msg',
                               data=text.encode()))


def channel(channel_id: int, topic: str, schema_id: int = 1) -> bytes:
    return record_bytes(Channel(id=channel_id, topic=topic, message_encoding='cdr',
                                metadata={}, schema_id=schema_id))


def message(channel_id: int, data: bytes, t_ns: int = T0) -> bytes:
    return record_bytes(Message(channel_id=channel_id, log_time=t_ns, data=data,
                                publish_time=t_ns, sequence=0))


def string_cdr(text: str) -> bytes:
    from rclpy.serialization import serialize_message
    from std_msgs.msg import String
    return serialize_message(String(data=text))


def chunk(records: bytes, claimed_size: int | None = None, compress: bool = True) -> bytes:
    data = zstandard.compress(records) if compress else records
    return record_bytes(Chunk(compression='zstd' if compress else '', data=data,
                              message_start_time=T0, message_end_time=T0,
                              uncompressed_crc=0,
                              uncompressed_size=len(records) if claimed_size is None
                              else claimed_size))


def write(path: Path, *records: bytes, end: bool = True) -> Path:
    body = MAGIC + record_bytes(Header(profile='ros2', library='test')) + b''.join(records)
    if end:
        body += record_bytes(DataEnd(data_section_crc=0))
    path.write_bytes(body)
    return path


def recorded(path: Path, messages: list[tuple[str, str, object, int]]) -> Path:
    """A file written by `loom record`'s McapRecorder: (topic, type, message, log time ns)."""
    from rclpy.serialization import serialize_message

    from loom_ros.cli.record import McapRecorder
    recorder = McapRecorder(path)
    for topic, full_type, msg, t_ns in messages:
        recorder.add_topic(topic, full_type)
        recorder.write(topic, serialize_message(msg), t_ns)
    recorder.close()
    return path


OPCODES = Opcode
