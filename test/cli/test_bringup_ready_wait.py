"""How `loom bringup` waits for a side process's ready line (the Zenoh router, the cloud tier),
with real child processes: the line is read, a child that exits without one is named, and a
stop asked for while waiting ends the wait at once (before: a Ctrl-C while the cloud tier loaded
its models waited up to 60 s, outside bring-up's stop bound)."""
import subprocess
import sys
import threading
import time

import pytest

from loom_ros.bringup.processes import Process
from loom_ros.cli.bringup import Stopped, _wait_ready

PY = sys.executable


def side(code: str) -> Process:
    return Process([PY, '-c', code], name='side', stdout=subprocess.PIPE, text=True).start()


def test_the_ready_line_is_read_and_a_silent_exit_is_named():
    proc = side('import json; print(json.dumps({"ready": True, "port": 7}), flush=True); '
                'import sys; sys.stdin.read()')
    try:
        assert _wait_ready(proc, 'the cloud tier', threading.Event()) == {'ready': True,
                                                                            'port': 7}
    finally:
        proc.stop(timeout_s=10)
    proc = side('import sys; sys.exit(3)')
    try:
        with pytest.raises(RuntimeError, match=r'the cloud tier did not start \(exit 3\)'):
            _wait_ready(proc, 'the cloud tier', threading.Event())
    finally:
        proc.stop(timeout_s=10)


def test_a_stop_ends_the_wait_for_a_side_process_that_never_gets_ready():
    """The child never prints; the 60 s limit is not what ends the wait: the stop is, seen at
    the next 0.1 s poll. The bound asserted is the limit itself (a guard, not a timing)."""
    proc = side('import time; time.sleep(600)')
    stop = threading.Event()
    try:
        stop.set()
        started = time.monotonic()
        with pytest.raises(Stopped, match='while waiting for the cloud tier'):
            _wait_ready(proc, 'the cloud tier', stop, limit=60.0)
        assert time.monotonic() - started < 60.0
        assert proc.running      # the caller stops it, with everything else it started
    finally:
        proc.stop(timeout_s=10)
