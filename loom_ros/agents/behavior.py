"""The behavior protocol agents run, the ports a behavior reaches the rest of Loom through, and
how behaviors are found (entry point group `loom.behaviors`, so a third party adds an agent type
by installing a package).

Ports: a behavior routes an event (`ctx.route`), calls a plugin (`ctx.call`), asks the cloud
(`ctx.cloud()`), reports an executed route's outcome (`ctx.report`) and emits (`ctx.action`,
`ctx.intent`) through its AgentContext only. Whoever hosts the agent injects the ports: the
agent node gives in-process objects when the router or plugin lives in its process and service
clients on its own node otherwise (agents/flows/link.py); a test gives in-process ones. So a
behavior opens no node, no session and no connection of its own, and runs without ROS.
"""
from __future__ import annotations

import asyncio
import inspect
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, effective_privacy, named_subject
from loom_ros.plugins.contract import PluginResponse

if TYPE_CHECKING:   # the ports' data types; imported where used, to keep this module light
    from loom_ros.cloud.client import CloudClient
    from loom_ros.router.history import Outcome
    from loom_ros.router.local import RouteAnswer, RouteQuery

ENTRY_POINT_GROUP = 'loom.behaviors'
MAX_REMEMBERED_DECISIONS = 4096   # decisions whose outcome may still be reported (per agent)


class BehaviorNotFound(LookupError):
    """An unknown behavior name; says which ones are installed."""


class PortError(RuntimeError):
    """A port could not do what a behavior asked (router unreachable or refusing, host
    stopping, nothing wired); says which and why. The runtime counts it as a behavior error."""


class RouterPort(Protocol):
    """The router: a decision per event, and the outcomes of executed routes (it learns)."""

    def route(self, query: 'RouteQuery') -> 'RouteAnswer': ...

    def report(self, outcome: 'Outcome') -> None: ...


class PluginPort(Protocol):
    """The plugins: one event into plugin `name`; failures come back as a failed response."""

    def call(self, name: str, event: Event) -> PluginResponse: ...


class CloudPort(Protocol):
    """The host's cloud client: (client, '') when one is connected, else (None, why); a link
    still opening is waited for up to `wait_s`."""

    def client(self, wait_s: float = 0.0) -> 'tuple[CloudClient | None, str]': ...


class _Unwired:
    """A port nobody wired: says so on use (a behavior that needs it fails with the reason)."""

    def __init__(self, what: str):
        self.what = what

    def route(self, query) -> 'RouteAnswer':
        raise PortError(f'no {self.what} port: this agent was given no router')

    def report(self, outcome) -> None:
        pass   # nobody to learn from it

    def call(self, name: str, event: Event) -> PluginResponse:
        return PluginResponse.failure(f'no {self.what} port: this agent was given no plugins '
                                      f'(asked for {name!r})')

    def client(self, wait_s: float = 0.0):
        return None, 'no cloud configured for this agent'


class InProcessPlugins:
    """Plugins in this process: `lookup()` gives {name: handle with handle_event}, e.g. a
    PluginHost's `handles` or plugins.registry.local_plugins."""

    def __init__(self, lookup):
        self.lookup = lookup if callable(lookup) else (lambda: lookup)

    def call(self, name: str, event: Event) -> PluginResponse:
        handle = self.lookup().get(name)
        if handle is None:
            return PluginResponse.failure(f'no plugin {name!r} runs in this process')
        return handle.handle_event(event)


@dataclass(frozen=True)
class Ports:
    """What an agent's behavior reaches beyond its own state; unwired ones say so on use."""

    router: RouterPort = field(default_factory=lambda: _Unwired('router'))
    plugins: PluginPort = field(default_factory=lambda: _Unwired('plugin'))
    cloud: CloudPort = field(default_factory=lambda: _Unwired('cloud'))
    # subject id -> its keyed hash under the root (storage.consent.SubjectRefs.ref): what a
    # cloud request carries, so the cloud can erase by it (fleet erasure) without the id.
    subject_refs: Callable[[str], str] | None = None


class Behavior(Protocol):
    """What an agent type implements. `handle` may be a plain or an async function.

    `setup` is called once on configure with the agent's settings; `handle` once per event, with
    a context that gives the persisted state (a dict, committed after each handled event), the
    working memory, `emit` for actions and intents, and the ports (route, call, cloud, report).
    A behavior may list the plugins it calls in a `plugins` attribute after setup, so a host can
    prepare its service clients before the first event.
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
    ports: Ports = field(default_factory=Ports)
    # decision id -> whether its event named a data subject, for `report` (newest kept)
    _subjects: OrderedDict = field(default_factory=OrderedDict, repr=False)
    # () -> (privacy, subject) the agent holds what it derives to (Agent.held): the event it
    # handles as it arrived, which the behavior's own copy may no longer say
    held: Callable[[], tuple[Privacy, str]] | None = field(default=None, repr=False)

    def _holding(self, event: Event) -> Event:
        """`event` as a port may pass it on: at least as private as what the agent holds, and
        naming that data subject (or '..', which no consent check accepts, when it names another
        one); a copy when it must change. A behavior that lowered its event's privacy, dropped
        or replaced its subject gets none of it past a port."""
        if self.held is None:
            return event
        floor, subject = self.held()
        privacy, named = effective_privacy(event), named_subject(event)
        want = named if not subject else subject if named in ('', subject) else '..'
        if privacy >= floor and want == named:
            return event
        out = event.copy()
        out.privacy = max(privacy, floor)
        if want != named:
            out.metadata[SUBJECT_METADATA_KEY] = want
        return out

    # -- ports --------------------------------------------------------------------------------
    def route(self, event: Event, event_type: str, *, confidence: float | None = None,
              latency_budget_ms: float | None = None,
              local_supported: bool = True) -> 'RouteAnswer':
        """The router's decision for `event` (as `event_type`), with the local confidence when
        the behavior has one; its privacy is the event's effective privacy. PortError (or the
        router core's RequestError) when there is no decision."""
        from loom_ros.router.local import RouteQuery
        event = self._holding(event)
        subject = named_subject(event)
        answer = self.ports.router.route(RouteQuery(
            event_id=event.id, event_type=event_type, agent_id=self.agent_id,
            privacy=effective_privacy(event), local_confidence=confidence,
            latency_budget_ms=latency_budget_ms, local_supported=local_supported,
            payload_bytes=len(event.payload), subject=subject))
        self._subjects[answer.decision_id] = bool(subject)
        while len(self._subjects) > MAX_REMEMBERED_DECISIONS:
            self._subjects.popitem(last=False)
        return answer

    def report(self, outcome: 'Outcome') -> None:
        """An executed route's outcome, for the router (cloud.client.execute_route's `report`).
        Marked `names_subject` when its decision's event named a data subject, or when the
        decision is not one this context routed recently (fail closed: its training row then
        needs the recorded event and the subject's learning consent)."""
        names = self._subjects.get(outcome.decision_id, True)
        if names and not outcome.names_subject:
            outcome = replace(outcome, names_subject=True)
        self.ports.router.report(outcome)

    def subject_ref(self, event: Event) -> str:
        """The keyed hash of the data subject `event` names, for a cloud request (the cloud
        keeps and erases by it, never by the id); '' for an anonymous event, and for a subject
        id that is invalid or when the host has no key (the router keeps those local anyway)."""
        subject = named_subject(self._holding(event))
        if not subject or self.ports.subject_refs is None:
            return ''
        try:
            return self.ports.subject_refs(subject)
        except ValueError:   # SubjectError: not a subject id
            return ''

    def call(self, plugin: str, event: Event) -> PluginResponse:
        """One event into plugin `plugin`; every failure is a failed response that says why."""
        return self.ports.plugins.call(plugin, self._holding(event))

    def cloud(self, wait_s: float = 0.0) -> 'tuple[CloudClient | None, str]':
        """The host's cloud client, or None and why (Hybrid and Cloud routes then run local);
        a link still opening (the host opens it on configure) is waited for up to `wait_s`."""
        return self.ports.cloud.client(wait_s)

    def action(self, type: str, data: dict, privacy: Privacy | None = None) -> None:
        self.emit('action', type, data, privacy)

    def intent(self, type: str, data: dict, privacy: Privacy | None = None) -> None:
        self.emit('intent', type, data, privacy)


def installed_behaviors() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def behavior_entry_points() -> dict:
    """{name: entry point} of every installed behavior (the first of a name wins). One scan of
    the installed packages: with a few hundred installed it costs about 0.3 s, so a host of
    many agents scans once and hands the result to each (load_behavior's `installed`)."""
    found: dict = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def load_behavior(name: str, installed: dict | None = None) -> Behavior:
    """Instantiate the behavior registered under `name` (looked up in `installed`, by default a
    fresh scan); BehaviorNotFound lists the known ones."""
    installed = behavior_entry_points() if installed is None else installed
    if name not in installed:
        raise BehaviorNotFound(f'no behavior {name!r} in entry point group {ENTRY_POINT_GROUP}; '
                               f'installed: {", ".join(sorted(installed)) or "none"}')
    return installed[name].load()()


def run_handler(behavior: Behavior, event: Event, ctx: AgentContext) -> None:
    result = behavior.handle(event, ctx)
    if result is not None and inspect.isawaitable(result):   # most handlers return None
        asyncio.run(result)


class CounterBehavior:
    """Counts events per type and emits a `count.milestone` intent every `intent_every` events.
    Small, but it exercises state, working memory and intents; the tests' reference agent.
    Event types are the senders' to choose: at most MAX_KEYS distinct types are counted apart,
    the rest under 'other', so the state stays small however many types arrive."""

    MAX_KEYS = 256
    OTHER = 'other'

    def setup(self, settings: dict) -> None:
        self.every = int(settings.get('intent_every', 100))
        # Supervision drills: an event of this type blocks the handler (a hung behavior), so
        # the lifecycle manager's hang detection can be exercised on a real agent. Off by default.
        self.hang_on = str(settings.get('hang_on', ''))

    def handle(self, event: Event, ctx: AgentContext) -> None:
        counts = ctx.state.setdefault('counts', {})
        key = event.type
        if key not in counts and len(counts) >= self.MAX_KEYS:
            key = self.OTHER
        counts[key] = counts.get(key, 0) + 1
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
