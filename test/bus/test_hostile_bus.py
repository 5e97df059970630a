"""Hostile input on the bus (issue 13, faults 1 and 10): forged sequence numbers and undecodable
Events sent from this process to a real `loom echo` node in another process, and a callback that
raises inside a real EventsExecutor. Nothing may kill the node; every oddity is counted."""
import fcntl
import json
import threading

import pytest
from rclpy.node import Node
from rclpy.task import Future
from rclpy.serialization import serialize_message

from harness import loom_cli
from loom_ros.bus import executor as loom_executor
from loom_ros.bus.bus import MAX_SEQ_GAP, STATS_TOPIC
from loom_ros.bus.event import Event
from loom_ros.bus.qos import to_qos_profile

U64_MAX = 2**64 - 1
FAST_STATS = ['--ros-args', '-p', 'bus.stats_period_s:=0.05']   # publish_stats runs often


@pytest.fixture
def echo_stats(ros):
    """BusStats messages of the `loom echo` node, as they arrive."""
    from loom_msgs.msg import BusStats
    seen = []
    sub = ros.node.create_subscription(
        BusStats, STATS_TOPIC, lambda m: seen.append(m) if m.node == '/loom_echo' else None,
        to_qos_profile('realtime'))
    yield seen
    ros.node.destroy_subscription(sub)


def delivered(stats) -> int:
    return max((s.subscriptions[0].delivered for s in stats if s.subscriptions), default=0)


def rejected(stats, reason: str) -> int:
    return max((dict(zip(s.rejected_reasons, s.rejected_counts)).get(reason, 0) for s in stats),
               default=0)


def final_snapshot(err: str) -> dict:
    return json.loads(err.strip().splitlines()[-1])['stats']


def forged(i: int, bus_id: int, seq: int):
    msg = Event(type='forged', id=f'f{i}').to_msg()
    msg.bus_id, msg.seq = bus_id, seq
    return msg


def test_events_whose_sequence_jumps_to_2_64_are_resets_and_the_node_keeps_working(
        ros, spawn, echo_stats):
    from loom_msgs.msg import Event as EventMsg
    echo = spawn(*loom_cli('echo', 'hostile.seq', '--count', '6', '--qos', 'background',
                           *FAST_STATS))
    raw = ros.node.create_publisher(EventMsg, 'loom/hostile/seq', to_qos_profile('background'))
    ros.wait_for(lambda: raw.get_subscription_count() >= 1, 'echo to match', alive=[echo])
    # Two publishers each jumping from 1 to 2^64-1: summed as loss, that passed uint64.
    for i, (bus_id, seq) in enumerate([(7, 1), (7, U64_MAX), (8, 1), (8, U64_MAX)]):
        raw.publish(forged(i, bus_id, seq))
    raw.publish(Event(type='good', id='g1').to_msg())
    # The stats timer built BusStats from those counters (it raised OverflowError and killed
    # the executor before the fix), and a later event is still delivered.
    ros.wait_for(lambda: delivered(echo_stats) == 5, 'stats counting the five events',
                 alive=[echo])
    raw.publish(Event(type='good', id='g2').to_msg())
    code, out, err = echo.finish()
    ros.node.destroy_publisher(raw)
    assert code == 0, err
    assert [json.loads(line)['id'] for line in out.splitlines()] == \
        ['f0', 'f1', 'f2', 'f3', 'g1', 'g2']
    sub = final_snapshot(err)['subscriptions'][0]
    assert (sub['lost'], sub['resets'], sub['delivered']) == (0, 2, 6)
    assert all(s.subscriptions[0].lost == 0 for s in echo_stats if s.subscriptions)


def test_300_batches_with_inconsistent_sequences_do_not_inflate_loss(ros, spawn, echo_stats):
    from loom_msgs.msg import EventBatch
    echo = spawn(*loom_cli('echo', 'hostile.batches', '--count', '301', '--qos', 'batched',
                           *FAST_STATS))
    # Room for its 301 JSON lines (~75 kB) until the end, where they are read: a full 64 kB
    # pipe would block the echo's executor in print().
    fcntl.fcntl(echo.popen.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    raw = ros.node.create_publisher(EventBatch, 'loom/hostile/batches',
                                    to_qos_profile('batched'))
    ros.wait_for(lambda: raw.get_subscription_count() >= 1, 'echo to match', alive=[echo])

    def batch(i, first_seq):
        msg = EventBatch()
        msg.bus_id, msg.first_seq, msg.events = 9, first_seq, [forged(i, 0, 0)]
        return msg
    sent = 0
    while sent < 300:   # in chunks the reliable history (100 batches) holds
        for _ in range(50):
            raw.publish(batch(sent, 10**12 * (sent + 1)))   # each a jump of ~10^12
            sent += 1
        ros.wait_for(lambda: delivered(echo_stats) >= sent, f'{sent} batches taken',
                     alive=[echo])
    assert 10**12 > MAX_SEQ_GAP
    raw.publish(batch(300, 300 * 10**12 + 1 + 5))   # a real gap of 5 is still loss
    code, out, err = echo.finish()
    ros.node.destroy_publisher(raw)
    assert code == 0, err
    assert len(out.splitlines()) == 301
    sub = final_snapshot(err)['subscriptions'][0]
    assert (sub['lost'], sub['resets'], sub['delivered']) == (5, 299, 301)


def test_undecodable_events_are_counted_as_rejected_and_a_good_one_still_arrives(
        ros, spawn, echo_stats):
    from loom_msgs.msg import Event as EventMsg
    echo = spawn(*loom_cli('echo', 'hostile.garbage', '--count', '1', '--qos', 'background',
                           *FAST_STATS))
    raw = ros.node.create_publisher(EventMsg, 'loom/hostile/garbage',
                                    to_qos_profile('background'))
    ros.wait_for(lambda: raw.get_subscription_count() >= 1, 'echo to match', alive=[echo])
    good = serialize_message(Event(type='t', id='x', metadata={'k': 'v'}).to_msg())
    garbage = [b'\x00\x01\x00\x00' + b'\xff' * 40,           # counts and lengths past the end
               b'\x00\x01\x00\x00',                          # a header and nothing else
               good[:30],                                    # cut short
               good[:12] + b'\xff\xff\xff\x7f' + good[16:]]  # frame_id of 2 GB
    for i in range(400):
        raw.publish(garbage[i % 4])   # serialized bytes, published as they are
    ros.wait_for(lambda: rejected(echo_stats, 'bad_field') == 400, '400 rejections counted',
                 alive=[echo])
    raw.publish(Event(type='good', id='good').to_msg())
    code, out, err = echo.finish()
    ros.node.destroy_publisher(raw)
    assert code == 0, err
    assert json.loads(out.splitlines()[0])['id'] == 'good'
    stats = final_snapshot(err)
    assert stats['rejected'] == {'bad_field': 400}
    assert stats['received'] == {'hostile.garbage': 1}


def test_a_timer_that_raises_is_counted_and_keeps_firing(ros):
    """spin_until on a real EventsExecutor (the one every Loom process uses)."""
    node = Node('raising_timer')
    fires = []

    def tick():
        fires.append(len(fires))
        if len(fires) == 1:
            raise RuntimeError('one bad tick')
    node.create_timer(0.01, tick)
    spinner = loom_executor.make_executor()
    spinner.add_node(node)
    stop = Future()
    thread = threading.Thread(target=loom_executor.spin_until, args=(spinner, stop, 0.05),
                              daemon=True)
    thread.start()
    try:
        ros.wait_for(lambda: len(fires) >= 5 or not thread.is_alive(), 'five ticks')
        assert thread.is_alive() and len(fires) >= 5
        assert loom_executor.callback_errors['/raising_timer'] == 1
    finally:
        stop.set_result(True)
        thread.join(5.0)
        spinner.shutdown()
        node.destroy_node()
    assert not thread.is_alive()


def test_a_pattern_attaches_to_at_most_max_pattern_topics_of_what_others_create(ros):
    """Anyone on the domain can make topics a pattern matches, and each attached one is a DDS
    reader: past bus.max_pattern_topics the rest stay unattached, counted in the metrics."""
    from loom_msgs.msg import Event as EventMsg

    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.names import to_ros_topic
    from loom_ros.telemetry.metrics import BusMetrics, MetricsRegistry
    flooder = Node('topic_flooder', context=ros.node.context)
    pubs = [flooder.create_publisher(EventMsg, to_ros_topic(f'flood.t{i}'),
                                     to_qos_profile('realtime')) for i in range(5)]
    bus = EventBus(ros.node, max_pattern_topics=3, discovery_period_s=0.05)
    try:
        sub = bus.subscribe('flood.*', lambda e, t: None, 'realtime')

        def looked() -> bool:
            bus.refresh()
            return len(sub.topics) + sub.topics_refused == 5
        ros.wait_for(looked, 'all five flood topics seen')
        assert len(sub.topics) == 3 and sub.topics_refused == 2
        assert len(bus._endpoints) == 3   # readers made for the attached ones only
        reg = MetricsRegistry('/n')
        BusMetrics(bus)(reg)
        assert reg.gauge('topics_refused', subscription='flood.*') == 2
        # Topics made for a moment do not hold the places for good: when the attached ones lose
        # their publishers while others wait, the others are attached in their place.
        attached = set(sub.topics)
        waiting = {f'flood.t{i}' for i in range(5)} - attached
        for i, pub in enumerate(pubs):
            if f'flood.t{i}' in attached:
                flooder.destroy_publisher(pub)

        def replaced() -> bool:
            bus.refresh()
            return set(sub.topics) == waiting and sub.topics_refused == 0
        ros.wait_for(replaced, 'the waiting topics to take the places of the dead ones')
        BusMetrics(bus)(reg)
        assert reg.gauge('topics_refused', subscription='flood.*') == 0
        assert len(bus._endpoints) == 2
    finally:
        bus.destroy()
        flooder.destroy_node()


def test_topics_of_another_type_are_counted_for_at_most_max_pattern_topics_names(ros):
    from loom_msgs.msg import EventBatch

    from loom_ros.bus.bus import OTHER_TOPICS, EventBus
    from loom_ros.bus.names import to_ros_topic
    flooder = Node('type_flooder', context=ros.node.context)
    for i in range(5):   # EventBatch where a realtime subscription wants Event
        flooder.create_publisher(EventBatch, to_ros_topic(f'mistyped.t{i}'),
                                 to_qos_profile('realtime'))
    bus = EventBus(ros.node, max_pattern_topics=3, discovery_period_s=0.05)
    try:
        sub = bus.subscribe('mistyped.*', lambda e, t: None, 'realtime')

        ros.wait_for(lambda: sum('mistyped' in name for name, _ in
                                 ros.node.get_topic_names_and_types()) == 5,
                     'the five mistyped topics in the graph')
        for _ in range(3):
            bus.refresh()
        assert sub.topics == {}
        names = set(bus.stats.type_mismatch)
        assert len(names) == 4 and OTHER_TOPICS in names   # three by name, the rest together
        assert bus.stats.type_mismatch[OTHER_TOPICS] >= 2
    finally:
        bus.destroy()
        flooder.destroy_node()


def test_a_full_pattern_does_not_take_back_a_topic_only_a_reader_keeps(ros):
    """A topic with a reader and no publisher stays in the graph after a full pattern lets it
    go: it is not attached again (and let go again) at every scan while a live topic waits."""
    from loom_msgs.msg import Event as EventMsg

    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.names import to_ros_topic
    other = Node('reader_only', context=ros.node.context)
    other.create_subscription(EventMsg, to_ros_topic('kept.t0'), lambda m: None,
                              to_qos_profile('realtime'))
    other.create_publisher(EventMsg, to_ros_topic('kept.t1'), to_qos_profile('realtime'))
    bus = EventBus(ros.node, max_pattern_topics=1, discovery_period_s=0.05)
    try:
        ros.wait_for(lambda: sum('kept' in name for name, _ in
                                 ros.node.get_topic_names_and_types()) == 2, 'both topics')
        sub = bus.subscribe('kept.*', lambda e, t: None, 'realtime')
        for _ in range(3):   # at most: attach t0, let it go, attach t1
            bus.refresh()
        assert set(sub.topics) == {'kept.t1'} and sub.topics_refused == 0
        endpoint = bus._endpoints[('kept.t1', sub.topics['kept.t1'])]
        for _ in range(5):   # steady: nothing made or let go any more
            bus.refresh()
            assert set(sub.topics) == {'kept.t1'} and len(bus._endpoints) == 1
            assert bus._endpoints[('kept.t1', sub.topics['kept.t1'])] is endpoint
    finally:
        bus.destroy()
        other.destroy_node()
