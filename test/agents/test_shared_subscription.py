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
