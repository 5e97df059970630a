"""The agent core without ROS: mailbox order and bounds, state persistence, config, behaviors."""
import json
import sqlite3

import pytest
from hypothesis import given, strategies as st

from loom_ros.agents.behavior import BehaviorNotFound, CounterBehavior, installed_behaviors, load_behavior
from loom_ros.agents.config import AgentConfigError, load_agents
from loom_ros.agents.mailbox import Mailbox
from loom_ros.agents.state import StateError
from loom_ros.bus.event import Event

from harness import REPO, old_agent_file


@given(st.lists(st.integers(-3, 3), max_size=60), st.integers(1, 20))
def test_mailbox_orders_by_priority_then_arrival_and_drops_the_oldest_least_urgent(prios, size):
    box = Mailbox(size)
    for i, p in enumerate(prios):
        box.put(Event(type='x', id=str(i), priority=p))
    out = []
    while len(box):
        out.append(box.get(timeout=0)[0])
    # What a reference model keeps: for each arrival, if full, evict the oldest of the lowest
    # priority present, unless the newcomer is less urgent than all of them. An event above
    # priority 0 while size // 2 such are queued counts as priority 0 (a sender's priority
    # cannot take more than half of a mailbox: mailbox.py).
    kept = []
    for i, p in enumerate(prios):
        if p > 0 and sum(1 for q, _ in kept if q > 0) >= size // 2:
            p = 0
        if len(kept) >= size:
            lowest = min(q for q, _ in kept)
            if p < lowest:
                continue
            kept.remove(min((e for e in kept if e[0] == lowest), key=lambda e: e[1]))
        kept.append((p, i))
    expected = sorted(kept, key=lambda e: (-e[0], e[1]))
    assert [int(e.id) for e in out] == [i for _, i in expected]
    assert box.dropped == len(prios) - len(kept)


def test_mailbox_get_with_a_timeout_wakes_on_mail_and_on_close():
    """put and get_nowait take a plain lock; get(timeout) still wakes when mail comes or the
    mailbox closes, whether it started waiting before or after."""
    import threading
    for closing in (False, True):
        box, got, waiting = Mailbox(4), [], threading.Event()

        def take():
            waiting.set()
            got.append(box.get(timeout=60))
        taker = threading.Thread(target=take)
        taker.start()
        waiting.wait(60)
        if closing:
            box.close()
        else:
            box.put(Event(type='x', id='m'))
        taker.join(60)
        assert not taker.is_alive()
        assert got == [None] if closing else got[0][0].id == 'm'
    assert Mailbox(1).get(timeout=0) is None


def test_state_round_trip_and_old_files_imported_with_their_schema_checks(tmp_path):
    """State on the layer; an agent's old file (schema 1 or 2) is imported on load with its
    episodes and facts, once, then renamed; a corrupt or newer row refuses as before and
    leaves the file as it was."""
    import numpy as np

    from loom_ros.agents.state import AgentStore
    from loom_ros.storage.storage import Storage, StorageConfig
    agents = tmp_path / 'agents'
    vector = np.arange(4, dtype=np.float32).tobytes()
    old_agent_file(agents / 'old.db', [('old', 1, json.dumps({'total': 7, '_events': 7}), None,
                                        '')])
    old_agent_file(agents / 'two.db', [('two', 2, json.dumps({'total': 2}), 2, 'e2')],
                   episodes=[('two', 'e1', 1000, 'tick', 'src', '["user"]', 'one'),
                             ('two', 'e2', 1001, 'tick', 'src', '[]', 'two')],
                   facts=[('two', 'Alice', 'likes', 'tea', 'e1', 1000, vector)])
    old_agent_file(agents / 'bad.db', [('bad', 2, '{not json', 1, '', )])
    old_agent_file(agents / 'future.db', [('future', 9, '{}', 1, '')])
    bad_bytes = (agents / 'bad.db').read_bytes()
    with Storage(StorageConfig(str(tmp_path), unit='host')) as storage:
        store = AgentStore(storage, 'a1')
        assert store.load() == ({}, 0)
        store.commit({'total': 3}, 3, 'e3').wait()
        assert AgentStore(storage, 'a1').load() == ({'total': 3}, 3)

        assert AgentStore(storage, 'old').load() == ({'total': 7}, 7)
        assert AgentStore(storage, 'two').load() == ({'total': 2}, 2)
        assert [(e['event_id'], e['tags']) for e in storage.episodes.query('two')] == \
            [('e1', ['user']), ('e2', [])]
        facts = storage.query("select subject, object, vector from facts where agent_id = 'two'")
        assert [(f['subject'], f['object'], f['vector']) for f in facts] == \
            [('Alice', 'tea', vector)]
        assert not (agents / 'two.db').exists() and (agents / 'two.db.migrated').is_file()
        store = AgentStore(storage, 'two')   # again: the state here wins, nothing imported twice
        assert store.load() == ({'total': 2}, 2) and len(storage.episodes.query('two')) == 2

        with pytest.raises(StateError, match='stored state is corrupt'):
            AgentStore(storage, 'bad').load()
        with pytest.raises(StateError, match='schema 9 is newer'):
            AgentStore(storage, 'future').load()
        assert not storage.agent_state.has('bad') and not storage.agent_state.has('future')
    assert (agents / 'bad.db').read_bytes() == bad_bytes   # left as is for inspection
    assert (agents / 'future.db').is_file()


def test_agents_file_validation(tmp_path):
    agents = load_agents(REPO / 'config' / 'agents.yaml')
    assert agents['counter'].behavior == 'counter'
    for text, message in [
        ('agents: [{id: a, behavior: counter, subscriptions: []}]', 'subscriptions'),
        ('agents: [{id: 1a, behavior: counter, subscriptions: [x]}]', 'agents[0].id'),
        ('agents: [{id: a, behavior: counter, subscriptions: [x], colour: red}]', 'colour'),
        ('agents: [{id: a, behavior: counter, subscriptions: [bad..x]}]', 'empty segment'),
        ('agents: [{id: a, behavior: counter, subscriptions: [x], backpressure: "queue:lifo"}]',
         'queue must be one of'),
        ('agents: [{id: a, behavior: c, subscriptions: [x]}, {id: a, behavior: c, '
         'subscriptions: [y]}]', 'duplicate agent id'),
        ('agents: {a: 1}', 'top-level `agents:` list'),
    ]:
        path = tmp_path / 'a.yaml'
        path.write_text(text)
        with pytest.raises(AgentConfigError, match=message.replace('[', r'\[').replace(']', r'\]')):
            load_agents(path)


def test_behaviors_come_from_entry_points():
    assert 'counter' in installed_behaviors()
    assert isinstance(load_behavior('counter'), CounterBehavior)
    with pytest.raises(BehaviorNotFound, match="no behavior 'nope'.*installed: .*counter"):
        load_behavior('nope')


def test_async_behaviors_run_to_completion():
    import asyncio
    from collections import deque

    from loom_ros.agents.behavior import AgentContext, run_handler

    class Slow:
        def setup(self, settings):
            pass

        async def handle(self, event, ctx):
            await asyncio.sleep(0)
            ctx.state['seen'] = ctx.state.get('seen', 0) + 1
            ctx.intent('done', {'id': event.id})
    emitted = []
    ctx = AgentContext('a', {}, deque(),
                       lambda kind, type, data, privacy: emitted.append((kind, type, data)))
    run_handler(Slow(), Event(type='x', id='e1'), ctx)
    assert ctx.state == {'seen': 1} and emitted == [('intent', 'done', {'id': 'e1'})]


def test_an_agent_hosts_unit_is_its_full_node_name_made_safe():
    """One unit database per agent host, named after the node: never a path, never shared."""
    from loom_ros.agents.agent_node import unit_name
    from loom_ros.storage.layout import check_name
    for node, unit in [('/agent_tally', 'agent_tally'), ('/ag/agent_tally', 'ag.agent_tally'),
                       ('/robot1/x/agent_host_1', 'robot1.x.agent_host_1'),
                       ('/../..//etc/passwd', 'etc.passwd'), ('/' + 'n' * 100, 'n' * 64)]:
        assert unit_name(node) == unit and check_name(unit) == unit
