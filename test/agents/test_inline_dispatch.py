"""`workers: 0`: an agent host whose handlers run on the thread that delivers the event (no
worker thread, no hand-over). Each agent's events still in order and each once, committed before
they count; what a handler delivers to agents of the same host queued behind it, not nested; an
escaping error counted while the next agent is served; and a behavior that would wait for a
service answer on that thread told so at once (the thread is the one that would deliver it)."""
import threading

import pytest

from loom_ros.agents.config import AgentConfig
from loom_ros.agents.flows.link import Gate
from loom_ros.agents.runtime import Agent, Dispatcher
from loom_ros.bus.event import Event, Privacy
from loom_ros.storage.storage import Storage, StorageConfig


@pytest.fixture
def storage(tmp_path):
    with Storage(StorageConfig(str(tmp_path), unit='host')) as opened:
        yield opened


def entry(behavior):
    return type('EntryPoint', (), {'load': staticmethod(lambda: behavior)})()


def agents_of(storage, behaviors, ids, emit=lambda *a: None):
    made = [Agent(AgentConfig(id=i, behavior='probe', subscriptions=['t']), storage, emit,
                  behaviors=behaviors) for i in ids]
    for agent in made:
        agent.configure()
        agent.activate()
    return made


def test_inline_handlers_run_on_the_delivering_thread_in_order_each_once_and_committed(storage):
    threads, seen = set(), []
    dispatcher = Dispatcher(0)

    class Probe:
        def setup(self, settings):
            pass

        def handle(self, event, ctx):
            threads.add(threading.get_ident())
            assert dispatcher.running_inline()
            seen.append((ctx.agent_id, event.id))
            ctx.state['last'] = event.id
    agents = agents_of(storage, {'probe': entry(Probe)}, ['a', 'b', 'c'])
    try:
        assert dispatcher.inline and not dispatcher.running_inline()
        for i in range(100):
            dispatcher.deliver_all(agents, Event(type='tick', id=f'e{i}'))
            # handled before deliver_all returned: all three, this event
            assert seen[-3:] == [(a.id, f'e{i}') for a in agents]
        for agent in agents:
            agent.settle()
            assert agent.stats['handled'] == 100 and agent.acked_events == 100
            assert storage.agent_state.load(agent.id) == ({'last': 'e99'}, 100)
            ids = [e['event_id'] for e in agent.episodic.query(limit=1000)]
            assert ids == [f'e{i}' for i in range(100)]
    finally:
        dispatcher.close()
    assert threads == {threading.get_ident()}
    assert not dispatcher.running_inline()
    for agent in agents:
        agent.cleanup()


def test_an_inline_broadcast_runs_every_handler_before_the_commits_then_submits_them(storage):
    """20 agents, one event: the k-th handler starts with k handled and not yet submitted (the
    last does not wait for 19 commits), and when deliver_all returns every commit is submitted."""
    seen, agents = [], []

    class Probe:
        def setup(self, settings):
            pass

        def handle(self, event, ctx):
            seen.append(sum(a.commit_pending for a in agents))
    agents.extend(agents_of(storage, {'probe': entry(Probe)}, [f'a{i}' for i in range(20)]))
    dispatcher = Dispatcher(0)
    try:
        dispatcher.deliver_all(agents, Event(type='tick', id='e0'))
        assert seen == list(range(20))
        assert not any(a.commit_pending for a in agents)
    finally:
        dispatcher.close()
    for agent in agents:
        agent.settle()
        assert agent.stats['handled'] == 1
        agent.cleanup()


def test_inline_emits_carry_the_handled_events_privacy_and_subject_and_nothing_after(storage):
    """Privacy travels on the delivering thread too: what the handler of alice's Private event
    emits is Private and hers, a behavior's request for less does not lower it, and the next
    event (Public, anonymous), handled on the same thread, is not held to alice's."""
    out = []

    class Asks:
        def setup(self, settings):
            pass

        def handle(self, event, ctx):
            ctx.intent('seen', {'id': event.id}, privacy=Privacy.PUBLIC)
    (agent,) = agents_of(storage, {'probe': entry(Asks)}, ['a'],
                         emit=lambda *args, **kw: out.append((args[2], args[4], kw)))
    dispatcher = Dispatcher(0)
    try:
        dispatcher.deliver(agent, Event(type='speech', id='p1', privacy=Privacy.PRIVATE,
                                        metadata={'loom.subject': 'person:alice'}))
        dispatcher.deliver(agent, Event(type='tick', id='q1'))
    finally:
        dispatcher.close()
    assert out == [('seen', Privacy.PRIVATE, {'subject': 'person:alice'}),
                   ('seen', Privacy.PUBLIC, {})]
    assert agent.stats['privacy_raised'] == 1
    agent.settle()
    agent.cleanup()


def test_a_negative_worker_count_is_refused():
    with pytest.raises(ValueError, match='workers must be 0'):
        Dispatcher(-1)


def test_what_a_handler_delivers_inline_is_queued_behind_it_not_nested(storage):
    """a's handler delivers to b (as an emit b follows would): b's handler runs after a's has
    returned, on the same thread, and b's own deliveries to c after that."""
    depth, order = [0], []
    dispatcher = Dispatcher(0)
    by_id: dict = {}

    class Relay:
        def setup(self, settings):
            pass

        def handle(self, event, ctx):
            depth[0] += 1
            order.append((ctx.agent_id, event.id, depth[0]))
            nxt = {'a': 'b', 'b': 'c'}.get(ctx.agent_id)
            if nxt is not None:
                dispatcher.deliver(by_id[nxt], Event(type='relay', id=f'{event.id}>{nxt}'))
                order.append((ctx.agent_id, 'delivered', depth[0]))
            depth[0] -= 1
    agents = agents_of(storage, {'probe': entry(Relay)}, ['a', 'b', 'c'])
    by_id.update({a.id: a for a in agents})
    try:
        dispatcher.deliver(by_id['a'], Event(type='tick', id='e0'))
    finally:
        dispatcher.close()
    assert order == [('a', 'e0', 1), ('a', 'delivered', 1), ('b', 'e0>b', 1),
                     ('b', 'delivered', 1), ('c', 'e0>b>c', 1)]
    for agent in agents:
        agent.settle()
        assert agent.stats['handled'] == 1
        agent.cleanup()


def test_an_error_escaping_one_agent_inline_is_counted_and_the_next_is_served(storage):
    def broken_log(level, message):
        raise RuntimeError('the node is being torn down')
    broken = Agent(AgentConfig(id='broken', behavior='counter', subscriptions=['t']), storage,
                   lambda *a: None, log=broken_log)
    fine = Agent(AgentConfig(id='fine', behavior='counter', subscriptions=['t']), storage,
                 lambda *a: None)
    for agent in (broken, fine):
        agent.configure()
        agent.activate()
    dispatcher = Dispatcher(0)
    try:
        dispatcher.deliver_all([broken, fine], Event(type='fail.please', id='bad'))
        dispatcher.deliver(fine, Event(type='tick', id='after'))
    finally:
        dispatcher.close()
    assert dispatcher.errors == 1   # broken's error log raised out of its handle_one
    fine.settle()
    assert fine.stats['behavior_errors'] == 1 and fine.stats['handled'] == 1
    assert fine.state['last_id'] == 'after'
    for agent in (broken, fine):
        agent.cleanup()


def test_two_inline_hosts_whose_agents_deliver_to_each_other_on_two_threads_do_not_deadlock(
        storage):
    """a (host 1) and c (host 2) each handle an event on their own thread, holding their own
    lock, and each delivers to the other: queued in the thread's one run, handled after the
    handler returned. Nested, each thread would wait for the other's lock for good (review)."""
    d1, d2, peers = Dispatcher(0), Dispatcher(0), {}
    both = threading.Barrier(2, timeout=60)

    class Relay:
        def setup(self, settings):
            pass

        def handle(self, event, ctx):
            if event.type == 'start':
                both.wait()   # both handlers are running: each holds its agent's lock
                other, dispatcher = peers[ctx.agent_id]
                dispatcher.deliver(other, Event(type='relay', id=f'{event.id}>{other.id}'))
    a, c = agents_of(storage, {'probe': entry(Relay)}, ['a', 'c'])
    peers.update({'a': (c, d2), 'c': (a, d1)})
    threads = [threading.Thread(target=d1.deliver, args=(a, Event(type='start', id='ea'))),
               threading.Thread(target=d2.deliver, args=(c, Event(type='start', id='ec')))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), 'the two delivering threads deadlocked'
    d1.close()
    d2.close()
    for agent in (a, c):
        agent.settle()
        assert agent.stats['handled'] == 2
        agent.cleanup()


def test_a_failed_commit_in_another_hosts_agent_is_counted_by_its_own_host(storage):
    """a (host 1) delivers to b (host 2) on the same thread: b joins host 1's inline run, and
    b's commit, submitted at the end of that run, fails. Host 2 counts it, not host 1."""
    d1, d2 = Dispatcher(0), Dispatcher(0)
    peer = {}

    class Forward:
        def setup(self, settings):
            pass

        def handle(self, event, ctx):
            ctx.state['n'] = ctx.state.get('n', 0) + 1
            if ctx.agent_id == 'a':
                d2.deliver(peer['b'], Event(type='fwd', id=f'{event.id}>b'))
    a, b = agents_of(storage, {'probe': entry(Forward)}, ['a', 'b'])
    peer['b'] = b

    def broken_commit():
        raise RuntimeError('the store broke')
    b.commit_if_dirty = broken_commit
    d1.deliver(a, Event(type='tick', id='e1'))
    assert b.stats['handled'] == 0   # counted once committed: b's never was
    assert (d1.errors, d2.errors) == (0, 1)
    a.settle()
    assert a.stats['handled'] == 1 and storage.agent_state.load('a') == ({'n': 1}, 1)
    d1.close()
    d2.close()
    for agent in (a, b):
        agent.cleanup()


def test_mail_left_after_an_escaping_error_inline_is_still_handled(storage):
    """An error escaping handle_one (here the agent's own error log raises once) took only the
    event it failed on: the next one in the mailbox is handled in the same run, not left for a
    delivery that may never come."""
    calls = [0]

    def log_fails_once(level, message):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError('the node is being torn down')
    agent = Agent(AgentConfig(id='a', behavior='counter', subscriptions=['t']), storage,
                  lambda *a: None, log=log_fails_once)
    agent.configure()
    agent.activate()
    agent.offer(Event(type='fail.please', id='bad'))
    agent.offer(Event(type='tick', id='good'))
    dispatcher = Dispatcher(0)
    try:
        dispatcher.schedule(agent)
    finally:
        dispatcher.close()
    assert dispatcher.errors == 1 and len(agent.mailbox) == 0
    agent.settle()
    assert agent.stats['handled'] == 1 and agent.state['last_id'] == 'good'
    agent.cleanup()


def test_a_closed_inline_dispatcher_runs_no_handler(storage):
    """After close (a deactivating host), delivered mail stays in the mailbox for the agent's
    own deactivate to handle; nothing runs on the delivering thread any more."""
    from loom_ros.agents.runtime import AgentState
    class Keeps:
        def setup(self, settings):
            pass

        def handle(self, event, ctx):
            ctx.state['last'] = event.id
    (agent,) = agents_of(storage, {'probe': entry(Keeps)}, ['a'])
    dispatcher = Dispatcher(0)
    dispatcher.close()
    dispatcher.deliver(agent, Event(type='tick', id='late'))
    assert agent.stats['handled'] == 0 and len(agent.mailbox) == 1
    agent.deactivate()
    assert agent.lifecycle is AgentState.INACTIVE and agent.state['last'] == 'late'
    agent.cleanup()


def test_the_gate_refuses_a_wait_at_once_where_it_cannot_be_answered():
    class Client:   # never reached: the refusal comes before any service is looked at
        srv_name = 'never'

        def service_is_ready(self):
            raise AssertionError('asked the service')
    gate = Gate(refuse_waits=True)
    gate.open()
    assert gate.call(Client(), object(), 3600.0, 'closed') == (None, Gate.INLINE)
    assert 'workers: 0' in Gate.INLINE and gate.waiting == 0


AGENTS = """agents:
  - id: tally
    behavior: counter
    subscriptions: ["inline.tally"]
    qos: realtime
    settings: {intent_every: 10}
  - id: caller
    behavior: plugin_caller
    subscriptions: ["inline.call"]
    qos: realtime
"""


class PluginCaller:
    """Calls a plugin no host in this process runs (a service call, which would wait for the
    answer) and shows what came back."""
    threads: set = set()

    def setup(self, settings):
        pass

    def handle(self, event, ctx):
        PluginCaller.threads.add(threading.get_ident())
        response = ctx.call('echo', event)
        ctx.action('called', {'ok': response.ok, 'error': response.error})
        # ... and from a thread of its own, while the handler waits for it: refused too (the
        # delivering thread, which would take the answer, is the one waiting here)
        aside = []
        helper = threading.Thread(target=lambda: aside.append(ctx.call('echo', event)))
        helper.start()
        helper.join(60)
        ctx.action('called', {'ok': aside[0].ok, 'error': aside[0].error})


def test_an_agent_host_with_no_workers_handles_on_the_publishing_thread(ros, tmp_path,
                                                                        monkeypatch):
    """An AgentNode with `workers: 0` in the publisher's process: events published in-process
    are handled and committed before publish returns, intents go out, and a behavior's plugin
    call (a service it would wait for on this very thread) fails at once saying why."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from loom_ros.agents import agent_node as agent_node_module
    from loom_ros.agents.agent_node import AgentNode
    from loom_ros.bus.bus import EventBus
    installed = dict(agent_node_module.behavior_entry_points())
    installed['plugin_caller'] = entry(PluginCaller)
    monkeypatch.setattr(agent_node_module, 'behavior_entry_points', lambda: installed)
    (tmp_path / 'agents.yaml').write_text(AGENTS)
    host = AgentNode(node_name='inline_host', namespace='/inline', parameter_overrides=[
        Parameter('agents', value='*'), Parameter('workers', value=0),
        Parameter('agents_file', value=str(tmp_path / 'agents.yaml')),
        Parameter('storage.root', value=str(tmp_path / 'storage')),
        Parameter('autostart', value=False)])
    node = Node('inline_feeder', namespace='/inline', context=ros.node.context)
    bus = EventBus(node)
    got = []
    bus.subscribe('agent.tally.intent', lambda e, _t: got.append(('intent', e.json())))
    bus.subscribe('agent.caller.action', lambda e, _t: got.append(('action', e.json())))
    try:
        assert host.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert host.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert host.dispatcher.inline
        tally = host.agents['tally']
        for i in range(20):
            bus.publish('inline.tally', Event(type='tick', id=f't{i}'), 'realtime')
            assert tally.events == i + 1   # handled before publish returned
        bus.publish('inline.call', Event(type='ask', id='c0'), 'realtime')
        tally.settle()
        assert tally.stats['handled'] == 20 and tally.state['total'] == 20
        assert [g for g in got if g[0] == 'intent'] == [
            ('intent', {'total': 10}), ('intent', {'total': 20})]
        actions = [g[1] for g in got if g[0] == 'action']
        assert len(actions) == 2 and not any(a['ok'] for a in actions)
        assert all('workers: 0' in a['error'] for a in actions), actions
        assert PluginCaller.threads == {threading.get_ident()}
    finally:
        host.trigger_shutdown()
        host.destroy_node()
        bus.destroy()
        node.destroy_node()
