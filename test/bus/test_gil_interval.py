"""bus.gil_switch_interval_ms: a node's bus sets its process's GIL switch interval (CPython's
5 ms let an event wait at each hand-over between the executor and the agents' worker); 0 leaves
it as it is, and a value out of range is refused with the parameter's name."""
import sys

import pytest
from rclpy.node import Node
from rclpy.parameter import Parameter

from loom_ros.bus.bus import create_bus


def _bus_node(ros, name, value):
    return Node(name, context=ros.node.context,
                parameter_overrides=[Parameter('bus.gil_switch_interval_ms', value=value)])


def test_the_bus_sets_the_process_switch_interval_and_zero_leaves_it(ros):
    before = sys.getswitchinterval()
    nodes = []
    try:
        nodes.append(_bus_node(ros, 'gil_a', 2.0))
        create_bus(nodes[-1], 'agent')
        assert sys.getswitchinterval() == pytest.approx(0.002)
        nodes.append(_bus_node(ros, 'gil_b', 0.0))
        create_bus(nodes[-1], 'agent')
        assert sys.getswitchinterval() == pytest.approx(0.002)   # 0: left as it was
        nodes.append(_bus_node(ros, 'gil_c', 1000.0))
        with pytest.raises(Exception, match='gil_switch_interval_ms'):
            create_bus(nodes[-1], 'agent')
        nodes.append(_bus_node(ros, 'gil_d', 0.001))   # a 1 us interval: threads would thrash
        with pytest.raises(ValueError, match='gil_switch_interval_ms: 0.001 is below 0.1'):
            create_bus(nodes[-1], 'agent')
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)
        for node in nodes:
            node.destroy_node()


def test_the_shipped_value_is_half_a_millisecond():
    from loom_ros.config.params import config_dir, node_defaults
    values = node_defaults('agent', str(config_dir() / 'loom.yaml'))
    assert values['bus.gil_switch_interval_ms'] == 0.5
