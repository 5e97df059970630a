"""The agent runtime without ROS: one Agent (config, behavior, state, memory, mailbox) and a
Dispatcher, a small pool of worker threads shared by every agent in a process.

Why a shared pool: a thread per agent made 100 agents cost 100 threads fighting for the GIL on
two cores (dispatch P99 of 18 ms) and 1,000 agents unaffordable. Here an agent with mail is put on
one ready queue; a worker takes it, handles one event, and puts it back if more mail waits; the
commits of what it handled are submitted once nothing else is ready (or every COMMIT_EVERY
handlers). An agent is with at most one worker at a time, so its events stay in mailbox order.

State and episodes go to the host's Storage (one unit database and group-commit writer for every
agent of the process, agents/state.py): a worker submits a commit and moves on; the event counts
as handled (stats['handled'], `acked_events`, `on_ack`) when its ticket is done. Waiting on each
ticket would cap a host at about one event per commit per worker.

The ROS shell (agent_node.py: one agent per lifecycle node, or many hosted in one) adapts this
to topics, services, heartbeats and lifecycle transitions.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from enum import Enum
from itertools import islice

from loom_ros.agents.behavior import (
    AgentContext, BehaviorNotFound, Ports, load_behavior, run_handler,
)
from loom_ros.agents.config import AgentConfig, AgentConfigError, DeclassifyRule
from loom_ros.agents.embedding import ModelError
from loom_ros.agents.mailbox import Mailbox
from loom_ros.agents.memory import EpisodicMemory, SemanticMemory
from loom_ros.agents.state import AgentStore, StateError
from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.privacy import effective_privacy, named_subject
from loom_ros.telemetry import tracing

# emit(agent_id, 'action'|'intent', type, data, privacy)
Emit = Callable[[str, str, str, dict, Privacy], None]
Audit = Callable[[dict], None]   # an AuditLog (security/audit.py); raises when it cannot store
Ack = Callable[[str, int, str], None]   # (agent id, events committed, last event id committed)

# json.dumps with these separators builds an encoder on every call; this one is built once.
_compact_json = json.JSONEncoder(separators=(',', ':')).encode
# The most an agent's state may hold, as compact JSON (ASCII: characters are bytes). Every
# handler's state is serialized whole (_settle_state), so a state that grows with what senders
# choose (event types, ids) would make each event cost more; past this, the handler that grew it
# failed: its change is rolled back and counted in stats['behavior_errors'].
MAX_STATE_BYTES = 1 << 20
# The inline run (Dispatcher._run_inline) in progress on each thread, shared by every
# workers: 0 dispatcher of the process: (dispatcher, agent) pairs with mail.
_INLINE = threading.local()


class AgentState(str, Enum):
    """The lifecycle states an agent goes through (the ROS lifecycle's primary states)."""

    UNCONFIGURED = 'unconfigured'
    INACTIVE = 'inactive'
    ACTIVE = 'active'
    FINALIZED = 'finalized'


CONFIGURE_ERRORS = (AgentConfigError, BehaviorNotFound, StateError, ModelError)


def derived_privacy(floor: Privacy, requested: Privacy | None,
                    rule: DeclassifyRule | None) -> Privacy:
    """The privacy of something emitted while handling an event of privacy `floor`: never below
    the floor unless a declared rule lets it go down to `rule.to`; a behavior's own request can
    only raise it (a lower request without a rule is overridden, so privacy follows the data)."""
    lowest = min(floor, Privacy[rule.to.upper()]) if rule is not None else floor
    return max(lowest, Privacy(requested) if requested is not None else Privacy.PUBLIC)


def arrival(event: Event) -> tuple[Privacy, str, Event]:
    """How an event arrived, read once per delivery: (effective privacy, named subject, a copy
    that no behavior is handed, for the episodes). Agents get their own copies to handle."""
    return effective_privacy(event), named_subject(event), event.copy()


class Agent:
    """One agent: configure loads behavior, state and memory; activate opens the mailbox;
    deactivate handles what the mailbox accepted and waits for its commits; cleanup lets go of
    the storage (the host's to close)."""

    def __init__(self, config: AgentConfig, storage, emit: Emit, *,
                 embedder_factory: Callable[[], object] | None = None,
                 log: Callable[[str, str], None] | None = None, audit: Audit | None = None,
                 ports: Ports | None = None, on_ack: Ack | None = None,
                 behaviors: dict | None = None):
        """`storage`: the host's storage.Storage (shared by its agents). `ports`: what the
        behavior routes, calls plugins and asks the cloud through (the host's to build and to
        release); none wired by default. `on_ack`: told, on the writer's thread, each time a
        commit of this agent is done. `behaviors`: the installed behaviors as
        behavior.behavior_entry_points() gives them, scanned once by a host of many agents
        (default: a scan per agent)."""
        self.config = config
        self.ports = ports or Ports()
        self._audit = audit   # needed only when the config declares declassify rules
        self._rules = {(r.kind, r.type): r for r in config.declassify}
        self._floor: Privacy | None = None   # the privacy of the event being handled
        self._handling_id = ''
        self._handler_thread = 0   # the worker thread running the handler (0: none)
        # the data subject the event being handled names: what it emits names them too
        self._subject = ''
        self.id = config.id
        self.storage = storage
        self._on_ack = on_ack
        self._behaviors = behaviors
        self._emit_fn = emit
        self._embedder_factory = embedder_factory
        self._log = log or (lambda level, msg: None)
        self.lifecycle = AgentState.UNCONFIGURED
        self.stats: Counter = Counter()
        self.dispatch_us: deque = deque(maxlen=10000)
        self.state: dict = {}
        self.events = 0
        self.last_event_id = ''
        self.acked_events = 0       # events whose state and episode are committed
        self._handled_since = 0     # behaviors that ran fine since the last commit
        self._saved = '{}'          # JSON of the state after the last handled event
        self._unsaved_id: str | None = None   # the event whose handler's state is not in _saved
        self.behavior = self.store = self.episodic = self.semantic = None
        self.mailbox: Mailbox | None = None
        self.working: deque = deque(maxlen=config.working_memory)
        # (privacy, subject) each recent event arrived with, kept apart from `working`, which
        # the behavior holds (and may clear, or whose events it may change): what an emit from a
        # thread the behavior left running is held to. At least the last event's.
        self._recent: deque = deque(maxlen=max(1, config.working_memory))
        self.busy_since_ns = 0      # when the handler in progress started (0: idle): hang watch
        self.persist_failed: StateError | None = None
        self.lock = threading.RLock()  # handler, commit and Recall: one at a time
        self._last_commit = time.monotonic()
        self._dirty = False
        self._dirty_since = 0.0     # when the oldest uncommitted handled event was handled
        # Held while the agent is in a dispatcher's ready queue or with one of its workers:
        # taken without blocking, so an agent is queued once however many threads deliver.
        self._claim = threading.Lock()
        self._ctx: AgentContext | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def configure(self) -> None:
        """Raise one of CONFIGURE_ERRORS with a clear reason; the agent stays unconfigured."""
        behavior = load_behavior(self.config.behavior, self._behaviors)
        behavior.setup(dict(self.config.settings))
        store = AgentStore(self.storage, self.id)
        state, events = store.load(self._log)
        episodic = EpisodicMemory(store)
        semantic = None
        if self.config.semantic_memory:
            from loom_ros.agents.embedding import MiniLMEmbedder
            semantic = SemanticMemory(self.storage, self.id,
                                      (self._embedder_factory or MiniLMEmbedder)(),
                                      held=self.held)
        self.behavior, self.store, self.episodic, self.semantic = behavior, store, episodic, semantic
        self.state.clear()
        self.state.update(state)
        self._saved = _compact_json(state)   # the state as committed
        self._unsaved_id = None
        self.events = self.acked_events = events
        self._handled_since = 0
        self.persist_failed = None
        self._ctx = AgentContext(self.id, self.state, self.working, self._emit,
                                 dict(self.config.settings), self.episodic, self.semantic,
                                 self.ports, held=self.held)
        self.lifecycle = AgentState.INACTIVE

    def activate(self) -> None:
        self.mailbox = Mailbox(self.config.mailbox_size)
        self.lifecycle = AgentState.ACTIVE

    def deactivate(self) -> None:
        """Take no more mail, handle what the mailbox already holds (it was accepted), commit,
        and wait for the commits. After a persistence failure the rest cannot be recorded: it is
        counted as discarded."""
        if self.mailbox is not None:
            self.mailbox.close()
            while self.handle_one():
                pass
            self.stats['discarded_on_deactivate'] += len(self.mailbox)
        self.settle()
        self.lifecycle = AgentState.INACTIVE

    def cleanup(self) -> None:
        if self.lifecycle is AgentState.ACTIVE:
            self.deactivate()
        self.settle()
        with self.lock:
            self.store = None
        self.lifecycle = AgentState.UNCONFIGURED

    def settle(self, timeout: float = 30.0) -> None:
        """Commit what is handled and wait until every commit of this agent is done."""
        with self.lock:
            if self.store is None:
                return
            if self._dirty:
                self.commit()
            store = self.store
        store.wait(timeout)

    # -- delivery -----------------------------------------------------------------------------
    def offer(self, event: Event, note: tuple[Privacy, str, Event] | None = None) -> bool:
        """Put a copy of an event in the mailbox (the bus's callback); False when not active.
        A copy: in a process, every subscriber of a topic is handed the publisher's object, and
        a behavior that changed it (its privacy, its subject) would change it for the others.
        `note` (arrival()): how the event arrived, once for all the agents of a
        delivery: what the handler's emits are held to and what its episode stores."""
        mailbox = self.mailbox
        if mailbox is None or mailbox.closed or self.lifecycle is not AgentState.ACTIVE:
            self.stats['refused_inactive'] += 1
            return False
        mailbox.put(event.copy(), note or arrival(event))
        return True

    def handle_one(self, defer_commit: bool = False) -> bool:
        """Handle the next event, if any, and commit as configured. True when more mail waits.
        `defer_commit`: leave a per-event commit to the caller (`commit_if_dirty`), which runs
        the handlers of a burst first and commits them after (the Dispatcher)."""
        mailbox = self.mailbox
        if mailbox is None or self.persist_failed is not None:
            return False
        with self.lock:  # taken under the lock: two threads never reorder an agent's events
            if self.store is None:
                return False
            item = mailbox.get_nowait()
            if item is None:
                return False
            event, waited_us, note = item
            floor, subject, arrived = note if note is not None else arrival(event)
            self.dispatch_us.append(waited_us)
            self.busy_since_ns = time.monotonic_ns()
            # What the handler emits from this worker carries at least the event's privacy as
            # it arrived, and names its subject (any other thread: see held()).
            self._floor, self._handling_id, self._subject = floor, event.id, subject
            self._handler_thread = threading.get_ident()
            try:
                self._handle(event, arrived)
            finally:
                self.busy_since_ns = 0
                self._floor, self._subject, self._handler_thread = None, '', 0
            if self.config.persist == 'per_event':
                if not defer_commit:
                    self.commit()
            elif time.monotonic() - self._last_commit >= self.config.persist_interval_s:
                self.commit()
        return len(mailbox) > 0

    def commit_if_dirty(self) -> None:
        """Commit what handle_one(defer_commit=True) left uncommitted (per-event agents)."""
        if not self._dirty or self.config.persist != 'per_event':
            return
        with self.lock:
            if self._dirty and self.store is not None:
                self.commit()

    def _handle(self, event: Event, arrived: Event) -> None:
        """Run the behavior on `event` (this agent's copy, its to change); `arrived` is the
        event as it arrived, which no behavior holds: what the episode stores."""
        self._settle_state()   # what this handler's failure rolls back to
        self.working.append(event)
        self._recent.append((self._floor, self._subject))
        self.episodic.record(arrived)   # stored with the next commit, with the state it makes
        try:
            if tracing.ENABLED:
                # Current on this worker thread, so what the behavior emits continues the trace.
                with tracing.span(tracing.HANDLE_EVENT, event, attributes={
                        'loom.agent.id': self.id, 'loom.event.id': event.id,
                        'loom.event.type': event.type}):
                    run_handler(self.behavior, event, self._ctx)
            else:
                run_handler(self.behavior, event, self._ctx)
        except Exception as exc:  # a behavior bug must not stop it
            self._roll_back(event.id, exc)
        else:
            # Serialized once, later (_settle_state): before this agent's next handler or its
            # commit, whichever comes first, so a burst's handlers all start before that work.
            # An agent that commits on an interval serializes now: its next commit can be
            # seconds away, and a state JSON cannot hold must be counted when it happens.
            self._unsaved_id = event.id
            self._handled_since += 1
            if self.config.persist != 'per_event':
                self._settle_state()
        self.events += 1
        self.last_event_id = event.id
        if not self._dirty:
            self._dirty_since = time.monotonic()
        self._dirty = True

    def _settle_state(self) -> None:
        """The state the last handler left, as JSON: what the commit stores and what a later
        failure rolls back to. A state that is not JSON, or whose JSON is over MAX_STATE_BYTES,
        is that handler's failure: rolled back and counted as one."""
        event_id = self._unsaved_id
        if event_id is None:
            return
        self._unsaved_id = None
        try:
            saved = _compact_json(self.state)
            if len(saved) > MAX_STATE_BYTES:
                raise ValueError(f'state of {len(saved)} bytes, over MAX_STATE_BYTES '
                                 f'({MAX_STATE_BYTES})')
            self._saved = saved
        except Exception as exc:  # noqa: BLE001 - TypeError, ValueError, RecursionError, ...
            self._handled_since -= 1
            self._roll_back(event_id, exc)

    def _roll_back(self, event_id: str, exc: BaseException) -> None:
        """What a failed handler half-changed is not kept: back to the last good state."""
        self.state.clear()
        self.state.update(json.loads(self._saved))
        self.stats['behavior_errors'] += 1
        self._log('error', f'behavior {self.config.behavior} failed on event {event_id}: '
                  f'{exc!r}')

    def flush_if_due(self) -> None:
        """For interval persistence: commit when the interval passed (called from a timer)."""
        if not self._dirty or self.persist_failed is not None or \
                time.monotonic() - self._last_commit < self.config.persist_interval_s:
            return
        if self.lock.acquire(blocking=False):
            try:
                self.commit()
            finally:
                self.lock.release()

    def commit(self) -> bool:
        """Submit state + the episodes since the last commit (one write), without waiting; the
        events count as handled when it is done (_committed). False when nothing can be
        stored any more."""
        if self.store is None or self.persist_failed is not None:
            return self.persist_failed is None
        self._settle_state()
        events, last, handled = self.events, self.last_event_id, self._handled_since
        try:
            self.store.commit(self._saved, events, last,
                              lambda ticket: self._committed(ticket, events, last, handled))
        except StateError as exc:
            self._persistence_failed(exc)
            return False
        self._handled_since = 0
        self._last_commit = time.monotonic()
        self._dirty = False
        return True

    def _committed(self, ticket, events: int, last_event_id: str, handled: int) -> None:
        """On the writer's thread, in commit order: acknowledge, or stop after a failure (no
        later commit of this agent is acknowledged then: its state would hold the lost ones)."""
        error = ticket.error()
        if error is not None:
            if self.persist_failed is None:
                self._persistence_failed(StateError(f'agent {self.id}: cannot persist state: '
                                                    f'{error}'))
            return
        if self.persist_failed is not None:
            return
        self.acked_events = events
        self.stats['handled'] += handled
        if self._on_ack is not None:
            self._on_ack(self.id, events, last_event_id)

    def _persistence_failed(self, exc: StateError) -> None:
        """Stop taking events; the shell moves the agent out of `active`, so nothing is
        acknowledged that was not committed; what was committed stays."""
        self.stats['persist_failed'] += 1
        self.persist_failed = exc
        self._log('error', f'{exc}; no more events are taken')
        if self.mailbox is not None:
            self.mailbox.close()

    def held(self) -> tuple[Privacy, str]:
        """(privacy, data subject) that what the behavior emits or passes to a port is held to:
        on the worker running a handler, the event being handled as it arrived; on any other
        thread (one the behavior left running, or started), the strictest privacy of its recent
        events, the one being handled included, and their subject ('..', which no consent
        check accepts, when they named more than one). A thread left running from event A that
        emits while B is handled cannot be told from one B's handler started, so it is not
        given B's privacy and subject: A's data would have left as B's."""
        floor, subject = self._floor, self._subject
        if floor is not None and threading.get_ident() == self._handler_thread:
            return floor, subject
        recent = list(self._recent)
        named = {s for _, s in recent if s}
        return (max((f for f, _ in recent), default=Privacy.PUBLIC),
                named.pop() if len(named) == 1 else '..' if named else '')

    def _emit(self, kind: str, type: str, data: dict, privacy: Privacy | None = None) -> None:
        floor, subject = self.held()
        rule = self._rules.get((kind, type))
        out = derived_privacy(floor, privacy, rule)
        if privacy is not None and out > privacy:
            self.stats['privacy_raised'] += 1   # the behavior asked for less than the input had
        if out < floor:
            try:
                if self._audit is None:
                    raise RuntimeError('no audit log to record it in')
                # The event it was derived from: the handled one on its worker; from any other
                # thread, the agent's recent events (held() took the strictest of them).
                on_worker = threading.get_ident() == self._handler_thread
                self._audit({'plugin': f'agent/{self.id}', 'kind': 'privacy_lowered',
                             'emit': kind, 'type': type, 'from': floor.name, 'to': out.name,
                             'reason': rule.reason,
                             'event_id': self._handling_id if on_worker else '',
                             'derived_from': 'the handled event' if on_worker else
                             'recent events (emitted from another thread)'})
            except Exception as exc:  # fail closed: what cannot be audited is not lowered
                self.stats['privacy_audit_failed'] += 1
                self._log('error', f'agent {self.id}: cannot audit lowering {type} to '
                          f'{out.name}: {exc!r}; sent as {floor.name}')
                out = floor
            else:
                self.stats['privacy_lowered'] += 1
        if subject:   # what is made from a person's event is theirs too (consent, erasure)
            self._emit_fn(self.id, kind, type, data, out, subject=subject)
        else:
            self._emit_fn(self.id, kind, type, data, out)
        self.stats[f'{kind}s'] += 1

    # -- what the shells report ---------------------------------------------------------------
    @property
    def commit_pending(self) -> bool:
        """Handled events whose commit is not submitted yet (a burst's handlers run first)."""
        return self._dirty


    def commit_lag_s(self) -> float:
        """How long handled events have waited uncommitted (0 when everything is committed)."""
        store = self.store
        inflight = store.oldest_inflight_s() if store is not None else 0.0
        return max(inflight, time.monotonic() - self._dirty_since if self._dirty else 0.0)

    def recent_dispatch_us(self, n: int = 256) -> list:
        """The newest `n` dispatch waits, newest first, without copying all 10,000 (a heartbeat
        reads them every 0.1 s for each agent of its host). The worker appends while another
        thread reads: the GIL can pass to it between making the deque's iterator and reading
        it, which makes the iterator raise (a launch run lost 28 heartbeats to it), so read
        again; after three such races, one copy (a single C call, no gap for the worker)."""
        samples = self.dispatch_us
        for _ in range(3):
            try:
                return list(islice(reversed(samples), n))
            except RuntimeError:   # deque mutated during iteration
                continue
        return list(samples)[::-1][:n]

    def busy_ms(self) -> float:
        since = self.busy_since_ns
        return (time.monotonic_ns() - since) / 1e6 if since else 0.0

    def acquire(self, limit_s: float, give_up: Callable[[], bool] = lambda: False,
                step_s: float = 0.02) -> bool:
        """Take the agent's lock within `limit_s`, or at once False when `give_up()` says the
        holder waits on something only the caller's thread can deliver (a shell's executor
        thread must not block on a handler that waits for a service answer it would spin)."""
        deadline = time.monotonic() + limit_s
        while not self.lock.acquire(timeout=step_s):
            if give_up() or time.monotonic() >= deadline:
                return False
        return True

    def recall(self, mode: str, *, start_ms: int = 0, end_ms: int = 0, type: str = '',
               source: str = '', tag: str = '', query: str = '', k: int = 0,
               depth: int = 0) -> list[dict]:
        """The Recall service's answer; ValueError with a reason for a bad request."""
        with self.lock:
            if self.store is None:
                raise ValueError(f'agent {self.id} is not configured')
            if mode == 'episodic':
                return self.episodic.query(start_ms, end_ms or 2**63 - 1, type, source, tag,
                                           k or 100)
            if mode in ('similar', 'graph'):
                if self.semantic is None:
                    raise ValueError(f'agent {self.id} has no semantic memory '
                                     '(semantic_memory: true in agents.yaml)')
                return self.semantic.similar(query, k or 5) if mode == 'similar' else \
                    self.semantic.neighbourhood(query, depth or 1)
            raise ValueError(f'mode must be episodic, similar or graph, got {mode!r}')


class Dispatcher:
    """Worker threads serving the agents that have mail, one event per turn (fair, ordered).

    A worker runs the handlers of what is ready first and submits their commits after, when the
    ready queue is empty, COMMIT_EVERY handlers ran or the oldest waited COMMIT_AFTER_S (an agent
    that always has mail keeps the queue from emptying): a broadcast to 100 agents starts the
    100th handler after 99 handlers, not after 99 handlers and 99 commits. An event still counts
    as handled only once its commit is done.

    With no workers (`workers: 0`) the thread that delivers the mail runs the handlers at once
    (_run_inline): for hosts of many cheap agents that never wait."""

    # Handlers run before the commits of what they handled go: above a broadcast's fan-out (at
    # 64, a burst to 100 agents ran 64 handlers, 64 commits, then the last 36: their dispatch
    # P99 was 9-15 ms, against 2.5-5 ms now; bench/results/agents.md).
    COMMIT_EVERY = 256
    COMMIT_AFTER_S = 0.005      # ... or once the oldest of them waited this long

    def __init__(self, workers: int = 1, name: str = 'agents',
                 clock: Callable[[], float] = time.monotonic):
        """`clock`: seconds, for COMMIT_AFTER_S (tests drive it)."""
        self._clock = clock
        if workers < 0:
            raise ValueError('workers must be 0 (handlers run on the delivering thread) or more')
        # Agents with mail, each once (its _claim), and each worker's wake-ups: True, or None
        # to stop. No lock of ours: with a Condition the delivering thread and the worker met
        # on its lock for every event, and each contended take cost both a GIL hand-over. A
        # delivery to many agents queues them all, then wakes the workers once (woken at the
        # first, a worker took the GIL from the thread still filling the others' mailboxes).
        self._ready: deque[Agent] = deque()
        self._wakes: list[queue.SimpleQueue[bool | None]] = [
            queue.SimpleQueue() for _ in range(workers)]
        # The workers waiting for a wake-up, {thread id: its queue}. A waker takes one out
        # (popitem, one step under the GIL) and wakes that one: a worker woken but not yet
        # running is not woken again by every delivery meanwhile (one shared queue and a set
        # collected thousands of wake-ups behind one busy agent).
        self._sleeping: dict[int, queue.SimpleQueue] = {}
        self._closed = False
        self.errors = 0   # exceptions that escaped an agent's handle_one (workers survive them)
        self._threads = [threading.Thread(target=self._work, args=(wake,), daemon=True,
                                          name=f'{name}-{i}')
                         for i, wake in enumerate(self._wakes)]
        for thread in self._threads:
            thread.start()

    @property
    def inline(self) -> bool:
        """Whether handlers run on the thread that delivers the event (workers: 0). The ports
        of such a host refuse every call that would wait for a service answer (the thread
        that would take the answer may be the one running the handler)."""
        return not self._threads

    @staticmethod
    def running_inline() -> bool:
        """Whether this thread is running handlers inline right now (any dispatcher's)."""
        return getattr(_INLINE, 'queue', None) is not None

    def schedule(self, agent: Agent) -> None:
        """Called after mail arrives: the agent joins the ready queue (_enqueue)."""
        self._enqueue((agent,))

    def _enqueue(self, agents) -> None:
        """Agents with mail join the ready queue unless already there or with a worker (its
        worker re-queues it when it sees more mail); as many workers are woken as were queued.
        With no workers the handlers run now, on this thread (_run_inline)."""
        if not self._threads:
            if not self._closed:
                self._run_inline(agents)
            return
        if self._closed:
            return
        ready, queued = self._ready, 0
        for agent in agents:
            if agent._claim.acquire(False):   # not queued nor with a worker already
                ready.append(agent)
                queued += 1
        for _ in range(queued):
            if not self._wake_one():
                break

    def _wake_one(self) -> bool:
        """Wake one waiting worker; False when none waits."""
        try:
            _worker, wake = self._sleeping.popitem()
        except KeyError:
            return False
        wake.put(True)
        return True

    def deliver(self, agent: Agent, event: Event) -> None:
        if agent.offer(event):
            self.schedule(agent)

    def deliver_all(self, agents, event: Event) -> None:
        """One event to several agents (a topic they all follow), each in its own mailbox; the
        worker is woken once they all have it, so it does not take the GIL from this thread at
        every mailbox and give it back (a broadcast to 100 agents was put in mailboxes and
        handled in turns of the 0.5 ms switch interval)."""
        taken = []
        note = arrival(event)   # once for all of them
        for agent in agents:
            try:
                if agent.offer(event, note):
                    taken.append(agent)
            except Exception as exc:  # noqa: BLE001 - one agent's failure is not the others'
                self._escaped(agent, exc)
        if taken:
            self._enqueue(taken)

    def _run_inline(self, agents) -> None:
        """workers: 0. The agents' mail is handled here and now, then the commits are
        submitted: no hand-over to a worker thread, no wait for one to take the GIL
        (bench/results/agents.md). What a handler delivers to inline agents, of this host or
        another in the process (an emit they follow), joins this thread's one run instead of
        nesting: stacks stay flat, each agent's events keep their order, and no thread waits
        for an agent's lock while holding another's (two hosts whose agents emit to each other
        on two threads would each wait for the other's for good). For behaviors that do not
        wait (see `inline`)."""
        queue = getattr(_INLINE, 'queue', None)
        if queue is not None:
            queue.extend((self, agent) for agent in agents)
            return
        _INLINE.queue = queue = deque((self, agent) for agent in agents)
        # As a worker does: the run's handlers first, their commits after (a broadcast's last
        # handler does not wait for the others' commits), at the latest every COMMIT_EVERY.
        dirty: dict[int, tuple[Dispatcher, Agent]] = {}   # (the agent's host, the agent)
        handled = 0
        try:
            while queue:
                dispatcher, agent = queue.popleft()
                more = True
                while more and not dispatcher._closed:   # closed: its deactivate handles it
                    if handled >= self.COMMIT_EVERY:
                        self._commit_all(dirty)
                        handled = 0
                    dirty[id(agent)] = dispatcher, agent
                    handled += 1
                    try:
                        more = agent.handle_one(defer_commit=True)
                    except Exception as exc:  # noqa: BLE001 - as a worker: counted, go on
                        dispatcher._escaped(agent, exc)
                        # handle_one took the event it failed on; the rest of the mailbox
                        # would wait for the agent's next delivery, which may never come.
                        more = agent.mailbox is not None and len(agent.mailbox) > 0 and \
                            agent.persist_failed is None
        finally:
            _INLINE.queue = None
            self._commit_all(dirty)

    def _work(self, wake: queue.SimpleQueue) -> None:
        dirty: dict[int, tuple[Dispatcher, Agent]] = {}   # handled, commit not submitted yet
        handled, since = 0, 0.0        # handlers run since the last commits; the first's time
        ready, sleeping = self._ready, self._sleeping
        spare = len(self._threads) > 1
        me = threading.get_ident()
        while True:
            if dirty and (handled >= self.COMMIT_EVERY or self._closed
                          or self._clock() - since >= self.COMMIT_AFTER_S):
                self._commit_all(dirty)
                handled = 0
                continue
            try:
                agent = ready.popleft()
            except IndexError:      # nothing ready: the commits of what was handled go first
                if dirty:
                    self._commit_all(dirty)
                    handled = 0
                    continue
                sleeping[me] = wake  # before the last look: an agent queued after it wakes us
                if ready:
                    sleeping.pop(me, None)   # a waker that took us first left one spare wake-up
                    continue
                woken = wake.get()
                sleeping.pop(me, None)       # close() wakes without taking us out
                if woken is None:    # close(); a wake-up may find the work taken: look again
                    return
                continue
            if self._closed:        # close(): not handled here (deactivate handles its mail)
                agent._claim.release()
                continue
            more = False
            if not handled:
                since = self._clock()
            handled += 1
            dirty[id(agent)] = self, agent
            try:
                more = agent.handle_one(defer_commit=True)
            except Exception as exc:  # noqa: BLE001 - a worker never dies of one agent's event
                self._escaped(agent, exc)
            finally:
                if more and not self._closed:
                    ready.append(agent)       # still claimed: its next event after the others'
                    if spare and sleeping:    # another worker takes it if this one is held up
                        self._wake_one()
                else:
                    agent._claim.release()
            # Mail that arrived after handle_one looked but before the claim was released.
            if not more and agent.mailbox is not None and len(agent.mailbox) and \
                    agent.persist_failed is None:
                self.schedule(agent)

    @staticmethod
    def _commit_all(dirty: dict) -> None:
        """Submit the commits of `dirty` ({id: (its dispatcher, agent)}, in handling order); a
        failure is counted by the agent's own dispatcher (an inline run spans hosts)."""
        pairs = list(dirty.values())
        dirty.clear()
        for owner, agent in pairs:
            try:
                agent.commit_if_dirty()
            except Exception as exc:  # noqa: BLE001 - as for a handler: counted, go on
                owner._escaped(agent, exc)

    def _escaped(self, agent: Agent, exc: Exception) -> None:
        """What escaped handle_one (it contains behavior errors itself: this is a log call on a
        node being torn down, a store that broke): counted, said once in a while, and the worker
        serves the next agent."""
        self.errors += 1
        if self.errors <= 5 or self.errors % 1000 == 0:
            print(f'loom dispatcher: agent {agent.id}: {exc!r} escaped its handler '
                  f'({self.errors} so far); the worker goes on', file=sys.stderr, flush=True)

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        for wake in self._wakes:
            wake.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
