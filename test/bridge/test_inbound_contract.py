"""The inbound contract in the bridge's core, with injected clocks: declared rules only, privacy
set by the rule, rates, and actuator commands only from signed, granted, fresh senders; every
refusal counted and audited. And Sensitive payloads sealed on the way out."""
import numpy
import pytest

from bridge_doubles import Clock, command_bridge, move
from loom_ros.bridge import codec
from loom_ros.bridge.core import open_sealed
from loom_ros.bridge.inbound import ContractError, InboundContract, sign_sample
from loom_ros.bus.event import Event, EventRejected, Privacy
from loom_ros.security import sealed
from loom_ros.security.keys import CredentialsError

MOVE_KEY = 'loom/r1/fleet/robot/move'
CONTRACT = {
    'rules': [
        {'key': 'fleet.robot.move', 'privacy': 'public', 'rate': 1, 'burst': 3,
         'grant': 'fleet.robot.move'},
        {'key': 'fleet.**', 'privacy': 'sensitive', 'rate': 2, 'burst': 2},
    ],
    'grants': {'operator': ['fleet.robot.move']},
    'actuators': ['fleet.robot.**'],
    'replay_window_s': 30,
}


def make(fleet, clock, seal=False):
    root, ids = fleet
    return command_bridge(root, clock, CONTRACT, seal_to=sealed.recipient_key(
        ids['cloud'].cert_pem()) if seal else None)


def test_only_a_granted_signed_fresh_command_reaches_an_actuator(fleet):
    clock = Clock()
    bridge, audit = make(fleet, clock)
    _, ids = fleet
    # The attack: unsigned robot.move samples. None delivered, all counted.
    for _ in range(20):
        assert bridge.receive(MOVE_KEY, codec.encode(move())) is None
    assert bridge.stats['refused_unsigned'] == 20 and bridge.stats['received'] == 0
    # Audited, but a flood is throttled to one record per reason per second.
    assert [(r['kind'], r['reason']) for r in audit] == [('inbound_refused', 'unsigned')]
    # Another robot's identity, validly signed, without the grant.
    assert bridge.receive(MOVE_KEY, sign_sample(ids['robot2'], MOVE_KEY, move(),
                                                ts_ms=clock.ms())) is None
    assert bridge.stats['refused_not_granted'] == 1
    assert audit[-1]['sender'] == 'robot2' and audit[-1]['reason'] == 'not_granted'
    # A forged signature (the operator's certificate, robot2's key) and a sample signed for
    # another key (robot2's move, moved under robot1's key) are bad signatures.
    good = sign_sample(ids['ops'], MOVE_KEY, move(), ts_ms=clock.ms())
    forged = bytearray(good)
    forged[-5] ^= 1   # inside the event: the signature no longer covers it
    clock.s += 1
    assert bridge.receive(MOVE_KEY, bytes(forged)) is None
    other = sign_sample(ids['ops'], 'loom/r2/fleet/robot/move', move(), ts_ms=clock.ms())
    clock.s += 1
    assert bridge.receive(MOVE_KEY, other) is None
    assert bridge.stats['refused_bad_signature'] == 2
    # The operator: delivered, its privacy the rule's, audited with its name.
    clock.s += 1
    topic, event = bridge.receive(MOVE_KEY, good)
    assert topic == 'fleet.robot.move' and event.privacy is Privacy.PUBLIC
    assert 'privacy' not in event.metadata     # the sender's say is dropped
    assert audit[-1]['kind'] == 'inbound_command' and audit[-1]['sender'] == 'ops'
    assert audit[-1]['sender_role'] == 'operator' and audit[-1]['event_id'] == event.id
    # The same bytes again: a replay. A sample older than the window: stale.
    clock.s += 1
    assert bridge.receive(MOVE_KEY, good) is None
    clock.s += 1
    old = sign_sample(ids['ops'], MOVE_KEY, move(), ts_ms=clock.ms() - 31_000)
    assert bridge.receive(MOVE_KEY, old) is None
    assert (bridge.stats['refused_replayed'], bridge.stats['refused_stale']) == (1, 1)
    assert bridge.stats['received'] == 1


def test_a_command_signed_before_the_bridge_started_is_refused_after_a_restart(fleet):
    # Review finding: the nonces live in memory, so a bridge rebuilt by configure (a crash, a
    # respawn) forgot them and an executed command passed again within the window.
    clock = Clock()
    first, _ = make(fleet, clock)
    _, ids = fleet
    good = sign_sample(ids['ops'], MOVE_KEY, move(), ts_ms=clock.ms())
    assert first.receive(MOVE_KEY, good) is not None
    clock.s += 5                      # well within the 30 s window
    restarted, audit = make(fleet, clock)
    assert restarted.receive(MOVE_KEY, good) is None
    assert restarted.stats['refused_before_start'] == 1 and restarted.stats['received'] == 0
    assert audit[-1]['reason'] == 'before_start' and audit[-1]['sender'] == 'ops'
    # What is signed from the restart on is taken; one signed a moment before is not (the
    # price: a sender whose clock is behind is refused for that long after a restart).
    late = sign_sample(ids['ops'], MOVE_KEY, move(0.3), ts_ms=clock.ms() - 1)
    assert restarted.receive(MOVE_KEY, late) is None
    fresh = sign_sample(ids['ops'], MOVE_KEY, move(0.4), ts_ms=clock.ms())
    assert restarted.receive(MOVE_KEY, fresh) is not None
    assert restarted.stats['refused_before_start'] == 2


def test_refused_senders_do_not_spend_the_granted_rate(fleet):
    # Review finding: the move rule's bucket was taken before the signature and grant checks,
    # so 20 samples from a sender without the grant left the operator's stop rate-limited.
    clock = Clock()
    bridge, _ = make(fleet, clock)
    _, ids = fleet
    for _ in range(20):
        bogus = sign_sample(ids['robot2'], MOVE_KEY, move(), ts_ms=clock.ms())
        assert bridge.receive(MOVE_KEY, bogus) is None
    replay = sign_sample(ids['ops'], MOVE_KEY, move(), ts_ms=clock.ms())
    assert bridge.receive(MOVE_KEY, replay) is not None
    for _ in range(5):
        assert bridge.receive(MOVE_KEY, replay) is None       # replays spend nothing either
    got = [bridge.receive(MOVE_KEY, sign_sample(ids['ops'], MOVE_KEY, move(), ts_ms=clock.ms()))
           for _ in range(2)]
    assert all(g is not None for g in got)                      # the rule's burst of 3, whole
    assert (bridge.stats['refused_not_granted'], bridge.stats['refused_replayed'],
            bridge.stats['refused_rate_limited']) == (20, 5, 0)
    # The operator's own excess is still limited by the rule.
    extra = sign_sample(ids['ops'], MOVE_KEY, move(), ts_ms=clock.ms())
    assert bridge.receive(MOVE_KEY, extra) is None and bridge.stats['refused_rate_limited'] == 1
    # What reaches the signature check is bounded per claimed sender (VERIFY_FACTOR x the
    # rule's burst). Review finding: one bound per rule let robot2 (no grant) or a replayer
    # use it up, and then the operator's stop was refused. Both are now refused before any
    # signature check and spend nothing of the operator's.
    from loom_ros.bridge.core import VERIFY_FACTOR
    for _ in range(5 * VERIFY_FACTOR):
        bridge.receive(MOVE_KEY, sign_sample(ids['robot2'], MOVE_KEY, move(), ts_ms=clock.ms()))
        bridge.receive(MOVE_KEY, replay)
    assert bridge.stats['refused_verify_rate_limited'] == 0
    assert bridge.stats['refused_not_granted'] == 20 + 5 * VERIFY_FACTOR
    clock.s += 3   # the operator's rule refills (rate 1/s)
    assert bridge.receive(MOVE_KEY, sign_sample(ids['ops'], MOVE_KEY, move(),
                                                ts_ms=clock.ms())) is not None
    # Review finding: the operator's certificate with bad signatures (anyone holds a copy of
    # it) spent the operator's own bound, and then its stop was refused. Forgeries now spend
    # the failure budgets, never the sender's (test_forged_flood_... below).
    good = sign_sample(ids['ops'], MOVE_KEY, move(), ts_ms=clock.ms())
    forged = bytearray(good)
    forged[-5] ^= 1
    for _ in range(3 * VERIFY_FACTOR):
        assert bridge.receive(MOVE_KEY, bytes(forged)) is None
    assert bridge.stats['refused_bad_signature'] == 3 * VERIFY_FACTOR
    assert bridge.receive(MOVE_KEY, good) is not None
    assert bridge.stats['refused_verify_rate_limited'] == 0


def test_rate_limit_counts_the_excess_and_refills_with_the_clock(fleet):
    clock = Clock()
    bridge, _ = make(fleet, clock)
    data = codec.encode(Event(type='note', payload=b'x', privacy=Privacy.PUBLIC))
    got = [bridge.receive('loom/r1/fleet/note', data) for _ in range(10)]
    assert sum(g is not None for g in got) == 2 and bridge.stats['refused_rate_limited'] == 8
    assert got[0][1].privacy is Privacy.SENSITIVE   # the rule's privacy, not the sender's
    clock.s += 0.5                                  # 2/s: one more token
    assert bridge.receive('loom/r1/fleet/note', data) is not None
    assert bridge.receive('loom/r1/fleet/note', data) is None


def test_no_rule_or_a_wildcard_to_an_actuator_is_refused(fleet):
    clock = Clock()
    bridge, _ = make(fleet, clock)
    data = codec.encode(move())
    assert bridge.receive('loom/r1/agent/x/intent', data) is None      # no rule
    assert bridge.stats['denied_inbound'] == 1
    # fleet.robot.stop is under the actuators but only the fleet.** rule (no grant) matches it
    assert bridge.receive('loom/r1/fleet/robot/stop', data) is None
    assert bridge.stats['refused_actuator_without_grant'] == 1


def test_an_audit_log_that_cannot_write_refuses_the_command(fleet):
    clock = Clock()
    bridge, _ = make(fleet, clock)

    def broken(record):
        raise OSError('disk full')
    bridge.command_audit = broken
    _, ids = fleet
    assert bridge.receive(MOVE_KEY, sign_sample(ids['ops'], MOVE_KEY, move(),
                                                ts_ms=clock.ms())) is None
    assert bridge.stats['refused_audit_failed'] == 1 and bridge.stats['received'] == 0


def test_contract_errors_name_the_rule():
    for doc, words in [
        ({'rules': [{'key': 'fleet.robot.move', 'privacy': 'public', 'rate': 1}],
          'actuators': ['fleet.robot.**']}, 'needs a grant'),
        ({'rules': [{'key': 'a', 'privacy': 'secret', 'rate': 1}]}, 'privacy'),
        ({'rules': [{'key': 'a', 'privacy': 'public', 'rate': 0}]}, 'rate'),
        ({'rules': [{'key': 'a/b', 'privacy': 'public', 'rate': 1}]}, 'a/b'),
        ({'rules': [{'key': 'a', 'privacy': 'public'}]}, 'needs key, privacy and rate'),
        ({'grants': {'ops': 'fleet.robot.move'}}, 'grants.ops'),
        ({'rule': []}, 'unknown keys'),
    ]:
        with pytest.raises(ContractError, match=words):
            InboundContract.parse(doc)


def test_sensitive_payloads_leave_sealed_to_the_cloud(fleet):
    _, ids = fleet
    bridge, _ = make(fleet, Clock(), seal=True)
    vector = numpy.array([0.6, 0.8], '<f4').tobytes()
    embedding = Event(type='text.embedding', payload=vector, privacy=Privacy.SENSITIVE,
                      metadata={'dim': '2', 'count': '1'})
    public = Event(type='intent', payload=b'hello')
    assert bridge.send(embedding, 'text.embedding') == 'sent'
    assert bridge.send(public, 'agent.a.intent') == 'sent'
    (key, data), (_, plain) = bridge.transport.puts
    assert bridge.stats['sealed'] == 1 and codec.decode(plain) == public
    with pytest.raises(EventRejected):
        codec.decode(data)                      # an outsider cannot read it as an event
    assert vector not in data
    assert open_sealed(ids['cloud'], key, data) == embedding
    for wrong, at in ((ids['robot2'], key), (ids['cloud'], 'loom/r2/text/embedding')):
        with pytest.raises(CredentialsError):
            open_sealed(wrong, at, data)
