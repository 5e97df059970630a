"""The actuator plugins on a real rclpy node, observed over DDS from a second node: clamped and
ramped cmd_vel, the e-stop topic, the watchdog stop, refusal without the grant, and rviz markers
for ui_update."""
import itertools
import json

import pytest

from loom_ros.bus.event import Event
from loom_ros.bus.qos import to_qos_profile
from loom_ros.plugins.actuators.robot_control import RobotControlPlugin
from loom_ros.plugins.actuators.ui import UiPlugin
from loom_ros.plugins.contract import CapabilityDenied, HealthState, PluginContext

_NAMESPACES = itertools.count()


@pytest.fixture
def nodes(ros):
    """A host node (what the plugin host would pass as ctx.ros_node) and a listener node, in a
    namespace of their own so tests never hear each other."""
    from rclpy.node import Node
    ns = f'/act{next(_NAMESPACES)}'
    made = [Node('host', namespace=ns, context=ros.node.context),
            Node('listener', namespace=ns, context=ros.node.context)]
    for node in made:
        ros.executor.add_node(node)
    yield made
    for node in made:
        ros.executor.remove_node(node)
        node.destroy_node()


@pytest.fixture
def start(nodes):
    """start(plugin_class, grants, **config) -> (plugin, audit records); shut down after."""
    started = []

    def start_plugin(cls, granted, **config):
        audit = []
        plugin = cls()
        plugin.init(PluginContext(cls.metadata.name, config=config, granted=frozenset(granted),
                                  audit_sink=audit.append, ros_node=nodes[0]))
        started.append(plugin)
        return plugin, audit
    yield start_plugin
    for plugin in started:
        plugin.shutdown()


def listen(node, msg_type, topic):
    received = []
    node.create_subscription(msg_type, topic, received.append, to_qos_profile('batched'))
    return received


def move(**payload):
    return Event.with_json('robot.move', payload, source='agent/test')


def speeds(msgs):
    return [(m.linear.x, m.linear.y, m.angular.z) for m in msgs]


def test_commands_are_published_clamped_and_ramped(ros, nodes, start):
    from geometry_msgs.msg import Twist
    plugin, audit = start(RobotControlPlugin, ['actuator.motion'])
    received = listen(nodes[1], Twist, 'cmd_vel')
    ros.wait_for(lambda: plugin._pub.get_subscription_count() >= 1, 'cmd_vel to be matched')
    # Resent on every spin like teleop, so the watchdog never decides the outcome.
    ros.wait_for(lambda: received and speeds(received)[-1] == (0.5, 0.0, -1.0),
                 'cmd_vel to reach the clamped target',
                 spin=lambda: plugin.handle_event(move(linear_x=2.0, linear_y=1.0,
                                                       angular_z=-3.0)))
    xs = [x for x, _, _ in speeds(received)]
    assert all(abs(x) <= 0.5 and y == 0.0 and -1.0 <= z <= 0.0 for x, y, z in speeds(received))
    assert xs == sorted(xs) and len(set(xs)) > 2           # ramped up, not jumped
    commands = [r for r in audit if r['kind'] == 'motion_command']
    assert commands and all(r['requested']['linear']['x'] == 2.0 and r['clamped']
                            and r['target']['linear'] == {'x': 0.5, 'y': 0.0, 'z': 0.0}
                            for r in commands)
    assert plugin.health().state is HealthState.OK


def test_stamped_commands_carry_the_frame(ros, nodes, start):
    from geometry_msgs.msg import TwistStamped
    plugin, _ = start(RobotControlPlugin, ['actuator.motion'], stamped=True, frame_id='base',
                      max_linear_accel=1000.0)
    received = listen(nodes[1], TwistStamped, 'cmd_vel')
    ros.wait_for(lambda: plugin._pub.get_subscription_count() >= 1, 'cmd_vel to be matched')
    ros.wait_for(lambda: received and received[-1].twist.linear.x == 0.2, 'a stamped command',
                 spin=lambda: plugin.handle_event(move(linear={'x': 0.2})))
    assert received[-1].header.frame_id == 'base' and received[-1].header.stamp.sec > 0


def test_estop_zeroes_refuses_and_audits_until_released(ros, nodes, start):
    from geometry_msgs.msg import Twist
    from std_msgs.msg import Bool
    plugin, audit = start(RobotControlPlugin, ['actuator.motion'], max_linear_accel=1000.0)
    received = listen(nodes[1], Twist, 'cmd_vel')
    estop = nodes[1].create_publisher(Bool, 'estop', to_qos_profile('batched'))
    ros.wait_for(lambda: plugin._pub.get_subscription_count() >= 1
                 and estop.get_subscription_count() >= 1, 'cmd_vel and estop to be matched')
    ros.wait_for(lambda: received and received[-1].linear.x == 0.5, 'the robot to move',
                 spin=lambda: plugin.handle_event(move(linear_x=0.5)))

    estop.publish(Bool(data=True))
    ros.wait_for(lambda: plugin.limiter.estopped and received[-1].linear.x == 0.0,
                 'a zero after the e-stop')
    moving_until = len(received) - 1
    response = plugin.handle_event(move(linear_x=0.5, duration_s=5.0))
    assert not response.ok and 'e-stop' in response.error
    ros.wait_for(lambda: len(received) == plugin.stats['published'],
                 'every published message to arrive')
    assert all(m.linear.x == 0.0 for m in received[moving_until:])   # zeroed, never moved
    assert len(received) - moving_until >= 2                          # the refusal got a zero too
    engaged = [r for r in audit if r['kind'] == 'estop']
    assert len(engaged) == 1 and engaged[0]['engaged'] is True
    refused = [r for r in audit if r['kind'] == 'motion_refused']
    assert refused[-1]['reason'] == 'e-stop engaged' and refused[-1]['applied']['linear']['x'] == 0
    assert plugin.health().state is HealthState.DEGRADED

    estop.publish(Bool(data=False))
    ros.wait_for(lambda: not plugin.limiter.estopped, 'the e-stop to be released')
    assert audit[-1]['kind'] == 'estop' and audit[-1]['engaged'] is False
    ros.wait_for(lambda: received[-1].linear.x == 0.5, 'the robot to move again',
                 spin=lambda: plugin.handle_event(move(linear_x=0.5)))


def test_watchdog_publishes_one_zero_when_commands_stop(ros, nodes, start):
    from geometry_msgs.msg import Twist
    plugin, audit = start(RobotControlPlugin, ['actuator.motion'], watchdog_timeout_s=0.3,
                          max_linear_accel=1000.0)
    received = listen(nodes[1], Twist, 'cmd_vel')
    ros.wait_for(lambda: plugin._pub.get_subscription_count() >= 1, 'cmd_vel to be matched')
    assert plugin.handle_event(move(linear_x=0.4)).ok                # then silence
    ros.wait_for(lambda: received and received[-1].linear.x == 0.0 and
                 any(m.linear.x == 0.4 for m in received), 'the watchdog stop')
    ticks = plugin.stats['ticks']
    ros.wait_for(lambda: plugin.stats['ticks'] >= ticks + 5, 'five more control ticks')
    ros.wait_for(lambda: len(received) == plugin.stats['published'],
                 'every published message to arrive')
    xs = [m.linear.x for m in received]
    assert xs.count(0.0) == 1 and xs[-1] == 0.0                      # one zero, then silence
    stops = [r for r in audit if r['kind'] == 'motion_stop']
    assert [r['reason'] for r in stops] == ['watchdog']


def test_without_the_grant_commands_are_refused_and_audited(ros, nodes, start):
    plugin, audit = start(RobotControlPlugin, [])
    with pytest.raises(CapabilityDenied, match='actuator.motion'):
        plugin.handle_event(move(linear_x=0.5))
    assert audit[-1]['kind'] == 'capability_denied'
    assert audit[-1]['capability'] == 'actuator.motion'
    assert plugin.stats['published'] == 0
    ui, ui_audit = start(UiPlugin, ['actuator.motion'])
    with pytest.raises(CapabilityDenied, match='ui.write'):
        ui.handle_event(Event.with_json('ui_update', {'text': 'hi'}))
    assert ui_audit[-1]['kind'] == 'capability_denied' and ui.stats['published'] == 0


def test_ui_update_becomes_state_json_and_rviz_text_markers(ros, nodes, start):
    from std_msgs.msg import String
    from visualization_msgs.msg import Marker, MarkerArray
    ui, audit = start(UiPlugin, ['ui.write'], lifetime_s=2.5)
    markers = listen(nodes[1], MarkerArray, 'loom/ui/markers')
    states = listen(nodes[1], String, 'loom/ui/state')
    ros.wait_for(lambda: ui._markers_pub.get_subscription_count() >= 1
                 and ui._state_pub.get_subscription_count() >= 1, 'ui topics to be matched')

    face = Event.with_json('ui_update', {'emoji': '😊', 'label': 'happy', 'confidence': 0.92},
                           source='agent/face')
    assert ui.handle_event(face).ok
    ros.wait_for(lambda: markers and states, 'markers and state')
    first = {m.id: m for m in markers[-1].markers}
    assert first[0].type == Marker.TEXT_VIEW_FACING and first[0].action == Marker.ADD
    assert first[0].text == '😊 happy' and first[0].header.frame_id == 'base_link'
    assert first[0].ns == 'loom_ui' and first[0].scale.z > 0 and first[0].color.a == 1.0
    assert (first[0].lifetime.sec, first[0].lifetime.nanosec) == (2, 500_000_000)
    assert first[1].action == Marker.DELETE                           # no text line yet
    state = json.loads(states[-1].data)
    assert state['emoji'] == '😊' and state['confidence'] == 0.92
    assert state['source'] == 'agent/face'

    assert ui.handle_event(Event.with_json('ui_update', {'text': "what's the weather"})).ok
    ros.wait_for(lambda: len(markers) == 2 and len(states) == 2, 'the second update')
    second = {m.id: m for m in markers[-1].markers}
    assert second[0].text == '😊 happy' and second[1].text == "what's the weather"
    assert second[1].pose.position.z < second[0].pose.position.z
    assert json.loads(states[-1].data)['label'] == 'happy'            # merged, not replaced
    assert [r['kind'] for r in audit] == ['ui_update', 'ui_update']
    assert audit[0]['lines'] == ['😊 happy']

    # A subject's words reach the screen, never the append-only audit log.
    said = Event.with_json('ui_update', {'text': 'alice lives at 4 Elm St'},
                           metadata={'loom.subject': 'alice'})
    assert ui.handle_event(said).ok
    ros.wait_for(lambda: len(states) == 3, 'the third update')
    assert json.loads(states[-1].data)['text'] == 'alice lives at 4 Elm St'
    assert 'Elm' not in json.dumps(audit[-1]) and 'alice' not in json.dumps(audit[-1])
    assert audit[-1]['withheld'] == 'the event names a data subject' and audit[-1]['lines'] == 2


def test_ui_bad_updates_are_refused_counted_and_audited(ros, nodes, start):
    ui, audit = start(UiPlugin, ['ui.write'], max_text_chars=10)
    for payload, says in ((b'[1, 2]', 'JSON object'), (b'{"emoji": 5}', 'string or null'),
                          (b'{"seq": 3}', 'set by the ui plugin'), (b'\xff', 'not JSON')):
        response = ui.handle_event(Event(type='ui_update', payload=payload))
        assert not response.ok and says in response.error
    assert ui.stats['bad_input'] == 4 and ui.stats['published'] == 0
    assert ui.handle_event(Event.with_json('robot.move', {'linear_x': 1})).ok  # not for the ui
    assert ui.stats['ignored'] == 1 and ui.stats['published'] == 0
    assert [r['kind'] for r in audit] == ['ui_rejected'] * 4
    assert ui.handle_event(Event.with_json('ui_update', {'text': 'x' * 50})).ok
    assert ui.last_state['text'] == 'x' * 9 + '…' and ui.last_state['truncated'] == ['text']


def _ui_without_ros(**config):
    """A ui plugin with no ROS node: updates are checked, merged and audited, not published."""
    audit: list[dict] = []
    ui = UiPlugin()
    ui.init(PluginContext('ui', config=config, granted=frozenset({'ui.write'}),
                          audit_sink=audit.append))
    return ui, audit


def test_an_anonymous_ui_update_does_not_audit_an_earlier_subjects_words():
    """The audit keeps the merged screen's lines, and an anonymous Public update can leave an
    earlier person's (or a Private event's) words on it: those stay out of the audit until
    replaced or cleared."""
    from loom_ros.bus.event import Privacy
    ui, audit = _ui_without_ros()
    assert ui.handle_event(Event.with_json('ui_update', {'text': 'alice lives at 4 Elm St'},
                                           metadata={'loom.subject': 'alice'})).ok
    assert ui.handle_event(Event.with_json('ui_update', {'emoji': '😊'})).ok   # anonymous
    assert 'Elm' not in json.dumps(audit[-1], ensure_ascii=False)
    assert 'data subject' in audit[-1]['withheld'] and audit[-1]['lines'] == 2
    assert ui.handle_event(Event.with_json('ui_update', {'label': 'pin 4321'},
                                           privacy=Privacy.PRIVATE)).ok
    assert ui.handle_event(Event.with_json('ui_update', {'text': 'hello'})).ok  # alice's gone
    assert '4321' not in json.dumps(audit[-1]) and 'private' in audit[-1]['withheld']
    assert ui.handle_event(Event.with_json('ui_update', {'label': None})).ok
    assert audit[-1]['lines'] == ['😊', 'hello']            # only Public, anonymous words left
    assert ui.handle_event(Event.with_json('ui_update', {'text': 'bob said hi'},
                                           metadata={'loom.subject': 'bob'})).ok
    assert ui.handle_event(Event.with_json('ui_update', {'clear': True, 'text': 'ready'})).ok
    assert audit[-1]['lines'] == ['ready'] and audit[-1]['update']['text'] == 'ready'


def test_a_ui_rejection_states_the_expected_type_not_the_senders_value():
    """ui_rejected is audited, and the audit is never erased: it must not quote the event."""
    ui, audit = _ui_without_ros()
    refused = ui.handle_event(Event.with_json('ui_update', {'clear': 'alice pin 4321'},
                                              metadata={'loom.subject': 'alice'}))
    assert not refused.ok and 'true or false' in refused.error and '4321' not in refused.error
    assert audit[-1]['kind'] == 'ui_rejected' and '4321' not in json.dumps(audit[-1])
