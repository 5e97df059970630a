"""The bridge composed with the robot's other nodes in one process (`loom bringup --composition`,
launch's use_composition): built from the node table as bring-up builds it, spun by its own
executor on its own thread, with the publishers' events handed over in-process by the bus (no DDS
hop, so none is lost before the bridge takes it). Through a real Zenoh router process with
mutual TLS and access control on loopback, to a Zenoh subscriber in a process of its own (in
this one it would wait for the GIL the publishing loop holds, and the router drops Realtime
samples for a receiver that falls behind: Zenoh's best effort, raw Zenoh's too).

This file also runs as that subscriber: `python test_composed.py ENDPOINT KEYS_DIR KEY_EXPR`
prints `ready`, then `<key> <event id>` for each event it receives."""
import json
import os
import sys
import threading

import pytest
import yaml

ROBOT = 'composed1'
REALTIME, BATCHED = 'sensor.imu.motion', 'agent.bench.intent'
BURST = 2000


def subscriber_main(ep: str, keys_dir: str, key_expr: str) -> None:
    """The child: a Zenoh subscriber as the test operator that answers `count` with
    {key: events received} and `ids` with {key: [event ids]} (one JSON line each). Its callback
    only keeps the sample: the router drops Realtime samples for a receiver that does not keep
    up, so Zenoh's receiving thread must not wait on decoding or printing."""
    import zenoh
    from loom_ros.bridge import codec
    from loom_ros.bridge.zenoh_link import session_config
    from loom_ros.security import keys
    samples = []
    session = zenoh.open(session_config('client', [ep], identity=keys.load(keys_dir, 'tester')))
    sub = session.declare_subscriber(
        key_expr, lambda sample: samples.append((str(sample.key_expr),
                                                 sample.payload.to_bytes())))
    print('ready', flush=True)
    for line in sys.stdin:
        got = {}
        if line.strip() == 'count':
            for key, data in list(samples):
                got[key] = got.get(key, 0) + codec.event_count(data)
        elif line.strip() == 'ids':
            for key, data in list(samples):
                got.setdefault(key, []).extend(e.id for e in codec.decode_all(data))
        else:
            break
        print(json.dumps(got), flush=True)
    sub.undeclare()
    session.close()


if __name__ == '__main__':
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
    subscriber_main(*sys.argv[1:4])
    sys.exit(0)

from link_fixtures import endpoint, test_fleet  # noqa: E402
from harness import LinePeer  # noqa: E402
from loom_ros.bus.event import Event, Privacy  # noqa: E402
from loom_ros.security import keys  # noqa: E402
from loom_ros.security.audit import AuditLog  # noqa: E402


@pytest.fixture(scope='module')
def zenoh_keys(zenoh_keys_root):
    """The test fleet plus this module's robot (the router knows those issued before it starts)."""
    root = test_fleet(zenoh_keys_root)
    keys.ensure_local(root, {ROBOT: 'robot'})
    return root


class Received:
    """What the subscriber process received, by Zenoh key."""

    def __init__(self, port: int, keys_dir):
        self.peer = LinePeer('zenoh subscriber', [__file__, endpoint(port, True), str(keys_dir),
                                                  f'loom/{ROBOT}/**'], dict(os.environ))
        self.peer.wait_line(lambda line: line == 'ready', 'ready')

    def _ask(self, what: str) -> dict:
        self.peer.tell(what)
        return json.loads(self.peer.wait_line(lambda line: line.startswith('{'), what))

    def count(self, key: str) -> int:
        return self._ask('count').get(key, 0)

    def ids(self, key: str) -> list[str]:
        return self._ask('ids').get(key, [])


@pytest.fixture
def composed_bridge(port, zenoh_keys, tmp_path):
    """start() builds the bridge node in this process (namespace /ROBOT, TLS to the test
    router), configures and activates it, and spins it on a thread of its own."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter
    from rclpy.task import Future

    from loom_ros.bringup.nodes import by_name
    from loom_ros.bus.executor import finalize_node, make_executor, spin_until
    made = []

    def start():
        inbound = tmp_path / 'inbound.yaml'
        inbound.write_text(yaml.safe_dump({'rules': []}))
        params = {'robot_id': ROBOT, 'mode': 'client', 'connect': [endpoint(port, True)],
                  'out_allow': [REALTIME, BATCHED], 'inbound_file': str(inbound),
                  'audit_db': str(tmp_path / 'audit.db'), 'keys_dir': str(zenoh_keys),
                  'seal_sensitive': 'off', 'status_period_s': 0.05, 'autostart': False,
                  'storage.root': str(tmp_path / 'root'), 'bus.discovery_period_s': 0.1}
        node = by_name('zenoh_bridge').load_class()(
            namespace=f'/{ROBOT}',
            parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        executor = make_executor()
        stop = Future()
        thread = threading.Thread(target=spin_until, args=(executor, stop), daemon=True)
        made.append((node, executor, stop, thread))
        for step in ('configure', 'activate'):
            assert getattr(node, f'trigger_{step}')() == TransitionCallbackReturn.SUCCESS, \
                node.configure_error
        executor.add_node(node)
        thread.start()
        return node
    yield start
    for node, executor, stop, thread in made:
        stop.set_result(True)
        thread.join(10.0)
        executor.shutdown()
        finalize_node(node)   # shutdown transition: the Zenoh session is closed
        node.destroy_node()


def stats(node) -> dict:
    with node._lock:
        return dict(node.bridge.stats)


def test_composed_bridge_carries_a_realtime_burst_in_process(ros, port, zenoh_router, zenoh_keys,
                                                             composed_bridge, robot_bus,
                                                             wait_subscribed, tmp_path):
    zenoh_router(port)   # mutual TLS and access control
    node = composed_bridge()
    ros.wait_for(lambda: node.link.connected, 'the composed bridge to reach the router')
    bus = robot_bus(f'/{ROBOT}')
    seen = Received(port, zenoh_keys)
    rt_key, batch_key = f'loom/{ROBOT}/sensor/imu/motion', f'loom/{ROBOT}/agent/bench/intent'
    try:
        for topic in (REALTIME, BATCHED):
            wait_subscribed(bus, topic)
        # Until one event has come through on each key (the bridge's bus attaches pattern
        # topics on a timer; Zenoh matches the bridge's publisher and the subscriber in its time).
        ros.wait_for(lambda: seen.count(rt_key), 'a first realtime event through the bridge',
                     spin=lambda: bus.publish(REALTIME, Event(type='probe')))
        ros.wait_for(lambda: seen.count(batch_key), 'a first batched event through it',
                     spin=lambda: bus.publish(BATCHED, Event(type='probe')))
        # Probes still on their way may come after these counts: they are told apart by id.
        probes = {key: seen.count(key) for key in (rt_key, batch_key)}
        before, intra0 = stats(node), bus.stats.intra_process

        # A Batched burst from a second publisher thread while this one bursts Realtime:
        # composed, the bridge is entered from both threads (its executor flushes meanwhile).
        other = robot_bus(f'/{ROBOT}')
        batched = [Event(type='intent', payload=b'%d' % i) for i in range(BURST)]
        # Refused and audited on that thread too (the node was configured on this one).
        private = Event(type='intent', payload=b'raw', privacy=Privacy.PRIVATE)

        def publish_batched():
            for n, event in enumerate(batched):
                other.publish(BATCHED, event)
                if n == BURST // 2:
                    other.publish(BATCHED, private)
        worker = threading.Thread(target=publish_batched)
        worker.start()
        realtime = [Event(type='imu', payload=b'x' * 100) for _ in range(BURST)]
        for event in realtime:
            bus.publish(REALTIME, event)
        worker.join()
        want_rt, want_batch = [e.id for e in realtime], [e.id for e in batched]

        # Nothing lost before Zenoh: every event handed over in-process (none through DDS) and
        # put on Zenoh by the bridge, none dropped or failed; the Private one stayed home.
        assert bus.stats.intra_process - intra0 == BURST
        assert other.stats.intra_process == BURST + 1
        after = stats(node)
        assert after['refused_private'] - before.get('refused_private', 0) == 1
        refused = AuditLog(tmp_path / 'audit.db').query(plugin='zenoh_bridge',
                                                        kind='privacy_refused')
        assert [r['fields']['event_id'] for r in refused] == [private.id]
        assert not {k: v for k, v in after.items()
                    if k.startswith(('dropped', 'put_failed', 'buffered'))}
        ros.wait_for(lambda: stats(node)['sent'] - before.get('sent', 0) == 2 * BURST,
                     'the bridge to put both bursts (the last batch leaves on its timer)')

        # Through Zenoh with TLS: the Batched burst (congestion control BLOCK) whole, once each,
        # in order, without the Private one. Realtime is express with congestion control DROP
        # (a late sample is worth nothing): Zenoh drops what it cannot send at once, as it does
        # for a raw put, so a loaded machine may lose some there; what arrives is in order and
        # once each. A last realtime event, sent until one arrives, marks the end.
        ros.wait_for(lambda: seen.count(batch_key) >= probes[batch_key] + BURST,
                     f'{BURST} batched events at the Zenoh subscriber')
        # A probe still on its way when `probes` was counted may have filled in for one of
        # ours: the last one is waited for by id (decoded, once nothing is in flight).
        ros.wait_for(lambda: want_batch[-1] in seen.ids(batch_key), 'the last batched event')
        last = []

        def send_last():
            last.append(Event(type='imu', payload=b'last'))
            bus.publish(REALTIME, last[-1])
        ros.wait_for(lambda: last and set(seen.ids(rt_key)) & {e.id for e in last},
                     'a last realtime event after the burst', spin=send_last)
        ours = set(want_batch) | set(want_rt) | {private.id}
        got_batch = [i for i in seen.ids(batch_key) if i in ours]
        got_rt = [i for i in seen.ids(rt_key) if i in ours]
        assert got_batch == want_batch   # the Private one is not among them
        assert private.id not in seen.ids(batch_key)
        assert len(set(got_rt)) == len(got_rt)
        position = {event_id: n for n, event_id in enumerate(want_rt)}
        assert [position[i] for i in got_rt] == sorted(position[i] for i in got_rt)
        print(f'realtime burst: {len(got_rt)} of {BURST} through Zenoh')

        # Deactivated, the bridge takes nothing more: an event a publisher's thread was already
        # delivering when the subscriptions closed is counted, not left in the outbox.
        from rclpy.lifecycle import TransitionCallbackReturn
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        queued = len(node.bridge.outbox.items)
        node._on_bus_event(Event(type='late'), REALTIME, 0)
        assert stats(node)['refused_inactive'] == 1
        assert len(node.bridge.outbox.items) == queued
    finally:
        seen.peer.close()
