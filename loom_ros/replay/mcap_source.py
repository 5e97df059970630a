"""Reading an MCAP recording without trusting it: every length is checked before anything is
read or allocated, and one bad record, chunk or channel is skipped and counted, never a crash.

Why not mcap's own readers: they take record and string lengths from the file (a 4 GiB default
limit, strings read from the file stream at their claimed length, and zstd chunks decompressed
to the size the frame header claims). Here each top-level record is read whole (at most
`Limits.max_record_bytes`, never past the file's end) and parsed from memory with mcap's record
classes; a chunk is decompressed through a bounded stream to at most `max_chunk_bytes`.

One file also has a budget as a whole (`Limits.file_bytes`, `Limits.file_records`), so a few KB
cannot cost minutes or GiBs however its chunks are cut: decompressed chunk bytes at most
max(64 MiB, 64 x the file's size), records (top-level and inside chunks) at most max(2**18, one
per byte of the file), each under an absolute cap. Past either the reading stops with a
RecordingError. Schemas are decoded once per id and shared by their channels; their text held
per file is capped (`max_schema_total_bytes`), and a schema blanked for its size or dropped past
a cap is counted (`schema_too_large`, `too_many_schemas`). Channel records are parsed here too,
each string's length checked before it is decoded: a topic or message encoding too long to be
real refuses the channel (its messages skipped as `invalid_topic_name`, `unsupported_encoding`,
whatever the check), and its metadata map is cut to `max_metadata_entries` entries of bounded
key and value, `max_metadata_total_bytes` for the whole file (the rest never decoded; counted
as `metadata_cut`), so a few KB cannot carry megabytes of metadata into memory, logs or a view.

Messages come out in file order (the order `loom record` wrote them, which is time order).
Channels are checked once, as they are defined, by `ChannelCheck` (which message types this
machine knows is the caller's to say, so the module stays free of rclpy); messages on a refused
channel are skipped under the channel's reason. What stops the reading (not an MCAP file, a
record over the limit, a file cut short, the file's budget spent) raises `RecordingError` naming
the offset; whatever came before it has been yielded. A file that ends cleanly after its last
whole record, without a data end (a recorder killed before it finished the file: `loom record`
writes whole records, so that is how a crash leaves it), raises `UnfinishedError`, a
RecordingError: every record in the file has then been read, and a reader may take it as whole.
A path is opened without blocking (a FIFO planted there is refused, not waited on) and must be
a regular file; a caller that checked a file itself passes the open file (`stream`). Pure Python
(mcap, zstandard).
"""
from __future__ import annotations

import io
import os
import re
import stat
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO
from typing import BinaryIO

import zstandard
from mcap.opcode import Opcode
from mcap.records import Schema

MAGIC = b'\x89MCAP0\r\n'
MESSAGE_HEADER = struct.Struct('<HIQQ')   # channel id, sequence, log time, publish time
RECORD_HEADER = struct.Struct('<BQ')      # opcode, length
CHUNK_HEADER = struct.Struct('<QQQI')     # start time, end time, uncompressed size and CRC
LENGTH4 = struct.Struct('<I')             # a string's or a schema's data length
LENGTH8 = struct.Struct('<Q')             # a chunk's records length
SCHEMA_ID = struct.Struct('<H')
CHANNEL_IDS = struct.Struct('<HH')        # a channel's id and its schema's

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
# Reasons a channel or schema record is dropped (counted per record; the messages on it are
# then skipped under their own reason).
TOO_MANY_CHANNELS = 'too_many_channels'
SCHEMA_TOO_LARGE = 'schema_too_large'     # blanked: its channels' messages are unknown_type
TOO_MANY_SCHEMAS = 'too_many_schemas'     # past max_channels schemas or max_schema_total_bytes
METADATA_CUT = 'metadata_cut'             # a channel record whose metadata was cut to the caps

MAX_TOPIC_CHARS = 255          # rcl's limit on a fully qualified name
MAX_TOPIC_BYTES = 4 * MAX_TOPIC_CHARS   # longer is not decoded (the channel is refused)
MAX_ENCODING_BYTES = 64        # a message encoding ('cdr'); longer refuses the channel
SHOWN_CHARS = 80               # of a refused topic, kept to name it in counts and details
MAX_DETAIL_CHARS = 200
SCHEMA_BODY_CACHE = 16         # schema texts whose normalised body is kept (schema_body)
_TOKEN = r'[A-Za-z_][A-Za-z0-9_]*'
_TOPIC = re.compile(rf'/?{_TOKEN}(/{_TOKEN})*\Z')
_TYPE = re.compile(r'([a-z][a-z0-9_]{0,63})/(?:msg/)?([A-Z][A-Za-z0-9]{0,63})\Z')

# A file's budget (see the module doc): what a legitimate recording needs is proportional to its
# size (zstd on recorded messages rarely passes 10x; even a recording of nothing but tiny
# messages spends more than 16 file bytes per message on its index), a hostile one's is not.
FILE_BYTES_PER_BYTE = 256             # decompressed chunk bytes per byte of file (a recording
# of camera frames, events and speech compresses 2-20x; a lens-capped camera more: 256 leaves room)
MIN_FILE_BYTES = 64 << 20             # ... but at least this, whatever the file's size
MAX_FILE_BYTES = 1 << 40              # ... and never more (1 TiB: hours of raw camera frames)
FILE_RECORDS_PER_BYTE = 1             # records per byte of file
MIN_FILE_RECORDS = 1 << 18            # ... but at least this (about 1 s of walking)
MAX_FILE_RECORDS = 1 << 32            # ... and never more


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what one file may make the reader hold (bytes unless said), and its
    budget as a whole (`file_bytes`, `file_records`)."""

    max_record_bytes: int = 256 << 20     # a top-level record (a chunk, a message)
    max_chunk_bytes: int = 512 << 20      # a chunk once decompressed
    max_message_bytes: int = 64 << 20     # one message's data
    max_schema_bytes: int = 1 << 20       # one schema's text
    max_schema_total_bytes: int = 16 << 20  # all schemas of one file (their records)
    max_channels: int = 4096              # channels (and schemas) one file may define
    max_metadata_entries: int = 64        # of one channel's metadata map (the rest: cut)
    max_metadata_key_bytes: int = 256     # an entry with a longer key or value is cut
    max_metadata_value_bytes: int = 16 << 10   # (rosbag2's QoS profiles: ~1 KB a publisher)
    max_metadata_total_bytes: int = 1 << 20    # all channels' metadata one file may hold
    file_bytes_per_byte: int = FILE_BYTES_PER_BYTE
    min_file_bytes: int = MIN_FILE_BYTES
    max_file_bytes: int = MAX_FILE_BYTES
    file_records_per_byte: int = FILE_RECORDS_PER_BYTE
    min_file_records: int = MIN_FILE_RECORDS
    max_file_records: int = MAX_FILE_RECORDS

    def file_bytes(self, size: int) -> int:
        """Decompressed chunk bytes a file of `size` bytes may make the reader produce."""
        return min(self.max_file_bytes, max(self.min_file_bytes, self.file_bytes_per_byte * size))

    def file_records(self, size: int) -> int:
        """Records (top-level and inside chunks) a file of `size` bytes may make it walk."""
        return min(self.max_file_records,
                   max(self.min_file_records, self.file_records_per_byte * size))


class NotRegularError(OSError):
    """A recording's path names a FIFO, folder or device, not a regular file."""


def open_regular(path, *, follow: bool = True) -> BinaryIO:
    """`path` open for reading, a regular file: opened without blocking (a FIFO had blocked a
    reader past SIGTERM), then the open file checked (fstat), so nothing swapped in after a
    check of the name is read; `follow=False`: never through a symbolic link (OSError ELOOP).
    NotRegularError for anything else; OSError when it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC |
                 (0 if follow else os.O_NOFOLLOW))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularError(0, 'not a regular file (a FIFO, folder or device)')
    os.set_blocking(fd, True)
    return os.fdopen(fd, 'rb')


class RecordingError(ValueError):
    """The file cannot be read on from here: says where (byte offset) and why."""


class UnfinishedError(RecordingError):
    """The file ends cleanly after its last whole record without a data end: never finished
    (its recorder was killed). Every record in it was read before this is raised."""


@dataclass(frozen=True)
class ChannelInfo:
    id: int
    topic: str
    type_name: str          # pkg/msg/Type, as the schema names it (normalised)
    schema_encoding: str
    schema_text: str        # shared by every channel of the schema (decoded once)
    message_encoding: str
    metadata: dict = field(default_factory=dict)
    # The schema record as the file holds it (None: none): for tools that copy a recording.
    schema: Schema | None = field(default=None, compare=False, repr=False)


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
# McapSource applies structural_check first, unless it is given no check at all (None).
ChannelCheck = Callable[[ChannelInfo], 'tuple[str, str] | None']


@dataclass(frozen=True)
class _KnownSchema:
    """A schema as read once: its record, its text and type (shared by its channels)."""

    record: Schema
    text: str
    type_name: str


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


@lru_cache(maxsize=SCHEMA_BODY_CACHE)
def schema_body(text: str) -> tuple[str, ...]:
    """A ros2msg schema without comments, blank lines and spacing: what must match. Cached:
    every channel of a schema shares its text, so a file of many channels parses it once."""
    lines = []
    for line in text.splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            lines.append(' '.join(line.split()))
    return tuple(lines)


class McapSource:
    """One recording file; `messages()` yields RecordedMessage in file order. `skipped` counts
    skipped messages per reason (and dropped channel and schema records), `examples` keeps the
    first detail of each reason. `check=None` reads every channel, whatever its topic, encodings
    or type (for tools that copy a recording rather than play it), except one whose topic or
    encoding is too long to be real. `data`: the file's bytes when they are in memory already;
    `stream`: the file, opened and checked by the caller (read from its start, never closed
    here); with either, `path` only names it."""

    def __init__(self, path: str | os.PathLike, check: ChannelCheck | None = structural_check,
                 limits: Limits = Limits(), *, data: bytes | None = None,
                 stream: BinaryIO | None = None):
        self.path = os.fspath(path)
        self.check = check
        self.limits = limits
        self.skipped: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.channels: dict[int, tuple[ChannelInfo, tuple[str, str] | None]] = {}
        self._data = data
        self._stream = stream
        self._schemas: dict[int, _KnownSchema] = {}
        self._schema_bytes = 0      # schema text taken so far (max_schema_total_bytes)
        self._metadata_bytes = 0    # channel metadata held so far (max_metadata_total_bytes)
        # The file's budgets (Limits.file_bytes, file_records), set when messages() starts.
        self._bytes_budget = self._bytes_left = 0
        self._records_budget = self._records_left = 0

    # -- counting ---------------------------------------------------------------------------
    def skip(self, reason: str, detail: str = '', count: int = 1) -> None:
        self.skipped[reason] += count
        if detail and reason not in self.examples:
            self.examples[reason] = detail[:MAX_DETAIL_CHARS]

    def _spend_records(self, offset: int) -> None:
        self._records_left -= 1
        if self._records_left < 0:
            raise RecordingError(
                f'{self.path}: more than {self._records_budget} records by byte {offset}, over '
                'the budget for a file of its size (Limits.file_records; `loom play '
                '--max-bytes` raises it)')

    # -- the file ---------------------------------------------------------------------------
    def _open(self):
        if self._data is not None:
            return BytesIO(self._data)
        if self._stream is not None:
            self._stream.seek(0)
            return nullcontext(self._stream)
        try:
            return open_regular(self.path)
        except NotRegularError as exc:
            raise RecordingError(f'{self.path}: {exc.strerror}') from None
        except OSError as exc:
            raise RecordingError(f'{self.path}: cannot open: {exc.strerror or exc}') from None

    def messages(self) -> Iterator[RecordedMessage]:
        """RecordingError when the file stops being readable (after yielding what came before);
        UnfinishedError, one, when it was read to its end but was never finished."""
        with self._open() as stream:
            size = len(self._data) if self._data is not None else \
                os.fstat(stream.fileno()).st_size
            self._bytes_budget = self._bytes_left = self.limits.file_bytes(size)
            self._records_budget = self._records_left = self.limits.file_records(size)
            if stream.read(len(MAGIC)) != MAGIC:
                raise RecordingError(f'{self.path}: not an MCAP file (no MCAP magic at the start)')
            offset = len(MAGIC)
            while True:
                head = stream.read(RECORD_HEADER.size)
                if not head:
                    raise UnfinishedError(
                        f'{self.path}: ends at byte {offset} after its last whole record, '
                        'without a data end or footer record (cut short: never finished, its '
                        'recorder killed?); every record in it was read')
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
                if opcode in (Opcode.DATA_END, Opcode.FOOTER):
                    return   # the summary section after it repeats what the data section held
                self._spend_records(offset)
                if opcode == Opcode.MESSAGE:
                    message = self._top_message(stream, length)
                    if message is not None:
                        yield message
                elif opcode in (Opcode.SCHEMA, Opcode.CHANNEL, Opcode.CHUNK):
                    yield from self._record(opcode, memoryview(stream.read(length)), offset)
                else:   # attachments, metadata, indexes, unknown opcodes: never read
                    stream.seek(length, io.SEEK_CUR)
                offset += RECORD_HEADER.size + length

    def _top_message(self, stream, length: int) -> RecordedMessage | None:
        """A message outside chunks: its header first, its data read only when it is kept."""
        if length < MESSAGE_HEADER.size:
            return self._message(memoryview(stream.read(length)))
        head = stream.read(MESSAGE_HEADER.size)
        why = self._refusal(head, length - MESSAGE_HEADER.size)
        if why is not None:
            stream.seek(length - MESSAGE_HEADER.size, io.SEEK_CUR)
            return None
        return self._recorded(head, stream.read(length - MESSAGE_HEADER.size))

    def _record(self, opcode: int, body: memoryview, offset: int) -> Iterator[RecordedMessage]:
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

    def _schema(self, body: memoryview) -> None:
        try:
            schema_id, name, encoding, start, length = _schema_head(body)
        except (struct.error, ValueError) as exc:
            self.skip(BAD_RECORD, f'schema record: {type(exc).__name__}')
            return
        known = self._schemas.get(schema_id)
        if known is not None and (known.record.name, known.record.encoding) == (name, encoding) \
                and known.record.data == body[start:start + length]:
            return   # the same schema again (a writer repeating it): nothing new to hold
        if length > self.limits.max_schema_bytes:
            self.skip(SCHEMA_TOO_LARGE, f'schema {schema_id} ({name[:80]}): {length} bytes, over '
                                        f'the {self.limits.max_schema_bytes}-byte limit')
            record = Schema(id=schema_id, name='', encoding=encoding, data=b'')
            self._schemas[schema_id] = _KnownSchema(record, '', '')   # channels: unknown_type
            return
        if known is None and len(self._schemas) >= self.limits.max_channels:
            self.skip(TOO_MANY_SCHEMAS, f'more than {self.limits.max_channels} schemas')
            return
        if self._schema_bytes + len(body) > self.limits.max_schema_total_bytes:   # names too
            self.skip(TOO_MANY_SCHEMAS, f'schema {schema_id} ({name[:80]}): past '
                                        f'{self.limits.max_schema_total_bytes} bytes of schemas')
            self._schemas.pop(schema_id, None)
            return
        data = bytes(body[start:start + length])
        self._schema_bytes += len(body)
        try:
            text = data.decode('utf-8')
        except UnicodeDecodeError:
            text = ''
        self._schemas[schema_id] = _KnownSchema(
            Schema(id=schema_id, name=name, encoding=encoding, data=data), text,
            normalise_type(name) or '')

    def _channel(self, body: memoryview) -> None:
        try:
            parts = _channel_parts(body, self.limits)
        except (struct.error, ValueError) as exc:   # UnicodeDecodeError too
            self.skip(BAD_RECORD, f'channel record: {type(exc).__name__}')
            return
        if parts.id not in self.channels and len(self.channels) >= self.limits.max_channels:
            self.skip(TOO_MANY_CHANNELS, f'more than {self.limits.max_channels} channels')
            return
        metadata, cut = parts.metadata, parts.cut
        known = self.channels.get(parts.id)
        if known is not None and (known[0].topic, known[0].message_encoding,
                                  known[0].metadata) == (parts.topic, parts.encoding, metadata):
            held = 0   # the same channel again (a writer repeating it): nothing new to hold
        else:
            held = sum(len(k) + len(v) for k, v in metadata.items())
            if self._metadata_bytes + held > self.limits.max_metadata_total_bytes:
                total = self.limits.max_metadata_total_bytes
                metadata, held = {}, 0
                cut = cut or f'past {total} bytes of metadata in the file (all of it left out)'
        self._metadata_bytes += held
        if cut:
            self.skip(METADATA_CUT, f'channel {parts.id} ({parts.topic[:SHOWN_CHARS]}): metadata '
                                    f'cut: {cut}')
        schema = self._schemas.get(parts.schema_id)
        info = ChannelInfo(
            id=parts.id, topic=parts.topic, message_encoding=parts.encoding,
            type_name=schema.type_name if schema is not None else '',
            schema_encoding=schema.record.encoding if schema is not None else '',
            schema_text=schema.text if schema is not None else '',
            metadata=metadata, schema=schema.record if schema is not None else None)
        refusal = parts.refusal   # too long to be real: refused whatever the check
        if refusal is None and self.check is not None:
            refusal = structural_check(info)
        if refusal is None and self.check not in (None, structural_check):
            try:
                refusal = self.check(info)
            except Exception as exc:   # noqa: BLE001 - a checker's failure refuses the channel
                refusal = (UNKNOWN_TYPE, f'{info.topic}: {type(exc).__name__}: {exc}')
        self.channels[parts.id] = (info, refusal)

    def _refusal(self, head, data_bytes: int) -> tuple[str, str] | None:
        """Why a message of this header and data size is skipped (counted here), or None."""
        channel_id = MESSAGE_HEADER.unpack_from(head)[0]
        known = self.channels.get(channel_id)
        if known is None:
            why = UNKNOWN_CHANNEL, f'channel id {channel_id} was never defined'
        elif known[1] is not None:
            why = known[1]
        elif data_bytes > self.limits.max_message_bytes:
            why = TOO_LARGE, f'{known[0].topic}: {data_bytes + MESSAGE_HEADER.size} bytes'
        else:
            return None
        self.skip(*why)
        return why

    def _recorded(self, head, data: bytes) -> RecordedMessage:
        channel_id, sequence, log_time, publish_time = MESSAGE_HEADER.unpack_from(head)
        return RecordedMessage(self.channels[channel_id][0], log_time, publish_time, sequence,
                               data)

    def _message(self, body: memoryview) -> RecordedMessage | None:
        """A message inside a chunk (or a short one): its data copied only when it is kept."""
        if len(body) < MESSAGE_HEADER.size:
            self.skip(BAD_RECORD, f'message record of {len(body)} bytes')
            return None
        if self._refusal(body, len(body) - MESSAGE_HEADER.size) is not None:
            return None
        return self._recorded(body, bytes(body[MESSAGE_HEADER.size:]))

    def _chunk(self, body: memoryview, offset: int) -> Iterator[RecordedMessage]:
        try:
            size, crc, compression, records = _chunk_parts(body)
        except (struct.error, ValueError) as exc:
            self.skip(BAD_CHUNK, f'chunk at byte {offset}: {type(exc).__name__}: {exc}')
            return
        if size > self.limits.max_chunk_bytes:
            self.skip(BAD_CHUNK, f'chunk at byte {offset} claims {size} bytes, over the '
                                 f'{self.limits.max_chunk_bytes}-byte limit')
            return
        if size > self._bytes_left:
            raise RecordingError(
                f'{self.path}: chunk at byte {offset} would take the decompressed bytes past '
                f'{self._bytes_budget}, the budget for a file of its size (Limits.file_bytes; '
                '`loom play --max-bytes` raises it)')
        self._bytes_left -= size
        try:
            data = self._decompress(compression, records, size)
        except _Unsupported as exc:
            self.skip(UNSUPPORTED_COMPRESSION, str(exc))
            return
        except zstandard.ZstdError as exc:
            self.skip(BAD_CHUNK, f'chunk at byte {offset}: {exc}')
            return
        if len(data) != size or (crc and zlib.crc32(data) != crc):
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
            self._spend_records(offset)
            if opcode in (Opcode.MESSAGE, Opcode.SCHEMA, Opcode.CHANNEL):
                yield from self._record(opcode, view[pos:pos + length], offset)
            pos += length

    @staticmethod
    def _decompress(compression: str, records: memoryview, size: int):
        if compression == '':
            return records
        if compression != 'zstd':
            raise _Unsupported(f'chunk compression {compression[:40]!r} (this reader '
                               'takes zstd or none)')
        # Bounded: at most one byte more than the header claims, whatever the frame says.
        reader = zstandard.ZstdDecompressor().stream_reader(records)
        parts, want = [], size + 1
        while want > 0:
            part = reader.read(want)
            if not part:
                break
            parts.append(part)
            want -= len(part)
        return parts[0] if len(parts) == 1 else b''.join(parts)


def _string(view: memoryview, pos: int) -> tuple[str, int]:
    """A length-prefixed UTF-8 string at `pos` and the position after it (ValueError if cut)."""
    (length,) = LENGTH4.unpack_from(view, pos)
    pos += LENGTH4.size
    if length > len(view) - pos:
        raise ValueError('a string runs past the record')
    return str(view[pos:pos + length], 'utf-8'), pos + length


def _length(view: memoryview, pos: int) -> tuple[int, int]:
    """A length-prefixed string's length at `pos` and where it starts (ValueError if cut)."""
    (length,) = LENGTH4.unpack_from(view, pos)
    pos += LENGTH4.size
    if length > len(view) - pos:
        raise ValueError('a string runs past the record')
    return length, pos


@dataclass(frozen=True)
class _ChannelParts:
    """A channel record as read bounded: what a ChannelInfo needs, why the channel is refused
    whatever the check (None: it is not), and why its metadata was cut ('': it was not)."""

    id: int
    schema_id: int
    topic: str
    encoding: str
    metadata: dict
    refusal: tuple[str, str] | None
    cut: str


def _channel_parts(view: memoryview, limits: Limits) -> _ChannelParts:
    """A channel record parsed with every length checked before anything is decoded: a topic or
    encoding over its cap is not decoded (the channel is refused), at most
    `max_metadata_entries` metadata entries are read, each within the key and value caps; the
    rest of the map is skipped unread (ValueError when the record is malformed)."""
    channel_id, schema_id = CHANNEL_IDS.unpack_from(view, 0)
    length, pos = _length(view, CHANNEL_IDS.size)
    refusal = None
    if length > MAX_TOPIC_BYTES:
        shown = str(view[pos:pos + SHOWN_CHARS], 'utf-8', 'replace')
        topic = f'{shown}...'
        refusal = INVALID_TOPIC, (f'{shown!r}...: a topic of {length} bytes, longer than '
                                  f'{MAX_TOPIC_CHARS} characters')
    else:
        topic = str(view[pos:pos + length], 'utf-8')
    length, pos = _length(view, pos + length)
    if length > MAX_ENCODING_BYTES:
        encoding = ''
        refusal = refusal or (UNSUPPORTED_ENCODING, f'{topic[:SHOWN_CHARS]}: a message encoding '
                                                    f'of {length} bytes')
    else:
        encoding = str(view[pos:pos + length], 'utf-8')
    pos += length
    (map_bytes,) = LENGTH4.unpack_from(view, pos)
    pos += LENGTH4.size
    end = pos + map_bytes
    if end > len(view):
        raise ValueError('the metadata map runs past the record')
    metadata, cut, entries = {}, '', 0
    while pos < end:   # at most max_metadata_entries turns, whatever the map holds
        if entries >= limits.max_metadata_entries:
            cut = f'more than {limits.max_metadata_entries} entries'
            break
        entries += 1
        key_length, key_at = _length(view[:end], pos)
        value_length, value_at = _length(view[:end], key_at + key_length)
        pos = value_at + value_length
        if key_length > limits.max_metadata_key_bytes or \
                value_length > limits.max_metadata_value_bytes:
            cut = cut or (f'an entry of {key_length} + {value_length} bytes (keys at most '
                          f'{limits.max_metadata_key_bytes}, values '
                          f'{limits.max_metadata_value_bytes})')
            continue
        metadata[str(view[key_at:key_at + key_length], 'utf-8')] = \
            str(view[value_at:value_at + value_length], 'utf-8')
    return _ChannelParts(channel_id, schema_id, topic, encoding, metadata, refusal, cut)


def _schema_head(view: memoryview) -> tuple[int, str, str, int, int]:
    """(id, name, encoding, where its data starts, its length): nothing of the data copied."""
    (schema_id,) = SCHEMA_ID.unpack_from(view, 0)
    name, pos = _string(view, SCHEMA_ID.size)
    encoding, pos = _string(view, pos)
    (length,) = LENGTH4.unpack_from(view, pos)
    pos += LENGTH4.size
    if length > len(view) - pos:
        raise ValueError('schema data runs past the record')
    return schema_id, name, encoding, pos, length


def _chunk_parts(view: memoryview) -> tuple[int, int, str, memoryview]:
    """(uncompressed size, its CRC, compression, the compressed records) of a chunk record, the
    records a view into it (mcap's Chunk.read would copy them)."""
    _start, _end, size, crc = CHUNK_HEADER.unpack_from(view, 0)
    compression, pos = _string(view, CHUNK_HEADER.size)
    (length,) = LENGTH8.unpack_from(view, pos)
    pos += LENGTH8.size
    if length > len(view) - pos:
        raise ValueError('chunk records run past the record')
    return size, crc, compression, view[pos:pos + length]


class _Unsupported(ValueError):
    pass
