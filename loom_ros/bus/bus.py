"""The Loom event bus on a ROS 2 node: publish and subscribe Loom topics over DDS.

The bus adapts the pure parts (names, QoS table, Event validation, backpressure) to rclpy:
- Realtime and Background topics carry loom_msgs/Event; Batched topics carry loom_msgs/EventBatch,
  filled by the publisher up to `batch_max_events` or `batch_max_age_ms`, unbatched on receipt.
- Every published event has the bus's id and a per-topic sequence number, so subscribers count
  gaps (loss) per publisher, and skip DDS copies of what their own process already delivered.
- Intra-process fast path: a subscription in the same process gets the Event object directly
  (no serialization); DDS is used only when a subscriber outside the process is matched.
  Events delivered in-process are shared: treat them as read-only, as rclcpp treats const messages.
- Pattern subscriptions (`camera.**`) are resolved against the live graph on a timer.
- Every refusal, drop, sample, fold and gap is counted (`stats`, and the `loom/bus/stats` topic).
  Sequence numbers come from the wire, so they are untrusted: a gap wider than `max_seq_gap` or a
  step backwards counts as a publisher reset, not as loss, and every counter saturates.
"""
from __future__ import annotations

import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

from rclpy.serialization import deserialize_message

from loom_ros.bus.backpressure import PASSTHROUGH, BackpressurePolicy, DeliveryQueue, Flow
from loom_ros.bus.event import DEFAULT_MAX_PAYLOAD_BYTES, Event, EventRejected, RejectReason
from loom_ros.bus.executor import timer_callback
from loom_ros.bus.names import (
    TopicNameError, TopicPattern, from_ros_topic, to_ros_topic, validate_topic,
)
from loom_ros.bus.qos import (
    QosLevel, TopicQosTable, UnknownQosLevel, levels_compatible, parse_level, to_qos_profile,
    wire_type,
)
from loom_ros.config.params import ParamSpec, declare_parameters
from loom_ros.bus.wire import (
    BATCH_FIRST_EVENT_POS, EVENT_POS, WireError, decode_event_batch, decode_event_message,
    encode_event, encode_event_batch, encode_event_message,
)
from loom_ros.telemetry import tracing as _tracing
from loom_ros.telemetry.logs import mask_node_logger
from loom_ros.telemetry.metrics import OTHER_TOPICS, observed_call as _observed_call

STATS_TOPIC = 'loom/bus/stats'   # a plain ROS topic (BusStats), not a Loom event topic
U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
# Widest sequence gap still counted as loss: about 100 s of a 10k events/s publisher outrunning a
# stalled subscriber. Wider gaps (and steps backwards) are a reset: a restarted or forged
# publisher, whose numbers say nothing about what this subscriber missed.
MAX_SEQ_GAP = 1 << 20
# Publishers whose next sequence number each endpoint remembers; forged bus_ids cannot grow it.
MAX_TRACKED_PUBLISHERS = 1024
# Topics one pattern subscription attaches to (bus.max_pattern_topics). Topics come from the
# ROS graph, where anyone on the domain can make them: each attached one is a DDS reader.
MAX_PATTERN_TOPICS = 1024
# Bytes a serialized Event may take beyond its payload limit (strings, metadata, tags) before
# it is refused unread.
MAX_ENVELOPE_BYTES = 1 << 20
DEFAULT_DISCOVERY_PERIOD_S = 0.5
WIRE_TYPE_NAMES = {'Event': 'loom_msgs/msg/Event', 'EventBatch': 'loom_msgs/msg/EventBatch'}

Callback = Callable[[Event, str], None]

# Process-wide registry behind the intra-process fast path: which buses live in this process and
# which of their subscription endpoints listen on each fully qualified ROS topic.
_LOCAL_LOCK = threading.Lock()
_LOCAL_BUS_IDS: set[int] = set()
_LOCAL_ENDPOINTS: dict[tuple[int, str], list['_Endpoint']] = {}
# Bumped (under _LOCAL_LOCK) whenever an endpoint joins or leaves _LOCAL_ENDPOINTS: an outlet
# keeps the compatible local endpoints it found until it moves (publish used to recompute them,
# ~18 % of an in-process publish).
_LOCAL_VERSION = [0]
_DISPATCH = threading.local()


def _rcl_error():
    from rclpy.impl.implementation_singleton import rclpy_implementation
    return rclpy_implementation.RCLError


def _msg_types():
    from loom_msgs.msg import Event as EventMsg
    from loom_msgs.msg import EventBatch
    return {'Event': EventMsg, 'EventBatch': EventBatch}


class BusStats:
    """Bus-wide counters; per-subscription counters live on each BusSubscription's flow."""

    def __init__(self):
        self.published: Counter = Counter()       # per Loom topic
        self.received: Counter = Counter()        # per Loom topic, valid events only
        self.rejected: Counter = Counter()        # per RejectReason value
        self.qos_incompatible: Counter = Counter()  # per Loom topic
        self.type_mismatch: Counter = Counter()  # per Loom topic: carries the other wire type
        self.batches_sent = 0
        # Per Loom topic, counted under the topic's outlet lock as `published` is: one shared
        # `+= n` from publishers on two topics at once could lose one of them.
        self.intra_process_by_topic: Counter = Counter()
        self.subscriptions: list[BusSubscription] = []

    @property
    def intra_process(self) -> int:
        """Deliveries to subscriptions in this process, without DDS."""
        return sum(list(self.intra_process_by_topic.values()))

    def reject(self, reason: RejectReason) -> None:
        self.rejected[reason.value] += 1

    def snapshot(self) -> dict:
        return {'published': dict(self.published), 'received': dict(self.received),
                'rejected': dict(self.rejected), 'qos_incompatible': dict(self.qos_incompatible),
                'type_mismatch': dict(self.type_mismatch),
                'batches_sent': self.batches_sent, 'intra_process': self.intra_process,
                'subscriptions': [s.snapshot() for s in self.subscriptions]}


class BusSubscription:
    """A handle returned by `EventBus.subscribe`: topics attached, counters, `close()`."""

    def __init__(self, bus: 'EventBus', pattern: TopicPattern, level: QosLevel | None,
                 callback: Callback, policy: BackpressurePolicy):
        self._bus = bus
        self.pattern = pattern
        self.level = level  # None: each matched topic's level from the bus's topic_qos table
        self.callback = callback
        self.policy = policy
        self.flow = Flow(policy)
        self.counters = self.flow.counters
        self.topics: dict[str, QosLevel] = {}  # attached Loom topic -> QoS level used
        self.depth: int | None = None   # a deeper DDS history than the level's (subscribe)
        # Matching topics in the graph left unattached at the last look, past the bus's
        # max_pattern_topics (a gauge: recounted at each look, so it holds no names).
        self.topics_refused = 0
        # Topics a full pattern let go for having no publisher: not attached again until one
        # publishes (else a topic only a reader keeps in the graph comes straight back and is
        # let go again at every scan). At most the bus's max_pattern_topics, oldest out.
        self.released: dict[str, None] = {}
        self.closed = False
        self._lock = threading.Lock()
        self.queue: DeliveryQueue | None = None
        self._worker: threading.Thread | None = None
        if policy.queue != 'inline':
            self.queue = DeliveryQueue(policy, self.counters)
            self._worker = threading.Thread(target=self._drain, daemon=True,
                                            name=f'loom-sub-{pattern.text}')
            self._worker.start()

    def close(self) -> None:
        self._bus.unsubscribe(self)

    def offer(self, event: Event, topic: str, now: float) -> None:
        """Run the event through this subscription's backpressure, then deliver or queue it."""
        with self._lock:
            out = self.flow.offer(event, now)
        if out is not None:
            self._hand_over(out, topic)

    def flush_due(self, now: float) -> None:
        with self._lock:
            out = self.flow.flush_due(now)
        if out is not None:
            self._hand_over(out, next(iter(self.topics), self.pattern.text))

    def _hand_over(self, event: Event, topic: str) -> None:
        if self.queue is None:
            self._call(event, topic)
        else:
            self.queue.put((event, topic))

    def _call(self, event: Event, topic: str) -> None:
        if _tracing.ENABLED or self._bus.metrics is not None:
            _observed_call(self, event, topic)
        else:
            self._deliver(event, topic)

    def _deliver(self, event: Event, topic: str) -> None:
        try:
            self.callback(event, topic)
        except Exception as exc:  # one bad handler must not stop the bus
            self._bus.stats.reject(RejectReason.CALLBACK_ERROR)
            self._bus.logger.error(
                f'subscriber callback for {self.pattern.text} failed on {topic} '
                f'(event {event.id}): {exc!r}', throttle_duration_sec=1.0)
        else:
            self.counters.delivered += 1

    def _drain(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            self._call(*item)

    def stop(self) -> None:
        if self.queue is not None:
            self.queue.close()
            if self._worker is not threading.current_thread():
                self._worker.join(timeout=5.0)

    def snapshot(self) -> dict:
        return {'pattern': self.pattern.text, 'qos': self.level.value if self.level else '',
                'topics': sorted(self.topics), **self.counters.as_dict(),
                'queue_depth': len(self.queue) if self.queue is not None else 0}


class _Endpoint:
    """One rclpy subscription per (topic, level), fanned out to every matching BusSubscription."""

    def __init__(self, bus: 'EventBus', topic: str, level: QosLevel):
        self.bus = bus
        self.topic = topic
        self.level = level
        self.subscription = None
        self.fq_name = ''
        self.handlers: list[BusSubscription] = []
        self.next_seq: dict[int, int] = {}  # per publishing bus


class _Outlet:
    """One rclpy publisher per Loom topic, with its sequence counter and pending batch."""

    def __init__(self, topic: str, level: QosLevel, publisher):
        self.topic = topic
        self.level = level
        self.publisher = publisher
        self.fq_name = publisher.topic_name
        self.seq = 0
        self.batched = wire_type(level) == 'EventBatch'
        self.pending: list = []
        self.pending_first_seq = 0
        # Held while the sequence number is taken and the event written or batched: agents'
        # threads publish while the executor's batch timer sends (a batch swapped out between
        # a publisher's look and its append lost that event; two publishers shared a seq).
        self.lock = threading.Lock()
        # (the _LOCAL_VERSION it was found at, the compatible local endpoints): one attribute,
        # so two publishing threads never pair a list with another version
        self.local: tuple[int, list] = (-1, [])


class EventBus:
    """Publish and subscribe Loom events on a node. One bus per node."""

    def __init__(self, node, *, topic_qos: TopicQosTable | None = None,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 discovery_period_s: float = DEFAULT_DISCOVERY_PERIOD_S,
                 batch_max_events: int = 100, batch_max_age_ms: float = 10.0,
                 intra_process: bool = True, stats_period_s: float = 0.0,
                 backpressure: list[str] | tuple[str, ...] = (), raw_batches: bool = True,
                 max_seq_gap: int = MAX_SEQ_GAP, max_pattern_topics: int = MAX_PATTERN_TOPICS,
                 stats_max_subscriptions: int = 100):
        self.node = node
        self.stats_max_subscriptions = max(1, int(stats_max_subscriptions))
        self._stats_turn = 0   # where the next BusStats starts in a longer subscription list
        self.max_pattern_topics = max(1, int(max_pattern_topics))
        self.topic_qos = topic_qos or TopicQosTable()
        self.max_payload_bytes = max_payload_bytes
        self.batch_max_events = max(1, int(batch_max_events))
        self.batch_max_age_s = max(0.001, batch_max_age_ms / 1000.0)
        self.intra_process = intra_process
        self.raw_batches = raw_batches   # decode received EventBatch bytes ourselves (wire.py)
        self.backpressure = _parse_backpressure_table(backpressure)
        self.stats = BusStats()
        self.metrics = None    # a telemetry MetricsRegistry: handler latency histograms when set
        self.telemetry = None  # the node's NodeTelemetry when built by create_bus
        self.logger = mask_node_logger(node)   # masked from the start (issue 13, fault 10)
        self.bus_id = random.getrandbits(63) + 1
        self.max_seq_gap = max_seq_gap
        self._context_key = id(node.context)
        self._outlets: dict[str, _Outlet] = {}
        # Outlets that may hold a pending batch (added under the outlet's lock with its first
        # pending event): the batch timer looks at these, not at every outlet (an agent host
        # has two per agent; 2,000 looked at 100 times a second cost 3-4 % of a core).
        self._batching: dict[str, _Outlet] = {}
        self._endpoints: dict[tuple[str, QosLevel], _Endpoint] = {}
        self._patterns: list[BusSubscription] = []
        self._lock = threading.RLock()
        self._discovery_period_s = discovery_period_s
        self._discovery_timer = None
        self._batch_timer = None
        self._window_timer = None
        self._stats_pub = self._stats_timer = None
        self._last_log: dict[str, float] = {}
        self._cdr = _cdr_matches_rclpy()   # publish CDR bytes from wire.py (else rclpy's path)
        with _LOCAL_LOCK:
            _LOCAL_BUS_IDS.add(self.bus_id)
        if stats_period_s > 0:
            from loom_msgs.msg import BusStats as BusStatsMsg
            self._stats_pub = node.create_publisher(BusStatsMsg, STATS_TOPIC,
                                                    to_qos_profile(QosLevel.REALTIME))
            self._stats_timer = node.create_timer(stats_period_s, self.publish_stats)

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
    def _outlet(self, topic: str, qos) -> _Outlet:
        outlet = self._outlets.get(topic) if type(topic) is str else None
        if outlet is not None and (qos is None or qos == outlet.level or qos == outlet.level.value):
            return outlet
        topic = self._checked_topic(topic)
        level = self._level(topic, qos)
        with self._lock:
            outlet = self._outlets.get(topic)
            if outlet is not None:
                if outlet.level is not level:
                    self.stats.reject(RejectReason.UNKNOWN_QOS)
                    raise EventRejected(
                        RejectReason.UNKNOWN_QOS,
                        f'{topic} is already published at QoS {outlet.level.value} by this node; '
                        f'cannot also publish it at {level.value}')
                return outlet
            from rclpy.event_handler import PublisherEventCallbacks
            pub = self.node.create_publisher(
                _msg_types()[wire_type(level)], to_ros_topic(topic), to_qos_profile(level),
                qos_overriding_options=self._qos_options(),
                event_callbacks=PublisherEventCallbacks(
                    incompatible_qos=lambda info, t=topic: self._on_incompatible(t, info, 'offered')))
            outlet = _Outlet(topic, level, pub)
            self._outlets[topic] = outlet
            self._claim_series(topic)
            if outlet.batched and self._batch_timer is None:
                self._batch_timer = self.node.create_timer(self.batch_max_age_s,
                                                          timer_callback(self.flush))
            return outlet

    def publisher_for(self, topic: str, qos=None):
        """The rclpy publisher behind a Loom topic (created on first use)."""
        return self._outlet(topic, qos).publisher

    def publish(self, topic: str, event: Event, qos=None) -> None:
        """Validate and publish; raises EventRejected (and counts it) for bad input."""
        if not isinstance(event, Event):
            self.stats.reject(RejectReason.WRONG_TYPE)
            raise EventRejected(RejectReason.WRONG_TYPE,
                                f'publish() takes a loom Event, got {type(event).__name__}')
        outlet = self._outlet(topic, qos)
        try:
            event.validate(self.max_payload_bytes)
        except EventRejected as exc:
            self.stats.reject(exc.reason)
            raise
        span = _tracing.start_publish_span(topic, event) if _tracing.ENABLED else None
        try:
            local = self._local_endpoints(outlet) if self.intra_process else ()
            with outlet.lock:
                seq = outlet.seq + 1
                # DDS only when someone outside this process listens (the local ones are
                # matched too); the same rule as rclcpp's intra-process publish. Serialized
                # now, before any local delivery: later changes to `event` cannot leak in, and
                # a callback that publishes on this topic cannot overtake it in the batch.
                if not local or outlet.publisher.get_subscription_count() > len(local):
                    self._serialize(outlet, event, seq)
                elif outlet.pending:
                    self._send_batch(outlet)  # keep order if the remote subscriber just left
                outlet.seq = seq
                self.stats.published[outlet.topic] += 1   # under the lock: no lost count
                if local:
                    self.stats.intra_process_by_topic[outlet.topic] += len(local)
            if local:
                for endpoint in local:
                    _dispatch(endpoint, event)
        finally:
            if span is not None:
                span.end()

    def _serialize(self, outlet: _Outlet, event: Event, seq: int) -> None:
        """Write the event's CDR bytes (wire.py) into its batch, or to DDS; EventRejected
        (counted) for a string UTF-8 cannot hold (a lone surrogate)."""
        try:
            if not self._cdr:   # rclpy's message path (wire.py's layout did not match)
                msg = event.to_msg()
                msg.bus_id, msg.seq = self.bus_id, seq
                data = msg
            elif outlet.batched:
                data = encode_event(event, self.bus_id, seq, EVENT_POS if outlet.pending
                                    else BATCH_FIRST_EVENT_POS)
            else:
                data = encode_event_message(event, self.bus_id, seq)
        except UnicodeEncodeError as exc:
            self.stats.reject(RejectReason.BAD_FIELD)
            raise EventRejected(RejectReason.BAD_FIELD, f'event {event.id}: a string is not '
                                f'valid Unicode ({str(exc)[:120]})') from None
        if outlet.batched:
            if not outlet.pending:
                outlet.pending_first_seq = seq
                self._batching[outlet.topic] = outlet
            outlet.pending.append(data)
            if len(outlet.pending) >= self.batch_max_events:
                self._send_batch(outlet)
        else:
            self._write(outlet, data, 1)

    def flush(self) -> None:
        """Send every pending batch now (the batch timer calls this every batch_max_age_ms)."""
        for topic, outlet in list(self._batching.items()):
            with outlet.lock:   # a publisher adds it back, under this lock, with its next event
                if outlet.pending:
                    self._send_batch(outlet)
                # pop: another flush (destroy() off the executor's thread while the timer
                # fires) may have taken it from its own look at the same outlets
                self._batching.pop(topic, None)

    def _send_batch(self, outlet: _Outlet) -> None:
        """The outlet's pending events as one EventBatch (its lock held)."""
        pending, outlet.pending = outlet.pending, []
        stamp_ns = self.node.get_clock().now().nanoseconds
        if self._cdr:
            batch = encode_event_batch(pending, self.bus_id, outlet.pending_first_seq, stamp_ns)
        else:
            from loom_msgs.msg import EventBatch
            batch = EventBatch()
            batch.bus_id, batch.first_seq = self.bus_id, outlet.pending_first_seq
            batch.header.stamp.sec, batch.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
            batch.events = pending
        if self._write(outlet, batch, len(pending)):
            self.stats.batches_sent += 1

    def _write(self, outlet: _Outlet, msg, events: int) -> bool:
        """Hand a message (or its CDR bytes) to DDS. Fast DDS refuses writes when a reliable reader is too far behind
        ('cannot publish data'): that is backpressure, so it is counted and logged, not raised."""
        try:
            outlet.publisher.publish(msg)
            return True
        except _rcl_error() as exc:
            self.stats.rejected[RejectReason.PUBLISH_FAILED.value] += events
            if self._may_log('publish_failed'):
                self.logger.warning(f'{outlet.topic}: DDS refused {events} event(s) ({exc}); a '
                                    'reliable subscriber is too far behind (counted as '
                                    'publish_failed)')
            return False

    def _local_endpoints(self, outlet: _Outlet) -> list[_Endpoint]:
        version = _LOCAL_VERSION[0]   # read first: a change while we look is seen next time
        found_at, local = outlet.local
        if found_at == version:
            return local
        endpoints = _LOCAL_ENDPOINTS.get((self._context_key, outlet.fq_name)) or ()
        local = [e for e in list(endpoints) if levels_compatible(outlet.level, e.level)]
        outlet.local = (version, local)
        return local

    # -- subscribing --------------------------------------------------------------------------
    def matched_publishers(self, topic: str) -> int:
        """How many publishers this bus's readers of `topic` have matched (0 before a pattern
        attached to it): what a caller waits on before relying on volatile events to arrive."""
        with self._lock:
            endpoints = [e for (t, _level), e in self._endpoints.items() if t == topic]
        return sum(e.subscription.get_publisher_count() for e in endpoints
                   if e.subscription is not None)

    def subscribe(self, pattern: str, callback: Callback, qos=None,
                  backpressure: BackpressurePolicy | str | None = None,
                  depth: int | None = None) -> BusSubscription:
        """Call `callback(event, topic)` for each valid event on topics matching `pattern`.

        Without `qos`, each matched topic is subscribed at its level from the topic_qos table,
        which is what its publishers use when they share the config. Without `backpressure`,
        the first `bus.backpressure` entry matching the pattern applies, else none. `depth`
        deepens the DDS reader's history past the level's (never shallower), so a burst waits
        for a slow taker instead of being overwritten; it applies to endpoints it creates.
        """
        if not callable(callback):
            raise TypeError('callback must be callable as callback(event, topic)')
        try:
            parsed = TopicPattern.parse(pattern)
        except TopicNameError as exc:
            self.stats.reject(RejectReason.BAD_TOPIC)
            raise EventRejected(RejectReason.BAD_TOPIC, str(exc)) from None
        level = self._level(pattern, qos) if qos is not None else None
        if isinstance(backpressure, str):
            backpressure = BackpressurePolicy.parse(backpressure)
        policy = backpressure or self._policy_for(parsed)
        sub = BusSubscription(self, parsed, level, callback, policy)
        sub.depth = depth
        with self._lock:
            self.stats.subscriptions.append(sub)
            if policy.aggregate_window_s and self._window_timer is None:
                self._window_timer = self.node.create_timer(
                    max(0.005, policy.aggregate_window_s / 4), self._flush_windows)
            if parsed.is_wildcard:
                self._patterns.append(sub)
                self.refresh()
                if self._discovery_timer is None:
                    self._discovery_timer = self.node.create_timer(
                        self._discovery_period_s, self.refresh)
            else:
                self._attach(sub, pattern)
                self._claim_series(pattern, subscribed=True)
        return sub

    def _claim_series(self, topic: str, subscribed: bool = False) -> None:
        """A topic this node names itself (a subscription to it, or publishing on it) takes its
        metrics series now, ahead of topics that only come through patterns: those are anyone's
        to make, and could otherwise take every place first."""
        metrics = self.metrics
        if metrics is not None:
            metrics.topic_label(topic)
            if subscribed:
                metrics.subscription_label(topic)

    def _policy_for(self, pattern: TopicPattern) -> BackpressurePolicy:
        for rule, policy in self.backpressure:
            if rule.text == pattern.text or (not pattern.is_wildcard and rule.matches(pattern.text)):
                return policy
        return PASSTHROUGH

    def unsubscribe(self, sub: BusSubscription) -> None:
        with self._lock:
            if sub.closed:
                return
            sub.closed = True
            if sub in self._patterns:
                self._patterns.remove(sub)
            if sub in self.stats.subscriptions:
                self.stats.subscriptions.remove(sub)
            for key in sub.topics.items():
                endpoint = self._endpoints.get(key)
                if endpoint is None:
                    continue
                endpoint.handlers.remove(sub)
                if not endpoint.handlers:
                    self._detach(key, endpoint)
            sub.topics.clear()
            sub.stop()
            if not self._patterns and self._discovery_timer is not None:
                self.node.destroy_timer(self._discovery_timer)
                self._discovery_timer = None

    def refresh(self) -> list[str]:
        """Attach pattern subscriptions to matching Loom topics now in the graph; returns new ones."""
        with self._lock:
            if not self._patterns:
                return []
            namespace = self.node.get_namespace()
            attached = []
            refused = dict.fromkeys(self._patterns, 0)
            for ros_name, types in self.node.get_topic_names_and_types():
                if not any(t in WIRE_TYPE_NAMES.values() for t in types):
                    continue
                topic = from_ros_topic(ros_name, namespace)
                if topic is None:
                    continue
                for sub in self._patterns:
                    if topic in sub.topics or not sub.pattern.matches(topic):
                        continue
                    if topic in sub.released:
                        if not self.node.count_publishers(ros_name):
                            continue   # still nobody publishing: it stays out, uncounted
                        del sub.released[topic]
                    if len(sub.topics) >= self.max_pattern_topics:
                        refused[sub] += 1
                        continue
                    level = sub.level or self.topic_qos.level_for(topic)
                    if WIRE_TYPE_NAMES[wire_type(level)] not in types:
                        self._type_mismatch(topic, level, types)
                        continue
                    if self._attach(sub, topic):
                        attached.append(topic)
            for sub, count in refused.items():
                if count:   # full: let go of attached topics nobody publishes on any more;
                    self._release_dead(sub)   # the next scan attaches others in their place
                sub.topics_refused = count
                if count and self._may_log(f'pattern_topics:{sub.pattern.text}', 60.0):
                    self.logger.warning(
                        f'{sub.pattern.text}: {count} more matching topic(s) in the graph are not '
                        f'subscribed: the pattern is at bus.max_pattern_topics '
                        f'({self.max_pattern_topics}). Anyone on the ROS domain can make topics; '
                        'raise the limit only for a fleet this large')
            return attached

    def _release_dead(self, sub: BusSubscription) -> None:
        """A pattern at its limit lets go of its topics that have no publisher left (the bus
        lock held): topics made for a moment would otherwise hold its places for good and keep
        out the ones that came later. Only under that pressure: a topic whose publisher is
        restarting keeps its reader otherwise."""
        for key in list(sub.topics.items()):
            endpoint = self._endpoints.get(key)
            if endpoint is None or self.node.count_publishers(endpoint.fq_name):
                continue
            endpoint.handlers.remove(sub)
            if not endpoint.handlers:
                self._detach(key, endpoint)
            del sub.topics[key[0]]
            sub.released[key[0]] = None
            while len(sub.released) > self.max_pattern_topics:
                del sub.released[next(iter(sub.released))]

    def _type_mismatch(self, topic: str, level: QosLevel, detail) -> None:
        """Counted per topic, for at most max_pattern_topics topics (the rest together: topics
        of another type are anyone's to make), and said once per counted topic."""
        counts = self.stats.type_mismatch
        if topic not in counts and len(counts) >= self.max_pattern_topics:
            topic = OTHER_TOPICS
        say = self._may_log('type_mismatch_other', 60.0) if topic == OTHER_TOPICS \
            else not counts[topic]
        counts[topic] += 1
        if say:
            where = 'more topics' if topic == OTHER_TOPICS else topic
            self.logger.warning(   # type names come from the graph: quoted and cut
                f'{where}: not subscribed at {level.value} ({WIRE_TYPE_NAMES[wire_type(level)]})'
                f': the topic carries {ascii(str(detail)[:300])}. Publishers and subscribers must'
                ' agree on the level (bus.topic_qos) since Batched travels as EventBatch.')

    def _attach(self, sub: BusSubscription, topic: str) -> bool:
        level = sub.level or self.topic_qos.level_for(topic)
        key = (topic, level)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            from rclpy.event_handler import SubscriptionEventCallbacks
            RCLError = _rcl_error()
            endpoint = _Endpoint(self, topic, level)
            kind = wire_type(level)
            # Events are always taken raw: rclpy drops what it cannot deserialize without a
            # trace, so the bus deserializes them itself and counts what fails.
            raw = kind == 'Event' or self.raw_batches
            handler = (self._on_raw_batch if raw else self._on_batch) if kind == 'EventBatch' \
                else self._on_raw_event
            profile = to_qos_profile(level)
            if sub.depth is not None and sub.depth > profile.depth:
                profile.depth = int(sub.depth)
            try:
                endpoint.subscription = self.node.create_subscription(
                    _msg_types()[kind], to_ros_topic(topic),
                    lambda msg, e=endpoint: handler(msg, e),
                    profile, raw=raw,
                    qos_overriding_options=self._qos_options(),
                    event_callbacks=SubscriptionEventCallbacks(
                        incompatible_qos=lambda info, t=topic: self._on_incompatible(
                            t, info, 'requested')))
            except RCLError as exc:  # this process already has the topic with the other type
                self._type_mismatch(topic, level, f'another type in this process ({exc})')
                if sub.pattern.is_wildcard:
                    return False
                raise EventRejected(RejectReason.BAD_TOPIC,
                                    f'cannot subscribe to {topic} at {level.value}: this process '
                                    'already uses the topic with the other wire type') from None
            endpoint.fq_name = endpoint.subscription.topic_name
            self._endpoints[key] = endpoint
            with _LOCAL_LOCK:
                _LOCAL_ENDPOINTS.setdefault((self._context_key, endpoint.fq_name), []).append(endpoint)
                _LOCAL_VERSION[0] += 1
        endpoint.handlers.append(sub)
        sub.topics[topic] = level
        return True

    def _detach(self, key, endpoint: _Endpoint) -> None:
        with _LOCAL_LOCK:
            local = _LOCAL_ENDPOINTS.get((self._context_key, endpoint.fq_name), [])
            if endpoint in local:
                local.remove(endpoint)
            _LOCAL_VERSION[0] += 1
        self.node.destroy_subscription(endpoint.subscription)
        del self._endpoints[key]

    # -- receiving ----------------------------------------------------------------------------
    def _on_raw_event(self, data: bytes, endpoint: _Endpoint) -> None:
        """A serialized Event: bounded, decoded here (wire.py; failures counted), then accepted."""
        if len(data) > self.max_payload_bytes + MAX_ENVELOPE_BYTES:
            self.stats.reject(RejectReason.OVERSIZE_PAYLOAD)
            if self._may_log('reject'):
                self.logger.warning(f'dropped an event of {len(data)} bytes on {endpoint.topic} '
                                    'unread: larger than any valid event')
            return
        if not self.raw_batches:   # rclpy's deserializer and message objects
            try:
                msg = deserialize_message(data, _msg_types()['Event'])
            except Exception as exc:  # rclpy raises RMWError (a RuntimeError) for bad CDR
                self._undecodable(endpoint, len(data), str(exc))
                return
            self._on_event(msg, endpoint)
            return
        try:
            bus_id, seq, event = decode_event_message(data)
        except WireError as exc:
            self._undecodable(endpoint, len(data), str(exc))
            return
        if self.intra_process and bus_id in _LOCAL_BUS_IDS:
            return  # already delivered in-process, without serialization
        self._account(endpoint, bus_id, seq, 1)
        try:
            event.validate(self.max_payload_bytes)
        except EventRejected as exc:
            self.stats.reject(exc.reason)
            if self._may_log('reject'):
                self.logger.warning(f'dropped an event on {endpoint.topic}: {exc}')
            return
        _dispatch(endpoint, event)

    def _undecodable(self, endpoint: _Endpoint, size: int, why: str) -> None:
        self.stats.reject(RejectReason.BAD_FIELD)
        if self._may_log('wire'):
            self.logger.warning(f'dropped an undecodable Event of {size} bytes on '
                                f'{endpoint.topic}: {why[:200]}')

    def _on_event(self, msg, endpoint: _Endpoint) -> None:
        if self.intra_process and msg.bus_id in _LOCAL_BUS_IDS:
            return  # already delivered in-process, without serialization
        self._account(endpoint, msg.bus_id, msg.seq, 1)
        self._accept(msg, endpoint)

    def _on_batch(self, batch, endpoint: _Endpoint) -> None:
        if self.intra_process and batch.bus_id in _LOCAL_BUS_IDS:
            return
        self._account(endpoint, batch.bus_id, batch.first_seq, len(batch.events))
        for msg in batch.events:
            self._accept(msg, endpoint)

    def _on_raw_batch(self, data: bytes, endpoint: _Endpoint) -> None:
        """A serialized EventBatch, decoded without building rclpy message objects (wire.py)."""
        try:
            decoded = decode_event_batch(data, skip_bus_ids=_LOCAL_BUS_IDS
                                         if self.intra_process else ())
        except WireError as exc:
            self.stats.reject(RejectReason.BAD_FIELD)
            if self._may_log('wire'):
                self.logger.warning(f'dropped a malformed EventBatch on {endpoint.topic}: {exc}')
            return
        if decoded is None:
            return   # from a bus in this process: its subscribers already had it
        bus_id, first_seq, events = decoded
        self._account(endpoint, bus_id, first_seq, len(events))
        limit = self.max_payload_bytes
        valid = []
        for event in events:
            try:
                valid.append(event.validate(limit))
            except EventRejected as exc:
                self.stats.reject(exc.reason)
                if self._may_log('reject'):
                    self.logger.warning(f'dropped an event on {endpoint.topic}: {exc}')
        _dispatch_all(endpoint, valid)

    def _account(self, endpoint: _Endpoint, bus_id: int, first_seq: int, count: int) -> None:
        """Count gaps in a publisher's sequence numbers as lost events; a gap wider than
        `max_seq_gap` or a step backwards as a reset (the numbers come from the wire)."""
        if not bus_id:
            return  # a publisher that is not a Loom bus (raw rclpy, ros2 topic pub)
        seqs = endpoint.next_seq
        expected = seqs.get(bus_id)
        if expected is None:
            if len(seqs) >= MAX_TRACKED_PUBLISHERS:
                del seqs[next(iter(seqs))]   # forget the publisher first seen longest ago
        elif first_seq == expected:
            pass
        elif expected < first_seq <= expected + self.max_seq_gap:
            gap = first_seq - expected
            for sub in endpoint.handlers:
                sub.counters.lost = min(U64_MAX, sub.counters.lost + gap)
            if self._may_log('gap'):  # cheap throttle: best-effort topics gap all the time
                self.logger.warning(
                    f'{endpoint.topic}: {gap} events from bus {bus_id:x} never arrived '
                    f'(sequence {expected} to {first_seq - 1}); the publisher outran this '
                    'subscriber beyond the QoS history bound (counted as lost)')
        else:
            for sub in endpoint.handlers:
                sub.counters.resets = min(U64_MAX, sub.counters.resets + 1)
            if self._may_log('reset'):
                self.logger.warning(
                    f'{endpoint.topic}: bus {bus_id:x} jumped from sequence {expected} to '
                    f'{first_seq}; counted as a publisher reset, not as loss (gaps over '
                    f'{self.max_seq_gap} or backwards)')
        seqs[bus_id] = first_seq + count

    def _accept(self, msg, endpoint: _Endpoint) -> None:
        try:
            event = Event.from_msg(msg).validate(self.max_payload_bytes)
        except EventRejected as exc:
            self.stats.reject(exc.reason)
            if self._may_log('reject'):
                self.logger.warning(f'dropped an event on {endpoint.topic}: {exc}')
            return
        _dispatch(endpoint, event)

    def _may_log(self, what: str, period_s: float = 1.0) -> bool:
        """At most one log line per `what` and period, decided before any message is formatted."""
        now = time.monotonic()
        if now - self._last_log.get(what, -period_s) < period_s:
            return False
        self._last_log[what] = now
        return True

    def _flush_windows(self) -> None:
        now = time.monotonic()
        for sub in list(self.stats.subscriptions):
            if sub.policy.aggregate_window_s:
                sub.flush_due(now)

    def _on_incompatible(self, topic: str, info, side: str) -> None:
        self.stats.qos_incompatible[topic] += 1
        policy = getattr(info.last_policy_kind, 'name', info.last_policy_kind)
        self.logger.warning(
            f'{topic}: {side} QoS is incompatible with a peer (policy {policy}); they do not '
            'connect. Publisher and subscribers of a Loom topic must use compatible QoS levels.',
            throttle_duration_sec=5.0)

    # -- stats --------------------------------------------------------------------------------
    def publish_stats(self) -> None:
        from loom_msgs.msg import BusStats as BusStatsMsg
        from loom_msgs.msg import SubscriptionStats
        msg = BusStatsMsg()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.node = self.node.get_fully_qualified_name()
        msg.bus_id = self.bus_id
        msg.published_topics = list(self.stats.published)
        msg.published_counts = [_u64(n) for n in self.stats.published.values()]
        msg.batches_sent = _u64(self.stats.batches_sent)
        msg.intra_process_deliveries = _u64(self.stats.intra_process)
        msg.rejected_reasons = list(self.stats.rejected)
        msg.rejected_counts = [_u64(n) for n in self.stats.rejected.values()]
        subs = list(self.stats.subscriptions)
        if len(subs) > self.stats_max_subscriptions:
            # The next slice, in turn: every subscription is reported once every
            # ceil(n / max) messages. A host of 1,000 agents spent 18-21 ms of its executor's
            # thread building the 1,000 at each message (33-48 ms under load), and the events
            # it delivers waited behind it.
            subs, self._stats_turn = in_turn(subs, self._stats_turn,
                                             self.stats_max_subscriptions)
        for sub in subs:
            snap = sub.snapshot()
            snap.pop('resets')   # not in SubscriptionStats: logged, and in snapshot()
            msg.subscriptions.append(SubscriptionStats(
                pattern=snap.pop('pattern'), qos=snap.pop('qos'), topics=snap.pop('topics'),
                policy=_policy_text(sub.policy),
                queue_depth=_u32(snap.pop('queue_depth')),
                queue_high_water=_u32(snap.pop('queue_high_water')),
                **{k: _u64(v) for k, v in snap.items()}))
        self._stats_pub.publish(msg)

    # -- teardown -----------------------------------------------------------------------------
    def destroy(self) -> None:
        if self.telemetry is not None:
            self.telemetry.destroy()
            self.telemetry = None
        with self._lock:
            self.flush()
            for sub in list(self.stats.subscriptions):
                self.unsubscribe(sub)
            for outlet in self._outlets.values():
                self.node.destroy_publisher(outlet.publisher)
            self._outlets.clear()
            for timer in (self._batch_timer, self._window_timer, self._stats_timer):
                if timer is not None:
                    self.node.destroy_timer(timer)
            if self._stats_pub is not None:
                self.node.destroy_publisher(self._stats_pub)
            self._batch_timer = self._window_timer = self._stats_timer = self._stats_pub = None
        with _LOCAL_LOCK:
            _LOCAL_BUS_IDS.discard(self.bus_id)


def in_turn(items: list, turn: int, count: int) -> tuple[list, int]:
    """At most `count` of `items`, from position `turn` on (wrapping), and the turn to pass next
    time: called in turns, each item comes once every ceil(len(items) / count) calls. What a
    periodic report of more items than it should carry at once takes (BusStats, heartbeats)."""
    if len(items) <= count:
        return list(items), turn
    start = turn % len(items)
    return (items[start:] + items[:start])[:count], start + count


def _dispatch(endpoint: _Endpoint, event: Event) -> None:
    """Hand an event to an endpoint's subscriptions. Re-entrant publishes (a callback that
    publishes) are queued and run after the current delivery, so order holds and stacks stay flat."""
    _dispatch_all(endpoint, (event,))


def _dispatch_all(endpoint: _Endpoint, events) -> None:
    """_dispatch for each of `events` in order (a received batch: one queue for all of them)."""
    pending = getattr(_DISPATCH, 'pending', None)
    if pending is not None:
        pending.extend([(endpoint, event) for event in events])
        return
    _DISPATCH.pending = pending = [(endpoint, event) for event in events]
    try:
        i = 0
        while i < len(pending):
            target, item = pending[i]
            i += 1
            now = time.monotonic()
            target.bus.stats.received[target.topic] += 1
            for sub in list(target.handlers):
                sub.offer(item, target.topic, now)
    finally:
        _DISPATCH.pending = None


def _cdr_matches_rclpy() -> bool:
    """Whether rclpy reads wire.py's bytes back as the messages rclpy itself would build (checked
    once per bus, on an event using every field): a changed loom_msgs layout falls back to
    rclpy's own (slower) path instead of publishing garbage."""
    from loom_msgs.msg import Event as EventMsg
    from loom_msgs.msg import EventBatch
    from loom_ros.bus.event import Privacy
    probe = Event(type='probe', source='s', payload=b'\x01\x02\x03', metadata={'k': 'v', 'kk': ''},
                  confidence=0.25, tags=['t', 'tt'], priority=-3, privacy=Privacy.PRIVATE,
                  frame_id='f', timestamp_ms=1_234_567, id='probe-id')
    try:
        msg = probe.to_msg()
        msg.bus_id, msg.seq = 7, 9
        if deserialize_message(encode_event_message(probe, 7, 9), EventMsg) != msg:
            return False
        batch = EventBatch(bus_id=7, first_seq=9, events=[probe.to_msg(), probe.to_msg()])
        batch.header.stamp.sec, batch.header.stamp.nanosec = 1, 2
        data = encode_event_batch([encode_event(probe, 0, 0, BATCH_FIRST_EVENT_POS),
                                   encode_event(probe, 0, 0, EVENT_POS)], 7, 9, 1_000_000_002)
        return deserialize_message(data, EventBatch) == batch
    except Exception:   # anything unexpected: the slower path, which is always right
        return False


def _u64(n: int) -> int:
    """A counter as a uint64 message field: saturated, so a message can always be built."""
    return min(max(int(n), 0), U64_MAX)


def _u32(n: int) -> int:
    return min(max(int(n), 0), U32_MAX)


def _policy_text(policy: BackpressurePolicy) -> str:
    if policy.is_passthrough:
        return ''
    default = BackpressurePolicy()
    return ','.join(f'{k}:{v}' for k, v in vars(policy).items() if getattr(default, k) != v)


def _parse_backpressure_table(entries) -> list[tuple[TopicPattern, BackpressurePolicy]]:
    table = []
    for entry in entries:
        pattern, sep, policy = entry.partition('=')
        if not sep:
            raise ValueError(f"bus.backpressure entry {entry!r}: expected 'pattern=policy'")
        table.append((TopicPattern.parse(pattern.strip()), BackpressurePolicy.parse(policy)))
    return table


BUS_PARAMETERS = [
    ParamSpec('bus.default_qos', 'QoS level of topics no bus.topic_qos entry matches '
              '(realtime, batched or background)', read_only=True),
    ParamSpec('bus.topic_qos', "Per-topic QoS levels, 'pattern=level', first match wins "
              "(e.g. 'camera.**=realtime')", read_only=True),
    ParamSpec('bus.max_payload_bytes', 'Largest event payload accepted, in bytes',
              read_only=True, min_value=0),
    ParamSpec('bus.discovery_period_s', 'How often pattern subscriptions look for new topics',
              read_only=True, min_value=0.01, max_value=60.0),
    ParamSpec('bus.max_pattern_topics', 'Most topics one pattern subscription attaches to (each '
              'is a DDS reader; anyone on the domain can make topics)', read_only=True,
              min_value=1, max_value=1000000),
    ParamSpec('bus.batch_max_events', 'Batched topics: most events in one EventBatch',
              read_only=True, min_value=1, max_value=100000),
    ParamSpec('bus.batch_max_age_ms', 'Batched topics: longest an event waits for its batch',
              read_only=True, min_value=1.0, max_value=10000.0),
    ParamSpec('bus.intra_process', 'Deliver to subscriptions in the same process without '
              'serialization', read_only=True),
    ParamSpec('bus.raw_batches', 'Decode received Event and EventBatch bytes directly into '
              'events (several times cheaper than rclpy message objects); false: the rclpy path',
              read_only=True),
    ParamSpec('bus.stats_period_s', 'Seconds between BusStats messages on loom/bus/stats '
              '(0: off)', read_only=True, min_value=0.0, max_value=3600.0),
    ParamSpec('bus.stats_max_subscriptions', 'Most subscriptions one BusStats message reports; '
              'past it each message reports the next ones in turn', read_only=True,
              min_value=1, max_value=100000),
    ParamSpec('bus.backpressure', "Default backpressure per subscription, 'pattern=policy' with "
              "policy like 'sample_every:10,queue:drop_oldest,queue_size:50'", read_only=True),
    ParamSpec('bus.gil_switch_interval_ms', "Process-wide: longest a thread that wants Python's "
              'GIL waits while another thread runs Python (CPython default 5 ms; 0: leave it)',
              read_only=True, min_value=0.0, max_value=100.0),
]


MIN_GIL_SWITCH_MS = 0.1


def create_bus(node, defaults_section: str) -> EventBus:
    """Declare the bus.* parameters on `node` (defaults from config/loom.yaml) and build its bus."""
    values = declare_parameters(node, defaults_section, BUS_PARAMETERS)
    # A Loom process runs Python on several threads (the executor taking events, the agents'
    # dispatcher, the group-commit writer, telemetry): with CPython's 5 ms switch interval an
    # event could wait 5 ms for the GIL at each hand-over between them.
    switch_ms = float(values['bus.gil_switch_interval_ms'])
    if 0 < switch_ms < MIN_GIL_SWITCH_MS:   # threads would do little but hand the GIL over
        raise ValueError(f'bus.gil_switch_interval_ms: {switch_ms:g} is below '
                         f'{MIN_GIL_SWITCH_MS:g} ms (0 leaves the interval as it is)')
    if switch_ms > 0:
        sys.setswitchinterval(switch_ms / 1000.0)
    table = TopicQosTable(list(values['bus.topic_qos']), default=values['bus.default_qos'])
    bus = EventBus(node, topic_qos=table, max_payload_bytes=int(values['bus.max_payload_bytes']),
                   discovery_period_s=float(values['bus.discovery_period_s']),
                   batch_max_events=int(values['bus.batch_max_events']),
                   batch_max_age_ms=float(values['bus.batch_max_age_ms']),
                   intra_process=bool(values['bus.intra_process']),
                   stats_period_s=float(values['bus.stats_period_s']),
                   stats_max_subscriptions=int(values['bus.stats_max_subscriptions']),
                   raw_batches=bool(values['bus.raw_batches']),
                   backpressure=list(values['bus.backpressure']),
                   max_pattern_topics=int(values['bus.max_pattern_topics']))
    from loom_ros.telemetry.node_telemetry import attach_telemetry
    bus.telemetry = attach_telemetry(node, defaults_section, bus)  # metrics, diagnostics, tracing
    return bus
