"""A bounded, ordered store for Batched and Background samples the bridge cannot send yet.

Samples wait while the bridge is disconnected, or while nobody on the Zenoh side listens to their
key (a put then would vanish). Per key, order is kept: a key's later samples queue behind its
earlier ones. Past either bound (samples, bytes) the oldest samples go, and are counted; a
sample larger than the byte bound on its own is not kept. Each sample remembers the
data subject its event named (`loom.subject`), so `purge` can drop a subject's samples when it is
erased (issue 17). Pure Python.
"""
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Pending:
    key: str
    data: bytes
    level: object  # a QosLevel
    subject: str = ''   # the event's loom.subject ('' when anonymous)


class Outbox:
    def __init__(self, max_events: int, max_bytes: int = 64 * 1024 * 1024):
        if max_events < 1:
            raise ValueError(f'outbox bound must be >= 1, got {max_events}')
        if max_bytes < 1:
            raise ValueError(f'outbox byte bound must be >= 1, got {max_bytes}')
        self.max_events, self.max_bytes = max_events, max_bytes
        self.items: deque[Pending] = deque()
        self.per_key: Counter = Counter()   # only keys with samples waiting (Bridge tests `in`)
        self.bytes = 0     # of the samples' data waiting
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.items)

    def holds(self, key: str) -> bool:
        return self.per_key.get(key, 0) > 0   # get: a missing key costs no Counter.__missing__

    def add(self, item: Pending) -> int:
        """Queue `item`; returns how many samples were dropped for room (the oldest first, or
        the item itself when it alone is over the byte bound)."""
        size = len(item.data)
        if size > self.max_bytes:
            self.dropped += 1
            return 1
        dropped = 0
        while self.items and (len(self.items) >= self.max_events
                              or self.bytes + size > self.max_bytes):
            oldest = self.items.popleft()
            self._forget(oldest)
            dropped += 1
        self.dropped += dropped
        self.items.append(item)
        self.per_key[item.key] += 1
        self.bytes += size
        return dropped

    def drain(self, ready: Callable[[Pending], bool], send: Callable[[Pending], None],
              limit: int | None = None) -> int:
        """Send, in order, every sample whose key is ready (at most `limit`); the rest keep their
        places. A failing send stops the drain with that sample still queued. Returns how many
        went."""
        kept: deque[Pending] = deque()
        blocked: set[str] = set()
        sent = 0
        try:
            while self.items and (limit is None or sent < limit):
                item = self.items[0]
                if item.key in blocked or not ready(item):
                    blocked.add(item.key)
                    kept.append(self.items.popleft())
                    continue
                send(item)  # may raise: the item is still at the front
                self.items.popleft()
                self._forget(item)
                sent += 1
        finally:
            kept.extend(self.items)
            self.items = kept
        return sent

    def purge(self, subject: str) -> int:
        """Drop every waiting sample of `subject` (the others keep their order); returns how
        many went. Not counted as `dropped` (that is for lack of room)."""
        if not subject:
            return 0
        kept: deque[Pending] = deque()
        gone = 0
        for item in self.items:
            if item.subject == subject:
                self._forget(item)
                gone += 1
            else:
                kept.append(item)
        self.items = kept
        return gone

    def _forget(self, item: Pending) -> None:
        key = item.key
        self.bytes -= len(item.data)
        self.per_key[key] -= 1
        if self.per_key[key] <= 0:
            del self.per_key[key]
