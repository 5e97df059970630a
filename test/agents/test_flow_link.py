"""The agent node's ports across processes: the face agent, started the way the lifecycle
manager starts an agent host (`-r __node:=agent_host_0`), reaches the router and the
face_expression plugin in their own processes through service clients on its own node (no
hidden node: issue 15, fault 2, gave two /agent_host_0), and the camera frame becomes the happy
emoji decided by the router. Ctrl-C then stops it at once and cleanly (fault 1: it aborted, or
took 20 s and segfaulted, with the old per-process link node and its executor thread)."""
import signal
import time

import numpy as np
import skimage.data
import yaml
from PIL import Image

from rclpy.node import Node

from harness import REPO
from loom_ros.bus.bus import EventBus
from loom_ros.bus.qos import TopicQosTable
from loom_ros.config.params import node_defaults
from loom_ros.plugins.perception.image import frame_event

NS = '/fl'


def service_path_agents(tmp_path):
    """The shipped agents file without host_plugins: these tests are about the service path
    (the face agent calling face_expression in another process)."""
    agents = yaml.safe_load((REPO / 'config' / 'agents.yaml').read_text())
    for entry in agents['agents']:
        entry.pop('host_plugins', None)
    path = tmp_path / 'agents.yaml'
    path.write_text(yaml.safe_dump(agents))
    return path


def test_face_agent_reaches_router_and_plugin_host_through_its_own_node_and_stops_on_sigint(
        ros, spawn, tmp_path):
    ros_args = ['--ros-args', '-r', f'__ns:={NS}']
    router = spawn('-m', 'loom_ros.router.router_node', *ros_args,
                   '-p', f'history_db:={tmp_path / "router.db"}')
    plugins = spawn('-m', 'loom_ros.plugins.host_node', *ros_args,
                    '-p', 'plugins:=face_expression', '-p', f'audit_db:={tmp_path / "audit.db"}',
                    '-p', f'data_dir:={tmp_path / "plugins"}')
    agents_file = service_path_agents(tmp_path)
    agent = spawn('-m', 'loom_ros.agents.agent_node', *ros_args, '-r', '__node:=agent_host_0',
                  '-p', 'agent_id:=face', '-p', f'state_dir:={tmp_path / "agents"}',
                  '-p', f'agents_file:={agents_file}')
    procs = [router, plugins, agent]
    node = Node('fl_camera', namespace=NS, context=ros.node.context)
    defaults = node_defaults('fl_camera')   # the product's QoS table, as every process
    camera = EventBus(node, topic_qos=TopicQosTable(defaults['bus.topic_qos'],
                                                    defaults['bus.default_qos']))
    ros.executor.add_node(node)
    shown = []
    camera.subscribe('agent.face.action', lambda e, _t: shown.append(e.json()))
    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((640, 480)))
    last = [0.0]

    def send_frame():   # five frames a second until the agent answers one
        if time.monotonic() - last[0] >= 0.2:
            last[0] = time.monotonic()
            camera.publish('camera.front', frame_event(photo, type='camera.front',
                                                       encoding='bgr8'), 'realtime')
    try:
        out = camera.publisher_for('camera.front', 'realtime')
        ros.wait_for(lambda: out.get_subscription_count() >= 1, 'the face agent', alive=procs)
        ros.wait_for(lambda: any(s.get('label') == 'happy' for s in shown),
                     'the happy emoji from the agent', limit=120, alive=procs, spin=send_frame)
        happy = next(s for s in shown if s.get('label') == 'happy')
        assert happy['emoji'] == '😀' and happy['route'] == 'local'
        assert happy['rule'] == 'threshold'
        names = ros.node.get_node_names_and_namespaces()
        ours = sorted(name for name, ns in names if ns == NS)
        assert ours == ['agent_host_0', 'fl_camera', 'plugin_host', 'router'], names
        clients = {name for name, _types in
                   ros.node.get_client_names_and_types_by_node('agent_host_0', NS)}
        assert {f'{NS}/router/route', f'{NS}/plugin_host/face_expression/handle_event'} <= \
            clients, clients
    finally:
        ros.executor.remove_node(node)
        camera.destroy()
        node.destroy_node()
    started = time.monotonic()
    agent.popen.send_signal(signal.SIGINT)
    code, _out, err = agent.finish()
    assert code == 0, err[-3000:]
    assert 'terminate called' not in err and 'Fatal Python error' not in err, err[-3000:]
    # Frames may still be in its mailbox: the ports' waits end at once, so no 5 s call per frame.
    assert time.monotonic() - started < 15.0, err[-3000:]
    for proc in (router, plugins):
        proc.popen.send_signal(signal.SIGINT)
        assert proc.finish()[0] == 0


def test_a_behavior_waiting_for_a_service_holds_neither_recall_nor_a_transition(
        ros, spawn, tmp_path):
    """No plugin host runs: every frame's call waits for the service (up to 5 s). The answer
    would come on the agent node's executor, so the executor must never wait for the handler:
    Recall says busy at once, and deactivate ends the waits (they fail saying the host is not
    active) instead of draining the mailbox at 5 s a frame."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    from loom_msgs.msg import AgentStatus
    from loom_msgs.srv import Recall
    from loom_ros.bus import topics
    from loom_ros.bus.qos import QosLevel, to_qos_profile
    ns = '/fl_wait'
    agent = spawn('-m', 'loom_ros.agents.agent_node', '--ros-args', '-r', f'__ns:={ns}',
                  '-r', '__node:=agent_host_0', '-p', 'agent_id:=face',
                  '-p', f'state_dir:={tmp_path}',
                  '-p', f'agents_file:={service_path_agents(tmp_path)}')
    node = Node('fl_wait_camera', namespace=ns, context=ros.node.context)
    camera = EventBus(node)
    ros.executor.add_node(node)
    busy = []
    beats = node.create_subscription(
        AgentStatus, topics.AGENTS_HEARTBEAT, lambda m: busy.append(m.busy_ms > 0),
        to_qos_profile(QosLevel.BACKGROUND))
    recall = node.create_client(Recall, f'{ns}/agent_host_0/recall')
    change = node.create_client(ChangeState, f'{ns}/agent_host_0/change_state')
    dark = np.zeros((48, 64, 3), np.uint8)
    last = [0.0]

    def send_frame():   # keep the agent busy: a frame every 0.2 s
        if time.monotonic() - last[0] >= 0.2:
            last[0] = time.monotonic()
            camera.publish('camera.front', frame_event(dark, type='camera.front'), 'realtime')

    def call(client, request):
        ros.wait_for(client.service_is_ready, f'{client.srv_name}', alive=[agent])
        future = client.call_async(request)
        ros.wait_for(future.done, f'the answer of {client.srv_name}', alive=[agent],
                     spin=send_frame)
        return future.result()
    try:
        ros.wait_for(lambda: busy and busy[-1], 'the agent busy with a frame', alive=[agent],
                     spin=send_frame)
        # A Recall that finds the lock free between two frames is answered; one that finds it
        # held by a waiting handler says busy (it used to wait for the handler).
        answers = [call(recall, Recall.Request(mode='episodic')) for _ in range(3)]
        assert any(not a.ok and 'busy' in a.error for a in answers), \
            [(a.ok, a.error) for a in answers]
        started = time.monotonic()
        assert call(change, ChangeState.Request(
            transition=Transition(id=Transition.TRANSITION_DEACTIVATE))).success
        took = time.monotonic() - started
        assert call(change, ChangeState.Request(
            transition=Transition(id=Transition.TRANSITION_ACTIVATE))).success
    finally:
        ros.executor.remove_node(node)
        node.destroy_subscription(beats)
        camera.destroy()
        node.destroy_node()
    agent.popen.send_signal(signal.SIGINT)
    code, _out, err = agent.finish()
    assert code == 0, err[-3000:]
    assert 'the agent host is not active: no plugin calls now' in err, err[-3000:]
    assert took < 5.0, (took, err[-3000:])   # not one 5 s service wait, let alone one a frame
