"""Subprocess plugins with real child processes: a plugin answers from its child; crashes, hangs,
memory hogs and CPU burners are detected, reported with a reason, restarted or marked FAILED, and
the test process (the host) keeps running throughout."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import (HealthState, Plugin, PluginContext, PluginError)
from loom_ros.plugins.sandbox import sandboxed_plugin
from loom_ros.plugins.sandbox.subprocess import (CHILD_ENVIRONMENT, MAX_CHILD_AUDIT_CHARS,
                                                 MAX_CHILD_AUDIT_RECORDS, SubprocessPlugin)
from loom_ros.plugins.sandbox.wire import MAX_FRAME_BYTES
from loom_ros.security.audit import AuditLog

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


def child_pid(plugin: SubprocessPlugin, kind: str = 'fault.pid') -> int:
    response = plugin.handle_event(Event(type=kind))
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


# -- a hostile child (sandbox_hostile.py): the host's memory, environment and audit log ---------
HOSTILE = 'sandbox_hostile:HostilePlugin'
SECRET = 'sk-live-the-hosts-own-secret'


@pytest.fixture
def hostile(make, monkeypatch, tmp_path):
    """Start HostilePlugin (importable in the child through PYTHONPATH) with a real audit log;
    the host's environment holds a secret."""
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
        p for p in (str(Path(__file__).parent), os.environ.get('PYTHONPATH')) if p))
    monkeypatch.setenv('LOOM_CLOUD_CHAT_KEY', SECRET)
    log = AuditLog(tmp_path / 'audit.db')

    def start(**options):
        return make(HOSTILE, PluginContext(plugin='hostile', audit_sink=log), **options)
    start.log = log
    yield start
    log.close()


def rss_bytes() -> int:
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def wait_until(condition, what: str, limit_s: float = GENEROUS_S) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f'timed out waiting until {what}'
        time.sleep(0.01)


def test_the_child_gets_an_allowlisted_environment_not_the_hosts_secrets(hostile, monkeypatch):
    monkeypatch.setenv('LOOM_PASSED_ON', 'asked for')
    plugin = hostile(pass_env=['LOOM_PASSED_ON'])
    response = plugin.handle_event(Event(type='hostile.env'))
    assert response.ok, response.error
    env = json.loads(response.events[0].payload)
    assert 'LOOM_CLOUD_CHAT_KEY' not in env and SECRET not in json.dumps(env)
    assert env['LOOM_PASSED_ON'] == 'asked for'
    assert env['LOOM_SANDBOX_TOKEN'] and str(Path(__file__).parent) in env['PYTHONPATH']
    assert set(env) <= CHILD_ENVIRONMENT | {'LOOM_PASSED_ON', 'LOOM_SANDBOX_TOKEN'} | {
        name for name in env if name.startswith('LC_')}


def test_the_audit_log_keeps_no_stderr_of_a_dead_child(hostile):
    """A child that quotes the (private) event it was handling on stderr and dies: the caller
    and health may see its last words, the append-only audit log only their size."""
    plugin = hostile()
    canary = 'Alice Smith, DOB 1984-02-03 (canary 7f3a)'
    response = plugin.handle_event(Event(type='hostile.stderr_exit', payload=canary.encode()))
    assert not response.ok and 'exited with code 1' in response.error
    assert canary in response.error   # the caller may see why
    assert canary in plugin.health().details['last_error']
    assert plugin.handle_event(Event(type='text.in', payload=b'again')).ok   # restarted
    records = hostile.log.query()
    assert [r['kind'] for r in records] == ['sandbox_failure', 'sandbox_restart']
    assert 'canary' not in json.dumps(records)
    failure = records[0]['fields']
    assert failure['exit_code'] == 1 and failure['stderr_chars'] >= len(canary)
    assert failure['error'] == 'the child exited with code 1 while handling an event'


def test_a_child_forwards_only_its_guards_audit_records_and_only_so_many(hostile):
    plugin = hostile()
    response = plugin.handle_event(Event(type='hostile.forge_audit', payload=b'100'))
    assert response.ok, response.error
    log = hostile.log
    assert log.count(kind='actuator_command') == 0
    denied = log.query(kind='capability_denied')
    assert len(denied) == MAX_CHILD_AUDIT_RECORDS
    assert all(r['plugin'] == 'hostile' and r['fields'] == {
        'capability': 'network', 'detail': f'attempt {i}', 'reported_by': 'sandboxed_child'}
        for i, r in enumerate(denied))
    [summary] = log.query(kind='sandbox_audit_refused')
    dropped = 100 + 1 - MAX_CHILD_AUDIT_RECORDS   # 101 real denials, 32 written
    assert (summary['fields']['refused'], summary['fields']['dropped']) == (100, dropped)
    stats = plugin.stats
    assert (stats['audit_refused'], stats['audit_dropped'], stats['denied']) == (
        100, dropped, MAX_CHILD_AUDIT_RECORDS)
    assert log.count() == MAX_CHILD_AUDIT_RECORDS + 1


def test_the_fields_a_child_forwards_are_bounded(hostile):
    plugin = hostile()
    assert plugin.handle_event(Event(type='hostile.forge_audit', payload=b'0')).ok
    [record] = hostile.log.query(kind='capability_denied')
    assert record['fields'] == {'capability': 'x' * MAX_CHILD_AUDIT_CHARS, 'detail': 'list',
                                'reported_by': 'sandboxed_child'}


def test_a_frame_for_another_request_is_a_protocol_violation(hostile):
    plugin = hostile()
    pid = child_pid(plugin, 'hostile.pid')
    response = plugin.handle_event(Event(type='hostile.wrong_seq'))
    assert not response.ok
    assert 'broke the protocol while handling an event' in response.error
    assert 'answers another request' in response.error and gone(pid)
    assert plugin.stats['protocol_violations'] == 1 and plugin.stats['crashes'] == 0
    assert upper(plugin) == b'still here'
    [failure] = hostile.log.query(kind='sandbox_failure')
    assert 'broke the protocol' in failure['fields']['error']


def test_frames_nobody_asked_for_stop_the_child_not_the_hosts_memory(hostile):
    """A thread of the child writes 1 MB frames after the answer (the host's queue took 3.4 GB
    of them before): the first stops the child, whose flood then ends."""
    plugin = hostile()
    pid = child_pid(plugin, 'hostile.pid')
    before = rss_bytes()
    assert plugin.handle_event(Event(type='hostile.late_flood', payload=b'1000000')).ok
    wait_until(lambda: ended(pid), 'the host stopped the flooding child')
    assert rss_bytes() - before < 64 << 20
    health = plugin.health()
    assert health.state is HealthState.DEGRADED
    assert 'while no request was waiting' in health.details['last_error']
    assert plugin.stats['protocol_violations'] == 1
    assert upper(plugin) == b'still here' and plugin.stats['restarts'] == 1


def test_a_violation_between_calls_is_counted_by_the_next_call(hostile):
    plugin = hostile()
    pid = child_pid(plugin, 'hostile.pid')
    assert plugin.handle_event(Event(type='hostile.late_flood', payload=b'10')).ok
    wait_until(lambda: ended(pid), 'the host stopped the flooding child')
    assert upper(plugin) == b'still here'   # a fresh child answers
    assert (plugin.stats['protocol_violations'], plugin.stats['restarts']) == (1, 1)
    assert [r['kind'] for r in hostile.log.query()] == ['sandbox_failure', 'sandbox_restart']


@pytest.mark.parametrize('lists, reason', [
    (3_000_000, f'exceeds {MAX_FRAME_BYTES}'),     # 9 MB: refused from its header
    (300_000, 'too many elements'),                # 900 KB, ~20 MB once parsed
])
def test_oversized_answers_are_refused_before_they_are_parsed(hostile, lists, reason):
    plugin = hostile()
    response = plugin.handle_event(Event(type='hostile.big_frame', payload=str(lists).encode()))
    assert not response.ok and 'broke the protocol' in response.error
    assert reason in response.error
    assert plugin.stats['protocol_violations'] == 1
    assert upper(plugin) == b'still here'


def test_a_deeply_nested_answer_is_malformed_not_a_hang(hostile):
    """json.loads raises RecursionError, which killed the reader thread: the call then waited
    out its whole timeout and was reported as a hang."""
    plugin = hostile()
    response = plugin.handle_event(Event(type='hostile.deep', payload=b'100000'))
    assert not response.ok and 'malformed answer (too deep)' in response.error
    assert plugin.stats['timeouts'] == 0 and plugin.stats['protocol_violations'] == 1
    assert upper(plugin) == b'still here'
    shallow_enough = plugin.handle_event(Event(type='hostile.deep', payload=b'100'))
    assert 'malformed answer (too deep)' in shallow_enough.error   # parsed, over MAX_JSON_DEPTH


def test_an_event_the_wire_cannot_carry_is_refused_without_blaming_the_child(make):
    plugin = make()
    pid = child_pid(plugin)
    too_big = Event(type='text.in', payload=b'x' * (MAX_FRAME_BYTES // 4 * 3 + 1))
    response = plugin.handle_event(too_big)
    assert not response.ok and f'exceeds {MAX_FRAME_BYTES}' in response.error
    assert child_pid(plugin) == pid and plugin.stats['crashes'] == 0
