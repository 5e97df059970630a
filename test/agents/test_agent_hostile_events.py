"""Hostile events against the agent core (no ROS): a sender's own priority must not let it take
over a mailbox, and senders' choice of event types must not grow an agent's state without bound."""
import json

import pytest
from hypothesis import given, strategies as st

from loom_ros.agents.behavior import CounterBehavior
from loom_ros.agents.config import AgentConfig
from loom_ros.agents.mailbox import MAX_PRIORITY, MIN_PRIORITY, Mailbox
from loom_ros.agents.runtime import MAX_STATE_BYTES, Agent
from loom_ros.bus.event import Event
from loom_ros.storage.storage import Storage, StorageConfig

INT32_MAX = 2**31 - 1


@pytest.fixture
def storage(tmp_path):
    with Storage(StorageConfig(str(tmp_path), unit='host')) as opened:
        yield opened


def make_agent(storage, mailbox_size=1000, **config):
    agent = Agent(AgentConfig(id='a0', behavior='counter', subscriptions=['t'],
                              mailbox_size=mailbox_size, **config), storage, lambda *a: None)
    agent.configure()
    agent.activate()
    return agent


def drain(box):
    out = []
    while len(box):
        out.append(box.get_nowait()[0])
    return out


# -- priority ---------------------------------------------------------------------------------
@pytest.mark.parametrize('size', [2, 7, 100, 1000])
def test_a_flood_at_int32_max_priority_takes_at_most_half_of_a_mailbox(storage, size):
    """The review's case: a sender fills the mailbox once at int32 max, then ordinary events
    keep arriving. Before: every ordinary event was dropped (the flood owned the mailbox)."""
    agent = make_agent(storage, mailbox_size=size)
    for i in range(size):
        agent.offer(Event(type='evil', id=f'e{i}', priority=INT32_MAX))
    for i in range(500):
        agent.offer(Event(type='real', id=f'r{i}'))
    kept = [e.type for e in drain(agent.mailbox)]
    assert kept.count('evil') <= size // 2
    assert kept.count('real') == size - size // 2
    # the newest ordinary events are the ones kept, in arrival order
    assert [e for e in kept if e == 'real'] == ['real'] * (size - size // 2)
    assert agent.mailbox.dropped == size + 500 - size
    agent.cleanup()


def test_a_mailbox_of_one_is_not_blinded_by_a_hostile_frame_before_each_real_one(storage):
    """The face agent (mailbox 1): one hostile frame at int32 max just before each camera frame
    used to shut out every camera frame (0 of 300 handled)."""
    agent = make_agent(storage, mailbox_size=1)
    real = 0
    for frame in range(300):
        agent.offer(Event(type='camera.front', id=f'evil{frame}', priority=INT32_MAX))
        agent.offer(Event(type='camera.front', id=f'real{frame}'))
        agent.handle_one()
        real += agent.state['last_id'].startswith('real')
    assert real == 300
    agent.cleanup()


def test_priority_still_orders_within_the_clamped_range_and_the_event_keeps_its_own():
    box = Mailbox(10)
    for i, p in enumerate([0, 3, INT32_MAX, -2**31, 1]):
        box.put(Event(type='x', id=str(i), priority=p))
    out = drain(box)
    # int32 max ranks as MAX_PRIORITY, int32 min as MIN_PRIORITY; the events keep what was sent
    assert [e.id for e in out] == ['2', '1', '4', '0', '3']
    assert [e.priority for e in out] == [INT32_MAX, 3, 1, 0, -2**31]
    assert MIN_PRIORITY == -10 and MAX_PRIORITY == 10


def _rank(p, urgent, size):
    r = min(max(p, MIN_PRIORITY), MAX_PRIORITY)
    return 0 if r > 0 and urgent >= size // 2 else r


@given(st.lists(st.tuples(st.sampled_from(['put', 'get']),
                          st.sampled_from([-2**31, -11, -3, -1, 0, 1, 2, 11, INT32_MAX])),
                max_size=80),
       st.integers(1, 12))
def test_mailbox_matches_its_reference_model_and_urgent_never_passes_half(ops, size):
    """The documented rule, as a model: clamp, at most size // 2 urgent (above 0) queued, the rest
    queued at 0; when full, evict the oldest of the lowest unless the newcomer is lower still."""
    box, kept, dropped, n = Mailbox(size), [], 0, 0
    for op, p in ops:
        if op == 'get':
            got = box.get_nowait()
            if kept:
                best = min(kept, key=lambda e: (-e[0], e[1]))
                kept.remove(best)
                assert got[0].id == str(best[1])
            else:
                assert got is None
            continue
        box.put(Event(type='x', id=str(n), priority=p))
        rank = _rank(p, sum(1 for r, _ in kept if r > 0), size)
        entry, n = (rank, n), n + 1
        if len(kept) >= size:
            dropped += 1
            lowest = min(r for r, _ in kept)
            if rank < lowest:
                continue
            kept.remove(min((e for e in kept if e[0] == lowest), key=lambda e: e[1]))
        kept.append(entry)
        assert sum(1 for r, _ in kept if r > 0) <= size // 2
    assert box.dropped == dropped
    expected = sorted(kept, key=lambda e: (-e[0], e[1]))
    assert [int(e.id) for e in drain(box)] == [i for _, i in expected]


# -- state size -------------------------------------------------------------------------------
def test_the_counter_keeps_at_most_max_keys_types_and_counts_the_rest_as_other(storage):
    """The review's case, smaller: distinct 256-character types used to add a key each (20,000
    of them made a 5.22 MB state, serialized whole on every event)."""
    agent = make_agent(storage, persist='interval', persist_interval_s=3600.0)
    n = CounterBehavior.MAX_KEYS + 300
    for i in range(n):
        agent.offer(Event(type=f'{i:08d}' + 'x' * 248, id=f'e{i}'))
        agent.handle_one()
    counts = agent.state['counts']
    assert len(counts) == CounterBehavior.MAX_KEYS + 1
    assert counts['other'] == 300 and sum(counts.values()) == n == agent.state['total']
    assert agent.stats['behavior_errors'] == 0
    assert len(json.dumps(agent.state)) < 100_000
    agent.cleanup()


class GrowsState:
    """Adds about 100 KB to its state on each `grow` event."""

    def handle(self, event, ctx):
        ctx.state['last_id'] = event.id
        if event.type == 'grow':
            ctx.state.setdefault('blobs', []).append('y' * 100_000)


@pytest.mark.parametrize('persist', ['per_event', 'interval'])
def test_a_state_over_max_state_bytes_is_a_behavior_error_rolled_back(storage, persist):
    agent = make_agent(storage, persist=persist, persist_interval_s=3600.0)
    agent.behavior = GrowsState()
    grows = MAX_STATE_BYTES // 100_000 + 5
    for i in range(grows):
        agent.offer(Event(type='grow', id=f'g{i}'))
        agent.handle_one()
    agent.offer(Event(type='ok', id='last'))
    agent.handle_one()
    agent.settle()
    fits = len(agent.state['blobs'])
    assert MAX_STATE_BYTES - 100_100 < fits * 100_000 <= MAX_STATE_BYTES   # grew until the cap
    assert agent.stats['behavior_errors'] == grows - fits >= 5
    assert agent.state['last_id'] == 'last' and agent.persist_failed is None
    assert len(agent._saved) <= MAX_STATE_BYTES
    state, events = storage.agent_state.load('a0')
    assert state == agent.state and events == grows + 1
    agent.cleanup()
