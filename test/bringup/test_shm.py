"""bringup.shm: the shared memory a killed Fast DDS process leaves in /dev/shm is given back while
a live one's stays (real processes with Loom's profile); what a local attacker can plant there (a
FIFO, a symbolic link, another user's file, a directory) is never opened for writing, followed,
waited on or removed; and the Janitor that runs it for the supervisors runs one pass at a time,
coalesces asks and survives a failing pass or report."""
import os
import subprocess
import sys
import threading
import time

import pytest

from harness import SHM, WAIT_LIMIT_S, fastdds_shm, shm_files_of
from loom_ros.bringup.shm import MIN_AGE_S, Cleaned, Janitor, clean_dead_segments
from loom_ros.bus.qos import fastdds_environment
from loom_ros.config.params import config_dir

PARTICIPANT = '''
import rclpy
from rclpy.node import Node
rclpy.init()
node = Node('shm_probe')
print('ready', flush=True)
input()
'''
# Holds a shared flock on each file named on its command line until its stdin closes.
HOLDER = '''
import fcntl, sys
files = [open(p, 'rb') for p in sys.argv[1:]]
for f in files:
    fcntl.flock(f, fcntl.LOCK_SH)
print('ready', flush=True)
sys.stdin.read()
'''
LATER = lambda: time.time() + 3600   # noqa: E731  (every file an hour old)


def participant() -> subprocess.Popen:
    env = {**os.environ, **fastdds_environment(os.environ, config_dir())}
    proc = subprocess.Popen([sys.executable, '-c', PARTICIPANT], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == 'ready'
    return proc


@pytest.mark.skipif(not fastdds_shm(), reason='Fast DDS shared memory is not in use here')
def test_a_killed_process_s_segment_is_removed_and_a_live_one_kept():
    dead, live = participant(), participant()
    try:
        dead_files, live_files = shm_files_of(dead.pid), shm_files_of(live.pid)
        assert dead_files and live_files, (dead_files, live_files)
        segments = [f[:-3] for f in dead_files]
        sizes = {s: (SHM / s).stat().st_size for s in segments}
        assert max(sizes.values()) >= 16 << 20, sizes   # Loom's profile (config/fastdds.xml)
        dead.kill()
        dead.wait(WAIT_LIMIT_S)
        cleaned = clean_dead_segments(clock=LATER)
        assert cleaned.error == '' and cleaned.skipped == '', cleaned
        # Gone (by this pass, or by a supervisor's in another test running alongside)
        assert not any((SHM / s).exists() or (SHM / (s + '_el')).exists() for s in segments)
        assert all((SHM / f).exists() for f in live_files)   # a live process keeps its own
        assert all((SHM / f[:-3]).exists() for f in live_files)
        assert shm_files_of(live.pid) == live_files
    finally:
        for proc in (dead, live):
            proc.kill()
            proc.wait(WAIT_LIMIT_S)


def test_only_this_user_s_unlocked_old_lock_files_go_and_nothing_planted_is_followed(tmp_path):
    d = tmp_path
    dead_seg, dead_port = 'fastrtps_0123456789abcdef', 'fastdds_port7411'   # Fast DDS 2 name
    for name in (dead_seg, dead_seg + '_el', dead_port, dead_port + '_el',
                 f'sem.{dead_port}_mutex'):
        (d / name).write_bytes(b'x')
    live = 'fastdds_fedcba9876543210'
    for name in (live, live + '_el'):
        (d / name).write_bytes(b'x')
    os.mkfifo(d / 'fastdds_port7000_el')                              # would block an open
    target = tmp_path.parent / f'{tmp_path.name}-target'
    os.symlink(target, d / 'fastdds_00000000000000aa_el')             # would be created
    (d / 'fastdds_00000000000000bb_el').mkdir()
    (d / 'fastdds_00000000000000bb').write_bytes(b'x')
    (d / 'fastdds_port123456_el').write_bytes(b'x')                   # not a Fast DDS name
    (d / 'fastdds_port123456').write_bytes(b'x')
    holder = subprocess.Popen([sys.executable, '-c', HOLDER, str(d / (live + '_el'))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'ready'
        young = clean_dead_segments({}, directory=d)   # all just made: maybe starting up
        assert (young.segments, young.young) == (0, 1)
        cleaned = clean_dead_segments({}, directory=d, clock=LATER)
        assert (cleaned.segments, cleaned.error) == (1, ''), cleaned
    finally:
        holder.stdin.close()
        holder.wait(WAIT_LIMIT_S)
    left = sorted(p.name for p in d.iterdir())
    # Ports stay (the domain's next participant opens them again; Fast DDS renews a dead one)
    assert left == sorted([live, live + '_el', 'fastdds_port7000_el', 'fastdds_00000000000000aa_el',
                           'fastdds_00000000000000bb_el', 'fastdds_00000000000000bb',
                           dead_port, dead_port + '_el', f'sem.{dead_port}_mutex',
                           'fastdds_port123456_el', 'fastdds_port123456'])
    assert not target.exists()
    if os.geteuid() == 0:   # another user's dead lock file: not ours to take
        for name in (dead_seg, dead_seg + '_el'):
            (d / name).write_bytes(b'x')
            os.chown(d / name, 12345, 12345)
        clean_dead_segments({}, directory=d, clock=LATER)   # (the holder's file is dead now)
        assert (d / dead_seg).exists() and (d / (dead_seg + '_el')).exists()


def test_other_middlewares_are_skipped_and_an_unreadable_folder_is_an_error(tmp_path):
    assert clean_dead_segments({'RMW_IMPLEMENTATION': 'rmw_cyclonedds_cpp'}).skipped
    cleaned = clean_dead_segments({}, directory=tmp_path / 'none')
    assert cleaned.error.startswith('cannot list') and 'none' in cleaned.error


def test_the_janitor_runs_once_at_a_time_and_coalesces_asks():
    release, started = threading.Event(), threading.Event()
    results = iter([Cleaned(segments=2), Cleaned(), RuntimeError('bug'),
                    Cleaned(segments=1), Cleaned()])
    reports, slept = [], []

    def clean():
        started.set()
        assert release.wait(WAIT_LIMIT_S)
        result = next(results)
        if isinstance(result, Exception):
            raise result
        return result

    def report(cleaned):
        reports.append(cleaned)
        if cleaned.segments == 1:
            raise OSError('stderr closed')   # swallowed: the janitor goes on
    janitor = Janitor(report, clean, sleep=slept.append)
    janitor.request()
    assert started.wait(WAIT_LIMIT_S)
    for _ in range(5):   # while the first run is under way: one more run, not five
        janitor.request()
    release.set()
    assert janitor.idle(WAIT_LIMIT_S)
    assert janitor.runs == 2 and janitor.removed == 2
    assert [str(r) for r in reports] == [
        'removed 2 shared-memory segment(s) left by dead Fast DDS processes']
    janitor.request()   # a failing run is reported, and the next ask still runs
    assert janitor.idle(WAIT_LIMIT_S)
    assert 'RuntimeError' in reports[-1].error and janitor.runs == 3
    janitor.request()   # a report that raises does not end it either
    assert janitor.idle(WAIT_LIMIT_S) and janitor.runs == 4 and reports[-1].segments == 1
    janitor.request()
    assert janitor.idle(WAIT_LIMIT_S) and janitor.runs == 5 and len(reports) == 3
    assert slept == []


def test_young_lock_files_get_one_more_pass_when_old_enough():
    results = iter([Cleaned(young=1), Cleaned(segments=1), Cleaned(young=1), Cleaned(young=1)])
    reports, slept = [], []
    janitor = Janitor(reports.append, lambda: next(results), sleep=slept.append)
    janitor.request()
    assert janitor.idle(WAIT_LIMIT_S)
    assert janitor.runs == 2 and slept == [MIN_AGE_S] and reports[0].segments == 1
    janitor.request()   # still young on the second pass: no third one
    assert janitor.idle(WAIT_LIMIT_S)
    assert janitor.runs == 4 and slept == [MIN_AGE_S, MIN_AGE_S]
