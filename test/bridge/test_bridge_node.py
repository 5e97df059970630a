"""The bridge node across real processes on loopback: a Zenoh router process, the bridge in its
own process, this process as the robot's other nodes (ROS side) and as the fleet (Zenoh side)."""
import signal

import numpy

from loom_ros.bridge import codec
from loom_ros.bus.event import Event, Privacy
from loom_ros.security.audit import AuditLog

BACKGROUND_QOS = ('log.**=background',)


class Fleet:
    """A Zenoh subscriber recording samples (key, QoS as seen on the Zenoh side, decoded event)."""

    def __init__(self, session, key_expr: str):
        self.samples = []
        self.sub = session.declare_subscriber(key_expr, self._on)

    def _on(self, sample):
        # One sample may be a batch of events (codec version 2): one entry per event.
        for event in codec.decode_all(sample.payload.to_bytes()):
            self.samples.append((str(sample.key_expr), sample.priority,
                                 sample.congestion_control, sample.express, event))

    def events(self, key=None):
        return [s[4] for s in list(self.samples) if key is None or s[0] == key]

    def ids(self, key=None):
        return [e.id for e in self.events(key)]


def test_qos_mapping_metadata_privacy_and_inbound(ros, port, zenoh_router, zsession, bridge,
                                                  robot_bus, wait_subscribed):
    import zenoh
    zenoh_router(port)
    proc, status, audit = bridge(
        '/r1', port, out_allow=['agent.*.intent', 'sensor.imu.motion', 'log.**'],
        inbound=['fleet.**'], bus={'topic_qos': [*BACKGROUND_QOS, 'sensor.**=realtime',
                                                  'agent.*.intent=batched']})
    bus = robot_bus('/r1', BACKGROUND_QOS)
    session = zsession(port)
    fleet = Fleet(session, 'loom/*/agent/*/intent')
    everything = Fleet(session, 'loom/r1/**')
    intent, imu, log = 'agent.counter.intent', 'sensor.imu.motion', 'log.robot'
    for topic in (intent, imu, log):
        wait_subscribed(bus, topic, alive=[proc])

    # Batched: privacy tiers interleaved, then a public sentinel; order per key is kept, so once
    # the sentinel is seen anything the gate had let through would have been seen too.
    public = Event.with_json('intent', {'go': 1}, source='counter', metadata={'k': 'v', 'ü': 'ß'},
                             confidence=0.25, tags=['a', 'b'], priority=-3, frame_id='base')
    sent = [
        Event(type='intent', payload=b'private', privacy=Privacy.PRIVATE),
        Event(type='intent', payload=b'local', privacy=Privacy.LOCAL_ONLY),
        Event(type='intent', payload=b'raw words', privacy=Privacy.SENSITIVE),
        Event(type='intent.embedding', payload=numpy.array([0.6, 0.8], '<f4').tobytes(),
              privacy=Privacy.SENSITIVE, metadata={'dim': '2', 'count': '1'}),
        public,
    ]
    for event in sent:
        bus.publish(intent, event)
    key = 'loom/r1/agent/counter/intent'
    # Both subscribers: Zenoh hands one sample to the session's matching callbacks one after
    # the other, so the first may have it while the second is still to be called.
    ros.wait_for(lambda: public.id in fleet.ids() and public.id in everything.ids(),
                 'the public intent at both subscribers', alive=[proc])
    assert fleet.ids(key) == [sent[3].id, public.id]  # Private, LocalOnly, raw Sensitive never seen
    assert everything.ids(key) == [sent[3].id, public.id]
    assert fleet.events()[1] == public                  # every field and metadata intact
    _, priority, congestion, express, _ = fleet.samples[-1]
    assert (priority, congestion, express) == (zenoh.Priority.DATA,
                                               zenoh.CongestionControl.BLOCK, False)

    # Background and Realtime topics, as observed on the Zenoh side.
    bus.publish(log, Event(type='log', payload=b'note'))
    ros.wait_for(lambda: everything.events('loom/r1/log/robot'), 'the background event')
    sample = [s for s in everything.samples if s[0] == 'loom/r1/log/robot'][0]
    assert sample[1:4] == (zenoh.Priority.BACKGROUND, zenoh.CongestionControl.BLOCK, False)
    # Realtime is best effort end to end: publish until one arrives.
    ros.wait_for(lambda: everything.events('loom/r1/sensor/imu/motion'), 'a realtime event',
                 spin=lambda: bus.publish(imu, Event(type='imu')), alive=[proc])
    sample = [s for s in everything.samples if s[0] == 'loom/r1/sensor/imu/motion'][0]
    assert sample[1:4] == (zenoh.Priority.REAL_TIME, zenoh.CongestionControl.DROP, True)

    # Each refusal is counted and audited.
    ros.wait_for(lambda: status.get('refused_sensitive_raw') == 1, 'the refusal counters')
    assert (status.get('refused_private'), status.get('refused_local_only')) == (1, 1)
    log = AuditLog(audit.with_suffix('.db'))   # rows of the bridge's audit_db
    records = [r['fields'] for r in log.query(plugin='zenoh_bridge', kind='privacy_refused')]
    log.close()
    assert [(r['reason'], r['event_id']) for r in records] == [
        ('private', sent[0].id), ('local_only', sent[1].id), ('sensitive_raw', sent[2].id)]

    # Inbound: a fleet command under this robot's key reaches the bus, intact.
    got = []
    bus.subscribe('fleet.cmd', lambda e, t: got.append(e))
    command = Event.with_json('cmd', {'stop': True}, metadata={'from': 'fleet'})
    ros.wait_for(lambda: bool(got), 'the fleet command on the robot bus',
                 spin=lambda: session.put('loom/r1/fleet/cmd', codec.encode(command)),
                 alive=[proc])
    assert got[0] == command
    session.put('loom/r1/fleet/cmd', b'\x01garbage')  # malformed: counted, not a crash
    ros.wait_for(lambda: status.get('rejected_malformed') >= 1, 'the malformed sample counted',
                 alive=[proc])


def test_router_restart_loses_nothing_within_the_bound(ros, port, zenoh_router, zsession, bridge,
                                                       robot_bus, wait_subscribed):
    router = zenoh_router(port)
    proc, status, _ = bridge('/rs', port, out_allow=['agent.*.intent'], buffer_max_events=40)
    bus = robot_bus('/rs')
    session = zsession(port)
    fleet = Fleet(session, 'loom/*/agent/*/intent')
    topic = 'agent.counter.intent'
    wait_subscribed(bus, topic, alive=[proc])
    first = Event(type='intent', payload=b'before')
    bus.publish(topic, first)
    ros.wait_for(lambda: fleet.ids() == [first.id], 'the first event through', alive=[proc])

    def outage(count):
        # A fresh 'connected' first: after a restart the last status can still say
        # disconnected, and events put before the bridge sees the router die are gone with it.
        ros.wait_for(lambda: status.get('connected') is True, 'the bridge connected',
                     alive=[proc])
        router.popen.send_signal(signal.SIGKILL)
        router.popen.wait()
        ros.wait_for(lambda: not status.get('connected', True), 'the bridge to see the router go',
                     alive=[proc])
        before = status.get('buffered')
        events = [Event(type='intent', payload=str(i).encode()) for i in range(count)]
        for event in events:
            bus.publish(topic, event)
        ros.wait_for(lambda: status.get('buffered') == before + count,
                     f'{count} events in the outbox', alive=[proc])
        return events, zenoh_router(port)

    # Within the bound: every event arrives, in order, after the router comes back.
    events, router = outage(30)
    ros.wait_for(lambda: len(fleet.ids()) == 31, 'the buffered events after the restart',
                 alive=[proc])
    assert fleet.ids() == [first.id] + [e.id for e in events]
    assert status.get('dropped_outbox_full') == 0

    # Beyond it: the newest 40 arrive in order, the 10 oldest are dropped and counted.
    events, router = outage(50)
    ros.wait_for(lambda: len(fleet.ids()) == 71, 'the newest 40 after the second restart',
                 alive=[proc])
    assert fleet.ids()[31:] == [e.id for e in events[10:]]
    ros.wait_for(lambda: status.get('dropped_outbox_full') == 10, 'the drops counted')


def test_two_robots_stay_apart(ros, port, zenoh_router, zsession, bridge, robot_bus,
                               wait_subscribed):
    zenoh_router(port)
    procs, buses, inbound = {}, {}, {}
    for robot in ('ta', 'tb'):
        procs[robot], _, _ = bridge(f'/{robot}', port, out_allow=['agent.*.intent'],
                                    inbound=['fleet.**', 'agent.*.intent'])
        buses[robot] = robot_bus(f'/{robot}')
        inbound[robot] = []
        buses[robot].subscribe('fleet.cmd', lambda e, t, r=robot: inbound[r].append(e))
        wait_subscribed(buses[robot], 'agent.counter.intent', alive=[procs[robot]])
    session = zsession(port)
    fleet = Fleet(session, 'loom/*/agent/*/intent')
    alive = list(procs.values())

    # (Unique robot ids per test: a killed bridge's DDS endpoints outlive it for a while.)
    # Each robot's intents reach the fleet under its own key, and never the other robot's bus.
    seen = {r: [] for r in procs}
    for robot in procs:
        buses[robot].subscribe('agent.counter.intent', lambda e, t, r=robot: seen[r].append(e.id))
    e1, e2 = Event(type='intent', payload=b'ta'), Event(type='intent', payload=b'tb')
    buses['ta'].publish('agent.counter.intent', e1)
    buses['tb'].publish('agent.counter.intent', e2)
    ros.wait_for(lambda: len(fleet.samples) == 2, 'both robots at the fleet', alive=alive)
    assert sorted((s[0], s[4].id) for s in fleet.samples) == [
        ('loom/ta/agent/counter/intent', e1.id), ('loom/tb/agent/counter/intent', e2.id)]

    # A command for r2 reaches r2 only; one for r1 afterwards proves r1 was listening.
    for_r2 = Event(type='cmd', payload=b'tb')
    ros.wait_for(lambda: bool(inbound['tb']), 'the command at r2', alive=alive,
                 spin=lambda: session.put('loom/tb/fleet/cmd', codec.encode(for_r2)))
    for_r1 = Event(type='cmd', payload=b'ta')
    ros.wait_for(lambda: bool(inbound['ta']), 'the command at r1', alive=alive,
                 spin=lambda: session.put('loom/ta/fleet/cmd', codec.encode(for_r1)))
    assert {e.id for e in inbound['ta']} == {for_r1.id}
    assert {e.id for e in inbound['tb']} == {for_r2.id}
    assert seen['ta'] == [e1.id] and seen['tb'] == [e2.id]
