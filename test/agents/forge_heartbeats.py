"""A hostile process on the robot's DDS domain (issue 13, fault 5): floods fake AgentStatus
heartbeats for one agent, claiming it hung (busy for ages) or failed, with its real node name and
pid, and replays the agent's genuine beats it overhears; goes on until the lifecycle manager's
/diagnostics report at least `count` dropped beats for that agent, then exits 0.

It floods in bursts of BURST forged beats, each sent as fast as it can, and sends the next once
the manager has reported again: the manager takes beats slower than this sends them (on 2 cores,
some hundred a second), and while it takes them its reports wait, so a flood without pause ran on
for 10-30 s and ten thousand beats past `count` before the forger read a count.

    python forge_heartbeats.py <namespace> <agent_id> <node> <pid> <count>
"""
import secrets
import sys

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node

from loom_msgs.msg import AgentStatus
from loom_ros.bus.qos import QosLevel, to_qos_profile

BURST = 500   # forged beats between two reports of the manager


def main() -> int:
    namespace, agent, node_name, pid, count = sys.argv[1:6]
    pid, count = int(pid), int(count)
    rclpy.init()
    node = Node('forger', namespace=namespace)
    qos = to_qos_profile(QosLevel.BACKGROUND)
    pub = node.create_publisher(AgentStatus, 'loom/agents/heartbeat', qos)
    overheard, rejected, reports = [], [0], [0]

    def on_beat(msg):
        if msg.agent_id == agent and len(overheard) < 100:
            overheard.append(msg)

    def on_diag(msg):
        for status in msg.status:
            if status.name == f'loom/agents/{agent}':
                reports[0] += 1
                values = {kv.key: kv.value for kv in status.values}
                rejected[0] = int(values.get('heartbeats_rejected', 0))
    hear = node.create_subscription(AgentStatus, 'loom/agents/heartbeat', on_beat, qos)
    node.create_subscription(DiagnosticArray, '/diagnostics', on_diag, 10)
    sent = burst = 0
    while rejected[0] < count:
        if hear is not None and len(overheard) >= 100:
            # Enough to replay: stop hearing the topic (this node hears its own beats too, and
            # taking them costs the CPU the manager needs).
            node.destroy_subscription(hear)
            hear = None
        if burst >= BURST:   # a new report from the manager before the next burst
            seen = reports[0]
            while reports[0] == seen:
                rclpy.spin_once(node, timeout_sec=0.05)
            burst = 0
        for i in range(50):
            hung = i % 2 == 0
            pub.publish(AgentStatus(
                agent_id=agent, node=node_name, pid=pid, lifecycle='active' if hung else 'inactive',
                busy_ms=1e9 if hung else 0.0, persist_failed=0 if hung else 1,
                reason='' if hung else 'forged: cannot persist', incarnation=secrets.randbits(63),
                seq=sent + 1, auth=secrets.token_hex(32)))
            sent += 1
            burst += 1
        for genuine in list(overheard):   # a replay of what the agent really said
            pub.publish(genuine)
        rclpy.spin_once(node, timeout_sec=0.05)
    print(f'sent {sent} forged beats; the manager dropped {rejected[0]}', flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
