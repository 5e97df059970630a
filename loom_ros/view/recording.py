"""An MCAP recording (`loom record`'s) into a LoomView, through the replay reader that does not
trust the file (replay/mcap_source.py: every length checked, bad records skipped and counted).

Only the types the view draws are read (VIEW_TYPES), and only when this machine has the type and
the recorded schema matches its definition (replay.ros.RosTypes, as `loom play` checks); Loom
events are read from their CDR bytes (bus/wire.py) and validated as the bus validates received
events; other types through rclpy's deserializer. A message that does not decode is counted
(`undecodable`, `invalid_event`) and skipped. Time is the recording's log time.
"""
from __future__ import annotations

from collections import Counter

from loom_ros.bus.event import EventRejected
from loom_ros.bus.names import ROS_PREFIX, from_ros_topic
from loom_ros.bus.wire import decode_event_batch, decode_event_message
from loom_ros.replay.mcap_source import UNKNOWN_TYPE, ChannelInfo, McapSource
from loom_ros.view.core import LoomView
from loom_ros.view.ros import UI_STATE_TOPIC

EVENT, BATCH = 'loom_msgs/msg/Event', 'loom_msgs/msg/EventBatch'
STRING = 'std_msgs/msg/String'
ROUTE, METRICS, STATS = ('loom_msgs/msg/RouteDecision', 'loom_msgs/msg/Metrics',
                         'loom_msgs/msg/BusStats')
VIEW_TYPES = frozenset({EVENT, BATCH, STRING, ROUTE, METRICS, STATS})
UNDECODABLE = 'undecodable'
INVALID_EVENT = 'invalid_event'
NOT_DRAWN = 'not_drawn'   # a type the view reads on a topic it does not draw (a String elsewhere)


class ViewTypes:
    """The ChannelCheck of the view: VIEW_TYPES only, installed here, schema as recorded."""

    def __init__(self):
        from loom_ros.replay.ros import RosTypes
        self.ros = RosTypes()

    def __call__(self, channel: ChannelInfo) -> tuple[str, str] | None:
        if channel.type_name not in VIEW_TYPES:
            return UNKNOWN_TYPE, f'{channel.topic}: {channel.type_name} is not drawn by the view'
        return self.ros(channel)


def loom_topic(ros_topic: str) -> str | None:
    """The Loom topic of a recorded ROS topic in any namespace (`/ns/loom/camera/front` ->
    camera.front), None when it is not one."""
    marker = f'/{ROS_PREFIX}/'
    at = ros_topic.find(marker)
    return from_ros_topic(ros_topic, ros_topic[:at] or '/') if at >= 0 else None


def play_into(view: LoomView, source: McapSource) -> Counter:
    """Every readable message of `source` into `view`; returns what was skipped here (the
    source's own `skipped` counts the file's problems). RecordingError propagates after the
    messages before it were drawn."""
    from rclpy.serialization import deserialize_message
    from std_msgs.msg import String

    from loom_msgs.msg import BusStats, Metrics, RouteDecision
    classes = {STRING: String, ROUTE: RouteDecision, METRICS: Metrics, STATS: BusStats}
    skipped: Counter = Counter()
    for message in source.messages():
        stamp = message.log_time_ns / 1e9
        kind = message.channel.type_name
        try:
            if kind in (EVENT, BATCH):
                events = [decode_event_message(message.data)[2]] if kind == EVENT else \
                    decode_event_batch(message.data)[2]
            else:
                msg = deserialize_message(message.data, classes[kind])
        except Exception:   # noqa: BLE001 - whatever malformed CDR raises: skipped, counted
            skipped[UNDECODABLE] += 1
            continue
        if kind in (EVENT, BATCH):
            topic = loom_topic(message.topic)
            for event in events:
                try:
                    event.validate()
                except EventRejected:
                    skipped[INVALID_EVENT] += 1
                    continue
                if topic is not None:
                    view.on_event(event, topic, stamp)
        elif kind == STRING:
            if message.topic.endswith(UI_STATE_TOPIC):
                view.on_ui_state(msg.data, stamp)
            else:
                skipped[NOT_DRAWN] += 1
        elif kind == ROUTE:
            view.on_route_decision(msg, stamp)
        elif kind == METRICS:
            view.on_metrics(msg, stamp)
        else:
            view.on_bus_stats(msg, stamp)
    return skipped
