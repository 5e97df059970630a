"""An agent's mailbox: bounded, ordered by the event's priority then arrival; when full, the
oldest event of the lowest priority goes (counted). Thread-safe; dispatch latency is measured
from arrival to the moment the handler takes the event.

`Event.priority` is whatever int32 the sender wrote, passed through by the bus, so it is a
request, not a right. Before it orders anything:

* it is clamped to MIN_PRIORITY..MAX_PRIORITY (-10..10);
* at most URGENT_SHARE of the mailbox (size // 2 events) may be queued above priority 0; an
  event that asks for more while that many are queued is queued at priority 0, as an ordinary
  event. The event itself keeps the priority it was sent with (what the behavior sees).

When full, the oldest event of the lowest (effective) priority present is evicted, unless the
newcomer is less urgent than everything queued, in which case the newcomer goes; either way one
event is counted in `dropped`. Since at least half of a full mailbox is at priority 0 or below,
the victim is always an ordinary event, never an urgent one, and a flood at the maximum priority
can never take more than half of a mailbox: the other half keeps the newest ordinary events. A
mailbox of 1 has no urgent share (1 // 2 == 0): every event in it is ordinary and the newest one
wins (the freshest camera frame), whatever priority the sender claimed. Flooding at priority 0
still competes by volume, as any sender may; that is the bus's admission control's concern, not
priority's."""
from __future__ import annotations

import heapq
import itertools
import threading
import time

from loom_ros.bus.event import Event

# What an event's priority may claim in a mailbox (see the module docstring).
MIN_PRIORITY = -10
MAX_PRIORITY = 10
URGENT_SHARE = 2   # at most size // URGENT_SHARE events queued above priority 0


class Mailbox:
    def __init__(self, size: int):
        self.size = size
        self.urgent_limit = size // URGENT_SHARE
        self._urgent = 0   # queued events whose effective priority is above 0
        self._heap: list = []
        self._arrival = itertools.count()
        # A plain lock on the hot path (every event of every agent passes put and get_nowait);
        # the condition on the same lock serves only get(timeout), and is notified only while
        # someone waits in it.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0
        self._closed = False
        self.dropped = 0
        self.refused = 0   # offered after close
        self.high_water = 0

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, event: Event, note=None) -> None:
        """`note`: anything the receiver wants back with the event (get returns it)."""
        with self._lock:
            if self._closed:
                self.refused += 1
                return
            heap = self._heap
            rank = min(max(int(event.priority), MIN_PRIORITY), MAX_PRIORITY)
            if rank > 0 and self._urgent >= self.urgent_limit:
                rank = 0   # the urgent share is taken: queued as an ordinary event
            entry = (-rank, next(self._arrival), time.perf_counter_ns(), event, note)
            if len(heap) >= self.size:
                self.dropped += 1
                # The victim: the lowest priority present, and the oldest event of that priority.
                victim = max(heap, key=lambda e: (e[0], -e[1]))
                if entry[0] > victim[0]:
                    return  # the newcomer is less urgent than everything queued: it goes
                heap.remove(victim)
                heapq.heapify(heap)
                if victim[0] < 0:
                    self._urgent -= 1
            heapq.heappush(heap, entry)
            if rank > 0:
                self._urgent += 1
            if len(heap) > self.high_water:
                self.high_water = len(heap)
            if self._waiting:
                self._cond.notify()

    def get(self, timeout: float | None = None) -> tuple[Event, float, object] | None:
        """(event, microseconds it waited, its note), or None when closed or on timeout."""
        with self._lock:
            self._waiting += 1
            try:
                if not self._cond.wait_for(lambda: self._heap or self._closed, timeout=timeout):
                    return None
            finally:
                self._waiting -= 1
            if not self._heap:
                return None
            key, _, arrived, event, note = heapq.heappop(self._heap)
            if key < 0:
                self._urgent -= 1
            return event, (time.perf_counter_ns() - arrived) / 1000.0, note

    def get_nowait(self) -> tuple[Event, float, object] | None:
        """(event, microseconds it waited, its note), or None when empty. A closed mailbox still
        gives what it holds (accepted mail is handled); it only refuses new mail."""
        with self._lock:
            if not self._heap:
                return None
            key, _, arrived, event, note = heapq.heappop(self._heap)
            if key < 0:
                self._urgent -= 1
            return event, (time.perf_counter_ns() - arrived) / 1000.0, note

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cond.notify_all()
