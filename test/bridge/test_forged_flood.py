"""Forged commands under a real member's certificate (review finding: operator lockout). A
certificate is public, so anyone can send samples bearing the operator's with bad signatures;
each spent the operator's own verify bucket and then the operator's commands were refused.
Forgeries now spend failure budgets of their own: the operator's valid commands pass, the
signature checks stay bounded, and the refusals are counted each but audited throttled. Real
certificates from the project's authority code; injected clocks, no sleeping."""
from __future__ import annotations

import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bridge_doubles import Clock, command_bridge, move
from loom_ros.bridge import core
from loom_ros.bridge.inbound import _CERT_LEN, _TAIL, MAGIC, read_signed, sign_sample
from loom_ros.security import keys

MOVE_KEY = 'loom/r1/fleet/robot/move'
CONTRACT = {
    'rules': [{'key': 'fleet.robot.move', 'privacy': 'public', 'rate': 1, 'burst': 3,
               'grant': 'fleet.robot.move'}],
    'grants': {'operator': ['fleet.robot.move']},
    'actuators': ['fleet.robot.**'],
    'replay_window_s': 30,
}


@pytest.fixture(scope='module')
def fleet(tmp_path_factory):
    """Two operators and a robot of one authority: (keys folder, identities)."""
    root = tmp_path_factory.mktemp('keys')
    keys.init_ca(root)
    return root, {name: keys.issue(root, name, role) for name, role in
                  (('ops', 'operator'), ('ops2', 'operator'), ('robot2', 'robot'))}


def make(fleet, clock, contract=CONTRACT, **kwargs):
    return command_bridge(fleet[0], clock, contract, **kwargs)


class Forger:
    """Samples bearing `identity`'s certificate, fresh (its time, a nonce never used) and with
    a well-formed signature of that key over other bytes: what a holder of the public
    certificate and one captured command can send, as fast as it likes."""

    def __init__(self, identity):
        captured = read_signed(sign_sample(identity, MOVE_KEY, move(), ts_ms=0))
        self.head = b''.join((MAGIC, _CERT_LEN.pack(len(captured.cert_pem)),
                              captured.cert_pem, bytes((len(captured.signature),)),
                              captured.signature))
        self.sample = captured.sample
        self.count = 0

    def __call__(self, ts_ms: int) -> bytes:
        self.count += 1
        return self.head + _TAIL.pack(ts_ms, self.count.to_bytes(16, 'big')) + self.sample


def bad_signature_audits(audit):
    return [r for r in audit if r.get('reason') == 'bad_signature']


def test_a_forged_flood_on_the_operators_certificate_leaves_its_commands_through(fleet):
    """100 forgeries a second (10x the operator's own verify bound, under the shared failure
    budget) for 10 s, the operator's command once a second: every command passes, every
    forgery is refused and counted, each costs one check, and a second's forgeries are one
    audit record."""
    _, ids = fleet
    clock = Clock()
    bridge, audit = make(fleet, clock)
    forge = Forger(ids['ops'])
    passed = 0
    for step in range(1000):   # 10 ms apart
        clock.s += 0.01
        if step % 100 == 50:
            passed += bridge.receive(MOVE_KEY, sign_sample(ids['ops'], MOVE_KEY, move(),
                                                           ts_ms=clock.ms())) is not None
        assert bridge.receive(MOVE_KEY, forge(clock.ms())) is None
    assert passed == 10 and bridge.stats['received'] == 10
    assert 100 > core.VERIFY_FACTOR * CONTRACT['rules'][0]['rate']   # over its own bound
    assert 100 < core.FAILED_VERIFIES_PER_S
    assert bridge.stats['refused_bad_signature'] == 1000
    assert bridge.stats['signatures_checked'] == 1010
    assert bridge.stats['refused_verify_rate_limited'] == bridge.stats['refused_verify_busy'] == 0
    records = bad_signature_audits(audit)
    assert 10 <= len(records) <= 11 and records[0]['sender'] == 'ops'
    assert sum(r['suppressed_before'] for r in records) + len(records) \
        + bridge._suppressed['bad_signature'] == 1000        # each one counted somewhere
    assert sum(r['kind'] == 'inbound_command' for r in audit) == 10


def test_a_flood_past_the_failure_budget_costs_bounded_checks(fleet):
    """2,000 forgeries a second on ops' certificate for 5 s: the checks stay within the shared
    failure budget plus ops' own (1/s) and the valid commands; the other operator (its
    certificate not abused) has every command checked and passed; ops' own commands are
    checked when a check is free (no receiver can tell them from the forgeries unchecked)."""
    _, ids = fleet
    clock = Clock()
    contract = {**CONTRACT, 'rules': [{**CONTRACT['rules'][0], 'rate': 10, 'burst': 20}]}
    bridge, audit = make(fleet, clock, contract)
    forge = Forger(ids['ops'])
    pick = random.Random(7)
    seconds, per_step = 5, 20
    sent = {'ops': 0, 'ops2': 0}
    passed = {'ops': 0, 'ops2': 0}
    for step in range(seconds * 100):   # 10 ms apart
        clock.s += 0.01
        at = pick.randrange(per_step + 1)
        for i in range(per_step + 1):
            if i != at:
                assert bridge.receive(MOVE_KEY, forge(clock.ms())) is None
                continue
            name = 'ops2' if step % 20 == 0 else 'ops' if step % 20 == 10 else None
            if name is not None:   # 5 commands a second each
                sent[name] += 1
                passed[name] += bridge.receive(MOVE_KEY, sign_sample(
                    ids[name], MOVE_KEY, move(), ts_ms=clock.ms())) is not None
    failed_bound = (core.FAILED_VERIFIES_PER_S * (seconds + 2)
                    + core.FAILED_VERIFY_PER_SENDER_S * (seconds + 2))
    valid = passed['ops'] + passed['ops2']
    assert bridge.stats['refused_bad_signature'] <= failed_bound
    assert bridge.stats['signatures_checked'] == bridge.stats['refused_bad_signature'] + valid
    assert bridge.stats['refused_verify_busy'] >= seconds * 100 * per_step - failed_bound
    assert passed['ops2'] == sent['ops2'] == 25
    assert 0 < passed['ops'] < sent['ops'] == 25
    assert bridge.stats['received'] == valid
    assert len([r for r in audit if r['kind'] == 'inbound_refused']) <= 2 * (seconds + 1)


def test_the_keys_folders_members_pass_while_strangers_spend_the_certificate_budget(fleet):
    """With `keys_dir` the bridge knows the fleet's members from the start: a flood of new
    certificates (each a different failed one) spends the budget for checking new ones, and
    the operator's first command still passes."""
    root, ids = fleet
    clock = Clock()
    bridge, _ = make(fleet, clock, keys_dir=str(root))
    der = bytearray(x509.load_pem_x509_certificate(ids['robot2'].cert_pem())
                    .public_bytes(serialization.Encoding.DER))
    sample = read_signed(sign_sample(ids['robot2'], MOVE_KEY, move(), ts_ms=0))
    for i in range(5000):
        if bridge._certs.refused_busy:
            break
        copy = bytearray(der)
        copy[-1 - i % 16] ^= 1 + i // 16          # another certificate each time, none valid
        cert = x509.load_der_x509_certificate(bytes(copy)).public_bytes(
            serialization.Encoding.PEM)
        data = b''.join((MAGIC, _CERT_LEN.pack(len(cert)), cert,
                         bytes((len(sample.signature),)), sample.signature,
                         _TAIL.pack(clock.ms(), i.to_bytes(16, 'big')), sample.sample))
        assert bridge.receive(MOVE_KEY, data) is None
    assert bridge._certs.refused_busy == 1
    checked = bridge._certs.checked
    assert bridge.receive(MOVE_KEY, sign_sample(ids['ops'], MOVE_KEY, move(),
                                                ts_ms=clock.ms())) is not None
    assert bridge._certs.checked == checked
