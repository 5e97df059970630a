"""Every certificate check on the robot's side honours the fleet's revocation list (revoked.json
next to ca.pem, written by `loom keys revoke` and `loom keys issue --force`), as the cloud tier
and the router do. The attack review's case: the cloud's key is stolen and the operator
re-issues the cloud identity, which revokes the stolen certificate. Its answers and erasure
receipts must be forgeries to the robot, nothing may be sealed to it (cloud client, bridge), and
a revoked operator's signed command must never reach an actuator. A certificate revoked while
running is refused within keys.REVOCATION_CHECK_S: the injected clock is stepped where the
component takes one, else the re-check is called directly.

Real keys made by loom_ros.security.keys in temporary folders. The cloud client and the fleet
eraser ask a real Zenoh session whose own queryables answer as the cloud (a peer that neither
listens nor connects: nothing leaves this process). The bridge node is built in this process
and configured (its Zenoh link opens only at activate); the inbound check is the bridge core's.
"""
from __future__ import annotations

import base64
import json
import shutil
import time

import numpy
import pytest
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter

from harness import WAIT_LIMIT_S, free_port, recording_bridge
from loom_ros.bridge.core import open_sealed
from loom_ros.bridge.inbound import sign_sample
from loom_ros.bridge.zenoh_link import session_config
from loom_ros.bringup.nodes import by_name
from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.executor import finalize_node
from loom_ros.cloud.client import CloudClient, UploadRefused
from loom_ros.cloud.erasure import FleetEraser, erase_key, erase_reply
from loom_ros.cloud.protocol import KEY_PREFIX, Signer, digest, sealed_aad, unpack
from loom_ros.security import keys, sealed
from loom_ros.security.audit import AuditLog
from loom_ros.security.keys import CredentialsError
from loom_ros.storage.embedding import HashEmbedder

FLEET = {'cloud': 'cloud', 'robot1': 'robot', 'alice': 'operator', 'bob': 'operator'}
BUDGET_MS = WAIT_LIMIT_S * 1000.0
REF = 'hs256:' + 'ab' * 16
MOVE_KEY = 'loom/robot1/fleet/robot/move'
CONTRACT = {'rules': [{'key': 'fleet.robot.move', 'privacy': 'public', 'rate': 100,
                       'burst': 100, 'grant': 'fleet.robot.move'}],
            'grants': {'operator': ['fleet.robot.move']}, 'actuators': ['fleet.robot.**']}


@pytest.fixture
def fleet(tmp_path):
    """The fleet's keys folder, which is also the robot's (ca.pem, revoked.json, cloud/cert.pem)."""
    root = tmp_path / 'keys'
    keys.ensure_local(root, FLEET)
    return root


def steal(root, name: str, where) -> keys.Identity:
    """What a thief keeps of an identity: its certificate and key as they are now."""
    where.mkdir(mode=0o700)
    shutil.copytree(root / name, where / name)
    shutil.copy(root / 'ca.pem', where / 'ca.pem')
    return keys.Identity(name, FLEET[name], where / name / 'cert.pem', where / name / 'key.pem',
                         where / 'ca.pem')


@pytest.fixture
def zsession():
    """A Zenoh session that neither listens nor connects: its queries reach its own queryables."""
    import zenoh
    session = zenoh.open(session_config('peer', [], [], False))
    yield session
    session.close()


class Cloud:
    """What answers on loom/cloud/**: one signed answer per (instance, Signer) in `signers`
    (set it to change who answers), to inference requests and to erase requests (a receipt
    made by the cloud tier's own erase_reply)."""

    def __init__(self, session, signers):
        self.signers = list(signers)
        self._queryables = [
            session.declare_queryable(f'{KEY_PREFIX}/*', self._infer, complete=True),
            session.declare_queryable(erase_key(), self._erase, complete=True)]

    def _infer(self, query):
        raw = query.payload.to_bytes()
        header, _ = unpack(raw)
        task = str(query.key_expr).rsplit('/', 1)[-1]
        for instance, signer in self.signers:
            answer = {'id': header['id'], 'ok': True, 'task': task, 'model': 'test', 'cost': 0.0,
                      'server': instance, 'result': {'intent': 'greet', 'confidence': 0.9}}
            query.reply(query.key_expr, signer.reply(header['id'], digest(raw), answer))

    def _erase(self, query):
        raw = query.payload.to_bytes()
        header, body = unpack(raw)
        for instance, signer in self.signers:
            answer = erase_reply(None, signer, instance, 'robot1', 'robot', json.loads(body))
            query.reply(query.key_expr, signer.reply(header['id'], digest(raw), answer))


# -- 1. the cloud client --------------------------------------------------------------------
def test_cloud_client_takes_no_answer_signed_by_a_revoked_cloud_key(fleet, tmp_path, zsession):
    """Review finding 1: the client's Verifier had no keys folder, so a stolen cloud key the
    operator revoked still had its answers taken by every robot."""
    now = [time.time()]
    client = CloudClient.from_keys(zsession, fleet, 'robot1', ask_all=True,
                                   clock=lambda: now[0])
    cloud = Cloud(zsession, [('eu1', Signer(keys.load(fleet, 'cloud')))])
    assert client.infer('intent', {'text': 'hello'}, BUDGET_MS).ok
    stolen = steal(fleet, 'cloud', tmp_path / 'stolen')
    keys.issue(fleet, 'cloud', 'cloud', force=True)   # revokes the certificate it replaces
    cloud.signers = [('thief', Signer(stolen))]
    now[0] += keys.REVOCATION_CHECK_S   # revoked while running: refused within this
    got = client.infer('intent', {'text': 'hello'}, BUDGET_MS)
    assert (got.ok, got.code) == (False, 'forged')
    assert client.stats['forged_reply'] == got.attempts >= 1
    # the re-issued cloud is answered as before; a new client refuses the thief from the start
    cloud.signers = [('eu1', Signer(keys.load(fleet, 'cloud')))]
    assert client.infer('intent', {'text': 'hello'}, BUDGET_MS).ok
    cloud.signers = [('thief', Signer(stolen))]
    fresh = CloudClient.from_keys(zsession, fleet, 'robot1', ask_all=True)
    assert fresh.infer('intent', {'text': 'hello'}, BUDGET_MS).code == 'forged'


def test_cloud_client_never_seals_to_a_revoked_cloud_certificate(fleet, tmp_path, zsession):
    """Review finding 1, second half: the certificate Sensitive bodies are sealed to (from the
    keys folder, or learned from an answer before the revocation) was never checked against
    revoked.json: the thief could read every robot's Sensitive uploads."""
    stolen = steal(fleet, 'cloud', tmp_path / 'stolen')
    new = keys.issue(fleet, 'cloud', 'cloud', force=True)
    cloud = Cloud(zsession, [('thief', Signer(stolen))])
    client = CloudClient(zsession, keys.load(fleet, 'robot1'), embedder=HashEmbedder(),
                         cloud_cert=stolen.cert_pem(), ask_all=True)
    with pytest.raises(UploadRefused, match='revoked'):
        client.body_for('intent', 'my pin is 4321', Privacy.SENSITIVE, 'embedding')
    assert (client.stats['cloud_cert_refused'], client.stats['sealed']) == (1, 0)
    assert client.cloud_cert is None and client.stats['forged_reply'] >= 1   # the thief's hello
    # The re-issued cloud answers: its certificate is learned from its signed answer, sealed to.
    cloud.signers = [('eu1', Signer(new))]
    body = client.body_for('intent', 'my pin is 4321', Privacy.SENSITIVE, 'embedding')
    blob = base64.b64decode(body['sealed'])
    aad = sealed_aad('intent', 'robot1')
    assert len(json.loads(sealed.unseal(new, blob, aad))['embedding']) == 384
    with pytest.raises(CredentialsError):
        sealed.unseal(stolen, blob, aad)


# -- 2. the fleet eraser --------------------------------------------------------------------
def test_fleet_eraser_takes_no_receipt_signed_by_a_revoked_cloud_key(fleet, tmp_path, zsession):
    """Review finding 2: the eraser's Verifier had no keys folder, so a revoked cloud identity
    could forge erasure receipts (a subject's data said erased where it was not)."""
    stolen = steal(fleet, 'cloud', tmp_path / 'stolen')
    current = keys.issue(fleet, 'cloud', 'cloud', force=True)
    cloud = Cloud(zsession, [('thief', Signer(stolen)), ('eu1', Signer(current))])
    now = [time.time()]
    eraser = FleetEraser(zsession, keys.load(fleet, 'robot1'), clock=lambda: now[0])
    done = eraser.erase(REF, WAIT_LIMIT_S)
    assert done.status == 'done' and done.rejected == {'forged': 1}
    assert [r['receipt']['server'] for r in done.receipts] == ['eu1']
    assert eraser.stats['rejected_forged'] == 1
    # Revoked while running (and its successor issued): refused within REVOCATION_CHECK_S.
    later = steal(fleet, 'cloud', tmp_path / 'kept')
    keys.revoke(fleet, 'cloud')
    newest = keys.issue(fleet, 'cloud', 'cloud', force=True)
    cloud.signers = [('eu1', Signer(later)), ('eu2', Signer(newest))]
    now[0] += keys.REVOCATION_CHECK_S
    done = eraser.erase(REF, WAIT_LIMIT_S)
    assert [r['receipt']['server'] for r in done.receipts] == ['eu2']
    assert done.rejected == {'forged': 1} and eraser.stats['rejected_forged'] == 2


# -- 3. the bridge's sealing ----------------------------------------------------------------
def embedding() -> Event:
    """A Sensitive event the privacy gate lets out: one unit float32 vector."""
    vector = numpy.random.default_rng(0).normal(size=8)
    vector /= numpy.linalg.norm(vector)
    return Event(type='t.embedding', payload=vector.astype('<f4').tobytes(),
                 privacy=Privacy.SENSITIVE,
                 metadata={'dim': '8', 'count': '1', 'dtype': 'float32'})


@pytest.fixture
def bridge_node(ros, fleet, tmp_path):
    """configure(**params): the bridge node built in this process (robot1, keys from `fleet`,
    seal_sensitive auto) and configured; returns (node, the transition's result). Its audit
    log is tmp_path/audit<n>.db."""
    made = []

    def configure(**params):
        inbound = tmp_path / 'inbound.yaml'
        inbound.write_text('rules: []\n')
        values = {'robot_id': 'robot1', 'mode': 'client',
                  'connect': [f'tls/127.0.0.1:{free_port()}'], 'out_allow': ['agent.*.intent'],
                  'inbound_file': str(inbound), 'audit_db': str(tmp_path / f'audit{len(made)}.db'),
                  'keys_dir': str(fleet), 'seal_sensitive': 'auto', 'autostart': False,
                  'storage.root': str(tmp_path / 'root'), **params}
        node = by_name('zenoh_bridge').load_class()(
            namespace='/robot1',
            parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
        made.append(node)
        return node, node.trigger_configure()
    yield configure
    for node in made:
        finalize_node(node)
        node.destroy_node()


def audited(node, kind: str) -> list[dict]:
    return [r['fields'] for r in AuditLog(node.params['audit_db']).query(
        plugin='zenoh_bridge', kind=kind)]


def test_bridge_refuses_a_cloud_certificate_revoked_before_it_starts(bridge_node, fleet):
    """Review finding 3: the cloud certificate the bridge seals Sensitive events to was checked
    against the CA and its role, never against revoked.json."""
    keys.revoke(fleet, 'cloud')
    node, result = bridge_node(seal_sensitive='on')   # required: configure says why not
    assert result == TransitionCallbackReturn.FAILURE and 'revoked' in node.configure_error
    node, result = bridge_node()   # auto: the bridge runs; Sensitive events stay home
    assert result == TransitionCallbackReturn.SUCCESS, node.configure_error
    assert node.bridge.seal_to is None
    assert node.bridge.send(embedding(), 'agent.a.intent') == 'refused_unsealed'
    assert node.bridge.send(Event(type='t'), 'agent.a.intent') != 'refused_unsealed'
    assert (node.bridge.stats['cloud_cert_refused'], node.bridge.stats['sealed']) == (1, 0)
    assert [r['reason'] for r in audited(node, 'privacy_refused')] == ['unsealed']
    assert 'revoked' in audited(node, 'cloud_cert_refused')[0]['reason']


def test_bridge_stops_sealing_to_a_cloud_certificate_revoked_while_running(bridge_node, fleet):
    node, result = bridge_node(seal_sensitive='on')
    assert result == TransitionCallbackReturn.SUCCESS, node.configure_error
    assert node.bridge.send(embedding(), 'agent.a.intent') != 'refused_unsealed'
    assert node.bridge.stats['sealed'] == 1
    keys.revoke(fleet, 'cloud')
    node._check_sealing(force=True)   # what its timer does once REVOCATION_CHECK_S passed
    assert node.bridge.seal_to is None
    assert node.bridge.send(embedding(), 'agent.a.intent') == 'refused_unsealed'
    assert node.bridge.stats['cloud_cert_refused'] == 1
    assert 'revoked' in audited(node, 'cloud_cert_refused')[0]['reason']
    # The re-issued certificate copied in: sealed to again, and only its key opens it.
    new = keys.issue(fleet, 'cloud', 'cloud', force=True)
    node._check_sealing(force=True)
    assert node.bridge.send(embedding(), 'agent.a.intent') != 'refused_unsealed'
    assert node.bridge.stats['sealed'] == 2 and len(audited(node, 'cloud_cert_accepted')) == 1
    pending = list(node.bridge.outbox.items)[-1]   # Batched, and no router: it waits
    assert open_sealed(new, pending.key, pending.data).type == 't.embedding'


def test_bridge_with_an_unreadable_revocation_list_refuses_to_configure(bridge_node, fleet):
    """Fail closed, and say so: the bridge's certificate checks (signed commands, the cloud's)
    would trust no one. Secure, loading its own identity said so already; without TLS (signed
    commands are still checked against the keys folder) the error escaped on_configure (ERROR,
    no reason, the bus and timers it had made left behind)."""
    (fleet / keys.REVOKED_FILE).write_text('{"revoked": [{"sha256": "not hex"}]}')
    node, result = bridge_node(insecure=True)
    assert result == TransitionCallbackReturn.FAILURE
    assert 'revocation list unreadable' in node.configure_error


# -- 4. the inbound contract ----------------------------------------------------------------
def test_a_revoked_operators_signed_command_never_reaches_an_actuator(fleet):
    """Review claim 4, checked: the bridge core knows the keys folder's members through
    KnownCertificates.preload, which watches revoked.json; a revoked operator's command is
    refused as a bad certificate, counted and audited; another operator's still passes."""
    now = [1000.0]
    audit: list[dict] = []

    def bridge():
        made, _, _ = recording_bridge(
            {'robot_id': 'robot1', 'out_allow': []}, CONTRACT, command_audit=audit.append,
            ca_pem=(fleet / 'ca.pem').read_bytes(), keys_dir=str(fleet),
            clock=lambda: now[0], wall_ms=lambda: int(now[0] * 1000))
        return made

    def command(name: str) -> bytes:
        now[0] += 1
        event = Event.with_json('robot.move', {'linear': {'x': 0.2}})
        return sign_sample(keys.load(fleet, name), MOVE_KEY, event, ts_ms=int(now[0] * 1000))
    running = bridge()
    assert running.receive(MOVE_KEY, command('alice')) is not None
    alice = command('alice')   # signed before the revocation
    keys.revoke(fleet, 'alice')
    running._certs.revocation_check_s = 0.0   # the list's next look is due (REVOCATION_CHECK_S)
    assert running.receive(MOVE_KEY, alice) is None
    assert running.stats['refused_bad_certificate'] == 1
    assert (audit[-1]['reason'], 'revoked' in audit[-1]['error']) == ('bad_certificate', True)
    assert running.receive(MOVE_KEY, command('bob')) is not None
    restarted = bridge()
    assert restarted.receive(MOVE_KEY, alice) is None
    assert restarted.stats['refused_bad_certificate'] == 1
    assert audit[-1]['reason'] == 'bad_certificate' and running.stats['received'] == 2
