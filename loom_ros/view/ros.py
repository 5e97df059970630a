"""The ROS side of `loom view`: one plain rclpy node whose subscriptions feed a LoomView.

Loom events come through a Loom bus (camera frames, face detections, speech, the agents' actions
and intents: wire formats, QoS levels and validation as every Loom node has them); the plain ROS
topics are the robot's screen (loom/ui/state), route decisions, loom/metrics and loom/bus/stats,
at the QoS their publishers use. Each message is stamped with the time the view received it.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from loom_ros.bus import topics
from loom_ros.bus.qos import QosLevel, to_qos_profile
from loom_ros.telemetry.metrics import METRICS_TOPIC
from loom_ros.view.core import LoomView

NODE_NAME = 'loom_view'
UI_STATE_TOPIC = 'loom/ui/state'   # the ui plugin's state_topic (config/actuators.yaml)
EVENT_PATTERNS = (topics.CAMERA_FRONT, topics.CAMERA_FRONT_FACE, topics.MIC_PRIMARY_SPEECH,
                  'agent.*.action', 'agent.*.intent')


class ViewNode:
    """The node, its bus and subscriptions; `destroy()` tears them down."""

    def __init__(self, view: LoomView, clock: Callable[[], float] = time.time):
        from rclpy.node import Node
        from std_msgs.msg import String

        from loom_msgs.msg import BusStats, Metrics, RouteDecision
        from loom_ros.bus.bus import STATS_TOPIC, create_bus
        self.node = Node(NODE_NAME)
        self.bus = create_bus(self.node, NODE_NAME)
        for pattern in EVENT_PATTERNS:
            self.bus.subscribe(pattern, lambda event, topic: view.on_event(event, topic, clock()))
        batched, realtime = to_qos_profile(QosLevel.BATCHED), to_qos_profile(QosLevel.REALTIME)
        sub = self.node.create_subscription
        sub(String, UI_STATE_TOPIC, lambda m: view.on_ui_state(m.data, clock()), batched)
        sub(RouteDecision, topics.ROUTER_DECISIONS,
            lambda m: view.on_route_decision(m, clock()), batched)
        sub(Metrics, METRICS_TOPIC, lambda m: view.on_metrics(m, clock()), realtime)
        sub(BusStats, STATS_TOPIC, lambda m: view.on_bus_stats(m, clock()), realtime)

    def destroy(self) -> None:
        self.bus.destroy()
        self.node.destroy_node()
