"""A recording of a few KB costs the reader no more than a budget proportional to its size
(attack review: one 1 MiB schema named by 4096 channels took 4 GiB and 10 s; one chunk of 17 M
tiny records took 49 s; three 512 MiB chunks took 1 GiB): schemas are decoded once and their
text held is capped (what is dropped is counted), decompressed bytes and records per file have
a budget, and a message over the limit is skipped before it is copied."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from mcap_files import (
    OPCODES, T0, channel, chunk, message, raw, recorded, string_cdr, string_schema, write,
)
from loom_ros.replay.mcap_source import (
    MIN_FILE_BYTES, MIN_FILE_RECORDS, SCHEMA_TOO_LARGE, TOO_LARGE, TOO_MANY_SCHEMAS,
    UNKNOWN_CHANNEL, UNKNOWN_TYPE, Limits, McapSource, RecordingError,
)

MIB = 1 << 20
UNKNOWN_OPCODE = 0x80   # a record type the reader ignores (user opcodes start at 0x80)


def _read(path, limits=Limits()):
    source = McapSource(path, limits=limits)
    return [m.data for m in source.messages()], source


def _good() -> list[bytes]:
    """A std_msgs/String channel (its real schema) and one message on it."""
    from loom_ros.cli.record import ros2msg_schema
    return [string_schema(text=ros2msg_schema('std_msgs/msg/String')), channel(1, '/ok'),
            message(1, string_cdr('before'))]


def test_a_schema_named_by_many_channels_is_decoded_once_and_shared(tmp_path):
    text = 'string data\n' + '# ' + 'x' * (64 * 1024) + '\n'
    records = string_schema(1, 'std_msgs/msg/String', text) + b''.join(
        channel(i, f'/t{i}') for i in range(1, 513))
    path = write(tmp_path / 'fanout.mcap', chunk(records))
    _messages, source = _read(path)
    texts = {id(info.schema_text) for info, _refusal in source.channels.values()}
    assert len(source.channels) == 512 and len(texts) == 1   # one copy, not 512 (32 MiB)
    assert not source.skipped


def test_schemas_blanked_for_size_or_dropped_past_the_caps_are_counted(tmp_path):
    limits = Limits()
    near_cap = limits.max_schema_bytes - 64   # 16 such records fit in 16 MiB, not 17
    schemas = [string_schema(i, 'std_msgs/msg/String', 'string data\n#'.ljust(near_cap, 'x'))
               for i in range(1, 18)]
    too_big = string_schema(30, 'std_msgs/msg/String', 'x' * (limits.max_schema_bytes + 1))
    path = write(tmp_path / 'schemas.mcap', chunk(b''.join(schemas) + too_big + channel(1, '/a')
                                                  + channel(2, '/b', 30)),
                 message(2, string_cdr('on the blanked schema')))
    _messages, source = _read(path)
    assert source.skipped[SCHEMA_TOO_LARGE] == 1, source.examples
    assert source.skipped[TOO_MANY_SCHEMAS] == 1, source.examples
    assert source.skipped[UNKNOWN_TYPE] == 1   # its channel's message
    held = {id(s.text): len(s.text) for s in source._schemas.values()}
    assert sum(held.values()) <= limits.max_schema_total_bytes
    # the count of schemas is capped as channels are, and said
    few = write(tmp_path / 'few.mcap', *(string_schema(i) for i in range(1, 6)))
    _messages, source = _read(few, Limits(max_channels=4))
    assert source.skipped[TOO_MANY_SCHEMAS] == 1


def test_a_file_of_tiny_records_stops_at_its_record_budget(tmp_path):
    # 300,000 records of 31 bytes on an undefined channel: 9 MB decompressed, 16 KB of file.
    tiny = raw(OPCODES.MESSAGE, struct.pack('<HIQQ', 7, 0, 0, 0))
    path = write(tmp_path / 'tiny.mcap', *_good(), chunk(tiny * 300_000))
    assert path.stat().st_size < 64 * 1024
    source, yielded = McapSource(path), []
    with pytest.raises(RecordingError, match='records by byte .*Limits.file_records'):
        for m in source.messages():
            yielded.append(m.data)
    assert yielded == [string_cdr('before')]   # what came before was read
    assert source.skipped[UNKNOWN_CHANNEL] < MIN_FILE_RECORDS


def test_the_record_budget_grows_with_the_file(tmp_path):
    from std_msgs.msg import String
    path = recorded(tmp_path / 'rec.mcap', [('/chatter', 'std_msgs/msg/String',
                                             String(data=f'{i}'), T0 + i) for i in range(2000)])
    messages, source = _read(path, Limits(min_file_records=100))   # a file's size allows more
    assert len(messages) == 2000 and not source.skipped
    with pytest.raises(RecordingError, match='records'):
        _read(path, Limits(min_file_records=100, file_records_per_byte=0))


def test_decompressed_bytes_past_the_file_budget_stop_the_reading(tmp_path):
    # Three chunks of 30 MiB of zeros (in a record the reader ignores): 90 MiB from a few KB,
    # over the 64 MiB a small file may make it decompress.
    payload = raw(UNKNOWN_OPCODE, bytes(30 * MIB - 9))
    zeros = chunk(payload)
    del payload
    path = write(tmp_path / 'zeros.mcap', *_good(), zeros, message(1, string_cdr('one')), zeros,
                 message(1, string_cdr('two')), zeros, message(1, string_cdr('three')))
    assert 3 * 30 * MIB > MIN_FILE_BYTES > 2 * 30 * MIB
    source, yielded = McapSource(path), []
    with pytest.raises(RecordingError, match='past 67108864, the budget'):
        for m in source.messages():
            yielded.append(m.data)
    assert yielded == [string_cdr(t) for t in ('before', 'one', 'two')]


# Reads the file of argv[1] with a 1 MiB message limit in a fresh process and prints how much
# the reading grew its peak RSS (KiB; VmHWM: ru_maxrss keeps the forking parent's peak) and what
# it skipped.
_MEASURE = '''
import json, sys
from loom_ros.replay.mcap_source import Limits, McapSource

def peak():
    with open('/proc/self/status') as status:
        return next(int(line.split()[1]) for line in status if line.startswith('VmHWM:'))

source = McapSource(sys.argv[1], limits=Limits(max_message_bytes=1 << 20))
before = peak()
n = sum(1 for _ in source.messages())
print(json.dumps({'grew_kib': peak() - before, 'read': n, 'skipped': dict(source.skipped)}))
'''


def test_a_message_over_the_limit_in_a_chunk_is_skipped_before_it_is_copied(tmp_path):
    big = message(1, bytes(48 * MIB))
    path = write(tmp_path / 'big.mcap', *_good(), chunk(big))
    del big
    out = subprocess.run([sys.executable, '-c', _MEASURE, str(path)], capture_output=True,
                         text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result['read'] == 1 and result['skipped'] == {TOO_LARGE: 1}
    # the chunk itself (48 MiB) is held once; the old reader copied the record too (96 MiB)
    assert result['grew_kib'] < 72 * 1024, result
