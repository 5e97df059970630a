"""The bridge's logic without ROS or Zenoh: what goes out, what waits, what comes in, all counted.

`Bridge.send` takes an event from the robot's bus and either puts it on Zenoh, queues it in the
bounded outbox (Batched and Background while the key cannot be delivered), or refuses it with a
counted reason (denied by pattern, refused by the privacy gate and audited, Realtime while
disconnected). A Sensitive event the gate lets out is sealed to the cloud identity when a
cloud key is given (only the cloud tier can read it, even through a shared router).
`Bridge.receive` turns a Zenoh sample for this robot into a bus event only as the inbound
contract says (bridge/inbound.py: declared rules, rates, signed and granted senders for actuator
topics, no replays), every refusal counted and every actuator command audited with its sender.
The transport is anything with `connected`, `ready(key)` and `put(key, data, level)`.

With `batch_max_events` > 1, Batched and Background events that can go now wait in a per-key
batch until it is full (events or BATCH_MAX_BYTES) or `flush_batches` is called (the node does
every few ms), then leave as one Zenoh sample (codec's version-2 envelope): per-event puts,
router hops and receiver callbacks cost most of the bridge's time. Every gate decision, refusal
and counter is still per event; a sealed or large event goes alone, after its key's batch, so
order per key holds. Realtime events are never held.

`Bridge.forget(subject)` drops a data subject's events still waiting (in batches and the outbox)
when the subject is erased (issue 17); each waiting sample remembers its event's `loom.subject`.
"""
from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from loom_ros.bridge import codec
from loom_ros.bridge.gate import BridgeRules, DirectionRules, PrivacyGate
from loom_ros.bridge.inbound import (
    ContractError, InboundContract, ReplayGuard, TokenBucket, is_signed, read_signed, ruled_event,
)
from loom_ros.bridge.keys import parse_robot_key, robot_key, validate_robot_id
from loom_ros.bridge.outbox import Outbox, Pending
from loom_ros.bus.event import DEFAULT_MAX_PAYLOAD_BYTES, Event, EventRejected, Privacy
from loom_ros.bus.names import TopicNameError
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, effective_privacy
from loom_ros.bus.qos import QosLevel
from loom_ros.security import keys, sealed
from loom_ros.security.keys import CredentialsError

ECHO_MEMORY = 10000  # ids of events the bridge brought in, so it never sends them back out
# Refusals anyone can cause (unsigned, unreadable envelopes, bad certificates or signatures, over
# a rate) are audited at most once per reason per this many seconds, with how many were not: a
# flood cannot flood the audit log (the counters count each). The others are each audited.
AUDIT_THROTTLE_S = 1.0
# Signature checks a granted sender's valid samples may cost, as a multiple of its rule's rate
# and burst (its own bucket, spent only by signatures that hold)
VERIFY_FACTOR = 10
MAX_VERIFY_SENDERS = 1024   # (rule, sender) verify buckets kept, least recently used dropped
# Signature checks that fail (forgeries), all senders together, per second (burst twice that);
# past it, each claimed sender's own FAILED_VERIFY_PER_SENDER_S (burst 2). See Bridge.receive.
FAILED_VERIFIES_PER_S = 200.0
FAILED_VERIFY_PER_SENDER_S = 1.0
# A batch leaves when it holds this many bytes of samples; a larger event goes alone.
BATCH_MAX_BYTES = 60000
# Topics whose route (allowed, key, level) is remembered; past it the memory starts over.
ROUTE_MEMORY = 4096


class Transport(Protocol):
    connected: bool

    def ready(self, key: str, level: QosLevel) -> bool: ...  # connected, and someone listens

    def put(self, key: str, data: bytes, level: QosLevel) -> None: ...


@dataclass(frozen=True)
class BridgeConfig:
    robot_id: str
    rules: BridgeRules
    buffer_max_events: int = 10000
    buffer_max_bytes: int = 64 * 1024 * 1024
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    inbound: InboundContract = field(default_factory=InboundContract)

    @classmethod
    def from_params(cls, params: dict, inbound: object = None) -> 'BridgeConfig':
        """From the node's parameters and the inbound file's YAML; ValueError (with the key)
        on anything unusable."""
        try:
            robot_id = validate_robot_id(params['robot_id'])
            rules = BridgeRules(out=DirectionRules.parse(params['out_allow'], params['out_deny']))
            contract = InboundContract.parse(inbound)
        except (ValueError, TopicNameError, ContractError) as exc:
            raise ValueError(f'zenoh_bridge: {exc}') from None
        bound = int(params['buffer_max_events'])
        if bound < 1:
            raise ValueError(f'zenoh_bridge: buffer_max_events must be >= 1, got {bound}')
        max_bytes = int(params.get('buffer_max_bytes', cls.buffer_max_bytes))
        if max_bytes < 1:
            raise ValueError(f'zenoh_bridge: buffer_max_bytes must be >= 1, got {max_bytes}')
        return cls(robot_id, rules, bound, max_bytes,
                   int(params.get('max_payload_bytes', DEFAULT_MAX_PAYLOAD_BYTES)), contract)


def open_sealed(identity, key: str, data: bytes,
                max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Event:
    """The event in a sealed sample (what the cloud tier does with one): CredentialsError when
    it is not for `identity` or altered, EventRejected when what is inside is not an event."""
    return codec.decode(sealed.unseal(identity, data, key.encode()), max_payload_bytes)


class Bridge:
    def __init__(self, config: BridgeConfig, transport: Transport,
                 level_for: Callable[[str], QosLevel], gate: PrivacyGate | None = None,
                 audit: Callable[[dict], None] | None = None, *,
                 command_audit: Callable[[dict], None] | None = None,
                 ca_pem: bytes | None = None,
                 keys_dir: str | None = None,
                 seal_to: ec.EllipticCurvePublicKey | None = None,
                 seal_required: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 batch_max_events: int = 1):
        """`audit` gets privacy refusals; `command_audit` every inbound actuator command and
        refusal (it raises when it cannot store one: the command is then refused). `ca_pem`
        checks signed senders (none: granted rules refuse everything); the certificates in
        `keys_dir` are known from the start (keys.KnownCertificates.preload: members never wait
        for the budget for new ones); `seal_to` is the cloud
        identity's public key that Sensitive payloads are sealed to (none: not sealed; with
        `seal_required` they are then refused, counted and audited: they never leave in clear).
        `batch_max_events` > 1 sends Batched/Background events in batches (see above)."""
        self.config = config
        self.transport = transport
        self.level_for = level_for
        self.gate = gate or PrivacyGate()
        self.audit = audit or (lambda record: None)
        self.command_audit = command_audit or (lambda record: None)
        self.ca_pem = ca_pem
        self.seal_to = seal_to
        self.seal_required = bool(seal_required)
        self.clock = clock
        self.outbox = Outbox(config.buffer_max_events, config.buffer_max_bytes)
        self.stats: Counter = Counter()
        self._echo: OrderedDict[str, None] = OrderedDict()
        contract = config.inbound
        self._buckets = {id(r): TokenBucket(r.rate, r.burst, clock) for r in contract.rules}
        # (rule, claimed sender) -> signature checks its valid samples may cost; bounded
        self._verify_buckets: OrderedDict[tuple, TokenBucket] = OrderedDict()
        # what failed signature checks may cost: all senders together, then each claimed one's
        self._failed_verifies = TokenBucket(FAILED_VERIFIES_PER_S, 2 * FAILED_VERIFIES_PER_S,
                                            clock)
        self._failed_per_sender: OrderedDict[str, TokenBucket] = OrderedDict()
        # the fleet's certificates, checked against the CA once (keys.KnownCertificates); the
        # keys folder's members known from the start, outside the new-certificate budget
        self._certs = None if ca_pem is None else keys.KnownCertificates(ca_pem)
        if self._certs is not None and keys_dir is not None:
            self.stats['members_known'] = self._certs.preload(keys_dir)
        self._replay = ReplayGuard(contract.replay_window_s, wall_ms)
        self._audited_at: dict[str, float] = {}
        self._suppressed: Counter = Counter()
        self.batch_max_events = max(1, int(batch_max_events))
        # key -> [level, samples waiting, their bytes]: mutated in place, one lookup per event
        self._batches: dict[str, list] = {}
        # topic -> (allowed out, Zenoh key, level): patterns, key and level depend only on the
        # topic and the (frozen) config, and matching them per event cost a third of send().
        self._routes: dict[str, tuple[bool, str, QosLevel]] = {}

    def route(self, topic: str) -> tuple[bool, str, QosLevel]:
        """Whether `topic` may go out by the patterns, its Zenoh key and its level (remembered)."""
        route = self._routes.get(topic)
        if route is None:
            if len(self._routes) >= ROUTE_MEMORY:
                self._routes.clear()
            allowed = self.config.rules.out.allows(topic)
            route = (allowed, robot_key(self.config.robot_id, topic) if allowed else '',
                     self.level_for(topic))
            self._routes[topic] = route
        return route

    # -- out: bus -> Zenoh ----------------------------------------------------------------
    def send(self, event: Event, topic: str) -> str:
        """Bridge one bus event out; returns what happened (also counted in `stats`). Runs per
        event: lookups are inlined where they repeat (route, outbox, batch)."""
        if event.id in self._echo:
            return self._count('echo_skipped')  # it came from Zenoh: do not send it back
        allowed, key, level = self._routes.get(topic) or self.route(topic)
        if not allowed:
            return self._count('denied')
        refusal = self.gate.refusal(event)
        if refusal is not None:
            self.audit({'kind': 'privacy_refused', 'reason': refusal, 'topic': topic,
                        'event_id': event.id, 'event_type': event.type,
                        'privacy': getattr(event.privacy, 'name', str(event.privacy)[:16]),
                        'effective_privacy': effective_privacy(event).name})
            return self._count(f'refused_{refusal}')
        alone = False
        if effective_privacy(event) is Privacy.SENSITIVE:
            if self.seal_to is None:
                if self.seal_required:   # no cloud key to seal to: it stays on the robot
                    self.audit({'kind': 'privacy_refused', 'reason': 'unsealed', 'topic': topic,
                                'event_id': event.id, 'event_type': event.type,
                                'privacy': getattr(event.privacy, 'name',
                                                   str(event.privacy)[:16]),
                                'effective_privacy': Privacy.SENSITIVE.name})
                    return self._count('refused_unsealed')
                data = codec.encode(event)
            else:
                data = sealed.seal_to(self.seal_to, codec.encode(event), key.encode())
                self.stats['sealed'] += 1   # the key is bound in
                alone = True   # sealed to its own key: never inside a batch
        else:
            data = codec.encode(event)
        if level is QosLevel.REALTIME:
            # A late realtime sample is worth nothing: never queued, but a drop is counted.
            if not self.transport.connected:
                return self._count('dropped_disconnected')
            return self._put(key, data, level)
        metadata = event.metadata
        subject = metadata.get(SUBJECT_METADATA_KEY, '') if type(metadata) is dict else ''
        if key in self.outbox.per_key or not self.transport.ready(key, level):
            self._spill(key)   # what waits in its batch goes first
            self._count_outbox_drops(self.outbox.add(Pending(key, data, level, subject)))
            return self._count('buffered')
        if self.batch_max_events == 1:
            return self._put(key, data, level, subject)
        if alone or len(data) > BATCH_MAX_BYTES // 2:
            self._flush_batch(key)
            return self._put(key, data, level, subject)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = [level, [], 0, []]
        samples = batch[1]
        samples.append(data)
        batch[3].append(subject)
        batch[2] += len(data)
        if len(samples) >= self.batch_max_events or batch[2] >= BATCH_MAX_BYTES:
            self._flush_batch(key)
        return 'batched'   # counted as sent (or buffered) when its batch leaves

    def has_batches(self) -> bool:
        """Whether a batch waits (safe to ask without the caller's lock: a hint)."""
        return bool(self._batches)

    def flush_batches(self) -> int:
        """Send every waiting batch now; returns how many events went (the rest are buffered
        in the outbox, as a single event would be)."""
        return sum([self._flush_batch(key) for key in list(self._batches)])

    def _flush_batch(self, key: str) -> int:
        got = self._batches.pop(key, None)
        if got is None:
            return 0
        level, samples, _, subjects = got
        if not self.transport.ready(key, level):
            self._batches[key] = got
            self._spill(key)
            return 0
        if any(subjects):   # consent withdrawn while it waited: what is theirs stays home
            self._batches[key] = got
            self._drop_withdrawn(subjects)
            got = self._batches.pop(key, None)
            if got is None:
                return 0
            level, samples, _, subjects = got
        data = samples[0] if len(samples) == 1 else codec.encode_batch(samples)
        try:
            self.transport.put(key, data, level)
        except Exception:
            self._batches[key] = got
            self._spill(key)
            return 0
        self.stats['sent'] += len(samples)
        self.stats['batches_sent'] += 1
        return len(samples)

    def _count_outbox_drops(self, dropped: int) -> None:
        if dropped:
            self.stats['dropped_outbox_full'] += dropped

    def _spill(self, key: str) -> None:
        """A key's waiting batch into the outbox, event by event, ahead of what comes next."""
        got = self._batches.pop(key, None)
        if got is None:
            return
        level, samples, _, subjects = got
        for data, subject in zip(samples, subjects):
            self._count_outbox_drops(self.outbox.add(Pending(key, data, level, subject)))
            self._count('buffered')

    def _drop_withdrawn(self, subjects, already: int = 0) -> None:
        """Drop everything waiting of those of `subjects` whose fleet consent no longer holds
        (asked once each; `already`: events of theirs the caller took off already): a batch or
        the outbox holds events let out by a consent that may since have been withdrawn.
        Counted and audited (by how many, never by whom)."""
        for subject in {s for s in subjects if s}:
            if already or self.gate.refusal_of_subject(subject) is not None:
                self.stats['dropped_consent_withdrawn'] += already
                gone = already + self.forget(subject, counted='dropped_consent_withdrawn')
                self.audit({'kind': 'privacy_refused', 'reason': 'consent_withdrawn_while_waiting',
                            'subject_events': gone})

    def forget(self, subject: str, counted: str = 'forgotten') -> int:
        """Drop every event of `subject` still waiting here (batches and outbox); returns how
        many (counted as `counted`). The caller checks the subject id."""
        gone = 0
        for key in list(self._batches):
            level, samples, _, subjects = self._batches[key]
            keep = [i for i, s in enumerate(subjects) if s != subject]
            if len(keep) == len(samples):
                continue
            gone += len(samples) - len(keep)
            if keep:
                kept = [samples[i] for i in keep]
                self._batches[key] = [level, kept, sum(map(len, kept)),
                                      [subjects[i] for i in keep]]
            else:
                del self._batches[key]
        gone += self.outbox.purge(subject)
        self.stats[counted] += gone
        return gone

    def flush(self, limit: int | None = None) -> int:
        """Send what waits in the outbox and can go now (in order per key), at most `limit`."""
        if not self.outbox.items:
            return 0
        allowed: dict[str, bool] = {}   # fleet consent, asked once per subject per flush
        withdrawn = Counter()
        put = [0]

        def send(item: Pending) -> None:
            subject = item.subject
            if subject:   # let out by a consent that may have been withdrawn while it waited
                if subject not in allowed:
                    allowed[subject] = self.gate.refusal_of_subject(subject) is None
                if not allowed[subject]:
                    withdrawn[subject] += 1   # taken off the outbox, never put
                    return
            self.transport.put(item.key, item.data, item.level)
            put[0] += 1
        try:
            self.outbox.drain(lambda i: self.transport.ready(i.key, i.level), send, limit)
        except Exception:  # the transport went away mid-drain: the rest waits for the next try
            self._count('put_failed')
        finally:
            for subject in withdrawn:   # and what else of theirs waits
                self._drop_withdrawn([subject], already=withdrawn[subject])
        sent = put[0]
        self.stats['flushed'] += sent
        self.stats['sent'] += sent
        return sent

    def _put(self, key: str, data: bytes, level: QosLevel, subject: str = '') -> str:
        try:
            self.transport.put(key, data, level)
        except Exception:
            if level is QosLevel.REALTIME:
                return self._count('put_failed')
            self._count_outbox_drops(self.outbox.add(Pending(key, data, level, subject)))
            return self._count('buffered')
        return self._count('sent')

    # -- in: Zenoh -> bus -----------------------------------------------------------------
    def receive(self, key: str, data: bytes) -> tuple[str, Event] | None:
        """The (topic, event) to publish on the bus for one Zenoh sample, or None (counted)."""
        try:
            robot_id, topic = parse_robot_key(key)
        except TopicNameError:
            self._count('rejected_key')
            return None
        if robot_id != self.config.robot_id:
            self._count('rejected_other_robot')
            return None
        contract = self.config.inbound
        rule = contract.rule_for(topic)
        if rule is None:
            self._count('denied_inbound')
            return None
        path, topic = topic, rule.bus_topic(topic)
        actuator = contract.is_actuator(topic)
        where = {'key': key[:300], 'topic': topic, 'rule': rule.key.text}
        if actuator and rule.grant is None:   # a wildcard rule never reaches an actuator
            return self._refuse('actuator_without_grant', where, throttled=True)
        signed = None
        if rule.grant is not None:
            if not is_signed(data):
                return self._refuse('unsigned', where, throttled=True)
            try:
                signed = read_signed(data)
            except CredentialsError:
                return self._refuse('bad_envelope', where, throttled=True)
        # A granted rule's rate is spent only by commands that pass every check below: a
        # sender without the grant, a bad signature or a replay must not use up the budget of
        # the operators who hold it. The cheap checks come first (time, a nonce already used,
        # the certificate: known ones by their digest, new ones checked at a bounded rate, and
        # its grant); then the (costly) signature check, see _check_signature.
        if signed is None and not self._buckets[id(rule)].take():
            return self._refuse('rate_limited', where, throttled=True)
        sender = {}
        if signed is not None:
            if self._certs is None:
                return self._refuse('no_credentials', where)
            try:
                claimed = self._certs.get(signed.cert_pem)
            except CredentialsError as exc:
                return self._refuse('bad_certificate', {**where, 'error': str(exc)[:200]},
                                    throttled=True)
            name, role = claimed.name, claimed.role
            sender = {'sender': name, 'sender_role': role, 'grant': rule.grant}
            verdict = self._replay.precheck(signed.ts_ms, signed.nonce)
            if verdict is not None:   # the sender as its certificate claims it
                return self._refuse(verdict, {**where, **sender, 'ts_ms': signed.ts_ms},
                                    throttled=True)
            if not contract.holds(name, role, rule.grant):   # its signature is not checked
                return self._refuse('not_granted', {**where, **sender,
                                                    'signature_checked': False}, throttled=True)
            refusal = self._check_signature(rule, name, signed, key)
            if refusal is not None:
                reason, error = refusal
                return self._refuse(reason, {**where, **sender, **error}, throttled=True)
            verdict = self._replay.check(signed.ts_ms, signed.nonce)
            if verdict is not None:
                return self._refuse(verdict, {**where, **sender, 'ts_ms': signed.ts_ms})
            if not self._buckets[id(rule)].take():
                return self._refuse('rate_limited', {**where, **sender}, throttled=True)
            data = signed.sample
        try:
            event = codec.decode(data, self.config.max_payload_bytes)
        except EventRejected:
            if actuator or signed is not None:
                return self._refuse('malformed', {**where, **sender})
            self._count('rejected_malformed')
            return None
        event = ruled_event(event, rule)
        if actuator or signed is not None:
            try:
                self.command_audit({'kind': 'inbound_command', **where, **sender,
                                    'event_id': event.id, 'event_type': event.type,
                                    'privacy': rule.privacy.name, 'path': path})
            except Exception:   # not audited, not executed (the audit log fails closed)
                return self._count_none('refused_audit_failed')
        self._echo[event.id] = None
        if len(self._echo) > ECHO_MEMORY:
            self._echo.popitem(last=False)
        self._count('received')
        return topic, event

    def _check_signature(self, rule, name: str, signed, key: str):
        """None when the sample's signature is its certificate's, else (reason, details).

        Certificates are public, so anyone can send samples under the operator's, and only the
        check tells a forgery from the operator's own: a forgery must not spend a budget of the
        real sender's. A check that holds spends the sender's own bucket (VERIFY_FACTOR x its
        rule; only the key's holder can spend it). One that fails spends the shared
        FAILED_VERIFIES_PER_S, or once that is empty the claimed sender's own
        FAILED_VERIFY_PER_SENDER_S; with both empty the sample is not checked (verify_busy).
        A check takes a token of each budget it may spend and gives back the one it did not.
        So checks are bounded (the senders' valid rates plus the failure budgets); a forged
        flood under the shared budget costs the real sender nothing, and one over it leaves
        the other senders whole while the abused one's samples are checked in proportion."""
        mine = self._verify_bucket(rule, name)
        if not mine.take():
            return 'verify_rate_limited', {}
        failure = self._failed_verifies
        if not failure.take():
            failure = self._failed_bucket(name)
            if not failure.take():
                mine.give_back()
                return 'verify_busy', {}
        self.stats['signatures_checked'] += 1
        try:
            self._certs.verify(signed.cert_pem, signed.signed_bytes(key), signed.signature)
        except CredentialsError as exc:
            mine.give_back()
            return 'bad_signature', {'error': str(exc)[:200]}
        failure.give_back()
        return None

    def _failed_bucket(self, sender: str) -> TokenBucket:
        bucket = self._failed_per_sender.pop(sender, None)
        if bucket is None:
            bucket = TokenBucket(FAILED_VERIFY_PER_SENDER_S, 2 * FAILED_VERIFY_PER_SENDER_S,
                                 self.clock)
        self._failed_per_sender[sender] = bucket
        while len(self._failed_per_sender) > MAX_VERIFY_SENDERS:
            self._failed_per_sender.popitem(last=False)
        return bucket

    def _verify_bucket(self, rule, sender: str) -> TokenBucket:
        key = (id(rule), sender)
        bucket = self._verify_buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(rule.rate * VERIFY_FACTOR, rule.burst * VERIFY_FACTOR,
                                 self.clock)
        self._verify_buckets[key] = bucket
        while len(self._verify_buckets) > MAX_VERIFY_SENDERS:
            self._verify_buckets.popitem(last=False)
        return bucket

    def _refuse(self, reason: str, where: dict, throttled: bool = False) -> None:
        """Count a refused inbound sample; audit it (throttled per reason when `throttled`)."""
        self._count(f'refused_{reason}')
        if throttled:
            now = self.clock()
            last = self._audited_at.get(reason)
            if last is not None and now - last < AUDIT_THROTTLE_S:
                self._suppressed[reason] += 1
                return None
            self._audited_at[reason] = now
        record = {'kind': 'inbound_refused', 'reason': reason, **where}
        if throttled:
            record['suppressed_before'] = self._suppressed.pop(reason, 0)
        try:
            self.command_audit(record)
        except Exception:   # the refusal stands; the failure to record it is counted
            self._count('audit_failed')
        return None

    def _count_none(self, what: str) -> None:
        self._count(what)
        return None

    def _count(self, what: str) -> str:
        self.stats[what] += 1
        return what

    def snapshot(self) -> dict:
        return {'robot_id': self.config.robot_id, 'connected': bool(self.transport.connected),
                'outbox': len(self.outbox), 'outbox_bound': self.outbox.max_events,
                'batching': sum(len(batch[1]) for batch in self._batches.values()),
                **{k: v for k, v in sorted(self.stats.items())}}
