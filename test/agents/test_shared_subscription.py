"""Agents hosted in one node that follow the same topic with the same QoS and backpressure share
one bus subscription (the event is taken and counted once, then put in each mailbox); an agent
with its own backpressure keeps its own, so what each agent gets is what it asked for."""
from loom_ros.bus.event import Event

AGENTS = """agents:
  - id: s0
    behavior: counter
    subscriptions: ["shared.tick"]
    qos: realtime
    mailbox_size: 100
  - id: s1
    behavior: counter
    subscriptions: ["shared.tick"]
    qos: realtime
    mailbox_size: 100
  - id: s2
    behavior: counter
    subscriptions: ["shared.tick"]
    qos: realtime
    backpressure: "sample_every:2"
    mailbox_size: 100
"""


def test_agents_on_one_topic_share_a_subscription_and_keep_their_own_backpressure(ros, tmp_path):
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from loom_ros.agents.agent_node import AgentNode
    from loom_ros.bus.bus import EventBus
    (tmp_path / 'agents.yaml').write_text(AGENTS)
    host = AgentNode(node_name='shared_host', namespace='/shared_sub', parameter_overrides=[
        Parameter('agents', value='*'), Parameter('autostart', value=False),
        Parameter('agents_file', value=str(tmp_path / 'agents.yaml')),
        Parameter('storage.root', value=str(tmp_path / 'storage'))])
    feeder = Node('shared_feeder', namespace='/shared_sub', context=ros.node.context)
    bus = EventBus(feeder)
    ros.executor.add_node(host)
    ros.executor.add_node(feeder)
    try:
        host.trigger_configure()
        host.trigger_activate()
        subs = host.bus.stats.subscriptions
        assert sorted((s.pattern.text, s.policy.sample_every) for s in subs) == [
            ('shared.tick', 1), ('shared.tick', 2)], [s.snapshot() for s in subs]
        for i in range(10):
            bus.publish('shared.tick', Event(type='tick', id=f't{i}'), 'realtime')
        agents = host.agents
        ros.wait_for(lambda: [agents[a].stats['handled'] for a in ('s0', 's1', 's2')] ==
                     [10, 10, 5], 'each agent to handle what it subscribed to')
        for agent_id in ('s0', 's1'):
            assert agents[agent_id].state['last_id'] == 't9'
        # The shared subscription counted each event once; each agent's mailbox got its own.
        shared = next(s for s in subs if s.policy.sample_every == 1)
        assert shared.counters.delivered == 10
        assert host.bus.stats.received['shared.tick'] == 10
    finally:
        ros.executor.remove_node(host)
        ros.executor.remove_node(feeder)
        host.trigger_shutdown()
        host.destroy_node()
        bus.destroy()
        feeder.destroy_node()


def test_an_active_host_keeps_its_configured_heap_out_of_the_collectors_passes(ros, tmp_path):
    """Activation collects, then freezes what configure made (a full pass over a 1,000-agent
    host stalled it 100-260 ms); cleanup hands it back, so what was released can be collected."""
    import gc
    import weakref

    from rclpy.parameter import Parameter

    from loom_ros.agents.agent_node import AgentNode
    (tmp_path / 'agents.yaml').write_text(AGENTS)
    host = AgentNode(node_name='frozen_host', namespace='/frozen_heap', parameter_overrides=[
        Parameter('agents', value='*'), Parameter('autostart', value=False),
        Parameter('agents_file', value=str(tmp_path / 'agents.yaml')),
        Parameter('storage.root', value=str(tmp_path / 'storage'))])
    try:
        gc.unfreeze()
        host.trigger_configure()
        agent = host.agents['s0']
        assert gc.get_freeze_count() == 0
        # The heap is settled before the first event can arrive: the collection runs on the
        # executor's thread, and an event that came during it waited (the face flow's first
        # frames, 41-241 ms late). Recorded as each subscription opens.
        frozen_at_subscribe = []
        subscribe = host.bus.subscribe

        def recording_subscribe(*args, **kwargs):
            frozen_at_subscribe.append(gc.get_freeze_count())
            return subscribe(*args, **kwargs)
        host.bus.subscribe = recording_subscribe
        host.trigger_activate()
        assert frozen_at_subscribe and all(n > 0 for n in frozen_at_subscribe), \
            frozen_at_subscribe
        assert gc.get_freeze_count() > 0
        assert not any(o is agent for g in (0, 1, 2) for o in gc.get_objects(g))   # frozen
        host.trigger_deactivate()
        assert gc.get_freeze_count() == 0   # deactivate/activate cycles leave nothing frozen
        host.trigger_activate()
        assert gc.get_freeze_count() > 0
        host.trigger_deactivate()
        host.trigger_cleanup()
        assert gc.get_freeze_count() == 0
        # The released agent, in a reference cycle with itself, is collectable again.
        gone = weakref.ref(agent)
        agent.cycle = agent
        del agent
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
        host.trigger_shutdown()
        host.destroy_node()


class _Cycle:
    """A reference cycle with a weak reference to watch when the collector frees it."""

    def __init__(self):
        self.me = self


def _old_cycle():
    """A weak reference to a cycle that died old: it reached the oldest generation alive (two
    middle passes), then lost its last outside reference. Only a full pass can free it."""
    import gc
    import weakref
    cycle = _Cycle()
    gc.collect(1)
    gc.collect(1)
    watch = weakref.ref(cycle)
    del cycle
    return watch


def _churn() -> int:
    """Enough long-lived allocations for CPython's own rule to start a full pass (more
    middle passes than its threshold, and survivors past a quarter of the old generation);
    returns how many full passes CPython started meanwhile."""
    import gc
    before = gc.get_stats()[2]['collections']
    keep = [[i] for i in range(max(200_000, len(gc.get_objects(2)) // 2))]
    del keep
    return gc.get_stats()[2]['collections'] - before


def test_an_active_host_runs_the_full_collections_itself_on_its_timer(ros, tmp_path):
    """Active, the host's subscriptions are frozen too and CPython starts no full pass (they
    stopped a 1,000-agent host 22-100 ms every 0.6 s): a cycle that dies old waits for the
    host's own pass (full_gc_period_s), which frees it; young passes come every
    gc_young_threshold allocations and still free a cycle that dies young. Deactivated,
    CPython's thresholds are back and free an old cycle by themselves (the same churn: the
    check can fail)."""
    import gc
    import weakref

    from rclpy.parameter import Parameter

    from loom_ros.agents.agent_node import AgentNode
    from loom_ros.bus.executor import CPYTHON_GC_THRESHOLDS, NO_AUTOMATIC_FULL_PASS
    (tmp_path / 'agents.yaml').write_text(AGENTS)
    host = AgentNode(node_name='full_gc_host', namespace='/full_gc', parameter_overrides=[
        Parameter('agents', value='*'), Parameter('autostart', value=False),
        Parameter('full_gc_period_s', value=3600.0),   # the test runs the pass itself
        Parameter('agents_file', value=str(tmp_path / 'agents.yaml')),
        Parameter('storage.root', value=str(tmp_path / 'storage'))])
    try:
        host.trigger_configure()
        host.trigger_activate()
        # young passes every 50,000 allocations (config/loom.yaml), middle ones as CPython's
        assert gc.get_threshold() == (50_000, CPYTHON_GC_THRESHOLDS[1], NO_AUTOMATIC_FULL_PASS)
        assert host._full_gc_timer is not None
        young = weakref.ref(_Cycle())   # a cycle that dies young: a young pass frees it
        before = gc.get_stats()[0]['collections']
        keep = [[i] for i in range(60_000)]
        assert gc.get_stats()[0]['collections'] > before and young() is None
        del keep
        subscriptions = list(host._subs)
        assert subscriptions and not any(o is s for g in (0, 1, 2) for o in gc.get_objects(g)
                                         for s in subscriptions)   # frozen with the rest
        watch = _old_cycle()
        assert _churn() == 0
        assert watch() is not None   # young passes ran; none frees an old cycle
        host._full_pass()
        assert watch() is None
        assert host.full_gc['passes'] == 1 and host.full_gc['found'] >= 1
        host.trigger_deactivate()
        assert host._full_gc_timer is None
        assert gc.get_threshold() == CPYTHON_GC_THRESHOLDS
        watch = _old_cycle()
        assert _churn() >= 1
        assert watch() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*CPYTHON_GC_THRESHOLDS)
        host.trigger_shutdown()
        host.destroy_node()


def test_two_hosts_in_one_process_share_the_collector(ros, tmp_path):
    """The launch file composes agent hosts into one process: one deactivating keeps the other's
    heap frozen and its full passes held; the last to go gives CPython its own thresholds back."""
    import gc

    from rclpy.parameter import Parameter

    from loom_ros.agents.agent_node import AgentNode
    from loom_ros.bus.executor import CPYTHON_GC_THRESHOLDS, NO_AUTOMATIC_FULL_PASS, HeapHolds
    (tmp_path / 'agents.yaml').write_text(AGENTS)
    heap = HeapHolds()
    hosts = [AgentNode(node_name=f'shared_gc_{i}', namespace='/shared_gc', heap=heap,
                       parameter_overrides=[
                           Parameter('agents', value='*'), Parameter('autostart', value=False),
                           Parameter('gc_young_threshold', value=young),
                           Parameter('full_gc_period_s', value=3600.0),
                           Parameter('agents_file', value=str(tmp_path / 'agents.yaml')),
                           Parameter('storage.root', value=str(tmp_path / f'storage{i}'))])
             for i, young in enumerate((50_000, 20_000))]
    try:
        for host in hosts:
            host.trigger_configure()
            host.trigger_activate()
        assert gc.get_threshold() == (50_000, CPYTHON_GC_THRESHOLDS[1], NO_AUTOMATIC_FULL_PASS)
        hosts[0].trigger_deactivate()
        assert gc.get_threshold() == (20_000, CPYTHON_GC_THRESHOLDS[1], NO_AUTOMATIC_FULL_PASS)
        assert gc.get_freeze_count() > 0 and heap.holders() == 1
        hosts[1].trigger_deactivate()
        assert gc.get_threshold() == CPYTHON_GC_THRESHOLDS and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*CPYTHON_GC_THRESHOLDS)
        for host in hosts:
            host.trigger_shutdown()
            host.destroy_node()
