"""The lifecycle manager of every Loom lifecycle node. It brings up, in order, first the lifecycle
nodes others started (`nodes`: router, plugin host, Zenoh bridge, storage, started by launch or
`loom bringup` with autostart false), then the agents (configure, then activate, one after the
other); watches the nodes by polling their lifecycle state and the agents through their
heartbeats; brings a respawned node up again and restarts a dead or hung agent (each restores its
own state on configure); gives up after max_restarts; and reports on loom/agents/status
(AgentStatus, agents) and /diagnostics (DiagnosticArray, `loom/nodes/<node>` and
`loom/agents/<agent>`).

Nav2's manager services (std_srvs/Trigger) drive it: ~/startup, ~/shutdown (every node taken
down in reverse order, agents stopped first), ~/pause (deactivate, reverse order), ~/resume,
~/reset (deactivate and clean up) and ~/is_active. They answer at once and the manager works
toward the new goal in the background (a blocking answer would stall this node's executor);
~/is_active tells when it is there. With `autostart: false` nothing happens until ~/startup.
What to do next with the nodes is decided by bringup.manager_core (pure, clock-injected).

Nav2's lifecycle manager supervises through bond, which Python nodes lack; this one watches the
AgentStatus heartbeats every agent node publishes (0.1 s period, 4 s timeout by default), and
believes only beats signed with the secret of the process it expects them from (a fresh one per
spawned process, handed over in its environment; the process's own with spawn: false), so fakes
on the public topic are dropped and counted (`heartbeats_rejected` on /diagnostics).
With `spawn: true` it starts the agent processes itself, so it can kill a hung one and start it
again. With `spawn: false` (a launch file started them with respawn) it brings a respawned node
back up, but cannot end a hung process itself.
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import sys
import time

import yaml
from rclpy.node import Node

from loom_ros.agents.config import AgentConfigError, load_agents
from loom_ros.agents.supervisor import (KEY_ENV, LOCAL_BEATS, Beat, BeatAuth, Health,
                                        Supervisor, Unit, process_key)
from loom_ros.bus import topics
from loom_ros.bus.executor import run_node
from loom_ros.bus.qos import QosLevel, to_qos_profile
from loom_ros.bringup import entry
from loom_ros.bringup.manager_core import AFTER, ManagerCore
from loom_ros.bringup.processes import Process, RestartPolicy
from loom_ros.bringup.shm import Janitor
from loom_ros.bringup.stop_signals import STACKS_SIGNAL
from loom_ros.config.params import (ConfigError, ParamSpec, config_dir, declare_parameters,
                                    node_defaults)
from loom_ros.storage.layout import node_layout
from loom_ros.telemetry.logs import mask_node_logger

PARAMETERS = [
    ParamSpec('agents_file', "Agents YAML; '' means the shipped config/agents.yaml",
              read_only=True),
    ParamSpec('agents', "Agents to manage in bring-up order: comma-separated ids, '*' for the "
              "file order, 'none' for no agents", read_only=True),
    ParamSpec('groups', "Agents hosted together in one process: ';'-separated groups of "
              "comma-separated ids ('' = one process per agent)", read_only=True),
    ParamSpec('spawn', 'Start the agent processes (true) or manage nodes started elsewhere',
              read_only=True),
    ParamSpec('shm_cleanup', 'Give back the Fast DDS shared memory dead processes left '
              '(bringup/shm.py): at start, after each restart, when a node is lost or back',
              read_only=True),
    ParamSpec('autostart', 'Bring everything up as soon as the manager starts (false: wait for '
              '~/startup)', read_only=True),
    ParamSpec('agent_params_file', "ROS params file given to spawned agents ('' = none)",
              read_only=True),
    ParamSpec('heartbeat_timeout_s', 'No heartbeat (agents) or get_state answer (nodes) for '
              'this long: dead (or hung if its process still runs)', min_value=0.1),
    ParamSpec('hang_timeout_s', 'A handler busy for longer than this: hung', min_value=0.1),
    ParamSpec('max_restarts', 'Restarts per process before it is marked failed', min_value=0),
    ParamSpec('transition_timeout_s', 'Longest wait for a lifecycle service or transition',
              min_value=1.0),
    ParamSpec('status_period_s', 'Seconds between loom/agents/status and /diagnostics reports',
              min_value=0.05),
    ParamSpec('node_poll_period_s', "Seconds between get_state polls of each managed node",
              read_only=True, min_value=0.05, max_value=60.0),
]
NODES_DESCRIPTION = ("Lifecycle nodes others start (launch, loom bringup; autostart false) to "
                     "bring up in this order before the agents, names relative to this "
                     "manager's namespace (e.g. router, plugin_host, zenoh_bridge)")
MAX_NODES = 64
_NODE_NAME = re.compile(r'^/?[A-Za-z_][A-Za-z0-9_]{0,127}(/[A-Za-z_][A-Za-z0-9_]{0,127}){0,7}$')
_TRANSITION_IDS = {'configure': 1, 'cleanup': 2, 'activate': 3, 'deactivate': 4,
                   'shutdown': 5}   # shutdown is only asked of an unconfigured node
# A configure or activate of an agent host unanswered this long: get_state says whether it
# happened (its answer lost to DDS's reply-matching race, bus/replies.py), asked again as long.
SETTLE_S = 1.0
AGENT_STOP_S = 10.0   # SIGINT, then SIGKILL after this, for agents a shutdown stops


class _Managed:
    """A unit plus what the manager does with it: its process, clients, and bring-up phase."""

    def __init__(self, unit: Unit):
        self.unit = unit
        self.process: Process | None = None
        # spawn, wait_services, configuring, activating, running, stopping, stopped, failed
        self.phase = 'spawn'
        self.phase_since = 0.0
        self.future = None
        self.change_state = self.get_state = None
        self.key: bytes | None = None   # the secret its beats are signed with
        self.beat_seen = False          # a verified beat from the current process came
        self.local_seen: dict[str, tuple[int, int]] = {}   # agent -> in-process beat taken
        self.paused = False             # deactivated by ~/pause (or on its way there)
        self.pause_future = None
        self.settle = None              # (get_state future or None, asked at): _settle


def _answered(response):
    """A done future holding `response`, in place of a call whose answer was lost."""
    from rclpy.task import Future
    future = Future()
    future.set_result(response)
    return future


class _NodeClients:
    """The lifecycle service clients of one managed node, and the calls in flight."""

    def __init__(self, get_state, change_state):
        self.get_state, self.change_state = get_state, change_state
        self.poll = None          # (future, asked at) of the get_state call in flight
        self.transition = None    # (future, transition label) in flight


class LifecycleManagerNode(Node):

    def __init__(self, **kwargs):
        super().__init__('lifecycle_manager', **kwargs)
        mask_node_logger(self)   # every log line masked from the first (issue 13, fault 10)
        self.params = declare_parameters(self, 'lifecycle_manager', PARAMETERS)
        # Handed to the agents it starts: they keep their state under the same root.
        self.layout = node_layout(self, 'lifecycle_manager')
        self.params['nodes'] = self._declare_nodes()
        from diagnostic_msgs.msg import DiagnosticArray
        from lifecycle_msgs.srv import ChangeState, GetState
        from loom_msgs.msg import AgentStatus
        self._types = (ChangeState, GetState, AgentStatus, DiagnosticArray)
        self.managed = [_Managed(u) for u in self._units()]
        self._managed_of = {a: m for m in self.managed for a in m.unit.agents}
        p = self.params
        self.supervisor = Supervisor([m.unit for m in self.managed], p['heartbeat_timeout_s'],
                                     p['hang_timeout_s'], int(p['max_restarts']))
        self.policy = RestartPolicy(max_restarts=int(p['max_restarts']), initial_backoff_s=0.5,
                                    max_backoff_s=5.0)
        names = self._node_names()
        clash = [n for n in names if n in {m.unit.node for m in self.managed}]
        if clash:
            raise ConfigError(f'lifecycle_manager.nodes: {clash} are agent host names')
        self.core = ManagerCore(names, time.monotonic, p['heartbeat_timeout_s'],
                                p['transition_timeout_s'], self.policy)
        self.lifecycle_clients = {
            n: _NodeClients(self.create_client(GetState, f'{n}/get_state'),
                            self.create_client(ChangeState, f'{n}/change_state'))
            for n in names}
        self.last_status: dict[str, object] = {}
        self.auth = BeatAuth()
        # Shared memory a dead process left (bringup/shm.py), with shm_cleanup: once now, for
        # whatever died before this start, and after each death this manager handles or sees a
        # node come back from.
        self.janitor = Janitor(lambda cleaned: self.get_logger().warning(str(cleaned))
                               if cleaned.error else self.get_logger().info(str(cleaned))) \
            if p['shm_cleanup'] else None
        self._clean_shm()
        if not p['spawn']:   # agents in this process (loom bringup), or given the same key
            for m in self.managed:
                m.key = process_key()
        qos = to_qos_profile(QosLevel.BACKGROUND)
        self.create_subscription(AgentStatus, topics.AGENTS_HEARTBEAT, self._on_beat, qos)
        self.status_pub = self.create_publisher(AgentStatus, topics.AGENTS_STATUS, qos)
        self.diag_pub = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS, 10)
        self.goal: str | None = None
        self._set_goal('active' if p['autostart'] else None)
        # Nav2's manager services.
        from std_srvs.srv import Trigger
        for name, handler in (('startup', self._on_startup), ('shutdown', self._on_shutdown),
                              ('pause', self._on_pause), ('resume', self._on_resume),
                              ('reset', self._on_reset), ('is_active', self._on_is_active)):
            self.create_service(Trigger, f'~/{name}', handler)
        self.create_timer(0.1, self._tick)
        self.create_timer(p['node_poll_period_s'], self._poll_nodes)
        self.create_timer(p['status_period_s'], self._report)
        self.get_logger().info('managing ' + '; '.join(
            [f'nodes {", ".join(names)}'] * bool(names) + [
                f'{m.unit.node} ({", ".join(m.unit.agents)})' for m in self.managed]) +
            ('' if p['autostart'] else '; waiting for ~/startup (autostart is false)'))

    def _declare_nodes(self):
        """`nodes`, a string array: dynamic typing, since an empty default list would be typed
        as bytes and refuse string overrides."""
        from rcl_interfaces.msg import ParameterDescriptor
        defaults = node_defaults('lifecycle_manager')
        if 'nodes' not in defaults:
            raise ConfigError('loom.yaml: no default for parameter \'nodes\' of lifecycle_manager')
        return self.declare_parameter('nodes', list(defaults['nodes']), ParameterDescriptor(
            description=NODES_DESCRIPTION, read_only=True, dynamic_typing=True)).value

    def _node_names(self) -> list[str]:
        """The `nodes` parameter checked: a list of valid, distinct ROS node names, bounded."""
        value = self.params['nodes']
        if value is None:   # rcl gives None for an empty list in a params file
            value = []
        elif isinstance(value, str):
            value = [v.strip() for v in value.split(',') if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f'lifecycle_manager.nodes: expected a list of node names, got '
                              f'{str(value)[:200]!r}')
        if len(value) > MAX_NODES:
            raise ConfigError(f'lifecycle_manager.nodes: {len(value)} nodes, at most {MAX_NODES}')
        bad = [v for v in value if not _NODE_NAME.match(v)]
        if bad:
            raise ConfigError(f'lifecycle_manager.nodes: {bad[0][:80]!r} is not a node name '
                              '(letters, digits, _; relative to the manager\'s namespace)')
        if len(set(value)) != len(value):
            raise ConfigError(f'lifecycle_manager.nodes: a node is listed twice: {value}')
        return list(value)

    def _units(self) -> list[Unit]:
        spec = self.params['agents'].strip()
        if spec == 'none':
            return []
        path = self.params['agents_file'] or str(config_dir() / 'agents.yaml')
        try:
            configs = load_agents(path)
        except AgentConfigError as exc:
            raise ConfigError(str(exc)) from None
        order = list(configs) if spec in ('', '*') else [a.strip() for a in spec.split(',')]
        missing = [a for a in order if a not in configs]
        if missing:
            raise ConfigError(f'lifecycle_manager: agents {missing} are not in {path} '
                              f'(have: {", ".join(configs)})')
        groups = [tuple(a.strip() for a in g.split(',') if a.strip())
                  for g in self.params['groups'].split(';') if g.strip()]
        grouped = {a: i for i, g in enumerate(groups) for a in g}
        stray = [a for a in grouped if a not in order]
        if stray:
            raise ConfigError(f'lifecycle_manager: groups name agents it does not manage: {stray}')
        units, seen = [], set()
        for agent in order:   # a group is brought up where its first agent stands in the order
            if agent in grouped:
                i = grouped[agent]
                if i not in seen:
                    seen.add(i)
                    units.append(Unit(f'agent_host_{i}', groups[i]))
            else:
                units.append(Unit(f'agent_{agent}', (agent,)))
        return units

    # -- manager services -----------------------------------------------------------------------
    def _set_goal(self, goal: str | None) -> None:
        self.goal = goal
        self.core.set_goal(goal)

    def _everything(self) -> str:
        return ', '.join([n.name for n in self.core.nodes] + [m.unit.node for m in self.managed])

    def _on_startup(self, _request, response):
        """~/startup: bring every node, then every agent, up in order."""
        response.success = True
        # A fresh start retries the agent hosts given up on (their restarts from 0), as the
        # core does for nodes: before, they stayed failed until the manager itself restarted.
        retried = []
        for m in self.managed:
            if m.phase == 'failed' and self.supervisor.retry(m.unit):
                # A host given up on at a failed configure or activate still runs (its log
                # says why): it goes first, or the new one would run beside it, under the same
                # name and storage unit, and the old one would answer the manager.
                if m.process is not None:
                    self._stop(m, kill=True)
                    self._clean_shm()
                self._enter(m, 'stopped', time.monotonic())
                retried.append(m.unit.node)
        again = f'; retrying {", ".join(retried)}' if retried else ''
        starting = self.goal != 'active'
        if starting:
            self._set_goal('active')
        response.message = ('bringing up ' + self._everything() if starting else
                            'already started') + again
        if starting or retried:
            self.get_logger().info(f'startup requested: {response.message}')
        return response

    def _on_shutdown(self, _request, response):
        """~/shutdown: stop the agents, then deactivate, clean up and shut down every node in
        reverse order. A finalized node comes back only as a new process (launch's respawn)."""
        response.success = True
        self._set_goal('finalized')
        response.message = 'shutting down ' + self._everything()
        self.get_logger().info(f'shutdown requested: {response.message}')
        return response

    def _on_pause(self, _request, response):
        """~/pause: deactivate the agents, then every node in reverse order."""
        response.success = self.goal in ('active', 'inactive')
        if response.success:
            self._set_goal('inactive')
            response.message = 'pausing ' + self._everything()
            self.get_logger().info(f'pause requested: {response.message}')
        else:
            response.message = f'nothing to pause (goal: {self.goal or "not started"})'
        return response

    def _on_resume(self, _request, response):
        """~/resume: activate every node in order, then the agents."""
        response.success = self.goal in ('inactive', 'active')
        if response.success:
            self._set_goal('active')
            response.message = 'resuming ' + self._everything()
            self.get_logger().info(f'resume requested: {response.message}')
        else:
            response.message = f'not paused (goal: {self.goal or "not started"}); use ~/startup'
        return response

    def _on_reset(self, _request, response):
        """~/reset: stop the agents, deactivate and clean up every node in reverse order
        (back to unconfigured; ~/startup brings everything up again)."""
        response.success = True
        self._set_goal('unconfigured')
        response.message = 'resetting ' + self._everything()
        self.get_logger().info(f'reset requested: {response.message}')
        return response

    def _on_is_active(self, _request, response):
        """~/is_active: true once every managed node and agent is active."""
        nodes = sum(n.state == 'active' and not n.busy for n in self.core.nodes)
        agents = sum(m.phase == 'running' and not m.paused and m.pause_future is None
                     for m in self.managed)
        response.success = self.goal == 'active' and nodes == len(self.core.nodes) and \
            agents == len(self.managed)
        response.message = f'{nodes}/{len(self.core.nodes)} nodes active, ' \
            f'{agents}/{len(self.managed)} agent hosts running' + (
                '; not started: call ~/startup (autostart is false)' if self.goal is None else
                f'; goal: {self.goal}' if self.goal != 'active' else '')
        for n in self.core.nodes:
            health, reason = self.core.health(n.name)
            if health not in ('ok',):
                response.message += f'; {n.name} {health}: {reason}'
        return response

    # -- the managed nodes ----------------------------------------------------------------------
    def _poll_nodes(self) -> None:
        """Ask every node its lifecycle state; a call unanswered for heartbeat_timeout_s is
        dropped (its server died) and asked again."""
        GetState = self._types[1]
        now = time.monotonic()
        for name, c in self.lifecycle_clients.items():
            if c.poll is not None:
                future, asked = c.poll
                if not future.done() and now - asked < self.params['heartbeat_timeout_s']:
                    continue
                if not future.done():
                    c.get_state.remove_pending_request(future)
                c.poll = None
            if not c.get_state.service_is_ready():
                continue
            future = c.get_state.call_async(GetState.Request())
            c.poll = (future, now)
            future.add_done_callback(lambda f, name=name, asked=now: self._on_state(name, f, asked))

    def _on_state(self, name: str, future, asked: float) -> None:
        c = self.lifecycle_clients[name]
        if c.poll is not None and c.poll[0] is future:
            c.poll = None
        try:
            result = future.result()
        except Exception:  # noqa: BLE001 - a cancelled or failed call: no answer
            return
        if result is not None:
            self.core.answered(name, str(result.current_state.label)[:64], asked)
            self._log_events()

    def _drive_nodes(self) -> None:
        ChangeState = self._types[0]
        from lifecycle_msgs.msg import Transition
        descending = self.goal in ('inactive', 'unconfigured', 'finalized')
        for name, label in self.core.transitions(hold_descent=descending and
                                                 not self._agents_down()):
            c = self.lifecycle_clients[name]
            if c.transition is not None and not c.transition[0].done():
                c.change_state.remove_pending_request(c.transition[0])
            future = c.change_state.call_async(ChangeState.Request(
                transition=Transition(id=_TRANSITION_IDS[label])))
            c.transition = (future, label)
            future.add_done_callback(lambda f, name=name, label=label:
                                     self._on_transition(name, label, f))
        self._log_events()

    def _log_events(self) -> None:
        """What the core said, logged at once (rclpy wants one severity per call site)."""
        log = self.get_logger()
        for _name, kind, text in self.core.take_events():
            if kind in ('lost', 'back'):   # its process may have died: a respawn is a new one
                self._clean_shm()
            if kind == 'gave_up':
                log.error(text)
            elif kind == 'lost':
                log.warning(text)
            else:
                log.info(text)

    def _on_transition(self, name: str, label: str, future) -> None:
        try:
            result = future.result()
        except Exception:  # noqa: BLE001 - cancelled: the core has timed it out already
            return
        self.core.transition_done(name, label, bool(result and result.success),
                                  '' if result and result.success else
                                  f'see the log of {name}')
        self._log_events()

    # -- agents: bring-up, pause, stop, restarts ----------------------------------------------
    def _agents_down(self) -> bool:
        """The agents are where a descending goal wants them (nodes wait for that)."""
        if self.goal == 'inactive':
            return all(m.phase != 'running' or (m.paused and m.pause_future is None)
                       for m in self.managed)
        return all(m.phase in ('stopped', 'failed') for m in self.managed)

    def _tick(self) -> None:
        if self.goal is None:
            return
        if not self.params['spawn']:
            self._take_local_beats()
        self._drive_nodes()
        now = time.monotonic()
        if self.goal == 'active':
            self._agents_up(now)
        elif self.goal == 'inactive':
            self._agents_pause(now, pause=True)
        else:
            self._agents_stop(now)

    def _agents_up(self, now: float) -> None:
        nodes_up = self.core.all_active()
        bringing_up = nodes_up   # initial bring-up is in order: nodes first, one unit at a time
        for m in self.managed:
            if m.phase in ('running', 'failed'):
                if m.phase == 'running':
                    self._resume(m)
                    self._watch(m, now)
                continue
            if m.phase in ('stopping', 'stopped'):   # after a shutdown or reset: start again
                self._finish_stop(m, now)
                if m.phase == 'stopping':
                    bringing_up = False
                    continue
                self._enter(m, 'spawn', -1e9)
            if bringing_up or (m.unit.restarts and nodes_up):
                self._advance(m, now)
            if m.unit.up_since_s is None and not m.unit.restarts:
                bringing_up = False

    def _resume(self, m: _Managed) -> None:
        """Activate an agent ~/pause deactivated."""
        self._agents_pause(time.monotonic(), pause=False, only=m)

    def _agents_pause(self, now: float, pause: bool, only: _Managed | None = None) -> None:
        ChangeState = self._types[0]
        from lifecycle_msgs.msg import Transition
        for m in [only] if only else reversed(self.managed):
            if m.phase == 'running' and only is None:
                self._watch(m, now)
            if m.phase != 'running':
                continue
            if m.pause_future is not None:
                if not m.pause_future.done():
                    continue
                result, m.pause_future = m.pause_future.result(), None
                if result is None or not result.success:
                    self._restart(m, f'{m.unit.node}: '
                                  f'{"deactivate" if m.paused else "activate"} failed')
                    continue
            if m.paused != pause:
                m.paused = pause
                m.pause_future = m.change_state.call_async(ChangeState.Request(
                    transition=Transition(id=Transition.TRANSITION_DEACTIVATE if pause else
                                          Transition.TRANSITION_ACTIVATE)))

    def _agents_stop(self, now: float) -> None:
        """Shutdown or reset: the agents this manager spawned are stopped (SIGINT: they commit
        their state on the way out, SIGKILL after AGENT_STOP_S); agents it did not spawn get
        their lifecycle shutdown transition."""
        ChangeState = self._types[0]
        from lifecycle_msgs.msg import Transition
        for m in reversed(self.managed):
            if m.phase in ('stopped', 'failed'):
                continue
            if m.phase == 'stopping':
                self._finish_stop(m, now)
                continue
            self.get_logger().info(f'stopping {m.unit.node}')
            m.unit.up_since_s, m.paused, m.pause_future = None, False, None
            if m.process is not None:
                m.process.send_signal(signal.SIGINT)
            elif m.change_state is not None and m.phase == 'running':
                m.future = m.change_state.call_async(ChangeState.Request(
                    transition=Transition(id=Transition.TRANSITION_ACTIVE_SHUTDOWN)))
            self._enter(m, 'stopping', now)

    def _finish_stop(self, m: _Managed, now: float) -> None:
        if m.phase != 'stopping':
            return
        if m.process is not None:
            if m.process.running and now - m.phase_since < AGENT_STOP_S:
                return
            m.process.stop(timeout_s=0)   # SIGKILL whatever is left of its group
            m.process = None
        elif m.future is not None and not m.future.done() and \
                now - m.phase_since < self.params['transition_timeout_s']:
            return
        m.future = None
        self._enter(m, 'stopped', now)
        self.get_logger().info(f'{m.unit.node} stopped')

    def _advance(self, m: _Managed, now: float) -> None:
        ChangeState, GetState = self._types[:2]
        from lifecycle_msgs.msg import Transition
        timeout = self.params['transition_timeout_s']
        if m.phase == 'spawn':
            if now - m.phase_since < self.policy.backoff_s(m.unit.restarts):
                return   # back off more after each restart
            if self.params['spawn']:
                m.key, m.beat_seen = secrets.token_bytes(32), False
                for agent in m.unit.agents:
                    self.auth.forget(agent)
                m.process = self._spawn(m.unit, m.key)
            if m.change_state is None:
                m.change_state = self.create_client(ChangeState, f'{m.unit.node}/change_state')
                m.get_state = self.create_client(GetState, f'{m.unit.node}/get_state')
            m.paused, m.pause_future = False, None
            self._enter(m, 'wait_services', now)
        elif m.phase == 'wait_services':
            # A process we started must beat first: a killed predecessor's services linger in
            # discovery and would swallow the request.
            if (m.process is None or m.beat_seen) and \
                    m.change_state.service_is_ready():
                m.future = m.change_state.call_async(ChangeState.Request(
                    transition=Transition(id=Transition.TRANSITION_CONFIGURE)))
                self._enter(m, 'configuring', now)
        elif m.phase in ('configuring', 'activating') and not m.future.done():
            self._settle(m, now)
        if m.phase in ('configuring', 'activating') and m.future.done():
            result = m.future.result()
            if result is None or not result.success:
                self._give_up(m, f'{m.unit.node}: {m.phase[:-3]}e transition failed '
                              '(see the agent log: a bad config, behavior or state)')
            elif m.phase == 'configuring':
                m.future = m.change_state.call_async(ChangeState.Request(
                    transition=Transition(id=Transition.TRANSITION_ACTIVATE)))
                self._enter(m, 'activating', now)
            else:
                self.supervisor.activated(m.unit, now)
                self._enter(m, 'running', now)
                self.get_logger().info(f'{m.unit.node} is active ({", ".join(m.unit.agents)})'
                                       + (f' after restart {m.unit.restarts}'
                                          if m.unit.restarts else ''))
        if m.phase not in ('running', 'failed') and now - m.phase_since > timeout:
            self._restart(m, f'{m.unit.node} stuck in {m.phase} for {timeout:.0f} s')
        elif m.process is not None and not m.process.running and \
                m.phase not in ('running', 'failed'):
            self._restart(m, f'{m.unit.node} {m.process.exit_reason()} during bring-up')

    def _watch(self, m: _Managed, now: float) -> None:
        if self.supervisor.settled(m.unit, now, self.policy.stable_after_s):
            self.get_logger().info(f'{m.unit.node} ran {self.policy.stable_after_s:g} s '
                                   'without failing: its restarts start again from 0')
        alive = None if m.process is None else m.process.running
        for agent in m.unit.agents:
            verdict = self.supervisor.verdict(agent, now, alive)
            if self.supervisor.needs_restart(verdict):
                reason = verdict.reason
                if m.process is not None and not alive:
                    reason = f'its process {m.process.exit_reason()}'
                self._restart(m, f'agent {agent} {verdict.health.value}: {reason}')
                return

    def _clean_shm(self) -> None:
        if self.janitor is not None:
            self.janitor.request()

    def _restart(self, m: _Managed, reason: str) -> None:
        self.get_logger().warning(f'{reason}; restarting {m.unit.node}')
        self._stop(m, kill=True)
        self._clean_shm()   # the killed process's shared memory
        if self.supervisor.restarting(m.unit, reason):
            self._enter(m, 'spawn', time.monotonic())
        else:
            self._give_up(m, m.unit.failed_reason)

    def _give_up(self, m: _Managed, reason: str) -> None:
        m.unit.failed_reason = m.unit.failed_reason or reason
        m.unit.up_since_s = None
        self.get_logger().error(f'{m.unit.node} failed: {m.unit.failed_reason}')
        self._enter(m, 'failed', time.monotonic())

    def _enter(self, m: _Managed, phase: str, now: float) -> None:
        m.phase, m.phase_since = phase, now
        if m.settle is not None and m.settle[0] is not None and not m.settle[0].done():
            m.get_state.remove_pending_request(m.settle[0])
        m.settle = None

    def _settle(self, m: _Managed, now: float) -> None:
        """A configure or activate sent once and unanswered for SETTLE_S: its answer may be
        lost (a new client's reply reader not yet matched by the server: bus/replies.py), so
        get_state, safe to repeat, is asked; a state asked after the request and already the
        transition's target means it happened, and the phase goes on as if answered."""
        if now - m.phase_since < SETTLE_S or m.get_state is None:
            return
        if m.settle is not None:
            future, asked = m.settle
            if future is not None and future.done():
                m.settle = (None, asked)   # asked again SETTLE_S after the last ask
                state = future.result()
                target = AFTER['configure' if m.phase == 'configuring' else 'activate']
                if state is not None and state.current_state.label == target:
                    m.change_state.remove_pending_request(m.future)
                    self.get_logger().info(f'{m.unit.node}: {m.phase[:-3]}e took effect; its '
                                           'answer was lost or late, get_state says so')
                    m.future = _answered(self._types[0].Response(success=True))
                return
            if now - asked < SETTLE_S:
                return
            if future is not None:
                m.get_state.remove_pending_request(future)
        m.settle = (m.get_state.call_async(self._types[1].Request()), now)

    def _spawn(self, unit: Unit, key: bytes) -> Process:
        name = unit.node
        args = [*entry.command('loom_ros.agents.agent_node'), '--ros-args',
                '-r', f'__node:={name}', '-r', f'__ns:={self.get_namespace()}']
        if self.params['agent_params_file']:
            args += ['--params-file', self.params['agent_params_file']]
        settings = {'autostart': False, 'storage': {'root': str(self.layout.root)},
                    'agents_file': self.params['agents_file'] or str(config_dir() / 'agents.yaml')}
        if len(unit.agents) == 1:
            settings['agent_id'] = unit.agents[0]
        else:
            settings['agents'] = ','.join(unit.agents)
        # A params file of its own, given last: later files win, so a user's params file cannot
        # override what the manager decides (a plain -p would lose to its node section).
        fq_name = f'{self.get_namespace().rstrip("/")}/{name}'
        own = os.path.join(self.layout.root, 'manager', f'{name}.params.yaml')
        os.makedirs(os.path.dirname(own), exist_ok=True)
        with open(own, 'w', encoding='utf-8') as f:
            yaml.safe_dump({fq_name: {'ros__parameters': settings}}, f)
        args += ['--params-file', own]
        # Ends with the manager, even by SIGKILL (death signal); its stderr still reaches ours
        # and its last lines are kept for the reason of a crash. The heartbeat secret goes in
        # the child's environment only: never argv (ps shows it) nor a topic.
        env = {**os.environ, KEY_ENV: key.hex()}
        return Process(args, name=name, env=env, echo_stderr=sys.stderr,
                       stacks_signal=STACKS_SIGNAL).start()   # run_node answers it

    def _stop(self, m: _Managed, kill: bool) -> None:
        process, m.process = m.process, None
        if process is not None:
            process.stop(timeout_s=10.0, signum=signal.SIGKILL if kill else signal.SIGINT)

    # -- heartbeats and reports ---------------------------------------------------------------
    def _on_beat(self, msg, local: bool = False) -> None:
        """Take a beat only when signed with the key of the process the agent runs in now (a
        killed predecessor's last beats and anything forged fail that) and not a replay. For an
        agent in this process (`local`), the topic's copies are only checked for forgery."""
        managed = self._managed_of.get(msg.agent_id)
        if managed is None:
            self.auth.rejected['unknown_agent'] += 1
            return
        copy = not local and msg.agent_id in managed.local_seen
        reason = self.auth.check(managed.key, msg, copy=copy)
        if reason == 'copy':
            return
        if reason is not None:
            self.get_logger().warning(
                f'heartbeat for agent {msg.agent_id} dropped ({reason}); '
                f'{sum(self.auth.rejected.values())} dropped so far', throttle_duration_sec=5.0)
            return
        managed.beat_seen = True
        self.last_status[msg.agent_id] = msg
        self.supervisor.beat(Beat(msg.agent_id, msg.pid, msg.lifecycle, msg.busy_ms,
                                  time.monotonic(), msg.mailbox_depth, msg.mailbox_size,
                                  msg.persist_failed, msg.reason))

    def _take_local_beats(self) -> None:
        """Agent nodes in this process: their beats straight from memory, not the topic."""
        for m in self.managed:
            node = f'{self.get_namespace().rstrip("/")}/{m.unit.node}'
            for agent in m.unit.agents:
                msg = LOCAL_BEATS.latest(node, agent)
                if msg is not None and m.local_seen.get(agent) != (msg.incarnation, msg.seq):
                    m.local_seen[agent] = (msg.incarnation, msg.seq)
                    if not self.auth.taken(msg):   # its topic copy may have come first
                        self._on_beat(msg, local=True)

    def _report(self) -> None:
        from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
        AgentStatus, DiagnosticArray = self._types[2:]
        now = time.monotonic()
        stamp = self.get_clock().now().to_msg()
        diag = DiagnosticArray()
        diag.header.stamp = stamp
        for name in self.lifecycle_clients:
            diag.status.append(self._node_status(name))
        for m in self.managed:
            alive = None if m.process is None else m.process.running
            for agent in m.unit.agents:
                verdict = self.supervisor.verdict(agent, now, alive)
                if m.phase in ('stopping', 'stopped'):
                    verdict.health, verdict.reason = Health.STOPPED, f'{m.phase} on request ' \
                        f'(goal {self.goal})'
                elif m.phase not in ('running', 'failed') and m.unit.restarts:
                    verdict.health = Health.RESTARTING
                last = self.last_status.get(agent)
                msg = AgentStatus() if last is None or m.unit.up_since_s is None else last
                msg.header.stamp = stamp
                msg.agent_id, msg.node = agent, msg.node or m.unit.node
                msg.health, msg.restarts, msg.reason = verdict.health.value, m.unit.restarts, \
                    verdict.reason
                self.status_pub.publish(msg)
                level, message = self._level(verdict, msg)
                diag.status.append(DiagnosticStatus(
                    level=level, name=f'loom/agents/{agent}', hardware_id=m.unit.node,
                    message=message, values=[KeyValue(key=k, value=str(v)) for k, v in (
                        ('health', msg.health), ('lifecycle', msg.lifecycle or '?'),
                        ('restarts', msg.restarts), ('handled', msg.handled),
                        ('behavior_errors', msg.behavior_errors),
                        ('mailbox', f'{msg.mailbox_depth}/{msg.mailbox_size}'),
                        ('mailbox_dropped', msg.mailbox_dropped),
                        ('dispatch_p99_us', f'{msg.dispatch_p99_us:.0f}'),
                        ('heartbeats_rejected', self.auth.by_agent[agent]))]))
        self.diag_pub.publish(diag)

    def _node_status(self, name: str):
        """A managed node's /diagnostics entry: ERROR when dead or given up on."""
        from diagnostic_msgs.msg import DiagnosticStatus as D, KeyValue
        n = self.core.node(name)
        health, reason = self.core.health(name)
        level = D.ERROR if health in ('dead', 'failed') else D.OK if health == 'ok' else D.WARN
        return D(level=level, name=f'loom/nodes/{name}', hardware_id=name,
                 message=f'{health}: {reason}' if reason else health,
                 values=[KeyValue(key=k, value=str(v)) for k, v in (
                     ('health', health), ('lifecycle', n.state), ('goal', self.goal or 'none'),
                     ('restarts', n.restarts.total), ('last_error', n.last_error))])

    @staticmethod
    def _level(verdict, msg) -> tuple[bytes, str]:
        from diagnostic_msgs.msg import DiagnosticStatus as D
        if verdict.health in (Health.DEAD, Health.HUNG, Health.FAILED):
            return D.ERROR, f'{verdict.health.value}: {verdict.reason}'
        if verdict.health is Health.STOPPED:
            return D.OK, f'{verdict.health.value}: {verdict.reason}'
        if verdict.health in (Health.STARTING, Health.RESTARTING):
            return D.WARN, f'{verdict.health.value}: {verdict.reason or "being brought up"}'
        if msg.lifecycle != 'active':
            return D.WARN, f'{msg.lifecycle}: {verdict.reason}'
        if msg.mailbox_size and msg.mailbox_depth >= 0.8 * msg.mailbox_size:
            return D.WARN, (f'mailbox near full ({msg.mailbox_depth}/{msg.mailbox_size}): the '
                            'behavior is slower than its input; add workers or backpressure')
        return D.OK, 'active'

    def on_exit(self) -> None:
        """On the way out (run_node's finalize): the agents it started end with it, each
        SIGINT and its own bound (they commit first)."""
        for m in getattr(self, 'managed', ()):
            self._stop(m, kill=False)

    def destroy_node(self) -> None:
        self.on_exit()   # nothing left to stop when run_node already called it
        super().destroy_node()


def main(args=None):
    run_node(LifecycleManagerNode, args)


if __name__ == '__main__':
    main()
