"""config/loom.yaml is the single source of parameter defaults: every key is declared by a node,
nodes declare nothing the file lacks, and bad files are refused with the file and the reason."""
import pytest
import rclpy
from rclpy.node import Node

from loom_ros.bus.bus import BUS_PARAMETERS
from loom_ros.bus.event_monitor_node import PARAMETERS as MONITOR_PARAMETERS
from loom_ros.bus.event_monitor_node import EventMonitorNode
from loom_ros.config.params import (
    ConfigError, ParamSpec, by_node, config_dir, declare_parameters, load_params_file,
    node_defaults,
)
from loom_ros.agents.agent_node import PARAMETERS as AGENT_PARAMETERS
from loom_ros.agents.agent_node import AgentNode
from loom_ros.bringup.lifecycle_manager_node import PARAMETERS as MANAGER_PARAMETERS
from loom_ros.bridge.bridge_node import LIST_PARAMETERS as BRIDGE_LISTS
from loom_ros.bridge.bridge_node import PARAMETERS as BRIDGE_PARAMETERS
from loom_ros.config.params import ParamSpec
from loom_ros.sensors.camera_adapter_node import PARAMETERS as ADAPTER_PARAMETERS
from loom_ros.plugins.host_node import PARAMETERS as HOST_PARAMETERS
from loom_ros.storage.layout import STORAGE_PARAMETERS
from loom_ros.telemetry.node_telemetry import TELEMETRY_PARAMETERS
from loom_ros.router.router_node import PARAMETERS as ROUTER_PARAMETERS
from loom_ros.router.router_node import RouterNode
from loom_ros.sensors.sim_sensors_node import PARAMETERS as SENSOR_PARAMETERS
from loom_ros.sensors.sim_sensors_node import SimSensorsNode

NODES = {'sim_sensors': SENSOR_PARAMETERS, 'event_monitor': MONITOR_PARAMETERS,
         'router': ROUTER_PARAMETERS, 'agent': AGENT_PARAMETERS,
         # `nodes` (a string list, [] allowed) is declared on its own, typed dynamically.
         'lifecycle_manager': MANAGER_PARAMETERS + [ParamSpec('nodes', 'x')],
         'plugin_host': HOST_PARAMETERS,
         'camera_adapter': ADAPTER_PARAMETERS,
         'zenoh_bridge': BRIDGE_PARAMETERS + [ParamSpec(k, d) for k, d in BRIDGE_LISTS.items()]}


def test_every_yaml_key_is_declared_and_every_declared_parameter_has_a_yaml_default():
    sections = by_node(load_params_file(str(config_dir() / 'loom.yaml')))
    assert set(sections['/**']) == {p.name for p in BUS_PARAMETERS + TELEMETRY_PARAMETERS +
                                    STORAGE_PARAMETERS}
    for node, specs in NODES.items():
        assert set(sections[node]) == {p.name for p in specs}, node


@pytest.mark.parametrize('node_class', [SimSensorsNode, EventMonitorNode, RouterNode, AgentNode])
def test_fresh_nodes_report_the_yaml_defaults_with_descriptors(ros, node_class):
    node = node_class(context=ros.node.context)
    try:
        defaults = node_defaults(node.get_name())
        if not hasattr(node, 'bus'):  # the /** section is the bus's; this node has none
            defaults = {k: v for k, v in defaults.items() if not k.startswith('bus.')}
        for name, value in defaults.items():
            assert node.get_parameter(name).value == value, name
            descriptor = node.describe_parameter(name)
            assert descriptor.description
            assert descriptor.read_only or name == 'policy_file'  # reloadable at run time
    finally:
        node.destroy_node()


def test_out_of_range_override_is_refused(ros):
    from rclpy.exceptions import InvalidParameterValueException
    node = Node('range_probe', context=ros.node.context,
                parameter_overrides=[rclpy.parameter.Parameter('imu_rate_hz', value=-5.0)])
    try:
        with pytest.raises(InvalidParameterValueException):
            declare_parameters(node, 'sim_sensors', SENSOR_PARAMETERS)
    finally:
        node.destroy_node()


@pytest.mark.parametrize('section, specs, name, value', [
    ('agent', 'agent', 'full_gc_period_s', -1.0),
    ('agent', 'bus', 'bus.stats_max_subscriptions', 0),
    ('agent', 'bus', 'bus.stats_max_subscriptions', 100001),
    ('agent', 'agent', 'gc_young_threshold', -1),
    ('agent', 'agent', 'gc_young_threshold', 10_000_001),
    ('zenoh_bridge', 'bridge', 'open_timeout_s', 0.05),
    ('zenoh_bridge', 'bridge', 'open_timeout_s', 601.0),
])
def test_the_session_29_keys_refuse_values_out_of_range(ros, section, specs, name, value):
    """A negative full-pass period, a BusStats bound of 0 or past 100,000, or a garbage-
    collection threshold below 0 or past its bound, is refused when the node declares it (not
    served as a period of nothing, a message of everything or a collector that never runs)."""
    from rclpy.exceptions import InvalidParameterValueException

    from loom_ros.agents.agent_node import PARAMETERS as AGENT_PARAMETERS
    from loom_ros.bridge.bridge_node import PARAMETERS as BRIDGE_PARAMETERS
    node = Node('range_probe_29', context=ros.node.context,
                parameter_overrides=[rclpy.parameter.Parameter(name, value=value)])
    try:
        with pytest.raises(InvalidParameterValueException):
            declare_parameters(node, section, {'agent': AGENT_PARAMETERS,
                                               'bridge': BRIDGE_PARAMETERS}.get(specs,
                                                                                BUS_PARAMETERS))
    finally:
        node.destroy_node()


def test_bad_yaml_is_refused_with_the_file_and_reason(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('sim_sensors:\n  ros__parameters: [unclosed\n')
    with pytest.raises(ConfigError, match=r'bad.yaml: not valid YAML'):
        load_params_file(str(bad))
    shape = tmp_path / 'shape.yaml'
    shape.write_text('sim_sensors:\n  parameters: {}\n')
    with pytest.raises(ConfigError, match="section 'sim_sensors' has no ros__parameters"):
        load_params_file(str(shape))
    with pytest.raises(ConfigError, match='cannot read'):
        load_params_file(str(tmp_path / 'missing.yaml'))


def test_a_parameter_without_a_default_is_a_clear_error(ros):
    node = Node('no_default_probe', context=ros.node.context)
    try:
        with pytest.raises(ConfigError, match="no default for parameter 'nonexistent'"):
            declare_parameters(node, 'sim_sensors', [ParamSpec('nonexistent', 'x')])
    finally:
        node.destroy_node()


def test_every_node_section_is_keyed_for_any_namespace():
    """Issue 15, fault 3: a bare `router:` key does not match /robot1/router, so with a namespace
    every setting was silently dropped. The shipped sections are /**/<node>."""
    sections = load_params_file(str(config_dir() / 'loom.yaml'))
    assert all(key == '/**' or key.startswith('/**/') for key in sections), list(sections)


def test_defaults_read_every_section_key_style(tmp_path):
    path = tmp_path / 'p.yaml'
    path.write_text('/**:\n  ros__parameters: {a: 1, b: 1}\n'
                    '/**/probe:\n  ros__parameters: {b: 2, c: 2}\n'
                    '/probe:\n  ros__parameters: {c: 3}\n')
    assert node_defaults('probe', str(path)) == {'a': 1, 'b': 2, 'c': 3}
    assert node_defaults('other', str(path)) == {'a': 1, 'b': 1}
