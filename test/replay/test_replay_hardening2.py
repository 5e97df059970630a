"""Record and replay against the rest of an attack review, each reproduced on real files and
real processes: a small MCAP's channel metadata and topics no longer reach memory unbounded
(cut to caps, counted); `loom forget` streams a recording into a new file beside it and renames
it only when whole (a forget killed mid-rewrite leaves the original, and the next one removes
what it left), a stored recording too; `loom record` writes `<name>.partial.mcap` and renames it
on a clean finish (a killed recorder leaves a partial file that view and forget read to its
end, and forget leaves it alone while the recorder runs); `loom view` checks the file it opened,
not the name; `loom play --max-bytes` plays a recording that compresses past its budget."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from mcap.records import Channel

from harness import FORGET_PEAK_SCRIPT, REPO, WAIT_LIMIT_S, LinePeer, loom_cli
from mcap_files import T0, chunk, message, record_bytes, recorded, string_cdr, string_schema, write
from loom_ros.replay.mcap_source import (
    INVALID_TOPIC, METADATA_CUT, MIN_FILE_BYTES, Limits, McapSource, RecordingError,
    UnfinishedError,
)

MIB = 1 << 20
ALICE, BOB = 'alice', 'bob'
TOPIC = '/loom/mic/primary/speech'
PAYLOAD = 64 * 1024          # random bytes per recorded event: 16 fill a chunk (1 MiB)
KILLED_EVENTS = 40           # written before the recorder is killed: 2 chunks on disk, 1 not
DURABLE = {'loom.durability': 'transient_local'}


def _chan(channel_id: int, topic: str, metadata: dict) -> bytes:
    return record_bytes(Channel(id=channel_id, topic=topic, message_encoding='cdr',
                                metadata=metadata, schema_id=1))


def _held(source: McapSource) -> int:
    """Bytes of channel metadata (keys and values) the reader holds."""
    return sum(len(k) + len(v) for info, _ in source.channels.values()
               for k, v in info.metadata.items())


def _metadata_flood(path, channels: int = 48, per_chunk: int = 4):
    """A few KB: `channels` channels, each with 64 metadata entries of 16 KiB (every one within
    the per-entry cap: 48 MiB of metadata in all), `per_chunk` to a zstd chunk."""
    value = 'v' * (16 << 10)
    records = [string_schema()]
    for first in range(1, channels + 1, per_chunk):
        records.append(chunk(b''.join(
            _chan(i, f'/flood/c{i}', {f'k{j:02d}': value for j in range(64)})
            for i in range(first, first + per_chunk))))
    return write(path, *records)


def test_channel_metadata_and_topics_are_cut_to_their_caps_and_counted(tmp_path):
    limits = Limits()
    path = write(tmp_path / 'meta.mcap', string_schema(), chunk(b''.join([
        _chan(1, '/ok', DURABLE),
        _chan(2, '/many', {f'k{i}': 'x' for i in range(10_000)}),
        _chan(3, '/big', {**DURABLE, 'huge': 'y' * MIB, 'z' * 4096: 'key too long'}),
        _chan(4, '/t' + 'x' * 100_000, DURABLE),
        *(message(i, string_cdr(f'on {i}')) for i in (1, 2, 3, 4))])))
    assert path.stat().st_size < 16 * 1024   # a mailed file of a few KB
    source = McapSource(path, None)           # check=None: a copying tool (forget, export)
    assert [m.topic for m in source.messages()] == ['/ok', '/many', '/big']
    infos = {cid: info for cid, (info, _) in source.channels.items()}
    assert infos[1].metadata == DURABLE
    assert len(infos[2].metadata) == limits.max_metadata_entries
    assert infos[3].metadata == DURABLE   # the oversized entries cut, the rest kept
    assert len(infos[4].topic) <= 100 and source.channels[4][1][0] == INVALID_TOPIC
    assert source.skipped == {METADATA_CUT: 2, INVALID_TOPIC: 1}, source.skipped
    assert 'more than 64 entries' in source.examples[METADATA_CUT]
    assert len(source.examples[INVALID_TOPIC]) <= 200


def test_metadata_held_for_one_file_has_a_cap(tmp_path):
    limits = Limits()
    path = _metadata_flood(tmp_path / 'flood.mcap')
    assert path.stat().st_size < 64 * 1024
    source = McapSource(path, None)
    assert list(source.messages()) == [] and len(source.channels) == 48
    assert _held(source) <= limits.max_metadata_total_bytes
    assert source.skipped[METADATA_CUT] >= 47, source.skipped   # all but the first fits
    assert 'past 1048576 bytes of metadata' in source.examples[METADATA_CUT]


# Reads argv[1] with check=None in a fresh process; prints how much the reading grew its peak
# RSS (KiB; VmHWM) and how many channels it held.
_READ = '''
import json, sys
from loom_ros.replay.mcap_source import McapSource

def peak():
    with open('/proc/self/status') as status:
        return next(int(line.split()[1]) for line in status if line.startswith('VmHWM:'))

before = peak()
source = McapSource(sys.argv[1], None)
list(source.messages())
print(json.dumps({'grew_kib': peak() - before, 'channels': len(source.channels)}))
'''


def test_reading_a_metadata_flood_stays_small(tmp_path):
    path = _metadata_flood(tmp_path / 'flood.mcap')
    out = subprocess.run([sys.executable, '-c', _READ, str(path)], capture_output=True,
                         text=True, timeout=WAIT_LIMIT_S, check=True, cwd=REPO)
    result = json.loads(out.stdout)
    assert result['channels'] == 48
    assert result['grew_kib'] < 24 * 1024, result   # the old reader held all 48 MiB


# -- the recorder's partial file ----------------------------------------------------------------
def _event(i: int, subject: str, payload: bytes):
    from loom_msgs.msg import Event, KeyValue

    from loom_ros.bus.privacy import SUBJECT_METADATA_KEY
    return Event(id=f'e{i}', type='speech', source='mic', timestamp_ms=1, confidence=1.0,
                 payload=payload, metadata=[KeyValue(key=SUBJECT_METADATA_KEY, value=subject)])


def _subject_of(i: int) -> str:
    return BOB if i % 2 else ALICE


# Records KILLED_EVENTS events (odd ones bob's, each with a marker and random bytes) into argv[1]
# with the real recorder, says so, then waits on stdin: the test kills it there.
_RECORDER = f'''
import os, sys
from rclpy.serialization import serialize_message
from loom_msgs.msg import Event, KeyValue
from loom_ros.cli.record import McapRecorder

recorder = McapRecorder(sys.argv[1])
recorder.add_topic({TOPIC!r}, 'loom_msgs/msg/Event')
for i in range({KILLED_EVENTS}):
    who = {BOB!r} if i % 2 else {ALICE!r}
    payload = f'CANARY_{{who}}_{{i:03d}}'.encode() + os.urandom({PAYLOAD})
    recorder.write({TOPIC!r}, serialize_message(Event(
        id=f'e{{i}}', type='speech', source='mic', timestamp_ms=1, payload=payload,
        metadata=[KeyValue(key='loom.subject', value=who)])), {T0} + i)
print('written', flush=True)
sys.stdin.readline()
'''


def _payloads(path) -> list[bytes]:
    from rclpy.serialization import deserialize_message

    from loom_msgs.msg import Event
    out = []
    try:
        for m in McapSource(path, None).messages():
            out.append(bytes(deserialize_message(m.data, Event).payload[:16]))
    except UnfinishedError:
        pass
    return out


def test_a_killed_recorder_leaves_a_partial_file_view_and_forget_read_to_its_end(tmp_path):
    from loom_ros.storage.erasure import export, forget, recording_files
    from loom_ros.storage.layout import StorageLayout
    layout = StorageLayout.at(tmp_path / 'root')
    final = layout.recordings / 'run.mcap'
    partial = layout.recordings / 'run.partial.mcap'
    child = LinePeer('recorder', ['-c', _RECORDER, str(final)], dict(os.environ))
    try:
        child.wait_line(lambda line: line == 'written', 'the events written')
        assert partial.is_file() and not final.exists()   # the old recorder wrote run.mcap
        assert partial in recording_files(layout)          # where forget looks
        # While the recorder runs (its lock held), forget leaves its file alone and says so.
        before = partial.read_bytes()
        receipt = forget(layout, BOB, requested_by='dpo:test')
        assert any('run.partial.mcap: being written by a running loom record' in line
                   for line in receipt.not_covered), receipt.not_covered
        assert partial.read_bytes() == before
        child.popen.send_signal(signal.SIGKILL)
        assert child.popen.wait(timeout=WAIT_LIMIT_S) == -signal.SIGKILL
    finally:
        child.close()
    assert not final.exists()
    # Whole records only: the chunks flushed before the kill read back, then UnfinishedError.
    read = []
    with pytest.raises(UnfinishedError, match='after its last whole record'):
        for m in McapSource(partial, None).messages():
            read.append(m)
    assert 16 <= len(read) < KILLED_EVENTS, len(read)
    bobs = sum(1 for i in range(len(read)) if _subject_of(i) == BOB)
    # loom view draws a partial file to its end and says it was unfinished (not an error).
    view = subprocess.run(
        [sys.executable, *loom_cli('view', '--recording', str(partial), '--headless', '--save',
                                   str(tmp_path / 'p.rrd'))],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT_LIMIT_S)
    assert view.returncode == 0, view.stderr[-2000:]
    loaded = [json.loads(line) for line in view.stdout.splitlines()
              if line.startswith('{"recording"')]
    assert loaded and 'error' not in loaded[0] and 'unfinished' in loaded[0], view.stdout
    # export and forget read it to its end: every one of bob's events there is found.
    assert export(layout, BOB, tmp_path / 'bob.zip')['recording_messages'] == bobs
    receipt = forget(layout, BOB, requested_by='dpo:test')
    assert receipt.counts['recording_messages'] == bobs
    assert not [line for line in receipt.not_covered if 'run.partial' in line]
    left = _payloads(partial)
    assert len(left) == len(read) - bobs and all(p.startswith(b'CANARY_alice') for p in left)
    assert sorted(p.name for p in layout.recordings.iterdir()) == ['run.partial.mcap']


def test_a_clean_finish_renames_and_never_replaces_a_file_appearing_meanwhile(tmp_path):
    from std_msgs.msg import String

    from loom_ros.cli.record import McapRecorder, OutputError
    path = recorded(tmp_path / 'a.mcap', [('/x', 'std_msgs/msg/String', String(data='a'), T0)])
    assert path.is_file() and not (tmp_path / 'a.partial.mcap').exists()
    assert [m.data for m in McapSource(path).messages()] == [string_cdr('a')]
    # The default output (exclusive) never takes the name of a file that appeared meanwhile.
    recorder = McapRecorder(tmp_path / 'b.mcap', exclusive=True)
    assert recorder.partial == str(tmp_path / 'b.partial.mcap')
    (tmp_path / 'b.mcap').write_bytes(b'theirs')
    with pytest.raises(OutputError, match='kept as'):
        recorder.close()
    assert (tmp_path / 'b.mcap').read_bytes() == b'theirs'
    assert list(McapSource(tmp_path / 'b.partial.mcap').messages()) == []   # finished, kept


# -- forget's rewrite ---------------------------------------------------------------------------
def _two_subjects(path, events: int, payload: int = 256):
    """A recording by the real recorder: `events` events, odd ones bob's, each marked."""
    from rclpy.serialization import serialize_message

    from loom_ros.cli.record import McapRecorder
    recorder = McapRecorder(path)
    recorder.add_topic(TOPIC, 'loom_msgs/msg/Event')
    for i in range(events):
        who = _subject_of(i)
        recorder.write(TOPIC, serialize_message(_event(
            i, who, f'CANARY_{who}_{i:03d}'.encode() + os.urandom(payload))), T0 + i)
    recorder.close()
    return path


# Forgets bob under argv[1], killed (SIGKILL, by itself) at the rename of the rewrite it made:
# the rewrite written whole, the original not yet replaced.
_KILLED_FORGET = '''
import os, signal, sys
from loom_ros.storage.erasure import forget
from loom_ros.storage.layout import StorageLayout

def hook(event, args):
    if event == 'os.rename' and os.path.basename(args[0]).startswith('.run.mcap.'):
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
forget(StorageLayout.at(sys.argv[1]), 'bob', requested_by='dpo:test')
'''


def test_a_forget_killed_mid_rewrite_leaves_the_original_and_the_next_removes_its_leftover(
        tmp_path):
    from loom_ros.storage.erasure import forget, recording_files
    from loom_ros.storage.layout import StorageLayout
    layout = StorageLayout.at(tmp_path)
    layout.recordings.mkdir(parents=True)
    original = _two_subjects(layout.recordings / 'run.mcap', 20)
    os.chmod(original, 0o640)
    before = original.read_bytes()
    done = subprocess.run([sys.executable, '-c', _KILLED_FORGET, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=WAIT_LIMIT_S)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert original.read_bytes() == before
    left = [p for p in layout.recordings.iterdir() if p != original]
    assert len(left) == 1 and left[0].name.startswith('.run.mcap.'), left
    assert left[0].name.endswith('.erasing')
    assert left[0].stat().st_mode & 0o777 & ~0o640 == 0   # 0600, the original's mode at the end
    assert recording_files(layout) == [original]   # the leftover is never taken for one
    receipt = forget(layout, BOB, requested_by='dpo:test')
    assert receipt.counts['recording_messages'] == 10
    assert sorted(layout.recordings.iterdir()) == [original], list(layout.recordings.iterdir())
    assert (original.stat().st_mode & 0o777) == 0o640   # the original's mode kept
    assert all(p.startswith(b'CANARY_alice') for p in _payloads(original))
    assert len(_payloads(original)) == 10




def test_forget_streams_a_stored_recording_instead_of_loading_it_whole(tmp_path):
    from loom_ros.storage.backend.local import LocalObjectStore
    from loom_ros.storage.erasure import STORED_RECORDINGS
    from loom_ros.storage.layout import StorageLayout
    layout = StorageLayout.at(tmp_path / 'root')
    events = 48 * MIB // PAYLOAD   # 48 MiB that do not compress
    data = _two_subjects(tmp_path / 'run.mcap', events, PAYLOAD).read_bytes()
    assert len(data) > 48 * MIB
    store = LocalObjectStore(layout.objects)
    key = f'{STORED_RECORDINGS}run.mcap'
    store.put(key, data)
    out = subprocess.run([sys.executable, '-c', FORGET_PEAK_SCRIPT, str(layout.root), BOB], cwd=REPO,
                         capture_output=True, text=True, timeout=WAIT_LIMIT_S * 3, check=True)
    result = json.loads(out.stdout)
    assert result['receipt']['counts']['recording_messages'] == events // 2
    assert not [line for line in result['receipt']['not_covered'] if 'run.mcap' in line]
    # The old forget held the object, its rewrite and a copy of that: over 140 MiB.
    assert result['grew_kib'] < 32 * 1024, result['grew_kib']
    assert store.list(STORED_RECORDINGS) == [(key, store.size(key))]   # no leftover listed
    assert sorted(p.name for p in (layout.objects / STORED_RECORDINGS).iterdir()) == ['run.mcap']
    stored = layout.objects / key
    left = _payloads(stored)
    assert len(left) == events // 2 and all(p.startswith(b'CANARY_alice') for p in left)


# -- loom view opens, then checks what it opened ------------------------------------------------
def test_view_reads_the_file_it_checked_not_what_the_name_leads_to_later(tmp_path, capsys):
    from std_msgs.msg import String

    from loom_ros.cli import main
    from loom_ros.cli.view import open_recording
    path = recorded(tmp_path / 'rec.mcap', [('/x', 'std_msgs/msg/String', String(data='a'), T0)])
    stream, problem = open_recording(str(path))
    assert problem is None
    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo)
    os.replace(fifo, path)   # swapped in after the check: never opened, never blocks
    with stream:
        assert [m.topic for m in McapSource(path, stream=stream).messages()] == ['/x']
    # A link is refused (O_NOFOLLOW), not followed; a FIFO refused without blocking.
    target = recorded(tmp_path / 'real.mcap', [('/x', 'std_msgs/msg/String', String(data='a'),
                                                T0)])
    link = tmp_path / 'link.mcap'
    link.symlink_to(target)
    assert main(['view', '--recording', str(link), '--headless', '--save',
                 str(tmp_path / 'out.rrd')]) == 2
    assert 'symbolic link' in capsys.readouterr().err
    assert not (tmp_path / 'out.rrd').exists()
    _stream, problem = open_recording(str(path))   # the FIFO now at the name
    assert _stream is None and 'not a regular file' in problem
    # Every reader opening by name refuses it too, instead of blocking.
    with pytest.raises(RecordingError, match='not a regular file'):
        list(McapSource(path).messages())


# -- loom play --max-bytes ----------------------------------------------------------------------
def test_play_max_bytes_plays_a_recording_compressing_past_its_budget(spawn, tmp_path,
                                                                        capsys):
    from std_msgs.msg import UInt8MultiArray

    from loom_ros.cli import play
    frames = MIN_FILE_BYTES // MIB + 8   # 1 MiB of zeros each: past the 64 MiB floor
    path = recorded(tmp_path / 'dark.mcap', [
        ('/rpc/dark', 'std_msgs/msg/UInt8MultiArray', UInt8MultiArray(data=bytes(MIB)),
         T0 + i) for i in range(frames)])
    assert path.stat().st_size * 256 < MIN_FILE_BYTES   # compresses far past 256x
    code, out, _err = spawn('-m', 'loom_ros.cli.play', str(path), '--as-fast-as-possible',
                            '--quiet', '--drain', '0').finish()
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and summary['played'] < frames and '--max-bytes' in summary['error']
    code, out, err = spawn('-m', 'loom_ros.cli.play', str(path), '--as-fast-as-possible',
                           '--quiet', '--drain', '0', '--max-bytes', '128M').finish()
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and summary['played'] == frames and not summary['error'], (summary, err)
    for bad, why in (('2T', 'must be in (0, 1T]'), ('0', 'must be in'), ('lots', 'not a size'),
                     ('9' * 100, 'not a size')):
        assert play.main([str(path), '--max-bytes', bad]) == 2
        assert why in capsys.readouterr().err
    helped = subprocess.run([sys.executable, '-m', 'loom_ros.cli.play', '--help'], cwd=REPO,
                            capture_output=True, text=True, timeout=WAIT_LIMIT_S)
    assert '--max-bytes SIZE' in helped.stdout and 'at most 1T' in helped.stdout
