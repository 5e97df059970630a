"""The agent runtime without ROS: the shared dispatcher keeps each agent's events in order and
handles each once, whatever the number of workers; deactivate handles accepted mail before it
commits; and the supervisor's verdicts from heartbeats, with an injected clock."""
import threading
import time

import pytest

from loom_ros.agents.config import AgentConfig
from loom_ros.agents.runtime import Agent, AgentState, Dispatcher
from loom_ros.agents.supervisor import Beat, Health, Supervisor, Unit
from loom_ros.bus.event import Event
from loom_ros.storage.storage import Storage, StorageConfig


def wait_until(condition, what, limit=60.0):
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f'timed out waiting for {what}')
        time.sleep(0.001)


@pytest.fixture
def storage(tmp_path):
    """The agents' host storage: one unit database, as an agent node opens it."""
    with Storage(StorageConfig(str(tmp_path), unit='host')) as opened:
        yield opened


def make_agents(storage, n, **config):
    emitted = []
    lock = threading.Lock()

    def emit(agent_id, kind, type, data, privacy):
        with lock:
            emitted.append((agent_id, kind, type, data))
    agents = [Agent(AgentConfig(id=f'a{i}', behavior='counter', subscriptions=['t'],
                                settings={'intent_every': 10}, **config), storage, emit)
              for i in range(n)]
    for agent in agents:
        agent.configure()
        agent.activate()
    return agents, emitted


@pytest.mark.parametrize('workers', [0, 1, 3])
def test_dispatcher_keeps_each_agents_order_and_handles_every_event_once(storage, workers):
    agents, emitted = make_agents(storage, 8)
    dispatcher = Dispatcher(workers)
    try:
        for i in range(200):
            for agent in agents:
                dispatcher.deliver(agent, Event(type='tick', id=f'{agent.id}-{i}'))
        # Handled = committed: the workers do not wait for the writer, the acknowledgement does.
        wait_until(lambda: all(a.stats['handled'] == 200 for a in agents), 'all events handled')
    finally:
        dispatcher.close()
    for agent in agents:
        assert agent.state['total'] == 200 and agent.state['last_id'] == f'{agent.id}-199'
        assert agent.acked_events == 200
        assert storage.agent_state.load(agent.id) == (agent.state, 200)
        order = [e['event_id'] for e in agent.episodic.query(limit=1000)]
        assert order == [f'{agent.id}-{i}' for i in range(200)]   # each once, in order
        assert len(agent.dispatch_us) == 200
        agent.cleanup()
    intents = [e for e in emitted if e[1] == 'intent']
    assert len(intents) == 8 * 20   # every 10th event of each agent


def test_agents_fed_from_several_threads_at_once_handle_every_event_once_in_each_order(storage):
    """Four threads deliver to the same agents at the same time while three workers serve
    them: an agent is queued once however many threads find it idle (its claim), so every
    event is handled once and each thread's events keep their order."""
    import threading
    agents, _emitted = make_agents(storage, 8)
    dispatcher = Dispatcher(3)
    start = threading.Barrier(4)

    def feed(k: int) -> None:
        start.wait()
        for i in range(100):
            for agent in agents:
                dispatcher.deliver(agent, Event(type='tick', id=f'{agent.id}-t{k}-{i}'))
    feeders = [threading.Thread(target=feed, args=(k,)) for k in range(4)]
    try:
        for thread in feeders:
            thread.start()
        for thread in feeders:
            thread.join()
        wait_until(lambda: all(a.stats['handled'] == 400 for a in agents), 'all events handled')
    finally:
        dispatcher.close()
    for agent in agents:
        assert agent.state['total'] == 400 and agent.acked_events == 400
        seen = [e['event_id'] for e in agent.episodic.query(limit=1000)]
        assert len(seen) == len(set(seen)) == 400
        for k in range(4):
            assert [e for e in seen if f'-t{k}-' in e] == \
                [f'{agent.id}-t{k}-{i}' for i in range(100)]
        agent.cleanup()


def test_a_busy_worker_gets_no_wake_up_per_delivery_and_then_serves_them_all(storage):
    """While the only worker is held in a handler, deliveries queue their agents without
    putting a wake-up each (one per event would pile up for as long as it is busy); once free
    it serves every queued agent."""
    agents, _emitted = make_agents(storage, 50)
    entered, release = threading.Event(), threading.Event()

    class Gate:
        def handle(self, event, ctx):
            entered.set()
            release.wait(60.0)
    agents[0].behavior = Gate()
    dispatcher = Dispatcher(1)
    try:
        dispatcher.deliver(agents[0], Event(type='tick', id='held'))
        wait_until(entered.is_set, 'the worker in the held handler')
        for i in range(20):
            for agent in agents[1:]:
                dispatcher.deliver(agent, Event(type='tick', id=f'{agent.id}-{i}'))
        assert [wake.qsize() for wake in dispatcher._wakes] == [0]
        release.set()
        wait_until(lambda: agents[0].stats['handled'] == 1 and
                   all(a.stats['handled'] == 20 for a in agents[1:]), 'every event handled')
    finally:
        release.set()
        dispatcher.close()
    for agent in agents:
        agent.cleanup()


def test_deactivate_handles_accepted_mail_then_commits_and_refuses_more(storage):
    (agent,), _ = make_agents(storage, 1)
    for i in range(50):   # accepted, but no dispatcher has run them yet
        assert agent.offer(Event(type='tick', id=f'e{i}'))
    agent.deactivate()
    assert agent.lifecycle is AgentState.INACTIVE and agent.stats['handled'] == 50
    assert not agent.offer(Event(type='tick', id='late')) and agent.stats['refused_inactive'] == 1
    agent.cleanup()
    state, events = storage.agent_state.load('a0')
    assert events == 50 and state['last_id'] == 'e49'


def test_interval_persistence_commits_on_flush(storage):
    (agent,), _ = make_agents(storage, 1, persist='interval', persist_interval_s=3600.0)
    agent.offer(Event(type='tick', id='only'))
    agent.handle_one()
    storage.flush()
    assert storage.agent_state.load('a0')[1] == 0   # not due yet
    assert agent.stats['handled'] == 0 and [e['event_id'] for e in agent.episodic.query()] == \
        ['only']   # a handler already sees the episode waiting for its commit
    agent._last_commit -= 3600.0
    agent.flush_if_due()
    storage.flush()
    assert storage.agent_state.load('a0')[1] == 1 and agent.stats['handled'] == 1
    agent.cleanup()


def beat(agent_id, at, busy_ms=0.0, lifecycle='active', persist_failed=0):
    return Beat(agent_id, 1, lifecycle, busy_ms, at, persist_failed=persist_failed)


def test_supervisor_verdicts():
    unit = Unit('agent_a', ('a',))
    sup = Supervisor([unit], heartbeat_timeout_s=4.0, hang_timeout_s=2.0, max_restarts=1)
    assert sup.verdict('a', 0.0).health is Health.STARTING
    sup.activated(unit, 10.0)
    assert sup.verdict('a', 11.0).health is Health.STARTING      # no beat yet, within timeout
    assert sup.verdict('a', 14.5, process_alive=None).health is Health.DEAD
    assert sup.verdict('a', 14.5, process_alive=True).health is Health.HUNG
    assert sup.verdict('a', 11.0, process_alive=False).health is Health.DEAD
    sup.beat(beat('a', 12.0))
    assert sup.verdict('a', 13.0).health is Health.OK
    sup.beat(beat('a', 13.0, busy_ms=2500.0))
    hung = sup.verdict('a', 13.1)
    assert hung.health is Health.HUNG and 'busy for 2.5 s' in hung.reason
    sup.beat(beat('a', 13.2, lifecycle='inactive', persist_failed=1))
    assert sup.verdict('a', 13.3).health is Health.FAILED
    assert sup.needs_restart(hung)
    assert sup.restarting(unit, 'hung') and unit.restarts == 1
    assert not sup.restarting(unit, 'hung again') and unit.failed
    assert sup.verdict('a', 20.0).health is Health.FAILED
    assert 'gave up after 1 restarts' in sup.verdict('a', 20.0).reason
    # An operator's fresh start retries it from 0 restarts (it stayed failed for good).
    assert sup.retry(unit) and not unit.failed and unit.restarts == 0
    assert not sup.retry(unit)                                   # not failed: nothing to do
    assert sup.verdict('a', 21.0).health is Health.STARTING


def test_supervisor_forgets_restarts_after_a_stable_run():
    """As nodes do: an agent that hangs once a day is not given up on after max_restarts
    days. Up for stable_after_s since its last activation, its restarts start again."""
    unit = Unit('agent_a', ('a',))
    sup = Supervisor([unit], heartbeat_timeout_s=4.0, hang_timeout_s=2.0, max_restarts=1)
    assert sup.restarting(unit, 'hung') and unit.restarts == 1
    assert not sup.settled(unit, 100.0, 60.0)                    # not up yet
    sup.activated(unit, 100.0)
    assert not sup.settled(unit, 159.9, 60.0) and unit.restarts == 1
    assert sup.settled(unit, 160.0, 60.0) and unit.restarts == 0
    assert not sup.settled(unit, 500.0, 60.0)                    # nothing left to forget
    assert sup.restarting(unit, 'hung the next day') and not unit.failed


@pytest.mark.parametrize('workers', [0, 1, 3])
def test_deliver_all_puts_one_event_in_every_mailbox_and_keeps_each_agents_order(storage,
                                                                                 workers):
    """A topic several hosted agents follow (one shared bus subscription): each agent gets every
    event once, in order, and an agent that is not active refuses it (counted)."""
    agents, _ = make_agents(storage, 5)
    agents[4].deactivate()
    dispatcher = Dispatcher(workers)
    try:
        for i in range(50):
            dispatcher.deliver_all(agents, Event(type='tick', id=f'e{i}'))
        wait_until(lambda: all(a.stats['handled'] == 50 for a in agents[:4]), 'all handled')
    finally:
        dispatcher.close()
    for agent in agents[:4]:
        assert agent.state['total'] == 50 and agent.state['last_id'] == 'e49'
    assert agents[4].stats['refused_inactive'] == 50 and agents[4].stats['handled'] == 0
    for agent in agents:
        agent.cleanup()


def test_deliver_all_goes_on_past_an_agent_whose_mailbox_raises(storage):
    """One agent that fails to take the event (counted as escaped) does not keep it from the
    agents after it, nor leave the ones before it with mail and no worker."""
    agents, _ = make_agents(storage, 3)

    def broken(event):
        raise RuntimeError('mailbox broke')
    agents[1].offer = broken
    dispatcher = Dispatcher(1)
    try:
        for i in range(5):
            dispatcher.deliver_all(agents, Event(type='tick', id=f'e{i}'))
        wait_until(lambda: agents[0].stats['handled'] == 5 and agents[2].stats['handled'] == 5,
                   'the other agents handled every event')
        assert dispatcher.errors == 5
    finally:
        dispatcher.close()
    assert agents[1].stats['handled'] == 0
    for agent in agents:
        agent.cleanup()


class SetsNonJson:
    """A behavior that records the event id, and on a `bad` event leaves a set (not JSON)."""

    def handle(self, event, ctx):
        ctx.state['last_id'] = event.id
        if event.type == 'bad':
            ctx.state['oops'] = {1, 2}


def test_an_interval_agent_counts_a_state_that_is_not_json_at_once(storage):
    """An agent that commits on an interval (its next commit can be an hour away) serializes
    right after the handler: the bad state is rolled back and counted before the next event."""
    (agent,), _ = make_agents(storage, 1, persist='interval', persist_interval_s=3600.0)
    agent.behavior = SetsNonJson()
    agent.offer(Event(type='ok', id='e0'))
    agent.handle_one()
    agent.offer(Event(type='bad', id='e1'))
    agent.handle_one()
    assert agent.stats['behavior_errors'] == 1 and agent.state == {'last_id': 'e0'}
    agent.cleanup()


@pytest.mark.parametrize('deferred', [False, True])
def test_a_state_that_is_not_json_is_a_behavior_error_rolled_back(storage, deferred):
    """The state is serialized once per event, before the agent's next handler or its commit
    (deferred: the dispatcher runs a burst's handlers before their commits): a value JSON cannot
    hold fails that event (rolled back, counted), not the agent's persistence."""
    (agent,), _ = make_agents(storage, 1)
    agent.behavior = SetsNonJson()
    for event in (Event(type='ok', id='e0'), Event(type='bad', id='e1'),
                  Event(type='ok', id='e2')):
        agent.offer(event)
        agent.handle_one(defer_commit=deferred)
    agent.commit_if_dirty()
    agent.settle()
    assert agent.stats['behavior_errors'] == 1 and agent.stats['handled'] == 2
    assert agent.persist_failed is None
    assert storage.agent_state.load('a0') == ({'last_id': 'e2'}, 3)
    agent.cleanup()


def test_an_exception_escaping_an_agent_does_not_kill_a_dispatcher_worker(storage):
    """What escapes handle_one (behavior errors are contained; here the error's own log call
    raises, as a node's logger did at shutdown) is counted and the worker serves the next agent:
    a dead worker would leave the node silently short of workers."""
    def broken_log(level, message):
        raise RuntimeError('the node is being torn down')
    broken = Agent(AgentConfig(id='broken', behavior='counter', subscriptions=['t']), storage,
                   lambda *a: None, log=broken_log)
    broken.configure()
    broken.activate()
    (fine,), _ = make_agents(storage, 1)
    dispatcher = Dispatcher(1)
    try:
        for i in range(3):
            dispatcher.deliver(broken, Event(type='fail.please', id=f'bad-{i}'))
        dispatcher.deliver(fine, Event(type='tick', id='after'))
        wait_until(lambda: fine.stats['handled'] == 1, 'the other agent served by the one worker')
        wait_until(lambda: dispatcher.errors >= 1, 'the escape counted')
    finally:
        dispatcher.close()


@pytest.mark.parametrize('aged', [False, True])
def test_a_burst_runs_every_handler_before_its_commits(storage, aged):
    """One worker, 20 agents, one event each, queued while the first handler waits: each later
    handler starts before the commits of those before it are submitted (a broadcast's 20th
    handler waits for 19 handlers, not 19 handlers and 19 commits); then every commit is
    submitted and acknowledged. The clock is injected: standing still, the age bound is out of
    the way (a0's handler waits on the gate while 19 events are delivered, and on a loaded
    machine that took longer than COMMIT_AFTER_S: a full parallel run failed so); `aged`, the
    6th handler moves it past COMMIT_AFTER_S, so the six handled go to the writer before the
    7th handler starts and the rest of the burst runs before its commits."""
    gate, seen, agents, now = threading.Event(), [], [], [0.0]

    class Probe:
        def setup(self, settings):
            pass

        def handle(self, event, ctx):
            if event.id == 'a0':
                assert gate.wait(60)
            seen.append(sum(a.commit_pending for a in agents))
            if aged and event.id == 'a5':
                now[0] += 2 * Dispatcher.COMMIT_AFTER_S
    installed = {'probe': type('EntryPoint', (), {'load': staticmethod(lambda: Probe)})()}
    agents.extend(Agent(AgentConfig(id=f'a{i}', behavior='probe', subscriptions=['t']), storage,
                        lambda *a: None, behaviors=installed) for i in range(20))
    for agent in agents:
        agent.configure()
        agent.activate()
    dispatcher = Dispatcher(1, clock=lambda: now[0])
    try:
        for agent in agents:
            dispatcher.deliver(agent, Event(type='tick', id=agent.id))
        gate.set()
        wait_until(lambda: all(a.stats['handled'] == 1 for a in agents), 'the burst handled')
    finally:
        dispatcher.close()
    assert seen == (list(range(6)) + list(range(14)) if aged else list(range(20)))
    assert not any(a.commit_pending for a in agents)
    for agent in agents:
        agent.settle()
        assert storage.agent_state.load(agent.id)[1] == 1
        agent.cleanup()


@pytest.mark.parametrize('workers', [0, 1])
def test_an_agent_that_always_has_mail_is_still_committed_as_it_goes(storage, workers):
    """The deferred commits go at the latest every COMMIT_EVERY handlers even when the ready
    queue never empties (one agent with twice that many events waiting): a handler after the
    COMMIT_EVERY-th starts with what came before already committed, not the whole backlog held
    uncommitted. The same inline (workers: 0), where the backlog is one agent's mailbox."""
    seen, agents = [], []
    n = 2 * Dispatcher.COMMIT_EVERY + 8

    class Probe:
        def setup(self, settings):
            pass

        def handle(self, event, ctx):
            seen.append(agents[0].commit_pending)
    installed = {'probe': type('EntryPoint', (), {'load': staticmethod(lambda: Probe)})()}
    agents.append(Agent(AgentConfig(id='busy', behavior='probe', subscriptions=['t'],
                                    mailbox_size=n), storage, lambda *a: None,
                        behaviors=installed))
    agents[0].configure()
    agents[0].activate()
    for i in range(n):   # all queued before the worker starts: its queue never empties
        agents[0].offer(Event(type='tick', id=f'e{i}'))
    dispatcher = Dispatcher(workers)
    try:
        dispatcher.schedule(agents[0])
        wait_until(lambda: agents[0].stats['handled'] == n, 'every event handled')
    finally:
        dispatcher.close()
    assert len(seen) == n and seen[0] is False
    committed_before = [i for i, pending in enumerate(seen) if i and not pending]
    assert committed_before and committed_before[0] <= Dispatcher.COMMIT_EVERY, seen
    agents[0].cleanup()


def test_commit_lag_counts_from_the_first_uncommitted_event_not_the_last_commit(storage,
                                                                               monkeypatch):
    """An agent idle for an hour, then handed one event whose commit is deferred, lags by
    the time since that event, not by the hour (that was a false ERROR on /diagnostics)."""
    import types

    from loom_ros.agents import runtime
    (agent,), _ = make_agents(storage, 1)
    now = [time.monotonic()]
    monkeypatch.setattr(runtime, 'time', types.SimpleNamespace(
        monotonic=lambda: now[0], monotonic_ns=time.monotonic_ns))
    now[0] += 3600.0            # idle for an hour since configure's commit
    agent.offer(Event(type='tick', id='late'))
    agent.handle_one(defer_commit=True)
    now[0] += 0.25
    assert agent.commit_pending and agent.commit_lag_s() == pytest.approx(0.25)
    agent.commit_if_dirty()
    agent.settle()
    assert not agent.commit_pending and agent.commit_lag_s() < 1.0
    agent.cleanup()
