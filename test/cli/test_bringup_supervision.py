"""`loom bringup` is supervised (issue 13, "No silent death" and fault 8; issue 15): a SIGKILLed
bring-up takes its node processes, agent hosts, Zenoh router and cloud with it, so the next one
gets the port; a SIGKILLed node process is started again and the lifecycle manager brings it back
to active (launch's respawn); a node that keeps dying, or (with --composition) a node whose spin
thread dies, makes bring-up say which and exit 1 instead of staying "ready"."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from harness import (REPO, SHM, WAIT_LIMIT_S, fastdds_shm, free_port, loom_cli,
                     shm_files_of)

# Runs `loom bringup --composition` with one fault injected: camera_adapter's spin thread raises as soon as a
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


@pytest.fixture
def config(tmp_path) -> Path:
    """config/loom.yaml with every file the robot writes under tmp_path."""
    data = yaml.safe_load((REPO / 'config' / 'loom.yaml').read_text())

    def section(name):   # sections are keyed /**/<node> (any namespace)
        key = name if name == '/**' else f'/**/{name}'
        return data.setdefault(key, {}).setdefault('ros__parameters', {})
    section('/**').setdefault('storage', {})['root'] = str(tmp_path)   # every file it keeps
    path = tmp_path / 'params.yaml'
    path.write_text(yaml.safe_dump(data))
    return path


class Bringup:
    """A `loom bringup` process (optionally through a driver script); stderr goes to a file."""

    def __init__(self, config: Path, port: int, name: str, driver: str | None = None,
                 extra: tuple[str, ...] = ()):
        self.err_path = config.parent / f'{name}.err'
        args = ['--config', str(config), '--zenoh-port', str(port), '--no-sim-sensors',
                '--agents', 'counter', '--log-dir', str(config.parent),
                '--keys-dir', str(config.parent / 'keys'),   # secure, with this test's credentials
                *extra]
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
            # A process per node plus an agent host: twice the usual bound on a loaded machine.
            line = self.lines.get(timeout=2 * WAIT_LIMIT_S)
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


def test_sigkill_of_bringup_frees_the_port_and_a_killed_node_is_started_again(ros, config):
    """A SIGKILLed bring-up takes its side processes along and the port is free again; the next
    bring-up (on that port) also shows a killed node started again and brought back to active
    (_killed_node_comes_back): one bring-up less, each costs 15-30 s of the suite on 2 cores."""
    port = free_port()
    first = Bringup(config, port, 'first')
    try:
        ready = first.ready()
        children = [c.pid for c in psutil.Process(first.popen.pid).children(recursive=True)]
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait()
        _wait_until(lambda: all(_gone(pid) for pid in children),
                    f'its child processes {children} to end with it')
        assert ready['mode'] == 'processes'
        assert set(ready['side_pids']) == {'zenoh_router', 'cloud'}
        assert set(ready['side_pids'].values()) <= set(children)
        assert set(ready['node_pids']) == {'camera_adapter', 'router', 'plugin_host', 'storage',
                                           'zenoh_bridge', 'lifecycle_manager'}
        assert set(ready['node_pids'].values()) <= set(children)
        assert len(children) > len(ready['node_pids']) + 2   # the agent host too
    finally:
        first.stop()
    # The Zenoh port is free again: the next bring-up's router listens on it.
    second = Bringup(config, port, 'second', extra=('--no-cloud', '--namespace', 'respawn',
                                                    '--shm-cleanup'))
    try:
        ready = second.ready()
        assert ready['ready'] is True and set(ready['side_pids']) == {'zenoh_router'}
        _killed_node_comes_back(ros, second, ready)
        nodes = [c.pid for c in psutil.Process(second.popen.pid).children(recursive=True)]
        held = set().union(*(shm_files_of(pid) for pid in nodes))
        assert held or not fastdds_shm()
        second.popen.send_signal(signal.SIGINT)
        assert second.wait() == 0, second.err_path.read_text()
        # Bring-up's last pass, once every node and its own participant are gone: what it had
        # mapped of the nodes' shared memory would otherwise never be released (os._exit).
        assert not any((SHM / f).exists() for f in held), sorted(held)
    finally:
        second.stop()


def test_a_node_whose_spin_thread_dies_makes_bringup_exit_1_and_say_which(ros, config):
    # The face agent asks for its own process (agents.yaml); in one process it is hosted with
    # the rest, and the manager must not wait for an agent_face node (it waited 30 s, then
    # restarted it, under launch's use_composition:=true).
    bringup = Bringup(config, free_port(), 'dying', driver=DYING_NODE_DRIVER,
                      extra=('--composition', '--agents', 'face,counter'))
    try:
        ready = bringup.ready()
        assert ready['mode'] == 'composition' and ready['node_pids'] == {}
        managing = [line for line in bringup.err_path.read_text().splitlines()
                    if 'managing nodes' in line]
        assert managing and managing[0].endswith('; agent_host_0 (face, counter)'), managing
        # One process: the agents ask the router in-process, so their host has no router/route
        # client (its own services show it is in the graph).
        host = ('agent_host_0', '/')
        _wait_until(lambda: host in ros.node.get_node_names_and_namespaces() and
                    ros.node.get_service_names_and_types_by_node(*host),
                    "the agent host's services in the graph")
        clients = [name for name, _ in ros.node.get_client_names_and_types_by_node(*host)]
        assert not [c for c in clients if c.endswith('router/route')], clients
        pids = ready['side_pids']
        bringup.popen.stdin.write('die\n')
        bringup.popen.stdin.flush()
        assert bringup.wait() == 1
        err = bringup.err_path.read_text()
        assert 'node camera_adapter died (RuntimeError: injected fault' in err, err
        assert all(_gone(pid) for pid in pids.values())   # stopped on the way out
    finally:
        bringup.stop()


def _lifecycle_state(ros, client) -> str:
    """The node's lifecycle state label, asked once over its get_state `client` ('' if no answer
    in 3 s: a killed node's service lingers in discovery). Poll it on one client: an answer
    lost to DDS's reply-matching race (the first to a new server can be) is one poll's ''."""
    from lifecycle_msgs.srv import GetState
    if not client.wait_for_service(timeout_sec=2.0):
        return ''
    future = client.call_async(GetState.Request())
    deadline = time.monotonic() + 3.0
    while not future.done() and time.monotonic() < deadline:
        ros.spin_once(0.05)
    if not future.done():
        client.remove_pending_request(future)
        return ''
    return future.result().current_state.label


def _killed_node_comes_back(ros, bringup: Bringup, ready: dict) -> None:
    """A SIGKILLed node process (the router) is started again and the lifecycle manager brings
    it back to active; bring-up stays up (one death is not the end)."""
    from lifecycle_msgs.srv import GetState
    old = ready['node_pids']['router']
    client = ros.node.create_client(GetState, '/respawn/router/get_state')
    try:
        # Sent again until answered (get_state is safe to repeat): a lost answer is no failure.
        state = ros.call(client, GetState.Request(), "the router's get_state")
        assert state.current_state.label == 'active'
        held = shm_files_of(old)   # its Fast DDS shared memory, which SIGKILL leaves behind
        assert held or not fastdds_shm()
        os.kill(old, signal.SIGKILL)
        _wait_until(lambda: 'router was killed by SIGKILL' in bringup.err_path.read_text(),
                    'bring-up to see the router die')
        _wait_until(lambda: not any((SHM / f).exists() for f in held),   # --shm-cleanup
                    "bring-up to give the router's shared memory back (bringup/shm.py)")
        ros.wait_for(lambda: _lifecycle_state(ros, client) == 'active',
                     'the respawned router to be brought back to active by the manager')
    finally:
        ros.node.destroy_client(client)
    assert bringup.popen.poll() is None   # still up: one death is not the end
    new = [p for p in psutil.Process(bringup.popen.pid).children(recursive=True)
           if p.pid != old and 'loom_ros.router.router_node' in ' '.join(p.cmdline())]
    assert len(new) == 1


def test_a_node_that_keeps_dying_makes_bringup_exit_1_and_say_which(config):
    data = yaml.safe_load(config.read_text())
    data['/**/camera_adapter']['ros__parameters']['max_rate_hz'] = -1.0   # refused at start
    config.write_text(yaml.safe_dump(data))
    bringup = Bringup(config, free_port(), 'crashloop',
                      extra=('--no-cloud', '--max-restarts', '1'))
    try:
        assert bringup.wait() == 1
        err = bringup.err_path.read_text()
        reason = [line for line in err.splitlines() if line.startswith('loom bringup: Runtime')]
        assert reason and 'camera_adapter exited with code 1' in reason[-1], err[-3000:]
        assert 'gave up after 1 restarts' in reason[-1]
        assert '"ready"' not in ''.join(iter(bringup.lines.get, ''))
    finally:
        bringup.stop()
