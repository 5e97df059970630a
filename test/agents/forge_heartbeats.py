"""A hostile process on the robot's DDS domain (issue 13, fault 5): floods fake AgentStatus
heartbeats for one agent, claiming it hung (busy for ages) or failed, with its real node name and
pid, and replays the agent's genuine beats it overhears; goes on until the lifecycle manager's
/diagnostics report at least `count` dropped beats for that agent, then exits 0.

    python forge_heartbeats.py <namespace> <agent_id> <node> <pid> <count>
"""
import secrets
import sys

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node

from loom_msgs.msg import AgentStatus
from loom_ros.bus.qos import QosLevel, to_qos_profile


def main() -> int:
    namespace, agent, node_name, pid, count = sys.argv[1:6]
    pid, count = int(pid), int(count)
    rclpy.init()
    node = Node('forger', namespace=namespace)
    qos = to_qos_profile(QosLevel.BACKGROUND)
    pub = node.create_publisher(AgentStatus, 'loom/agents/heartbeat', qos)
    overheard, rejected = [], [0]

    def on_beat(msg):
        if msg.agent_id == agent and len(overheard) < 100:
            overheard.append(msg)

    def on_diag(msg):
        for status in msg.status:
            if status.name == f'loom/agents/{agent}':
                values = {kv.key: kv.value for kv in status.values}
                rejected[0] = int(values.get('heartbeats_rejected', 0))
    node.create_subscription(AgentStatus, 'loom/agents/heartbeat', on_beat, qos)
    node.create_subscription(DiagnosticArray, '/diagnostics', on_diag, 10)
    sent = 0
    while rejected[0] < count:
        for i in range(50):
            hung = i % 2 == 0
            pub.publish(AgentStatus(
                agent_id=agent, node=node_name, pid=pid, lifecycle='active' if hung else 'inactive',
                busy_ms=1e9 if hung else 0.0, persist_failed=0 if hung else 1,
                reason='' if hung else 'forged: cannot persist', incarnation=secrets.randbits(63),
                seq=sent + 1, auth=secrets.token_hex(32)))
            sent += 1
        for genuine in list(overheard):   # a replay of what the agent really said
            pub.publish(genuine)
        rclpy.spin_once(node, timeout_sec=0.05)
    print(f'sent {sent} forged beats; the manager dropped {rejected[0]}', flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
