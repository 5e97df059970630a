"""The behavior protocol agents run, and how behaviors are found (entry point group
`loom.behaviors`, so a third party adds an agent type by installing a package)."""
from __future__ import annotations

import asyncio
import inspect
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Protocol

from loom_ros.bus.event import Event, Privacy

ENTRY_POINT_GROUP = 'loom.behaviors'


class BehaviorNotFound(LookupError):
    """An unknown behavior name; says which ones are installed."""


class Behavior(Protocol):
    """What an agent type implements. `handle` may be a plain or an async function.

    `setup` is called once on configure with the agent's settings; `handle` once per event, with
    a context that gives the persisted state (a dict, committed after each handled event), the
    working memory, and `emit` for actions and intents.
    """

    def setup(self, settings: dict) -> None: ...

    def handle(self, event: Event, ctx: 'AgentContext') -> None: ...


@dataclass
class AgentContext:
    agent_id: str
    state: dict
    working_memory: deque
    # emit(kind 'action'|'intent', type, data, privacy): privacy None means "as the input";
    # the runtime never lets it go below the event being handled (see runtime.derived_privacy).
    emit: Callable[[str, str, dict, Privacy | None], None]
    settings: dict = field(default_factory=dict)
    episodic: object = None   # agents.memory.EpisodicMemory (every handled event is recorded)
    semantic: object = None   # agents.memory.SemanticMemory, when the agent enables it

    def action(self, type: str, data: dict, privacy: Privacy | None = None) -> None:
        self.emit('action', type, data, privacy)

    def intent(self, type: str, data: dict, privacy: Privacy | None = None) -> None:
        self.emit('intent', type, data, privacy)


def installed_behaviors() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_behavior(name: str) -> Behavior:
    """Instantiate the behavior registered under `name`; BehaviorNotFound lists the known ones."""
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        raise BehaviorNotFound(f'no behavior {name!r} in entry point group {ENTRY_POINT_GROUP}; '
                               f'installed: {", ".join(installed_behaviors()) or "none"}')
    return matches[0].load()()


def run_handler(behavior: Behavior, event: Event, ctx: AgentContext) -> None:
    result = behavior.handle(event, ctx)
    if inspect.isawaitable(result):
        asyncio.run(result)


class CounterBehavior:
    """Counts events per type and emits a `count.milestone` intent every `intent_every` events.
    Small, but it exercises state, working memory and intents; the tests' reference agent."""

    def setup(self, settings: dict) -> None:
        self.every = int(settings.get('intent_every', 100))
        # Supervision drills: an event of this type blocks the handler (a hung behavior), so
        # the lifecycle manager's hang detection can be exercised on a real agent. Off by default.
        self.hang_on = str(settings.get('hang_on', ''))

    def handle(self, event: Event, ctx: AgentContext) -> None:
        counts = ctx.state.setdefault('counts', {})
        counts[event.type] = counts.get(event.type, 0) + 1
        ctx.state['total'] = ctx.state.get('total', 0) + 1
        ctx.state['last_id'] = event.id
        if event.type == 'fail.please':
            raise RuntimeError('asked to fail')
        if self.hang_on and event.type == self.hang_on:
            threading.Event().wait()  # never set: hangs until the process is killed
        if ctx.state['total'] % self.every == 0:
            ctx.intent('count.milestone', {'total': ctx.state['total']})


class MemorizeBehavior:
    """Stores `fact` events ({"subject", "relation", "object"}) in semantic memory, with the
    event id as provenance; the reference agent for memory and the Recall service."""

    def setup(self, settings: dict) -> None:
        pass

    def handle(self, event: Event, ctx: AgentContext) -> None:
        if event.type != 'fact':
            return
        if ctx.semantic is None:
            raise RuntimeError('memorize needs semantic_memory: true in agents.yaml')
        fact = event.json()
        ctx.semantic.add_fact(fact['subject'], fact['relation'], fact['object'],
                              provenance=event.id)
        ctx.state['facts'] = ctx.state.get('facts', 0) + 1
