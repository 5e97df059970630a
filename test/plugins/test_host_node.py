"""The plugin_host node in its own process: lifecycle transitions from this process, the
HandleEvent and Health services per plugin, bus events in and the plugin's events out (also to
a reply_to topic), a refusal on the audit log, a failed plugin that says why, a clean exit."""
import os
import signal
import threading
from pathlib import Path

import pytest

from loom_ros.bus.event import Event
from loom_ros.bus.replies import PROBE_ANSWER
from loom_ros.plugins import registry
from loom_ros.plugins.contract import HealthState
from loom_ros.security.audit import AuditLog

HERE = Path(__file__).resolve().parent

PLUGINS = """plugins:
  - name: weather
    inputs: [tool.weather.query]
    output_topic: tool.weather.result
    config:
      forecasts:
        Lisbon: [{summary: sunny, high_c: 24, low_c: 15, rain_pct: 5}]
  - name: overstep
    plugin: overstep_plugin:OverstepPlugin
  - name: broken
    plugin: overstep_plugin:FailingInitPlugin
    required: false
  - name: unused
    plugin: weather
    enabled: false
"""


def call(ros, client, request, proc):
    """A HandleEvent sent once (the plugin counts it, a refusal is audited): only on a client
    whose reply path `matched` proved, else its answer can be lost to DDS's discovery race."""
    ros.wait_for(client.service_is_ready, f'service {client.srv_name}', alive=[proc])
    future = client.call_async(request)
    ros.wait_for(future.done, f'the answer of {client.srv_name}', alive=[proc])
    return future.result()


def matched(ros, client, proc):
    """A HandleEvent client's first exchange (bus/replies.py): the empty request, answered by
    the host without the plugin seeing it (neither handled nor audited)."""
    answer = ros.first_exchange(client, alive=[proc]).response
    assert not answer.ok and answer.error == PROBE_ANSWER, answer.error


def transition(ros, change, get_state, which, goal, proc):
    """Survives the same race: no answer, and get_state says whether it happened."""
    assert ros.transition(change, get_state, which, goal, f'transition {which}',
                          alive=[proc]), f'transition {which} failed'


@pytest.fixture
def host(ros, spawn, tmp_path, monkeypatch):
    plugins = tmp_path / 'plugins.yaml'
    plugins.write_text(PLUGINS)
    # The test plugins load by module:Class from test/plugins.
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
        p for p in (str(HERE), os.environ.get('PYTHONPATH', '')) if p))
    return spawn('-m', 'loom_ros.plugins.host_node', '--ros-args', '-r', '__ns:=/ph',
                 '-p', f'plugins_file:={plugins}', '-p', 'autostart:=false',
                 '-p', f'audit_db:={tmp_path / "audit.db"}',
                 '-p', f'data_dir:={tmp_path / "data"}')


def test_lifecycle_services_bus_and_audit_across_processes(ros, host, tmp_path):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from loom_msgs.msg import HealthStatus
    from loom_msgs.srv import HandleEvent, Health
    from rclpy.node import Node

    from loom_ros.bus.bus import EventBus
    node = ros.node
    get_state = node.create_client(GetState, '/ph/plugin_host/get_state')
    change = node.create_client(ChangeState, '/ph/plugin_host/change_state')
    state = ros.call(get_state, GetState.Request(), 'plugin_host get_state', alive=[host])
    assert state.current_state.label == 'unconfigured'
    # configure: Init of every plugin; activate: services and inputs
    transition(ros, change, get_state, Transition.TRANSITION_CONFIGURE, 'inactive', host)
    transition(ros, change, get_state, Transition.TRANSITION_ACTIVATE, 'active', host)

    handle = node.create_client(HandleEvent, '/ph/plugin_host/weather/handle_event')
    health = node.create_client(Health, '/ph/plugin_host/weather/health')
    matched(ros, handle, host)
    query = Event.with_json('tool.weather.query', {'city': 'Lisbon'}, id='q1')
    answer = call(ros, handle, HandleEvent.Request(event=query.to_msg()), host).response
    assert answer.ok, answer.error
    (out,) = [Event.from_msg(m) for m in answer.events]
    assert out.type == 'tool.weather.result' and out.json()['text'].startswith('Lisbon: sunny')
    assert out.metadata['in_reply_to'] == 'q1' and answer.latency_ms > 0
    status = ros.call(health, Health.Request(), 'weather health', alive=[host]).status
    assert (status.plugin, status.level) == ('weather', HealthStatus.OK)
    assert {kv.key: kv.value for kv in status.details}['handled'] == '1'

    # What an agent in another process gets: the same calls, through the services.
    remote = registry.plugin_handle('weather', node, host='/ph/plugin_host')
    assert isinstance(remote, registry.ServicePlugin)
    # Its clients make their own first exchanges (a probe each), so no answer is lost and the
    # plugin never sees a probe: 'calls' counts the two queries only.
    box = {}
    worker = threading.Thread(target=lambda: box.update(answer=remote.handle_event(query),
                                                        health=remote.health()))
    worker.start()  # it blocks until answered, so this thread spins meanwhile
    ros.wait_for(lambda: not worker.is_alive(), 'the remote calls', alive=[host])
    assert box['answer'].ok and box['answer'].events[0].json()['city'] == 'Lisbon'
    assert box['health'].state is HealthState.OK and box['health'].details['handled'] == '2'
    assert box['health'].details['calls'] == '2' and 'bad_input' not in box['health'].details

    # Bus: an event on the plugin's input topic comes back on its output topic, or reply_to.
    feeder = Node('ph_feeder', namespace='/ph', context=node.context)
    ros.executor.add_node(feeder)
    bus = EventBus(feeder)
    results, replies = [], []
    bus.subscribe('tool.weather.result', lambda e, t: results.append(e))
    bus.subscribe('test.replies', lambda e, t: replies.append(e))
    pub = bus.publisher_for('tool.weather.query')
    try:
        ros.wait_for(lambda: pub.get_subscription_count() >= 1, 'the host to subscribe',
                     alive=[host])
        bus.publish('tool.weather.query', Event.with_json('tool.weather.query',
                                                          {'text': 'weather in lisbon?'},
                                                          id='b1'))
        bus.publish('tool.weather.query', Event.with_json(
            'tool.weather.query', {'city': 'Lisbon'}, id='b2',
            metadata={'reply_to': 'test.replies'}))
        bus.flush()
        ros.wait_for(lambda: results and replies, 'the results on the bus', alive=[host])
        assert [e.metadata['in_reply_to'] for e in results] == ['b1']
        assert [e.metadata['in_reply_to'] for e in replies] == ['b2']
        assert results[0].source == 'weather'
    finally:
        bus.destroy()
        ros.executor.remove_node(feeder)
        feeder.destroy_node()

    # The overstepping plugin is refused through the service too, and it is on the audit log.
    overstep = node.create_client(HandleEvent, '/ph/plugin_host/overstep/handle_event')
    matched(ros, overstep, host)   # refused before the plugin: nothing on the audit log
    refused = call(ros, overstep, HandleEvent.Request(event=Event.with_json(
        'try', {'try': 'require_network'}).to_msg()), host).response
    assert not refused.ok and "plugin 'overstep' may not use 'network'" in refused.error
    audit = AuditLog(tmp_path / 'audit.db')
    denied = audit.query(kind='capability_denied')
    assert [(r['plugin'], r['fields']['capability']) for r in denied] == [('overstep', 'network')]
    assert {r['plugin'] for r in audit.query(kind='plugin_init')} == {'weather', 'overstep'}
    audit.close()

    # A plugin that failed Init has services that say why; a disabled entry has none.
    broken = node.create_client(Health, '/ph/plugin_host/broken/health')
    status = ros.call(broken, Health.Request(), 'broken health', alive=[host]).status
    assert status.level == HealthStatus.FAILED and 'truncated' in status.message
    assert not any('unused' in name for name, _ in node.get_service_names_and_types())

    transition(ros, change, get_state, Transition.TRANSITION_DEACTIVATE, 'inactive', host)
    ros.wait_for(lambda: not handle.service_is_ready(), 'the services to go', alive=[host])
    # cleanup: Shutdown of every plugin
    transition(ros, change, get_state, Transition.TRANSITION_CLEANUP, 'unconfigured', host)
    host.popen.send_signal(signal.SIGINT)
    code, _, err = host.finish()
    assert code == 0, err


def test_selection_runs_every_enabled_entry_or_the_named_ones_and_names_what_is_missing():
    """The `plugins` parameter: '*' (or '') every enabled entry; names run even when disabled,
    each once; an unknown name names the file and what it has (embedded.pick_specs' rules)."""
    from loom_ros.plugins.host import PluginsFileError, parse_specs
    from loom_ros.plugins.host_node import select_specs
    specs = parse_specs([{'name': 'weather', 'inputs': ['tool.weather.query'],
                          'output_topic': 'tool.weather.result'},
                         {'name': 'calendar', 'enabled': False}])
    assert [s.name for s in select_specs(specs, ' * ', 'plugins.yaml')] == ['weather']
    assert [s.name for s in select_specs(specs, '', 'plugins.yaml')] == ['weather']
    picked = select_specs(specs, 'calendar, weather,calendar', 'plugins.yaml')
    assert [(s.name, s.enabled) for s in picked] == [('calendar', True), ('weather', True)]
    with pytest.raises(PluginsFileError, match=r"plugins.yaml: no plugin 'radio' \(have: "
                                               r"weather, calendar\)"):
        select_specs(specs, 'weather,radio', 'plugins.yaml')
