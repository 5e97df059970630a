"""The robot's side of the cloud tier: `CloudClient` (Zenoh get with correlation ids, retries
within the latency budget, cost recorded) and `execute_route`, which runs what the router decided.

The router decides routes; callers execute them. `execute_route(decision, request, local_fn,
cloud_client)` runs Local / LocalFallback locally, Cloud in the cloud (falling back to local when
the cloud fails or runs out of budget), Hybrid as a local answer refined by the cloud, and returns
the answer with an Outcome for the router's `router/outcomes` topic. Only what privacy allows is
sent: Private and LocalOnly never; Sensitive only as an embedding computed here, sealed to the
cloud identity's certificate (security/sealed.py) so that only the cloud can read it, even
through a shared router.

Every request is signed with the robot's identity; a reply counts only if it is signed by a
`cloud` identity of the fleet's authority over this very request (id and digest), whose
certificate the keys folder's revocation list (revoked.json next to ca.pem, read again every
keys.REVOCATION_CHECK_S of the injected clock) does not name. Anything else (a fake queryable
echoing the id, a robot's key, a stale or altered reply, a stolen cloud key the operator revoked)
is counted as `forged_reply` and the client keeps waiting for a genuine one. The certificate
Sensitive bodies are sealed to is checked the same way before each seal.

Load spread and failover over several servers behind the same identity: each server also answers
alone on `loom/cloud/<instance>/infer/<task>`, and the client learns the instances from the
signed answers to a `hello` asked of ALL servers (every DISCOVER_PERIOD_S, in the background), so
only the cloud identity can add one and no access rule beyond loom/cloud/** is needed. The first
attempt goes round-robin to one known instance with half the budget left; a retry (a server
killed mid-request, busy, forged, timeout), and a first attempt before any instance is known,
asks ALL servers on the shared key and takes the first authentic answer (failover). An instance
that did not answer is dropped until it answers a later hello. No rclpy (outcome_msg imports
loom_msgs lazily).

Replay across servers: a request to one instance is signed for it (protocol `aud`), so another
server refuses it; a request to the shared key is signed for any server but asked of ALL, so
every server has its id by the time anyone could replay it (only a server that joined later
could be made to answer it once more).
"""
from __future__ import annotations

import base64
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loom_ros.bus.event import Privacy
from loom_ros.cloud.protocol import (
    ANY_SERVER, KEY_PREFIX, MAX_MESSAGE_BYTES, RETRYABLE, ReplyInvalid, Signer, Verifier,
    check_instance, digest, encode, instance_key, parse_reply, reply_signed_bytes, sealed_aad,
    task_key, unpack,
)
from loom_ros.security import keys, sealed
from loom_ros.security.keys import CredentialsError
from loom_ros.router.decision import Route
from loom_ros.router.history import Outcome

MIN_ATTEMPT_MS = 5.0   # below this much budget left, another attempt cannot succeed
FIRST_ATTEMPT_SHARE = 0.5   # of the budget, for the one server picked first (failover room)
HELLO_BUDGET_MS = 1000.0    # to learn the cloud's certificate before sealing to it
DISCOVER_PERIOD_S = 2.0     # how often the servers are asked who answers (a hello to ALL)
MAX_INSTANCES = 64          # server instances remembered; more are refused and counted


class UploadRefused(RuntimeError):
    """What a request would send is not allowed off the robot by its privacy tier."""


@dataclass
class CloudResult:
    ok: bool
    result: dict = field(default_factory=dict)
    error: str = ''
    code: str = ''          # timeout | no_server | unknown_task | bad_request | ... on failure
    latency_ms: float = 0.0
    cost: float = 0.0
    attempts: int = 0
    model: str = ''
    server: str = ''        # which cloud server instance answered
    server_ms: float = 0.0  # the model's time in the server, and the wait before it (queue)
    queue_ms: float = 0.0


class CloudClient:
    """Signed requests to the cloud tier over a zenoh.Session (the caller owns the session),
    accepting only the cloud identity's signed answers."""

    def __init__(self, session, identity: keys.Identity, *, prefix: str = KEY_PREFIX,
                 embedder=None, retries: int = 2, cloud_cert: bytes | None = None,
                 clock=time.time, ask_all: bool = False):
        self.session = session
        self.prefix = prefix
        self.embedder = embedder  # for Sensitive requests: embed here, send the vector (sealed)
        self.retries = retries
        self.clock = clock
        self.signer = Signer(identity)
        self.ca_pem = identity.ca.read_bytes()
        # revoked.json beside ca.pem is honoured: a revoked cloud key's replies are forgeries
        self.verifier = Verifier(self.ca_pem, ('cloud',), clock=clock,
                                 keys_dir=identity.ca.parent)
        self.cloud_cert = cloud_cert  # to seal to; else learned from the first verified answer
        self._cloud_cert_refusal = ''  # why the last one held was dropped (for UploadRefused)
        self.ask_all = ask_all        # every attempt to ALL servers (first authentic answer wins)
        self.stats: Counter = Counter()
        self._live: dict[str, float] = {}      # instance -> when the hello it answered was sent
        self._dropped: dict[str, float] = {}   # instance -> when it last failed to answer
        self._turn = 0
        self._discovered_at = -math.inf
        self._lock = threading.Lock()
        self.spent = 0.0
        self.ledger: list[dict] = []  # per answered request: task, cost, latency (bounded)

    @classmethod
    def from_keys(cls, session, keys_dir, name: str, **kwargs) -> 'CloudClient':
        """A client signing as identity `name` from `keys_dir` (the cloud's certificate, when
        that folder holds one, is what Sensitive bodies are sealed to)."""
        identity = keys.load(keys_dir, name)
        cloud = keys.keys_path(keys_dir) / kwargs.pop('cloud_name', 'cloud') / 'cert.pem'
        if 'cloud_cert' not in kwargs and Path(cloud).is_file():
            kwargs['cloud_cert'] = Path(cloud).read_bytes()
        return cls(session, identity, **kwargs)

    def infer(self, task: str, body: dict, budget_ms: float = 1000.0) -> CloudResult:
        """One request, retried on timeouts, transient errors and forged answers while the
        budget lasts."""
        start = time.perf_counter()
        deadline = start + (budget_ms / 1000.0 if math.isfinite(budget_ms) else 30.0)
        self._discover_if_due()
        result = CloudResult(False, code='budget', error=f'budget of {budget_ms:g} ms too small')
        attempts = 0
        while attempts <= self.retries:
            remaining_ms = (deadline - time.perf_counter()) * 1000.0
            if remaining_ms < MIN_ATTEMPT_MS:
                break
            attempts += 1
            first = attempts == 1 and self.retries > 0 and not self.ask_all
            instance = self._pick() if first else None
            result = self._attempt(task, body, remaining_ms * FIRST_ATTEMPT_SHARE if first
                                   else remaining_ms, instance=instance)
            if instance is not None and result.code in ('no_server', 'timeout'):
                self._drop(instance)
            if result.ok or result.code not in RETRYABLE | {'timeout', 'no_server', 'forged'}:
                break
            self.stats[f'retry_{result.code}'] += 1
            if result.code == 'no_server' and attempts > 1:  # none twice: wait a little
                time.sleep(min(0.05, max(0.0, deadline - time.perf_counter()) / 4))
        result.attempts = attempts
        result.latency_ms = (time.perf_counter() - start) * 1000.0
        self.stats['ok' if result.ok else f'failed_{result.code}'] += 1
        if result.ok and task != 'hello':
            self.spent += result.cost
            self.ledger.append({'task': task, 'cost': result.cost,
                                'latency_ms': round(result.latency_ms, 3)})
            del self.ledger[:-1000]
        return result

    def instances(self) -> list[str]:
        """The server instances this client spreads its first attempts over."""
        with self._lock:
            return sorted(self._live)

    def discover(self, timeout_ms: float = HELLO_BUDGET_MS, block: bool = False) -> list[str]:
        """Ask ALL servers who they are (a signed hello); each authentic answer names an instance.
        In the background unless `block` (then it returns once every server answered)."""
        import zenoh
        sent_at = self.clock()
        with self._lock:
            self._discovered_at = sent_at
        corr = uuid.uuid4().hex
        payload = self.signer.request('hello', {}, corr, int(sent_at * 1000))
        request_digest = digest(payload)

        def on_reply(reply):
            answer = self._check(reply, corr, request_digest)
            if answer is not None and answer[0]:
                self._seen(answer[1].get('server'), sent_at)
        options = dict(payload=payload, target=zenoh.QueryTarget.ALL, timeout=timeout_ms / 1000.0,
                       consolidation=zenoh.ConsolidationMode.NONE)
        try:
            if block:
                for reply in self.session.get(task_key('hello', self.prefix), **options):
                    on_reply(reply)
            else:
                self.session.get(task_key('hello', self.prefix), on_reply, **options)
        except Exception:   # a closed session: the next request says so
            self.stats['discover_failed'] += 1
        return self.instances()

    def _discover_if_due(self) -> None:
        if self.retries > 0 and not self.ask_all and \
                self.clock() - self._discovered_at >= DISCOVER_PERIOD_S:
            self.discover()

    def _seen(self, name, sent_at: float) -> None:
        """An instance named in an authentic hello answer: remembered, bounded."""
        try:
            name = check_instance(name)
        except ValueError:
            self.stats['instance_refused'] += 1
            return
        with self._lock:
            if self._dropped.get(name, -math.inf) >= sent_at:
                return   # it answered a hello sent before it failed: still presumed dead
            if name not in self._live and len(self._live) >= MAX_INSTANCES:
                self.stats['instance_refused'] += 1
                return
            self._live[name] = sent_at

    def _drop(self, name: str) -> None:
        with self._lock:
            if self._live.pop(name, None) is not None:
                self.stats['instance_dropped'] += 1
            self._dropped[name] = self.clock()
            while len(self._dropped) > MAX_INSTANCES:
                self._dropped.pop(next(iter(self._dropped)))

    def _pick(self) -> str | None:
        """The next known instance, round-robin; None before any is known."""
        with self._lock:
            if not self._live:
                return None
            names = sorted(self._live)
            self._turn += 1
            return names[self._turn % len(names)]

    def _attempt(self, task: str, body: dict, timeout_ms: float,
                 instance: str | None = None) -> CloudResult:
        """One get: to one server (`instance`) or to all on the shared key (never to one server
        picked by Zenoh: a request signed for any server must reach them all at once, or it
        could be replayed to the others), taking the first authentic answer; forged, unreadable
        and foreign replies are counted and skipped."""
        import zenoh
        corr = uuid.uuid4().hex
        # Signed for the one instance asked (no other server accepts it), else for any.
        payload = self.signer.request(task, body, corr, int(self.clock() * 1000),
                                      ANY_SERVER if instance is None else instance)
        if len(payload) > MAX_MESSAGE_BYTES:
            return CloudResult(False, code='too_large', error=f'request of {len(payload)} bytes '
                               f'exceeds the limit of {MAX_MESSAGE_BYTES}')
        request_digest = digest(payload)
        sent = time.perf_counter()
        held: CloudResult | None = None   # an authentic transient error, while others may answer
        forged_before = self.stats['forged_reply']
        try:
            key = task_key(task, self.prefix) if instance is None else \
                instance_key(instance, task, self.prefix)
            replies = self.session.get(
                key, payload=payload, timeout=timeout_ms / 1000.0,
                target=zenoh.QueryTarget.ALL if instance is None
                else zenoh.QueryTarget.BEST_MATCHING,
                consolidation=zenoh.ConsolidationMode.NONE)   # never merge a forgery with us
            for reply in replies:
                answer = self._check(reply, corr, request_digest)
                if answer is None:
                    continue
                ok, data = answer
                if ok:
                    return CloudResult(True, data.get('result', {}),
                                       cost=float(data.get('cost', 0)),
                                       model=str(data.get('model', '')),
                                       server=str(data.get('server', ''))[:200],
                                       server_ms=_ms(data.get('server_ms')),
                                       queue_ms=_ms(data.get('queue_ms')))
                failed = CloudResult(False, code=str(data.get('code', 'error')),
                                     error=str(data.get('error', 'error reply')),
                                     server=str(data.get('server', ''))[:200])
                if failed.code not in RETRYABLE:
                    return failed
                held = held or failed
        except Exception as exc:  # session closed, bad key: a failure, not a crash
            return CloudResult(False, code='internal', error=f'{type(exc).__name__}: {exc}')
        if held is not None:
            return held
        waited_ms = (time.perf_counter() - sent) * 1000.0
        if waited_ms + 1.0 >= timeout_ms:
            return CloudResult(False, code='timeout',
                               error=f'no authentic reply within {timeout_ms:.0f} ms')
        if self.stats['forged_reply'] > forged_before:   # only forgeries came: ask everyone
            return CloudResult(False, code='forged', error='only unauthenticated replies came')
        return CloudResult(False, code='no_server', error=f'no cloud server answers {task}')

    def _check(self, reply, corr: str, request_digest: bytes):
        """(ok, reply dict) for an authentic answer to this request; None (counted) otherwise.
        The signature is checked before the body is parsed."""
        ok = reply.ok
        try:
            raw = (ok if ok is not None else reply.err).payload.to_bytes()
            header, body = unpack(raw)
        except (ValueError, AttributeError):
            self.stats['forged_reply'] += 1   # unsigned: not from the cloud tier
            return None
        if header['id'] != corr:
            self.stats['mismatched_reply'] += 1   # not ours (a late answer): ignore it
            return None
        try:
            self.verifier.verify(header, reply_signed_bytes(corr, request_digest, body))
        except CredentialsError:
            self.stats['forged_reply'] += 1
            return None
        try:
            data = parse_reply(body)
        except ReplyInvalid:
            self.stats['invalid_reply'] += 1
            return None
        if data.get('id') != corr:
            self.stats['invalid_reply'] += 1
            return None
        # Whether it succeeded is what the signed body says: Zenoh's ok/err status is not
        # signed, and a router that flips it (a refusal shown as an answer, an answer as a
        # refusal) is forging.
        if data.get('ok') is not (ok is not None):
            self.stats['forged_reply'] += 1
            return None
        self.cloud_cert = header['cert'].encode()   # a verified cloud certificate
        return data['ok'], data

    def body_for(self, task: str, text: str, privacy, upload: str) -> dict:
        """What may be sent for `text` at this privacy tier and upload mode (UploadRefused if nothing)."""
        privacy = Privacy(privacy)
        if privacy in (Privacy.PRIVATE, Privacy.LOCAL_ONLY) or upload == 'none':
            raise UploadRefused(f'{privacy.name} data never leaves the robot')
        if privacy is Privacy.SENSITIVE or upload == 'embedding':
            if task != 'intent':
                raise UploadRefused(f'Sensitive data goes up only as an embedding; task {task!r} '
                                    'needs the raw text')
            if self.embedder is None:
                raise UploadRefused('Sensitive data goes up only as an embedding, and this client '
                                    'has no local embedder')
            inner = {'embedding': [float(x) for x in self.embedder.embed([text])[0]]}
            if privacy is not Privacy.SENSITIVE:
                return inner
            return {'sealed': self._seal(task, inner)}
        return {'text': text}

    def _seal(self, task: str, inner: dict) -> str:
        """`inner` sealed to the cloud identity, base64. Its certificate is checked as a reply's
        is, at every seal (the fleet CA, role cloud, valid, not revoked): one given or learned
        that was revoked since is dropped (`cloud_cert_refused`) and a current one learned from
        a verified answer, or nothing is sent."""
        cert = self._trusted_cloud_cert()
        if cert is None:
            self.infer('hello', {}, HELLO_BUDGET_MS)   # learns it from a verified answer
            cert = self._trusted_cloud_cert()
        if cert is None:
            raise UploadRefused('Sensitive data goes up only sealed to the cloud, and no '
                                'verified cloud certificate is known' +
                                (f' ({self._cloud_cert_refusal})' if self._cloud_cert_refusal
                                 else ''))
        try:
            blob = sealed.seal(cert, encode(inner), sealed_aad(task, self.signer.name),
                               ca_pem=self.ca_pem)
        except CredentialsError as exc:
            raise UploadRefused(f'cannot seal to the cloud certificate: {exc}') from None
        self.stats['sealed'] += 1
        return base64.b64encode(blob).decode()

    def _trusted_cloud_cert(self) -> bytes | None:
        """The cloud certificate held, if the fleet still trusts it; else None (it is dropped,
        counted, and why is kept for the refusal's message)."""
        cert = self.cloud_cert
        if cert is None:
            return None
        try:
            self.verifier.identify_certificate(cert)
            return cert
        except CredentialsError as exc:
            self.stats['cloud_cert_refused'] += 1
            self._cloud_cert_refusal = str(exc)[:200]
            if self.cloud_cert is cert:   # a reply on Zenoh's thread may have set another
                self.cloud_cert = None
            return None


def _ms(value) -> float:
    """A timing the server reports, for benchmarks: a finite number or 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    try:
        value = float(value)
    except OverflowError:   # an int beyond float's range
        return 0.0
    return value if math.isfinite(value) else 0.0


@dataclass(frozen=True)
class InferenceRequest:
    task: str                         # embed | intent | chat
    text: str
    privacy: Privacy = Privacy.PUBLIC
    latency_budget_ms: float = 1000.0
    event_type: str = ''
    decision_id: str = ''
    # The data subject's keyed hash (storage.consent.SubjectRefs.ref), never the raw id: the
    # cloud files what it keeps of this request under it, so a fleet erasure can find it.
    subject_ref: str = ''


@dataclass
class RouteResult:
    route: str                        # what the router decided
    backend: str                      # what answered: local | cloud
    answer: dict
    confidence: float
    latency_ms: float
    cost: float
    fallback: bool = False            # the cloud was tried (or refused) and local answered
    cloud_error: str = ''
    outcome: Outcome | None = None


LocalFn = Callable[[InferenceRequest], tuple[dict, float]]  # -> (answer, confidence)


def execute_route(decision, request: InferenceRequest, local_fn: LocalFn,
                  cloud_client: CloudClient | None,
                  report: Callable[[Outcome], None] | None = None) -> RouteResult:
    """Run a router decision (a router Decision or a Route.srv response) for one request."""
    start = time.perf_counter()
    route = Route(getattr(decision.route, 'value', decision.route))
    upload = getattr(decision, 'upload', 'raw')
    decision_id = getattr(decision, 'decision_id', '') or request.decision_id

    def local(fallback=False, error='', cost=0.0, answer=None, conf=None):
        if answer is None:
            answer, conf = local_fn(request)
        return _finish(route, 'local', answer, conf, cost, fallback, error)

    def _finish(route, backend, answer, conf, cost, fallback, error):
        latency = (time.perf_counter() - start) * 1000.0
        outcome = Outcome(decision_id, request.event_type or request.task, backend, latency, cost,
                          True, float(conf))
        result = RouteResult(route.value, backend, answer, float(conf), latency, cost, fallback,
                             error, outcome)
        if report is not None:
            report(outcome)
        return result

    if route in (Route.LOCAL, Route.LOCAL_FALLBACK):
        return local(fallback=route is Route.LOCAL_FALLBACK)
    local_answer = local_conf = None
    if route is Route.HYBRID:  # answer locally now; the cloud refines within what is left
        local_answer, local_conf = local_fn(request)
    if cloud_client is None:
        return local(True, 'no cloud client', answer=local_answer, conf=local_conf)
    try:
        body = cloud_client.body_for(request.task, request.text, request.privacy, upload)
    except UploadRefused as exc:
        cloud_client.stats['upload_refused'] += 1
        return local(True, str(exc), answer=local_answer, conf=local_conf)
    if request.subject_ref:
        body['subject_ref'] = request.subject_ref
    spent_ms = (time.perf_counter() - start) * 1000.0
    cloud = cloud_client.infer(request.task, body, request.latency_budget_ms - spent_ms)
    if not cloud.ok:
        return local(True, f'{cloud.code}: {cloud.error}', cost=cloud.cost,
                     answer=local_answer, conf=local_conf)
    conf = float(cloud.result.get('confidence', 1.0))
    return _finish(route, 'cloud', cloud.result, conf, cloud.cost, False, '')


def outcome_msg(outcome: Outcome):
    """The loom_msgs/RouteOutcome for router/outcomes."""
    from loom_msgs.msg import RouteOutcome
    return RouteOutcome(decision_id=outcome.decision_id, event_type=outcome.event_type,
                        backend=outcome.backend, latency_ms=float(outcome.latency_ms),
                        cost=float(outcome.cost), success=bool(outcome.success),
                        confidence=float(outcome.confidence),
                        has_local_verdict=outcome.local_good_enough is not None,
                        local_good_enough=bool(outcome.local_good_enough),
                        names_subject=bool(outcome.names_subject))

