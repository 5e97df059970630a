"""Where `loom record` writes and what it refuses, and what `loom view --recording` refuses to
open (an attack review's findings): the default file lies where `loom forget` rewrites
recordings, an --output elsewhere is warned about, a link or FIFO planted at the output is
refused with nothing written through it, a message the replay reader would refuse is never
written, and a FIFO given to `loom view` is refused at once instead of blocking for good. Real
files, real `loom` processes, each bounded by a timeout that fails the test."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from rclpy.serialization import serialize_message

import loom_ros.cli.record as record
from harness import REPO, WAIT_LIMIT_S, loom_cli
from loom_ros.cli.record import McapRecorder
from loom_ros.replay.mcap_source import Limits, McapSource
from loom_ros.storage.erasure import recording_files
from loom_ros.storage.layout import StorageLayout

NO_TOPIC = 'record_paths_nothing_here'   # nothing publishes it: a recording of no messages
VICTIM = b"operator's precious notes\n"
SMALL_LIMIT = 4096                        # bytes: the recorder's limit in the size test


def _record(cwd, *args: str) -> subprocess.CompletedProcess:
    """`loom record` for 0.3 s on a topic nobody publishes; a hang is a TimeoutExpired."""
    return subprocess.run(
        [sys.executable, *loom_cli('record', '--duration', '0.3', '--topics', NO_TOPIC, *args)],
        cwd=cwd, capture_output=True, text=True, timeout=WAIT_LIMIT_S)


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{')]


def test_the_default_output_is_in_the_roots_recordings_where_forget_finds_it(tmp_path):
    cwd, root = tmp_path / 'cwd', tmp_path / 'root'
    cwd.mkdir()
    done = _record(cwd, '--root', str(root))
    assert done.returncode == 0, done.stderr
    assert not (cwd / 'demo_output').exists()   # the old default, out of forget's reach
    made = sorted((root / 'recordings').glob('*.mcap'))
    assert len(made) == 1 and made[0].read_bytes()[:5] == b'\x89MCAP', made
    assert made[0] in recording_files(StorageLayout.at(root))   # erasure's own list
    summary = _lines(done.stdout)[-1]
    assert summary['file'] == str(made[0]) and summary['too_large'] == {}, summary
    assert 'warning' not in done.stderr, done.stderr


def test_an_output_forget_does_not_reach_is_written_with_a_warning(tmp_path):
    root, output = tmp_path / 'root', tmp_path / 'elsewhere' / 'run.mcap'
    done = _record(tmp_path, '--root', str(root), '--output', str(output))
    assert done.returncode == 0, done.stderr
    assert output.read_bytes()[:5] == b'\x89MCAP'
    assert 'warning' in done.stderr and '`loom forget' in done.stderr, done.stderr


def test_forget_reaches_the_recordings_folder_and_the_root_only(tmp_path):
    root = tmp_path / 'root'
    layout = StorageLayout.at(root)
    assert record.forget_reaches(layout.recordings / 'a.mcap', str(root))
    assert record.forget_reaches(layout.recordings / 'day' / 'b.mcap', str(root))
    assert record.forget_reaches(root / 'recording.mcap', str(root))   # what the demo passes
    assert not record.forget_reaches(root / 'sub' / 'c.mcap', str(root))
    assert not record.forget_reaches(layout.recordings / 'd.bin', str(root))
    assert not record.forget_reaches(layout.recordings / '..' / '..' / 'e.mcap', str(root))
    assert not record.forget_reaches(tmp_path / 'f.mcap', str(root))


def test_a_link_planted_at_the_output_is_refused_and_its_target_untouched(tmp_path):
    victim, output = tmp_path / 'victim.txt', tmp_path / 'root' / 'recordings' / 'run.mcap'
    victim.write_bytes(VICTIM)
    output.parent.mkdir(parents=True)
    output.symlink_to(victim)
    done = _record(tmp_path, '--root', str(tmp_path / 'root'), '--output', str(output))
    assert done.returncode == 2 and 'symbolic link' in done.stderr, (done.returncode,
                                                                     done.stderr)
    assert victim.read_bytes() == VICTIM and output.is_symlink()


def test_a_fifo_at_the_output_is_refused_without_blocking(tmp_path):
    output = tmp_path / 'root' / 'recordings' / 'run.mcap'
    output.parent.mkdir(parents=True)
    os.mkfifo(output)
    done = _record(tmp_path, '--root', str(tmp_path / 'root'), '--output', str(output))
    assert done.returncode == 2 and 'FIFO' in done.stderr, (done.returncode, done.stderr)


def test_a_hard_link_or_a_folder_at_the_output_is_refused_with_nothing_truncated(tmp_path):
    victim, output = tmp_path / 'victim.txt', tmp_path / 'run.mcap'
    victim.write_bytes(VICTIM)
    os.link(victim, output)
    with pytest.raises(record.OutputError, match='other name'):
        McapRecorder(output)
    assert victim.read_bytes() == VICTIM
    with pytest.raises(record.OutputError, match='a folder'):
        McapRecorder(tmp_path)


def test_an_existing_plain_output_is_replaced_as_before(tmp_path):
    output = tmp_path / 'run.mcap'
    output.write_bytes(b'old bytes, longer than the header of an empty recording' * 100)
    McapRecorder(output).close()
    assert output.read_bytes()[:5] == b'\x89MCAP' and b'old bytes' not in output.read_bytes()


def test_a_message_the_reader_would_refuse_is_not_written_and_is_counted(tmp_path):
    from loom_msgs.msg import Event, KeyValue
    from std_msgs.msg import String
    # The default limit is the replay reader's own, not a copy of its number.
    assert McapRecorder(tmp_path / 'default.mcap').max_message_bytes == \
        Limits().max_message_bytes
    path = tmp_path / 'rec.mcap'
    recorder = McapRecorder(path, max_message_bytes=SMALL_LIMIT)
    recorder.add_topic('/loom/camera/front', 'loom_msgs/msg/Event')
    recorder.add_topic('/loom/ui/state', 'std_msgs/msg/String')
    frame = Event(id='f1', type='camera.frame', source='cam', payload=os.urandom(SMALL_LIMIT),
                  metadata=[KeyValue(key='encoding', value='rgb8')])   # kept byte for byte
    recorder.write('/loom/ui/state', serialize_message(String(data='before')), 1)
    recorder.write('/loom/camera/front', serialize_message(frame), 2)
    recorder.write('/loom/ui/state', serialize_message(String(data='after')), 3)
    recorder.close()
    assert recorder.too_large == {'/loom/camera/front': 1}
    assert recorder.counts == {'/loom/camera/front': 0, '/loom/ui/state': 2}
    source = McapSource(path, limits=Limits(max_message_bytes=SMALL_LIMIT))
    assert [m.topic for m in source.messages()] == ['/loom/ui/state', '/loom/ui/state']
    assert not source.skipped, source.skipped


def test_view_refuses_a_fifo_as_recording_at_once(tmp_path):
    fifo = tmp_path / 'x.mcap'
    os.mkfifo(fifo)
    done = subprocess.run(   # the old code blocked in open() for good: a timeout fails the test
        [sys.executable, *loom_cli('view', '--recording', str(fifo), '--headless', '--save',
                                   str(tmp_path / 'out.rrd'))],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT_LIMIT_S)
    assert done.returncode == 2 and 'not a regular file' in done.stderr, (done.returncode,
                                                                          done.stderr)
    assert not (tmp_path / 'out.rrd').exists()


def test_view_refuses_a_folder_or_a_missing_file_as_recording(tmp_path, capsys):
    from loom_ros.cli import main
    for path in (tmp_path, tmp_path / 'gone.mcap'):
        assert main(['view', '--recording', str(path), '--headless', '--save',
                     str(tmp_path / 'out.rrd')]) == 2, path
        assert 'loom view: --recording' in capsys.readouterr().err
