"""What the lifecycle manager concludes from heartbeats, without ROS: which agent is ok, starting,
dead, hung or failed, and which process to restart. Pure and clock-injected, so every verdict
is testable without waiting.

A unit is one agent process (one agent, or a group hosted together). Verdicts per agent:
- starting: its unit is being brought up (spawned, configured, activated) or restarted;
- dead:     its process exited, or no heartbeat for `heartbeat_timeout_s`;
- hung:     heartbeats come but its handler has been busy longer than `hang_timeout_s`
            (a stuck behavior), or they stop while the process is still alive;
- failed:   restarted `max_restarts` times already; the manager stops trying;
- stopped:  taken down on request (the manager's ~/shutdown or ~/reset; set by the manager);
- ok:       active and beating. WARN-worthy load (mailbox near full) is a diagnostics matter.

Heartbeats travel on a public topic, so anyone on the DDS domain can publish one. BeatAuth makes
them unforgeable from outside the supervised process: the manager gives each process a random
secret (in its environment, never on a topic or in argv; in-process agents share the process's
own), every beat carries an HMAC over its fields, its node's incarnation and a rising seq, and
the manager drops (and counts) beats that fail it or replay an old seq. Pids on the topic are
never acted on: the manager signals only processes it started itself.
"""
from __future__ import annotations

import hmac
import os
import secrets
import struct
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from enum import Enum

KEY_ENV = 'LOOM_HEARTBEAT_KEY'   # hex secret a manager hands the agent process it spawns
MAX_FIELD_CHARS = 4096           # longer strings in a beat are refused before any hashing


def take_env_key(environ=os.environ) -> bytes | None:
    """The secret a spawning manager put in the environment, removed from it so that processes
    this one starts (plugins) do not inherit it; None when absent or unreadable."""
    value = environ.pop(KEY_ENV, None)
    try:
        return bytes.fromhex(value) if value and len(value) <= 256 else None
    except ValueError:
        return None


# Taken once, at import, so every node of the process (agents and a manager with spawn: false,
# as in loom bringup) signs and verifies with the same secret; random when none was given, so
# nothing outside the process can know it.
_PROCESS_KEY = take_env_key() or secrets.token_bytes(32)


def process_key() -> bytes:
    """This process's heartbeat secret (the manager's, when it spawned this process)."""
    return _PROCESS_KEY


def _f32(value: float) -> bytes:
    """A float32 field as the wire carries it, so both ends hash the same bytes."""
    return struct.pack('<f', float(value))


def beat_digest(key: bytes, msg) -> str:
    """HMAC-SHA256 (hex) over every field of an AgentStatus heartbeat the manager reads."""
    parts = [str(msg.agent_id).encode(), str(msg.node).encode(),
             struct.pack('<QQI', msg.incarnation, msg.seq, msg.pid),
             str(msg.lifecycle).encode(), _f32(msg.busy_ms),
             struct.pack('<QQQQIIQ', msg.events, msg.handled, msg.behavior_errors,
                         msg.persist_failed, msg.mailbox_depth, msg.mailbox_size,
                         msg.mailbox_dropped),
             _f32(msg.dispatch_p50_us), _f32(msg.dispatch_p99_us), str(msg.reason).encode()]
    # length-prefixed: no two field lists hash alike; one call (a host of 1,000 agents signs
    # 1,000 beats a second on its executor's thread)
    return hmac.digest(key, b''.join(struct.pack('<I', len(part)) + part for part in parts),
                       'sha256').hex()


class BeatSigner:
    """The agent node's side: one incarnation per node, a seq per beat, the HMAC in `auth`."""

    def __init__(self, key: bytes):
        self.key = key
        self.incarnation = secrets.randbits(63) or 1
        self.seq = 0

    def sign(self, msg):
        self.seq += 1
        msg.incarnation, msg.seq = self.incarnation, self.seq
        msg.auth = beat_digest(self.key, msg)
        return msg


class LocalBeats:
    """The latest signed beat of each agent node in this process, handed to a manager in the same
    process (spawn: false, loom bringup) directly: a flood on the public topic can then neither
    forge nor crowd out its agents' liveness. Bounded by the agents the process hosts."""

    def __init__(self):
        self._latest: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    def post(self, node: str, msg) -> None:
        with self._lock:
            self._latest[(node, msg.agent_id)] = msg

    def latest(self, node: str, agent_id: str):
        with self._lock:
            return self._latest.get((node, agent_id))


LOCAL_BEATS = LocalBeats()


class BeatAuth:
    """The manager's side: which beats to believe. `check` returns None for a beat to take, or
    the reason it is dropped (also counted in `rejected`)."""

    RETIRED_MEMORY = 64   # incarnations per agent remembered as over (their beats are replays)

    def __init__(self):
        self.rejected: Counter = Counter()      # reason -> beats dropped
        self.copies = 0   # authentic topic copies of beats already taken in-process (not hostile)
        self.by_agent: Counter = Counter()      # agent id -> beats dropped
        self._last: dict[str, tuple[int, int]] = {}    # agent -> (incarnation, seq) taken
        self._retired: dict[str, OrderedDict] = {}

    def check(self, key: bytes | None, msg, copy: bool = False) -> str | None:
        """`copy`: the beat was already taken in-process; an authentic one is only counted as a
        copy (returns 'copy'), a forged one as what it is."""
        reason = self._forged(key, msg)
        if reason is None and copy:
            self.copies += 1
            return 'copy'
        if reason is None:
            reason = self._replayed(msg)
        if reason is not None:
            self.rejected[reason] += 1
            self.by_agent[str(msg.agent_id)[:64]] += 1
        return reason

    def taken(self, msg) -> bool:
        """Whether this beat (or a later one of its incarnation) was already taken."""
        last = self._last.get(msg.agent_id)
        return last is not None and last[0] == msg.incarnation and msg.seq <= last[1]

    def forget(self, agent_id: str) -> None:
        """A new process for the agent (a new secret): its first beat starts a new record."""
        last = self._last.pop(agent_id, None)
        if last is not None:
            self._retire(agent_id, last[0])

    def _forged(self, key, msg) -> str | None:
        if key is None:
            return 'no_key'   # nothing to verify with: an unverifiable beat is not believed
        if any(len(str(getattr(msg, f))) > MAX_FIELD_CHARS
               for f in ('agent_id', 'node', 'lifecycle', 'reason', 'auth')):
            return 'oversize'
        auth = str(msg.auth)
        # compare_digest raises TypeError for a str holding non-ASCII: such a beat would escape
        # as a callback error, uncounted, with a traceback logged for each one sent
        if not auth.isascii() or not hmac.compare_digest(auth, beat_digest(key, msg)):
            return 'bad_auth'
        return None

    def _replayed(self, msg) -> str | None:
        agent, incarnation, seq = msg.agent_id, msg.incarnation, msg.seq
        if incarnation in self._retired.get(agent, ()):
            return 'replay'
        last = self._last.get(agent)
        if last is not None and last[0] == incarnation and seq <= last[1]:
            return 'replay'
        if last is not None and last[0] != incarnation:
            self._retire(agent, last[0])   # the node was replaced in this process
        self._last[agent] = (incarnation, seq)
        return None

    def _retire(self, agent_id: str, incarnation: int) -> None:
        retired = self._retired.setdefault(agent_id, OrderedDict())
        retired[incarnation] = None
        while len(retired) > self.RETIRED_MEMORY:
            retired.popitem(last=False)


class Health(str, Enum):
    OK = 'ok'
    STARTING = 'starting'
    DEAD = 'dead'
    HUNG = 'hung'
    RESTARTING = 'restarting'
    FAILED = 'failed'
    STOPPED = 'stopped'    # taken down on request (the manager's ~/shutdown or ~/reset)


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

    def retry(self, unit: Unit) -> bool:
        """An operator's fresh start (~/startup) for a unit given up on: its restarts start
        again from 0. Whether it had failed."""
        if not unit.failed:
            return False
        unit.failed_reason, unit.restarts, unit.up_since_s = '', 0, None
        unit.beats.clear()
        return True

    def settled(self, unit: Unit, now_s: float, stable_after_s: float) -> bool:
        """A unit up for `stable_after_s` since its last restart has its restarts forgotten
        (as nodes have: processes.Restarts), so one that hangs once a day is not given up on
        after max_restarts days. Whether it forgot some now."""
        if unit.restarts and unit.up_since_s is not None and \
                now_s - unit.up_since_s >= stable_after_s:
            unit.restarts = 0
            return True
        return False

    def restarting(self, unit: Unit, reason: str) -> bool:
        """Record a restart; False (and the unit marked failed) once max_restarts is reached."""
        unit.up_since_s = None
        if unit.restarts >= self.max_restarts:
            unit.failed_reason = f'{reason}; gave up after {unit.restarts} restarts'
            return False
        unit.restarts += 1
        return True
