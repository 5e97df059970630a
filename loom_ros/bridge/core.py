"""The bridge's logic without ROS or Zenoh: what goes out, what waits, what comes in, all counted.

`Bridge.send` takes an event from the robot's bus and either puts it on Zenoh, queues it in the
bounded outbox (Batched and Background while the key cannot be delivered), or refuses it with a
counted reason (denied by pattern, refused by the privacy gate and audited, Realtime while
disconnected). `Bridge.receive` turns a Zenoh sample for this robot into a bus event.
The transport is anything with `connected`, `ready(key)` and `put(key, data, level)`.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from loom_ros.bridge import codec
from loom_ros.bridge.gate import BridgeRules, DirectionRules, PrivacyGate
from loom_ros.bridge.keys import parse_robot_key, robot_key, validate_robot_id
from loom_ros.bridge.outbox import Outbox, Pending
from loom_ros.bus.event import DEFAULT_MAX_PAYLOAD_BYTES, Event, EventRejected
from loom_ros.bus.names import TopicNameError
from loom_ros.bus.privacy import effective_privacy
from loom_ros.bus.qos import QosLevel

ECHO_MEMORY = 10000  # ids of events the bridge brought in, so it never sends them back out


class Transport(Protocol):
    connected: bool

    def ready(self, key: str, level: QosLevel) -> bool: ...  # connected, and someone listens

    def put(self, key: str, data: bytes, level: QosLevel) -> None: ...


@dataclass(frozen=True)
class BridgeConfig:
    robot_id: str
    rules: BridgeRules
    buffer_max_events: int = 10000
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES

    @classmethod
    def from_params(cls, params: dict) -> 'BridgeConfig':
        """From the node's parameters; ValueError (with the key) on anything unusable."""
        try:
            robot_id = validate_robot_id(params['robot_id'])
            rules = BridgeRules(
                out=DirectionRules.parse(params['out_allow'], params['out_deny']),
                inbound=DirectionRules.parse(params['in_allow'], params['in_deny']))
        except (ValueError, TopicNameError) as exc:
            raise ValueError(f'zenoh_bridge: {exc}') from None
        bound = int(params['buffer_max_events'])
        if bound < 1:
            raise ValueError(f'zenoh_bridge: buffer_max_events must be >= 1, got {bound}')
        return cls(robot_id, rules, bound, int(params.get('max_payload_bytes',
                                                          DEFAULT_MAX_PAYLOAD_BYTES)))


class Bridge:
    def __init__(self, config: BridgeConfig, transport: Transport,
                 level_for: Callable[[str], QosLevel], gate: PrivacyGate | None = None,
                 audit: Callable[[dict], None] | None = None):
        self.config = config
        self.transport = transport
        self.level_for = level_for
        self.gate = gate or PrivacyGate()
        self.audit = audit or (lambda record: None)
        self.outbox = Outbox(config.buffer_max_events)
        self.stats: Counter = Counter()
        self._echo: OrderedDict[str, None] = OrderedDict()

    # -- out: bus -> Zenoh ----------------------------------------------------------------
    def send(self, event: Event, topic: str) -> str:
        """Bridge one bus event out; returns what happened (also counted in `stats`)."""
        if event.id in self._echo:
            return self._count('echo_skipped')  # it came from Zenoh: do not send it back
        if not self.config.rules.out.allows(topic):
            return self._count('denied')
        refusal = self.gate.refusal(event)
        if refusal is not None:
            self.audit({'kind': 'privacy_refused', 'reason': refusal, 'topic': topic,
                        'event_id': event.id, 'event_type': event.type,
                        'privacy': getattr(event.privacy, 'name', str(event.privacy)[:16]),
                        'effective_privacy': effective_privacy(event).name})
            return self._count(f'refused_{refusal}')
        key = robot_key(self.config.robot_id, topic)
        level = self.level_for(topic)
        data = codec.encode(event)
        if level is QosLevel.REALTIME:
            # A late realtime sample is worth nothing: never queued, but a drop is counted.
            if not self.transport.connected:
                return self._count('dropped_disconnected')
            return self._put(key, data, level)
        if self.outbox.holds(key) or not self.transport.ready(key, level):
            if self.outbox.add(Pending(key, data, level)) is not None:
                self._count('dropped_outbox_full')
            return self._count('buffered')
        return self._put(key, data, level)

    def flush(self, limit: int | None = None) -> int:
        """Send what waits in the outbox and can go now (in order per key), at most `limit`."""
        if not self.outbox.items:
            return 0

        def send(item: Pending) -> None:
            self.transport.put(item.key, item.data, item.level)
        try:
            sent = self.outbox.drain(lambda i: self.transport.ready(i.key, i.level), send, limit)
        except Exception:  # the transport went away mid-drain: the rest waits for the next try
            self._count('put_failed')
            return 0
        self.stats['flushed'] += sent
        self.stats['sent'] += sent
        return sent

    def _put(self, key: str, data: bytes, level: QosLevel) -> str:
        try:
            self.transport.put(key, data, level)
        except Exception:
            if level is QosLevel.REALTIME:
                return self._count('put_failed')
            if self.outbox.add(Pending(key, data, level)) is not None:
                self._count('dropped_outbox_full')
            return self._count('buffered')
        return self._count('sent')

    # -- in: Zenoh -> bus -----------------------------------------------------------------
    def receive(self, key: str, data: bytes) -> tuple[str, Event] | None:
        """The (topic, event) to publish on the bus for one Zenoh sample, or None (counted)."""
        try:
            robot_id, topic = parse_robot_key(key)
        except TopicNameError:
            self._count('rejected_key')
            return None
        if robot_id != self.config.robot_id:
            self._count('rejected_other_robot')
            return None
        if not self.config.rules.inbound.allows(topic):
            self._count('denied_inbound')
            return None
        try:
            event = codec.decode(data, self.config.max_payload_bytes)
        except EventRejected:
            self._count('rejected_malformed')
            return None
        self._echo[event.id] = None
        if len(self._echo) > ECHO_MEMORY:
            self._echo.popitem(last=False)
        self._count('received')
        return topic, event

    def _count(self, what: str) -> str:
        self.stats[what] += 1
        return what

    def snapshot(self) -> dict:
        return {'robot_id': self.config.robot_id, 'connected': bool(self.transport.connected),
                'outbox': len(self.outbox), 'outbox_bound': self.outbox.max_events,
                **{k: v for k, v in sorted(self.stats.items())}}
