"""Issue 14 across real processes: a Zenoh router, the bridge in its own process, this process as
the robot's bus and as outsiders on the same router. The issue's attack (unsigned robot.move
samples under loom/<robot>/fleet/robot/move) reaches nothing; another robot's identity without
the grant is refused and audited; the operator's signed move is delivered and audited with its
name; a replay is refused; a flood is bounded by the rule's rate. Sensitive data going up is
ciphertext to anyone but the cloud identity."""
import numpy
import pytest
import zenoh

from loom_ros.bridge import codec
from loom_ros.bridge.core import open_sealed
from loom_ros.bridge.inbound import send_command, sign_sample
from loom_ros.bus.event import Event, EventRejected, Privacy
from loom_ros.security import keys
from loom_ros.security.audit import AuditLog

MOVE = 'fleet.robot.move'
CONTRACT = {
    'rules': [{'key': MOVE, 'privacy': 'public', 'rate': 1000, 'burst': 1000, 'grant': MOVE},
              {'key': 'fleet.note', 'privacy': 'sensitive', 'rate': 0.001, 'burst': 5},
              {'key': 'fleet.ping', 'privacy': 'public', 'rate': 1000, 'burst': 1000},
              # overlaps every rule above, as the shipped contract's last rule does: a sample
              # must still be taken once (the move was also counted as its own replay)
              {'key': 'fleet.**', 'privacy': 'sensitive', 'rate': 1000, 'burst': 1000}],
    'grants': {'operator': [MOVE]},
    'actuators': ['fleet.robot.**'],
}


@pytest.fixture(scope='module')
def zenoh_keys_root(fleet):
    """One authority for the router, the test sessions and the bridge (mutual TLS): the
    'outsider' below is an authenticated operator session on the link; what is tested here is
    the bridge's own check of each command's signer."""
    return fleet[0]


def move(x):
    return Event.with_json('robot.move', {'linear': {'x': x}, 'angular': {'z': 0.0}})


def test_inbound_commands_need_a_granted_signed_fresh_sender(ros, port, zenoh_router, zsession,
                                                             bridge, robot_bus, fleet, tmp_path,
                                                             spawn):
    root, ids = fleet
    zenoh_router(port)
    proc, status, _ = bridge('/ri', port, inbound=CONTRACT, keys_dir=str(root))
    bus = robot_bus('/ri')
    moves, notes, pings = [], [], []
    bus.subscribe(MOVE, lambda e, t: moves.append(e))   # what robot_control listens on
    bus.subscribe('fleet.note', lambda e, t: notes.append(e))
    bus.subscribe('fleet.ping', lambda e, t: pings.append(e))
    outsider = zsession(port)
    key = 'loom/ri/fleet/robot/move'
    # The bridge declared its subscriptions together: once a ping is through, routes exist.
    ros.wait_for(lambda: bool(pings), 'a ping on the robot bus', alive=[proc],
                 spin=lambda: outsider.put('loom/ri/fleet/ping', codec.encode(Event(type='p'))))

    # The attack: 20 unsigned moves from an outsider. None reaches the bus.
    for i in range(20):
        outsider.put(key, codec.encode(move(0.5)), congestion_control=zenoh.CongestionControl.BLOCK)
    ros.wait_for(lambda: status.get('refused_unsigned') == 20, 'the 20 unsigned moves counted',
                 alive=[proc])

    # robot2's identity signs a move for this robot: it holds no grant.
    outsider.put(key, sign_sample(ids['robot2'], key, move(0.3)))
    ros.wait_for(lambda: status.get('refused_not_granted') == 1, "robot2's move refused",
                 alive=[proc])

    # The operator (through the operator's tool), then the same bytes replayed.
    signed = sign_sample(ids['ops'], key, move(0.2))
    outsider.put(key, signed)
    ros.wait_for(lambda: len(moves) == 1, "the operator's move on the bus", alive=[proc])
    outsider.put(key, signed)
    ros.wait_for(lambda: status.get('refused_replayed') == 1, 'the replay refused', alive=[proc])
    send_command(outsider, ids['ops'], 'ri', MOVE, move(0.1))
    ros.wait_for(lambda: len(moves) == 2, "the operator's tool's move on the bus", alive=[proc])
    assert [e.payload for e in moves] == [move(0.2).payload, move(0.1).payload]
    # The operator's command line tool: mutual TLS as its signer (it opened plain TCP, which
    # this router refuses), tcp/ meaning tls/ as everywhere.
    code, out, err = spawn('-m', 'loom_ros.bridge.inbound', 'ri', MOVE, '{"linear": {"x": 0.05}}',
                           '--as', 'ops', '--keys-dir', str(root),
                           '--connect', f'tcp/127.0.0.1:{port}').finish()
    assert code == 0 and out.strip() == 'loom/ri/fleet/robot/move', err
    ros.wait_for(lambda: len(moves) == 3, "the command line tool's move on the bus", alive=[proc])
    assert moves[2].source == 'operator/ops'
    code, out, err = spawn('-m', 'loom_ros.bridge.inbound', 'ri', MOVE, '{}', '--as', 'ops',
                           '--keys-dir', str(root), '--insecure',
                           '--connect', f'tcp/127.0.0.1:{port}').finish()
    assert code == 1 and 'INSECURE' in err and 'cannot open the Zenoh session' in err

    # A flood on a data rule: at most its burst delivered, the rest counted.
    for i in range(50):
        outsider.put('loom/ri/fleet/note', codec.encode(Event(type='note', payload=b'%d' % i)),
                     congestion_control=zenoh.CongestionControl.BLOCK)
    ros.wait_for(lambda: status.get('refused_rate_limited') == 45, 'the flood rate-limited',
                 alive=[proc])
    ros.wait_for(lambda: len(notes) == 5, 'the burst on the bus', alive=[proc])
    assert all(e.privacy is Privacy.SENSITIVE for e in notes)   # the rule's privacy

    # Every command and refusal on the actuator topic is in the audit log, with its sender.
    audit = AuditLog(tmp_path / 'ri_audit.db')
    commands = audit.query(plugin='zenoh_bridge', kind='inbound_command')
    assert {r['fields']['sender'] for r in commands} == {'ops'}
    assert len(commands) == 3
    refused = {(r['fields']['reason'], r['fields'].get('sender'))
               for r in audit.query(plugin='zenoh_bridge', kind='inbound_refused')}
    assert {('unsigned', None), ('not_granted', 'robot2'), ('replayed', 'ops')} <= refused
    replayed = [r for r in audit.query(plugin='zenoh_bridge', kind='inbound_refused')
                if r['fields']['reason'] == 'replayed']
    assert len(replayed) == 1   # the one real replay, not each command again
    ros.wait_for(lambda: status.get('received') == 3 + 5 + len(pings),
                 'each delivered sample counted once', alive=[proc])
    audit.close()
    assert proc.popen.poll() is None


def test_sensitive_data_going_up_is_sealed_to_the_cloud(ros, port, zenoh_router, zsession,
                                                        bridge, robot_bus, wait_subscribed,
                                                        fleet):
    root, ids = fleet
    zenoh_router(port)
    proc, status, _ = bridge('/rs2', port, out_allow=['text.embedding', 'agent.*.intent'],
                             keys_dir=str(root))
    bus = robot_bus('/rs2')
    outsider = zsession(port)
    seen = []
    sub = outsider.declare_subscriber('loom/rs2/**', lambda s: seen.append(
        (str(s.key_expr), s.payload.to_bytes())))
    for topic in ('text.embedding', 'agent.a.intent'):
        wait_subscribed(bus, topic, alive=[proc])
    vectors = numpy.random.default_rng(3).normal(size=(1, 8))
    vectors /= numpy.linalg.norm(vectors)
    payload = vectors.astype('<f4').tobytes()
    embedding = Event(type='text.embedding', payload=payload, privacy=Privacy.SENSITIVE,
                      metadata={'dim': '8', 'count': '1', 'utterance': 'my pin is 4242'})
    public = Event(type='intent', payload=b'wave')
    bus.publish('text.embedding', embedding)
    bus.publish('agent.a.intent', public)   # batched, after it: once it is seen, so is the first
    ros.wait_for(lambda: len(seen) == 2, 'both events at the outsider', alive=[proc])
    (key, data), = [s for s in seen if s[0] == 'loom/rs2/text/embedding']
    assert payload not in data and b'4242' not in data and b'embedding' not in data
    with pytest.raises(EventRejected):
        codec.decode(data)
    with pytest.raises(keys.CredentialsError):
        open_sealed(ids['robot2'], key, data)   # another fleet identity cannot read it either
    assert open_sealed(ids['cloud'], key, data) == embedding
    assert codec.decode([d for k, d in seen if k != key][0]) == public   # public stays plain
    ros.wait_for(lambda: status.get('sealed') == 1, 'the sealed count', alive=[proc])
    sub.undeclare()
