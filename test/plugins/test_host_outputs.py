"""What a plugin's answer may carry out of the host: the host names who answered and to what
(source, in_reply_to), a sandboxed plugin writes only the event types it declared, an answer
holds a bounded number of events, a plugin cannot rename its own audit records, health() does
not wait for a running call, and a plugin whose output topic is among its inputs is not fed
its own answers (real WASM modules, a real plugin host node on the bus)."""
import json
import threading
from pathlib import Path

import pytest

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import (
    HealthState, Plugin, PluginContext, PluginMetadata, PluginResponse, PluginType,
)
from loom_ros.plugins.host import (
    BUSY_DEGRADED_S, MAX_RESPONSE_EVENTS, PluginHost, parse_specs,
)
from loom_ros.security.audit import AuditLog

HERE = Path(__file__).resolve().parent


def answering_module(tmp_path: Path, name: str, answer: dict, writes=('text.out',)) -> Path:
    """A WASM plugin (text format, with its metadata sidecar) that answers `answer` to any
    event: what a hostile module can hand the host."""
    data = json.dumps(answer).encode()
    escaped = ''.join(f'\\{b:02x}' for b in data)
    pages = (65536 + len(data)) // 65536 + 2
    module = tmp_path / f'{name}.wat'
    module.write_text(f'''(module
  (memory (export "memory") {pages})
  (data (i32.const 65536) "{escaped}")
  (func (export "alloc") (param i32) (result i32) (i32.const 16))
  (func (export "handle") (param i32 i32) (result i64)
    (i64.or (i64.shl (i64.const 65536) (i64.const 32)) (i64.const {len(data)}))))
''')
    (tmp_path / f'{name}.yaml').write_text(
        f'name: {name}_claimed\ntype: feature_extractor\nreads: [text.in]\n'
        f'writes: [{", ".join(writes)}]\n')
    return module


@pytest.fixture
def make_host(tmp_path):
    hosts, logs = [], []

    def make(*entries):
        log = AuditLog(tmp_path / f'audit{len(logs)}.db')
        logs.append(log)
        host = PluginHost(parse_specs(list(entries)), audit_sink=log, data_dir=tmp_path / 'd')
        hosts.append(host)
        assert host.start() == {}
        return host
    yield make
    for host in hosts:
        host.stop()
    for log in logs:
        log.close()


def test_the_host_names_who_answered_and_to_what(make_host, tmp_path):
    """A sandboxed plugin's events came back under its own metadata name and with whatever
    in_reply_to it wrote: the host now sets both (the entry's name, the question's id)."""
    module = answering_module(tmp_path, 'forger', {'events': [
        {'type': 'text.out', 'source': 'operator_console',
         'metadata': {'in_reply_to': 'someone-else'}, 'payload': 'x'}]})
    host = make_host({'name': 'forger', 'plugin': str(module), 'mode': 'wasm'})
    question = Event(type='text.in', payload=b'hi', source='mic')
    response = host.handle('forger', question)
    assert response.ok, response.error
    out, = response.events
    assert out.source == 'forger' and out.metadata['in_reply_to'] == question.id
    assert host.counters('forger')['source_replaced'] == 1
    # The shipped example: its metadata says wasm_upper, the entry says upper.
    upper = make_host({'name': 'upper', 'plugin': str(HERE / 'wasm' / 'upper.wat'),
                       'mode': 'wasm'})
    out, = upper.handle('upper', Event(type='text.in', payload=b'hi')).events
    assert out.source == 'upper' and out.payload == b'HI'
    # a plugin naming itself (by its metadata name, or plugin/<it>) claims nobody else's name
    assert upper.counters('upper').get('source_replaced', 0) == 0


def test_a_sandboxed_plugin_writes_only_the_types_it_declared(make_host, tmp_path):
    module = answering_module(tmp_path, 'mover', {'events': [
        {'type': 'robot.move', 'payload': json.dumps({'linear_x': 1.0})}]})
    host = make_host({'name': 'mover', 'plugin': str(module), 'mode': 'wasm'})
    response = host.handle('mover', Event(type='text.in', payload=b'hi'))
    assert not response.ok and "type 'robot.move'" in response.error
    assert 'writes: text.out' in response.error
    assert host.counters('mover')['bad_output'] == 1
    # Exact types only: the declaration is the plugin's own word, and '**' would allow anything.
    module = answering_module(tmp_path, 'anything', {'events': [{'type': 'robot.move'}]},
                              writes=("'**'", 'text.out'))
    host = make_host({'name': 'anything', 'plugin': str(module), 'mode': 'wasm'})
    response = host.handle('anything', Event(type='text.in'))
    assert not response.ok and "type 'robot.move'" in response.error


def test_an_answer_holds_a_bounded_number_of_events(make_host, tmp_path):
    """60,000 events from one WASM call were all accepted (and published) before."""
    one = {'type': 'text.out', 'payload': 'x'}
    at = answering_module(tmp_path, 'at', {'events': [one] * MAX_RESPONSE_EVENTS})
    over = answering_module(tmp_path, 'over', {'events': [one] * (MAX_RESPONSE_EVENTS + 1)})
    host = make_host({'name': 'at', 'plugin': str(at), 'mode': 'wasm'},
                     {'name': 'over', 'plugin': str(over), 'mode': 'wasm'})
    assert len(host.handle('at', Event(type='text.in')).events) == MAX_RESPONSE_EVENTS
    response = host.handle('over', Event(type='text.in'))
    assert not response.ok and f'{MAX_RESPONSE_EVENTS + 1} events' in response.error
    assert host.counters('over')['bad_output'] == 1


def test_a_plugin_cannot_rename_or_redate_its_audit_records():
    records = []
    ctx = PluginContext(plugin='hostile', audit_sink=records.append)
    ctx.audit('ui_update', plugin='robot_control', ts_ms=0, detail='d')
    record, = records
    assert (record['plugin'], record['kind'], record['detail']) == ('hostile', 'ui_update', 'd')
    assert record['ts_ms'] > 0


class Slow(Plugin):
    """Holds its call until the test lets it go."""

    metadata = PluginMetadata(name='slow', type=PluginType.TOOL)
    entered = threading.Event()
    release = threading.Event()

    def handle_event(self, event):
        Slow.entered.set()
        Slow.release.wait(30)
        return PluginResponse()


def test_health_does_not_wait_for_a_running_call(make_host):
    """The health service and /diagnostics waited on the slot's lock for as long as a call
    took (up to its timeout, or for ever for a hung in-process plugin)."""
    host = make_host({'name': 'slow', 'plugin': f'{__name__}:Slow'})
    caller = threading.Thread(target=host.handle, args=('slow', Event(type='t')), daemon=True)
    caller.start()
    try:
        assert Slow.entered.wait(30)
        status = host.health('slow')   # would block until release
        assert status.state is HealthState.OK and status.message.startswith('busy')
        # A call that runs on and on is reported, not OK for ever (the clock is moved, not
        # waited for).
        host.slots['slow'].call_started -= BUSY_DEGRADED_S + 1
        status = host.health('slow')
        assert status.state is HealthState.DEGRADED and 'running for 1' in status.message
    finally:
        Slow.release.set()
        caller.join(30)
    assert host.health('slow').message == '' and host.counters('slow')['handled'] == 1


LOOP = """plugins:
  - name: upper
    plugin: {module}
    mode: wasm
    inputs: ['text.*']
    output_topic: text.upper
"""


def test_a_plugin_is_not_fed_its_own_answers(ros, bus, tmp_path):
    """Its output topic is among its inputs: each answer comes back to the host on the bus.
    The host node drops its own plugin's events by their source, which for a sandboxed plugin
    was its metadata name (wasm_upper, not upper): three inputs were handled 427,866 times."""
    from rclpy.parameter import Parameter

    from loom_ros.plugins.host_node import PluginHostNode
    plugins = tmp_path / 'loop.yaml'
    plugins.write_text(LOOP.format(module=HERE / 'wasm' / 'upper.wat'))
    node = PluginHostNode(parameter_overrides=[
        Parameter('plugins_file', value=str(plugins)),
        Parameter('audit_db', value=str(tmp_path / 'audit.db')),
        Parameter('data_dir', value=str(tmp_path / 'data')),
        Parameter('autostart', value=False)])
    try:
        node.trigger_configure()
        node.trigger_activate()
        ros.executor.add_node(node)
        # the session node's fresh bus (conftest): create_bus would declare bus.* parameters
        # on that shared node a second time when another test of this worker already had
        # The plugin's input pattern attaches to both topics once it has seen them (volatile
        # events before that reach nobody): the answers' topic included, so they come back.
        for topic in ('text.in', 'text.upper'):
            bus.publisher_for(topic)
            ros.wait_for(lambda: node.bus.matched_publishers(topic) >= 1, f'{topic} attached')
        for _ in range(3):
            bus.publish('text.in', Event(type='text.in', payload=b'hello'))
        # Every answer has come back to the host's subscription once this holds.
        ros.wait_for(lambda: node.bus.stats.received['text.upper'] >= 3, 'the answers back')
        assert node.host.counters('upper')['handled'] == 3
        assert node.stats['published'] == 3
    finally:
        ros.executor.remove_node(node)
        node.trigger_deactivate()
        node.trigger_cleanup()
        node.destroy_node()
