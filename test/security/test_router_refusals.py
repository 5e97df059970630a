"""Issue 14: what the Zenoh router refuses is counted and audited, and a robot issued while it
runs gets its rules without a restart. A real router process (loom_ros.bridge.zenoh_router),
real mutual-TLS sessions on loopback, the real audit log (SQLite) and the router's stats file.

Attacks, from the issue: sessions without the fleet's certificate (plain TCP, TLS without a
client certificate, another authority's certificate) and a session holding robot2's
credentials that puts, subscribes and queries in robot1's key space and tries to answer
loom/cloud/**. Each is refused, counted by identity/action/key, and audited as a bounded sample.
"""
from __future__ import annotations

import json
import shutil
import signal
import time

import pytest
import zenoh

from harness import WAIT_LIMIT_S, free_port, loom_cli
from loom_ros.bridge.zenoh_link import session_config
from loom_ros.security import keys
from loom_ros.security.audit import AuditLog

MOVE_KEY = 'loom/robot1/fleet/robot/move'
FLEET = {'router': 'router', 'robot1': 'robot', 'robot2': 'robot', 'cloud': 'cloud',
         'tester': 'operator'}


def wait(condition, what: str, spin=None, limit: float = WAIT_LIMIT_S):
    deadline = time.monotonic() + limit
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f'timed out after {limit:.0f} s waiting for {what}')
        if spin is not None:
            spin()
        time.sleep(0.02)
    return value


@pytest.fixture(scope='module')
def fleet_keys(tmp_path_factory):
    root = tmp_path_factory.mktemp('refusal_keys')
    keys.ensure_local(root, FLEET)
    return root


class Router:
    """The router process, its stats file and audit log."""

    def __init__(self, spawn, keys_dir, tmp_path):
        self.port = free_port()
        self.stats_file = tmp_path / 'router_stats.json'
        self.audit_db = tmp_path / 'router_audit.db'
        self.proc = spawn('-m', 'loom_ros.bridge.zenoh_router',
                          '--listen', f'tls/127.0.0.1:{self.port}', '--keys-dir', str(keys_dir),
                          '--audit-db', str(self.audit_db), '--stats-file', str(self.stats_file),
                          '--stats-period-s', '0.1', '--watch-s', '0.2')
        line = self.proc.popen.stdout.readline()
        if not line or not json.loads(line).get('ready'):
            code, out, err = self.proc.finish()
            pytest.fail(f'router did not start (exit {code}):\n{line}{out}\n{err}')
        self.endpoint = f'tls/127.0.0.1:{self.port}'

    def stats(self) -> dict:
        if self.proc.popen.poll() is not None:
            code, out, err = self.proc.finish()
            pytest.fail(f'the router exited ({code}):\n{out}\n{err}')
        try:
            return json.loads(self.stats_file.read_text())
        except (OSError, ValueError):
            return {}

    def count(self, identity: str, action: str, keyexpr: str = '') -> int:
        """Refusals by identity and action (on one key expression: among the top kinds)."""
        rows = self.stats().get('top' if keyexpr else 'by_action', [])
        return sum(t['count'] for t in rows if t['identity'] == identity
                   and t['action'] == action and (not keyexpr or t['keyexpr'] == keyexpr))

    def _rows(self, kind: str) -> list[dict]:
        log = AuditLog(self.audit_db)
        try:
            return [r['fields'] for r in log.query('zenoh_router', kind, limit=100_000)]
        finally:
            log.close()

    def audit(self, kind: str = 'zenoh_refused') -> list[dict]:
        """The router's audit rows of `kind`, once its writer thread has stored every row the
        stats file says it audited."""
        if self.proc.popen.poll() is None:
            wait(lambda: len(self._rows('')) >= self.stats().get('audited', 0),
                 "the router's audit writer to catch up")
        return self._rows(kind)

    def stop(self) -> str:
        self.proc.popen.send_signal(signal.SIGTERM)
        code, _, err = self.proc.finish()
        assert code == 0, err
        return err


@pytest.fixture
def router(spawn, fleet_keys, tmp_path):
    return lambda keys_dir=fleet_keys: Router(spawn, keys_dir, tmp_path)


@pytest.fixture
def open_session():
    sessions = []

    def open_(config):
        session = zenoh.open(config)
        sessions.append(session)
        return session
    yield open_
    for session in sessions:
        session.close()


def secure(router, keys_dir, name):
    return session_config('client', [router.endpoint], identity=keys.load(keys_dir, name))


def test_sessions_without_the_fleets_certificate_are_refused_counted_and_audited(
        router, fleet_keys, tmp_path, open_session):
    r = router()
    other = keys.ensure_local(tmp_path / 'other_fleet', {'robot1': 'robot'})['robot1']
    no_client_cert = zenoh.Config()
    no_client_cert.insert_json5('mode', '"client"')
    no_client_cert.insert_json5('connect/endpoints', json.dumps([r.endpoint]))
    no_client_cert.insert_json5('transport/link/tls/root_ca_certificate',
                                json.dumps(str(keys.keys_path(fleet_keys) / 'ca.pem')))
    attempts = {'plain tcp': session_config('client', [f'tcp/127.0.0.1:{r.port}']),
                'tls without a client certificate': no_client_cert,
                'another authority': session_config('client', [r.endpoint], identity=other)}
    for what, config in attempts.items():
        config.insert_json5('scouting/multicast/enabled', 'false')
        config.insert_json5('scouting/timeout', '500')
        with pytest.raises(zenoh.ZError):
            zenoh.open(config).close()
            pytest.fail(f'{what}: connected')
    reasons = wait(lambda: {t['keyexpr'] for t in r.stats().get('top', [])
                            if t['identity'] == 'unauthenticated' and t['action'] == 'connect'}
                   if r.count('unauthenticated', 'connect') >= 3 and len(r.audit()) >= 3 else
                   None, 'three refused TLS handshakes counted and audited')
    assert len(reasons) == 3, reasons   # one reason per attack: each was seen for what it was
    assert {row['identity'] for row in r.audit()} == {'unauthenticated'}
    refused = r.count('unauthenticated', 'connect')
    # The fleet's own identity connects and is not counted (the counter is not a connection
    # counter): its put reaches a subscriber of the operator.
    got = []
    open_session(secure(r, fleet_keys, 'tester')).declare_subscriber(
        'loom/robot1/**', lambda s: got.append(1))
    robot1 = open_session(secure(r, fleet_keys, 'robot1'))
    wait(lambda: got, "robot1's put at the operator",
         spin=lambda: robot1.put('loom/robot1/x', b'1'))
    assert r.count('unauthenticated', 'connect') == refused
    assert r.stats()['refused'] == refused


def test_robot2_credentials_refused_counted_and_audited(router, fleet_keys, open_session):
    r = router()
    operator = open_session(secure(r, fleet_keys, 'tester'))
    robot1 = open_session(secure(r, fleet_keys, 'robot1'))
    robot2 = open_session(secure(r, fleet_keys, 'robot2'))
    moves, marks = [], []
    robot1.declare_subscriber(MOVE_KEY, lambda s: moves.append(s.payload.to_bytes()))
    operator.declare_subscriber('loom/robot2/mark', lambda s: marks.append(1))
    wait(lambda: moves, "the operator's move at robot1",
         spin=lambda: operator.put(MOVE_KEY, b'operator'))
    # The issue's attacks with robot2's credentials, then a marker on robot2's own key: once it
    # is at the operator, the router has handled everything before it on robot2's link.
    for _ in range(20):
        robot2.put(MOVE_KEY, b'robot2', congestion_control=zenoh.CongestionControl.BLOCK)
    spy = robot2.declare_subscriber('loom/robot1/**', lambda s: None)
    fake = robot2.declare_queryable('loom/cloud/infer/*', lambda q: q.reply(q.keyexpr, b'fake'))
    replies = list(robot2.get('loom/robot1/status', timeout=1.0))
    wait(lambda: marks, "robot2's marker at the operator",
         spin=lambda: robot2.put('loom/robot2/mark', b'm'))
    assert set(moves) == {b'operator'}, moves   # refused: none of robot2's moves arrived
    assert [reply.ok for reply in replies if reply.ok is not None] == []

    expected = {('put', MOVE_KEY): 20, ('declare_subscriber', 'loom/robot1/**'): 1,
                ('declare_queryable', 'loom/cloud/infer/*'): 1,
                ('query', 'loom/robot1/status'): 1}
    wait(lambda: all(r.count('robot2', a, k) >= n for (a, k), n in expected.items()),
         "robot2's refusals in the stats file")
    assert r.count('robot2', 'put', MOVE_KEY) == 20   # each refused sample counted, once
    rows = [row for row in r.audit() if row['identity'] == 'robot2']
    # Audited as a sample: one row per kind, not one per sample.
    assert sorted((row['action'], row['keyexpr']) for row in rows) == sorted(expected), rows
    assert all(row['claimed'] == 'robot2' and row['flow'] == 'ingress' for row in rows)
    # Allowed traffic is not counted as refused.
    assert not [t for t in r.stats()['top'] if t['identity'] in ('robot1', 'tester')]
    spy.undeclare()
    fake.undeclare()
    err = r.stop()
    totals = r.audit('zenoh_refusal_totals')
    assert totals and sum(t['refused'] for t in totals) >= 23, totals
    assert 'zenoh_router: refused' in err


def test_an_identity_without_rules_is_counted(router, fleet_keys, tmp_path, open_session):
    """A certificate of the fleet's authority for a name the router has no rules for: every
    message it sends is denied (mostly without a log line); its session is counted."""
    r = router()
    stray_dir = tmp_path / 'stray'
    stray_dir.mkdir()
    for name in ('ca.pem', 'ca.key'):
        shutil.copy(keys.keys_path(fleet_keys) / name, stray_dir / name)
    keys.issue(stray_dir, 'robot9', 'robot')
    got = []
    open_session(secure(r, fleet_keys, 'tester')).declare_subscriber(
        'loom/robot9/**', lambda s: got.append(1))
    robot9 = open_session(secure(r, stray_dir, 'robot9'))
    wait(lambda: r.count('robot9', 'session') >= 1, "robot9's session counted",
         spin=lambda: robot9.put('loom/robot9/x', b'1'))
    assert got == []
    assert [row['action'] for row in r.audit() if row['identity'] == 'robot9'][:1] == ['session']


def test_a_flood_is_counted_in_full_and_audited_in_bounded_rows(router, fleet_keys,
                                                                open_session):
    r = router()
    robot2 = open_session(secure(r, fleet_keys, 'robot2'))
    operator = open_session(secure(r, fleet_keys, 'tester'))
    marks = []
    operator.declare_subscriber('loom/robot2/mark', lambda s: marks.append(1))
    start = time.monotonic()
    sent = 3000
    for i in range(sent):   # 300 distinct keys: each a new kind, so the bucket is what bounds
        robot2.put(f'loom/robot1/flood/{i % 300}', b'x',
                   congestion_control=zenoh.CongestionControl.BLOCK)
    wait(lambda: marks, 'the marker after the flood',
         spin=lambda: robot2.put('loom/robot2/mark', b'm'))
    wait(lambda: r.count('robot2', 'put') >= sent, 'every flooded sample counted')
    assert r.count('robot2', 'put') == sent
    stats = r.stats()
    elapsed = time.monotonic() - start
    rows = r.audit()
    # The bucket: 20 rows at once, then one a second; everything else is counted only.
    assert 20 <= len(rows) <= 20 + elapsed + 1, (len(rows), elapsed)
    assert stats['unaudited'] == sent - len(rows)
    assert stats['kinds'] == 300


def test_a_robot_issued_while_the_router_runs_gets_its_rules(router, tmp_path, spawn,
                                                              open_session):
    keys_dir = tmp_path / 'live_keys'
    keys.ensure_local(keys_dir, {'router': 'router', 'tester': 'operator'})
    r = router(keys_dir)
    got = []
    operator = open_session(secure(r, keys_dir, 'tester'))
    operator.declare_subscriber('loom/robot3/**', lambda s: got.append(time.monotonic()))
    assert 'robot3' not in r.stats().get('members', ['robot3'])
    issued_at = time.monotonic()
    proc = spawn(*loom_cli('keys', 'issue', 'robot3', '--role', 'robot',
                           '--keys-dir', str(keys_dir)))
    code, out, err = proc.finish()
    assert code == 0, err
    wait(lambda: 'robot3' in r.stats().get('members', []), 'the router to take robot3 in')
    robot3 = open_session(secure(r, keys_dir, 'robot3'))
    # The operator's session was connected before the reload: it reconnects by itself.
    wait(lambda: got, "robot3's put at the operator",
         spin=lambda: robot3.put('loom/robot3/hello', b'hi'))
    stats = r.stats()
    assert stats['reloads'] == 1
    gap = got[0] - issued_at
    print(f'issue -> first delivery {gap:.2f} s; router down {stats["last_reload_down_s"]} s')
    assert [row['added'] for row in r.audit('zenoh_acl_reload')] == [['robot3']]


def test_a_robot_whose_folder_is_removed_loses_its_rules(router, tmp_path, open_session):
    """Revocation by removing an identity's folder: the router reloads without it, the robot's
    session (reconnecting by itself, its certificate still the authority's) has no rules, so
    everything it sends is denied, and its session is counted as refused."""
    keys_dir = tmp_path / 'revoke_keys'
    keys.ensure_local(keys_dir, {'router': 'router', 'tester': 'operator', 'robot4': 'robot'})
    robot_side = tmp_path / 'on_robot4'   # the robot's own copy of its credentials
    shutil.copytree(keys_dir / 'robot4', robot_side / 'robot4')
    shutil.copy(keys_dir / 'ca.pem', robot_side / 'ca.pem')
    r = router(keys_dir)
    got = []
    open_session(secure(r, keys_dir, 'tester')).declare_subscriber(
        'loom/robot4/**', lambda s: got.append(s.payload.to_bytes()))
    robot4 = open_session(secure(r, robot_side, 'robot4'))
    wait(lambda: got, "robot4's put at the operator",
         spin=lambda: robot4.put('loom/robot4/a', b'before'))
    shutil.rmtree(keys_dir / 'robot4')
    wait(lambda: 'robot4' not in r.stats().get('members', ['robot4']), 'the router to drop robot4')
    delivered = len(got)
    wait(lambda: r.count('robot4', 'session') >= 1, "robot4's session without rules counted",
         spin=lambda: robot4.put('loom/robot4/a', b'after'))
    for _ in range(20):
        robot4.put('loom/robot4/a', b'after', congestion_control=zenoh.CongestionControl.BLOCK)
    assert b'after' not in got[delivered:], got
    assert r.stats()['reloads'] == 1
    assert [row['removed'] for row in r.audit('zenoh_acl_reload')] == [['robot4']]
