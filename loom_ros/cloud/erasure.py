"""Fleet erasure (issue 17): what the cloud tier keeps per data subject, how a robot asks every
cloud server to erase it, and the signed receipt each server returns. Pure Python except
`FleetEraser.erase`, which asks over a zenoh.Session the caller owns.

What the cloud keeps: with a data folder (`loom_cloud --data-dir`, cloud.yaml
`request_log.dir`), a bounded log of the requests it answered (`RequestLog`, SQLite): who sent
it (the verified identity), the subject's keyed hash (`subject_ref`, the robot's
SubjectRefs.ref: the raw subject id never leaves the robot), the task, the request id and the
request body as received. Without one it keeps nothing, and a receipt says so.

The request: task `erase` on `loom/cloud/erase` (one chunk under loom/cloud/**, which only the
cloud identity may serve; robots and operators may query it), signed like every other request
(protocol.Signer: id, time, audience, body digest; the server's Gate checks the fleet signature,
time, replays and rate before anything else). Body: `subject_ref` and `robot`, whose records to
erase. A robot may erase only what it sent itself (`robot` is its own name, or absent); an
operator may name any robot. Anything else is refused `forbidden` and counted.

The receipt: `{request_id, subject_ref, robot, requested_by, server, cloud, at_ms, counts,
scrubbed, keeps}`, signed by the cloud identity over RECEIPT_DOMAIN and its canonical JSON
(`sig`), inside a reply whose frame is itself signed over the request's id and digest. The robot
accepts it only when both signatures are a `cloud` identity's of the fleet's authority, and the
receipt names this request, this subject and this robot (`check_reply`); everything else is
counted and skipped. A cloud certificate in the robot's revocation list (revoked.json beside
ca.pem, read again every keys.REVOCATION_CHECK_S of the injected clock) signs nothing the robot
takes: a stolen cloud key the operator revoked cannot forge receipts (`forged`). The erasure is
physical: delete under secure_delete, then checkpoint (TRUNCATE), VACUUM and checkpoint again,
so neither free pages nor the WAL keep a copy.
"""
from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loom_ros.cloud.protocol import (
    KEY_PREFIX, ReplyInvalid, RequestInvalid, Signer, Verifier, digest, parse_reply,
    reply_signed_bytes, unpack,
)
from loom_ros.security import keys
from loom_ros.security.keys import CredentialsError

ERASE_TASK = 'erase'
RECEIPT_DOMAIN = b'loom-cloud-erasure-receipt/1'
LOG_FILE = 'requests.db'
MAX_REF_CHARS = 128
MAX_RECEIPTS = 64          # receipts taken from one erasure request (one per server)
MAX_COUNT_TIERS = 16
NO_SERVER_RETRY_S = 0.1    # between asks while no cloud server is known yet
_REF = re.compile(r'[A-Za-z0-9][A-Za-z0-9:_\-]{0,127}\Z')
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z')


def erase_key(prefix: str = KEY_PREFIX) -> str:
    """`loom/cloud/erase` for the default prefix `loom/cloud/infer` (beside it, not under it)."""
    base = prefix.rpartition('/')[0]
    return f'{base}/{ERASE_TASK}' if base else ERASE_TASK


def check_ref(value) -> str:
    """A subject's keyed hash as the robot sends it (`hs256:<hex>`); RequestInvalid otherwise."""
    if not isinstance(value, str) or not _REF.match(value):
        raise RequestInvalid('bad_request', f'subject_ref: 1-{MAX_REF_CHARS} letters, digits, '
                             ': _ or -')
    return value


def check_name(value, what: str = 'robot') -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise RequestInvalid('bad_request', f'{what}: 1-64 letters, digits, _ . or -')
    return value


def receipt_signed_bytes(receipt: dict) -> bytes:
    """What a receipt's own signature covers: its domain and canonical JSON."""
    return RECEIPT_DOMAIN + b'\0' + json.dumps(receipt, sort_keys=True,
                                               separators=(',', ':')).encode()


# -- the cloud's side -------------------------------------------------------------------------
class RequestLog:
    """The cloud tier's bounded log of answered requests, per sender and subject (see above).
    Bounded by rows and by age (the oldest go first); thread-safe (workers share it)."""

    def __init__(self, folder: str | Path, *, max_rows: int = 100_000,
                 max_body_bytes: int = 65536, retention_s: float = 30 * 86400.0,
                 clock=time.time):
        if max_rows < 1 or max_body_bytes < 1 or not retention_s > 0:
            raise ValueError('request_log: max_rows, max_body_bytes and retention_s must be > 0')
        self.folder = Path(folder).expanduser()
        self.max_rows, self.max_body_bytes = int(max_rows), int(max_body_bytes)
        self.retention_s, self.clock = float(retention_s), clock
        self.path = self.folder / LOG_FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._conn = sqlite3.connect(self.path, check_same_thread=False,
                                         isolation_level=None)
            for pragma in ('journal_mode=WAL', 'synchronous=NORMAL', 'secure_delete=ON'):
                self._conn.execute(f'PRAGMA {pragma}')
            self._conn.execute(
                'create table if not exists requests (id integer primary key, at_ms integer '
                'not null, client text not null, subject_ref text not null, task text not null, '
                'request_id text not null, body blob not null)')
            self._conn.execute('create index if not exists requests_subject on requests '
                               '(client, subject_ref)')
        except (OSError, sqlite3.Error) as exc:
            raise ValueError(f'request log {self.path}: {exc}') from None
        self._lock = threading.Lock()
        self._since_trim = 0

    def record(self, client: str, subject_ref: str, task: str, request_id: str,
               body: bytes) -> None:
        now_ms = int(self.clock() * 1000)
        with self._lock:
            self._conn.execute('insert into requests (at_ms, client, subject_ref, task, '
                               'request_id, body) values (?, ?, ?, ?, ?, ?)',
                               (now_ms, client, subject_ref, task, request_id,
                                bytes(body[:self.max_body_bytes])))
            self._since_trim += 1
            if self._since_trim >= 100:
                self._trim(now_ms)

    def _trim(self, now_ms: int) -> None:
        self._since_trim = 0
        self._conn.execute('delete from requests where at_ms < ?',
                           (now_ms - int(self.retention_s * 1000),))
        self._conn.execute('delete from requests where id <= (select id from requests order by '
                           'id desc limit 1 offset ?)', (self.max_rows,))

    def count(self, client: str = '', subject_ref: str = '') -> int:
        with self._lock:
            if not client:
                return self._conn.execute('select count(*) from requests').fetchone()[0]
            return self._conn.execute('select count(*) from requests where client = ? and '
                                      'subject_ref = ?', (client, subject_ref)).fetchone()[0]

    def erase(self, client: str, subject_ref: str) -> tuple[int, bool]:
        """(rows deleted, whether the file was scrubbed: no free page or WAL frame keeps them)."""
        with self._lock:
            conn = self._conn
            conn.execute('BEGIN IMMEDIATE')
            try:
                gone = conn.execute('delete from requests where client = ? and subject_ref = ?',
                                    (client, subject_ref)).rowcount
                conn.execute('COMMIT')
            except BaseException:
                conn.execute('ROLLBACK')
                raise
            conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
            conn.execute('VACUUM')
            busy = conn.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()[0]
            return gone, busy == 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def request_log_from_config(config: dict, data_dir: str = '') -> RequestLog | None:
    """cloud.yaml `request_log` ({dir, max_rows, max_body_bytes, retention_s}); `data_dir`
    (--data-dir) overrides its dir. None when no folder is named: the cloud keeps nothing."""
    section = config.get('request_log') or {}
    if not isinstance(section, dict) or set(section) - {'dir', 'max_rows', 'max_body_bytes',
                                                        'retention_s'}:
        raise ValueError('cloud.yaml request_log: a mapping of dir, max_rows, max_body_bytes, '
                         'retention_s')
    folder = data_dir or section.get('dir') or ''
    if not folder:
        return None
    numbers = {}
    for name in ('max_rows', 'max_body_bytes', 'retention_s'):
        if name in section:
            value = section[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or value <= 0:
                raise ValueError(f'cloud.yaml request_log.{name}: a positive number')
            numbers[name] = value
    return RequestLog(str(folder), **numbers)


def erase_reply(log: RequestLog | None, signer: Signer, instance: str, client: str,
                role: str, body: dict, clock=time.time) -> dict:
    """The reply to an admitted erase request from `client` (its verified identity and role):
    the records erased and a receipt signed by `signer`. RequestInvalid('forbidden') when a
    robot names another robot's records."""
    ref = check_ref(body.get('subject_ref'))
    robot = check_name(body.get('robot') or client)
    if robot != client and role != 'operator':
        raise RequestInvalid('forbidden', f'{client} may erase only the records it sent, not '
                             f'those of {robot}')
    gone, scrubbed = log.erase(robot, ref) if log is not None else (0, True)
    receipt = {'request_id': str(body.get('id', '')), 'subject_ref': ref, 'robot': robot,
               'requested_by': client, 'server': instance, 'cloud': signer.name,
               'at_ms': int(clock() * 1000), 'counts': {'request_log': gone},
               'scrubbed': scrubbed, 'keeps': 'request_log' if log is not None else 'nothing'}
    return {'id': receipt['request_id'], 'ok': True, 'task': ERASE_TASK, 'model': '',
            'cost': 0.0, 'result': {'receipt': receipt,
                                    'sig': signer.sign(receipt_signed_bytes(receipt))}}


# -- the robot's side -------------------------------------------------------------------------
class ReceiptInvalid(ValueError):
    """A reply to an erase request that is not an authentic receipt for it; `reason` counted."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_reply(raw: bytes, is_ok: bool, verifier: Verifier, ident: str,
                request_digest: bytes, subject_ref: str, robot: str) -> tuple[bool, dict]:
    """(True, {receipt, sig, signer}) for an authentic receipt of this request, (False, {code,
    error, server}) for an authentic refusal; ReceiptInvalid otherwise: unsigned (`forged`),
    for another request (`mismatched`), signed by anything but the fleet's cloud identity
    (`forged`), or naming another request, subject or robot (`wrong_receipt`)."""
    try:
        header, body = unpack(raw)
    except ValueError as exc:
        raise ReceiptInvalid('forged', f'unsigned reply: {exc}') from None
    if header['id'] != ident:
        raise ReceiptInvalid('mismatched', 'a reply to another request')
    try:
        signer, _ = verifier.verify(header, reply_signed_bytes(ident, request_digest, body))
    except CredentialsError as exc:
        raise ReceiptInvalid('forged', str(exc)) from None
    try:
        data = parse_reply(body)
    except ReplyInvalid as exc:
        raise ReceiptInvalid('invalid', str(exc)) from None
    if data.get('id') != ident:
        raise ReceiptInvalid('wrong_receipt', 'the reply names another request id')
    if not is_ok:
        return False, {'code': str(data.get('code', 'error'))[:40],
                       'error': str(data.get('error', ''))[:500],
                       'server': str(data.get('server', ''))[:64], 'signer': signer}
    result = data.get('result', {})
    receipt, sig = result.get('receipt'), result.get('sig')
    if not isinstance(receipt, dict) or not isinstance(sig, str):
        raise ReceiptInvalid('invalid', 'an answer without a receipt')
    want = {'request_id': ident, 'subject_ref': subject_ref, 'robot': robot}
    for name, value in want.items():
        if receipt.get(name) != value:
            raise ReceiptInvalid('wrong_receipt', f'the receipt names another {name}')
    counts = receipt.get('counts')
    if not isinstance(counts, dict) or len(counts) > MAX_COUNT_TIERS or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, int)
            and not isinstance(v, bool) and 0 <= v < 2**53 for k, v in counts.items()):
        raise ReceiptInvalid('invalid', 'receipt counts: at most 16 tiers of whole numbers')
    try:
        verifier.verify({'cert': header['cert'], 'sig': sig}, receipt_signed_bytes(receipt))
    except CredentialsError as exc:
        raise ReceiptInvalid('forged', f'receipt signature: {exc}') from None
    return True, {'receipt': receipt, 'sig': sig, 'signer': signer}


@dataclass
class FleetErasure:
    """What the fleet answered to one erasure request."""

    status: str                      # done | partial | timeout | no_server | failed
    request_id: str = ''
    receipts: list = field(default_factory=list)   # check_reply's verified receipts
    refused: list = field(default_factory=list)    # authentic refusals (busy, forbidden, ...)
    error: str = ''
    rejected: Counter = field(default_factory=Counter)   # replies not taken, by reason

    def as_dict(self) -> dict:
        return {'status': self.status, 'request_id': self.request_id,
                'receipts': list(self.receipts), 'refused': list(self.refused),
                'error': self.error, 'rejected': dict(self.rejected)}


class FleetEraser:
    """Asks every cloud server at once (Zenoh QueryTarget.ALL) to erase what it kept about one
    subject for this robot, and keeps each verified receipt."""

    def __init__(self, session, identity: keys.Identity, *, prefix: str = KEY_PREFIX,
                 clock=time.time):
        self.session, self.clock = session, clock
        self.signer = Signer(identity)
        # revoked.json beside ca.pem is honoured (CredentialsError here while it is unreadable)
        self.verifier = Verifier(identity.ca.read_bytes(), ('cloud',), clock=clock,
                                 keys_dir=identity.ca.parent)
        self.key = erase_key(prefix)
        self.stats: Counter = Counter()

    def erase(self, subject_ref: str, timeout_s: float, robot: str = '') -> FleetErasure:
        """A signed request to all servers; waits until every server that got it answered,
        or `timeout_s`. Asked again (a new request) while no server is known yet: a session
        just opened learns the cloud's queryables from the router a moment later. `robot`:
        whose records (default: this identity's own). `rejected` counts the replies not taken
        in every ask."""
        deadline = time.monotonic() + timeout_s
        rejected: Counter = Counter()   # over every ask: forgers answer each one
        while True:
            result = self._ask(subject_ref, max(0.001, deadline - time.monotonic()),
                               robot or self.signer.name)
            rejected.update(result.rejected)
            if result.status != 'no_server' or deadline - time.monotonic() < NO_SERVER_RETRY_S:
                self.stats[result.status] += 1
                result.rejected = rejected
                return result
            self.stats['retry_no_server'] += 1
            time.sleep(NO_SERVER_RETRY_S)

    def _ask(self, subject_ref: str, timeout_s: float, robot: str) -> FleetErasure:
        import zenoh
        ident = uuid.uuid4().hex
        payload = self.signer.request(ERASE_TASK, {'subject_ref': subject_ref, 'robot': robot},
                                      ident, int(self.clock() * 1000))
        request_digest = digest(payload)
        result = FleetErasure('no_server', ident)
        start = time.monotonic()
        try:
            replies = self.session.get(self.key, payload=payload, timeout=timeout_s,
                                       target=zenoh.QueryTarget.ALL,
                                       consolidation=zenoh.ConsolidationMode.NONE)
            for reply in replies:
                ok = reply.ok
                try:
                    raw = (ok if ok is not None else reply.err).payload.to_bytes()
                    good, data = check_reply(raw, ok is not None, self.verifier, ident,
                                             request_digest, subject_ref, robot)
                except ReceiptInvalid as exc:
                    result.rejected[exc.reason] += 1
                    self.stats[f'rejected_{exc.reason}'] += 1
                    continue
                except AttributeError:   # neither ok nor err: not a reply Loom knows
                    result.rejected['invalid'] += 1
                    continue
                (result.receipts if good else result.refused).append(data)
                if len(result.receipts) + len(result.refused) >= MAX_RECEIPTS:
                    break
        except Exception as exc:   # a closed session: the erasure failed, said, not raised
            result.status, result.error = 'failed', f'{type(exc).__name__}: {exc}'[:500]
            return result
        timed_out = time.monotonic() - start >= timeout_s
        if result.receipts:
            result.status = 'partial' if (result.refused or timed_out) else 'done'
        elif result.refused:
            result.status = 'failed'
        elif timed_out:
            result.status = 'timeout'
        if result.refused:
            result.error = '; '.join(f"{r['server'] or r['signer']}: {r['code']}: {r['error']}"
                                     for r in result.refused)[:1000]
        elif timed_out:
            result.error = f'the wait of {timeout_s:g} s ended'
        elif not result.receipts:
            result.error = 'no cloud server answered'
        return result
