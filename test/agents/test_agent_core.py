"""The agent core without ROS: mailbox order and bounds, state persistence, config, behaviors."""
import json
import sqlite3

import pytest
from hypothesis import given, strategies as st

from loom_ros.agents.behavior import BehaviorNotFound, CounterBehavior, installed_behaviors, load_behavior
from loom_ros.agents.config import AgentConfigError, load_agents
from loom_ros.agents.mailbox import Mailbox
from loom_ros.agents.state import StateError, StateStore
from loom_ros.bus.event import Event

from harness import REPO


@given(st.lists(st.integers(-3, 3), max_size=60), st.integers(1, 20))
def test_mailbox_orders_by_priority_then_arrival_and_drops_the_oldest_least_urgent(prios, size):
    box = Mailbox(size)
    for i, p in enumerate(prios):
        box.put(Event(type='x', id=str(i), priority=p))
    out = []
    while len(box):
        out.append(box.get(timeout=0)[0])
    # What a reference model keeps: for each arrival, if full, evict the oldest of the lowest
    # priority present, unless the newcomer is less urgent than all of them.
    kept = []
    for i, p in enumerate(prios):
        if len(kept) >= size:
            lowest = min(q for q, _ in kept)
            if p < lowest:
                continue
            kept.remove(min((e for e in kept if e[0] == lowest), key=lambda e: e[1]))
        kept.append((p, i))
    expected = sorted(kept, key=lambda e: (-e[0], e[1]))
    assert [(e.priority, int(e.id)) for e in out] == expected
    assert box.dropped == len(prios) - len(kept)


def test_state_round_trip_old_schema_and_corruption(tmp_path):
    store = StateStore(tmp_path / 's.db', 'a1')
    assert store.load() == ({}, 0)
    store.commit({'total': 3}, 3, 'e3')
    store.close()
    assert StateStore(tmp_path / 's.db', 'a1').load() == ({'total': 3}, 3)

    db = sqlite3.connect(tmp_path / 's.db')
    db.execute("insert into agent_state values ('old', 1, ?, null, '', 0)",
               [json.dumps({'total': 7, '_events': 7})])
    db.execute("insert into agent_state values ('bad', 2, '{not json', 1, '', 0)")
    db.execute("insert into agent_state values ('future', 9, '{}', 1, '', 0)")
    db.commit()
    assert StateStore(tmp_path / 's.db', 'old').load() == ({'total': 7}, 7)
    with pytest.raises(StateError, match='stored state is corrupt'):
        StateStore(tmp_path / 's.db', 'bad').load()
    with pytest.raises(StateError, match='schema 9 is newer'):
        StateStore(tmp_path / 's.db', 'future').load()


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
