"""The capability guard and the subprocess sandbox against the escapes issue 13 (fault 9) found:
reads, writes through ctypes, ATTACH of a new file, a thread that connects, child processes, a
double-forked grandchild and a memory hog. Each is run by a real subprocess plugin (and the
in-process guard's thread inheritance in this process): refused or contained, counted, the host
keeps working, and stop() returns while a hostile grandchild is alive."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import CapabilityDenied, HealthState, PluginContext
from loom_ros.plugins.sandbox.subprocess import SubprocessPlugin, process_tree
from loom_ros.security.capabilities import acting_as, install_guard

HOSTILE = 'hostile_plugin:HostilePlugin'
GENEROUS_S = 60.0
STOP_BOUND_S = 30.0  # the fault: stop() blocked 60 s; a guard against hanging, not a benchmark


@pytest.fixture
def sandbox(monkeypatch):
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
        p for p in (str(Path(__file__).parent), os.environ.get('PYTHONPATH')) if p))
    plugins: list[SubprocessPlugin] = []

    def start(granted=(), **options):
        audit: list[dict] = []
        options.setdefault('call_timeout_s', GENEROUS_S)
        plugin = SubprocessPlugin(HOSTILE, **options)
        plugins.append(plugin)
        plugin.init(PluginContext(plugin='hostile', granted=frozenset(granted),
                                  audit_sink=audit.append))
        return plugin, audit
    yield start
    for plugin in plugins:
        plugin.shutdown()


def call(plugin: SubprocessPlugin, kind: str, payload: str = ''):
    return plugin.handle_event(Event(type=kind, payload=payload.encode()))


def denied(audit: list[dict]) -> list[str]:
    return [r['capability'] for r in audit if r['kind'] == 'capability_denied']


def still_serving(plugin: SubprocessPlugin) -> None:
    assert call(plugin, 'ping').events[0].type == 'pong'
    assert plugin.health().state is HealthState.OK


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent counts as gone
        return Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()[0] != 'Z'
    except OSError:
        return False


def test_reads_outside_the_runtime_need_storage_read(sandbox, tmp_path):
    secret = tmp_path / 'secret.txt'
    secret.write_text('my pin is 4242')
    plugin, audit = sandbox()
    refused = call(plugin, 'read', str(secret))
    assert not refused.ok and "may not use 'storage.read'" in refused.error
    assert '4242' not in refused.error and denied(audit) == ['storage.read']
    still_serving(plugin)
    assert plugin.health().details['denied'] == '1'
    reader, _ = sandbox(granted={'storage.read'})
    assert call(reader, 'read', str(secret)).events[0].payload == b'my pin is 4242'


def test_a_write_through_ctypes_is_refused(sandbox, tmp_path):
    target = tmp_path / 'ctypes.txt'
    plugin, audit = sandbox()
    response = call(plugin, 'ctypes_write', str(target))
    assert not response.ok and "may not use 'native.code'" in response.error
    assert not target.exists() and denied(audit) == ['native.code']
    still_serving(plugin)


def test_attaching_a_new_database_file_is_refused(sandbox, tmp_path):
    target = tmp_path / 'attached.db'
    plugin, audit = sandbox()
    response = call(plugin, 'attach', str(target))
    assert not response.ok and 'DatabaseError' in response.error
    assert not target.exists() and denied(audit) == ['storage.write']
    still_serving(plugin)


def test_a_thread_the_plugin_starts_cannot_connect(sandbox):
    with socket.socket() as server:
        server.bind(('127.0.0.1', 0))
        server.listen()
        plugin, audit = sandbox()
        response = call(plugin, 'thread_connect', str(server.getsockname()[1]))
        assert response.ok, response.error
        assert response.events[0].payload.startswith(b'CapabilityDenied')
        assert denied(audit) == ['network']
    still_serving(plugin)


def test_starting_a_process_needs_process_spawn(sandbox):
    plugin, audit = sandbox()
    response = call(plugin, 'spawn')
    assert not response.ok and "may not use 'process.spawn'" in response.error
    assert denied(audit) == ['process.spawn']
    still_serving(plugin)
    spawner, spawner_audit = sandbox(granted={'process.spawn'})
    assert call(spawner, 'spawn').events[0].payload == b'spawned'
    assert [r['kind'] for r in spawner_audit] == ['process_spawn']


@pytest.mark.parametrize('guard', [True, False])
def test_stop_kills_a_double_forked_grandchild_promptly(sandbox, guard):
    plugin, _ = sandbox(granted={'process.spawn'}, guard=guard)
    worker = plugin.pid
    grandchild = int(call(plugin, 'double_fork').events[0].payload)
    assert alive(grandchild) and os.getpgid(grandchild) != os.getpgid(worker)
    assert grandchild in process_tree(worker)  # the worker is its subreaper
    started = time.monotonic()
    plugin.shutdown()
    assert time.monotonic() - started < STOP_BOUND_S
    assert not alive(grandchild) and not alive(worker)
    assert plugin.stats['tree_killed'] >= 1


def test_the_default_memory_limit_contains_a_hog(sandbox):
    plugin, _ = sandbox()
    assert plugin.memory_bytes == 1 << 30
    response = call(plugin, 'hog')
    assert not response.ok and 'ran out of memory' in response.error
    assert '1073741824 bytes (RLIMIT_AS)' in response.error
    still_serving(plugin)


def test_in_process_a_thread_started_by_a_plugin_acts_as_that_plugin():
    install_guard()
    audit: list[dict] = []
    ctx = PluginContext(plugin='overstep', audit_sink=audit.append)
    outcome: list[BaseException] = []

    def connect() -> None:
        try:
            socket.create_connection(('127.0.0.1', 9), 1)
        except OSError as exc:
            outcome.append(exc)
    with acting_as(ctx):
        thread = threading.Thread(target=connect)
        thread.start()
    thread.join()
    assert isinstance(outcome[0], CapabilityDenied) and outcome[0].capability == 'network'
    assert [r['capability'] for r in audit] == ['network']
    with acting_as(ctx), pytest.raises(CapabilityDenied, match='storage.read'):
        open('/etc/hostname', encoding='utf-8').close()
    open('/etc/hostname', encoding='utf-8').close()  # the host itself is not checked
