"""A bounded, ordered store for Batched and Background samples the bridge cannot send yet.

Samples wait while the bridge is disconnected, or while nobody on the Zenoh side listens to their
key (a put then would vanish). Per key, order is kept: a key's later samples queue behind its
earlier ones. Past the bound the oldest sample goes, and is counted. Each sample remembers the
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
    def __init__(self, max_events: int):
        if max_events < 1:
            raise ValueError(f'outbox bound must be >= 1, got {max_events}')
        self.max_events = max_events
        self.items: deque[Pending] = deque()
        self.per_key: Counter = Counter()   # only keys with samples waiting (Bridge tests `in`)
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.items)

    def holds(self, key: str) -> bool:
        return self.per_key.get(key, 0) > 0   # get: a missing key costs no Counter.__missing__

    def add(self, item: Pending) -> Pending | None:
        """Queue `item`; returns the oldest sample dropped to make room, if any."""
        dropped = None
        if len(self.items) >= self.max_events:
            dropped = self.items.popleft()
            self._forget(dropped.key)
            self.dropped += 1
        self.items.append(item)
        self.per_key[item.key] += 1
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
                self._forget(item.key)
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
                self._forget(item.key)
                gone += 1
            else:
                kept.append(item)
        self.items = kept
        return gone

    def _forget(self, key: str) -> None:
        self.per_key[key] -= 1
        if self.per_key[key] <= 0:
            del self.per_key[key]
