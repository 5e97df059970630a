"""The plugin host's pure core: loading by entry point or module:Class, grants (declared AND
config AND host), refusals raised in the plugin and audited, crashing and failing plugins
isolated, actuator commands audited, same-process calls without serialization, the sandbox seam."""
import json
import os
import socket
from pathlib import Path

import pytest

from loom_ros.bus.event import Event, Privacy
from loom_ros.plugins import registry
from loom_ros.plugins.contract import CapabilityDenied, HealthState, PluginContext, PluginMetadata
from loom_ros.plugins.host import (
    PluginHost, PluginsFileError, PluginSpec, load_plugins_file, parse_specs,
)
from loom_ros.security.audit import AuditLog
from loom_ros.security.capabilities import CapabilityConfigError, acting_as, grant

WEATHER = {'forecasts': {'Lisbon': [{'summary': 'sunny', 'high_c': 24, 'low_c': 15}],
                         'Tokyo': [{'summary': 'clear', 'high_c': 18, 'low_c': 10}]}}
OVERSTEP = 'overstep_plugin:OverstepPlugin'


@pytest.fixture
def audit(tmp_path):
    log = AuditLog(tmp_path / 'audit.db')
    yield log
    log.close()


@pytest.fixture
def make_host(audit, tmp_path):
    hosts = []

    def make(*entries, **kwargs):
        host = PluginHost(parse_specs(list(entries)), audit_sink=audit,
                          data_dir=tmp_path / 'data', **kwargs)
        hosts.append(host)
        return host
    yield make
    for host in hosts:
        host.stop()


class Listener:
    """A real TCP listener on 127.0.0.1: proves whether a refused plugin ever connected (a
    completed connect is in the accept queue before connect() returns)."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(('127.0.0.1', 0))
        self.server.listen(8)
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]

    def accepted(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self.server.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.server.close()


def ask(host, name, what, target=''):
    return host.handle(name, Event.with_json('try', {'try': what, 'target': str(target)}))


def test_loads_by_entry_point_and_by_module_path_and_answers(make_host, audit):
    host = make_host({'name': 'weather', 'config': WEATHER},
                     {'name': 'overstep', 'plugin': OVERSTEP})
    assert host.start() == {}
    assert host.running() == ['weather', 'overstep']
    response = host.handle('weather', Event.with_json('tool.weather.query', {'city': 'lisbon'},
                                                      privacy=Privacy.PRIVATE))
    assert response.ok, response.error
    (out,) = response.events
    assert out.type == 'tool.weather.result' and out.json()['city'] == 'Lisbon'
    assert out.source == 'weather' and out.privacy is Privacy.PRIVATE  # as private as the query
    assert out.metadata['in_reply_to'] and response.latency_ms > 0
    # Privacy stated only in the question's metadata still binds the answer (issue 13, fault 4).
    (out,) = host.handle('weather', Event.with_json(
        'tool.weather.query', {'city': 'lisbon'}, metadata={'privacy': 'local_only'})).events
    assert out.privacy is Privacy.LOCAL_ONLY
    inits = audit.query(kind='plugin_init')
    assert [(r['plugin'], r['fields']['granted']) for r in inits] == [('weather', []),
                                                                       ('overstep', [])]


def test_grant_is_declared_and_configured_and_allowed():
    meta = PluginMetadata(name='w', type='tool', capabilities=('storage.read', 'network'))
    assert grant('w', meta, ['network']) == {'network'}
    assert grant('w', meta, []) == frozenset()          # nothing unless config grants it
    with pytest.raises(CapabilityConfigError, match=r"granted storage.write in config but "
                                                    r"does not declare it"):
        grant('w', meta, ['network', 'storage.write'])
    with pytest.raises(CapabilityConfigError, match="unknown capability 'telepathy'"):
        grant('w', meta, ['telepathy'])
    with pytest.raises(CapabilityConfigError, match='this host does not allow it'):
        grant('w', meta, ['network'], allowed=['storage.read'])


def test_a_grant_the_plugin_did_not_declare_is_refused_at_init_and_the_others_start(
        make_host, audit):
    host = make_host({'name': 'overstep', 'plugin': OVERSTEP, 'grants': ['network']},
                     {'name': 'weather', 'config': WEATHER},
                     {'name': 'missing', 'plugin': 'no_such_plugin'})
    failed = host.start()
    assert set(failed) == {'overstep', 'missing'}
    assert "granted network in config but does not declare it" in failed['overstep']
    assert "no plugin 'no_such_plugin'" in failed['missing'] and 'weather' in failed['missing']
    assert host.running() == ['weather']
    refused = host.handle('overstep', Event(type='x'))
    assert not refused.ok and 'not running (failed: ' in refused.error
    health = host.health('overstep')
    assert health.state is HealthState.FAILED and 'does not declare it' in health.message
    assert {r['plugin'] for r in audit.query(kind='init_failed')} == {'overstep', 'missing'}


def test_overstepping_plugin_is_refused_every_way_and_each_refusal_is_audited(
        make_host, audit, listener, tmp_path):
    host = make_host({'name': 'overstep', 'plugin': OVERSTEP})
    host.start()
    port = listener.port
    cases = {
        'require_network': ('network', ''),
        'network': ('network', port),
        'storage_write': ('storage.write', tmp_path / 'written.txt'),
        'sqlite_write': ('storage.write', tmp_path / 'written.db'),
    }
    for what, (capability, target) in cases.items():
        response = ask(host, 'overstep', what, target)
        assert not response.ok, what
        assert f"plugin 'overstep' may not use '{capability}'" in response.error, response.error
    assert listener.accepted() == 0                      # the connection never happened
    assert not (tmp_path / 'written.txt').exists() and not (tmp_path / 'written.db').exists()

    swallowed = ask(host, 'overstep', 'swallow', port)  # caught by the plugin: still on record
    assert swallowed.ok and listener.accepted() == 0
    spawned = ask(host, 'overstep', 'spawn')   # a child is outside the guard: needs a grant
    assert not spawned.ok and "may not use 'process.spawn'" in spawned.error
    assert 'subprocess.Popen' in spawned.error

    denied = audit.query(plugin='overstep', kind='capability_denied')
    assert [r['fields']['capability'] for r in denied] == [
        'network', 'network', 'storage.write', 'storage.write', 'network', 'process.spawn']
    assert 'socket' in denied[1]['fields']['detail']
    assert str(tmp_path / 'written.txt') in denied[2]['fields']['detail']
    counters = host.counters('overstep')
    assert counters['denied'] == 6 and counters['failed'] == 5 and counters['handled'] == 1
    assert host.health('overstep').details['denied'] == '6'


def test_declared_network_works_only_when_granted(make_host, audit, listener):
    port = listener.port
    granted = make_host({'name': 'net_on', 'plugin': 'overstep_plugin:NetworkPlugin',
                         'grants': ['network']})
    refused = make_host({'name': 'net_off', 'plugin': 'overstep_plugin:NetworkPlugin'})
    granted.start()
    refused.start()
    ok = granted.handle('net_on', Event.with_json('go', {'port': port}))
    assert ok.ok, ok.error
    no = refused.handle('net_off', Event.with_json('go', {'port': port}))
    assert not no.ok and "may not use 'network' (connect)" in no.error
    assert listener.accepted() == 1
    assert [r['plugin'] for r in audit.query(kind='capability_denied')] == ['net_off']


def test_the_guard_is_off_outside_plugin_calls_and_per_thread(make_host, tmp_path):
    host = make_host({'name': 'overstep', 'plugin': OVERSTEP})
    host.start()
    ask(host, 'overstep', 'storage_write', tmp_path / 'refused.txt')
    (tmp_path / 'host_may.txt').write_text('the host itself is not a plugin')
    ctx = PluginContext(plugin='p', granted=frozenset())
    with acting_as(ctx):
        with pytest.raises(CapabilityDenied):
            open(tmp_path / 'x.txt', 'w')
        with pytest.raises(CapabilityDenied, match='storage.read'):  # reads are checked too
            (tmp_path / 'host_may.txt').read_text()
        assert Path(pytest.__file__).read_text()   # the runtime's own files need no grant
    assert (tmp_path / 'host_may.txt').read_text()   # the host itself is not checked


def test_a_crashing_plugin_is_isolated_and_counted(make_host):
    host = make_host({'name': 'overstep', 'plugin': OVERSTEP},
                     {'name': 'weather', 'config': WEATHER},
                     {'name': 'broken', 'plugin': 'overstep_plugin:FailingInitPlugin'})
    failed = host.start()
    assert failed == {'broken': 'model file model.tflite is truncated (12 of 4096 bytes)'}
    crash = ask(host, 'overstep', 'crash')
    assert not crash.ok and crash.error == 'plugin overstep raised RuntimeError: boom'
    bad = ask(host, 'overstep', 'bad_output')
    assert not bad.ok and 'produced an invalid event: missing_type' in bad.error
    assert ask(host, 'overstep', 'nothing').ok                  # still serving
    assert host.handle('weather', Event.with_json('tool.weather.query', {'city': 'Tokyo'})).ok
    counters = host.counters('overstep')
    assert (counters['raised'], counters['bad_output'], counters['handled']) == (1, 1, 1)
    assert host.health('broken').state is HealthState.FAILED
    malformed = host.handle('weather', Event(type='tool.weather.query', confidence=7.0))
    assert not malformed.ok and 'bad_confidence' in malformed.error
    assert host.counters('weather')['bad_input'] == 1
    unknown = host.handle('nobody', Event(type='x'))
    assert not unknown.ok and "no plugin 'nobody'" in unknown.error


def test_every_actuator_command_is_audited(make_host, audit):
    host = make_host({'name': 'arm', 'plugin': 'overstep_plugin:EchoActuator',
                      'grants': ['actuator.motion']},
                     {'name': 'arm_ungranted', 'plugin': 'overstep_plugin:EchoActuator'})
    host.start()
    for i in range(3):
        assert host.handle('arm', Event(type='move', id=f'm{i}', payload=b'{"x":1}')).ok
    assert not host.handle('arm_ungranted', Event(type='move', id='u0')).ok
    commands = audit.query(kind='actuator_command')
    assert [(r['plugin'], r['fields']['event_id']) for r in commands] == [
        ('arm', 'm0'), ('arm', 'm1'), ('arm', 'm2'), ('arm_ungranted', 'u0')]
    assert commands[0]['fields']['payload'] == '{"x":1}'
    assert audit.query(plugin='arm_ungranted', kind='capability_denied')


def test_actuator_audit_keeps_no_words_of_a_subject_or_a_private_event(make_host, audit):
    """The audit log is append-only and `forget` cannot reach it: a command that names a data
    subject, or is more than Public, is on record by id, type and size only."""
    host = make_host({'name': 'arm', 'plugin': 'overstep_plugin:EchoActuator',
                      'grants': ['actuator.motion']})
    host.start()
    said = b'{"text": "alice told me her address"}'
    done = host.handle('arm', Event(type='say', id='s0', payload=said,
                                    metadata={'loom.subject': 'alice'}))
    # what a plugin answers about alice names her too (consent and erasure find it)
    assert done.ok and done.events[0].metadata['loom.subject'] == 'alice'
    assert host.counters('arm')['subject_carried'] == 1
    assert host.handle('arm', Event(type='say', id='s1', payload=said,
                                    privacy=Privacy.PRIVATE)).ok
    assert host.handle('arm', Event(type='say', id='s2', payload=said,
                                    metadata={'loom.privacy': 'sensitive'})).ok
    assert host.handle('arm', Event(type='say', id='s3', payload=said,
                                    metadata={'loom.subject': 'not a valid id!'})).ok
    assert host.handle('arm', Event(type='say', id='s4', payload=said)).ok   # Public, anonymous
    payloads = {r['fields']['event_id']: r['fields']['payload']
                for r in audit.query(kind='actuator_command')}
    assert payloads['s4'] == said.decode()
    for withheld in ('s0', 's1', 's2', 's3'):
        assert 'address' not in payloads[withheld] and 'alice' not in payloads[withheld]
        assert payloads[withheld].startswith(f'<{len(said)} characters withheld')
    assert 'data subject' in payloads['s0'] and 'private' in payloads['s1']


def test_an_answer_stays_with_its_questions_data_subject(make_host):
    """A plugin cannot move what it derives from one person's question into another's record
    (their export would hold it), nor make it anonymous; a present but empty subject is someone
    unnamed ('..', no consent); an answer to an anonymous question may name whom it found; an
    answer is at least as private as its question."""
    from loom_ros.bus.privacy import SubjectError, event_subject
    host = make_host({'name': 'overstep', 'plugin': OVERSTEP})
    host.start()

    def ask_as(what, target='', privacy=Privacy.PUBLIC, **metadata):
        return host.handle('overstep', Event.with_json(
            'try', {'try': what, 'target': target}, privacy=privacy, metadata=metadata))
    unnamed = ask_as('nothing', **{'loom.subject': ''})
    assert unnamed.ok and unnamed.events[0].metadata['loom.subject'] == '..'
    with pytest.raises(SubjectError):
        event_subject(unnamed.events[0])
    for question, answer in (('alice', 'bob'), ('alice', ''), ('', 'bob')):
        moved = ask_as('refile', answer, Privacy.PRIVATE, **{'loom.subject': question})
        assert not moved.ok and moved.events == []
        assert 'another data subject' in moved.error and 'bob' not in moved.error
    assert host.counters('overstep')['bad_output'] == 3
    kept = ask_as('refile', 'alice', Privacy.PRIVATE, **{'loom.subject': 'alice'})
    assert kept.ok and kept.events[0].metadata['loom.subject'] == 'alice'
    assert kept.events[0].privacy == Privacy.PRIVATE          # its Public answer raised
    found = ask_as('refile', 'bob')                            # an anonymous question
    assert found.ok and event_subject(found.events[0]) == 'bob'


def test_same_process_calls_pass_event_objects_without_serialization(make_host):
    host = make_host({'name': 'recorder', 'plugin': 'overstep_plugin:RecorderPlugin'},
                     {'name': 'weather', 'config': WEATHER})
    host.start()
    registry.register(host)
    try:
        handle = registry.plugin_handle('recorder')     # what an agent in this process gets
        event = Event(type='hello', payload=b'x' * 100_000, metadata={'k': 'v'})
        assert handle.handle_event(event).ok
        seen = host.slots['recorder'].plugin.seen[-1]
        # Not serialized: the same payload object, in a copy of the event that is the plugin's
        # to change (metadata and tags its own), since the caller's may be every subscriber's.
        assert seen == event and seen.payload is event.payload
        assert seen is not event and seen.metadata is not event.metadata
        # A plugin calls another through ctx.direct, still through the host (counted).
        chained = handle.handle_event(Event(type='recorder.ask_weather'))
        assert chained.ok and chained.events[0].json()['city'] == 'Tokyo'
        assert host.counters('weather')['handled'] == 1
        assert set(registry.local_plugins()) == {'recorder', 'weather'}
        other = PluginHost(parse_specs([{'name': 'weather', 'config': WEATHER}]))
        other.start()
        with pytest.raises(Exception, match="'weather' is already served by another host"):
            registry.register(other)
        other.stop()
    finally:
        registry.unregister(host)
    assert registry.local_plugins() == {}
    with pytest.raises(Exception, match='does not run in this process'):
        registry.plugin_handle('recorder')


def test_sandbox_seam_runs_the_same_plugin_in_a_child_process(make_host):
    host = make_host({'name': 'weather_sandboxed', 'plugin': 'weather', 'mode': 'subprocess',
                      'config': WEATHER})
    assert host.start() == {}
    response = host.handle('weather_sandboxed',
                           Event.with_json('tool.weather.query', {'text': 'Tokyo please'}))
    assert response.ok, response.error
    assert response.events[0].json()['city'] == 'Tokyo'


def test_a_child_that_dies_in_init_is_reported_but_its_stderr_is_not_audited(
        make_host, audit, monkeypatch):
    """The caller and the log may see the child's last words; the audit log keeps the host's
    (a child may quote a secret or, in a call, the private event it was handling)."""
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
        p for p in (str(Path(__file__).parent), os.environ.get('PYTHONPATH')) if p))
    canary = 'canary-4be1 token sk-live-0000'
    host = make_host({'name': 'dies', 'plugin': 'sandbox_hostile:DiesInInitPlugin',
                      'mode': 'subprocess', 'config': {'canary': canary}})
    failed = host.start()
    assert canary in failed['dies'] and 'exited with code 5' in failed['dies']
    [record] = audit.query(kind='init_failed')
    assert canary not in json.dumps(record) and 'canary' not in json.dumps(record)
    assert record['fields']['error'] == \
        "plugin 'dies' died during init: the child exited with code 5 while init"


def test_plugins_file_errors_name_the_entry(tmp_path):
    with pytest.raises(PluginsFileError, match="plugin name 'a' appears twice"):
        parse_specs([{'name': 'a'}, {'name': 'a'}])
    with pytest.raises(PluginsFileError, match=r"plugin 'w': inputs: .*starts with a digit"):
        parse_specs([{'name': 'w', 'inputs': ['tool.9x']}])
    with pytest.raises(PluginsFileError, match=r"plugin 'bad-name': name: .*single underscores"):
        parse_specs([{'name': 'bad-name'}])
    with pytest.raises(PluginsFileError, match=r"plugin 'w': mode: "):
        parse_specs([{'name': 'w', 'mode': 'docker'}])
    path = tmp_path / 'plugins.yaml'
    path.write_text('plugins: {weather: 1}\n')
    with pytest.raises(PluginsFileError, match='expected a mapping with a `plugins:` list'):
        load_plugins_file(path)
    shipped = load_plugins_file(__import__('loom_ros.config.params', fromlist=['x'])
                                .config_dir() / 'plugins.yaml')
    assert isinstance(shipped[0], PluginSpec) and shipped[0].output == 'tool.weather.result'
