"""`loom forget` and `loom export` against recordings that lie or that name two subjects
(attack review): an event naming the subject in any `loom.subject` entry is the subject's (the
bus keeps the last entry, erasure took the first: `forget bob` kept an alice-then-bob event),
and recordings are read through the bounded replay reader, so a 65 KB file whose chunk expands
past its budget is said in the receipt and left alone instead of costing GiBs while forget
holds every storage lock."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile

import zstandard
from harness import FORGET_PEAK_SCRIPT
from mcap.reader import make_reader
from rclpy.serialization import serialize_message

from loom_msgs.msg import Event, EventBatch, KeyValue
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY
from loom_ros.cli.record import McapRecorder
from loom_ros.replay.mcap_source import MAGIC, MIN_FILE_BYTES
from loom_ros.storage.backend.local import LocalObjectStore
from loom_ros.storage.erasure import STORED_RECORDINGS, export, forget
from loom_ros.storage.layout import StorageLayout

ALICE, BOB = 'alice', 'bob'
TOPIC, BATCHED = '/loom/mic/primary/speech', '/loom/speech/batched'
EXPANDS_TO = MIN_FILE_BYTES + (16 << 20)   # a small file's chunk past its decompression budget
BLOCK = 8 << 20                            # zeros compressed a block at a time


def _event(i: int, subjects: list[str], text: str) -> Event:
    return Event(id=f'e{i}', type='speech', source='mic', timestamp_ms=1, confidence=1.0,
                 payload=text.encode(),
                 metadata=[KeyValue(key=SUBJECT_METADATA_KEY, value=s) for s in subjects])


def _recorded(layout: StorageLayout) -> None:
    """Alice's and bob's events in one recording, two of them naming both (alice first)."""
    recorder = McapRecorder(layout.recordings / 'run.mcap')
    recorder.add_topic(TOPIC, 'loom_msgs/msg/Event')
    recorder.add_topic(BATCHED, 'loom_msgs/msg/EventBatch')
    for i, subjects, text in ((1, [ALICE, BOB], 'BOB_CANARY_DUAL'), (2, [BOB], 'BOB_CANARY_ONE'),
                              (3, [ALICE], 'ALICE_CANARY_ONE')):
        recorder.write(TOPIC, serialize_message(_event(i, subjects, text)))
    recorder.write(BATCHED, serialize_message(EventBatch(events=[
        _event(4, [ALICE, BOB], 'BOB_CANARY_BATCHED'),
        _event(5, [ALICE], 'ALICE_CANARY_BATCHED')])))
    recorder.close()


def _payloads(data: bytes) -> bytes:
    """Every message's bytes of a (small, trusted) recording."""
    return b'\x00'.join(m.data for _s, _c, m in make_reader(io.BytesIO(data)).iter_messages())


def _expanding(size: int) -> bytes:
    """An MCAP of a few KB: an Event channel and one zstd chunk that expands to `size` bytes (one
    message of zeros), as a mailed file saved into the root would be."""
    def rec(opcode: int, body: bytes) -> bytes:
        return struct.pack('<BQ', opcode, len(body)) + body

    def text(value: bytes) -> bytes:
        return struct.pack('<I', len(value)) + value

    compressor = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=size)
    parts = [compressor.compress(struct.pack('<BQHIQQ', 0x05, size - 9, 1, 0, 0, 0))]
    left = size - 31
    while left:
        parts.append(compressor.compress(bytes(min(left, BLOCK))))
        left -= min(left, BLOCK)
    parts.append(compressor.flush())
    frame = b''.join(parts)
    chunk = struct.pack('<QQQI', 0, 0, size, 0) + text(b'zstd') + struct.pack('<Q', len(frame))
    return (MAGIC + rec(0x01, text(b'ros2') + text(b'x'))
            + rec(0x03, struct.pack('<H', 1) + text(b'loom_msgs/msg/Event') + text(b'ros2msg')
                  + text(b''))
            + rec(0x04, struct.pack('<HH', 1, 1) + text(TOPIC.encode()) + text(b'cdr')
                  + struct.pack('<I', 0))
            + rec(0x06, chunk + frame) + rec(0x0F, struct.pack('<I', 0))
            + rec(0x02, struct.pack('<QQI', 0, 0, 0)) + MAGIC)   # data end, footer


def test_an_event_naming_the_subject_in_any_entry_is_exported_and_erased(tmp_path):
    layout = StorageLayout.at(tmp_path)
    _recorded(layout)
    counts = export(layout, BOB, tmp_path / 'bob.zip')
    with zipfile.ZipFile(tmp_path / 'bob.zip') as archive:
        theirs = _payloads(archive.read('media/run.mcap'))
    assert counts['recording_messages'] == 3
    assert all(c in theirs for c in (b'BOB_CANARY_DUAL', b'BOB_CANARY_ONE',
                                      b'BOB_CANARY_BATCHED'))
    assert b'ALICE_CANARY' not in theirs
    receipt = forget(layout, BOB, requested_by='dpo:test')
    assert receipt.counts['recording_messages'] == 3
    left = _payloads((layout.recordings / 'run.mcap').read_bytes())
    assert b'BOB_CANARY' not in left
    assert b'ALICE_CANARY_ONE' in left and b'ALICE_CANARY_BATCHED' in left


def test_a_recording_over_its_budget_is_said_and_left_as_it_is(tmp_path):
    layout = StorageLayout.at(tmp_path)
    _recorded(layout)
    bomb = _expanding(EXPANDS_TO)
    assert len(bomb) < 64 * 1024
    (layout.recordings / 'mailed.mcap').write_bytes(bomb)
    LocalObjectStore(layout.objects).put(f'{STORED_RECORDINGS}mailed.mcap', bomb)
    export(layout, BOB, tmp_path / 'bob.zip')
    with zipfile.ZipFile(tmp_path / 'bob.zip') as archive:
        said = json.loads(archive.read('subject.json'))['not_covered']
    assert any('mailed.mcap: not read' in line and 'budget' in line for line in said), said
    receipt = forget(layout, BOB, requested_by='dpo:test')
    mailed = [line for line in receipt.not_covered if 'mailed.mcap' in line]
    assert len(mailed) == 2 and all('not read, not changed' in line and 'budget' in line
                                    for line in mailed), mailed
    assert (layout.recordings / 'mailed.mcap').read_bytes() == bomb
    assert receipt.counts['recording_messages'] == 3   # the other recording is still erased
    assert b'BOB_CANARY' not in _payloads((layout.recordings / 'run.mcap').read_bytes())




def test_forget_of_a_root_with_an_expanding_recording_stays_small(tmp_path):
    layout = StorageLayout.at(tmp_path)
    layout.recordings.mkdir(parents=True)
    (layout.recordings / 'mailed.mcap').write_bytes(_expanding(EXPANDS_TO))
    out = subprocess.run([sys.executable, '-c', FORGET_PEAK_SCRIPT, str(tmp_path), ALICE],
                         capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result['grew_kib'] < 32 * 1024, result   # the old reader decompressed the 80 MiB
    assert any('mailed.mcap: not read' in line for line in result['receipt']['not_covered'])
