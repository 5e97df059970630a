"""AgentNode: one agent as an rclpy lifecycle node.

configure  loads the agent's entry from config/agents.yaml, its behavior (entry point), and its
           persisted state (SQLite); activate subscribes and starts the mailbox thread;
deactivate stops delivery and commits state; cleanup/shutdown commit and release.
Events go: bus subscription -> mailbox (priority, then arrival; bounded) -> behavior.handle on
the agent's own thread -> state committed per event (or per interval) -> actions and intents
published on agent.<id>.action / agent.<id>.intent.
A behavior that raises is counted and logged and the agent keeps going; a state that cannot be
persisted (disk full) deactivates the agent, so nothing uncommitted is acknowledged as done.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import Counter, deque

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from loom_ros.agents.behavior import AgentContext, BehaviorNotFound, load_behavior, run_handler
from loom_ros.agents.config import AgentConfigError, load_agents
from loom_ros.agents.embedding import MiniLMEmbedder, ModelError
from loom_ros.agents.mailbox import Mailbox
from loom_ros.agents.memory import EpisodicMemory, SemanticMemory
from loom_ros.agents.state import StateError, StateStore
from loom_ros.bus import topics
from loom_ros.bus.bus import create_bus
from loom_ros.bus.event import Event
from loom_ros.bus.executor import run_lifecycle_node
from loom_ros.config.params import ParamSpec, config_dir, declare_parameters

PARAMETERS = [
    ParamSpec('agent_id', 'Which entry of the agents file this node runs', read_only=True),
    ParamSpec('agents_file', "Agents YAML; '' means the shipped config/agents.yaml",
              read_only=True),
    ParamSpec('state_dir', "Folder of the agents' SQLite state; '~' expands", read_only=True),
    ParamSpec('autostart', 'Configure and activate on start when run standalone', read_only=True),
    ParamSpec('state_max_mb', "Cap on the agent's SQLite file in MiB (0: none); reaching it acts "
              'as a full disk', read_only=True, min_value=0.0),
]


class AgentNode(LifecycleNode):

    def __init__(self, agent_id: str | None = None, **kwargs):
        overrides = kwargs.pop('parameter_overrides', [])
        name = f'agent_{agent_id}' if agent_id else 'agent'
        super().__init__(name, parameter_overrides=overrides, **kwargs)
        self.params = declare_parameters(self, 'agent', PARAMETERS)
        self.agent_id = agent_id or self.params['agent_id']
        self.bus = create_bus(self, 'agent')
        self.stats = Counter()
        self.dispatch_us: deque = deque(maxlen=10000)
        self.config = self.behavior = self.store = self.mailbox = None
        self.state: dict = {}
        self.episodic = self.semantic = None
        self.events = 0
        self._subs = []
        self._worker = None
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        path = self.params['agents_file'] or str(config_dir() / 'agents.yaml')
        try:
            agents = load_agents(path)
            if self.agent_id not in agents:
                raise AgentConfigError(f'{path}: no agent {self.agent_id!r} (have: '
                                       f'{", ".join(agents) or "none"})')
            self.config = agents[self.agent_id]
            self.behavior = load_behavior(self.config.behavior)
            self.behavior.setup(dict(self.config.settings))
            state_dir = os.path.expanduser(self.params['state_dir'])
            self.store = StateStore(os.path.join(state_dir, f'{self.agent_id}.db'), self.agent_id,
                                    max_bytes=int(self.params['state_max_mb'] * 2**20))
            self.state, self.events = self.store.load()
            self.episodic = EpisodicMemory(self.store.db, self.agent_id)
            self.semantic = SemanticMemory(self.store.db, self.agent_id, MiniLMEmbedder()) \
                if self.config.semantic_memory else None
        except (AgentConfigError, BehaviorNotFound, StateError, ModelError) as exc:
            self.get_logger().error(f'cannot configure: {exc}')
            self.stats['configure_failed'] += 1
            return TransitionCallbackReturn.FAILURE
        self.working = deque(maxlen=self.config.working_memory)
        from loom_msgs.srv import Recall
        self._recall = self.create_service(Recall, '~/recall', self._on_recall)
        self.get_logger().info(f'agent {self.agent_id} ({self.config.behavior}) configured with '
                               f'{self.events} events of restored state')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._must_deactivate = False
        self._watchdog = self.create_timer(0.1, self._watch)
        self.mailbox = Mailbox(self.config.mailbox_size)
        self._worker = threading.Thread(target=self._run, daemon=True, name=f'agent-{self.agent_id}')
        self._worker.start()
        for pattern in self.config.subscriptions:
            self._subs.append(self.bus.subscribe(
                pattern, lambda event, topic: self.mailbox.put(event), self.config.qos,
                backpressure=self.config.backpressure or None))
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.destroy_timer(self._watchdog)
        self._stop_delivery()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_delivery()
        if self.store is not None:
            self.destroy_service(self._recall)
            self.store.close()
            self.store = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self.on_cleanup(state)

    def _stop_delivery(self) -> None:
        for sub in self._subs:
            sub.close()
        self._subs = []
        if self.mailbox is not None:
            self.mailbox.close()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=10)
        self._worker = None
        self._commit()

    # -- the agent's own thread ---------------------------------------------------------------
    def _run(self) -> None:
        ctx = AgentContext(self.agent_id, self.state, self.working, self._emit,
                           dict(self.config.settings), self.episodic, self.semantic)
        per_event = self.config.persist == 'per_event'
        last_commit = time.monotonic()
        while True:
            item = self.mailbox.get(timeout=self.config.persist_interval_s)
            if item is None:
                if self.mailbox.closed:
                    return
            else:
                event, waited_us = item
                self.dispatch_us.append(waited_us)
                self.working.append(event)
                before = json.dumps(self.state)
                try:
                    with self._lock:  # memory is shared with the Recall service's thread
                        self.episodic.record(event)
                except sqlite3.Error as exc:  # e.g. the disk (or the state cap) is full
                    self._persistence_failed(StateError(f'agent {self.agent_id}: cannot record '
                                                        f'event {event.id}: {exc}'))
                    return
                try:
                    with self._lock:
                        run_handler(self.behavior, event, ctx)
                    self.stats['handled'] += 1
                except Exception as exc:  # a behavior bug must not stop the agent
                    self.state.clear()  # what a failed handler half-changed is not kept
                    self.state.update(json.loads(before))
                    self.stats['behavior_errors'] += 1
                    self.get_logger().error(f'behavior {self.config.behavior} failed on event '
                                            f'{event.id}: {exc!r}', throttle_duration_sec=1.0)
                self.events += 1
                self._last_event_id = event.id
            if per_event and item is not None or (
                    not per_event and time.monotonic() - last_commit >= self.config.persist_interval_s):
                if not self._commit():
                    return
                last_commit = time.monotonic()

    def _commit(self) -> bool:
        if self.store is None:
            return True
        try:
            with self._lock:
                self.store.commit(self.state, self.events, getattr(self, '_last_event_id', ''))
            return True
        except StateError as exc:
            self._persistence_failed(exc)
            return False

    def _persistence_failed(self, exc: Exception) -> None:
        """Stop taking events and leave `active` (the executor thread does the transition), so
        nothing is acknowledged that was not committed; what was committed stays."""
        self.stats['persist_failed'] += 1
        self.get_logger().error(f'{exc}; deactivating: no more events are taken')
        self._must_deactivate = True

    def _watch(self) -> None:
        if self._must_deactivate:
            self._must_deactivate = False
            self.trigger_deactivate()

    def _on_recall(self, req, resp):
        try:
            with self._lock:
                if req.mode == 'episodic':
                    results = self.episodic.query(req.start_ms, req.end_ms or 2**63 - 1, req.type,
                                                  req.source, req.tag, req.k or 100)
                elif req.mode in ('similar', 'graph'):
                    if self.semantic is None:
                        raise ValueError(f'agent {self.agent_id} has no semantic memory '
                                         '(semantic_memory: true in agents.yaml)')
                    results = self.semantic.similar(req.query, req.k or 5) \
                        if req.mode == 'similar' else \
                        self.semantic.neighbourhood(req.query, req.depth or 1)
                else:
                    raise ValueError(f'mode must be episodic, similar or graph, got {req.mode!r}')
        except ValueError as exc:
            resp.ok, resp.error = False, str(exc)
            return resp
        resp.ok, resp.results = True, [json.dumps(r) for r in results]
        return resp

    def _emit(self, kind: str, type: str, data: dict) -> None:
        topic = topics.agent_action(self.agent_id) if kind == 'action' else \
            topics.agent_intent(self.agent_id)
        self.bus.publish(topic, Event.with_json(type, data, source=f'agent/{self.agent_id}'))
        self.stats[f'{kind}s'] += 1


def main(args=None):
    run_lifecycle_node(AgentNode, args)


if __name__ == '__main__':
    main()
