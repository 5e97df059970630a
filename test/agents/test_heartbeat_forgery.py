"""Fault 5 (issue 13) across real processes: a forger on the same DDS domain floods the heartbeat
topic with fake AgentStatus (the agent hung, the agent failed; its real node name and pid) and
replays genuine beats. The manager (spawn: true) drops and counts them all, and the healthy agent
is never killed, restarted or marked failed. Plus the pure BeatAuth rules."""
import os
import signal
from pathlib import Path

import pytest

from harness import WAIT_LIMIT_S

from loom_ros.agents.supervisor import BeatAuth, BeatSigner, beat_digest

AGENTS = """agents:
  - id: first
    behavior: counter
    subscriptions: ["test.hb.first"]
"""
FORGER = str(Path(__file__).with_name('forge_heartbeats.py'))
FORGED = 1500   # the first forged "busy" beat was enough to fool the old manager


class Watch:
    """The manager's reports: the latest AgentStatus and diagnostic per agent."""

    def __init__(self, ros, namespace):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.node import Node

        from loom_msgs.msg import AgentStatus
        from loom_ros.bus.qos import QosLevel, to_qos_profile
        self.ros = ros
        self.node = Node('hb_watch', namespace=namespace, context=ros.node.context)
        self.status, self.diagnostics, self.reports = {}, {}, 0
        self.node.create_subscription(AgentStatus, 'loom/agents/status', self._on_status,
                                      to_qos_profile(QosLevel.BACKGROUND))
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 10)
        ros.executor.add_node(self.node)

    def _on_status(self, msg):
        self.status[msg.agent_id] = msg
        self.reports += 1

    def _on_diag(self, msg):
        for status in msg.status:
            if status.name.startswith('loom/agents/'):
                self.diagnostics[status.name] = {kv.key: kv.value for kv in status.values}

    def health(self, agent):
        msg = self.status.get(agent)
        return (msg.health, msg.restarts) if msg else (None, None)

    def rejected(self, agent):
        return int(self.diagnostics.get(f'loom/agents/{agent}', {}).get('heartbeats_rejected', 0))

    def close(self):
        self.ros.executor.remove_node(self.node)
        self.node.destroy_node()


def test_forged_heartbeats_cannot_make_the_manager_kill_a_healthy_agent(ros, spawn, tmp_path):
    namespace = '/hb_forge'
    agents = tmp_path / 'agents.yaml'
    agents.write_text(AGENTS)
    watch = Watch(ros, namespace)
    manager = spawn('-m', 'loom_ros.bringup.lifecycle_manager_node', '--ros-args',
                    '-r', f'__ns:={namespace}', '-p', f'agents_file:={agents}',
                    '-p', f'storage.root:={tmp_path}', '-p', 'status_period_s:=0.2',
                    '-p', 'hang_timeout_s:=1.0', '-p', 'max_restarts:=1',
                    # The flood of forgeries loads both cores: a real beat may come late, and
                    # this test is about forged beats, not about how late is dead.
                    '-p', 'heartbeat_timeout_s:=30.0')
    try:
        ros.wait_for(lambda: watch.health('first')[0] == 'ok', 'the agent ok', alive=[manager])
        real = watch.status['first']
        forger = spawn(FORGER, namespace, 'first', real.node, str(real.pid), str(FORGED))
        # Until the forger is done, or the manager acted on what it said (the fault).
        ros.wait_for(lambda: forger.popen.poll() is not None or
                     watch.health('first') != ('ok', 0), 'the forger to finish', alive=[manager],
                     limit=3 * WAIT_LIMIT_S)
        assert watch.health('first') == ('ok', 0), watch.status['first'].reason
        code, out, err = forger.finish()
        assert code == 0, err
        # A report made after the manager took every forged beat: still ok, never restarted.
        seen = watch.reports
        ros.wait_for(lambda: watch.reports > seen + 1, 'a later report', alive=[manager])
        assert watch.health('first') == ('ok', 0), watch.status['first'].reason
        assert watch.status['first'].pid == real.pid
        os.kill(real.pid, 0)   # the agent process is alive (raises if it was killed)
        assert watch.rejected('first') >= FORGED
    finally:
        if manager.popen.poll() is None:
            manager.popen.send_signal(signal.SIGINT)
            manager.finish()
        watch.close()


class Msg:
    """An AgentStatus stand-in with the fields a beat signs (the pure rules need no ROS)."""

    def __init__(self, **fields):
        self.agent_id, self.node, self.pid, self.lifecycle = 'a', '/agent_a', 7, 'active'
        self.busy_ms = self.dispatch_p50_us = self.dispatch_p99_us = 0.0
        self.events = self.handled = self.behavior_errors = self.persist_failed = 0
        self.mailbox_depth = self.mailbox_size = self.mailbox_dropped = 0
        self.reason, self.incarnation, self.seq, self.auth = '', 0, 0, ''
        self.__dict__.update(fields)


def test_beat_auth_takes_signed_beats_once_and_drops_the_rest():
    key = os.urandom(32)
    signer, auth = BeatSigner(key), BeatAuth()
    first = signer.sign(Msg())
    assert auth.check(key, first) is None
    assert auth.check(key, first) == 'replay'                       # same seq again
    second = signer.sign(Msg(busy_ms=0.7))                          # float32 on the wire
    assert auth.check(key, second) is None
    second.busy_ms = 1e9                                            # tampered after signing
    assert auth.check(key, second) == 'bad_auth'
    assert auth.check(os.urandom(32), signer.sign(Msg())) == 'bad_auth'   # another's key
    assert auth.check(None, signer.sign(Msg())) == 'no_key'
    assert auth.check(key, signer.sign(Msg(reason='x' * 100_000))) == 'oversize'
    # Not ASCII: refused and counted like any bad digest (hmac.compare_digest raised TypeError)
    assert auth.check(key, Msg(seq=9, auth='é' * 64)) == 'bad_auth'
    assert auth.check(key, Msg(seq=10, auth='\udcff')) == 'bad_auth'
    # A new node in the process retires the old incarnation: its beats are replays from then on.
    old = signer.sign(Msg())
    assert auth.check(key, BeatSigner(key).sign(Msg())) is None
    assert auth.check(key, old) == 'replay'
    assert sum(auth.rejected.values()) == auth.by_agent['a'] == 8
    # A copy of a beat already taken in-process: authentic ones are not rejections.
    assert auth.check(key, old, copy=True) == 'copy' and auth.copies == 1
    assert auth.check(key, Msg(), copy=True) == 'bad_auth'


def test_the_digest_covers_every_field_length_prefixed():
    """A known answer, computed here field by field: HMAC-SHA256 over each field's length (4
    bytes, little-endian) and bytes, in the wire's order. Changing any one field, or moving
    bytes from one text field to the next, changes it."""
    import hashlib
    import hmac
    import struct

    from loom_msgs.msg import AgentStatus
    msg = AgentStatus(agent_id='a1', node='/robot/agent_host', incarnation=7, seq=9, pid=42,
                      lifecycle='active', busy_ms=1.5, events=10, handled=9, behavior_errors=1,
                      persist_failed=0, mailbox_depth=3, mailbox_size=100, mailbox_dropped=2,
                      dispatch_p50_us=250.0, dispatch_p99_us=900.0, reason='')
    fields = [b'a1', b'/robot/agent_host', struct.pack('<QQI', 7, 9, 42), b'active',
              struct.pack('<f', 1.5), struct.pack('<QQQQIIQ', 10, 9, 1, 0, 3, 100, 2),
              struct.pack('<f', 250.0), struct.pack('<f', 900.0), b'']
    reference = hmac.new(b'k' * 32, digestmod=hashlib.sha256)
    for field in fields:
        reference.update(struct.pack('<I', len(field)) + field)
    assert beat_digest(b'k' * 32, msg) == reference.hexdigest()
    moved = AgentStatus(agent_id='a1/', node='robot/agent_host', incarnation=7, seq=9, pid=42,
                        lifecycle='active', busy_ms=1.5, events=10, handled=9, behavior_errors=1,
                        persist_failed=0, mailbox_depth=3, mailbox_size=100, mailbox_dropped=2,
                        dispatch_p50_us=250.0, dispatch_p99_us=900.0, reason='')
    assert beat_digest(b'k' * 32, moved) != beat_digest(b'k' * 32, msg)
    msg.mailbox_dropped = 3
    assert beat_digest(b'k' * 32, msg) != reference.hexdigest()


@pytest.mark.parametrize('spec', ['', 'zz', '00' * 200])
def test_an_unusable_key_in_the_environment_is_ignored(spec):
    from loom_ros.agents.supervisor import KEY_ENV, take_env_key
    environ = {KEY_ENV: spec}
    assert take_env_key(environ) is None and KEY_ENV not in environ


def test_in_process_manager_believes_only_its_own_process(ros, spawn, tmp_path):
    """spawn: false as in loom bringup: agent and manager in this process share its key."""
    from rclpy.parameter import Parameter

    from loom_ros.agents.agent_node import AgentNode
    from loom_ros.bringup.lifecycle_manager_node import LifecycleManagerNode
    namespace = '/hb_inproc'
    agents = tmp_path / 'agents.yaml'
    agents.write_text(AGENTS)
    common = [Parameter('agents_file', value=str(agents)),
              Parameter('storage.root', value=str(tmp_path))]
    agent = AgentNode(node_name='agent_first', namespace=namespace, parameter_overrides=[
        *common, Parameter('agent_id', value='first'), Parameter('autostart', value=False)])
    manager = LifecycleManagerNode(namespace=namespace, parameter_overrides=[
        *common, Parameter('spawn', value=False), Parameter('agents', value='first'),
        Parameter('status_period_s', value=0.2), Parameter('hang_timeout_s', value=1.0),
        Parameter('max_restarts', value=1), Parameter('heartbeat_timeout_s', value=30.0)])
    watch = Watch(ros, namespace)
    for node in (agent, manager):
        ros.executor.add_node(node)
    try:
        ros.wait_for(lambda: watch.health('first')[0] == 'ok', 'the agent ok')
        # Its beats come from memory; their copies on the topic are not counted as rejected.
        seen = watch.reports
        ros.wait_for(lambda: watch.reports > seen + 2 and watch.rejected('first') == 0 and
                     manager.auth.copies > 0, 'reports with the topic copies taken')
        real = watch.status['first']
        forger = spawn(FORGER, namespace, 'first', real.node, str(real.pid), str(FORGED // 5))
        ros.wait_for(lambda: forger.popen.poll() is not None or
                     watch.health('first') != ('ok', 0), 'the forger to finish',
                     limit=3 * WAIT_LIMIT_S)
        assert watch.health('first') == ('ok', 0), watch.status['first'].reason
        assert forger.finish()[0] == 0
        seen = watch.reports
        ros.wait_for(lambda: watch.reports > seen + 1, 'a later report')
        assert watch.health('first') == ('ok', 0) and watch.rejected('first') >= FORGED // 5
    finally:
        for node in (agent, manager):
            ros.executor.remove_node(node)
        agent.trigger_shutdown()
        agent.destroy_node()
        manager.destroy_node()
        watch.close()
