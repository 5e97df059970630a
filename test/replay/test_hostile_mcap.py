"""A hostile MCAP file never crashes the reader, never makes it allocate what a length field
claims, and every message it does not play is counted under its reason: lengths over the limits
or past the file's end, a zstd bomb, chunks that lie about their size, unknown or look-alike
types, schemas of another definition, topic names ROS refuses, messages on undefined channels."""
from __future__ import annotations

import resource

import pytest
import zstandard

from mcap.records import Channel, Chunk

from mcap_files import (
    OPCODES, T0, channel, chunk, message, raw, record_bytes, recorded, string_cdr,
    string_schema, write,
)
from loom_ros.replay.mcap_source import (
    BAD_CHUNK, BAD_RECORD, INVALID_TOPIC, SCHEMA_MISMATCH, TOO_LARGE, UNKNOWN_CHANNEL,
    UNKNOWN_TYPE, UNSUPPORTED_COMPRESSION, UNSUPPORTED_ENCODING, Limits, McapSource,
    RecordingError, topic_problem,
)
from loom_ros.replay.ros import RosTypes


def read(path, limits=Limits()):
    source = McapSource(path, RosTypes(), limits)
    return [(m.topic, m.data) for m in source.messages()], source


def good(n=2):
    """A valid std_msgs/String channel (its real schema) and n messages on it."""
    from loom_ros.cli.record import ros2msg_schema
    return [string_schema(text=ros2msg_schema('std_msgs/msg/String')), channel(1, '/ok'),
            *(message(1, string_cdr(f'm{i}'), T0 + i) for i in range(n))]


def test_a_file_that_is_not_mcap_is_refused_with_the_reason(tmp_path):
    path = tmp_path / 'x.mcap'
    path.write_bytes(b'PK\x03\x04 a zip file, not a recording')
    with pytest.raises(RecordingError, match='not an MCAP file'):
        read(path)


def test_record_lengths_over_the_limit_or_past_the_end_stop_without_allocating(tmp_path):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    huge = write(tmp_path / 'huge.mcap', *good(), raw(OPCODES.MESSAGE, b'x' * 30, 2**62),
                 end=False)
    with pytest.raises(RecordingError, match='claims 4611686018427387904 bytes, over the'):
        read(huge)
    past = write(tmp_path / 'past.mcap', *good(), raw(OPCODES.MESSAGE, b'x' * 30, 10_000),
                 end=False)
    messages = []
    with pytest.raises(RecordingError, match='file has 30 left'):
        for m in McapSource(past, RosTypes()).messages():
            messages.append(m)
    assert len(messages) == 2   # what came before the damage was read
    cut = write(tmp_path / 'cut.mcap', *good(), end=False)
    with pytest.raises(RecordingError, match='cut short'):
        read(cut)
    # No allocation of what the lengths claimed (4 EiB): the process grew by far less.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000   # KiB


def test_lying_chunks_and_a_zstd_bomb_are_skipped_and_the_file_goes_on(tmp_path):
    inner = message(1, string_cdr('in a chunk'), T0 + 5)
    bomb = zstandard.compress(b'\0' * (64 << 20))   # 64 MiB of zeros in a few KiB
    path = write(tmp_path / 'chunks.mcap', *good(1),
                 chunk(inner, claimed_size=2**60),                     # over the limit
                 chunk(inner, claimed_size=len(inner) - 3),           # smaller than it is
                 raw(OPCODES.CHUNK, chunk(inner)[9:].replace(b'zstd', b'lz4\0', 1)),
                 chunk(inner),                                         # a good one
                 message(1, string_cdr('after'), T0 + 9))
    messages, source = read(path, Limits(max_chunk_bytes=1 << 20))
    assert [t for t, _ in messages] == ['/ok', '/ok', '/ok']
    assert source.skipped[BAD_CHUNK] == 2, source.examples
    assert source.skipped[UNSUPPORTED_COMPRESSION] == 1
    # The bomb claims 100 bytes: at most 101 are decompressed, then it is refused.
    bomb_chunk = record_bytes(Chunk(compression='zstd', data=bomb, message_start_time=T0,
                                    message_end_time=T0, uncompressed_crc=0,
                                    uncompressed_size=100))
    bomb_path = write(tmp_path / 'bomb.mcap', *good(1), bomb_chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    messages, source = read(bomb_path)
    assert len(messages) == 1 and source.skipped[BAD_CHUNK] == 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 32_000   # KiB


def test_channels_that_cannot_be_played_are_counted_per_message(tmp_path):
    from loom_ros.cli.record import ros2msg_schema
    real = ros2msg_schema('std_msgs/msg/String')
    path = write(
        tmp_path / 'channels.mcap', *good(1),
        string_schema(2, 'evil_pkg/msg/Payload', 'string data\n'), channel(2, '/evil', 2),
        string_schema(3, 'os/system', 'string data\n'), channel(3, '/os', 3),
        string_schema(4, 'std_msgs/msg/String', 'int64 data\n'), channel(4, '/other_def', 4),
        channel(5, '/bad topic!'), channel(6, '/a__b'), channel(7, '/9lives'),
        string_schema(8, 'std_msgs/msg/String', real.replace('string data', 'string  data  # c')),
        channel(8, '/same_def', 8),
        *(message(c, string_cdr('x')) for c in (2, 3, 4, 5, 6, 7, 8, 42)),
        raw(OPCODES.MESSAGE, b'\x01\x00short'))
    messages, source = read(path)
    assert [t for t, _ in messages] == ['/ok', '/same_def']   # comments and spacing aside
    assert dict(source.skipped) == {UNKNOWN_TYPE: 2, SCHEMA_MISMATCH: 1, INVALID_TOPIC: 3,
                                    UNKNOWN_CHANNEL: 1, BAD_RECORD: 1}, source.examples
    assert 'evil_pkg' in source.examples[UNKNOWN_TYPE]


def test_oversized_messages_and_other_encodings_are_skipped(tmp_path):
    json_channel = record_bytes(Channel(id=2, topic='/json', message_encoding='json',
                                        metadata={}, schema_id=1))
    path = write(tmp_path / 'big.mcap', *good(1), message(1, string_cdr('y' * 5000)),
                 json_channel, message(2, b'{}'))
    messages, source = read(path, Limits(max_message_bytes=1000))
    assert len(messages) == 1
    assert source.skipped == {TOO_LARGE: 1, UNSUPPORTED_ENCODING: 1}


def test_a_real_recording_reads_back_whole(tmp_path):
    from std_msgs.msg import String
    path = recorded(tmp_path / 'rec.mcap', [('/chatter', 'std_msgs/msg/String',
                                             String(data=f'hello {i}'), T0 + i * 1000)
                                            for i in range(50)])
    messages, source = read(path)
    assert len(messages) == 50 and not source.skipped
    assert messages[0][1] == string_cdr('hello 0')


@pytest.mark.parametrize('name, why', [
    ('/loom/camera/front', None), ('relative/name', None), ('', 'empty'),
    ('/a//b', 'tokens'), ('/a/', 'tokens'), ('/a b', 'tokens'), ('/a__b', "repeats '_'"),
    ('/1a', 'tokens'), ('/' + 'a' * 300, 'longer'), ('/ü', 'tokens')])
def test_topic_names_follow_ros_rules(name, why):
    problem = topic_problem(name)
    assert (problem is None) if why is None else (why in problem)
