"""The lifecycle manager's pure core (bringup.manager_core) on an injected clock: bring-up in
order, pause/reset/shutdown in reverse order, a silent node declared dead, a respawned node
brought up again after a backoff, and a give-up after max_restarts."""
import pytest

from loom_ros.bringup.manager_core import ManagerCore
from loom_ros.bringup.processes import RestartPolicy


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def core(clock, names=('router', 'plugin_host', 'zenoh_bridge'), max_restarts=2):
    return ManagerCore(list(names), clock, heartbeat_timeout_s=2.0, transition_timeout_s=5.0,
                       policy=RestartPolicy(max_restarts=max_restarts, initial_backoff_s=1.0,
                                            max_backoff_s=4.0, stable_after_s=60.0))


def run(c, states):
    """Play the nodes: every asked transition succeeds and changes `states`; returns the
    (node, transition) list in the order asked."""
    from loom_ros.bringup.manager_core import AFTER
    asked = []
    for _ in range(50):
        for name, state in states.items():
            c.answered(name, state)
        todo = c.transitions()
        if not todo:
            break
        for name, step in todo:
            asked.append((name, step))
            states[name] = AFTER[step]
            c.transition_done(name, step, True)
    return asked


def test_nothing_happens_before_a_goal_then_bring_up_is_in_order():
    clock = Clock()
    c = core(clock)
    states = dict.fromkeys(('router', 'plugin_host', 'zenoh_bridge'), 'unconfigured')
    assert run(c, states) == [] and not c.at_goal()
    assert c.health('router') == ('ok', 'unconfigured; not started (autostart is false)')
    c.set_goal('active')
    assert run(c, states) == [('router', 'configure'), ('router', 'activate'),
                              ('plugin_host', 'configure'), ('plugin_host', 'activate'),
                              ('zenoh_bridge', 'configure'), ('zenoh_bridge', 'activate')]
    assert c.at_goal() and c.all_active()
    assert [c.health(n)[0] for n in states] == ['ok'] * 3


def test_a_node_not_yet_answering_holds_the_ones_after_it():
    clock = Clock()
    c = core(clock)
    c.set_goal('active')
    c.answered('plugin_host', 'unconfigured')
    assert c.transitions() == []          # the router has not answered yet
    assert c.health('router') == ('starting', 'waiting for its lifecycle services')
    c.answered('router', 'unconfigured')
    assert c.transitions() == [('router', 'configure')]
    assert c.transitions() == []          # one at a time: the configure is in flight


def test_a_transition_whose_answer_is_lost_is_settled_by_a_later_get_state():
    """DDS's reply-matching race can lose a ChangeState answer (loom_ros/bus/replies.py). A
    get_state asked after the transition went out that says its target state settles it; one
    asked before it, or saying another state, does not; a late real answer changes nothing."""
    clock = Clock()
    c = core(clock)
    c.set_goal('active')
    c.answered('router', 'unconfigured')
    assert c.transitions() == [('router', 'configure')]
    sent = clock.now
    clock.now += 0.5
    c.answered('router', 'inactive', asked_s=sent - 0.1)   # asked before: says nothing
    c.answered('router', 'unconfigured', asked_s=sent + 0.1)   # not there (yet): in flight
    assert c.transitions() == []
    c.answered('router', 'inactive', asked_s=sent + 0.2)
    assert c.health('router')[0] != 'failed' and c.transitions() == [('router', 'activate')]
    c.transition_done('router', 'configure', True)   # the lost answer, late: ignored
    assert c.transitions() == []   # the activate is in flight
    events = [text for _n, _kind, text in c.take_events()]
    assert any('configure: get_state says inactive before its answer' in t
               for t in events), events


def test_pause_reset_and_shutdown_go_in_reverse_order():
    clock = Clock()
    c = core(clock)
    states = dict.fromkeys(('router', 'plugin_host', 'zenoh_bridge'), 'unconfigured')
    c.set_goal('active')
    run(c, states)
    c.set_goal('inactive')
    assert run(c, states) == [('zenoh_bridge', 'deactivate'), ('plugin_host', 'deactivate'),
                              ('router', 'deactivate')]
    assert c.at_goal() and not c.all_active()
    c.set_goal('active')   # resume
    assert run(c, states) == [('router', 'activate'), ('plugin_host', 'activate'),
                              ('zenoh_bridge', 'activate')]
    c.set_goal('unconfigured')   # reset
    assert run(c, states)[:2] == [('zenoh_bridge', 'deactivate'), ('zenoh_bridge', 'cleanup')]
    assert set(states.values()) == {'unconfigured'}
    c.set_goal('active')
    run(c, states)
    c.set_goal('finalized')
    asked = run(c, states)
    assert asked[:3] == [('zenoh_bridge', 'deactivate'), ('zenoh_bridge', 'cleanup'),
                         ('zenoh_bridge', 'shutdown')]
    assert asked[-1] == ('router', 'shutdown') and set(states.values()) == {'finalized'}
    assert c.at_goal()
    # A respawned process after the shutdown is left alone (no shutdown loop with respawn)...
    states['router'] = 'unconfigured'
    assert run(c, states) == [] and c.at_goal()
    # ...until a startup, which brings it up; a finalized node waits for its respawn.
    c.set_goal('active')
    assert run(c, states) == [('router', 'configure'), ('router', 'activate')]
    assert c.health('plugin_host') == ('starting', 'finalized: only a new process (a respawn) '
                                       'can be brought up')
    states['plugin_host'] = 'unconfigured'
    assert run(c, states)[0] == ('plugin_host', 'configure')
    c.set_goal('inactive')   # and a later pause takes it down again
    assert ('router', 'deactivate') in run(c, states)


def test_descent_waits_while_the_caller_holds_it():
    clock = Clock()
    c = core(clock, names=('router',))
    states = {'router': 'unconfigured'}
    c.set_goal('active')
    run(c, states)
    c.set_goal('inactive')
    c.answered('router', 'active')
    assert c.transitions(hold_descent=True) == []   # the agents are not down yet
    assert c.transitions() == [('router', 'deactivate')]


def test_a_silent_node_is_dead_then_brought_up_again_when_respawned():
    clock = Clock()
    c = core(clock)
    states = dict.fromkeys(('router', 'plugin_host', 'zenoh_bridge'), 'unconfigured')
    c.set_goal('active')
    run(c, states)
    clock.now += 1.9
    for name in ('router', 'zenoh_bridge'):
        c.answered(name, 'active')
    assert c.transitions() == [] and c.health('plugin_host')[0] == 'ok'
    clock.now += 0.2     # 2.1 s without an answer from plugin_host
    c.check()
    health, reason = c.health('plugin_host')
    assert health == 'dead' and 'no answer to get_state for 2.1 s' in reason
    assert not c.all_active()
    # Launch respawns it: it answers unconfigured; it is brought up after the backoff (1 s).
    c.answered('plugin_host', 'unconfigured')
    assert c.health('plugin_host')[0] == 'restarting'
    assert c.transitions() == []
    clock.now += 1.0
    for name in ('router', 'zenoh_bridge'):
        c.answered(name, 'active')
    assert c.transitions() == [('plugin_host', 'configure')]
    c.transition_done('plugin_host', 'configure', True)
    assert c.transitions() == [('plugin_host', 'activate')]
    c.transition_done('plugin_host', 'activate', True)
    assert c.all_active() and c.node('plugin_host').restarts.total == 1


def test_a_fast_respawn_seen_unconfigured_counts_as_a_restart():
    clock = Clock()
    c = core(clock, names=('router',))
    states = {'router': 'unconfigured'}
    c.set_goal('active')
    run(c, states)
    c.answered('router', 'unconfigured')     # within the heartbeat timeout: never silent
    assert c.node('router').restarts.count == 1
    assert 'found unconfigured' in c.health('router')[1]
    clock.now += 1.0
    assert c.transitions() == [('router', 'configure')]


def test_an_answer_to_a_poll_sent_before_a_transition_is_not_taken_as_the_state():
    clock = Clock()
    c = core(clock, names=('router',))
    c.set_goal('active')
    c.answered('router', 'unconfigured')
    asked = clock.now
    assert c.transitions() == [('router', 'configure')]
    clock.now += 0.1
    c.transition_done('router', 'configure', True)
    c.answered('router', 'unconfigured', asked_s=asked)   # late answer to the older poll
    assert c.node('router').state == 'inactive'
    assert c.transitions() == [('router', 'activate')]


def test_failures_back_off_exponentially_then_the_core_gives_up():
    clock = Clock()
    c = core(clock, names=('router', 'plugin_host'), max_restarts=2)
    c.set_goal('active')
    c.answered('plugin_host', 'unconfigured')
    waits = []
    for attempt in range(3):
        c.answered('router', 'unconfigured')
        start = clock.now
        while not c.transitions():
            clock.now += 0.25
            c.answered('router', 'unconfigured')
            assert clock.now - start < 10
        waits.append(clock.now - start)
        c.transition_done('router', 'configure', False, 'bad config')
    assert waits == [0.0, 1.0, 2.0]
    health, reason = c.health('router')
    assert health == 'failed' and 'configure failed: bad config; gave up after 2 restarts' in reason
    c.answered('router', 'unconfigured')
    assert c.transitions() == []   # given up: and it holds the nodes after it
    c.set_goal('active')           # an operator's startup tries again
    assert c.transitions() == [('router', 'configure')]


def test_a_long_configure_is_not_taken_for_a_dead_node():
    # A plugin host loading models answers no get_state until its on_configure returns.
    clock = Clock()
    c = core(clock, names=('plugin_host',))
    c.set_goal('active')
    c.answered('plugin_host', 'unconfigured')
    assert c.transitions() == [('plugin_host', 'configure')]
    clock.now += 4.9   # silent for more than heartbeat_timeout_s, less than transition_timeout_s
    c.no_answer('plugin_host')
    assert c.transitions() == [] and c.health('plugin_host')[0] == 'starting'
    c.transition_done('plugin_host', 'configure', True)
    assert c.transitions() == [('plugin_host', 'activate')]
    assert c.node('plugin_host').restarts.total == 0


def test_a_transition_without_an_answer_times_out_and_counts():
    clock = Clock()
    c = core(clock, names=('router',))
    c.set_goal('active')
    c.answered('router', 'unconfigured')
    assert c.transitions() == [('router', 'configure')]
    clock.now += 1.9
    c.answered('router', 'configuring')
    clock.now += 1.9
    c.answered('router', 'configuring')
    clock.now += 1.3   # 5.1 s in flight
    assert c.transitions() == []
    assert 'configure got no answer in 5 s' in c.node('router').last_error
    c.transition_done('router', 'configure', True)   # too late: ignored
    assert c.node('router').state == 'unknown'


def test_names_must_be_unique_and_goals_known():
    with pytest.raises(ValueError):
        ManagerCore(['router', 'router'], Clock())
    with pytest.raises(ValueError):
        ManagerCore(['router'], Clock()).set_goal('up')
