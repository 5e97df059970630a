"""`loom bringup` is supervised (issue 13, "No silent death" and fault 8): a SIGKILLed bring-up
takes its Zenoh router and cloud processes with it, so the next one gets the port; a node whose
spin thread dies makes bring-up say so and exit 1 instead of staying "ready"."""
from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from harness import REPO, WAIT_LIMIT_S, loom_cli

# Runs `loom bringup` with one fault injected: camera_adapter's spin thread raises as soon as a
# line arrives on stdin (what `spin_until` survives cannot kill it; this stands for what would).
DYING_NODE_DRIVER = '''
import sys, threading
from loom_ros.bus import executor
from loom_ros.cli import bringup
real_spin_until = executor.spin_until
dying = threading.Event()
threading.Thread(target=lambda: sys.stdin.readline() and dying.set(), daemon=True).start()

def spin_until(ex, stop, *args, **kwargs):
    if [n.get_name() for n in ex.get_nodes()] != ['camera_adapter']:
        return real_spin_until(ex, stop, *args, **kwargs)
    while not stop.done():
        if dying.is_set():
            raise RuntimeError('injected fault: the spin thread ends')
        ex.spin_until_future_complete(stop, timeout_sec=0.05)

executor.spin_until = spin_until
sys.exit(bringup.main(sys.argv[1:]))
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture
def config(tmp_path) -> Path:
    """config/loom.yaml with every file the robot writes under tmp_path."""
    data = yaml.safe_load((REPO / 'config' / 'loom.yaml').read_text())

    def section(name):   # sections are keyed /**/<node> (any namespace)
        key = name if name == '/**' else f'/**/{name}'
        return data.setdefault(key, {}).setdefault('ros__parameters', {})
    section('router')['history_db'] = str(tmp_path / 'router.db')
    section('plugin_host').update(audit_db=str(tmp_path / 'audit.db'),
                                  data_dir=str(tmp_path / 'plugins'))
    section('agent')['state_dir'] = str(tmp_path / 'agents')
    section('zenoh_bridge')['audit_file'] = str(tmp_path / 'bridge_audit.jsonl')
    path = tmp_path / 'params.yaml'
    path.write_text(yaml.safe_dump(data))
    return path


class Bringup:
    """A `loom bringup` process (optionally through a driver script); stderr goes to a file."""

    def __init__(self, config: Path, port: int, name: str, driver: str | None = None):
        self.err_path = config.parent / f'{name}.err'
        args = ['--config', str(config), '--zenoh-port', str(port), '--no-sim-sensors',
                '--agents', 'counter', '--log-dir', str(config.parent),
                '--keys-dir', str(config.parent / 'keys')]   # secure, with this test's credentials
        cmd = [sys.executable, '-c', driver, *args] if driver else \
            [sys.executable, *loom_cli('bringup', *args)]
        with open(self.err_path, 'w') as err:
            self.popen = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put('')

    def ready(self) -> dict:
        """Its ready line; fails the test if it exits or takes longer than the wait limit."""
        line = ''
        try:
            line = self.lines.get(timeout=WAIT_LIMIT_S)
            return json.loads(line)
        except (queue.Empty, ValueError):
            self.stop()
            pytest.fail(f'bring-up not ready ({line!r}):\n{self.err_path.read_text()}')

    def wait(self) -> int:
        try:
            return self.popen.wait(timeout=WAIT_LIMIT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f'bring-up still running after {WAIT_LIMIT_S:.0f} s:\n'
                        f'{self.err_path.read_text()}')

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (PID 1 of a container may never reap it)."""
    try:
        stat = Path(f'/proc/{pid}/stat').read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(')', 1)[1].split()[0] in ('Z', 'X')


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f'timed out waiting for {what}')
        time.sleep(0.05)   # polling a condition, not a timing margin


def test_sigkill_of_bringup_takes_its_side_processes_along_and_the_port_is_free_again(config):
    port = _free_port()
    first = Bringup(config, port, 'first')
    try:
        ready = first.ready()
        children = [c.pid for c in psutil.Process(first.popen.pid).children(recursive=True)]
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait()
        _wait_until(lambda: all(_gone(pid) for pid in children),
                    f'its child processes {children} to end with it')
        assert set(ready['side_pids']) == {'zenoh_router', 'cloud'}
        assert set(ready['side_pids'].values()) <= set(children)
    finally:
        first.stop()
    second = Bringup(config, port, 'second')   # the Zenoh port is free again
    try:
        assert second.ready()['ready'] is True
        second.popen.send_signal(signal.SIGINT)
        assert second.wait() == 0, second.err_path.read_text()
    finally:
        second.stop()


def test_a_node_whose_spin_thread_dies_makes_bringup_exit_1_and_say_which(config):
    bringup = Bringup(config, _free_port(), 'dying', driver=DYING_NODE_DRIVER)
    try:
        pids = bringup.ready()['side_pids']
        bringup.popen.stdin.write('die\n')
        bringup.popen.stdin.flush()
        assert bringup.wait() == 1
        err = bringup.err_path.read_text()
        assert 'node camera_adapter died (RuntimeError: injected fault' in err, err
        assert all(_gone(pid) for pid in pids.values())   # stopped on the way out
    finally:
        bringup.stop()
