"""Reading an MCAP recording without trusting it: every length is checked before anything is
read or allocated, and one bad record, chunk or channel is skipped and counted, never a crash.

Why not mcap's own readers: they take record and string lengths from the file (a 4 GiB default
limit, strings read from the file stream at their claimed length, and zstd chunks decompressed
to the size the frame header claims). Here each top-level record is read whole (at most
`Limits.max_record_bytes`, never past the file's end) and parsed from memory with mcap's record
classes; a chunk is decompressed through a bounded stream to at most `max_chunk_bytes`.

Messages come out in file order (the order `loom record` wrote them, which is time order).
Channels are checked once, as they are defined, by `ChannelCheck` (which message types this
machine knows is the caller's to say, so the module stays free of rclpy); messages on a refused
channel are skipped under the channel's reason. What stops the reading (not an MCAP file, a
record over the limit, a file cut short) raises `RecordingError` naming the offset; whatever came
before it has been yielded. Pure Python (mcap, zstandard).
"""
from __future__ import annotations

import os
import re
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from io import BytesIO

import zstandard
from mcap.data_stream import ReadDataStream
from mcap.opcode import Opcode
from mcap.records import Channel, Chunk, Schema

MAGIC = b'\x89MCAP0\r\n'
MESSAGE_HEADER = struct.Struct('<HIQQ')   # channel id, sequence, log time, publish time
RECORD_HEADER = struct.Struct('<BQ')      # opcode, length

# Reasons a message is skipped (the summary counts each).
INVALID_TOPIC = 'invalid_topic_name'
UNSUPPORTED_ENCODING = 'unsupported_encoding'
UNKNOWN_TYPE = 'unknown_type'
SCHEMA_MISMATCH = 'schema_mismatch'
UNKNOWN_CHANNEL = 'unknown_channel'
TOO_LARGE = 'too_large'
BAD_RECORD = 'bad_record'
BAD_CHUNK = 'bad_chunk'
UNSUPPORTED_COMPRESSION = 'unsupported_compression'
TOO_MANY_CHANNELS = 'too_many_channels'

MAX_TOPIC_CHARS = 255          # rcl's limit on a fully qualified name
MAX_DETAIL_CHARS = 200
_TOKEN = r'[A-Za-z_][A-Za-z0-9_]*'
_TOPIC = re.compile(rf'/?{_TOKEN}(/{_TOKEN})*\Z')
_TYPE = re.compile(r'([a-z][a-z0-9_]{0,63})/(?:msg/)?([A-Z][A-Za-z0-9]{0,63})\Z')


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what one file may make the reader hold (bytes unless said)."""

    max_record_bytes: int = 256 << 20     # a top-level record (a chunk, a message)
    max_chunk_bytes: int = 512 << 20      # a chunk once decompressed
    max_message_bytes: int = 64 << 20     # one message's data
    max_schema_bytes: int = 1 << 20       # one schema's text
    max_channels: int = 4096              # channels (and schemas) one file may define


class RecordingError(ValueError):
    """The file cannot be read on from here: says where (byte offset) and why."""


@dataclass(frozen=True)
class ChannelInfo:
    id: int
    topic: str
    type_name: str          # pkg/msg/Type, as the schema names it (normalised)
    schema_encoding: str
    schema_text: str
    message_encoding: str
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedMessage:
    channel: ChannelInfo
    log_time_ns: int
    publish_time_ns: int
    sequence: int
    data: bytes

    @property
    def topic(self) -> str:
        return self.channel.topic


# (channel) -> None when it may be read, else (reason, detail): the caller knows the types.
ChannelCheck = Callable[[ChannelInfo], 'tuple[str, str] | None']


def topic_problem(topic: object) -> str | None:
    """Why `topic` is not a valid ROS 2 topic name (rcl's rules), or None."""
    if not isinstance(topic, str) or not topic:
        return 'empty'
    if len(topic) > MAX_TOPIC_CHARS:
        return f'longer than {MAX_TOPIC_CHARS} characters'
    if not _TOPIC.match(topic):
        return ('not /-separated tokens of letters, digits and _ (a token may not start with '
                'a digit)')
    if '__' in topic:
        return "repeats '_'"
    return None


def normalise_type(name: object) -> str | None:
    """`pkg/msg/Type` for `pkg/msg/Type` or `pkg/Type`; None for anything else."""
    match = _TYPE.match(name) if isinstance(name, str) else None
    return f'{match.group(1)}/msg/{match.group(2)}' if match else None


def structural_check(channel: ChannelInfo) -> tuple[str, str] | None:
    """What any ROS 2 player needs, whatever types it knows: a valid topic name, a ros2msg
    schema naming a well-formed type, CDR messages."""
    why = topic_problem(channel.topic)
    if why is not None:
        return INVALID_TOPIC, f'{channel.topic[:80]!r}: {why}'
    if channel.message_encoding != 'cdr' or channel.schema_encoding != 'ros2msg':
        return UNSUPPORTED_ENCODING, (f'{channel.topic}: messages {channel.message_encoding!r}, '
                                      f'schema {channel.schema_encoding!r} (need cdr, ros2msg)')
    if not channel.type_name:
        return UNKNOWN_TYPE, f'{channel.topic}: schema names no ROS message type'
    return None


def schema_body(text: str) -> list[str]:
    """A ros2msg schema without comments, blank lines and spacing: what must match."""
    lines = []
    for line in text.splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            lines.append(' '.join(line.split()))
    return lines


class McapSource:
    """One recording file; `messages()` yields RecordedMessage in file order. `skipped` counts
    skipped messages per reason, `examples` keeps the first detail of each reason."""

    def __init__(self, path: str | os.PathLike, check: ChannelCheck = structural_check,
                 limits: Limits = Limits()):
        self.path = os.fspath(path)
        self.check = check
        self.limits = limits
        self.skipped: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.channels: dict[int, tuple[ChannelInfo, tuple[str, str] | None]] = {}
        self._schemas: dict[int, Schema] = {}

    # -- counting ---------------------------------------------------------------------------
    def skip(self, reason: str, detail: str = '', count: int = 1) -> None:
        self.skipped[reason] += count
        if detail and reason not in self.examples:
            self.examples[reason] = detail[:MAX_DETAIL_CHARS]

    # -- the file ---------------------------------------------------------------------------
    def messages(self) -> Iterator[RecordedMessage]:
        """RecordingError when the file stops being readable (after yielding what came before)."""
        try:
            stream = open(self.path, 'rb')
        except OSError as exc:
            raise RecordingError(f'{self.path}: cannot open: {exc.strerror or exc}') from None
        with stream:
            size = os.fstat(stream.fileno()).st_size
            if stream.read(len(MAGIC)) != MAGIC:
                raise RecordingError(f'{self.path}: not an MCAP file (no MCAP magic at the start)')
            offset = len(MAGIC)
            while True:
                head = stream.read(RECORD_HEADER.size)
                if not head:
                    raise RecordingError(f'{self.path}: ends at byte {offset} without a data end '
                                         'or footer record (cut short?)')
                if len(head) < RECORD_HEADER.size:
                    raise RecordingError(f'{self.path}: cut short inside a record header at byte '
                                         f'{offset}')
                opcode, length = RECORD_HEADER.unpack(head)
                if length > self.limits.max_record_bytes:
                    raise RecordingError(
                        f'{self.path}: record at byte {offset} (opcode {opcode}) claims {length} '
                        f'bytes, over the {self.limits.max_record_bytes}-byte limit')
                if length > size - offset - RECORD_HEADER.size:
                    raise RecordingError(
                        f'{self.path}: record at byte {offset} claims {length} bytes but the file '
                        f'has {size - offset - RECORD_HEADER.size} left (cut short?)')
                body = stream.read(length)
                if opcode in (Opcode.DATA_END, Opcode.FOOTER):
                    return   # the summary section after it repeats what the data section held
                yield from self._record(opcode, body, offset)
                offset += RECORD_HEADER.size + length

    def _record(self, opcode: int, body: bytes, offset: int) -> Iterator[RecordedMessage]:
        if opcode == Opcode.MESSAGE:
            message = self._message(body)
            if message is not None:
                yield message
        elif opcode == Opcode.SCHEMA:
            self._schema(body)
        elif opcode == Opcode.CHANNEL:
            self._channel(body)
        elif opcode == Opcode.CHUNK:
            yield from self._chunk(body, offset)
        # Anything else (attachments, metadata, indexes, unknown opcodes) plays no part.

    def _schema(self, body: bytes) -> None:
        try:
            schema = Schema.read(ReadDataStream(BytesIO(body)))
        except Exception as exc:   # noqa: BLE001 - whatever a malformed record raises
            self.skip(BAD_RECORD, f'schema record: {type(exc).__name__}')
            return
        if len(schema.data) > self.limits.max_schema_bytes:
            schema = replace(schema, data=b'', name='')   # its channels get unknown_type
        if schema.id in self._schemas or len(self._schemas) < self.limits.max_channels:
            self._schemas[schema.id] = schema

    def _channel(self, body: bytes) -> None:
        try:
            channel = Channel.read(ReadDataStream(BytesIO(body)))
        except Exception as exc:   # noqa: BLE001
            self.skip(BAD_RECORD, f'channel record: {type(exc).__name__}')
            return
        if channel.id not in self.channels and len(self.channels) >= self.limits.max_channels:
            self.skip(TOO_MANY_CHANNELS, f'more than {self.limits.max_channels} channels')
            return
        schema = self._schemas.get(channel.schema_id)
        try:
            text = schema.data.decode('utf-8') if schema is not None else ''
        except UnicodeDecodeError:
            text = ''
        info = ChannelInfo(
            id=channel.id, topic=channel.topic, message_encoding=channel.message_encoding,
            type_name=(normalise_type(schema.name) or '') if schema is not None else '',
            schema_encoding=schema.encoding if schema is not None else '',
            schema_text=text, metadata=dict(list(channel.metadata.items())[:64]))
        refusal = structural_check(info)
        if refusal is None and self.check is not structural_check:
            try:
                refusal = self.check(info)
            except Exception as exc:   # noqa: BLE001 - a checker's failure refuses the channel
                refusal = (UNKNOWN_TYPE, f'{info.topic}: {type(exc).__name__}: {exc}')
        self.channels[channel.id] = (info, refusal)

    def _message(self, body: bytes) -> RecordedMessage | None:
        if len(body) < MESSAGE_HEADER.size:
            self.skip(BAD_RECORD, f'message record of {len(body)} bytes')
            return None
        channel_id, sequence, log_time, publish_time = MESSAGE_HEADER.unpack_from(body)
        known = self.channels.get(channel_id)
        if known is None:
            self.skip(UNKNOWN_CHANNEL, f'channel id {channel_id} was never defined')
            return None
        channel, refusal = known
        if refusal is not None:
            self.skip(*refusal)
            return None
        if len(body) - MESSAGE_HEADER.size > self.limits.max_message_bytes:
            self.skip(TOO_LARGE, f'{channel.topic}: {len(body)} bytes')
            return None
        return RecordedMessage(channel, log_time, publish_time, sequence,
                               bytes(body[MESSAGE_HEADER.size:]))

    def _chunk(self, body: bytes, offset: int) -> Iterator[RecordedMessage]:
        try:
            chunk = Chunk.read(ReadDataStream(BytesIO(body)))
        except Exception as exc:   # noqa: BLE001
            self.skip(BAD_CHUNK, f'chunk at byte {offset}: {type(exc).__name__}')
            return
        if chunk.uncompressed_size > self.limits.max_chunk_bytes:
            self.skip(BAD_CHUNK, f'chunk at byte {offset} claims {chunk.uncompressed_size} '
                                 f'bytes, over the {self.limits.max_chunk_bytes}-byte limit')
            return
        try:
            data = self._decompress(chunk)
        except _Unsupported as exc:
            self.skip(UNSUPPORTED_COMPRESSION, str(exc))
            return
        except zstandard.ZstdError as exc:
            self.skip(BAD_CHUNK, f'chunk at byte {offset}: {exc}')
            return
        if len(data) != chunk.uncompressed_size or (
                chunk.uncompressed_crc and zlib.crc32(data) != chunk.uncompressed_crc):
            self.skip(BAD_CHUNK, f'chunk at byte {offset}: size or CRC does not match its header')
            return
        view, pos = memoryview(data), 0
        while pos < len(view):
            if len(view) - pos < RECORD_HEADER.size:
                self.skip(BAD_CHUNK, f'chunk at byte {offset}: a record header is cut short')
                return
            opcode, length = RECORD_HEADER.unpack_from(view, pos)
            pos += RECORD_HEADER.size
            if length > len(view) - pos:
                self.skip(BAD_CHUNK, f'chunk at byte {offset}: a record claims {length} bytes '
                                     f'past the chunk end')
                return
            record = bytes(view[pos:pos + length])
            pos += length
            if opcode in (Opcode.MESSAGE, Opcode.SCHEMA, Opcode.CHANNEL):
                yield from self._record(opcode, record, offset)

    def _decompress(self, chunk: Chunk) -> bytes:
        if chunk.compression == '':
            return chunk.data
        if chunk.compression != 'zstd':
            raise _Unsupported(f'chunk compression {chunk.compression[:40]!r} (this reader '
                               'takes zstd or none)')
        # Bounded: at most one byte more than the header claims, whatever the frame says.
        reader = zstandard.ZstdDecompressor().stream_reader(chunk.data)
        parts, want = [], chunk.uncompressed_size + 1
        while want > 0:
            part = reader.read(want)
            if not part:
                break
            parts.append(part)
            want -= len(part)
        return b''.join(parts)


class _Unsupported(ValueError):
    pass
