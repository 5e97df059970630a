"""The router's refusal accounting without a router (loom_ros.security.refusals): zenoh's log lines
in the exact form zenoh 1.10 writes them (copied from a real router's output), fed in any
chunking, counted by identity, and audited within bounds by an injected clock."""
from __future__ import annotations

import pytest

from loom_ros.security import refusals
from loom_ros.security.refusals import RefusalCounter, RefusalParser

ACL = 'zenoh::net::routing::interceptor::access_control'
R2 = '96cba56bda113d6a87ebad49ac9e6147'   # robot2's zid in the capture
SUBJECT = f'Interface(lo)+CertCommonName(robot2)+Transport(Tls)+{R2}'
# Verbatim from a zenoh_router run (robot2 putting under robot1's key, then plain TCP and a TLS
# client without a certificate trying to connect).
CAPTURE = f'''\
2026-11-30T07:25:46.865152Z DEBUG ThreadId(01) {ACL}: Access control is enabled
2026-11-30T07:25:48.844638Z DEBUG acc-0 ThreadId(05) zenoh_link_tls::unicast: Accepted TLS connection on 127.0.0.1:17447: 127.0.0.1:45452. Common Name: robot2.
2026-11-30T07:25:48.848270Z TRACE  rx-0 ThreadId(08) {ACL}: {R2} on {SUBJECT} is unauthorized to Put (ingress) on loom/robot1/fleet/robot/move
2026-11-30T07:25:48.848308Z TRACE  rx-0 ThreadId(08) {ACL}: Using cached result: {R2} is unauthorized to Put (ingress) on loom/robot1/fleet/robot/move
2026-11-30T07:25:48.851061Z TRACE  rx-0 ThreadId(08) {ACL}: {R2} on {SUBJECT} is authorized to Put (ingress) on loom/robot2/ok
2026-11-30T07:25:49.355656Z  WARN acc-0 ThreadId(05) zenoh_link_tls::unicast: received corrupt message of type InvalidContentType. Hint: increase the system open file limit.
2026-11-30T07:25:49.458749Z  WARN acc-0 ThreadId(05) zenoh_link_tls::unicast: peer sent no certificates. Hint: increase the system open file limit.
'''.encode()


def line(msg: str, thread: str = 'ThreadId(08)', level: str = 'TRACE') -> bytes:
    return f'2026-11-30T07:25:48.848788Z {level}  rx-0 {thread} {ACL}: {msg}\n'.encode()


def table(key: str, zid: str = R2, flow: str = 'ingress', allowed=('Query',),
          thread: str = 'ThreadId(08)') -> bytes:
    """What zenoh writes when it fills the permission table of a new key for one transport."""
    out = line(f'ACL ({flow}): caching permissions for `{key}` ...', thread)
    for label in refusals._CACHE_LABELS:
        verdict = 'authorized' if label in allowed else 'unauthorized'
        out += line(f'{zid} on {SUBJECT} is {verdict} to {label} ({flow}) on {key}', thread)
    return out


def parse(data: bytes, step: int = 0, names=lambda zid: 'robot2' if zid == R2 else None):
    parser = RefusalParser(names)
    found, other = [], []
    for i in range(0, len(data), step or len(data)):
        r, o = parser.feed(data[i:i + (step or len(data))])
        found += r
        other += o
    return parser, found, other


@pytest.mark.parametrize('step', [0, 1, 7, 64])
def test_a_real_capture_in_any_chunking(step):
    data = CAPTURE + table('loom/robot1') + line(
        f'{R2} on {SUBJECT} is unauthorized to Declare Subscriber (ingress) on loom/robot1/**')
    parser, found, other = parse(data, step)
    assert [(r.identity, r.action, r.flow, r.key) for r in found] == [
        ('robot2', 'put', 'ingress', 'loom/robot1/fleet/robot/move'),
        ('robot2', 'put', 'ingress', 'loom/robot1/fleet/robot/move'),
        ('unauthenticated', 'connect', 'ingress',
         'received corrupt message of type InvalidContentType'),
        ('unauthenticated', 'connect', 'ingress', 'peer sent no certificates'),
        ('robot2', 'declare_subscriber', 'ingress', 'loom/robot1/**')]   # the table: no rows
    assert parser.acl_seen
    assert [o.split(' ')[-1] for o in other] == ['robot2.']   # the DEBUG line, passed on
    assert parser.suspect_lines == 0 and parser.cut_lines == 0


def test_identities_come_from_the_link_table_not_the_text():
    forged = f'{R2} on Interface(lo)+CertCommonName(robot1)+Transport(Tls)+{R2} is unauthorized' \
             ' to Put (ingress) on loom/x'
    parser, found, _ = parse(line(forged) + line(forged.replace(R2, 'abcdef')))
    assert [(r.identity, r.claimed) for r in found] == [('robot2', 'robot1')]
    assert parser.held == 1 and parser.suspect_lines == 1    # abcdef: no link, held for a name
    assert [(r.identity, r.claimed) for r in parser.settle(force=True)] == [
        ('zid:abcdef', 'robot1')]
    assert parser.held == 0 and parser.suspect_lines == 1


def test_a_refusal_logged_before_its_link_is_listed_is_counted_under_the_name_that_comes():
    # A robot reconnecting to a router that just reopened: zenoh says its session has no rules
    # before the router's link table lists it (the reopened session is not yet the one asked).
    links, clock = {}, Clock()
    parser = RefusalParser(links.get, clock=clock, name_wait_s=5.0)
    found, _ = parser.feed(
        line(f'{R2} did not match any configured ACL subject. Default permission `Deny` will '
             'be applied on all messages', level='INFO')
        + line(f'{R2} on {SUBJECT} is unauthorized to Put (ingress) on loom/robot4/a'))
    assert found == [] and parser.held == 2
    clock.t += 1.0
    assert parser.settle() == []                  # still unnamed, within the wait
    links[R2] = 'robot2'
    assert [(r.identity, r.action) for r in parser.settle()] == [('robot2', 'session'),
                                                                  ('robot2', 'put')]
    assert parser.held == 0 and parser.suspect_lines == 0


def test_a_held_line_naming_another_identity_is_still_counted_as_suspect_once_named():
    # Held before robot2's link was listed, its text claiming robot1: named robot2 at settle,
    # and the made-up name counted, as for a line whose zid is named at once.
    links, clock = {}, Clock()
    parser = RefusalParser(links.get, clock=clock)
    forged = f'{R2} on Interface(lo)+CertCommonName(robot1)+Transport(Tls)+{R2} is unauthorized' \
             ' to Put (ingress) on loom/robot1/x'
    assert parser.feed(line(forged))[0] == [] and parser.suspect_lines == 0
    links[R2] = 'robot2'
    assert [(r.identity, r.claimed) for r in parser.settle()] == [('robot2', 'robot1')]
    assert parser.suspect_lines == 1


def test_a_zid_never_named_is_counted_as_itself_after_the_wait_and_holding_is_bounded(
        monkeypatch):
    monkeypatch.setattr(refusals, 'MAX_UNNAMED', 3)
    clock = Clock()
    parser = RefusalParser(lambda zid: None, clock=clock, name_wait_s=5.0)
    put = line(f'{R2} on {SUBJECT} is unauthorized to Put (ingress) on loom/robot1/k')
    found, _ = parser.feed(put * 5)
    assert len(found) == 2 and parser.held == 3   # past the bound: out at once, unnamed
    assert {r.identity for r in found} == {f'zid:{R2}'}
    clock.t += 4.9
    assert parser.settle() == []
    clock.t += 0.1
    assert [r.identity for r in parser.settle()] == [f'zid:{R2}'] * 3
    assert parser.held == 0


def test_a_key_with_a_newline_cannot_hide_a_refusal_behind_a_made_up_table():
    # robot2's allowed put carries a made-up "caching" line; its refused query comes next.
    carrier = line(f'{R2} on {SUBJECT} is authorized to Put (ingress) on loom/robot2/a')[:-1] \
        + b'\n' + line('ACL (ingress): caching permissions for `loom/robot1/q` ...')
    refused = line(f'{R2} on {SUBJECT} is unauthorized to Query (ingress) on loom/robot1/q')
    after = line(f'Using cached result: {R2} is unauthorized to Put (ingress) on loom/robot1/m')
    parser, found, _ = parse(carrier + refused + after)
    assert [(r.action, r.key) for r in found] == [('query', 'loom/robot1/q'),
                                                  ('put', 'loom/robot1/m')]
    assert parser.suspect_lines == 1


def test_an_identity_without_rules():
    # zenoh fills its tables without a line (no subject), then says so once per session.
    data = (line('ACL (ingress): caching permissions for `loom/robot9` ...')
            + line(f'{R2} did not match any configured ACL subject. Default permission `Deny` '
                   'will be applied on all messages', level='INFO')
            + line(f'Using cached result: {R2} is unauthorized to Put (ingress) on loom/robot9'))
    _, found, _ = parse(data, names=lambda zid: 'robot9')
    assert [(r.identity, r.action) for r in found] == [('robot9', 'session'), ('robot9', 'put')]


def test_long_lines_are_cut_and_the_next_line_still_counts():
    long_key = 'loom/robot1/' + 'k' * (3 * refusals.MAX_LINE)
    data = line(f'{R2} on {SUBJECT} is unauthorized to Put (ingress) on {long_key}') \
        + line(f'{R2} on {SUBJECT} is unauthorized to Put (ingress) on loom/robot1/short')
    for step in (0, 1000):
        parser, found, _ = parse(data, step)
        assert [len(r.key) for r in found] == [refusals.MAX_KEY, len('loom/robot1/short')]
        assert parser.cut_lines == 1


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def refusal(i: int, identity: str = 'robot2') -> refusals.Refusal:
    return refusals.Refusal(identity, 'put', 'ingress', f'loom/robot1/{i}')


def test_audit_rows_are_a_bounded_sample_and_every_refusal_is_counted():
    clock, rows = Clock(), []
    counter = RefusalCounter(lambda kind, fields: rows.append((kind, fields)), clock=clock,
                             period_s=60.0, audit_rate=1.0, audit_burst=20.0)
    for i in range(500):          # 500 kinds at once: the burst, nothing more
        counter.add(refusal(i))
    for _ in range(100):          # one kind again and again: its first row only
        counter.add(refusal(0))
    assert counter.total == 600 and len(rows) == 20
    clock.t += 5.0                # five seconds: five more tokens, for new kinds only
    for i in range(500, 600):
        counter.add(refusal(i))
    assert len(rows) == 25
    assert counter.unaudited == 600 + 100 - 25
    assert counter.tick() is None          # the period is not over
    clock.t += 60.0
    totals = counter.tick()
    assert totals['refused'] == 700 and totals['kinds'] == 600
    assert len(totals['top']) == refusals.TOP_KINDS and totals['top'][0]['count'] == 101
    assert rows[-1] == ('zenoh_refusal_totals', totals)
    clock.t += 60.0
    assert counter.tick() is None           # nothing new: no row
    assert len(rows) == 26


def test_kinds_are_bounded_and_a_failing_audit_log_only_counts(monkeypatch):
    monkeypatch.setattr(refusals, 'MAX_KINDS', 10)

    def broken(kind, fields):
        raise OSError('disk full')
    counter = RefusalCounter(broken, clock=Clock())
    for i in range(50):
        counter.add(refusal(i))
    snapshot = counter.snapshot()
    assert snapshot['refused'] == 50 and snapshot['kinds'] == 11   # ten, then one overflow
    assert {'identity': '*', 'action': 'put', 'flow': 'ingress', 'keyexpr': '*',
            'count': 40} in snapshot['top']
    assert snapshot['audit_errors'] == 11 and 'disk full' in snapshot['last_audit_error']
    assert snapshot['by_action'] == [
        {'identity': '*', 'action': 'put', 'flow': 'ingress', 'count': 40},
        {'identity': 'robot2', 'action': 'put', 'flow': 'ingress', 'count': 10}]
