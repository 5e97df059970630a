"""An agent's persistent state on the storage layer (loom_ros/storage, docs/storage.md): the
host's one unit database and its group-commit writer, shared by every agent it hosts.

The dispatcher does not wait for commits. Each commit submits the state and the episodes of the
events handled since the last one as one atomic write and hands back its Ticket; the event
counts as handled (and the host acknowledges it) only when the ticket is done, so a SIGKILL
loses nothing acknowledged and never leaves an episode past the committed state. Episodes wait
here in memory until their commit; `uncommitted()` lets queries see them meanwhile.
An agent's own file from before (`<root>/agents/<id>.db`) is imported on load, then renamed
`<id>.db.migrated`."""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from loom_ros.bus.event import Event
from loom_ros.storage.errors import StorageError
from loom_ros.storage.writer import Ticket

StateError = StorageError   # what cannot be loaded or stored; the message says why


class AgentStore:
    """One agent's handle on the host's Storage: load (with migration), pending episodes, and
    commits in flight, oldest first."""

    def __init__(self, storage, agent_id: str):
        self.storage, self.agent_id = storage, agent_id
        self._states, self._episodes = storage.agent_state, storage.episodes
        self._pending: list[Event] = []
        self._inflight: deque = deque()   # (ticket, episodes, submitted monotonic)
        self._lock = threading.Lock()

    def load(self, log: Callable[[str, str], None] = lambda level, msg: None) -> tuple[dict, int]:
        """(state, events handled) as last committed; ({}, 0) for a new agent. An agent with
        nothing here but an old file of its own gets that file's state, episodes and facts in
        one write first; the file is then renamed `<id>.db.migrated`."""
        store = self.storage.agent_state
        old = self.storage.layout.agents / f'{self.agent_id}.db'
        if not store.has(self.agent_id) and old.is_file():
            store.import_file(self.agent_id, old).wait()
            for suffix in ('', '-wal', '-shm'):
                source = Path(f'{old}{suffix}')
                if source.exists():
                    source.rename(f'{old}.migrated{suffix}')
            log('info', f'agent {self.agent_id}: imported {old} into {self.storage.path}; the '
                f'old file is now {old}.migrated')
        return store.load(self.agent_id)

    def record(self, event: Event) -> None:
        """An event's episode, stored with the next commit (in the same transaction as the
        state it produced)."""
        self._episodes.note(event)   # whose it is, for what the handler derives
        with self._lock:
            self._pending.append(event)

    def commit(self, state: dict | str, events: int, last_event_id: str,
               on_done: Callable[[Ticket], None] | None = None) -> Ticket:
        """Submit state (a dict, or its compact JSON) + pending episodes (one write);
        `on_done(ticket)` runs once it is committed or failed (ticket.error() says which).
        Raises StorageError when the writer refuses it outright (closed)."""
        # One commit of an agent at a time (the agent's lock); submit outside our own lock: it
        # may block for room while the writer runs callbacks that take it.
        with self._lock:
            episodes, self._pending = self._pending, []
        try:
            ticket = self._states.commit(
                self.agent_id, None if isinstance(state, str) else state, events, last_event_id,
                episodes, state_json=state if isinstance(state, str) else None)
        except BaseException:
            with self._lock:
                self._pending = episodes + self._pending
            raise
        with self._lock:
            self._inflight.append((ticket, episodes, time.monotonic()))
        ticket.add_done_callback(lambda t: self._done(t, on_done))
        return ticket

    def _done(self, ticket: Ticket, on_done) -> None:
        with self._lock:   # batches finish in order: the oldest in flight are the done ones
            while self._inflight and self._inflight[0][0].done():
                self._inflight.popleft()
        if on_done is not None:
            on_done(ticket)

    def uncommitted(self) -> list[Event]:
        """Episodes not committed yet (pending and in flight), oldest first."""
        with self._lock:
            out = [e for t, episodes, _ in self._inflight if not t.done() for e in episodes]
            return out + list(self._pending)

    def oldest_inflight_s(self) -> float:
        """How long the oldest commit in flight has waited (0 when none)."""
        with self._lock:
            for ticket, _, since in self._inflight:
                if not ticket.done():
                    return time.monotonic() - since
        return 0.0

    def wait(self, timeout: float = 30.0) -> None:
        """Until every commit submitted so far is done (their errors went to on_done)."""
        with self._lock:
            tickets = [t for t, _, _ in self._inflight]
        deadline = time.monotonic() + timeout
        for ticket in tickets:
            try:
                ticket.wait(max(0.0, deadline - time.monotonic()))
            except StorageError:   # told to on_done already; a TimeoutError goes up
                pass
            # and acknowledged: on_done (the agent's handled counts) has run
            if not ticket.wait_settled(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f'agent {self.agent_id}: commits not acknowledged within '
                                   f'{timeout} s')
