"""Fleet erasure (issue 17) across real processes on loopback: a Zenoh router (mutual TLS and the
fleet's access control, or plain TCP for attacks that must reach the cloud tier itself),
`loom_cloud` keeping its request log under --data-dir, robots asking it to erase one subject and
checking its signed receipts. Canaries of two subjects are planted through real requests; after
the erasure every byte of every file in the cloud's folder is scanned (SQLite WAL and free pages
included)."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cloud_fixtures import (  # noqa: F401  (fixtures)
    cloud, fleet, forging_queryable, net, stop_stats, stranger,
)
from harness import REPO, WAIT_LIMIT_S
from loom_ros.cloud.client import CloudClient, InferenceRequest, execute_route
from loom_ros.cloud.erasure import (
    FleetEraser, ReceiptInvalid, RequestLog, check_reply, erase_key, erase_reply,
    receipt_signed_bytes,
)
from loom_ros.cloud.protocol import RequestInvalid, Signer, Verifier, digest, encode
from loom_ros.router.decision import Decision, Route
from loom_ros.security import keys
from loom_ros.storage.consent import SubjectRefs


def canary(tag: str) -> str:
    return f'CANARY{tag}{uuid.uuid4().hex[:16]}'


def scan(folder: Path) -> bytes:
    """Every byte of every file under `folder` (the database, its WAL and shared memory)."""
    return b''.join(p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file())


def local_intent(request):
    return {'intent': 'unknown'}, 0.4


def ask_cloud(client, text: str, ref: str):
    """What an agent's route does: a Cloud decision for one utterance of a subject."""
    result = execute_route(Decision(Route.CLOUD, 0.3, 'test', 'cloud', upload='raw'),
                           InferenceRequest('intent', text, latency_budget_ms=WAIT_LIMIT_S * 1000,
                                            subject_ref=ref), local_intent, client)
    assert result.backend == 'cloud', result.cloud_error


def test_cloud_erases_one_subjects_requests_with_a_signed_receipt(cloud, net, fleet, tmp_path):
    data = tmp_path / 'cloud_data'
    proc = cloud('--data-dir', str(data), '--instance', 'eu1')
    refs = SubjectRefs(secrets.token_bytes(32))   # the robot's subject key
    ref_a, ref_b = refs.ref('alice'), refs.ref('bob')
    client = CloudClient.from_keys(net.session('robot1'), fleet, 'robot1', ask_all=True)
    a1, a2, b1 = canary('A'), canary('A'), canary('B')
    ask_cloud(client, f'will it rain {a1}', ref_a)
    ask_cloud(client, f'stop moving {b1}', ref_b)
    got = client.infer('embed', {'texts': [a2], 'subject_ref': ref_a}, WAIT_LIMIT_S * 1000)
    assert got.ok, got.error
    kept = scan(data)
    assert all(c.encode() in kept for c in (a1, a2, b1)), 'the cloud keeps what it was sent'

    eraser = FleetEraser(net.session('robot1'), keys.load(fleet, 'robot1'))
    done = eraser.erase(ref_a, WAIT_LIMIT_S)
    assert (done.status, done.error, len(done.receipts)) == ('done', '', 1)
    receipt = done.receipts[0]['receipt']
    assert done.receipts[0]['signer'] == 'cloud'
    assert (receipt['subject_ref'], receipt['robot'], receipt['request_id'], receipt['server']) \
        == (ref_a, 'robot1', done.request_id, 'eu1')
    assert receipt['counts'] == {'request_log': 2} and receipt['scrubbed'] is True
    left = scan(data)
    assert a1.encode() not in left and a2.encode() not in left and b1.encode() in left
    assert ref_a.encode() not in left

    # Another robot of the fleet: it may not erase robot1's records (refused, counted), and
    # erasing "its own" records of the subject touches none of robot1's.
    robot2 = FleetEraser(net.session('robot2'), keys.load(fleet, 'robot2'))
    refused = robot2.erase(ref_b, WAIT_LIMIT_S, robot='robot1')
    assert refused.status == 'failed' and not refused.receipts
    assert [r['code'] for r in refused.refused] == ['forbidden']
    own = robot2.erase(ref_b, WAIT_LIMIT_S)
    assert own.status == 'done' and own.receipts[0]['receipt']['counts'] == {'request_log': 0}
    assert b1.encode() in scan(data)
    # Erasing again is harmless: nothing left to erase.
    again = eraser.erase(ref_a, WAIT_LIMIT_S)
    assert again.status == 'done' and again.receipts[0]['receipt']['counts'] == \
        {'request_log': 0}

    # `loom forget` on a robot's root asks the fleet too and prints the verified receipt.
    root = tmp_path / 'root'
    root.mkdir()
    carol = canary('C')
    ask_cloud(client, f'good morning {carol}', SubjectRefs.at(root / 'keys').ref('carol'))
    assert carol.encode() in scan(data)
    base = ['forget', 'carol', '--root', str(root), '--connect',
            f'tcp/127.0.0.1:{net.port}', '--keys-dir', str(fleet), '--identity', 'robot1']
    out = loom(*base, '--fleet-timeout', str(WAIT_LIMIT_S))
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'fleet: done' in out.stdout and 'cloud server eu1 (signed by cloud): request_log 1' \
        in out.stdout, out.stdout
    assert carol.encode() not in scan(data)
    skipped = loom(*base, '--no-fleet', '--json')
    assert skipped.returncode == 0 and json.loads(skipped.stdout)['fleet_status'] == 'skipped'
    stats = stop_stats(proc)
    assert (stats['erased'], stats['erase_refused_forbidden']) == (4, 1)
    # No cloud server answers: said, and exit 2 (the local erasure stands).
    gone = loom(*base, '--fleet-timeout', '1', '--json')
    assert gone.returncode == 2 and json.loads(gone.stdout)['fleet_status'] in (
        'no_server', 'timeout'), gone.stdout + gone.stderr


def loom(*args: str):
    return subprocess.run([sys.executable, '-m', 'loom_ros.cli', *args], capture_output=True,
                          text=True, timeout=WAIT_LIMIT_S * 2, cwd=REPO)


def test_outsiders_cannot_erase_and_forged_receipts_are_rejected(cloud, net, fleet, stranger,
                                                                 tmp_path):
    """Plain TCP (a misconfigured or shared router): strangers reach the cloud tier itself. An
    unsigned request and one signed by another authority are refused and counted; a fake
    queryable answering with forged receipts is not believed, the genuine receipt is."""
    data = tmp_path / 'cloud_data'
    proc = cloud('--data-dir', str(data), secure=False)
    outsider = net.session(None)
    replies = list(outsider.get(erase_key(), payload=encode({'id': 'x', 'subject_ref': 'hs256:0',
                                                              'robot': 'robot1'}),
                                timeout=WAIT_LIMIT_S))
    assert len(replies) == 1 and replies[0].err is not None
    assert b'unauthenticated' in replies[0].err.payload.to_bytes()
    foreign = Signer(stranger).request('erase', {'subject_ref': 'hs256:0', 'robot': 'robot1'},
                                       'y', int(time.time() * 1000))
    replies = list(outsider.get(erase_key(), payload=foreign, timeout=WAIT_LIMIT_S))
    assert len(replies) == 1 and b'unauthenticated' in replies[0].err.payload.to_bytes()

    # A fake cloud answering first, with receipts signed by a robot, by another authority's
    # cloud, and unsigned: each rejected, the real server's receipt taken.
    robot2, foreign_cloud = Signer(keys.load(fleet, 'robot2')), Signer(stranger)
    forged = []

    forge = forging_queryable([(robot2, None), (foreign_cloud, None)], count=99, asked=forged)
    fake = net.session(None).declare_queryable(erase_key(), forge, complete=True)
    eraser = FleetEraser(net.session('robot1'), keys.load(fleet, 'robot1'))
    deadline = time.monotonic() + WAIT_LIMIT_S
    while True:   # until the fake's declaration reached the router and it answered too
        done = eraser.erase('hs256:' + 'ab' * 16, WAIT_LIMIT_S)
        if forged or time.monotonic() > deadline:
            break
    fake.undeclare()
    assert forged, 'the fake queryable was never asked'
    assert done.status == 'done' and len(done.receipts) == 1
    assert done.receipts[0]['receipt']['server'] != 'fake'
    assert done.rejected['forged'] == 3
    stats = stop_stats(proc)
    assert stats['erase_refused_unauthenticated'] == 2


# -- the receipt checks, without processes ------------------------------------------------------
@pytest.fixture(scope='module')
def parties(fleet):
    return {name: keys.load(fleet, name) for name in ('cloud', 'robot1', 'robot2')}


def genuine(parties, tmp_path, ref='hs256:' + 'cd' * 16, robot='robot1'):
    """A robot1 request and the cloud's real reply to it (from a real request log)."""
    log = RequestLog(tmp_path / 'log')
    log.record('robot1', ref, 'intent', 'r0', b'{"text":"hello"}')
    ident = uuid.uuid4().hex
    request = Signer(parties['robot1']).request('erase', {'subject_ref': ref, 'robot': robot},
                                                ident, int(time.time() * 1000))
    cloud_signer = Signer(parties['cloud'])
    body = erase_reply(log, cloud_signer, 'eu1', 'robot1', 'robot',
                       {'id': ident, 'subject_ref': ref, 'robot': robot})
    log.close()
    return ident, digest(request), body, cloud_signer


def test_check_reply_takes_only_the_clouds_receipt_for_this_request(parties, tmp_path):
    ref = 'hs256:' + 'cd' * 16
    ident, request_digest, body, cloud_signer = genuine(parties, tmp_path, ref)
    verifier = Verifier(parties['robot1'].ca.read_bytes(), ('cloud',))

    def check(raw, ok=True, want_ref=ref, want_ident=ident, want_digest=request_digest):
        return check_reply(raw, ok, verifier, want_ident, want_digest, want_ref, 'robot1')
    ok, got = check(cloud_signer.reply(ident, request_digest, body))
    assert ok and got['receipt']['counts'] == {'request_log': 1} and got['signer'] == 'cloud'

    def reason(raw, **kw) -> str:
        with pytest.raises(ReceiptInvalid) as caught:
            check(raw, **kw)
        return caught.value.reason
    assert reason(encode(body)) == 'forged'                                   # unsigned
    assert reason(Signer(parties['robot2']).reply(ident, request_digest, body)) == 'forged'
    assert reason(cloud_signer.reply(ident, request_digest, body),
                  want_ref='hs256:' + 'ef' * 16) == 'wrong_receipt'           # another subject
    assert reason(cloud_signer.reply(ident, request_digest, body),
                  want_ident='other') == 'mismatched'                         # another request
    assert reason(cloud_signer.reply(ident, request_digest, body),
                  want_digest=digest(b'another request')) == 'forged'
    # A receipt whose own signature is a robot's, inside a frame the cloud signed.
    robot_sig = dict(body, result=dict(body['result'], sig=Signer(parties['robot2']).sign(
        receipt_signed_bytes(body['result']['receipt']))))
    assert reason(cloud_signer.reply(ident, request_digest, robot_sig)) == 'forged'
    # Counts altered after signing.
    altered = json.loads(json.dumps(body))
    altered['result']['receipt']['counts']['request_log'] = 0
    assert reason(cloud_signer.reply(ident, request_digest, altered)) == 'forged'
    # An authentic refusal is a refusal, not a receipt.
    refusal = {'id': ident, 'ok': False, 'code': 'forbidden', 'error': 'no', 'server': 'eu1'}
    ok, got = check(cloud_signer.reply(ident, request_digest, refusal), ok=False)
    assert not ok and got['code'] == 'forbidden'


def test_erase_reply_refuses_other_robots_records_and_bad_refs(parties, tmp_path):
    log = RequestLog(tmp_path / 'log')
    signer = Signer(parties['cloud'])
    with pytest.raises(RequestInvalid) as caught:
        erase_reply(log, signer, 'eu1', 'robot2', 'robot', {'id': 'i', 'subject_ref': 'hs256:aa',
                                                            'robot': 'robot1'})
    assert caught.value.code == 'forbidden'
    for bad in ('', '../x', 'a' * 200, 'hs256:\0', 7, None):
        with pytest.raises(RequestInvalid):
            erase_reply(log, signer, 'eu1', 'robot1', 'robot', {'id': 'i', 'subject_ref': bad})
    # An operator may erase a robot's records.
    log.record('robot1', 'hs256:aa', 'intent', 'r', b'x')
    reply = erase_reply(log, signer, 'eu1', 'ops', 'operator',
                        {'id': 'i', 'subject_ref': 'hs256:aa', 'robot': 'robot1'})
    assert reply['result']['receipt']['counts'] == {'request_log': 1}
    log.close()
