"""What the lifecycle manager does next with the lifecycle nodes others start (router, plugin host,
Zenoh bridge, storage), decided without ROS from their answered states and a clock.

The manager polls each node's lifecycle state (get_state) and tells this core what came back;
the core says which transition to ask for, in order: bring-up (configure, activate) goes front to
back, one node after the other; pause, reset and shutdown go back to front (as Nav2's manager).
A node that has answered before and then gives no answer for `heartbeat_timeout_s` is dead; a
node found unconfigured after it was up was respawned (launch's respawn). Either way it counts as
a restart, and it is brought up again, after a backoff (RestartPolicy), while the goal is
`active`; its own on_configure restores its state. After `max_restarts` the core gives up on it.

Goals: None (not started: `autostart: false` until ~/startup), 'active' (startup, resume),
'inactive' (pause), 'unconfigured' (reset), 'finalized' (shutdown).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from loom_ros.bringup.processes import RestartPolicy, Restarts

STATES = ('unconfigured', 'inactive', 'active', 'finalized')
GOALS = ('active', 'inactive', 'unconfigured', 'finalized')
UNKNOWN = 'unknown'

# (state, goal) -> the transition that moves a node one step toward the goal.
_STEPS = {
    ('unconfigured', 'active'): 'configure', ('inactive', 'active'): 'activate',
    ('active', 'inactive'): 'deactivate',
    ('active', 'unconfigured'): 'deactivate', ('inactive', 'unconfigured'): 'cleanup',
    ('active', 'finalized'): 'deactivate', ('inactive', 'finalized'): 'cleanup',
    ('unconfigured', 'finalized'): 'shutdown',
}
# Where a successful transition leaves the node.
AFTER = {'configure': 'inactive', 'activate': 'active', 'deactivate': 'inactive',
         'cleanup': 'unconfigured', 'shutdown': 'finalized'}


def step_toward(state: str, goal: str | None) -> str | None:
    """The transition from `state` toward `goal`, None when there is none to take."""
    return _STEPS.get((state, goal)) if goal else None


@dataclass
class NodeView:
    """One managed node as the manager sees it."""

    name: str
    restarts: Restarts
    state: str = UNKNOWN          # its last answered lifecycle state
    answered_s: float | None = None
    seen: bool = False            # it answered at least once
    up: bool = False              # it reached active since it last (re)appeared
    dead: str = ''                # why it is considered dead ('' = it answers)
    busy: str = ''                # the transition in flight ('' = none)
    busy_since: float = 0.0
    changed_s: float = float('-inf')   # when our last transition of it ended
    shut_down: bool = False       # finalized by this manager's shutdown
    last_error: str = ''
    events: list = field(default_factory=list)   # (kind, text) not yet taken by the shell

    @property
    def failed(self) -> str:
        return self.restarts.gave_up


class ManagerCore:
    """Pure: feed it answers (answered, no_answer, transition_done) and ask it what to do
    (transitions). `clock` is injected (seconds, monotonic)."""

    def __init__(self, names: list[str], clock: Callable[[], float],
                 heartbeat_timeout_s: float = 4.0, transition_timeout_s: float = 30.0,
                 policy: RestartPolicy = RestartPolicy()):
        if len(set(names)) != len(names):
            raise ValueError(f'managed nodes listed twice: {names}')
        self.clock = clock
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.transition_timeout_s = transition_timeout_s
        self.nodes = [NodeView(n, Restarts(policy, clock)) for n in names]
        self._by_name = {n.name: n for n in self.nodes}
        self.goal: str | None = None

    def node(self, name: str) -> NodeView:
        return self._by_name[name]

    # -- what the caller asks -------------------------------------------------------------------
    def set_goal(self, goal: str | None) -> None:
        if goal is not None and goal not in GOALS:
            raise ValueError(f'goal must be one of {GOALS}, got {goal!r}')
        self.goal = goal
        if goal == 'active':   # a fresh startup forgets an earlier give-up and shutdown
            for n in self.nodes:
                n.shut_down = False
                if n.failed:
                    n.restarts.reset()

    # -- what the nodes said --------------------------------------------------------------------
    def answered(self, name: str, state: str, asked_s: float | None = None) -> None:
        """A get_state answer (one of STATES, or a transient state rclpy reports mid-transition)
        to a poll sent at `asked_s`. An answer to a poll sent before the last transition ended,
        or while one is in flight, proves the node alive but says nothing of its state now."""
        n, now = self._by_name[name], self.clock()
        if n.dead:
            self._say(n, 'back', f'{name} answers again ({state})')
            n.dead = ''
        n.answered_s, n.seen = now, True
        if n.busy and asked_s is not None and asked_s >= n.busy_since and \
                state == AFTER[n.busy]:
            # Asked after the transition went out, and already where it leads: it took effect
            # and its answer was lost (DDS's reply-matching race, loom_ros/bus/replies.py).
            self._say(n, 'transition', f'{name}: {n.busy}: get_state says {state} before '
                      'its answer came (lost or late)')
            self.transition_done(name, n.busy, True)
            return
        if n.busy or (asked_s is not None and asked_s < n.changed_s):
            return
        if n.up and state == 'unconfigured' and self.goal == 'active':
            # Up a moment ago, unconfigured now, and not by us: a respawned process.
            self._lost(n, 'found unconfigured (its process was restarted)')
        n.state = state
        n.up = state == 'active' or (n.up and state != 'unconfigured')

    def no_answer(self, name: str) -> None:
        """A get_state poll that got no answer (service gone, or the call timed out). A node in
        a transition is not judged by it: a single-threaded node answers nothing while its
        on_configure loads models; transition_timeout_s bounds that instead."""
        n, now = self._by_name[name], self.clock()
        if not n.seen or n.dead or n.busy:
            return
        if now - (n.answered_s or now) > self.heartbeat_timeout_s:
            self._lost(n, f'no answer to get_state for {now - n.answered_s:.1f} s')
            n.dead = n.last_error
            n.state = UNKNOWN
            n.busy = ''

    def transition_done(self, name: str, transition: str, ok: bool, why: str = '') -> None:
        n = self._by_name[name]
        if n.busy != transition:
            return   # a late answer to a call already given up on
        n.busy, n.changed_s = '', self.clock()
        if ok:
            n.state = AFTER[transition]
            n.answered_s = n.changed_s
            n.up = n.state == 'active'
            if n.up:
                n.restarts.started()   # up (again): its stable run starts now
            if transition == 'shutdown':
                n.shut_down = True
            self._say(n, 'transition', f'{name}: {transition} done, now {n.state}')
        else:
            n.state = UNKNOWN   # the next poll tells where the failure left it
            self._lost(n, f'{transition} failed' + (f': {why}' if why else ''))

    # -- what to do now -------------------------------------------------------------------------
    def check(self) -> None:
        """Time-driven verdicts: a transition in flight for longer than transition_timeout_s is
        given up on (and counted); a silent node becomes dead (see no_answer)."""
        now = self.clock()
        for n in self.nodes:
            if n.busy and now - n.busy_since > self.transition_timeout_s:
                busy, n.busy = n.busy, ''
                n.state = UNKNOWN
                self._lost(n, f'{busy} got no answer in {self.transition_timeout_s:g} s')
            if n.seen and not n.dead and not n.busy and n.answered_s is not None and \
                    now - n.answered_s > self.heartbeat_timeout_s:
                self.no_answer(n.name)

    def transitions(self, hold_descent: bool = False) -> list[tuple[str, str]]:
        """[(node, transition)] to ask for now; each is marked in flight until transition_done.
        Order: toward 'active' a node moves only once every node before it is active; toward
        the other goals only once every node after it is there (and not `hold_descent`: the
        caller's agents, which come after every node, are not down yet)."""
        self.check()
        goal = self.goal
        if goal is None:
            return []
        order = self.nodes if goal == 'active' else list(reversed(self.nodes))
        if goal != 'active' and hold_descent:
            return []
        out = []
        for n in order:
            if self._at_goal(n):
                continue
            if n.busy or n.failed or n.dead or not n.seen:
                break
            if goal == 'active' and n.restarts.next_at is not None and not n.restarts.due():
                break   # backing off before bringing a restarted node up again
            step = step_toward(n.state, goal)
            if step is None:
                break   # finalized, or a state mid-transition: wait for the next answer
            n.busy, n.busy_since = step, self.clock()
            out.append((n.name, step))
            break   # one node at a time, in order
        return out

    def _at_goal(self, n: NodeView) -> bool:
        goal = self.goal
        if goal == 'active':
            return n.state == 'active' and not n.busy
        if n.busy:
            return False
        if not n.seen or n.dead or n.state == 'finalized' or n.shut_down:
            return True   # nothing to take down
        if goal == 'inactive':
            return n.state in ('inactive', 'unconfigured')
        if goal == 'unconfigured':
            return n.state == 'unconfigured'
        return False   # finalized: only the shutdown transition gets it there

    def at_goal(self) -> bool:
        """Every node where the goal wants it (False before any goal)."""
        return self.goal is not None and all(self._at_goal(n) for n in self.nodes)

    def all_active(self) -> bool:
        return all(n.state == 'active' and not n.busy for n in self.nodes)

    # -- reports --------------------------------------------------------------------------------
    def health(self, name: str) -> tuple[str, str]:
        """(health, reason): ok, starting, dead, restarting, failed, or the goal's state."""
        n, now = self._by_name[name], self.clock()
        if n.failed:
            return 'failed', n.failed
        if n.dead:
            return 'dead', n.dead
        if not n.seen:
            return 'starting', 'waiting for its lifecycle services'
        if n.state == 'active':
            return 'ok', ''
        if n.state == 'finalized' and self.goal == 'active':
            return 'starting', 'finalized: only a new process (a respawn) can be brought up'
        if n.restarts.total and self.goal == 'active':
            return 'restarting', n.last_error
        if self.goal == 'active':
            return 'starting', n.busy or f'{n.state}, waiting for the nodes before it'
        return 'ok', n.state if self.goal else f'{n.state}; not started (autostart is false)'

    def take_events(self) -> list[tuple[str, str, str]]:
        """(node, kind, text) said since the last call: for the shell's log."""
        out = []
        for n in self.nodes:
            out += [(n.name, kind, text) for kind, text in n.events]
            n.events.clear()
        return out

    def _lost(self, n: NodeView, why: str) -> None:
        """A failure of `n`: counted against max_restarts (the core gives up past it)."""
        n.last_error, n.up = why, False
        if n.failed:
            return
        when = n.restarts.failed(why)
        self._say(n, 'gave_up' if when is None else 'lost',
                  f'{n.name} failed: {n.restarts.gave_up}' if when is None else
                  f'{n.name}: {why} (failure {n.restarts.count} of at most '
                  f'{n.restarts.policy.max_restarts} restarts)')

    def _say(self, n: NodeView, kind: str, text: str) -> None:
        if len(n.events) < 100:   # the shell takes them every tick; bounded regardless
            n.events.append((kind, text))
