"""What a Zenoh router refuses, counted and audited: read from zenoh's own log, because zenoh's
access control drops a message without telling the application (pure: bytes in, counts out).

zenoh 1.x (the wheel has no `stats` feature) reports a decision only as a log event of target
`zenoh::net::routing::interceptor::access_control` at TRACE, one per message, allowed or not:

    <zid> on <subject> is unauthorized to Put (ingress) on <key>          (first decision)
    Using cached result: <zid> is unauthorized to Put (ingress) on <key>  (later ones)
    ACL (ingress): caching permissions for `<key>` ...                    (then one line per
        message kind, a table being filled, not a refusal: skipped)
    <zid> did not match any configured ACL subject. ...                   (INFO: a TLS identity
        with no rules; all its messages are denied, most without a log line)

and a TLS link it would not accept (no client certificate, another authority, plain TCP) as a
WARN of target `zenoh_link_tls::unicast` ending `. Hint: increase the system open file limit.`

RefusalParser turns those lines into Refusal records (any other line is handed back, to be
forwarded); RefusalCounter counts every refusal by (identity, action, flow, key cut to MAX_KEY)
and audits a bounded sample: the first of each kind, within a token bucket, then a totals row
per period. Lines are bounded before parsing. A key expression may contain a newline, so a
member can make up a line: identities therefore come from `names` (the router's own link table,
zid -> certificate name), never from the text alone, a line whose
text names another identity than its zid's link is counted in `suspect_lines`, and a permission
table left unfinished has its rows counted as refusals. zenoh can log a session's refusal before
its link is listed (a robot reconnecting to a router that just reopened), so a refusal from a zid
the table does not name yet is held, bounded, and asked about again at `settle`; one still
unnamed after `name_wait_s` is counted as `zid:<id>`. What remains: a member that knows another
member's zid can make up refusals in that member's name (a false alarm, never an access), and
one that also makes up the rest of a table can hide a few of its own refusals from the count.
Likewise a key holding a newline can make up a TLS WARN line, counted as an `unauthenticated`
connect: a false alarm, never an access (zenoh's text log gives no way to tell it from a real
one; a structured log would).
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

ACL_TARGET = 'zenoh::net::routing::interceptor::access_control'
TLS_TARGET = 'zenoh_link_tls::unicast'
# What the router adds to RUST_LOG so that refusals are logged at all.
LOG_DIRECTIVES = f'{ACL_TARGET}=trace,{TLS_TARGET}=warn'
MAX_LINE = 4096          # bytes of one log line kept; the rest of a longer line is dropped
MAX_KEY = 128            # characters of a key expression a kind is counted under
MAX_KINDS = 1024         # distinct kinds counted one by one; more fall into one overflow kind
MAX_NAMES = 4096         # zid -> identity entries remembered
MAX_UNNAMED = 1024       # refusals held while their zid's link is not listed yet; more: zid:<id>
NAME_WAIT_S = 5.0        # how long a refusal waits for its zid's name
TOP_KINDS = 50           # kinds named in a totals row or a stats snapshot

# zenoh fills a key's permission table in this order (AclMessage, compute_keyexpr_cache).
_CACHE_LABELS = ('Query', 'Reply', 'Put', 'Delete', 'Declare/Undeclare Subscriber',
                 'Declare/Undeclare Queryable', 'Declare/Undeclare Liveliness Token',
                 'Liveliness Query', 'Declare Liveliness Subscriber')
_LINE = re.compile(rb'\S+ +(?P<level>TRACE|DEBUG|INFO|WARN|ERROR) +(?:\S+ )?'
                   rb'(?P<thread>ThreadId\(\d+\)) (?P<target>[\w:]+): (?P<msg>.*)', re.S)
_DECISION = re.compile(
    r'(?:(?P<zid>[0-9a-f]{1,32}) on (?P<subject>\S{1,512})|Using cached result: '
    r'(?P<czid>[0-9a-f]{1,32})) is (?P<un>un)?authorized to (?P<label>[A-Za-z/ ]{1,64}) '
    r'\((?P<flow>ingress|egress)\) on (?P<key>.*)', re.S)
_CACHING = re.compile(r'ACL \((?P<flow>ingress|egress)\): caching permissions for `(?P<key>.*)`'
                      r' \.\.\.', re.S)
_NO_SUBJECT = re.compile(r'(?P<zid>[0-9a-f]{1,32}) did not match any configured ACL subject')
_CERT_NAME = re.compile(r'CertCommonName\(([^)]{1,64})\)')
_TLS_HINT = '. Hint: increase the system open file limit.'
_QUICK = (b'unauthorized', b'caching permissions', b'did not match', b' WARN ', b' ERROR ',
          b' INFO ', b' DEBUG ')


@dataclass(frozen=True)
class Refusal:
    """One refused message, link or session: who (a fleet identity, `unauthenticated`, or
    `zid:<id>` when the router does not know the zid), what (zenoh's message kind in snake
    case, or `connect` / `session`), the flow (ingress: the member sent it; egress: the router
    withheld it from the member) and the key expression (or the TLS error)."""
    identity: str
    action: str
    flow: str
    key: str
    zid: str = ''
    claimed: str = ''    # the certificate name the log line itself shows


@dataclass
class _Table:
    """A permission table zenoh is filling for a key on one thread: the rows seen so far."""
    flow: str
    key: str
    rows: list


def _action(label: str) -> str:
    return label.strip().lower().replace('/', '_').replace(' ', '_')


class RefusalParser:
    """zenoh log bytes in (any chunking), Refusal records and other lines out."""

    def __init__(self, names: Callable[[str], str | None] = lambda zid: None, *,
                 clock: Callable[[], float] = time.monotonic, name_wait_s: float = NAME_WAIT_S):
        self._names = names
        self._clock, self.name_wait_s = clock, name_wait_s
        self._known: OrderedDict[str, str | None] = OrderedDict()
        # zid -> (when first held, its refusals): refusals waiting for the zid's link
        self._unnamed: dict[str, tuple[float, list[Refusal]]] = {}
        self._held = 0
        self._tail = b''
        self._dropping = False      # inside a line longer than MAX_LINE
        self._cache: dict[str, _Table] = {}   # per thread: the permission table being filled
        self.lines = 0
        self.cut_lines = 0          # lines longer than MAX_LINE (cut)
        self.acl_seen = False       # zenoh said "Access control is enabled"
        self.suspect_lines = 0      # lines that do not fit what zenoh writes (made up?)

    def feed(self, chunk: bytes) -> tuple[list[Refusal], list[str]]:
        """Refusals in `chunk` (plus what an earlier chunk left unfinished), and the lines that
        are not about refusals, decoded. A line is cut at MAX_LINE bytes, its rest dropped."""
        refusals: list[Refusal] = []
        other: list[str] = []
        data, self._tail = self._tail + chunk, b''
        if self._dropping:           # the rest of a line already cut
            newline = data.find(b'\n')
            if newline < 0:
                return refusals, other
            data, self._dropping = data[newline + 1:], False
        end = data.rfind(b'\n')
        body, rest = (data[:end], data[end + 1:]) if end >= 0 else (b'', data)
        if body:
            if not self._cache and not any(marker in body for marker in _QUICK):
                # Only allowed-message TRACE lines: the hot path, a few C scans per chunk.
                self.lines += body.count(b'\n') + 1
            else:
                for line in body.split(b'\n'):
                    self._line(line, refusals, other)
        if len(rest) > MAX_LINE:
            self._line(rest, refusals, other)
            self._dropping = True
        else:
            self._tail = rest
        return refusals, other

    def _line(self, raw: bytes, refusals: list, other: list) -> None:
        self.lines += 1
        if len(raw) > MAX_LINE:
            self.cut_lines += 1
            raw = raw[:MAX_LINE]
        m = _LINE.match(raw)
        if m is None:
            if raw.strip():
                other.append(raw.decode('utf-8', 'replace'))
            return
        target, msg = m['target'].decode(), m['msg'].decode('utf-8', 'replace')
        if target == ACL_TARGET:
            self._acl(m['thread'].decode(), m['level'].decode(), msg, raw, refusals, other)
        elif target == TLS_TARGET and m['level'] == b'WARN':
            reason = msg[:-len(_TLS_HINT)] if msg.endswith(_TLS_HINT) else msg
            refusals.append(Refusal('unauthenticated', 'connect', 'ingress', reason[:MAX_KEY]))
        else:
            other.append(raw.decode('utf-8', 'replace'))

    def _acl(self, thread: str, level: str, msg: str, raw: bytes, refusals: list,
             other: list) -> None:
        d = _DECISION.match(msg)
        if d is not None:
            state = self._cache.get(thread)
            if state is not None:
                if d['zid'] and d['flow'] == state.flow and d['key'] == state.key \
                        and d['label'] == _CACHE_LABELS[len(state.rows)] \
                        and d['zid'] == (state.rows[0][0]['zid'] if state.rows else d['zid']):
                    # A row of the permission table zenoh fills for a new key: not a message.
                    state.rows.append((d, msg))
                    if len(state.rows) == len(_CACHE_LABELS):
                        del self._cache[thread]
                    return
                self._abandon(thread, refusals)
            if d['un']:
                self._emit(self._refusal(d), refusals)
            return
        c = _CACHING.match(msg)
        if c is not None:
            self._abandon(thread, refusals)
            self._cache[thread] = _Table(c['flow'], c['key'], [])
            return
        n = _NO_SUBJECT.match(msg)
        if n is not None:
            zid = n['zid']
            self._emit(Refusal(self.identity(zid), 'session', 'ingress', '**', zid), refusals)
            return
        if msg.startswith('Access control is enabled'):
            self.acl_seen = True
            return
        if level in ('WARN', 'ERROR'):
            other.append(raw.decode('utf-8', 'replace'))

    def _refusal(self, d: re.Match) -> Refusal:
        zid = d['zid'] or d['czid']
        claimed = _CERT_NAME.search(d['subject'] or '')
        refusal = Refusal(self.identity(zid), _action(d['label']), d['flow'],
                          d['key'][:MAX_KEY], zid, claimed[1] if claimed else '')
        if refusal.claimed and refusal.claimed != refusal.identity \
                and not refusal.identity.startswith('zid:'):
            self.suspect_lines += 1   # the text names another identity than the link does
        return refusal

    def _abandon(self, thread: str, refusals: list) -> None:
        """A permission table left unfinished is an identity without rules (no rows) or made-up
        lines (a key expression with a newline): its rows are counted as what they say."""
        state = self._cache.pop(thread, None)
        if state is not None and state.rows:
            self.suspect_lines += len(state.rows)
            refusals.extend(self._refusal(d) for d, _ in state.rows if d['un'])

    def _emit(self, refusal: Refusal, refusals: list) -> None:
        """A refusal out now, or held while its zid has no name yet (bounded)."""
        if not refusal.identity.startswith('zid:') or self._held >= MAX_UNNAMED:
            refusals.append(refusal)
            return
        since, held = self._unnamed.setdefault(refusal.zid, (self._clock(), []))
        held.append(refusal)
        self._held += 1

    def settle(self, force: bool = False) -> list[Refusal]:
        """Held refusals whose zid now has a name (under it), or that waited `name_wait_s`
        (or all, with `force`) as `zid:<id>`; the rest stay held."""
        out: list[Refusal] = []
        now = self._clock()
        for zid, (since, held) in list(self._unnamed.items()):
            name = self.identity(zid)
            if name.startswith('zid:') and not force and now - since < self.name_wait_s:
                continue
            del self._unnamed[zid]
            self._held -= len(held)
            for refusal in held:
                if refusal.claimed and refusal.claimed != name and not name.startswith('zid:'):
                    self.suspect_lines += 1   # as _refusal counts it for a zid named at once
                out.append(dataclasses.replace(refusal, identity=name))
        return out

    @property
    def held(self) -> int:
        return self._held

    def identity(self, zid: str) -> str:
        """The fleet identity behind `zid` by the router's link table (remembered, bounded)."""
        if zid in self._known:
            self._known.move_to_end(zid)
            name = self._known[zid]
        else:
            try:
                name = self._names(zid)
            except Exception:   # a closing session: the zid stays unnamed
                name = None
            # A zid seen before its link is listed is asked again next time.
            if name is not None:
                self._known[zid] = name
                if len(self._known) > MAX_NAMES:
                    self._known.popitem(last=False)
        return name if name else f'zid:{zid}'


class RefusalCounter:
    """Counts every refusal by kind and audits a bounded sample.

    `audit(kind, fields)` stores one audit row (it may raise: counted, never propagated). The
    first refusal of each kind is audited while the bucket (`audit_burst` rows, refilled at
    `audit_rate` per second) has a token; every `period_s` one `zenoh_refusal_totals` row sums
    what was refused since the last one (the TOP_KINDS largest kinds by name)."""

    def __init__(self, audit: Callable[[str, dict], None] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, period_s: float = 60.0,
                 audit_rate: float = 1.0, audit_burst: float = 20.0):
        self._audit = audit
        self._clock = clock
        self.period_s = period_s
        self._rate, self._burst = audit_rate, audit_burst
        self._tokens = audit_burst
        self._last = clock()
        self._period_start = self._last
        self.counts: dict[tuple[str, str, str, str], int] = {}
        self._since: dict[tuple[str, str, str, str], int] = {}
        self.total = 0
        self.audited = 0
        self.unaudited = 0
        self.audit_errors = 0
        self.last_audit_error = ''

    def add(self, refusal: Refusal) -> None:
        kind = (refusal.identity, refusal.action, refusal.flow, refusal.key)
        if kind not in self.counts and len(self.counts) >= MAX_KINDS:
            kind = ('*', refusal.action, refusal.flow, '*')   # overflow: still counted
        first = kind not in self.counts
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._since[kind] = self._since.get(kind, 0) + 1
        self.total += 1
        if first and self._take():
            self._write('zenoh_refused', {
                'identity': refusal.identity, 'action': refusal.action, 'flow': refusal.flow,
                'keyexpr': refusal.key, 'zid': refusal.zid, 'claimed': refusal.claimed,
                'first_of_kind': True})
        else:
            self.unaudited += 1

    def _take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def tick(self, force: bool = False) -> dict | None:
        """Once a period (or when `force`d, at exit): one totals row if anything was refused
        since the last; returns it."""
        now = self._clock()
        if not force and now - self._period_start < self.period_s:
            return None
        since, self._since = self._since, {}
        start, self._period_start = self._period_start, now
        if not since:
            return None
        row = {'refused': sum(since.values()), 'total': self.total, 'period_s': now - start,
               'kinds': len(since), 'top': self.top(since)}
        self._write('zenoh_refusal_totals', row)
        return row

    @staticmethod
    def top(counts: dict, limit: int = TOP_KINDS) -> list[dict]:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:limit]
        return [{'identity': i, 'action': a, 'flow': f, 'keyexpr': k, 'count': n}
                for (i, a, f, k), n in ranked]

    def _write(self, kind: str, fields: dict) -> None:
        if self._audit is None:
            return
        try:
            self._audit(kind, fields)
            self.audited += 1
        except Exception as exc:   # a full disk must not stop the counting
            self.audit_errors += 1
            self.last_audit_error = str(exc)[:200]

    def snapshot(self) -> dict:
        """Everything counted so far, JSON-ready (the router's stats file)."""
        by_action: dict[tuple[str, str, str], int] = {}
        for (identity, action, flow, _), n in self.counts.items():
            by_action[identity, action, flow] = by_action.get((identity, action, flow), 0) + n
        return {'refused': self.total, 'kinds': len(self.counts), 'audited': self.audited,
                'unaudited': self.unaudited, 'audit_errors': self.audit_errors,
                'last_audit_error': self.last_audit_error, 'top': self.top(self.counts),
                'by_action': [{'identity': i, 'action': a, 'flow': f, 'count': n}
                              for (i, a, f), n in sorted(by_action.items())]}
