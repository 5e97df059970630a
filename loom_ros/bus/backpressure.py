"""Backpressure per subscription: sampling, rate limits, aggregation and bounded delivery queues.

Pure Python (no rclpy), so the semantics are tested on their own. A `Flow` is the pipeline one
subscription's events go through:

    arrival -> sample 1 of N -> at most R/s -> fold windows (count or time) -> queue -> callback

and every event that does not reach the callback is counted under the stage that stopped it, so
    received == sampled_out + rate_limited + folded + passed
    passed + aggregates == delivered + dropped_oldest + overflow + queued (+ in the callback)
"""
from __future__ import annotations

import json
import math
import threading
from collections import deque
from dataclasses import dataclass, field, fields, replace

from loom_ros.bus.event import Event, new_event_id
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, effective_privacy

REDUCERS = ('latest', 'mean', 'merge_tags', 'count')
QUEUE_MODES = ('inline', 'drop_oldest', 'keep_all')


class PolicyError(ValueError):
    """A backpressure policy that cannot work; names the setting and why."""


@dataclass(frozen=True)
class BackpressurePolicy:
    """What a subscription does when events come faster than it can use them.

    queue: `inline` calls back on the executor thread (no queue); `drop_oldest` and `keep_all`
    deliver from a bounded queue on a thread of the subscription's own. `keep_all` makes the
    receiving side wait up to `block_timeout_s` for room (so reliable DDS pushes back on the
    publisher), then refuses the newest event and counts it as overflow: memory stays bounded.
    """

    sample_every: int = 1
    max_rate_hz: float = 0.0
    aggregate_count: int = 0
    aggregate_window_s: float = 0.0
    reducer: str = 'latest'
    queue: str = 'inline'
    queue_size: int = 1000
    block_timeout_s: float = 0.5

    def __post_init__(self):
        if not isinstance(self.sample_every, int) or self.sample_every < 1:
            raise PolicyError(f'sample_every must be an integer >= 1, got {self.sample_every!r}')
        for name in ('max_rate_hz', 'aggregate_window_s', 'block_timeout_s'):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise PolicyError(f'{name} must be a finite number >= 0, got {value!r}')
        if not isinstance(self.aggregate_count, int) or self.aggregate_count < 0:
            raise PolicyError(f'aggregate_count must be an integer >= 0, got {self.aggregate_count!r}')
        if self.reducer not in REDUCERS:
            raise PolicyError(f'reducer must be one of {", ".join(REDUCERS)}, got {self.reducer!r}')
        if self.queue not in QUEUE_MODES:
            raise PolicyError(f'queue must be one of {", ".join(QUEUE_MODES)}, got {self.queue!r}')
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise PolicyError(f'queue_size must be an integer >= 1, got {self.queue_size!r}')

    @property
    def aggregates(self) -> bool:
        return bool(self.aggregate_count or self.aggregate_window_s)

    @property
    def is_passthrough(self) -> bool:
        return self == PASSTHROUGH

    @classmethod
    def parse(cls, text: str) -> 'BackpressurePolicy':
        """From config text: `sample_every:10,queue:drop_oldest,queue_size:50`."""
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(','))):
            key, sep, raw = item.partition(':')
            key = key.strip()
            if not sep or key not in kinds:
                raise PolicyError(f'backpressure setting {item!r}: expected key:value with key one '
                                  f'of {", ".join(kinds)}')
            raw = raw.strip()
            try:
                values[key] = int(raw) if kinds[key] == 'int' else (
                    float(raw) if kinds[key] == 'float' else raw)
            except ValueError:
                raise PolicyError(f'backpressure setting {key}: {raw!r} is not a {kinds[key]}') \
                    from None
        return cls(**values)


PASSTHROUGH = BackpressurePolicy()


@dataclass
class FlowCounters:
    """What happened to a subscription's events; published on the stats topic."""

    received: int = 0
    sampled_out: int = 0
    rate_limited: int = 0
    folded: int = 0          # events absorbed into aggregates
    aggregates: int = 0      # aggregate events emitted
    passed: int = 0          # events that went on unchanged
    dropped_oldest: int = 0
    overflow: int = 0
    delivered: int = 0
    lost: int = 0            # gaps in a publisher's sequence numbers (see batching)
    resets: int = 0          # sequence jumps too wide or backwards to be loss (see bus.py)
    queue_high_water: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# -- aggregation -----------------------------------------------------------------------------
def _mean_payload(events: list[Event]) -> tuple[bytes, int]:
    """Mean of numeric JSON fields (numbers, and equal-length lists of numbers elementwise).

    Other fields come from the latest event. Returns (payload, events whose payload was not a
    JSON object and so were left out of the mean).
    """
    docs, skipped = [], 0
    for event in events:
        try:
            doc = json.loads(event.payload)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if isinstance(doc, dict):
            docs.append(doc)
        else:
            skipped += 1
    if not docs:
        return bytes(events[-1].payload), skipped
    out = dict(docs[-1])
    for key, value in docs[-1].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            nums = [d[key] for d in docs if isinstance(d.get(key), (int, float))
                    and not isinstance(d.get(key), bool)]
            out[key] = sum(nums) / len(nums)
        elif isinstance(value, list) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            rows = [d[key] for d in docs if isinstance(d.get(key), list)
                    and len(d[key]) == len(value)
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                            for v in d[key])]
            out[key] = [sum(col) / len(rows) for col in zip(*rows)]
    return json.dumps(out, separators=(',', ':')).encode(), skipped


def fold(events: list[Event], reducer: str) -> Event:
    """One event standing for a window of events, with metadata saying what was folded."""
    latest = events[-1]
    metadata = dict(latest.metadata)
    metadata.update({'loom.folded': str(len(events)), 'loom.reducer': reducer,
                     'loom.first_id': events[0].id, 'loom.last_id': latest.id})
    out = replace(latest, id=new_event_id(), metadata=metadata, tags=list(latest.tags),
                  priority=max(e.priority for e in events))
    if reducer == 'mean':
        out.payload, skipped = _mean_payload(events)
        out.confidence = sum(e.confidence for e in events) / len(events)
        if skipped:
            metadata['loom.mean_skipped'] = str(skipped)
    elif reducer == 'merge_tags':
        out.tags = list(dict.fromkeys(t for e in events for t in e.tags))
    elif reducer == 'count':
        types: dict[str, int] = {}
        for event in events:
            types[event.type] = types.get(event.type, 0) + 1
        out.payload = json.dumps({'count': len(events), 'types': types},
                                 separators=(',', ':')).encode()
    # A fold is as private as its most private part (field or stated in metadata), and names
    # the data subject its parts name: '..' (which no consent check accepts) for several.
    out.privacy = max(effective_privacy(e) for e in events)
    named = {str(e.metadata[SUBJECT_METADATA_KEY]) for e in events
             if SUBJECT_METADATA_KEY in e.metadata}
    if named:
        metadata[SUBJECT_METADATA_KEY] = named.pop() if len(named) == 1 else '..'
    return out


# -- the per-subscription pipeline -------------------------------------------------------------
@dataclass
class Flow:
    """Admission (sampling, rate, aggregation) for one subscription; `offer` and `flush_due`."""

    policy: BackpressurePolicy = PASSTHROUGH
    counters: FlowCounters = field(default_factory=FlowCounters)
    _seen: int = 0
    _last_kept: float = -math.inf
    _window: list = field(default_factory=list)
    _window_start: float = 0.0

    def offer(self, event: Event, now: float) -> Event | None:
        """The event to pass on (maybe an aggregate), or None when this stage absorbed it."""
        c, p = self.counters, self.policy
        c.received += 1
        self._seen += 1
        if p.sample_every > 1 and (self._seen - 1) % p.sample_every:
            c.sampled_out += 1
            return None
        if p.max_rate_hz and now - self._last_kept < 1.0 / p.max_rate_hz:
            c.rate_limited += 1
            return None
        self._last_kept = now
        if not p.aggregates:
            c.passed += 1
            return event
        if not self._window:
            self._window_start = now
        self._window.append(event)
        if (p.aggregate_count and len(self._window) >= p.aggregate_count) or (
                p.aggregate_window_s and now - self._window_start >= p.aggregate_window_s):
            return self._fold()
        return None

    def flush_due(self, now: float) -> Event | None:
        """Close a time window that has run out with no event arriving to close it."""
        p = self.policy
        if self._window and p.aggregate_window_s and now - self._window_start >= p.aggregate_window_s:
            return self._fold()
        return None

    def _fold(self) -> Event:
        events, self._window = self._window, []
        self.counters.folded += len(events)
        self.counters.aggregates += 1
        return fold(events, self.policy.reducer)


class DeliveryQueue:
    """A bounded, thread-safe queue with drop-oldest or keep-all (block, then refuse) semantics."""

    def __init__(self, policy: BackpressurePolicy, counters: FlowCounters):
        self.policy = policy
        self.counters = counters
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: Event) -> bool:
        """Queue an event; False if it was refused (keep_all and still full after the wait)."""
        with self._cond:
            if len(self._items) >= self.policy.queue_size:
                if self.policy.queue == 'drop_oldest':
                    self._items.popleft()
                    self.counters.dropped_oldest += 1
                else:
                    self._cond.wait_for(
                        lambda: self._closed or len(self._items) < self.policy.queue_size,
                        timeout=self.policy.block_timeout_s)
                    if self._closed or len(self._items) >= self.policy.queue_size:
                        self.counters.overflow += 1
                        return False
            self._items.append(event)
            self.counters.queue_high_water = max(self.counters.queue_high_water, len(self._items))
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> Event | None:
        """The oldest queued event, or None when closed (or on timeout)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout=timeout):
                return None
            if not self._items:
                return None
            event = self._items.popleft()
            self._cond.notify_all()
            return event

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
