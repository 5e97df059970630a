"""The bus under load: batching order and loss bounds across processes, the intra-process fast
path delivering once and only once, backpressure through the bus, and the stats topic."""
import collections
import contextlib
import json
import sys
import threading

from hypothesis import HealthCheck, given, settings, strategies as st

from harness import loom_cli
from loom_ros.bus.bus import STATS_TOPIC, EventBus
from loom_ros.bus.event import Event
from loom_ros.bus.qos import to_qos_profile


@contextlib.contextmanager
def gil_handed_over_at_every_chance():
    """The GIL's switch interval at its least while the block runs (threads interleave as
    often as CPython lets them), then back."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def ids(events):
    return [e.id for e in events]


def test_batched_delivery_across_processes_keeps_order_and_loses_nothing(ros, bus, spawn):
    got = []
    sub = bus.subscribe('load.batched', lambda e, t: got.append(e.id), 'batched')
    n = 5000
    pub = spawn(*loom_cli('pub', 'load.batched', '{"type": "tick", "id": "b"}', '--qos', 'batched',
                          '--count', str(n), '--rate', '0', '--wait-subscribers', '1'))
    ros.wait_for(lambda: len(got) >= n, f'{n} batched events', alive=[pub])
    assert got == [f'b-{i}' for i in range(n)]
    assert sub.counters.lost == 0 and sub.counters.delivered == n


def test_slow_subscriber_within_the_bound_loses_nothing_and_beyond_it_loss_is_counted(
        ros, bus, spawn, capfd):
    """Another process publishes as fast as it can; once the first events are in, the test
    process stops taking (spinning) until the publisher is done, then resumes.
    Bound: the QoS history (100 batches) x bus.batch_max_events (100) = 10,000 events."""
    got = []
    sub = bus.subscribe('load.slow', lambda e, t: got.append(int(e.id.split('-')[1])), 'batched')
    age = ['--ros-args', '-p', 'bus.batch_max_age_ms:=10000.0']  # batches close by count only

    def burst(n, tag):
        got.clear()
        pub = spawn(*loom_cli('pub', 'load.slow', json.dumps({'type': 't', 'id': tag}),
                              '--qos', 'batched', '--count', str(n), '--rate', '0',
                              '--wait-subscribers', '1', *age))
        ros.wait_for(lambda: got, 'the first events', alive=[pub])
        code, _, err = pub.finish()  # we do not spin meanwhile: we are the slow subscriber
        assert code == 0, err
        ros.wait_for(lambda: got[-1] == n - 1, 'the last event of the burst')

    burst(5000, 'a')  # within the bound, however early we stalled
    assert got == list(range(5000)) and sub.counters.lost == 0

    burst(40000, 'b')  # at least 29,900 events past the bound once we stall
    assert got == sorted(got)  # what arrives is still in order
    # Every gap is counted exactly; the history kept the newest batches.
    assert sub.counters.lost == (got[-1] - got[0] + 1) - len(got) > 0
    assert 'never arrived' in capfd.readouterr().err


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 300), level=st.sampled_from(['realtime', 'batched', 'background']))
def test_fast_path_delivers_once_and_only_once_without_serialization(ros, n, level):
    from rclpy.node import Node
    topic = f'fast.{level}'
    pub_node = Node('fast_pub', context=ros.node.context)
    sub_node = Node('fast_sub', context=ros.node.context)
    publisher, subscriber = EventBus(pub_node), EventBus(sub_node)
    try:
        got = []
        subscriber.subscribe(topic, lambda e, t: got.append(e), level)
        sent = [Event(type='x', id=str(i)) for i in range(n)]
        for event in sent:
            publisher.publish(topic, event, level)
        publisher.flush()
        assert [id(e) for e in got] == [id(e) for e in sent]  # the same objects: no copy made
        assert publisher.stats.intra_process == n
        # Nothing more arrives later through DDS either.
        for _ in range(20):
            ros.executor.spin_once(timeout_sec=0.01)
        assert len(got) == n
    finally:
        publisher.destroy()
        subscriber.destroy()
        pub_node.destroy_node()
        sub_node.destroy_node()


def test_fast_path_and_a_remote_subscriber_both_get_every_event_once(ros, bus, spawn):
    from rclpy.node import Node
    local_node = Node('fast_local', context=ros.node.context)
    local = EventBus(local_node)
    try:
        got = []
        local.subscribe('fast.mixed', lambda e, t: got.append(e.id), 'batched')
        echo = spawn(*loom_cli('echo', 'fast.mixed', '--count', '50', '--qos', 'batched'))
        publisher = bus.publisher_for('fast.mixed', 'batched')
        ros.wait_for(lambda: publisher.get_subscription_count() >= 2, 'local and remote to match',
                     alive=[echo])
        for i in range(50):
            bus.publish('fast.mixed', Event(type='x', id=f'm{i}'), 'batched')
        bus.flush()
        code, out, err = echo.finish()
        assert code == 0, err
        assert [json.loads(l)['id'] for l in out.splitlines()] == [f'm{i}' for i in range(50)]
        for _ in range(20):  # give a stray DDS copy every chance to show up
            ros.executor.spin_once(timeout_sec=0.01)
        assert got == [f'm{i}' for i in range(50)]
        assert bus.stats.intra_process == 50 and bus.stats.batches_sent >= 1
    finally:
        local.destroy()
        local_node.destroy_node()


def test_drop_oldest_through_the_bus_and_counters_on_the_stats_topic(ros):
    from loom_msgs.msg import BusStats
    from rclpy.node import Node
    node = Node('bp_node', context=ros.node.context)
    bus = EventBus(node, stats_period_s=0.05)
    ros.executor.add_node(node)  # its stats timer must run
    stats = []
    probe = ros.node.create_subscription(BusStats, STATS_TOPIC, stats.append,
                                         to_qos_profile('realtime'))
    entered, release = threading.Event(), threading.Event()
    delivered = []

    def slow(event, topic):
        entered.set()
        release.wait(timeout=60)
        delivered.append(event.id)
    try:
        sub = bus.subscribe('bp.slow', slow, 'batched', backpressure='queue:drop_oldest,queue_size:5')
        bus.publish('bp.slow', Event(type='x', id='first'))
        assert entered.wait(timeout=60)  # the consumer thread is now busy with 'first'
        for i in range(20):
            bus.publish('bp.slow', Event(type='x', id=f'e{i}'))
        release.set()
        ros.wait_for(lambda: len(delivered) == 6, 'the queue to drain')
        assert delivered == ['first'] + [f'e{i}' for i in range(15, 20)]
        c = sub.counters
        assert (c.received, c.dropped_oldest, c.delivered, c.queue_high_water) == (21, 15, 6, 5)

        def seen():
            return any(s.node == '/bp_node' and s.subscriptions
                       and s.subscriptions[0].dropped_oldest == 15
                       and s.subscriptions[0].policy == 'queue:drop_oldest,queue_size:5'
                       for s in stats)
        ros.wait_for(seen, 'BusStats with the drop counters')
    finally:
        release.set()
        ros.node.destroy_subscription(probe)
        ros.executor.remove_node(node)
        bus.destroy()
        node.destroy_node()


def test_a_bus_with_more_subscriptions_than_a_stats_message_holds_reports_them_in_turn(ros):
    """Past bus.stats_max_subscriptions, each BusStats message carries the next slice (a host of
    1,000 agents spent 18-21 ms of its executor's thread on each full message): every
    subscription is in one of ceil(n / max) consecutive messages, none twice among them; a
    bus within the bound reports all of them in every message."""
    from loom_msgs.msg import BusStats
    from rclpy.node import Node
    node = Node('stats_turns', context=ros.node.context)
    bus = EventBus(node, stats_period_s=3600.0, stats_max_subscriptions=4)
    got = []
    probe = ros.node.create_subscription(BusStats, STATS_TOPIC, got.append,
                                         to_qos_profile('realtime'))
    try:
        ros.wait_for(lambda: bus._stats_pub.get_subscription_count() >= 1, 'the stats probe')
        subs = [bus.subscribe(f'turns.t{i}', lambda e, t: None) for i in range(10)]
        for _ in range(3):
            bus.publish_stats()
        mine = lambda: [m for m in got if m.node == '/stats_turns']  # noqa: E731
        ros.wait_for(lambda: len(mine()) == 3, 'three BusStats messages')
        patterns = [[s.pattern for s in m.subscriptions] for m in mine()]
        assert [len(p) for p in patterns] == [4, 4, 4]
        first_ten = [x for p in patterns for x in p][:10]
        assert sorted(first_ten) == sorted(f'turns.t{i}' for i in range(10))
        for sub in subs[4:]:
            bus.unsubscribe(sub)
        got.clear()
        bus.publish_stats()
        ros.wait_for(lambda: len(mine()) == 1, 'a BusStats message')
        assert sorted(s.pattern for s in mine()[0].subscriptions) == \
            sorted(f'turns.t{i}' for i in range(4))
    finally:
        ros.node.destroy_subscription(probe)
        bus.destroy()
        node.destroy_node()


def test_aggregation_through_the_bus_says_how_many_were_folded(ros, bus):
    folded = []
    bus.subscribe('agg.imu', lambda e, t: folded.append(e), 'batched',
                  backpressure='aggregate_count:10,reducer:mean')
    for i in range(30):
        bus.publish('agg.imu', Event.with_json('imu', {'ax': float(i)}), 'batched')
    assert [e.metadata['loom.folded'] for e in folded] == ['10', '10', '10']
    assert [e.json()['ax'] for e in folded] == [4.5, 14.5, 24.5]


def test_threads_publishing_one_batched_topic_while_the_batch_timer_sends_lose_nothing(ros, bus):
    """Agents' threads publish while the executor's batch timer sends: every event reaches DDS
    once, each with its own sequence number, batches in order. (Without the outlet's lock a
    batch swapped out between a publisher's look and its append lost that event.)"""
    from loom_msgs.msg import EventBatch

    from loom_ros.bus.names import to_ros_topic
    from loom_ros.bus.wire import decode_event_batch
    batches = []
    ros.node.create_subscription(EventBatch, to_ros_topic('load.threads'),
                                 lambda data: batches.append(decode_event_batch(data)),
                                 to_qos_profile('batched'), raw=True)
    bus.publisher_for('load.threads', 'batched')
    ros.wait_for(lambda: bus.publisher_for('load.threads').get_subscription_count() == 1,
                 'the raw subscription to match')
    threads, each = 4, 500
    start = threading.Barrier(threads)

    def publish(t):
        start.wait()
        for i in range(each):
            bus.publish('load.threads', Event(type='t', id=f'{t}-{i}'), 'batched')

    workers = [threading.Thread(target=publish, args=(t,)) for t in range(threads)]
    try:
        with gil_handed_over_at_every_chance():
            for w in workers:
                w.start()
            while any(w.is_alive() for w in workers):
                bus.flush()           # the batch timer's work, racing the publishers
                ros.spin_once(0.0)
    finally:
        for w in workers:
            w.join()
    bus.flush()
    total = threads * each
    ros.wait_for(lambda: sum(len(b[2]) for b in batches) >= total, f'{total} events')
    seqs, got = [], []
    for _bus_id, first_seq, events in batches:
        seqs.extend(range(first_seq, first_seq + len(events)))
        got.extend(e.id for e in events)
    assert sorted(got) == sorted(f'{t}-{i}' for t in range(threads) for i in range(each))
    assert seqs == list(range(1, total + 1))   # unique, gapless, batches in order
    assert bus.stats.published['load.threads'] == total   # no count lost to a race either
    for t in range(threads):   # each thread's own events in its publish order
        mine = [int(x.split('-')[1]) for x in got if x.startswith(f'{t}-')]
        assert mine == list(range(each))


def test_threads_publishing_on_their_own_topics_lose_no_in_process_count(bus):
    """Agents' threads publish on their own topics, each with a subscriber in this process: the
    bus-wide count of in-process deliveries is exact (one shared `+= n` outside any lock lost
    counts when two topics' publishers met there)."""
    threads, each = 4, 2000
    got = collections.Counter()
    for t in range(threads):
        bus.subscribe(f'load.own{t}', lambda event, topic: got.update((topic,)), 'realtime')
    start = threading.Barrier(threads)
    before = bus.stats.intra_process

    def publish(t):
        start.wait()
        for i in range(each):
            bus.publish(f'load.own{t}', Event(type='t', id=f'{t}-{i}'), 'realtime')

    workers = [threading.Thread(target=publish, args=(t,)) for t in range(threads)]
    with gil_handed_over_at_every_chance():
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert got == {f'load.own{t}': each for t in range(threads)}
    assert bus.stats.intra_process - before == threads * each
    assert bus.stats.snapshot()['intra_process'] - before == threads * each


def test_two_flushes_at_once_send_a_batch_once_and_neither_fails(bus):
    """destroy() flushes off the executor's thread while the batch timer may flush: both look
    at the same outlet; the one that finds it already sent moves on."""
    outlet = bus._outlet('load.twoflush', 'batched')
    outlet.pending.append(b'not sent for real')   # one pending batch (its bytes never sent)
    outlet.pending_first_seq = 1
    bus._batching[outlet.topic] = outlet
    looks = threading.Semaphore(0)

    class Watched(dict):
        def items(self):
            looks.release()
            return super().items()
    bus._batching = Watched(bus._batching)
    in_write, go_on, writes, errors = threading.Event(), threading.Event(), [], []

    def held_write(out, msg, events):
        writes.append(events)
        in_write.set()
        go_on.wait(30)
        return True
    bus._write = held_write

    def flush():
        try:
            bus.flush()
        except Exception as exc:  # noqa: BLE001 - what the test looks for
            errors.append(exc)
    first = threading.Thread(target=flush)
    first.start()
    assert in_write.wait(30) and looks.acquire(timeout=30)   # the first is sending
    second = threading.Thread(target=flush)
    second.start()
    assert looks.acquire(timeout=30)   # the second has looked: the outlet is in its list too
    go_on.set()
    first.join(30)
    second.join(30)
    assert errors == [] and writes == [1] and outlet.topic not in bus._batching


def test_in_turn_gives_every_item_once_per_round():
    """The slice a periodic report takes of a longer list (BusStats, heartbeats): each item
    once in every ceil(n / count) calls, in order, wrapping; a short list whole."""
    from loom_ros.bus.bus import in_turn
    items, turn, seen = list(range(10)), 0, []
    for _ in range(3):
        part, turn = in_turn(items, turn, 4)
        assert len(part) == 4
        seen += part
    assert seen[:10] == items and seen[10:] == [0, 1]   # the third call wraps
    assert in_turn(items, 7, 10) == (items, 7) and in_turn([], 3, 1) == ([], 3)
