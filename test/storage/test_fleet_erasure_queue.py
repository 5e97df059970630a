"""A fleet erasure the cloud tier could not take is not lost (issue 17): `forget` queues it under
the storage root (storage/pending_erasures.py) when no valid signed receipt came, says "fleet:
pending, will retry", and it is asked again with back-off until a receipt verifies; then it is
done and audited. Real parts throughout: a Zenoh router on loopback (mutual TLS and the fleet's
access control; plain TCP only where a forger must reach the robot), `loom_cloud` processes
keeping their request log, `loom forget` / `loom storage stats` as subprocesses, the storage node
in its own process (its retry timer, /diagnostics, storage/stats, a restart). Retries driven by
an injected clock in the core, by short retry periods in the node; waits are on conditions."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from harness import REPO, WAIT_LIMIT_S, MsClock, run_loom
from loom_ros.cloud.client import CloudClient, InferenceRequest, execute_route
from loom_ros.cloud.erasure import erase_key
from loom_ros.cloud.protocol import Signer
from loom_ros.router.decision import Decision, Route
from loom_ros.security import keys
from loom_ros.security.audit import AuditLog
from loom_ros.storage.consent import SubjectRefs
from loom_ros.storage.errors import StorageError
from loom_ros.storage.fleet_erasure import (
    FleetLink, ask_fleet, forget_everywhere, retry_pending,
)
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.pending_erasures import (
    Backoff, PendingErasures, pending_path, read_summary,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'cloud'))
from cloud_fixtures import (  # noqa: E402,F401  (fixtures)
    fleet, forging_queryable, net, stop_stats, stranger,
)

DOWN_S = 1.0   # the fleet wait while no cloud server runs: nothing can answer, whatever its length


@pytest.fixture
def port():
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def scan(folder: Path) -> bytes:
    return b''.join(p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file())


def plant_cloud(net, fleet, refs: SubjectRefs, subjects: list[str]) -> dict[str, str]:
    """Each subject's request kept by the cloud (as an agent's cloud route sends it)."""
    client = CloudClient.from_keys(net.session('robot1'), fleet, 'robot1', ask_all=True)
    kept = {}
    for s in subjects:
        kept[s] = f'CANARYQ{uuid.uuid4().hex}'
        result = execute_route(Decision(Route.CLOUD, 0.3, 'test', 'cloud', upload='raw'),
                               InferenceRequest('intent', f'hello {kept[s]}',
                                                latency_budget_ms=WAIT_LIMIT_S * 1000,
                                                subject_ref=refs.ref(s)),
                               lambda r: ({}, 0.0), client)
        assert result.backend == 'cloud', result.cloud_error
    return kept


def owed(root: Path, what: str = 'pending') -> int:
    """The queue's `what`, read while another process may be creating or writing the file
    (-1: not readable yet)."""
    try:
        return read_summary(root)[what]
    except StorageError:
        return -1


def audited(root: Path, kind: str) -> list[dict]:
    log = AuditLog(StorageLayout.at(root).audit)
    try:
        return [r['fields'] for r in log.query(plugin='erasure', kind=kind)]
    finally:
        log.close()


def test_queue_is_bounded_one_entry_per_subject_and_checks_its_input(tmp_path):
    clock = MsClock(1_000_000)
    queue = PendingErasures(tmp_path, clock=clock, backoff=Backoff(10.0, 40.0), max_pending=2,
                            max_done=1)
    ref = 'hs256:' + 'ab' * 16
    first = queue.add(ref, 'cli:dpo', 7)
    clock.ms += 5
    assert queue.add(ref, 'cli:other', 8) == first and queue.count() == 1   # the same subject
    assert queue.get(first).created_ms == 1_000_000                          # keeps its age
    # never a raw id, a path, or anything but a keyed hash
    for bad in ('alice', '../x', 'hs256:' + 'a' * 200, '', 'hs256:' + 'AB' * 16, None):
        with pytest.raises(StorageError):
            queue.add(bad, 'cli:dpo', 1)
    queue.add('hs256:' + 'cd' * 16, 'cli:dpo', 9)
    with pytest.raises(StorageError, match='already pending'):
        queue.add('hs256:' + 'ef' * 16, 'cli:dpo', 10)
    # Back-off: 10 s, doubled per failed attempt, at most 40 s.
    delays = []
    for _ in range(4):
        delays.append(queue.failed(first, 'timeout', 'the wait ended') - clock.ms)
    assert delays == [10_000, 20_000, 40_000, 40_000]
    # A new forget of the same subject is a new request: what servers answered the earlier
    # one (they never erased what was sent since) and its attempts do not carry over.
    queue.failed(first, 'partial', 'no receipt from eu-2', servers=['eu-1'])
    assert queue.get(first).servers == ('eu-1',) and queue.get(first).attempts == 5
    assert queue.add(ref, 'cli:again', 11) == first
    again = queue.get(first)
    assert (again.servers, again.attempts, again.erasure_audit_id) == ((), 0, 11)
    assert again.created_ms == 1_000_000 and again.next_ms == clock.ms
    for _ in range(4):
        queue.failed(first, 'timeout', 'the wait ended')
    assert first not in [e.id for e in queue.due(10)]   # not due before its back-off
    clock.ms += 40_000
    assert first in [e.id for e in queue.due(10)] and len(queue.due(1)) == 1
    queue.done(first, 'r1')
    queue.done(queue.due(10)[0].id, 'r2')
    summary = queue.summary()
    assert (summary['pending'], summary['done']) == (0, 1)   # only max_done finished kept
    queue.close()
    assert read_summary(tmp_path)['done'] == 1
    assert read_summary(tmp_path / 'none')['pending'] == 0
    assert not (tmp_path / 'none').exists()   # read-only: nothing created



def test_a_retry_round_ends_when_no_server_answers_or_the_node_stops_and_audits_first(tmp_path):
    """The round's control, with the fleet's answers given (the real link is exercised below):
    once no server answers, the next entries are not asked (each would wait its whole timeout,
    and the storage node's forget thread with them); a stopping node asks none; a receipt whose
    audit record cannot be written leaves the entry pending, never done unaudited."""
    from loom_ros.cloud.erasure import FleetErasure
    from loom_ros.security.audit import AuditError
    clock = MsClock(1_000_000)
    queue = PendingErasures(tmp_path, clock=clock, backoff=Backoff(10.0, 40.0))
    refs = ['hs256:' + d * 32 for d in '0123']
    for n, ref in enumerate(refs):
        queue.add(ref, 'cli:dpo', n)
    asked = []

    def silent(ref, wait):
        asked.append(ref)
        return FleetErasure('no_server', 'r-none')
    results = retry_pending(queue, silent, timeout_s=1.0, limit=4)
    assert len(asked) == 1 and [r.status for r in results] == ['no_server']
    assert retry_pending(queue, silent, timeout_s=1.0, limit=4, every=True,
                         stop=lambda: True) == [] and len(asked) == 1

    receipt = {'receipt': {'server': 'eu-1', 'counts': {}}, 'signer': 'cloud', 'sig': 's'}

    def answered(ref, wait):
        asked.append(ref)
        return FleetErasure('done', 'r-ok', receipts=[receipt])

    class BrokenAudit:
        def append(self, *args, **fields):
            raise AuditError('the audit log refused it')
    with pytest.raises(AuditError):
        retry_pending(queue, answered, timeout_s=1.0, limit=1, every=True, audit=BrokenAudit())
    assert queue.count() == 4   # nothing marked done without its audit record
    done = retry_pending(queue, answered, timeout_s=1.0, limit=4, every=True,
                         audit=AuditLog(tmp_path / 'audit.db'))
    assert [r.status for r in done] == ['done'] * 4 and queue.count() == 0
    queue.close()

def test_a_link_that_is_down_queues_and_a_full_queue_says_not_queued(fleet, port, tmp_path):
    """Nothing listens on the fleet router's port: the link cannot be opened (`failed`), the
    erasure on the robot stands, the fleet's part is queued; with the queue full it is said
    that it was not queued, and nothing is silently dropped."""
    root = tmp_path / 'root'
    root.mkdir()
    layout = StorageLayout.at(root)
    link = FleetLink((f'tcp/127.0.0.1:{port}',), str(fleet), 'robot1', timeout_s=DOWN_S)
    audit = AuditLog(layout.audit)
    queue = PendingErasures(root, max_pending=1)

    def forget(subject):
        return forget_everywhere(layout, subject, requested_by='cli:dpo', audit=audit,
                                 fleet=lambda ref, wait: ask_fleet(link, ref, wait),
                                 fleet_timeout_s=DOWN_S, pending=queue)
    first = forget('alice')
    assert first.fleet_status == 'failed' and first.fleet_pending
    assert first.notes[-1].startswith('fleet: pending, will retry (failed: cannot open the '
                                      'fleet link')
    assert first.as_dict()['fleet_pending'] is True
    full = forget('bob')
    assert full.fleet_status == 'failed' and not full.fleet_pending
    assert 'NOT queued for retry' in full.notes[-1] and 'already pending' in full.notes[-1]
    again = forget('alice')   # the same subject again: its entry (and age), not a new one,
    assert again.fleet_pending and queue.count() == 1   # but a new request: attempts anew
    [entry] = queue.due(10, every=True)
    assert entry.attempts == 1 and entry.last_status == 'failed'
    beyond = audited(root, 'subject_erased_beyond_root')
    assert sorted(f['fleet_pending'] for f in beyond) == [False, True, True]
    queue.close()
    audit.close()


KILLED_MID_FORGET = """
import os, signal, sys
from loom_ros.security.audit import AuditLog
from loom_ros.storage.fleet_erasure import forget_everywhere
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.pending_erasures import PendingErasures

class DiesOnTheErasureRecord:
    # The real audit log, and a real SIGKILL as the local erasure writes its record.
    def __init__(self, log):
        self.log = log
    def append(self, plugin, kind, *args, **kwargs):
        if kind == 'subject_erased':
            os.kill(os.getpid(), signal.SIGKILL)
        return self.log.append(plugin, kind, *args, **kwargs)

layout = StorageLayout.at(sys.argv[1])
forget_everywhere(layout, 'alice', requested_by='cli:dpo',
                  audit=DiesOnTheErasureRecord(AuditLog(layout.audit)),
                  fleet=lambda ref, wait: sys.exit('the fleet was asked'),
                  pending=PendingErasures(sys.argv[1]))
"""


def test_a_forget_killed_in_the_local_erasure_leaves_the_fleets_part_pending(tmp_path):
    """Review finding: the queue entry was written after the local erasure, so a SIGKILL in it
    left the fleet's copy owed and forgotten. The entry is written first."""
    root = tmp_path / 'root'
    root.mkdir()
    done = subprocess.run([sys.executable, '-c', KILLED_MID_FORGET, str(root)], cwd=REPO,
                          capture_output=True, text=True, timeout=WAIT_LIMIT_S)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    queue = PendingErasures(root)
    try:
        [entry] = queue.due(10, every=True)
        assert entry.subject_ref == SubjectRefs.at(StorageLayout.at(root).keys).ref('alice')
        assert entry.erasure_audit_id == 0 and entry.attempts == 0   # owed, never asked
    finally:
        queue.close()


def test_an_insecure_fleet_link_is_said_loudly(fleet, port, tmp_path):
    # Review finding: `loom forget --insecure` opened plain TCP without a word.
    (tmp_path / 'root').mkdir()
    base = ['--root', str(tmp_path / 'root'), '--connect', f'tcp/127.0.0.1:{port}',
            '--keys-dir', str(fleet), '--identity', 'robot1', '--fleet-timeout', str(DOWN_S)]
    plain = run_loom('forget', 'carol', *base, '--insecure')
    assert 'WARNING fleet erasure link: INSECURE' in plain.stderr, plain.stderr
    secure = run_loom('forget', 'carol', *base)
    assert 'INSECURE' not in secure.stderr + secure.stdout, secure.stderr


def test_unanswered_fleet_erasure_is_queued_retried_and_cleared_by_a_real_receipt(
        net, fleet, port, tmp_path):
    root = tmp_path / 'root'
    root.mkdir()
    refs = SubjectRefs.at(StorageLayout.at(root).keys)   # the robot's subject key
    cloud_dir = tmp_path / 'cloud_data'
    proc = net.start('--data-dir', str(cloud_dir), '--instance', 'eu1')
    kept = plant_cloud(net, fleet, refs, ['alice', 'bob'])
    stop_stats(proc)   # the cloud server is down; the router still runs

    endpoint = f'tcp/127.0.0.1:{port}'
    base = ['--root', str(root), '--connect', endpoint, '--keys-dir', str(fleet), '--identity',
            'robot1']
    out = run_loom('forget', 'alice', *base, '--fleet-timeout', str(DOWN_S))
    assert out.returncode == 2, out.stdout + out.stderr
    assert 'fleet: pending, will retry' in out.stdout, out.stdout
    # no server: `no_server`, or `timeout` when the last ask's wait ran out first
    assert ('note: fleet: pending, will retry (no_server' in out.stdout or
            'note: fleet: pending, will retry (timeout' in out.stdout), out.stdout
    assert read_summary(root)['pending'] == 1
    assert b'alice' not in pending_path(root).read_bytes()   # only the keyed hash
    [beyond] = audited(root, 'subject_erased_beyond_root')
    assert beyond['fleet_pending'] is True and beyond['fleet_status'] in ('no_server', 'timeout')
    stats = run_loom('storage', 'stats', '--root', str(root), '--embedder', 'hash')
    assert stats.returncode == 0, stats.stderr
    assert 'fleet erasures: 1 pending' in stats.stdout, stats.stdout

    # The retries, on an injected clock: not before the back-off, then doubled per failure.
    owed = read_summary(root)
    assert owed['next_ms'] - owed['oldest_ms'] >= 30_000   # the CLI's try failed: 30 s later
    clock = MsClock(owed['next_ms'] - 1)
    queue = PendingErasures(root, clock=clock, backoff=Backoff(30.0, 3600.0))
    link = FleetLink((endpoint,), str(fleet), 'robot1')
    audit = AuditLog(StorageLayout.at(root).audit)

    def retry(timeout_s: float, limit: int = 10, servers=()):
        return retry_pending(queue, lambda ref, wait: ask_fleet(link, ref, wait),
                             timeout_s=timeout_s, limit=limit, audit=audit, servers=servers)
    assert retry(DOWN_S) == []                       # not due before its back-off
    clock.ms += 1
    [again] = retry(DOWN_S)
    assert again.status in ('no_server', 'timeout') and again.next_ms == clock.ms + 60_000
    # At most `limit` asked per look.
    for who in ('carol', 'dave'):
        queue.add(refs.ref(who), 'cli:dpo', 0)
    clock.ms += 60_000
    assert len(retry(DOWN_S, limit=1)) == 1 and queue.count() == 3

    # The cloud is back: the next due retries get its signed receipts, and the queue empties.
    net.start('--data-dir', str(cloud_dir), '--instance', 'eu1')
    results = []
    deadline = time.monotonic() + WAIT_LIMIT_S
    while queue.count() and time.monotonic() < deadline:
        clock.ms += 3600_000
        results += retry(WAIT_LIMIT_S)
    assert queue.count() == 0, results
    [alice] = [r for r in results if r.subject_ref == refs.ref('alice') and r.status == 'done']
    [signed] = alice.receipts
    assert signed['signer'] == 'cloud' and signed['receipt']['server'] == 'eu1'
    assert signed['receipt']['subject_ref'] == refs.ref('alice')
    left = scan(cloud_dir)
    assert kept['alice'].encode() not in left and refs.ref('alice').encode() not in left
    assert kept['bob'].encode() in left
    records = {r['subject_ref']: r for r in audited(root, 'fleet_erasure_retried')}
    assert set(records) == {refs.ref(s) for s in ('alice', 'carol', 'dave')}
    assert records[refs.ref('alice')]['attempts'] >= 3
    assert records[refs.ref('alice')]['fleet_receipts'][0]['sig'] == signed['sig']

    # Two named servers (storage.forget.fleet_servers), one of them down: the receipt of the
    # one up is kept, the other is still owed, and asked again until it answers too.
    out = run_loom('forget', 'erin', *base, '--fleet-timeout', str(WAIT_LIMIT_S), '--fleet-server',
               'eu1', '--fleet-server', 'eu2')
    assert out.returncode == 2, out.stdout + out.stderr
    assert 'fleet: partial (no receipt from eu2)' in out.stdout, out.stdout
    assert 'fleet: pending, will retry' in out.stdout
    [owed] = queue.due(10)   # due now: the CLI's back-off is on the wall clock, ours is later
    assert owed.subject_ref == refs.ref('erin') and owed.servers == ('eu1',)
    assert owed.last_status == 'partial'
    net.start('--data-dir', str(tmp_path / 'cloud_eu2'), '--instance', 'eu2')
    # `loom forget --retry-pending`: an operator asking now, whatever the back-off.
    retried = ['--retry-pending', *base, '--fleet-timeout', str(WAIT_LIMIT_S),
               '--fleet-server', 'eu1', '--fleet-server', 'eu2']
    out = run_loom('forget', *retried)
    while out.returncode == 2 and time.monotonic() < deadline:
        out = run_loom('forget', *retried)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f'{refs.ref("erin")}: done (2 signed receipts)' in out.stdout, out.stdout
    assert 'fleet erasures: 0 pending' in out.stdout and queue.count() == 0
    [erin] = [r for r in audited(root, 'fleet_erasure_retried')
              if r['subject_ref'] == refs.ref('erin')]
    assert erin['fleet_servers'] == ['eu1', 'eu2'] and erin['attempts'] >= 2
    queue.close()
    audit.close()
    assert (read_summary(root)['pending'], read_summary(root)['done']) == (0, 4)


def test_forged_and_foreign_receipts_do_not_clear_a_pending_erasure(net, fleet, stranger,
                                                                     port, tmp_path):
    """Plain TCP, so a forger can answer on the erase key (on the secure router only the cloud
    identity may): receipts signed by a robot, by another authority's cloud, and the real
    cloud's signature on a receipt for another subject are all refused, and the entry stays
    pending with one more attempt; the real server's receipt then clears it."""
    proc = net.start(secure=False)
    stop_stats(proc)   # only the router and the forger below answer
    cloud_signer = Signer(keys.load(fleet, 'cloud'))
    forgers = [(Signer(keys.load(fleet, 'robot2')), None), (Signer(stranger), None),
               (cloud_signer, 'hs256:' + 'ee' * 16)]
    asked = []

    forge = forging_queryable(forgers, asked=asked)
    fake = net.session(None).declare_queryable(erase_key(), forge, complete=True)

    clock = MsClock(1_000_000)
    queue = PendingErasures(tmp_path / 'root', clock=clock, backoff=Backoff(1.0, 1.0))
    entry = queue.add('hs256:' + 'ab' * 16, 'cli:dpo', 1)
    link = FleetLink((f'tcp/127.0.0.1:{port}',), str(fleet), 'robot1', insecure=True)

    def retry(timeout_s: float):
        clock.ms += 1000
        return retry_pending(queue, lambda ref, wait: ask_fleet(link, ref, wait),
                             timeout_s=timeout_s, limit=1)
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not asked and time.monotonic() < deadline:   # until the forger's declaration arrived
        [result] = retry(DOWN_S)
        assert result.status != 'done'
    assert asked, 'the forger was never asked'
    [result] = retry(DOWN_S)   # the forger answers every ask of it: none believed
    assert result.status in ('no_server', 'timeout') and not result.receipts
    assert result.rejected.get('forged', 0) >= 3 and result.rejected.get('wrong_receipt', 0) >= 1
    still = queue.get(entry)
    assert queue.count() == 1 and still.attempts >= 2 and still.last_status == result.status
    fake.undeclare()

    net.start(secure=False)   # the real server: its receipt verifies
    while queue.count() and time.monotonic() < deadline:
        results = retry(WAIT_LIMIT_S)
    assert queue.count() == 0 and results[0].receipts[0]['receipt']['server'] != 'fake'
    queue.close()


def params_file(tmp_path: Path, name: str, values: dict) -> Path:
    path = tmp_path / f'{name}_params.yaml'
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': values}}))
    return path


def test_storage_node_retries_a_pending_erasure_across_a_restart(ros, spawn, net, fleet, port,
                                                                  tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from loom_msgs.msg import StorageStats
    from loom_msgs.srv import Forget
    from loom_ros.bus.qos import to_qos_profile
    from loom_ros.telemetry.diagnostics import WARN, level_of
    root = tmp_path / 'root'
    root.mkdir()
    refs = SubjectRefs.at(StorageLayout.at(root).keys)
    cloud_dir = tmp_path / 'cloud_data'
    proc = net.start('--data-dir', str(cloud_dir))
    kept = plant_cloud(net, fleet, refs, ['alice', 'bob', 'zoe'])
    stop_stats(proc)

    endpoint = f'tcp/127.0.0.1:{port}'
    # Write-ahead: `loom forget zoe` killed (SIGKILL) while it waits for the cloud leaves zoe's
    # fleet erasure pending, never lost; the storage node started later retries it too.
    crashed = subprocess.Popen(
        [sys.executable, '-m', 'loom_ros.cli', 'forget', 'zoe', '--root', str(root), '--connect',
         endpoint, '--keys-dir', str(fleet), '--identity', 'robot1', '--fleet-timeout',
         str(WAIT_LIMIT_S * 2)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ros.wait_for(lambda: owed(root) == 1, "zoe's entry, written before the fleet is asked")
        assert crashed.poll() is None   # still waiting for the cloud: killed mid-ask
    finally:
        crashed.kill()
        crashed.wait(WAIT_LIMIT_S)
    assert (read_summary(root)['pending'], read_summary(root)['attempts']) == (1, 0)

    params = params_file(tmp_path, 'storage', {
        'storage': {'root': str(root), 'embedder': 'hash', 'stats_period_s': 0.2},
        'telemetry': {'diagnostics': {'period_s': 0.2}},
        'forget': {'fleet_connect': [endpoint], 'keys_dir': str(fleet), 'identity': 'robot1',
                   'fleet_timeout_s': DOWN_S, 'retry_period_s': 0.2, 'retry_backoff_s': 0.2,
                   'retry_max_backoff_s': 0.5, 'retry_per_period': 2}})
    args = ('-m', 'loom_ros.storage.ros2.node', '--ros-args', '-r', '__ns:=/fq',
            '--params-file', str(params))
    stats, diagnostics = [], []
    ros.node.create_subscription(StorageStats, '/fq/storage/stats', stats.append,
                                 to_qos_profile('batched'))
    ros.node.create_subscription(DiagnosticArray, '/diagnostics', diagnostics.append, 50)

    def pending_tier(since: int = 0):
        for msg in reversed(stats[since:]):
            for tier in msg.tiers:
                if tier.name == 'fleet_erasures_pending':
                    return tier
        return None

    storage = spawn(*args)
    forget = ros.node.create_client(Forget, '/fq/storage/forget')
    answer = ros.call(forget, Forget.Request(subject='alice', requested_by='dpo:test',
                                             fleet=True), 'storage/forget', resend_s=WAIT_LIMIT_S,
                      alive=[storage])
    assert answer.ok, answer.error
    assert answer.fleet_status in ('no_server', 'timeout') and \
        answer.fleet_error.startswith('pending, will retry'), answer.fleet_error
    receipt = json.loads(answer.receipt)
    assert receipt['fleet_pending'] is True
    assert any(n.startswith('fleet: pending, will retry') for n in receipt['notes'])
    ros.wait_for(lambda: pending_tier() is not None and pending_tier().rows == 2,
                 "zoe's and alice's pending fleet erasures on storage/stats", alive=[storage])
    ros.wait_for(lambda: any('2 fleet erasures pending (oldest' in st.message and
                             level_of(st) == WARN for d in diagnostics for st in d.status),
                 'the WARN on /diagnostics', alive=[storage])
    # The node retried meanwhile (the cloud is down: more attempts, still pending).
    ros.wait_for(lambda: owed(root, 'attempts') >= 3, 'retries by the node',
                 alive=[storage])
    created = read_summary(root)['oldest_ms']

    # A restart: the entry is on disk, the new process shows it and goes on retrying.
    storage.popen.send_signal(signal.SIGINT)
    code, _, err = storage.finish(WAIT_LIMIT_S)
    assert code == 0, err
    seen = len(stats)
    storage = spawn(*args)
    ros.wait_for(lambda: pending_tier(seen) is not None and pending_tier(seen).rows == 2,
                 'the pending erasures after the restart', alive=[storage])
    assert pending_tier(seen).oldest_ms == created

    net.start('--data-dir', str(cloud_dir))   # the cloud is back
    seen = len(stats)
    ros.wait_for(lambda: pending_tier(seen) is not None and pending_tier(seen).rows == 0,
                 'the retry to get a verified receipt', alive=[storage])
    assert read_summary(root)['pending'] == 0
    left = scan(cloud_dir)
    assert kept['alice'].encode() not in left and kept['zoe'].encode() not in left
    assert kept['bob'].encode() in left
    records = {r['subject_ref']: r for r in audited(root, 'fleet_erasure_retried')}
    assert set(records) == {refs.ref('alice'), refs.ref('zoe')}
    assert records[refs.ref('alice')]['requested_by'] == 'dpo:test'
    assert all(r['fleet_receipts'][0]['cloud'] == 'cloud' for r in records.values())
    storage.popen.send_signal(signal.SIGINT)
    code, _, err = storage.finish(WAIT_LIMIT_S)
    assert code == 0, err
    conn = sqlite3.connect(f'file:{pending_path(root)}?mode=ro', uri=True)
    assert conn.execute('select count(*) from fleet_erasures where done_ms = 0').fetchone()[0] \
        == 0
    conn.close()
