"""The Loom event bus on a ROS 2 node: publish and subscribe Loom topics as loom_msgs/Event.

The bus adapts the pure parts (names, QoS table, Event validation) to rclpy publishers and
subscriptions. Pattern subscriptions (`camera.**`) are resolved against the live ROS graph on a
timer, so topics that appear later are picked up. Every refusal is counted by reason; a bad
event or a failing callback never stops delivery to the others.
"""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from loom_ros.config.params import ParamSpec, declare_parameters
from loom_ros.bus.event import (
    DEFAULT_MAX_PAYLOAD_BYTES, Event, EventRejected, RejectReason,
)
from loom_ros.bus.names import (
    TopicNameError, TopicPattern, from_ros_topic, to_ros_topic, validate_topic,
)
from loom_ros.bus.qos import (
    QosLevel, TopicQosTable, UnknownQosLevel, parse_level, to_qos_profile,
)

EVENT_TYPE_NAME = 'loom_msgs/msg/Event'
DEFAULT_DISCOVERY_PERIOD_S = 0.5

Callback = Callable[[Event, str], None]


@dataclass
class BusStats:
    """Counters a bus keeps; `snapshot()` is what stats topics and tests read."""

    published: Counter = field(default_factory=Counter)   # per Loom topic
    received: Counter = field(default_factory=Counter)    # per Loom topic, after validation
    rejected: Counter = field(default_factory=Counter)    # per RejectReason value
    qos_incompatible: Counter = field(default_factory=Counter)  # per Loom topic

    def reject(self, reason: RejectReason) -> None:
        self.rejected[reason.value] += 1

    def snapshot(self) -> dict:
        return {'published': dict(self.published), 'received': dict(self.received),
                'rejected': dict(self.rejected), 'qos_incompatible': dict(self.qos_incompatible)}


class BusSubscription:
    """A handle returned by `EventBus.subscribe`: which topics it is attached to; `close()`."""

    def __init__(self, bus: 'EventBus', pattern: TopicPattern, level: QosLevel | None,
                 callback: Callback):
        self._bus = bus
        self.pattern = pattern
        self.level = level  # None: each matched topic's level from the bus's topic_qos table
        self.callback = callback
        self.topics: dict[str, QosLevel] = {}  # attached Loom topic -> QoS level used
        self.closed = False

    def close(self) -> None:
        self._bus.unsubscribe(self)


class _TopicEndpoint:
    """One rclpy subscription per (topic, level), fanned out to every matching BusSubscription."""

    def __init__(self):
        self.subscription = None
        self.handlers: list[BusSubscription] = []


class EventBus:
    """Publish and subscribe Loom events on a node. One bus per node."""

    def __init__(self, node, *, topic_qos: TopicQosTable | None = None,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 discovery_period_s: float = DEFAULT_DISCOVERY_PERIOD_S):
        self.node = node
        self.topic_qos = topic_qos or TopicQosTable()
        self.max_payload_bytes = max_payload_bytes
        self.stats = BusStats()
        self._logger = node.get_logger()
        self._publishers: dict[str, tuple[object, QosLevel]] = {}
        self._endpoints: dict[tuple[str, QosLevel], _TopicEndpoint] = {}
        self._patterns: list[BusSubscription] = []
        self._lock = threading.RLock()
        self._discovery_period_s = discovery_period_s
        self._discovery_timer = None

    # -- helpers ------------------------------------------------------------------------------
    def _level(self, topic: str, qos) -> QosLevel:
        if qos is None:
            return self.topic_qos.level_for(topic)
        try:
            return parse_level(qos)
        except UnknownQosLevel as exc:
            self.stats.reject(RejectReason.UNKNOWN_QOS)
            raise EventRejected(RejectReason.UNKNOWN_QOS, str(exc)) from None

    def _checked_topic(self, topic: str) -> str:
        try:
            return validate_topic(topic)
        except TopicNameError as exc:
            self.stats.reject(RejectReason.BAD_TOPIC)
            raise EventRejected(RejectReason.BAD_TOPIC, str(exc)) from None

    def _qos_options(self):
        from rclpy.qos_overriding_options import QoSOverridingOptions
        return QoSOverridingOptions.with_default_policies()

    # -- publishing ---------------------------------------------------------------------------
    def publisher_for(self, topic: str, qos=None):
        """The rclpy publisher behind a Loom topic (created on first use)."""
        topic = self._checked_topic(topic)
        level = self._level(topic, qos)
        with self._lock:
            known = self._publishers.get(topic)
            if known is not None:
                if known[1] is not level:
                    self.stats.reject(RejectReason.UNKNOWN_QOS)
                    raise EventRejected(
                        RejectReason.UNKNOWN_QOS,
                        f'{topic} is already published at QoS {known[1].value} by this node; '
                        f'cannot also publish it at {level.value}')
                return known[0]
            from rclpy.event_handler import PublisherEventCallbacks
            from loom_msgs.msg import Event as EventMsg
            pub = self.node.create_publisher(
                EventMsg, to_ros_topic(topic), to_qos_profile(level),
                qos_overriding_options=self._qos_options(),
                event_callbacks=PublisherEventCallbacks(
                    incompatible_qos=lambda info, t=topic: self._on_incompatible(t, info, 'offered')))
            self._publishers[topic] = (pub, level)
            return pub

    def publish(self, topic: str, event: Event, qos=None) -> None:
        """Validate and publish; raises EventRejected (and counts it) for bad input."""
        if not isinstance(event, Event):
            self.stats.reject(RejectReason.WRONG_TYPE)
            raise EventRejected(RejectReason.WRONG_TYPE,
                                f'publish() takes a loom Event, got {type(event).__name__}')
        pub = self.publisher_for(topic, qos)
        try:
            event.validate(self.max_payload_bytes)
        except EventRejected as exc:
            self.stats.reject(exc.reason)
            raise
        pub.publish(event.to_msg())
        self.stats.published[topic] += 1

    # -- subscribing --------------------------------------------------------------------------
    def subscribe(self, pattern: str, callback: Callback, qos=None) -> BusSubscription:
        """Call `callback(event, topic)` for each valid event on topics matching `pattern`.

        Without `qos`, each matched topic is subscribed at its level from the topic_qos table,
        which is what its publishers use when they share the config.
        """
        if not callable(callback):
            raise TypeError('callback must be callable as callback(event, topic)')
        try:
            parsed = TopicPattern.parse(pattern)
        except TopicNameError as exc:
            self.stats.reject(RejectReason.BAD_TOPIC)
            raise EventRejected(RejectReason.BAD_TOPIC, str(exc)) from None
        level = self._level(pattern, qos) if qos is not None else None
        sub = BusSubscription(self, parsed, level, callback)
        with self._lock:
            if parsed.is_wildcard:
                self._patterns.append(sub)
                self.refresh()
                if self._discovery_timer is None:
                    self._discovery_timer = self.node.create_timer(
                        self._discovery_period_s, self.refresh)
            else:
                self._attach(sub, pattern)
        return sub

    def unsubscribe(self, sub: BusSubscription) -> None:
        with self._lock:
            if sub.closed:
                return
            sub.closed = True
            if sub in self._patterns:
                self._patterns.remove(sub)
            for key in sub.topics.items():
                endpoint = self._endpoints.get(key)
                if endpoint is None:
                    continue
                endpoint.handlers.remove(sub)
                if not endpoint.handlers:
                    self.node.destroy_subscription(endpoint.subscription)
                    del self._endpoints[key]
            sub.topics.clear()
            if not self._patterns and self._discovery_timer is not None:
                self.node.destroy_timer(self._discovery_timer)
                self._discovery_timer = None

    def refresh(self) -> list[str]:
        """Attach pattern subscriptions to matching Event topics now in the graph; returns new ones."""
        with self._lock:
            if not self._patterns:
                return []
            namespace = self.node.get_namespace()
            attached = []
            for ros_name, types in self.node.get_topic_names_and_types():
                if EVENT_TYPE_NAME not in types:
                    continue
                topic = from_ros_topic(ros_name, namespace)
                if topic is None:
                    continue
                for sub in self._patterns:
                    if topic not in sub.topics and sub.pattern.matches(topic):
                        self._attach(sub, topic)
                        attached.append(topic)
            return attached

    def _attach(self, sub: BusSubscription, topic: str) -> None:
        level = sub.level or self.topic_qos.level_for(topic)
        key = (topic, level)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            from rclpy.event_handler import SubscriptionEventCallbacks
            from loom_msgs.msg import Event as EventMsg
            endpoint = _TopicEndpoint()
            endpoint.subscription = self.node.create_subscription(
                EventMsg, to_ros_topic(topic),
                lambda msg, t=topic, e=endpoint: self._deliver(msg, t, e),
                to_qos_profile(level),
                qos_overriding_options=self._qos_options(),
                event_callbacks=SubscriptionEventCallbacks(
                    incompatible_qos=lambda info, t=topic: self._on_incompatible(t, info, 'requested')))
            self._endpoints[key] = endpoint
        endpoint.handlers.append(sub)
        sub.topics[topic] = level

    def _deliver(self, msg, topic: str, endpoint: _TopicEndpoint) -> None:
        try:
            event = Event.from_msg(msg).validate(self.max_payload_bytes)
        except EventRejected as exc:
            self.stats.reject(exc.reason)
            self._logger.warning(f'dropped an event on {topic}: {exc}', throttle_duration_sec=1.0)
            return
        self.stats.received[topic] += 1
        for sub in list(endpoint.handlers):
            try:
                sub.callback(event, topic)
            except Exception as exc:  # one bad handler must not stop the bus
                self.stats.reject(RejectReason.CALLBACK_ERROR)
                self._logger.error(f'subscriber callback for {sub.pattern.text} failed on {topic} '
                                   f'(event {event.id}): {exc!r}', throttle_duration_sec=1.0)

    def _on_incompatible(self, topic: str, info, side: str) -> None:
        self.stats.qos_incompatible[topic] += 1
        policy = getattr(info.last_policy_kind, 'name', info.last_policy_kind)
        self._logger.warning(
            f'{topic}: {side} QoS is incompatible with a peer (policy {policy}); they do not '
            'connect. Publisher and subscribers of a Loom topic must use compatible QoS levels.',
            throttle_duration_sec=5.0)

    # -- teardown -----------------------------------------------------------------------------
    def destroy(self) -> None:
        with self._lock:
            for sub in list(self._patterns):
                self.unsubscribe(sub)
            for endpoint in list(self._endpoints.values()):
                for sub in list(endpoint.handlers):
                    self.unsubscribe(sub)
            for pub, _ in self._publishers.values():
                self.node.destroy_publisher(pub)
            self._publishers.clear()


BUS_PARAMETERS = [
    ParamSpec('bus.default_qos', 'QoS level of topics no bus.topic_qos entry matches '
              '(realtime, batched or background)', read_only=True),
    ParamSpec('bus.topic_qos', "Per-topic QoS levels, 'pattern=level', first match wins "
              "(e.g. 'camera.**=realtime')", read_only=True),
    ParamSpec('bus.max_payload_bytes', 'Largest event payload accepted, in bytes',
              read_only=True, min_value=0),
    ParamSpec('bus.discovery_period_s', 'How often pattern subscriptions look for new topics',
              read_only=True, min_value=0.01, max_value=60.0),
]


def create_bus(node, defaults_section: str) -> EventBus:
    """Declare the bus.* parameters on `node` (defaults from config/loom.yaml) and build its bus."""
    values = declare_parameters(node, defaults_section, BUS_PARAMETERS)
    table = TopicQosTable(list(values['bus.topic_qos']), default=values['bus.default_qos'])
    return EventBus(node, topic_qos=table, max_payload_bytes=int(values['bus.max_payload_bytes']),
                    discovery_period_s=float(values['bus.discovery_period_s']))
