"""bringup.shm: the shared memory a killed Fast DDS process leaves in /dev/shm is removed by
Fast DDS's own `fastdds shm clean` (real processes with Loom's profile, one SIGKILLed, one alive),
and the Janitor that runs it for the supervisors: one run at a time, asks coalesced, failures
reported, never raised."""
import os
import signal
import stat
import subprocess
import sys
import threading

import pytest

from harness import SHM, WAIT_LIMIT_S, shm_files_of
from loom_ros.bringup.shm import Cleaned, Janitor, clean_dead_segments, find_tool
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


def participant() -> subprocess.Popen:
    env = {**os.environ, **fastdds_environment(os.environ, config_dir())}
    proc = subprocess.Popen([sys.executable, '-c', PARTICIPANT], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == 'ready'
    return proc


@pytest.mark.skipif(find_tool() is None or not SHM.is_dir(), reason='no fastdds tool here')
def test_a_killed_process_s_segment_is_removed_and_a_live_one_kept():
    dead, live = participant(), participant()
    try:
        dead_files, live_files = shm_files_of(dead.pid), shm_files_of(live.pid)
        # Loom's profile: a 16 MiB segment per participant (config/fastdds.xml)
        segments = [f[:-3] for f in dead_files]
        assert segments and live_files, (dead_files, live_files)
        sizes = {s: (SHM / s).stat().st_size for s in segments}
        assert max(sizes.values()) >= 16 << 20, sizes
        dead.kill()
        dead.wait(WAIT_LIMIT_S)
        assert all((SHM / s).exists() for s in segments)   # SIGKILL closed nothing
        cleaned = clean_dead_segments()
        assert cleaned.error == '' and cleaned.skipped == '', cleaned
        assert 'removed' in str(cleaned)
        assert not any((SHM / s).exists() or (SHM / (s + '_el')).exists() for s in segments)
        assert all((SHM / f).exists() for f in live_files)   # a live process keeps its own
        assert shm_files_of(live.pid) == live_files
    finally:
        for proc in (dead, live):
            proc.kill()
            proc.wait(WAIT_LIMIT_S)
    clean_dead_segments()   # what the live one left: not this suite's to keep


def test_other_middlewares_are_skipped_and_a_broken_tool_is_an_error(tmp_path):
    assert clean_dead_segments({'RMW_IMPLEMENTATION': 'rmw_cyclonedds_cpp'}).skipped
    assert 'not on PATH' in clean_dead_segments({}, find=lambda: None).error
    assert 'could not run' in clean_dead_segments({}, tool=str(tmp_path / 'none')).error
    tools = {'garbage': 'echo "not what fastdds says"; exit 0',
             'fails': 'echo "Traceback: boom" >&2; exit 3',
             'half': 'echo "2 zombie ports cleaned"; exit 0',
             'huge': 'echo "99999999999 zombie segments cleaned"; '
                     'echo "1 zombie ports cleaned"; exit 0'}
    for name, body in tools.items():
        tool = tmp_path / name
        tool.write_text(f'#!/bin/sh\n{body}\n')
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
        cleaned = clean_dead_segments({}, tool=str(tool))
        assert cleaned.error.startswith('`fastdds shm clean` exited'), (name, cleaned)
        assert (cleaned.segments, cleaned.ports) == (0, 0)
    assert "'Traceback: boom'" in clean_dead_segments({}, tool=str(tmp_path / 'fails')).error
    hang = tmp_path / 'hang'
    hang.write_text('#!/bin/sh\nexec sleep 600\n')
    hang.chmod(hang.stat().st_mode | stat.S_IXUSR)
    cleaned = clean_dead_segments({}, tool=str(hang), timeout_s=0.2)
    assert 'did not finish within 0.2 s' in cleaned.error


def test_the_janitor_runs_once_at_a_time_and_coalesces_asks():
    release, started = threading.Event(), threading.Event()
    results = iter([Cleaned(segments=2, ports=1), Cleaned(), RuntimeError('bug'), Cleaned()])
    reports = []

    def clean():
        started.set()
        assert release.wait(WAIT_LIMIT_S)
        result = next(results)
        if isinstance(result, Exception):
            raise result
        return result
    janitor = Janitor(reports.append, clean)
    janitor.request()
    assert started.wait(WAIT_LIMIT_S)
    for _ in range(5):   # while the first run is under way: one more run, not five
        janitor.request()
    release.set()
    assert janitor.idle(WAIT_LIMIT_S)
    assert janitor.runs == 2 and janitor.removed == 2
    assert [str(r) for r in reports] == [
        'removed 2 shared-memory segment(s) and 1 port(s) left by dead Fast DDS processes']
    janitor.request()   # a failing run is reported, and the next ask still runs
    assert janitor.idle(WAIT_LIMIT_S)
    assert 'RuntimeError' in reports[-1].error and janitor.runs == 3
    janitor.request()
    assert janitor.idle(WAIT_LIMIT_S) and janitor.runs == 4 and len(reports) == 2
