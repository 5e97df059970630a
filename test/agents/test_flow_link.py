"""The flow behaviors' link to the router and the plugins (agents/flows/link.py) in an agent
process started the way the lifecycle manager starts one (`-r __node:=agent_host_0`):
issue 15, faults 1 and 2. The link keeps its own node name (the remap renamed it too: two
/agent_host_0 in the graph), and the process stops cleanly on Ctrl-C (it aborted with
"terminate called without an active exception": nothing closed the link's executor thread)."""
import signal

from rclpy.node import Node

from loom_ros.bus.bus import EventBus
from loom_ros.bus.event import Event


def test_agent_with_a_flow_link_has_one_node_per_name_and_stops_cleanly_on_sigint(
        ros, spawn, tmp_path):
    proc = spawn('-m', 'loom_ros.agents.agent_node', '--ros-args', '-r', '__ns:=/fl',
                 '-r', '__node:=agent_host_0', '-p', 'agent_id:=face',
                 '-p', f'state_dir:={tmp_path}')
    pid = proc.popen.pid
    link = ('flow_link_' + str(pid), '/fl')
    node = Node('fl_camera', namespace='/fl', context=ros.node.context)
    camera = EventBus(node)
    ros.executor.add_node(node)
    try:
        out = camera.publisher_for('camera.front', 'realtime')
        ros.wait_for(lambda: out.get_subscription_count() >= 1, 'the face agent', alive=[proc])
        # A frame makes the face behavior open its link (no router or plugin host runs here:
        # the call times out and is counted as a behavior error; the link stays).
        ros.wait_for(lambda: link in ros.node.get_node_names_and_namespaces(),
                     'the flow link node', alive=[proc],
                     spin=lambda: camera.publish('camera.front', Event(type='frame'),
                                                 'realtime'))
        names = ros.node.get_node_names_and_namespaces()
        assert names.count(('agent_host_0', '/fl')) == 1, names
    finally:
        ros.executor.remove_node(node)
        camera.destroy()
        node.destroy_node()
    proc.popen.send_signal(signal.SIGINT)
    code, _out, err = proc.finish()
    assert code == 0, err[-3000:]
    assert 'terminate called' not in err and 'Fatal Python error' not in err, err[-3000:]
