"""AgentNode: agents as an rclpy lifecycle node — one agent (the default), or many hosted in
one node and process (`agents` parameter) when a robot runs tens to thousands of them.

configure  opens the host's storage (one unit database under `storage.root`, named after the
           node, shared by its agents: docs/storage.md), loads each agent's entry from
           config/agents.yaml, its behavior (entry point) and its committed state, and offers
           the Recall service;
activate   subscribes and starts delivering through the shared dispatcher;
deactivate stops delivery, handles what the mailboxes already accepted, commits;
cleanup / shutdown commit and release.
Events go: bus subscription -> mailbox (priority, then arrival; bounded) -> dispatcher worker ->
behavior.handle -> state and episodes submitted to the group-commit writer per event (or per
interval) -> actions and intents on agent.<id>.action / agent.<id>.intent; an event counts as
handled (heartbeat `events`, `handled`) once its commit is done. With `workers: 0` there is no
worker: the thread that delivers the event (the executor's, or an in-process publisher's) runs
the handler at once; for behaviors that never wait (a port call from there fails at once).
Behaviors reach the router, the plugins and the cloud through the ports this node injects into
their AgentContext (made on configure, released on cleanup): in-process objects when the router
or a plugin runs in this process, else clients of `router/route` and the plugin host's services
on this very node (answered by its executor: see agents/flows/link.py for the threads), and one
cloud link (Zenoh session + CloudClient) per distinct cloud the agents' settings name
(agents/flows/cloud.py). Plugins an agent names in `host_plugins` run in this process on the
plugin host's settings (plugins/embedded.py), started on configure and stopped on cleanup, so its
calls carry no frame across processes (issue 15). Every heartbeat period each agent's
AgentStatus goes out on loom/agents/heartbeat for the lifecycle manager.
A behavior that raises is counted and logged and the agent goes on; an agent whose state cannot
be persisted (disk full, `state_max_mb` reached: the unit is shared, so every agent of the host
meets it) leaves `active`, so nothing uncommitted is acknowledged as done.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import sys

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from loom_ros.agents.behavior import behavior_entry_points
from loom_ros.agents.config import AgentConfigError, load_agents
from loom_ros.agents.flows.cloud import CloudLink, CloudSettings
from loom_ros.agents.flows.link import NodePorts
from loom_ros.agents.runtime import CONFIGURE_ERRORS, Agent, AgentState, Dispatcher
from loom_ros.agents.supervisor import LOCAL_BEATS, BeatSigner, process_key
from loom_ros.bridge.zenoh_link import INSECURE_WARNING
from loom_ros.bus import topics
from loom_ros.bus.bus import create_bus, in_turn
from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY
from loom_ros.bus.executor import HEAP, HeapHolds, full_pass, run_lifecycle_node, timer_callback
from loom_ros.bus.qos import QosLevel, to_qos_profile
from loom_ros.config.params import ConfigError, ParamSpec, config_dir, declare_parameters
from loom_ros.config.paths import usable_dir
from loom_ros.plugins.contract import PluginError
from loom_ros.plugins.embedded import EmbeddedPlugins, HostSettings, pick_specs
from loom_ros.plugins.host import PluginsFileError
from loom_ros.plugins.registry import local_plugins as registry_plugins
from loom_ros.security.capabilities import CapabilityConfigError
from loom_ros.security.keyring import encryption_settings
from loom_ros.security.audit import AuditError, AuditLog
from loom_ros.storage.consent import (ConsentError, ConsentRegistry, SubjectRefs, consent_path,
                                      load_defaults)
from loom_ros.storage.budget import BudgetGate
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import (
    BUDGET_PARAMETER, ENCRYPTION_PARAMETERS, derived, node_layout, node_objects,
)
from loom_ros.storage.storage import Storage, StorageConfig
from loom_ros.telemetry.logs import mask_node_logger

PARAMETERS = [
    ParamSpec('agent_id', 'Which entry of the agents file this node runs', read_only=True),
    ParamSpec('agents_file', "Agents YAML; '' means the shipped config/agents.yaml",
              read_only=True),
    ParamSpec('autostart', 'Configure and activate on start when run standalone', read_only=True),
    ParamSpec('state_max_mb', "Cap on this host's storage database in MiB (0: none); reaching "
              'it acts as a full disk', read_only=True, min_value=0.0),
    ParamSpec('agents', "Host several agents: comma-separated ids, '*' for all in the file, "
              "'' for just agent_id", read_only=True),
    ParamSpec('workers', 'Dispatcher worker threads shared by the hosted agents; 0: handlers '
              'run on the thread that delivers the event (behaviors that never wait)',
              read_only=True, min_value=0),
    ParamSpec('full_gc_period_s', 'Seconds between full garbage-collection passes while '
              'active, run by this node (0: CPython starts them itself)', read_only=True,
              min_value=0.0),
    ParamSpec('gc_young_threshold', 'While active: allocations between young garbage-'
              "collection passes (0: CPython's, 700)", read_only=True,
              min_value=0, max_value=10_000_000),
    ParamSpec('heartbeat_period_s', 'Seconds between AgentStatus heartbeats', read_only=True,
              min_value=0.01),
    ParamSpec('audit_db', "SQLite audit log of applied declassify rules ('' = "
              "<storage.root>/audit.db); '~' expands", read_only=True),
    ParamSpec('routing', "'hosted': decide routes in this process under the router node's "
              "policy, followed at run time; 'service': ask router/route for every decision",
              read_only=True),
]
ROUTING_MODES = ('hosted', 'service')


def _percentiles(values, *qs: float) -> list[float]:
    """Each q-quantile of `values` (0.0 when empty), from one sort."""
    if not values:
        return [0.0 for _ in qs]
    ordered = sorted(values)
    return [float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) for q in qs]


RECALL_WAIT_S = 2.0   # how long Recall waits for an agent's handler to finish
# Group commit of the host's writer: the longest a batch waits to fill. Small: batches fill from
# the workers' concurrency while the previous one commits, and nothing waits on them.
COMMIT_DELAY_MS = 1.0


def unit_name(fully_qualified: str) -> str:
    """The storage unit of a node (`/robot1/agent_host_1` -> `robot1.agent_host_1`): one
    database per agent host, named so two hosts never share one."""
    name = re.sub(r'[^A-Za-z0-9_.-]', '_', fully_qualified.strip('/').replace('/', '.'))
    name = re.sub(r'\.{2,}', '.', name).lstrip('.-') or 'agent'
    return name[-64:].lstrip('.-') or 'agent'


def _logs_failure(step: str):
    """A lifecycle callback that logs why it raised, then returns ERROR: rclpy turns the
    exception into ERROR and logs nothing, so a failed configure or activate said nothing."""
    def wrap(callback):
        @functools.wraps(callback)
        def logged(self, state):
            try:
                return callback(self, state)
            except Exception as exc:
                self.get_logger().error(f'cannot {step}: {type(exc).__name__}: {str(exc)[:500]}')
                return TransitionCallbackReturn.ERROR
        return logged
    return wrap


class AgentNode(LifecycleNode):

    def __init__(self, agent_id: str | None = None, heartbeat_key: bytes | None = None,
                 router=None, local_plugins=None, plugin_settings: HostSettings | None = None,
                 heap: HeapHolds | None = None, **kwargs):
        """`heartbeat_key`: the secret heartbeats are signed with; by default the one a spawning
        manager put in the environment, else this process's own (a manager in this process).
        `router`: an in-process RouterPort (router.local.LocalRouter) when the router runs in
        this process, else the behaviors route through the `router/route` service.
        `local_plugins`: the {name: handle} lookup of in-process plugins (by default
        plugins.registry.local_plugins, where a plugin host in this process registers).
        `plugin_settings`: the plugin host settings `host_plugins` run with (default: the
        plugin_host section of config/loom.yaml). `heap`: who holds the process's collector
        settled (default bus.executor.HEAP, the process's own; hosts in one process share it)."""
        overrides = kwargs.pop('parameter_overrides', [])
        name = kwargs.pop('node_name', None) or (f'agent_{agent_id}' if agent_id else 'agent')
        super().__init__(name, parameter_overrides=overrides, **kwargs)
        mask_node_logger(self)   # every log line masked from the first (issue 13, fault 10)
        self.params = declare_parameters(self, 'agent', PARAMETERS)
        self.layout = node_layout(self, 'agent')
        self.storage: Storage | None = None   # opened on configure, closed on cleanup
        self.agent_id = agent_id or self.params['agent_id']
        self.heap = heap if heap is not None else HEAP
        self.bus = create_bus(self, 'agent')
        self.agents: dict[str, Agent] = {}
        self.failed: dict[str, str] = {}   # agent id -> why it could not be configured
        self.dispatcher: Dispatcher | None = None
        self._subs = []
        self._recall_services = []
        self._beat_turn = 0
        self._full_gc_timer = None
        # The full collections this node ran (heap.hold_full_passes) and the objects they found.
        self.full_gc = {'passes': 0, 'found': 0}
        self._signer = BeatSigner(heartbeat_key or process_key())
        self._audit: AuditLog | None = None
        self._router, self._local_plugins = router, local_plugins
        self._plugin_settings = plugin_settings
        self.embedded: EmbeddedPlugins | None = None   # the agents' host_plugins, on configure
        self.ports: NodePorts | None = None            # made on configure, closed on cleanup
        self._consent: ConsentRegistry | None = None   # for hosted routing, on configure
        self.clouds: dict[CloudSettings, CloudLink] = {}
        self._closed_links: list[CloudLink] = []   # closed with their opener still in Zenoh
        from loom_msgs.msg import AgentStatus
        self._status_type = AgentStatus
        self._heartbeat_pub = self.create_publisher(
            AgentStatus, topics.AGENTS_HEARTBEAT, to_qos_profile(QosLevel.BACKGROUND))
        self._heartbeat = self.create_timer(self.params['heartbeat_period_s'], self._beat)
        if self.bus.telemetry is not None:   # on /diagnostics beside the bus's own checks
            self.bus.telemetry.add_check('mailboxes', self._mailboxes_check)
            self.bus.telemetry.add_check('state persistence', self._persistence_check)
            self.bus.telemetry.add_check('cloud link', self._cloud_check)

    @property
    def hosted(self) -> bool:
        return bool(self.params['agents'])

    @property
    def agent(self) -> Agent | None:
        """The agent, when this node runs one."""
        return next(iter(self.agents.values()), None)

    # -- lifecycle ----------------------------------------------------------------------------
    @_logs_failure('configure')
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        path = self.params['agents_file'] or str(config_dir() / 'agents.yaml')
        try:
            configs = load_agents(path)
            wanted = self._wanted(configs, path)
        except ValueError as exc:   # AgentConfigError, and any other refusal of the file
            self.get_logger().error(f'cannot configure: {exc}')
            return TransitionCallbackReturn.FAILURE
        self.failed = {}
        try:   # a read-only, full or invalid root, a damaged database: every agent says why
            usable_dir(str(self.layout.root), f'{self.get_name()}.storage.root')
            budget = int(self.get_parameter(BUDGET_PARAMETER.name).value)
            self.storage = Storage(StorageConfig(
                str(self.layout.root), unit=unit_name(self.get_fully_qualified_name()),
                # hot_max_events 0: each agent's working memory is its hot tier already.
                max_delay_ms=COMMIT_DELAY_MS, hot_max_events=0,
                max_db_bytes=int(self.params['state_max_mb'] * 2**20),
                encryption=encryption_settings(
                    {spec.name: self.get_parameter(spec.name).value
                     for spec in ENCRYPTION_PARAMETERS}),
                # blobs and archives in the store every process under the root uses
                objects=node_objects(self, os.environ)),
                # the root's total budget: writes stop at it (the lifecycle frees the oldest
                # archive and cold data; agent state is never deleted for space)
                gate=BudgetGate(self.layout, budget) if budget > 0 else None)
            # Full once, stopped: no later commit of an agent lands after one of it was lost.
            self.storage.writer.stop_when_full = True
        except (ConfigError, StorageError) as exc:   # KeyringError too: a wrong key
            self.failed = {agent_id: str(exc) for agent_id in wanted}
            self.get_logger().error(f'cannot configure: {exc}')
            return TransitionCallbackReturn.FAILURE
        self.dispatcher = Dispatcher(int(self.params['workers']), name=self.get_name())
        self.ports = NodePorts(self, self._router, self._plugin_lookup(configs, wanted),
                               consent=self._open_consent(),
                               follow_router=self._consent is not None,
                               refuse_waits=self.dispatcher.inline)
        from loom_msgs.srv import Recall
        behaviors = behavior_entry_points()   # one scan for every agent hosted here
        refs = self._subject_refs()
        for agent_id in wanted:
            if agent_id in self.failed:   # its host_plugins could not start
                continue
            try:
                ports = self.ports.for_agent(self._cloud_for(configs[agent_id]), refs)
                agent = Agent(configs[agent_id], self.storage, self._emit, log=self._log,
                              audit=self._audit_log(configs[agent_id]), ports=ports,
                              behaviors=behaviors)
                agent.configure()
            except (*CONFIGURE_ERRORS, OSError, sqlite3.Error) as exc:
                self.failed[agent_id] = str(exc)
                self.get_logger().error(f'agent {agent_id}: cannot configure: {exc}')
                continue
            self.agents[agent_id] = agent
            # Its output topics now, not at its first emit: discovery runs while it waits for
            # events, so what it emits first reaches the subscribers already there (a publisher
            # made at the first emit wrote to no matched reader yet: its first events were lost).
            for topic in (topics.agent_intent(agent_id), topics.agent_action(agent_id)):
                self.bus.publisher_for(topic)
            # The service clients of the plugins it calls, made here on the executor's thread
            # rather than by a worker at its first event.
            self.ports.plugins.prepare(getattr(agent.behavior, 'plugins', ()))
            name = f'~/{agent_id}/recall' if self.hosted else '~/recall'
            self._recall_services.append(self.create_service(
                Recall, name, lambda req, resp, a=agent: self._on_recall(a, req, resp)))
            self.get_logger().info(f'agent {agent_id} ({agent.config.behavior}) configured with '
                                   f'{agent.events} events of restored state')
        if not self.agents:
            self._release()
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def _subject_refs(self):
        """The keyed hash of a subject id that cloud requests carry (fleet erasure finds them
        by it), under the root's key; None (requests carry none) when the key cannot be had."""
        try:
            return SubjectRefs.at(self.layout.keys).ref
        except ConsentError as exc:
            self.get_logger().warning(f'cloud requests will carry no subject reference: {exc}')
            return None

    def _open_consent(self):
        """The consent lookup hosted routing needs (read-only, as the router node opens it),
        or None: then routing goes through the router/route service (logged why)."""
        mode = self.params['routing']
        if self._router is not None or mode == 'service':
            return None
        if mode not in ROUTING_MODES:
            self.get_logger().error(f"agent.routing {str(mode)[:32]!r} is not one of "
                                    f"{', '.join(ROUTING_MODES)}: routing through the service")
            return None
        try:
            self._consent = ConsentRegistry(consent_path(self.layout.root),
                                            load_defaults(config_dir() / 'consent.yaml'),
                                            read_only=True)
        except (ConsentError, OSError, sqlite3.Error) as exc:
            self.get_logger().warning(f'hosted routing: cannot open the consent registry '
                                      f'({exc}): routing through the router/route service')
            return None
        return self._consent.lookup

    def _plugin_lookup(self, configs: dict, wanted: list[str]):
        """The in-process plugins the agents call: the host_plugins they name, started here on
        the plugin host's settings (an agent whose names cannot run goes to `failed`, saying
        why), over `local_plugins` (default: those a plugin host in this process registered)."""
        base = self._local_plugins if self._local_plugins is not None else registry_plugins
        # A plugin a host in this process already runs (loom bringup --composition) is called
        # there: a second copy of its model would only cost memory.
        present = base() if callable(base) else base
        named = {a: [n for n in configs[a].host_plugins if n not in present] for a in wanted}
        named = {a: names for a, names in named.items() if names}
        if not named:
            return base
        try:
            settings = (self._plugin_settings or HostSettings.shipped()).under(self.layout)
            self.embedded = EmbeddedPlugins(settings, ros_node=self, logger=self.get_logger())
            specs = self.embedded.specs()
        except (PluginsFileError, ConfigError, KeyError) as exc:
            return self._host_plugins_failed(named, str(exc), base)
        for agent_id, names in list(named.items()):
            try:
                pick_specs(specs, names, settings.path)
            except PluginsFileError as exc:
                self._host_plugins_failed({agent_id: names}, str(exc), base)
                del named[agent_id]
        names = [n for ns in named.values() for n in ns]
        if not names:
            return base
        try:
            handles = self.embedded.start(pick_specs(specs, names, settings.path))
        except (PluginsFileError, PluginError, ConfigError, AuditError,
                CapabilityConfigError) as exc:
            return self._host_plugins_failed(named, str(exc), base)
        self.get_logger().info(
            f'host_plugins running in this process: {", ".join(handles)}'
            + (f'; failed: {", ".join(self.embedded.failed)}' if self.embedded.failed else ''))
        if isinstance(base, dict):
            return {**base, **handles}
        return lambda: {**base(), **handles}

    def _host_plugins_failed(self, named: dict, reason: str, base):
        for agent_id in named:
            self.failed[agent_id] = f'host_plugins: {reason}'
            self.get_logger().error(f'agent {agent_id}: cannot configure: host_plugins: {reason}')
        return base

    def _wanted(self, configs: dict, path: str) -> list[str]:
        spec = self.params['agents'].strip()
        if spec == '*':
            return list(configs)
        wanted = [s.strip() for s in spec.split(',') if s.strip()] if spec else [self.agent_id]
        missing = [a for a in wanted if a not in configs]
        if missing:
            raise AgentConfigError(f'{path}: no agent {", ".join(map(repr, missing))} (have: '
                                   f'{", ".join(configs) or "none"})')
        return wanted

    def _cloud_for(self, config):
        """The host's cloud link for the cloud this agent's settings name (made and started
        once per distinct cloud), or None; AgentConfigError for bad settings."""
        settings = CloudSettings.of(config.id, dict(config.settings))
        if settings is None:
            return None
        link = self.clouds.get(settings)
        if link is None:
            if settings.insecure:
                self.get_logger().warning(f'cloud link: {INSECURE_WARNING}')
            link = self.clouds[settings] = CloudLink(settings, log=self._log)
            link.start()
        return link

    @_logs_failure('activate')
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.ports is not None:
            self.ports.gate.open()
        # One bus subscription per (pattern, QoS, backpressure) shared by the agents that ask for
        # the same: an event on a topic 100 agents follow is taken and counted once, then put in
        # each mailbox, instead of passing the bus's per-subscription work 100 times.
        groups: dict[tuple, list[Agent]] = {}
        for agent in self.agents.values():
            if agent.lifecycle is AgentState.INACTIVE and agent.persist_failed is None:
                agent.activate()
                for pattern in agent.config.subscriptions:
                    key = (pattern, agent.config.qos, agent.config.backpressure or None)
                    groups.setdefault(key, []).append(agent)
        # The agents, their stores and behaviors: no full GC pass walks them. Before the
        # subscriptions, not after: this collection runs on the executor's thread (20 ms, and
        # 40-240 ms on a loaded machine), and a frame that arrived during it waited for it (the
        # face flow's first frames, 41-241 ms to the agent; docs/face_flow_latency.md).
        self.heap.settle(self)
        deliver = self.dispatcher.deliver_all if groups else None
        for (pattern, qos, backpressure), agents in groups.items():
            self._subs.append(self.bus.subscribe(
                pattern, lambda event, topic, a=tuple(agents): deliver(a, event), qos,
                backpressure=backpressure))
        period = self.params['full_gc_period_s']
        if period > 0:   # CPython's full passes stalled a busy host: here, on a timer, instead
            self.heap.hold_full_passes(self, self.params['gc_young_threshold'])
            self._full_gc_timer = self.create_timer(period, timer_callback(self._full_pass))
        return super().on_activate(state)

    def _full_pass(self) -> None:
        found, ms = full_pass()
        self.full_gc['passes'] += 1
        self.full_gc['found'] += found
        self.get_logger().debug(f'full garbage collection: {found} objects, {ms:.1f} ms')

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._close_gate()   # before draining here, on the executor's thread
        self._stop_delivery()
        self.heap.unsettle(self)   # activate freezes again: deactivate/activate cycles keep nothing
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._close_gate()
        self._stop_delivery()
        self._release()
        self.heap.unsettle(self)
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self.on_cleanup(state)

    def _close_gate(self) -> None:
        """End every wait for a service answer and refuse new ones: what is drained on the
        executor's thread must not wait for an answer only that thread can take."""
        if self.ports is not None:
            self.ports.gate.close()

    def _stop_delivery(self) -> None:
        if self._full_gc_timer is not None:
            self.destroy_timer(self._full_gc_timer)
            self._full_gc_timer = None
        for sub in self._subs:
            sub.close()
        self._subs = []
        for agent in self.agents.values():
            if agent.lifecycle is AgentState.ACTIVE:
                agent.deactivate()

    def _release(self) -> None:
        for agent in self.agents.values():
            agent.cleanup()
        for service in self._recall_services:
            self.destroy_service(service)
        self._recall_services = []
        self.agents = {}
        if self.dispatcher is not None:
            self.dispatcher.close()
            self.dispatcher = None
        if self.storage is not None:   # after the agents: their last commits are done
            self.storage.close()
            self.storage = None
        if self._audit is not None:
            self._audit.close()
            self._audit = None
        if self.ports is not None:
            self.ports.close()
            self.ports = None
        if self._consent is not None:   # after the ports: the router used it
            self._consent.close()
            self._consent = None
        self._stop_embedded()
        for link in self.clouds.values():
            link.close()
        # an opener still inside Zenoh outlives the link: the process's exit must know of it
        self._closed_links = [link for link in self._closed_links + list(self.clouds.values())
                              if link.native_threads()]
        self.clouds = {}

    def exit_hazards(self) -> list[str]:
        """Cloud-link openers still inside Zenoh's native code: the process ends with os._exit
        after its shutdown (bus.executor.end_process), or their return during the
        interpreter's exit would abort it."""
        return [name for link in list(self.clouds.values()) + self._closed_links
                for name in link.native_threads()]

    def _stop_embedded(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None

    def destroy_node(self) -> None:
        """Ctrl-C / SIGTERM end the process without a lifecycle transition: shut the
        host_plugins down here so they release what they hold."""
        self._stop_embedded()
        super().destroy_node()

    # -- on the executor thread ---------------------------------------------------------------
    def _beat(self) -> None:
        """Heartbeats, interval commits, and leaving `active` after a persistence failure."""
        stamp = self.get_clock().now().to_msg()
        node, pid = self.get_fully_qualified_name(), os.getpid()
        if not self.agents and not self.failed:   # not configured yet: say we are up
            spec = self.params['agents'].strip() or self.agent_id
            for agent_id in spec.split(','):
                self._send_beat(node, self._status_type(
                    agent_id=agent_id.strip(), node=node, pid=pid, lifecycle='unconfigured'))
        for agent_id in self.failed:
            self._send_beat(node, self._status_type(
                agent_id=agent_id, node=node, pid=pid, lifecycle='unconfigured',
                reason=self.failed[agent_id]))
        agents = list(self.agents.values())
        # Up to 10 agents report every beat; more report in turns, each at least once per 10
        # beats (1 s by default, well inside the manager's 4 s timeout), so 1,000 hosted agents
        # do not cost 10,000 messages a second.
        turn, self._beat_turn = in_turn(agents, self._beat_turn, max(10, -(-len(agents) // 10)))
        reporting = {id(a) for a in turn}
        for agent in agents:
            if agent.persist_failed is not None and agent.lifecycle is AgentState.ACTIVE:
                if len(self.agents) == 1:
                    self.trigger_deactivate()   # the node's own state says what happened
                else:
                    agent.deactivate()
            agent.flush_if_due()
            if id(agent) in reporting:
                self._send_beat(node, self._status(agent, stamp, node, pid))

    def _send_beat(self, node: str, msg) -> None:
        """Sign, publish, and hand to a manager in this process (which then needs no topic)."""
        self._signer.sign(msg)
        LOCAL_BEATS.post(node, msg)
        self._heartbeat_pub.publish(msg)

    def _mailboxes_check(self):
        from loom_ros.telemetry.diagnostics import queues_check
        return queues_check({a.id: (len(a.mailbox), a.config.mailbox_size)
                             for a in list(self.agents.values()) if a.mailbox is not None})

    def _persistence_check(self):
        from loom_ros.telemetry.diagnostics import ERROR, CheckResult, persistence_check
        agents = list(self.agents.values())
        failed = [a for a in agents if a.persist_failed is not None]
        if failed:
            return CheckResult(ERROR, f'agent {failed[0].id} cannot persist its state '
                               f'({failed[0].persist_failed}); it stopped taking events. Free '
                               'disk space (or raise state_max_mb), then activate it again')
        lag = max((a.commit_lag_s() for a in agents), default=0.0)
        return persistence_check(lag, warn_s=2.0, error_s=10.0, what='agent state')

    def _cloud_check(self):
        """WARN while a cloud link the agents need is not open (with why): their Hybrid and
        Cloud routes then answer locally."""
        from loom_ros.telemetry.diagnostics import OK, WARN, CheckResult
        links = list(self.clouds.values())
        if not links:
            return CheckResult(OK, 'no agent here uses the cloud')
        down = [(link, link.client()[1]) for link in links if link.client()[0] is None]
        if down:
            link, why = down[0]
            return CheckResult(WARN, f'cloud link to {list(link.settings.connect)} is not open: '
                               f'{why}', {'open': str(len(links) - len(down)),
                                          'links': str(len(links))})
        return CheckResult(OK, f'{len(links)} cloud link(s) open',
                           {'open': str(len(links)), 'links': str(len(links))})

    def _status(self, agent: Agent, stamp, node: str, pid: int):
        mailbox = agent.mailbox
        p50, p99 = _percentiles(agent.recent_dispatch_us(), 0.5, 0.99)
        msg = self._status_type(
            agent_id=agent.id, node=node, pid=pid, lifecycle=agent.lifecycle.value,
            busy_ms=agent.busy_ms(), events=agent.acked_events, handled=agent.stats['handled'],
            behavior_errors=agent.stats['behavior_errors'],
            persist_failed=agent.stats['persist_failed'],
            mailbox_depth=len(mailbox) if mailbox else 0, mailbox_size=agent.config.mailbox_size,
            mailbox_dropped=mailbox.dropped if mailbox else 0,
            dispatch_p50_us=p50, dispatch_p99_us=p99,
            reason=str(agent.persist_failed or ''))
        msg.header.stamp = stamp
        return msg

    def _on_recall(self, agent: Agent, req, resp):
        # On the executor's thread: never wait for a handler that waits for a service answer
        # (only this thread can take it).
        ports = self.ports
        if not agent.acquire(RECALL_WAIT_S, lambda: ports is not None and ports.gate.waiting > 0):
            resp.ok, resp.error = False, (f'agent {agent.id} is busy handling an event; '
                                          'ask again')
            return resp
        try:
            results = agent.recall(req.mode, start_ms=req.start_ms, end_ms=req.end_ms,
                                   type=req.type, source=req.source, tag=req.tag,
                                   query=req.query, k=req.k, depth=req.depth)
        except ValueError as exc:
            resp.ok, resp.error = False, str(exc)
            return resp
        finally:
            agent.lock.release()
        resp.ok, resp.results = True, [json.dumps(r) for r in results]
        return resp

    # -- from the dispatcher's threads --------------------------------------------------------
    def _emit(self, agent_id: str, kind: str, type: str, data: dict, privacy: Privacy,
              subject: str = '') -> None:
        """Publish what an agent emitted, with the privacy the runtime derived from its input
        and the data subject that input named (loom.subject)."""
        topic = topics.agent_action(agent_id) if kind == 'action' else \
            topics.agent_intent(agent_id)
        self.bus.publish(topic, Event.with_json(
            type, data, source=f'agent/{agent_id}', privacy=privacy,
            metadata={SUBJECT_METADATA_KEY: subject} if subject else {}))

    def _audit_log(self, config):
        """The audit log, opened on first need (an agent declaring declassify rules). One that
        cannot be opened leaves None: the runtime then refuses to lower privacy (fail closed)."""
        if not config.declassify:
            return None
        if self._audit is None:
            try:
                self._audit = AuditLog(os.path.expanduser(
                    derived(self.params['audit_db'], self.layout.audit)))
            except AuditError as exc:
                self.get_logger().error(f'{exc}: declassify rules of agent {config.id} will not '
                                        'be applied (its emissions keep their input privacy)')
                return None
        return self._audit

    def _log(self, level: str, message: str) -> None:
        try:
            getattr(self.get_logger(), level)(message, throttle_duration_sec=1.0)
        except Exception:  # noqa: BLE001 - the throttle reads the node's clock, gone at shutdown
            print(f'[{level.upper()}] [{self.get_name()}]: {message[:2000]}', file=sys.stderr,
                  flush=True)


def agent_id_from_args(argv: list[str]) -> str | None:
    """The `-p agent_id:=<id>` (or `-p <node>:agent_id:=<id>`) of a command line's ROS
    arguments, so a standalone agent is named `agent_<id>` as its services are documented
    (`/agent_<id>/recall`), not `/agent` whatever its id. A `-r __node:=` remap still wins."""
    in_ros, wanted = False, False
    for token in argv[:4096]:
        if token == '--ros-args':
            in_ros = True
        elif token == '--':
            in_ros = False
        elif in_ros and token in ('-p', '--param'):
            wanted = True
            continue
        elif in_ros and wanted:
            name, sep, value = token.partition(':=')
            if sep and name.rsplit(':', 1)[-1] == 'agent_id' and 0 < len(value) <= 64:
                return value.strip('\'"')
        wanted = False
    return None


def params_files_from_args(argv: list[str]) -> list[str]:
    """The `--params-file <path>` of a command line's ROS arguments, in order: the agent's
    host_plugins run on the plugin_host section of the same files (the lifecycle manager gives
    its agents the robot's params file)."""
    in_ros, files = False, []
    tokens = argv[:4096]
    for i, token in enumerate(tokens):
        if token == '--ros-args':
            in_ros = True
        elif token == '--':
            in_ros = False
        elif in_ros and token == '--params-file' and i + 1 < len(tokens):
            files.append(tokens[i + 1])
    return files[:16]


def main(args=None) -> int:
    argv = list(sys.argv if args is None else args)
    agent_id = agent_id_from_args(argv)
    files = params_files_from_args(argv)

    def make() -> AgentNode:   # a params file rclpy took but we cannot read: say so and stop
        settings = HostSettings.of_files(files) if files else None
        return AgentNode(agent_id=agent_id, plugin_settings=settings)
    return run_lifecycle_node(make, args)


if __name__ == '__main__':
    sys.exit(main())
