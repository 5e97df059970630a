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
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.refused = 0   # offered after close
        self.high_water = 0

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, event: Event) -> None:
        with self._cond:
            if self._closed:
                self.refused += 1
                return
            entry = (-event.priority, next(self._arrival), time.perf_counter_ns(), event)
            if len(self._heap) >= self.size:
                self.dropped += 1
                # The victim: the lowest priority present, and the oldest event of that priority.
                victim = max(self._heap, key=lambda e: (e[0], -e[1]))
                if entry[0] > victim[0]:
                    return  # the newcomer is less urgent than everything queued: it goes
                self._heap.remove(victim)
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, entry)
            self.high_water = max(self.high_water, len(self._heap))
            self._cond.notify()

    def get(self, timeout: float | None = None) -> tuple[Event, float] | None:
        """(event, microseconds it waited), or None when closed or on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._heap or self._closed, timeout=timeout):
                return None
            if not self._heap:
                return None
            _, _, arrived, event = heapq.heappop(self._heap)
            return event, (time.perf_counter_ns() - arrived) / 1000.0

    def get_nowait(self) -> tuple[Event, float] | None:
        """(event, microseconds it waited), or None when empty. A closed mailbox still gives
        what it holds (accepted mail is handled); it only refuses new mail."""
        with self._cond:
            if not self._heap:
                return None
            _, _, arrived, event = heapq.heappop(self._heap)
            return event, (time.perf_counter_ns() - arrived) / 1000.0

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
