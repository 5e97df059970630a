"""The agents' lifecycle manager: brings the configured agents up in order (configure, then
activate, one process after the other), watches each through its heartbeats, restarts a dead or
hung agent (its state comes back from SQLite on configure), and reports every agent's health on
loom/agents/status (AgentStatus) and /diagnostics (DiagnosticArray).

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
import secrets
import signal
import subprocess
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
from loom_ros.bringup.processes import die_with_parent
from loom_ros.config.params import ConfigError, ParamSpec, config_dir, declare_parameters
from loom_ros.telemetry.logs import mask_node_logger

PARAMETERS = [
    ParamSpec('agents_file', "Agents YAML; '' means the shipped config/agents.yaml",
              read_only=True),
    ParamSpec('agents', "Agents to manage in bring-up order: comma-separated ids, '*' for the "
              'file order', read_only=True),
    ParamSpec('groups', "Agents hosted together in one process: ';'-separated groups of "
              "comma-separated ids ('' = one process per agent)", read_only=True),
    ParamSpec('spawn', 'Start the agent processes (true) or manage nodes started elsewhere',
              read_only=True),
    ParamSpec('autostart', 'Bring the agents up as soon as the manager starts', read_only=True),
    ParamSpec('state_dir', "Folder of the agents' SQLite state (passed to spawned agents)",
              read_only=True),
    ParamSpec('agent_params_file', "ROS params file given to spawned agents ('' = none)",
              read_only=True),
    ParamSpec('heartbeat_timeout_s', 'No heartbeat for this long: dead (or hung if its process '
              'still runs)', min_value=0.1),
    ParamSpec('hang_timeout_s', 'A handler busy for longer than this: hung', min_value=0.1),
    ParamSpec('max_restarts', 'Restarts per process before it is marked failed', min_value=0),
    ParamSpec('transition_timeout_s', 'Longest wait for a lifecycle service or transition',
              min_value=1.0),
    ParamSpec('status_period_s', 'Seconds between loom/agents/status and /diagnostics reports',
              min_value=0.05),
]


class _Managed:
    """A unit plus what the manager does with it: its process, clients, and bring-up phase."""

    def __init__(self, unit: Unit):
        self.unit = unit
        self.process: subprocess.Popen | None = None
        self.phase = 'spawn'      # spawn, wait_services, configuring, activating, running, failed
        self.phase_since = 0.0
        self.future = None
        self.change_state = self.get_state = None
        self.key: bytes | None = None   # the secret its beats are signed with
        self.beat_seen = False          # a verified beat from the current process came
        self.local_seen: dict[str, tuple[int, int]] = {}   # agent -> in-process beat taken


class LifecycleManagerNode(Node):

    def __init__(self, **kwargs):
        super().__init__('lifecycle_manager', **kwargs)
        mask_node_logger(self)   # every log line masked from the first (issue 13, fault 10)
        self.params = declare_parameters(self, 'lifecycle_manager', PARAMETERS)
        from diagnostic_msgs.msg import DiagnosticArray
        from lifecycle_msgs.srv import ChangeState, GetState
        from loom_msgs.msg import AgentStatus
        self._types = (ChangeState, GetState, AgentStatus, DiagnosticArray)
        self.managed = [_Managed(u) for u in self._units()]
        self._managed_of = {a: m for m in self.managed for a in m.unit.agents}
        p = self.params
        self.supervisor = Supervisor([m.unit for m in self.managed], p['heartbeat_timeout_s'],
                                     p['hang_timeout_s'], int(p['max_restarts']))
        self.last_status: dict[str, object] = {}
        self.auth = BeatAuth()
        if not p['spawn']:   # agents in this process (loom bringup), or given the same key
            for m in self.managed:
                m.key = process_key()
        qos = to_qos_profile(QosLevel.BACKGROUND)
        self.create_subscription(AgentStatus, topics.AGENTS_HEARTBEAT, self._on_beat, qos)
        self.status_pub = self.create_publisher(AgentStatus, topics.AGENTS_STATUS, qos)
        self.diag_pub = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS, 10)
        self.started = bool(p['autostart'])
        # Nav2's manager services, the two a caller needs to drive `autostart: false`.
        from std_srvs.srv import Trigger
        self.create_service(Trigger, '~/startup', self._on_startup)
        self.create_service(Trigger, '~/is_active', self._on_is_active)
        self.create_timer(0.1, self._tick)
        self.create_timer(p['status_period_s'], self._report)
        self.get_logger().info('managing ' + '; '.join(
            f'{m.unit.node} ({", ".join(m.unit.agents)})' for m in self.managed))

    def _units(self) -> list[Unit]:
        path = self.params['agents_file'] or str(config_dir() / 'agents.yaml')
        try:
            configs = load_agents(path)
        except AgentConfigError as exc:
            raise ConfigError(str(exc)) from None
        spec = self.params['agents'].strip()
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
    def _on_startup(self, _request, response):
        """~/startup: bring the agents up in order (what autostart does at start)."""
        response.success = True
        if self.started:
            response.message = 'already started'
            return response
        self.started = True
        response.message = 'bringing up ' + ', '.join(m.unit.node for m in self.managed)
        self.get_logger().info(f'startup requested: {response.message}')
        return response

    def _on_is_active(self, _request, response):
        """~/is_active: true once every managed node is running."""
        running = sum(m.phase == 'running' for m in self.managed)
        response.success = self.started and running == len(self.managed)
        response.message = f'{running}/{len(self.managed)} running' + (
            '' if self.started else '; not started: call ~/startup (autostart is false)')
        return response

    # -- bring-up and restarts ----------------------------------------------------------------
    def _tick(self) -> None:
        if not self.started:
            return
        if not self.params['spawn']:
            self._take_local_beats()
        now = time.monotonic()
        bringing_up = True   # initial bring-up is in order: one unit at a time
        for m in self.managed:
            if m.phase in ('running', 'failed'):
                if m.phase == 'running':
                    self._watch(m, now)
                continue
            if bringing_up or m.unit.restarts:
                self._advance(m, now)
            if m.unit.up_since_s is None and not m.unit.restarts:
                bringing_up = False

    def _advance(self, m: _Managed, now: float) -> None:
        ChangeState, GetState = self._types[:2]
        from lifecycle_msgs.msg import Transition
        timeout = self.params['transition_timeout_s']
        if m.phase == 'spawn':
            if now - m.phase_since < min(5.0, 0.5 * m.unit.restarts):
                return   # back off a little more after each restart
            if self.params['spawn']:
                m.key, m.beat_seen = secrets.token_bytes(32), False
                for agent in m.unit.agents:
                    self.auth.forget(agent)
                m.process = self._spawn(m.unit, m.key)
            if m.change_state is None:
                m.change_state = self.create_client(ChangeState, f'{m.unit.node}/change_state')
                m.get_state = self.create_client(GetState, f'{m.unit.node}/get_state')
            self._enter(m, 'wait_services', now)
        elif m.phase == 'wait_services':
            # A process we started must beat first: a killed predecessor's services linger in
            # discovery and would swallow the request.
            if (m.process is None or m.beat_seen) and \
                    m.change_state.service_is_ready():
                m.future = m.change_state.call_async(ChangeState.Request(
                    transition=Transition(id=Transition.TRANSITION_CONFIGURE)))
                self._enter(m, 'configuring', now)
        elif m.phase in ('configuring', 'activating') and m.future.done():
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
        elif m.process is not None and m.process.poll() is not None and \
                m.phase not in ('running', 'failed'):
            self._restart(m, f'{m.unit.node} exited with {m.process.returncode} during bring-up')

    def _watch(self, m: _Managed, now: float) -> None:
        alive = None if m.process is None else m.process.poll() is None
        for agent in m.unit.agents:
            verdict = self.supervisor.verdict(agent, now, alive)
            if self.supervisor.needs_restart(verdict):
                self._restart(m, f'agent {agent} {verdict.health.value}: {verdict.reason}')
                return

    def _restart(self, m: _Managed, reason: str) -> None:
        self.get_logger().warning(f'{reason}; restarting {m.unit.node}')
        self._stop(m, kill=True)
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

    def _spawn(self, unit: Unit, key: bytes) -> subprocess.Popen:
        name = unit.node
        args = [sys.executable, '-m', 'loom_ros.agents.agent_node', '--ros-args',
                '-r', f'__node:={name}', '-r', f'__ns:={self.get_namespace()}']
        if self.params['agent_params_file']:
            args += ['--params-file', self.params['agent_params_file']]
        settings = {'autostart': False, 'state_dir': self.params['state_dir'],
                    'agents_file': self.params['agents_file'] or str(config_dir() / 'agents.yaml')}
        if len(unit.agents) == 1:
            settings['agent_id'] = unit.agents[0]
        else:
            settings['agents'] = ','.join(unit.agents)
        # A params file of its own, given last: later files win, so a user's params file cannot
        # override what the manager decides (a plain -p would lose to its node section).
        fq_name = f'{self.get_namespace().rstrip("/")}/{name}'
        own = os.path.join(os.path.expanduser(self.params['state_dir']), 'manager',
                           f'{name}.params.yaml')
        os.makedirs(os.path.dirname(own), exist_ok=True)
        with open(own, 'w', encoding='utf-8') as f:
            yaml.safe_dump({fq_name: {'ros__parameters': settings}}, f)
        args += ['--params-file', own]
        # Ends with the manager, even by SIGKILL (Linux PR_SET_PDEATHSIG).
        # The heartbeat secret goes in the child's environment only: never argv (ps shows it)
        # nor a topic.
        env = {**os.environ, KEY_ENV: key.hex()}
        return subprocess.Popen(args, start_new_session=True, preexec_fn=die_with_parent(),
                                env=env)

    def _stop(self, m: _Managed, kill: bool) -> None:
        process, m.process = m.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGINT)
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass

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
        for m in self.managed:
            alive = None if m.process is None else m.process.poll() is None
            for agent in m.unit.agents:
                verdict = self.supervisor.verdict(agent, now, alive)
                if m.phase not in ('running', 'failed') and m.unit.restarts:
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

    @staticmethod
    def _level(verdict, msg) -> tuple[bytes, str]:
        from diagnostic_msgs.msg import DiagnosticStatus as D
        if verdict.health in (Health.DEAD, Health.HUNG, Health.FAILED):
            return D.ERROR, f'{verdict.health.value}: {verdict.reason}'
        if verdict.health in (Health.STARTING, Health.RESTARTING):
            return D.WARN, f'{verdict.health.value}: {verdict.reason or "being brought up"}'
        if msg.lifecycle != 'active':
            return D.WARN, f'{msg.lifecycle}: {verdict.reason}'
        if msg.mailbox_size and msg.mailbox_depth >= 0.8 * msg.mailbox_size:
            return D.WARN, (f'mailbox near full ({msg.mailbox_depth}/{msg.mailbox_size}): the '
                            'behavior is slower than its input; add workers or backpressure')
        return D.OK, 'active'

    def destroy_node(self) -> None:
        for m in self.managed:   # agents this manager started end with it
            self._stop(m, kill=False)
        super().destroy_node()


def main(args=None):
    run_node(LifecycleManagerNode, args)


if __name__ == '__main__':
    main()
