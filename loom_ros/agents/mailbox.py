"""An agent's mailbox: bounded, ordered by the event's priority then arrival; when full, the
oldest event of the lowest priority goes (counted). Thread-safe; dispatch latency is measured
from arrival to the moment the handler takes the event."""
from __future__ import annotations

import heapq
import itertools
import threading
import time

from loom_ros.bus.event import Event


class Mailbox:
    def __init__(self, size: int):
        self.size = size
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
            entry = (-event.priority, next(self._arrival), time.perf_counter_ns(), event, note)
            if len(heap) >= self.size:
                self.dropped += 1
                # The victim: the lowest priority present, and the oldest event of that priority.
                victim = max(heap, key=lambda e: (e[0], -e[1]))
                if entry[0] > victim[0]:
                    return  # the newcomer is less urgent than everything queued: it goes
                heap.remove(victim)
                heapq.heapify(heap)
            heapq.heappush(heap, entry)
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
            _, _, arrived, event, note = heapq.heappop(self._heap)
            return event, (time.perf_counter_ns() - arrived) / 1000.0, note

    def get_nowait(self) -> tuple[Event, float, object] | None:
        """(event, microseconds it waited, its note), or None when empty. A closed mailbox still
        gives what it holds (accepted mail is handled); it only refuses new mail."""
        with self._lock:
            if not self._heap:
                return None
            _, _, arrived, event, note = heapq.heappop(self._heap)
            return event, (time.perf_counter_ns() - arrived) / 1000.0, note

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cond.notify_all()
