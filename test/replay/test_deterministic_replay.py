"""Deterministic replay (issue 18): a router and a face agent (real processes) decide on camera
frames while `loom record` records the frames and the decisions; then a fresh router and agent
get the same frames from `loom play`, and every recorded decision is made again: same event, route,
rule, reason and confidence. The decision ids are new (random) and the stamps are the replay's.

Frames are sent one at a time (the next after the agent's answer to the previous), and the agent's
mailbox holds them all: with the shipped mailbox of 1, which frames get decided depends on timing
(docs/replay.md). Both runs are warmed up with the same frame before the recorded part, so the
agents start from the same state."""
from __future__ import annotations

import json
import signal
import time

import numpy as np
import yaml
from PIL import Image

from harness import REPO, WAIT_LIMIT_S

NS = '/rp'
SIZE = (256, 256)   # small frames: they cross processes in Fast DDS's builtin shared memory
COMPARED = ('event_id', 'event_type', 'agent_id', 'privacy', 'route', 'rule', 'reason',
            'upload', 'cloud_model', 'cloud_cost', 'confidence')


def _frames():
    from loom_ros.sensors.scenes import make_scene
    def small(name):
        return np.asarray(Image.fromarray(make_scene(name)).resize(SIZE))
    face, mirrored, empty = (small(n) for n in ('astronaut', 'astronaut_mirrored', 'empty'))
    # Alternating with the empty scene, so every frame gets an answer (a face, or 'no face').
    return [face, empty, mirrored, empty, face, empty]


def _config(tmp_path):
    agents = yaml.safe_load((REPO / 'config' / 'agents.yaml').read_text())
    face = next(a for a in agents['agents'] if a['id'] == 'face')
    face['host_plugins'] = ['face_expression']
    face['mailbox_size'] = 100   # no frame replaced by a later one: every frame is decided
    (tmp_path / 'agents.yaml').write_text(yaml.safe_dump({'agents': [face]}))
    params = tmp_path / 'params.yaml'
    params.write_text(yaml.safe_dump({
        '/**': {'ros__parameters': {'storage': {'root': str(tmp_path / 'root')}}},
        '/**/plugin_host': {'ros__parameters': {'audit_db': str(tmp_path / 'audit.db'),
                                                'data_dir': str(tmp_path / 'plugins')}}}))
    return tmp_path / 'agents.yaml', params


class Camera:
    """The test's camera: frames as camera.front events (the product's QoS table), and what the
    face agent answered and the routers decided, by event id."""

    def __init__(self, ros):
        from loom_msgs.msg import RouteDecision
        from rclpy.node import Node

        from loom_ros.bus.bus import EventBus
        from loom_ros.bus.qos import TopicQosTable, to_qos_profile
        from loom_ros.config.params import node_defaults
        self.ros = ros
        self.node = Node('rp_camera', namespace=NS, context=ros.node.context)
        defaults = node_defaults('rp_camera')
        self.bus = EventBus(self.node, topic_qos=TopicQosTable(defaults['bus.topic_qos'],
                                                               defaults['bus.default_qos']))
        ros.executor.add_node(self.node)
        self.answered: dict[str, dict] = {}
        self.decisions: dict[str, object] = {}
        self.bus.subscribe('agent.face.action', self._on_action)
        self.node.create_subscription(RouteDecision, 'router/decisions',
                                      lambda m: self.decisions.setdefault(m.event_id, m),
                                      to_qos_profile('batched'))
        self.out = self.bus.publisher_for('camera.front', 'realtime')

    def _on_action(self, event, _topic):
        data = event.json()
        self.answered[data.get('source_event', '')] = data

    def send(self, rgb) -> str:
        from loom_ros.plugins.perception.image import frame_event
        event = frame_event(rgb, type='camera.front', encoding='rgb8')
        self.bus.publish('camera.front', event, 'realtime')
        return event.id

    def warm_up(self, rgb, alive) -> None:
        """The same frame every half second until the agent answers one: it is active."""
        sent, last = [], [-1.0]

        def resend():
            if time.monotonic() - last[0] >= 0.5:
                last[0] = time.monotonic()
                sent.append(self.send(rgb))
        self.ros.wait_for(lambda: any(i in self.answered for i in sent), 'the face agent',
                          limit=120, alive=alive, spin=resend)

    def close(self):
        self.ros.executor.remove_node(self.node)
        self.bus.destroy()
        self.node.destroy_node()


def _system(spawn, tmp_path, run: str, agents, params):
    ros_args = ['--ros-args', '-r', f'__ns:={NS}', '--params-file', str(params)]
    router = spawn('-m', 'loom_ros.router.router_node', *ros_args,
                   '-p', f'history_db:={tmp_path / f"{run}_router.db"}')
    agent = spawn('-m', 'loom_ros.agents.agent_node', *ros_args, '-r', '__node:=agent_host_0',
                  '-p', 'agent_id:=face', '-p', f'agents_file:={agents}',
                  '-p', f'state_dir:={tmp_path / f"{run}_agents"}')
    return [router, agent]


def _stop(procs):
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGINT)
    return [proc.finish() for proc in procs]


def _recorded_decisions(path):
    from loom_msgs.msg import RouteDecision
    from rclpy.serialization import deserialize_message

    from loom_ros.replay.mcap_source import McapSource
    from loom_ros.replay.ros import RosTypes
    source = McapSource(path, RosTypes())
    decisions = [deserialize_message(m.data, RouteDecision) for m in source.messages()
                 if m.topic == f'{NS}/router/decisions']
    # The recorder noted each publisher's durability (what loom play offers again).
    assert {c.topic: c.metadata.get('loom.durability') for c, _ in source.channels.values()} == {
        f'{NS}/loom/camera/front': 'volatile', f'{NS}/router/decisions': 'volatile',
        f'{NS}/router/outcomes': 'volatile'}
    return decisions


def _fields(msg) -> dict:
    return {name: getattr(msg, name) for name in COMPARED}


def test_a_recording_replays_into_a_fresh_system_with_the_same_decisions(ros, spawn, tmp_path):
    agents, params = _config(tmp_path)
    frames = _frames()
    camera = Camera(ros)
    try:
        # 1. The recorded run.
        procs = _system(spawn, tmp_path, 'rec', agents, params)
        camera.warm_up(frames[0], procs)
        recorder = spawn('-m', 'loom_ros.cli.record', '--output', str(tmp_path / 'run.mcap'),
                         '--topics', 'loom/camera/front', 'router/decisions', 'router/outcomes',
                         '--ros-args', '-r', f'__ns:={NS}')
        ros.wait_for(lambda: camera.out.get_subscription_count() >= 2, 'the recorder',
                     alive=procs + [recorder])
        ros.wait_for(lambda: ros.node.count_publishers(f'{NS}/router/decisions') >= 1 and
                     len(ros.node.get_subscriptions_info_by_topic(f'{NS}/router/decisions')) >= 2,
                     'the recorder on router/decisions', alive=procs + [recorder])
        sent = []
        for rgb in frames:
            sent.append(camera.send(rgb))
            ros.wait_for(lambda: sent[-1] in camera.answered, f'the answer to frame {len(sent)}',
                         alive=procs + [recorder])
        ros.wait_for(lambda: all(camera.answered[i].get('label') == 'no face' or
                                 i in camera.decisions for i in sent),
                     'every face frame\'s decision', alive=procs)
        decided = [i for i in sent if i in camera.decisions]
        code, out, err = _stop([recorder])[0]
        summary = json.loads(out.strip().splitlines()[-1])
        assert code == 0, err
        assert summary['messages'][f'{NS}/loom/camera/front'] == len(frames), summary
        _stop(procs)
        recorded = _recorded_decisions(tmp_path / 'run.mcap')
        assert [m.event_id for m in recorded] == decided, 'the recording holds the decisions'
        assert len(decided) >= 3 and {m.rule for m in recorded}, recorded

        # 2. The replay into a fresh router and agent (new history, new state).
        camera.answered.clear()
        camera.decisions.clear()
        procs = _system(spawn, tmp_path, 'play', agents, params)
        camera.warm_up(frames[0], procs)
        player = spawn('-m', 'loom_ros.cli.play', str(tmp_path / 'run.mcap'), '--topics',
                       f'{NS}/loom/camera/front', '--wait-subscribers', str(WAIT_LIMIT_S),
                       '--quiet', '--ros-args', '-r', f'__ns:={NS}')
        ros.wait_for(lambda: all(i in camera.decisions for i in decided),
                     'the replayed frames\' decisions', alive=procs)
        code, out, err = player.finish()
        played = json.loads(out.strip().splitlines()[-1])
        assert code == 0 and played['played'] == len(frames) and not played['skipped'], played
        replayed = {i: camera.decisions[i] for i in decided}
        for original in recorded:
            again = replayed[original.event_id]
            assert _fields(again) == _fields(original)
            assert again.decision_id != original.decision_id   # new ids: not deterministic
        # Nothing the recorded run did not decide was decided on replay (the empty frames).
        assert not set(camera.decisions) & (set(sent) - set(decided))
        _stop(procs)
    finally:
        camera.close()
