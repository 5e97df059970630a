"""Erasing one data subject everywhere this robot reaches (issue 17): the storage root
(storage/erasure.py, which audits the request first and a tombstone after), the bridge's outbox
(a callable the ROS shell passes in: the zenoh_bridge/forget service) and the fleet (every cloud
server, over Zenoh: cloud/erasure.FleetEraser, signed request, verified signed receipts). One
more audit record follows when the bridge or the fleet was asked, naming the subject only by its
keyed hash: what the bridge dropped, the fleet's status and each receipt's counts and
signature. Used by the storage node's
storage/forget service and by `loom forget`. Plain Python; Zenoh is opened only to ask the
fleet.

A fleet erasure that gets no valid signed receipt (no server answered in time, the link is
down, a server refused) is not dropped: with a queue (storage/pending_erasures.py, noted before
the fleet is asked) it stays pending, the outcome says "fleet: pending, will retry", and
`retry_pending` (the storage node's timer) asks again with back-off until a receipt verifies;
then the entry is done and audited (`fleet_erasure_retried`)."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loom_ros.bus.privacy import check_subject
from loom_ros.cloud.erasure import FleetErasure, FleetEraser
from loom_ros.cloud.protocol import KEY_PREFIX, check_instance
from loom_ros.security import keys
from loom_ros.storage.consent import SubjectRefs, check_source
from loom_ros.storage.erasure import Receipt, forget
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.pending_erasures import PendingErasures

MAX_ENDPOINTS = 16
MAX_SETTING_CHARS = 1024
MAX_TIMEOUT_S = 600.0
AUDITED_RECEIPTS = 64   # receipts written into the audit record (one per cloud server)
# storage/erasure.py's NOT_COVERED line for what this module reaches (dropped when it did).
BEYOND_ROOT = 'the fleet / cloud tier and the bridge outbox'


class FleetConfigError(ValueError):
    """Fleet-link settings that cannot be used; names the setting."""


@dataclass(frozen=True)
class FleetLink:
    """Where the cloud tier answers and who this robot is there (as for its agents' cloud)."""

    connect: tuple[str, ...]
    keys_dir: str
    identity: str
    insecure: bool = False
    timeout_s: float = 10.0
    prefix: str = KEY_PREFIX
    servers: tuple[str, ...] = ()   # cloud servers (instances) that must each send a receipt

    @classmethod
    def from_params(cls, params: dict, keys_default: str | Path,
                    prefix: str = 'storage.forget.') -> 'FleetLink | None':
        """From `<prefix>fleet_connect|fleet_servers|keys_dir|identity|insecure|
        fleet_timeout_s`; None when no endpoint is named (no fleet link). FleetConfigError
        naming the bad one."""
        connect = params.get(prefix + 'fleet_connect') or []
        if isinstance(connect, str):
            connect = [connect]
        if not isinstance(connect, (list, tuple)) or len(connect) > MAX_ENDPOINTS or any(
                not isinstance(e, str) or not 0 < len(e) <= MAX_SETTING_CHARS for e in connect):
            raise FleetConfigError(f'{prefix}fleet_connect: a list of at most {MAX_ENDPOINTS} '
                                   'endpoint strings')
        if not connect:
            return None
        identity = params.get(prefix + 'identity', '')
        keys_dir = params.get(prefix + 'keys_dir', '') or str(keys_default)
        for name, value in (('identity', identity), ('keys_dir', keys_dir)):
            if not isinstance(value, str) or not 0 < len(value) <= MAX_SETTING_CHARS:
                raise FleetConfigError(f'{prefix}{name}: a non-empty string')
        return cls(tuple(connect), keys_dir, identity,
                   params.get(prefix + 'insecure', False) is True,
                   check_timeout(params.get(prefix + 'fleet_timeout_s', 10.0),
                                 f'{prefix}fleet_timeout_s'),
                   servers=check_servers(params.get(prefix + 'fleet_servers') or [],
                                         f'{prefix}fleet_servers'))


def check_servers(value, what: str) -> tuple[str, ...]:
    """Cloud server instance names (loom cloud serve --instance), at most AUDITED_RECEIPTS."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) > AUDITED_RECEIPTS:
        raise FleetConfigError(f'{what}: a list of at most {AUDITED_RECEIPTS} server names')
    try:
        return tuple(dict.fromkeys(check_instance(v) for v in value))
    except ValueError as exc:
        raise FleetConfigError(f'{what}: {exc}') from None


def settle(result: FleetErasure, expected: tuple[str, ...] = (),
           already: tuple[str, ...] = ()) -> tuple[bool, set, list]:
    """(done, servers whose verified receipts came so far, servers still owing one). Without
    named servers: done when the fleet's status is `done` (every server that got the request
    answered a receipt). With them: done once each named server sent one, in this attempt or
    an earlier one (a server down at the first attempt is asked again until it answers)."""
    got = set(already) | {r['receipt'].get('server') for r in result.receipts
                          if isinstance(r['receipt'].get('server'), str)}
    if not expected:
        return result.status == 'done', got, []
    missing = [s for s in expected if s not in got]
    return not missing, got, missing


def check_timeout(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S:
        raise FleetConfigError(f'{what}: seconds, more than 0 and at most {MAX_TIMEOUT_S:g}')
    return float(value)


def ask_fleet(link: FleetLink, subject_ref: str, timeout_s: float) -> FleetErasure:
    """Open a Zenoh session as the robot (mutual TLS unless `insecure`), ask every cloud server
    to erase `subject_ref`, close it. Never raises: a link that cannot be made is `failed`."""
    import zenoh

    from loom_ros.bridge.zenoh_link import session_config, transport_identity
    try:
        identity = keys.load(link.keys_dir, link.identity)   # signs the request either way
        tls = transport_identity(link.insecure, link.keys_dir, link.identity)
        session = zenoh.open(session_config('client', list(link.connect), identity=tls))
    except (keys.CredentialsError, zenoh.ZError, ValueError, OSError) as exc:
        return FleetErasure('failed', error=f'cannot open the fleet link to '
                            f'{list(link.connect)}: {exc}'[:1000])
    try:
        return FleetEraser(session, identity, prefix=link.prefix).erase(subject_ref, timeout_s)
    finally:
        session.close()


@dataclass
class Outcome:
    """One `forget` everywhere: the local receipt (counts per tier, `bridge_outbox` added) and
    what the fleet answered."""

    receipt: Receipt
    fleet: FleetErasure | None = None
    fleet_status: str = 'not_configured'
    fleet_error: str = ''
    notes: list = field(default_factory=list)   # what could not be reached, and why
    fleet_pending: bool = False   # queued: the storage node retries until a receipt verifies

    def as_dict(self) -> dict:
        return {**self.receipt.as_dict(), 'fleet_status': self.fleet_status,
                'fleet_error': self.fleet_error, 'fleet_pending': self.fleet_pending,
                'fleet_receipts': list(self.fleet.receipts) if self.fleet else [],
                'notes': list(self.notes)}


def forget_everywhere(layout: StorageLayout, subject: str, *, requested_by: str,
                      audit, refs: SubjectRefs | None = None, keyring=None,
                      purge_bridge: Callable[[str], int] | None = None,
                      fleet: Callable[[str, float], FleetErasure] | None = None,
                      fleet_timeout_s: float = 10.0, no_fleet_status: str = 'not_configured',
                      clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                      objects=None, pending: PendingErasures | None = None,
                      fleet_servers: tuple[str, ...] = ()) -> Outcome:
    """Erase `subject` under the root, then from the bridge's outbox (`purge_bridge(subject)`:
    how many went; it may raise), then in the fleet (`fleet(subject_ref, timeout_s)`; None: no
    fleet link: the outcome's fleet status is `no_fleet_status`). With `pending`, the fleet
    erasure is queued before the fleet is asked and stays pending unless `settle` says it is
    done (with `fleet_servers`, each of them must have sent a verified receipt). Raises only
    what the local erasure raises (ErasureError, SubjectError, ...): the bridge's and the
    fleet's failures are said in the outcome and audited."""
    check_subject(subject)
    check_source(requested_by)
    refs = refs or SubjectRefs.at(layout.keys)
    entry, queue_error = None, ''
    if fleet is not None and pending is not None:
        try:   # write-ahead, before anything is erased here: a process killed in the local
            # erasure or while asking the fleet leaves the fleet's part pending, never lost
            entry = pending.add(refs.ref(subject), requested_by, 0)
        except StorageError as exc:
            queue_error = str(exc)[:300]
    receipt = forget(layout, subject, requested_by=requested_by, keyring=keyring, audit=audit,
                     refs=refs, clock=clock, objects=objects)
    outcome = Outcome(receipt, fleet_status=no_fleet_status)
    bridge = -1
    if purge_bridge is None:
        outcome.notes.append('bridge outbox: not asked (a stopped bridge keeps nothing; while '
                             'one runs, erase through the storage/forget service)')
    else:
        try:
            bridge = int(purge_bridge(subject))
            receipt.counts['bridge_outbox'] = bridge
        except Exception as exc:   # a bridge that is not running, or failed: said, not fatal
            outcome.notes.append(f'bridge outbox: {exc}'[:500])
    if entry is not None:
        try:   # the entry now names the erasure's audit record
            entry = pending.add(receipt.subject_ref, requested_by, receipt.audit_id)
        except StorageError as exc:
            queue_error = str(exc)[:300]
    if fleet is not None:
        outcome.fleet = fleet(receipt.subject_ref, fleet_timeout_s)
        outcome.fleet_status, outcome.fleet_error = outcome.fleet.status, outcome.fleet.error
        settled, got, missing = settle(outcome.fleet, fleet_servers)
        if missing and outcome.fleet_status in ('done', 'partial'):
            outcome.fleet_status = 'partial'
            outcome.fleet_error = '; '.join(filter(None, [
                outcome.fleet_error, f'no receipt from {", ".join(missing)}']))[:1000]
        if entry is not None:
            try:
                if settled:
                    pending.done(entry, outcome.fleet.request_id)
                else:
                    pending.failed(entry, outcome.fleet_status, outcome.fleet_error, got)
                    outcome.fleet_pending = True
            except StorageError:   # the entry stays as added: open and due (asking again
                outcome.fleet_pending = True   # after a receipt is harmless)
    if bridge >= 0 and outcome.fleet_status == 'done':   # erasure.py's line no longer holds
        receipt.not_covered = [n for n in receipt.not_covered if n != BEYOND_ROOT]
    elif outcome.fleet_status != 'done':
        said = outcome.fleet_status + (f': {outcome.fleet_error}' if outcome.fleet_error else '')
        if outcome.fleet_pending:
            outcome.notes.append(f'fleet: pending, will retry ({said})')
        elif fleet is not None and pending is not None:
            outcome.notes.append(f'fleet: {said}; NOT queued for retry ({queue_error}): run '
                                 'forget again')
        else:
            outcome.notes.append(f'fleet: {outcome.fleet_status}'
                                 + (f' ({outcome.fleet_error})' if outcome.fleet_error else ''))
    if audit is not None and (purge_bridge is not None or fleet is not None):
        receipts = [{'server': r['receipt'].get('server', ''), 'cloud': r['signer'],
                     'counts': r['receipt'].get('counts', {}),
                     'scrubbed': r['receipt'].get('scrubbed', False),
                     'keeps': r['receipt'].get('keeps', ''), 'sig': r['sig']}
                    for r in (outcome.fleet.receipts if outcome.fleet else [])]
        audit.append('erasure', 'subject_erased_beyond_root', int(clock()),
                     subject_ref=receipt.subject_ref, requested_by=requested_by,
                     erasure_audit_id=receipt.audit_id, bridge_outbox=bridge,
                     fleet_status=outcome.fleet_status,
                     fleet_request_id=outcome.fleet.request_id if outcome.fleet else '',
                     fleet_receipts=receipts[:AUDITED_RECEIPTS],
                     fleet_rejected=dict(outcome.fleet.rejected) if outcome.fleet else {},
                     fleet_pending=outcome.fleet_pending)
    return outcome


@dataclass
class Retried:
    """One retry of a pending fleet erasure."""

    entry_id: int
    subject_ref: str
    status: str
    error: str = ''
    next_ms: int = 0          # when it is due again (0: done)
    receipts: list = field(default_factory=list)
    rejected: dict = field(default_factory=dict)   # replies not believed, by reason


LINK_DOWN = 'cannot open the fleet link'   # ask_fleet's error: no point asking for the rest


# A round ends at the first of these: no cloud server answered at all, so the next entries
# would each wait their whole timeout too (the storage node's forget thread with them).
UNANSWERED = ('no_server', 'timeout')


def retry_pending(pending: PendingErasures, fleet: Callable[[str, float], FleetErasure], *,
                  timeout_s: float, limit: int, audit=None, servers: tuple[str, ...] = (),
                  clock: Callable[[], int] | None = None, every: bool = False,
                  stop: Callable[[], bool] = lambda: False) -> list[Retried]:
    """Ask the fleet again for at most `limit` due entries (the longest waiting first). An entry
    is done only when `settle` says so: the fleet's status is `done` (every server that got the
    request answered a receipt check_reply verified: signed by the fleet's cloud identity, for
    this request, subject and robot), or, with `servers` named, each of them has sent one; it
    is then audited (`erasure` / `fleet_erasure_retried`, keyed hash only), and only then
    marked done (an audit that fails leaves it pending: asked again, never done unaudited).
    Anything else (forged or foreign receipts, refusals, no answer) is one more attempt and a
    longer wait. A link that cannot be opened, or a fleet where no server answered, ends this
    round; so does `stop()` (checked before each entry: the node is stopping). `every`: the
    open entries whether due or not (an operator asking now: `loom forget --retry-pending`)."""
    clock = clock or pending.clock
    done = []
    for entry in pending.due(limit, every):
        if stop():
            break
        result = fleet(entry.subject_ref, timeout_s)
        settled, got, missing = settle(result, servers, entry.servers)
        if settled:
            if audit is not None:
                audit.append('erasure', 'fleet_erasure_retried', int(clock()),
                             subject_ref=entry.subject_ref, requested_by=entry.requested_by,
                             erasure_audit_id=entry.erasure_audit_id,
                             attempts=entry.attempts + 1, queued_ms=entry.created_ms,
                             fleet_status='done', fleet_request_id=result.request_id,
                             fleet_servers=sorted(got)[:AUDITED_RECEIPTS],
                             fleet_receipts=[{'server': r['receipt'].get('server', ''),
                                              'cloud': r['signer'],
                                              'counts': r['receipt'].get('counts', {}),
                                              'scrubbed': r['receipt'].get('scrubbed', False),
                                              'sig': r['sig']}
                                             for r in result.receipts][:AUDITED_RECEIPTS],
                             fleet_rejected=dict(result.rejected))
            pending.done(entry.id, result.request_id)
            done.append(Retried(entry.id, entry.subject_ref, 'done',
                                receipts=list(result.receipts),
                                rejected=dict(result.rejected)))
            continue
        status = 'partial' if result.status == 'done' else result.status
        error = '; '.join(filter(None, [result.error, f'no receipt from {", ".join(missing)}'
                                        if missing else '']))[:1000]
        due = pending.failed(entry.id, status, error, got)
        done.append(Retried(entry.id, entry.subject_ref, status, error, due,
                            receipts=list(result.receipts), rejected=dict(result.rejected)))
        if (result.status == 'failed' and result.error.startswith(LINK_DOWN)) or \
                (result.status in UNANSWERED and not result.receipts):
            break
    return done
