"""Trace files rotate past their cap, even with several processes appending to one file: every
line lands whole in exactly one file, and at most keep + 1 files exist."""
from __future__ import annotations

import subprocess
import sys

import pytest

from harness import REPO
from loom_ros.telemetry import tracing
from loom_ros.telemetry.rotating import RotatingAppender

WRITER = '''
import sys
from loom_ros.telemetry.rotating import RotatingAppender
path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = RotatingAppender(path, max_bytes=4000, keep=50)
for i in range(count):
    out.write(f'{name} {i:05d} ' + 'x' * 40 + '\\n')
out.close()
'''


def _lines(path):
    files = sorted(path.parent.glob(path.name + '*'))
    return files, [line for f in files if not f.name.endswith('.lock')
                   for line in f.read_text().splitlines()]


def test_one_process_rotates_and_keeps_only_keep_files(tmp_path):
    path = tmp_path / 'spans.jsonl'
    out = RotatingAppender(str(path), max_bytes=1000, keep=2)
    for i in range(200):
        out.write(f'{i:04d} ' + 'y' * 45 + '\n')
    out.close()
    files, lines = _lines(path)
    assert {f.name for f in files} == {'spans.jsonl', 'spans.jsonl.1', 'spans.jsonl.2',
                                       'spans.jsonl.lock'}
    assert all(f.stat().st_size <= 1000 for f in files)
    # The newest lines survive, in order, whole.
    kept = [int(line.split()[0]) for line in (path.with_name('spans.jsonl.2').read_text() +
                                               path.with_name('spans.jsonl.1').read_text() +
                                               path.read_text()).splitlines()]
    assert kept == list(range(200 - len(kept), 200)) and out.rotations >= 9


def test_writers_in_three_processes_share_one_rotating_file(tmp_path):
    path = tmp_path / 'trace.jsonl'
    procs = [subprocess.Popen([sys.executable, '-c', WRITER, str(path), f'p{n}', '400'],
                              cwd=REPO, stderr=subprocess.PIPE, text=True) for n in range(3)]
    for proc in procs:
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    files, lines = _lines(path)
    assert len(lines) == 1200                       # nothing lost (keep 50 holds it all) ...
    assert len(set(lines)) == 1200                  # ... nothing twice, every line whole
    for n in range(3):                              # each writer's lines in its own order
        mine = [int(line.split()[1]) for f in sorted(
            (f for f in files if not f.name.endswith('.lock')),
            key=lambda f: -int(f.suffix[1:]) if f.suffix[1:].isdigit() else 0)
            for line in f.read_text().splitlines() if line.startswith(f'p{n} ')]
        assert mine == list(range(400))
    # The cap holds to within one write per writer: two processes can both see room, then write.
    assert all(f.stat().st_size <= 4000 + 3 * 60 for f in files)


def test_negative_caps_are_refused():
    with pytest.raises(ValueError):
        RotatingAppender('/tmp/x', max_bytes=-1)
    with pytest.raises(tracing.TracingConfigError):
        tracing.TracingConfig(exporter='file', file='x', file_max_bytes=-5).check()
