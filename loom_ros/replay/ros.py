"""The ROS side of `loom play`: which recorded types this machine can publish, and a Sink that
publishes recorded messages and /clock from one plain rclpy node.

A channel is played only when its type is an interface this machine's ament index lists (so a
recording cannot make the player import an arbitrary module) and its recorded ros2msg schema
matches the local definition (comments and spacing aside): CDR written for another definition
would deserialize into wrong fields, or not at all. Each message is deserialized before it is
sent (a message that does not is skipped as `undecodable`, not handed to subscribers), then
published as the recorded bytes. Publishers are reliable (they match reliable and best-effort
subscribers alike), keep-last 100, volatile unless the recorder saw a transient-local publisher
(channel metadata `loom.durability`). The recording's own /clock is not replayed: the player
publishes its own.
"""
from __future__ import annotations

import importlib
import time

from loom_ros.cli.record import SchemaError, ros2msg_schema
from loom_ros.replay.mcap_source import (
    INVALID_TOPIC, SCHEMA_MISMATCH, UNKNOWN_TYPE, ChannelInfo, RecordedMessage, schema_body,
)
from loom_ros.replay.player import PUBLISH_FAILED, UNDECODABLE

CLOCK_TOPIC = '/clock'
RECORDED_CLOCK = 'recorded_clock'
PUBLISH_DEPTH = 100


class RosTypes:
    """Message classes and schemas of the interfaces installed here; a ChannelCheck."""

    def __init__(self):
        self._classes: dict[str, type] = {}

    def message_class(self, type_name: str) -> type:
        """LookupError unless `pkg/msg/Type` is an installed interface."""
        if type_name in self._classes:
            return self._classes[type_name]
        from ament_index_python.packages import get_resource
        pkg, _, name = type_name.partition('/msg/')
        try:
            content, _path = get_resource('rosidl_interfaces', pkg)
        except LookupError:
            raise LookupError(f'{type_name}: package {pkg!r} has no interfaces installed here') \
                from None
        if f'msg/{name}.msg' not in content.splitlines() and \
                f'msg/{name}.idl' not in content.splitlines():
            raise LookupError(f'{type_name}: {pkg} has no message {name}')
        cls = getattr(importlib.import_module(f'{pkg}.msg'), name)
        self._classes[type_name] = cls
        return cls

    def __call__(self, channel: ChannelInfo) -> tuple[str, str] | None:
        try:
            self.message_class(channel.type_name)
        except (LookupError, ImportError, AttributeError) as exc:
            return UNKNOWN_TYPE, f'{channel.topic}: {exc}'
        try:
            local = ros2msg_schema(channel.type_name)
        except SchemaError:
            return None   # no .msg text here to compare (an .idl-only type): trust the class
        if schema_body(channel.schema_text) != schema_body(local):
            return SCHEMA_MISMATCH, (f'{channel.topic}: the recorded {channel.type_name} is not '
                                     "this machine's definition")
        return None


class RosSink:
    """Publishes onto the ROS graph from `node` (see the module doc). `wait_subscribers_s`: on
    a topic's first message, wait up to this long for a subscriber to match (0: don't)."""

    def __init__(self, node, types: RosTypes, wait_subscribers_s: float = 0.0,
                 clock=time.monotonic, sleep=time.sleep):
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from rclpy.serialization import deserialize_message
        from rosgraph_msgs.msg import Clock
        self.node = node
        self.types = types
        self.wait_subscribers_s = wait_subscribers_s
        self._now, self._sleep = clock, sleep
        self._deserialize = deserialize_message
        self._clock_msg = Clock
        self._publishers: dict[str, tuple[object, type]] = {}
        self.clock_pub = node.create_publisher(
            Clock, CLOCK_TOPIC, QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        self.unmatched: list[str] = []   # topics nobody subscribed to within the wait

    def open(self, message: RecordedMessage) -> tuple[str, str] | None:
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        channel = message.channel
        if channel.topic == CLOCK_TOPIC:
            return RECORDED_CLOCK, 'the recording\'s /clock (the player publishes its own)'
        try:
            cls = self.types.message_class(channel.type_name)
        except (LookupError, ImportError, AttributeError) as exc:
            return UNKNOWN_TYPE, f'{channel.topic}: {exc}'
        durable = channel.metadata.get('loom.durability') == 'transient_local'
        qos = QoSProfile(depth=PUBLISH_DEPTH, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL if durable
                         else DurabilityPolicy.VOLATILE)
        try:
            publisher = self.node.create_publisher(cls, channel.topic, qos)
        except Exception as exc:   # noqa: BLE001 - rclpy's name checks are stricter in places
            return INVALID_TOPIC, f'{channel.topic[:80]!r}: {exc}'
        self._publishers[channel.topic] = (publisher, cls)
        if self.wait_subscribers_s > 0:
            deadline = self._now() + self.wait_subscribers_s
            while publisher.get_subscription_count() == 0 and self._now() < deadline:
                self._sleep(0.01)
            if publisher.get_subscription_count() == 0:
                self.unmatched.append(channel.topic)
        return None

    def publish(self, message: RecordedMessage) -> tuple[str, str] | None:
        publisher, cls = self._publishers[message.topic]
        try:
            self._deserialize(message.data, cls)
        except Exception as exc:   # noqa: BLE001 - whatever the typesupport raises on bad CDR
            return UNDECODABLE, f'{message.topic}: {type(exc).__name__}: {str(exc)[:120]}'
        try:
            publisher.publish(message.data)
        except Exception as exc:   # noqa: BLE001 - RCLError (history full), shutdown
            return PUBLISH_FAILED, f'{message.topic}: {type(exc).__name__}: {str(exc)[:120]}'
        return None

    def drain(self, timeout_s: float) -> list[str]:
        """Wait up to `timeout_s` in all for the subscribers to acknowledge what was played
        (the publishers are reliable and keep the last PUBLISH_DEPTH: a subscriber matched late
        gets them again); the topics still unacknowledged. Leaving at once lost the whole play
        to a subscriber whose side of the match came late."""
        from rclpy.duration import Duration
        deadline = self._now() + max(0.0, timeout_s)
        left = []
        for topic, (publisher, _cls) in self._publishers.items():
            try:
                acked = publisher.wait_for_all_acked(
                    Duration(nanoseconds=int(max(0.0, deadline - self._now()) * 1e9)))
            except Exception:   # noqa: BLE001 - shutting down: nothing more can be sent
                acked = False
            if not acked:
                left.append(topic)
        return left

    def clock(self, stamp_ns: int) -> None:
        from builtin_interfaces.msg import Time
        sec, nanosec = divmod(max(0, stamp_ns), 1_000_000_000)
        try:
            self.clock_pub.publish(self._clock_msg(clock=Time(sec=min(sec, 2**31 - 1),
                                                              nanosec=nanosec)))
        except Exception:   # noqa: BLE001 - shutting down: the next message says so
            pass
