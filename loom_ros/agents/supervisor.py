"""What the lifecycle manager concludes from heartbeats, without ROS: which agent is ok, starting,
dead, hung or failed, and which process to restart. Pure and clock-injected, so every verdict
is testable without waiting.

A unit is one agent process (one agent, or a group hosted together). Verdicts per agent:
- starting: its unit is being brought up (spawned, configured, activated) or restarted;
- dead:     its process exited, or no heartbeat for `heartbeat_timeout_s`;
- hung:     heartbeats come but its handler has been busy longer than `hang_timeout_s`
            (a stuck behavior), or they stop while the process is still alive;
- failed:   restarted `max_restarts` times already; the manager stops trying;
- ok:       active and beating. WARN-worthy load (mailbox near full) is a diagnostics matter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Health(str, Enum):
    OK = 'ok'
    STARTING = 'starting'
    DEAD = 'dead'
    HUNG = 'hung'
    RESTARTING = 'restarting'
    FAILED = 'failed'


@dataclass
class Beat:
    """The part of an AgentStatus heartbeat the verdicts need."""

    agent_id: str
    pid: int
    lifecycle: str
    busy_ms: float
    received_s: float
    mailbox_depth: int = 0
    mailbox_size: int = 0
    persist_failed: int = 0
    reason: str = ''


@dataclass
class Unit:
    """One managed process: its node name, the agents it hosts, and how it is doing."""

    node: str
    agents: tuple[str, ...]
    restarts: int = 0
    up_since_s: float | None = None      # when it was last activated (None: not up)
    failed_reason: str = ''
    beats: dict[str, Beat] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.failed_reason)


@dataclass
class Verdict:
    agent_id: str
    unit: Unit
    health: Health
    reason: str = ''


class Supervisor:
    def __init__(self, units: list[Unit], heartbeat_timeout_s: float = 4.0,
                 hang_timeout_s: float = 4.0, max_restarts: int = 5):
        self.units = units
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.hang_timeout_s = hang_timeout_s
        self.max_restarts = max_restarts
        self._unit_of = {a: u for u in units for a in u.agents}

    def unit_of(self, agent_id: str) -> Unit | None:
        return self._unit_of.get(agent_id)

    def beat(self, beat: Beat) -> None:
        unit = self._unit_of.get(beat.agent_id)
        if unit is not None:
            unit.beats[beat.agent_id] = beat

    def activated(self, unit: Unit, now_s: float) -> None:
        unit.up_since_s = now_s
        unit.beats.clear()  # beats from before the restart say nothing about the new process

    def verdict(self, agent_id: str, now_s: float, process_alive: bool | None = None) -> Verdict:
        """`process_alive`: None when the manager did not start the process (cannot tell)."""
        unit = self._unit_of[agent_id]
        if unit.failed:
            return Verdict(agent_id, unit, Health.FAILED, unit.failed_reason)
        if unit.up_since_s is None:
            return Verdict(agent_id, unit, Health.STARTING, 'being brought up')
        if process_alive is False:
            return Verdict(agent_id, unit, Health.DEAD, 'its process exited')
        beat = unit.beats.get(agent_id)
        last = beat.received_s if beat else unit.up_since_s
        if now_s - last > self.heartbeat_timeout_s:
            if process_alive:
                return Verdict(agent_id, unit, Health.HUNG,
                               f'no heartbeat for {now_s - last:.1f} s while its process runs')
            return Verdict(agent_id, unit, Health.DEAD, f'no heartbeat for {now_s - last:.1f} s')
        if beat is None:
            return Verdict(agent_id, unit, Health.STARTING, 'waiting for its first heartbeat')
        if beat.busy_ms > self.hang_timeout_s * 1000:
            return Verdict(agent_id, unit, Health.HUNG,
                           f'its handler has been busy for {beat.busy_ms / 1000:.1f} s')
        if beat.lifecycle != 'active':
            reason = beat.reason or f'lifecycle state {beat.lifecycle}'
            return Verdict(agent_id, unit, Health.FAILED if beat.persist_failed else Health.OK,
                           reason)
        return Verdict(agent_id, unit, Health.OK)

    def needs_restart(self, verdict: Verdict) -> bool:
        return verdict.health in (Health.DEAD, Health.HUNG)

    def restarting(self, unit: Unit, reason: str) -> bool:
        """Record a restart; False (and the unit marked failed) once max_restarts is reached."""
        unit.up_since_s = None
        if unit.restarts >= self.max_restarts:
            unit.failed_reason = f'{reason}; gave up after {unit.restarts} restarts'
            return False
        unit.restarts += 1
        return True
