"""Subprocess plugins with real child processes: a plugin answers from its child; crashes, hangs,
memory hogs and CPU burners are detected, reported with a reason, restarted or marked FAILED, and
the test process (the host) keeps running throughout."""
from __future__ import annotations

import os
import signal

import pytest

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import (HealthState, Plugin, PluginContext, PluginError)
from loom_ros.plugins.sandbox import sandboxed_plugin
from loom_ros.plugins.sandbox.subprocess import SubprocessPlugin

FAULTY = 'loom_ros.plugins.sandbox.examples:FaultyPlugin'
GENEROUS_S = 60.0  # calls that must answer get this long; only hangs are meant to time out


@pytest.fixture
def make():
    plugins: list[SubprocessPlugin] = []

    def start(target: str = FAULTY, ctx: PluginContext | None = None, **options):
        options.setdefault('call_timeout_s', GENEROUS_S)
        plugin = SubprocessPlugin(target, **options)
        plugins.append(plugin)
        plugin.init(ctx or PluginContext(plugin=plugin.metadata.name))
        return plugin
    yield start
    for plugin in plugins:
        plugin.shutdown()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def ended(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet."""
    try:
        with open(f'/proc/{pid}/stat') as stat:
            return stat.read().rpartition(')')[2].split()[0] in ('Z', 'X')
    except OSError:
        return True


def child_pid(plugin: SubprocessPlugin) -> int:
    response = plugin.handle_event(Event(type='fault.pid'))
    assert response.ok, response.error
    return int(response.events[0].payload)


def upper(plugin: SubprocessPlugin, text: str = 'still here') -> bytes:
    response = plugin.handle_event(Event(type='text.in', payload=text.encode()))
    assert response.ok, response.error
    return response.events[0].payload


def test_a_plugin_answers_from_its_child_process(make):
    plugin = make()
    assert isinstance(plugin, Plugin) and plugin.metadata.name == 'example_faulty'
    assert upper(plugin, 'hello é') == 'HELLO É'.encode()
    pid = child_pid(plugin)
    assert pid != os.getpid() and pid == plugin.pid
    health = plugin.health()
    assert health.state is HealthState.OK and health.details['pid'] == str(pid)


def test_a_crash_is_detected_and_the_child_restarted(make):
    audit: list[dict] = []
    plugin = make(ctx=PluginContext(plugin='example_faulty', audit_sink=audit.append))
    before = child_pid(plugin)
    response = plugin.handle_event(Event(type='fault.crash'))
    assert not response.ok
    assert 'killed by SIGABRT' in response.error and 'restarting on the next call' in response.error
    assert plugin.health().state is HealthState.DEGRADED
    assert upper(plugin) == b'STILL HERE'
    assert child_pid(plugin) != before and gone(before)
    health = plugin.health()
    assert health.state is HealthState.OK
    assert (health.details['crashes'], health.details['restarts']) == ('1', '1')
    assert [r['kind'] for r in audit] == ['sandbox_failure', 'sandbox_restart']


def test_repeated_crashes_mark_the_plugin_failed_until_restarted(make):
    plugin = make(max_restarts=1)
    assert 'restarting' in plugin.handle_event(Event(type='fault.crash')).error
    last = plugin.handle_event(Event(type='fault.exit', payload=b'7'))
    assert 'exited with code 7' in last.error and 'marked FAILED' in last.error
    health = plugin.health()
    assert health.state is HealthState.FAILED and '2 crashes or hangs in a row' in health.message
    refused = plugin.handle_event(Event(type='text.in', payload=b'x'))
    assert not refused.ok and 'is failed and refuses calls' in refused.error
    assert plugin.pid is None
    plugin.restart()  # the operator's decision
    assert upper(plugin) == b'STILL HERE' and plugin.health().state is HealthState.OK


def test_a_hang_hits_the_timeout_and_the_process_group_is_killed(make):
    plugin = make()
    pid = child_pid(plugin)
    plugin.call_timeout_s = 0.5  # read per call: only the hanging call gets a short one
    response = plugin.handle_event(Event(type='fault.hang'))
    plugin.call_timeout_s = GENEROUS_S
    assert not response.ok and 'within 0.5 s (hung); killed' in response.error
    assert gone(pid)
    assert plugin.health().details['timeouts'] == '1'
    assert upper(plugin) == b'STILL HERE'


def test_rlimit_as_stops_a_memory_hog_with_a_clear_reason(make):
    plugin = make(memory_bytes=512 * 1024 * 1024)
    response = plugin.handle_event(Event(type='fault.hog'))
    assert not response.ok
    assert 'ran out of memory' in response.error and '536870912 bytes (RLIMIT_AS)' in response.error
    assert upper(plugin) == b'STILL HERE'


def test_rlimit_cpu_stops_a_cpu_burner(make):
    plugin = make(cpu_seconds=2)
    response = plugin.handle_event(Event(type='fault.spin'))
    assert not response.ok and 'SIGXCPU (CPU time limit 2 s, RLIMIT_CPU)' in response.error
    assert upper(plugin) == b'STILL HERE'


def test_a_child_dying_between_calls_is_seen_by_health(make):
    plugin = make()
    pid = child_pid(plugin)
    os.kill(pid, signal.SIGKILL)
    health = plugin.health()
    assert health.state is HealthState.DEGRADED and 'SIGKILL' in health.details['last_error']
    assert upper(plugin) == b'STILL HERE'
    assert plugin.health().state is HealthState.OK


def test_plugin_errors_are_failures_not_crashes(make):
    audit: list[dict] = []
    plugin = make(ctx=PluginContext(plugin='example_faulty', audit_sink=audit.append))
    pid = child_pid(plugin)
    raised = plugin.handle_event(Event(type='fault.raise'))
    assert not raised.ok and raised.error == 'handle raised RuntimeError: asked to raise'
    denied = plugin.handle_event(Event(type='fault.network'))
    assert not denied.ok and "may not use 'network'" in denied.error
    assert audit[0]['kind'] == 'capability_denied' and audit[0]['capability'] == 'network'
    assert child_pid(plugin) == pid and plugin.health().state is HealthState.OK


def test_bad_targets_and_failed_init_are_clear_errors(make):
    with pytest.raises(PluginError, match="No module named 'loom_ros.nowhere'"):
        SubprocessPlugin('loom_ros.nowhere:Plugin')
    with pytest.raises(PluginError, match='not a Plugin subclass'):
        SubprocessPlugin('loom_ros.plugins.sandbox.examples:os')
    with pytest.raises(PluginError, match="no plugin 'no_such_plugin'"):
        SubprocessPlugin('no_such_plugin')
    with pytest.raises(PluginError, match='asked to fail at init'):
        make(ctx=PluginContext(plugin='example_faulty', config={'fail_init': True}))


def test_shutdown_ends_the_child():
    plugin = sandboxed_plugin('subprocess', FAULTY, {'call_timeout_s': GENEROUS_S})
    plugin.init(PluginContext(plugin='example_faulty'))
    pid = child_pid(plugin)
    plugin.shutdown()
    assert gone(pid) and plugin.pid is None


def test_the_capability_guard_applies_in_the_child(make):
    audit: list[dict] = []
    guarded = make(ctx=PluginContext(plugin='example_faulty', audit_sink=audit.append))
    denied = guarded.handle_event(Event(type='fault.connect'))
    assert not denied.ok and "may not use 'network'" in denied.error
    assert audit[-1]['kind'] == 'capability_denied' and audit[-1]['capability'] == 'network'
    granted = make(ctx=PluginContext(plugin='example_faulty', granted=frozenset({'network'})))
    assert granted.handle_event(Event(type='fault.connect')).ok
    unguarded = make(guard=False)
    assert unguarded.handle_event(Event(type='fault.connect')).ok


def test_the_child_dies_with_a_sigkilled_host_even_when_started_from_a_worker_thread(tmp_path):
    """A host process starts a sandboxed plugin from a thread that then ends (as an executor or
    request thread would), gets its pid, sets it hanging (so it reads no more of its stdin and
    would not notice the host's end by itself), and is SIGKILLed: the child must go too
    (bringup.processes: PR_SET_PDEATHSIG, forked on a thread that lives as long as the host)."""
    import subprocess
    import sys
    import textwrap
    import time
    host = textwrap.dedent(f"""
        import threading, time
        from loom_ros.bus.event import Event
        from loom_ros.plugins.sandbox.subprocess import SubprocessPlugin
        box = {{}}
        def start():
            box['p'] = SubprocessPlugin({FAULTY!r}, call_timeout_s={GENEROUS_S})
        t = threading.Thread(target=start); t.start(); t.join()
        reply = box['p'].handle_event(Event(type='fault.pid'))
        print(reply.events[0].payload.decode() if reply.ok else 'failed: ' + reply.error,
              flush=True)
        box['p'].handle_event(Event(type='fault.hang'))
    """)
    proc = subprocess.Popen([sys.executable, '-c', host], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.isdigit(), line
        child = int(line)
        assert not gone(child)

        def hanging():   # waiting in the plugin's Event.wait, no longer in a read of its pipe
            with open(f'/proc/{child}/wchan') as wchan:
                return 'futex' in wchan.read()
        deadline = time.monotonic() + GENEROUS_S
        while not hanging():
            assert time.monotonic() < deadline, 'the child never took the hang request'
            time.sleep(0.01)
        proc.kill()
        proc.wait(GENEROUS_S)
        deadline = time.monotonic() + GENEROUS_S
        while not ended(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended(child), 'the sandbox child outlived its SIGKILLed host'
    finally:
        proc.kill()
        proc.wait()
