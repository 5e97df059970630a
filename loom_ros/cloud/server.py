"""`loom_cloud`: the cloud inference tier, answering Zenoh queries on `loom/cloud/infer/<task>`.

    loom_cloud --connect tcp/<router>:7447            # config/cloud.yaml for the rest

Tasks: `embed` (MiniLM, the robot's model, in bigger batches), `intent` (a logistic-regression
intent classifier on MiniLM embeddings, trained at start from config/cloud.yaml's phrases;
accepts text or an embedding, so Sensitive events can be classified from their vectors), and
`chat` (an OpenAI-compatible endpoint whose URL and key come from the environment). Each reply
echoes the request's correlation id; errors are Zenoh error replies with a code and a reason.
Prints one JSON line `{"ready": true, ...}` once it answers, and `{"stats": {...}}` when it stops.

Holding under load and against strangers (issue 14): every request must be signed by a fleet
identity (config `auth`, keys from loom_ros.security.keys) and every reply is signed by this
server's identity over the request it answers (protocol.Signer/Verifier). Before a request is
queued, the Gate bounds its size, checks its signature, time and id (no replays) and its sender's
token bucket; a FairQueue then serves senders round-robin, each with its own bound, under a
total bound in entries and bytes. There are two, each with these bounds and its own workers: one
for the models, one for chat, whose workers wait on the upstream (a slow chat never holds a
model's work back; one sender's chats hold at most half of them). Whatever does not fit is
answered `busy` at once: memory stays bounded and one client's flood cannot starve another.
An unauthenticated request never reaches a model, and so chat (and the operator's bearer key)
is never forwarded for it. Several servers may run behind the same identity: each also answers
alone on `loom/cloud/<instance>/infer/<task>` and names itself in its signed answers, so robots
learn the instances (a hello to ALL), spread their requests round-robin over them and, if one
dies or is busy, ask all (failover).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from loom_ros.bringup.stop_signals import stop_event
from loom_ros.cloud.erasure import (
    ERASE_TASK, RequestLog, check_ref, erase_key, erase_reply, request_log_from_config,
)
from loom_ros.cloud.protocol import (
    ANY_SERVER, KEY_PREFIX, MAX_MESSAGE_BYTES, RequestInvalid, Signer, Verifier, check_instance,
    digest, instance_key, parse_request, request_signed_bytes, sealed_aad, unpack,
)
from loom_ros.security import keys, sealed
from loom_ros.security.keys import CredentialsError
from loom_ros.security.ratelimit import TokenBucket

DIM = 384
MAX_WORKERS = 64                  # threads per lane (limits.workers, limits.chat_workers)
MAX_CHAT_REPLY_BYTES = 1 << 20    # read of the chat upstream's answer, refused past this


class IntentClassifier:
    """Phrases -> MiniLM embeddings -> logistic regression; deterministic for a given phrase list."""

    def __init__(self, embedder, intents: dict[str, list[str]]):
        from sklearn.linear_model import LogisticRegression
        if not isinstance(intents, dict) or len(intents) < 2 or not all(
                isinstance(v, list) and v and all(isinstance(p, str) for p in v)
                for v in intents.values()):
            raise ValueError('cloud.yaml intents: need at least two labels, each a list of phrases')
        texts, labels = [], []
        for label, phrases in intents.items():
            texts += phrases
            labels += [label] * len(phrases)
        self.model = LogisticRegression(C=10.0, max_iter=2000, random_state=0)
        self.model.fit(embedder.embed(texts), labels)
        self.labels = [str(c) for c in self.model.classes_]

    def classify(self, vectors: np.ndarray) -> list[dict]:
        probs = self.model.predict_proba(vectors)
        out = []
        for row in probs:
            best = int(np.argmax(row))
            out.append({'intent': self.labels[best], 'confidence': round(float(row[best]), 4),
                        'scores': {l: round(float(p), 4) for l, p in zip(self.labels, row)}})
        return out


class CloudServer:
    """The tasks, without Zenoh: `answer(task, body)` returns a reply dict or raises RequestInvalid."""

    def __init__(self, config: dict, embedder=None, extra_latency_ms: float = 0.0):
        from loom_ros.agents.embedding import MiniLMEmbedder
        self.config = config
        self.embedder = embedder or MiniLMEmbedder(threads=int(config.get('threads', 1)))
        self.intents = IntentClassifier(self.embedder, config.get('intents'))
        self.max_batch = int(config.get('embed', {}).get('max_batch', 32))
        self.costs = {k: float(v) for k, v in config.get('costs', {}).items()}
        self.chat = config.get('chat', {})
        self.extra_latency_s = max(0.0, extra_latency_ms) / 1000.0

    def answer(self, task: str, body: dict) -> dict:
        handler = {'embed': self._embed, 'intent': self._intent, 'chat': self._chat,
                   'hello': self._hello}.get(task)
        if handler is None:
            raise RequestInvalid('unknown_task', f'unknown task {task!r}: expected embed, '
                                 'intent, chat or hello')
        start = time.perf_counter()
        if self.extra_latency_s:
            time.sleep(self.extra_latency_s)  # emulated WAN latency (tests and benchmarks)
        result, model = handler(body)
        return {'id': body.get('id', ''), 'ok': True, 'task': task, 'result': result,
                'model': model, 'cost': self.costs.get(task, 0.0),
                'server_ms': round((time.perf_counter() - start) * 1000.0, 3)}

    def _texts(self, body: dict) -> list[str]:
        if 'texts' in body:
            texts = body['texts']
        elif 'text' in body:
            texts = [body['text']]
        else:
            raise RequestInvalid('bad_request', "request needs 'text' or 'texts'")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise RequestInvalid('bad_request', 'texts must be a non-empty list of strings')
        if len(texts) > self.max_batch:
            raise RequestInvalid('bad_request', f'{len(texts)} texts exceed the batch limit '
                                 f'of {self.max_batch}')
        return texts

    def _vectors(self, body: dict) -> tuple[np.ndarray, str]:
        if 'embedding' in body:
            try:
                vec = np.asarray(body['embedding'], dtype=np.float32)
            except (TypeError, ValueError, OverflowError):   # OverflowError: an int like 1e400
                raise RequestInvalid('bad_request', 'embedding must be a list of numbers') from None
            if vec.shape != (DIM,) or not np.all(np.isfinite(vec)):
                raise RequestInvalid('bad_request', f'embedding must be {DIM} finite numbers, '
                                     f'got shape {vec.shape}')
            return vec[None, :], 'embedding'
        return self.embedder.embed(self._texts(body)), 'text'

    def _hello(self, body: dict):
        """A no-op a robot sends to learn (and check) the cloud's certificate before sealing."""
        return {'tasks': ['embed', 'intent', 'chat', 'hello']}, ''

    def _embed(self, body: dict):
        vectors = self.embedder.embed(self._texts(body))
        return {'embeddings': [[round(float(x), 6) for x in v] for v in vectors],
                'dim': DIM}, 'all-MiniLM-L6-v2-int8'

    def _intent(self, body: dict):
        vectors, given = self._vectors(body)
        results = self.intents.classify(vectors)
        result = results[0] if len(results) == 1 else {'results': results}
        return {**result, 'input': given}, 'minilm-logreg-intent'

    def _chat(self, body: dict):
        url = os.environ.get(self.chat.get('url_env', 'LOOM_CLOUD_CHAT_URL'), '')
        if not url:
            raise RequestInvalid('not_configured', 'chat is not configured: set '
                                 f"{self.chat.get('url_env', 'LOOM_CLOUD_CHAT_URL')} (and the key "
                                 f"in {self.chat.get('key_env', 'LOOM_CLOUD_CHAT_KEY')}) for the "
                                 'cloud server')
        messages = body.get('messages')
        if messages is None and isinstance(body.get('text'), str):
            messages = [{'role': 'user', 'content': body['text']}]
        if not isinstance(messages, list) or not messages:
            raise RequestInvalid('bad_request', "chat needs 'messages' or 'text'")
        model = os.environ.get(self.chat.get('model_env', 'LOOM_CLOUD_CHAT_MODEL'),
                               self.chat.get('default_model', ''))
        key = os.environ.get(self.chat.get('key_env', 'LOOM_CLOUD_CHAT_KEY'), '')
        request = urllib.request.Request(
            url.rstrip('/') + '/chat/completions', method='POST',
            data=json.dumps({'model': model, 'messages': messages}).encode(),
            headers={'Content-Type': 'application/json',
                     **({'Authorization': f'Bearer {key}'} if key else {})})
        try:
            with urllib.request.urlopen(request, timeout=float(self.chat.get('timeout_s', 30))) as r:
                raw = r.read(MAX_CHAT_REPLY_BYTES + 1)   # no further: its size is not ours
        except urllib.error.HTTPError as exc:
            raise RequestInvalid('upstream', f'chat endpoint answered HTTP {exc.code}') from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise RequestInvalid('upstream', f'chat endpoint failed: {exc!r}'[:300]) from None
        if len(raw) > MAX_CHAT_REPLY_BYTES:
            raise RequestInvalid('upstream', 'chat endpoint answered more than '
                                 f'{MAX_CHAT_REPLY_BYTES} bytes')
        try:
            data = json.loads(raw)
            text = data['choices'][0]['message']['content']
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RequestInvalid('upstream', f'chat endpoint failed: {exc!r}'[:300]) from None
        return {'text': text, 'usage': data.get('usage', {})}, model


class FairQueue:
    """Per-client FIFO queues, bounded per client, in total and in bytes (`put` says why an item
    does not fit instead of growing), served by deficit round robin on bytes: each turn a client
    earns `quantum` bytes of credit and is served when its oldest request fits its credit. A
    request's bytes stand for its cost (texts to embed, and so model time): one client's batches
    of 256 texts wait their share while another client's one-line intents go by, where turns
    counted in requests made that intent wait behind 12 s of the other's batches."""

    QUANTUM_BYTES = 64 * 1024

    def __init__(self, per_client: int, total: int, total_bytes: int,
                 quantum: int = QUANTUM_BYTES, max_in_flight: int | None = None):
        self.per_client, self.total, self.total_bytes = per_client, total, total_bytes
        self.quantum = max(1, int(quantum))
        # At most this many of one client's items handed out and not yet done() (None: no
        # bound): with several workers, one client's slow requests cannot hold all of them.
        self.max_in_flight = max_in_flight
        self._in_flight: dict[str, int] = {}
        self._queues: dict[str, deque] = {}
        self._credit: dict[str, int] = {}   # bytes a client may still be served this turn
        self._turns: deque[str] = deque()   # clients with something queued, in serving order
        self._cond = threading.Condition()
        self.size = self.bytes = 0
        self.closed = False

    def put(self, client: str, item, nbytes: int = 0) -> str:
        """'' when queued; else 'client_queue_full' or 'queue_full'."""
        with self._cond:
            mine = self._queues.get(client)
            if mine is not None and len(mine) >= self.per_client:
                return 'client_queue_full'
            if self.closed or self.size >= self.total or self.bytes + nbytes > self.total_bytes:
                return 'queue_full'
            if mine is None:
                mine = self._queues[client] = deque()
                self._credit[client] = 0
                self._turns.append(client)
            mine.append((item, nbytes))
            self.size += 1
            self.bytes += nbytes
            self._cond.notify()
            return ''

    def _ready(self, client: str) -> bool:
        return self.max_in_flight is None or self._in_flight.get(client, 0) < self.max_in_flight

    def _servable(self) -> bool:
        return bool(self.size) and (self.max_in_flight is None
                                    or any(self._ready(c) for c in self._turns))

    def get(self, timeout: float | None = None):
        """The oldest item of the next client whose credit covers it (and which is under its
        in-flight bound); None when closed and empty or after `timeout`. With max_in_flight,
        each item got must be given back with done(client)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._servable() or self.closed, timeout) \
                    or not self._servable():
                return None
            turns = self._turns
            while True:   # ends: every visit adds credit, and the queues are bounded in bytes
                client = turns[0]
                if not self._ready(client):   # at its bound: its turn waits, credit unchanged
                    turns.rotate(-1)
                    continue
                mine = self._queues[client]
                item, nbytes = mine[0]
                if self._credit[client] < nbytes:
                    self._credit[client] += self.quantum
                if self._credit[client] >= nbytes:
                    break
                turns.rotate(-1)   # not yet: its credit waits for its next turn
            mine.popleft()
            turns.popleft()
            if mine:
                self._credit[client] -= nbytes
                turns.append(client)
            else:   # no credit is banked by an idle client
                del self._queues[client], self._credit[client]
            self.size -= 1
            self.bytes -= nbytes
            if self.max_in_flight is not None:
                self._in_flight[client] = self._in_flight.get(client, 0) + 1
            return item

    def done(self, client: str) -> None:
        """One item of `client` got earlier is answered (a no-op without max_in_flight)."""
        if self.max_in_flight is None:
            return
        with self._cond:
            left = self._in_flight.get(client, 0) - 1
            if left > 0:
                self._in_flight[client] = left
            else:
                self._in_flight.pop(client, None)
            self._cond.notify_all()   # a worker may wait for this client's next turn

    def close(self) -> list:
        """Refuse new items; returns what was still queued (to be answered, not dropped)."""
        with self._cond:
            self.closed = True
            left = [item for mine in self._queues.values() for item, _ in mine]
            self._queues.clear()
            self._credit.clear()
            self._turns.clear()
            self.size = self.bytes = 0
            self._cond.notify_all()
            return left


class Rejected(RequestInvalid):
    """A request refused before any model saw it: `code` goes on the wire, `reason` is counted."""

    def __init__(self, code: str, reason: str, message: str, ident: str = ''):
        super().__init__(code, message)
        self.reason = reason
        self.ident = ident


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 1024 * 1024
    queue_per_client: int = 8
    queue_total: int = 64
    queued_bytes_total: int = 32 * 1024 * 1024
    rate_per_s: float = 50.0
    burst: float = 100.0
    max_clock_skew_s: float = 300.0
    max_clients: int = 4096      # token buckets kept (least recently seen dropped)
    max_remembered_ids: int = 65536
    workers: int = 1             # threads running the models (embed, intent, hello, erase)
    # threads waiting on the chat upstream, with a queue of their own (the same bounds): a chat
    # that takes the upstream's 30 s never holds up another robot's intent or embed
    chat_workers: int = 4
    # how many of one client's chats may wait on the upstream at once; 0 (the default, not
    # settable): half the chat workers, so one robot's slow chats leave the rest to the others
    chat_per_client: int = 0
    # refusals signed per second (burst twice that): a flood of requests that are refused
    # costs a signature each to answer; past this they get no answer (counted)
    signed_refusals_per_s: float = 200.0
    # the same for refusals of requests no member is known to have sent (too large, unsigned,
    # unknown or bad certificate or signature, stale, replayed, another server's): a budget of
    # their own, so a stranger's junk cannot use up the answers to members
    unauthenticated_refusals_per_s: float = 50.0

    @classmethod
    def from_config(cls, section) -> 'Limits':
        section = section or {}
        if not isinstance(section, dict):
            raise ValueError('cloud.yaml limits: expected a mapping')
        unknown = set(section) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f'cloud.yaml limits: unknown keys {sorted(unknown)}')
        values = {}
        for name, value in section.items():
            kind = cls.__dataclass_fields__[name].type
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or value <= 0 or (kind == 'int' and value != int(value)):
                raise ValueError(f'cloud.yaml limits.{name}: expected a positive number')
            if name in ('workers', 'chat_workers') and value > MAX_WORKERS:
                raise ValueError(f'cloud.yaml limits.{name}: at most {MAX_WORKERS} threads')
            values[name] = int(value) if kind == 'int' else float(value)
        limits = cls(**values)
        if limits.chat_per_client > limits.chat_workers:
            raise ValueError(f'cloud.yaml limits.chat_per_client: at most chat_workers '
                             f'({limits.chat_workers}): a client cannot hold more chat workers '
                             f'than there are')
        if limits.max_request_bytes > MAX_MESSAGE_BYTES:
            raise ValueError(f'cloud.yaml limits.max_request_bytes: at most {MAX_MESSAGE_BYTES}')
        return limits


@dataclass(frozen=True)
class Admitted:
    client: str          # the verified identity's name: the fair-share and rate-limit key
    task: str
    ident: str
    request_digest: bytes
    body: bytes          # still unparsed JSON
    queued_at: float = 0.0   # perf_counter when queued: the reply reports the wait (queue_ms)
    role: str = ''       # the verified identity's role (an operator may erase for any robot)


class Gate:
    """Everything a request passes before it is queued, in order of cost: its size, its framing,
    the certificate it carries (a fleet member of an allowed role: a hash for a known one), its
    audience (`*` or this `instance`: a request signed for another server is refused, so it
    cannot be replayed here), its time, its id against the ids that member used (a replay),
    only then the signature (an ECDSA check: a stale, misaddressed or replayed request, forged
    or not, costs none), and its sender's rate. Pure: the verifier and the clock are passed
    in."""

    def __init__(self, verifier: Verifier, limits: Limits, clock=time.time, instance: str = ''):
        self.verifier, self.limits, self.clock = verifier, limits, clock
        self.instance = instance
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, task: str, data: bytes) -> Admitted:
        if len(data) > self.limits.max_request_bytes:
            raise Rejected('too_large', 'too_large', f'request of {len(data)} bytes exceeds '
                           f'the limit of {self.limits.max_request_bytes}')
        request_digest = digest(data)
        try:
            header, body = unpack(data, self.limits.max_request_bytes)
        except ValueError as exc:
            raise Rejected('unauthenticated', 'unauthenticated',
                           f'requests must be signed by a fleet identity: {exc}') from None
        ident = header['id']
        try:
            known = self.verifier.identify(header)
        except CredentialsError as exc:
            raise Rejected('unauthenticated', 'unauthenticated', str(exc), ident) from None
        client, role = known.name, known.role
        if header['aud'] not in (ANY_SERVER, self.instance):
            raise Rejected('unauthenticated', 'wrong_server', f'request signed for server '
                           f'{header["aud"]!r}, not this one ({self.instance!r})', ident)
        now = self.clock()
        if abs(now - header['ts'] / 1000.0) > self.limits.max_clock_skew_s:
            raise Rejected('unauthenticated', 'stale', 'request time is more than '
                           f'{self.limits.max_clock_skew_s:g} s from the server\'s clock', ident)
        key = (client, ident)
        with self._lock:
            seen = key in self._seen
        if seen:
            raise Rejected('unauthenticated', 'replay', 'request id already seen', ident)
        try:
            self.verifier.check(known, header, request_signed_bytes(
                task, ident, header['ts'], body, header['aud']))
        except CredentialsError as exc:
            raise Rejected('unauthenticated', 'unauthenticated', str(exc), ident) from None
        with self._lock:
            if key in self._seen:   # the same request, checked meanwhile on another thread
                raise Rejected('unauthenticated', 'replay', 'request id already seen', ident)
            bucket = self._buckets.get(client)
            if bucket is None:
                bucket = self._buckets[client] = TokenBucket(self.limits.rate_per_s,
                                                             self.limits.burst, self.clock)
                while len(self._buckets) > self.limits.max_clients:
                    self._buckets.popitem(last=False)
            self._buckets.move_to_end(client)
            if not bucket.take():
                raise Rejected('busy', 'rate_limited', f'busy: {client} is over its rate of '
                               f'{self.limits.rate_per_s:g} requests/s', ident)
            self._remember(key, now)
        return Admitted(client, task, ident, request_digest, body, role=role)

    def _remember(self, key, now: float) -> None:
        """Ids are kept for the skew window (a replay inside it is refused), bounded in count."""
        seen = self._seen
        seen[key] = now
        horizon = now - 2 * self.limits.max_clock_skew_s
        while seen and (len(seen) > self.limits.max_remembered_ids
                        or next(iter(seen.values())) < horizon):
            seen.popitem(last=False)


class CloudService:
    """The Zenoh side: `on_query` (Zenoh's callback thread) admits or refuses at once, bounded
    work only; `serve` (worker threads) runs the models and signs each answer. Two lanes, each a
    FairQueue with its own workers: `queue` for the models (CPU-bound) and `upstream` for chat,
    which waits on a remote endpoint for up to its timeout: on one lane, a single slow chat held
    every robot's intents behind it."""

    def __init__(self, server: CloudServer, gate: Gate, signer: Signer, queue: FairQueue,
                 instance: str, log: RequestLog | None = None,
                 upstream: FairQueue | None = None):
        self.server, self.gate, self.signer, self.queue = server, gate, signer, queue
        self.upstream = upstream if upstream is not None else queue   # None: one lane for all
        self.instance = instance
        self.log = log   # what this server keeps per sender and subject (None: nothing)
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        # the refusal budgets (members', strangers'), made on the first refusal of each
        self._refusals: dict[bool, TokenBucket] = {}

    def count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    def on_erase(self, query) -> None:
        """An erasure request on erasure.erase_key: admitted like any request, then queued."""
        self.on_query(query, ERASE_TASK)

    def on_query(self, query, task: str = '') -> None:
        """Admit or refuse one zenoh.Query; never raises. `task`: set for the erase key; an
        inference key's last chunk names its task (`erase` there is an unknown task)."""
        request_digest = b''
        try:
            if not task:
                task = str(query.key_expr).rsplit('/', 1)[-1]
                if task == ERASE_TASK:   # erasure has its own key; here it is no task at all
                    task = 'infer:erase'
            payload = query.payload
            size = len(payload) if payload is not None else 0
            if size > self.gate.limits.max_request_bytes:   # refused before it is copied
                raise Rejected('too_large', 'too_large', f'request of {size} bytes exceeds '
                               f'the limit of {self.gate.limits.max_request_bytes}')
            data = payload.to_bytes() if payload is not None else b''
            request_digest = digest(data)
            admitted = replace(self.gate.admit(task, data), queued_at=time.perf_counter())
        except Rejected as exc:
            self.count(exc.reason)
            if task == ERASE_TASK:
                self.count(f'erase_refused_{exc.reason}')
            self._error(query, exc.ident, request_digest, exc.code, str(exc),
                        member=exc.code not in ('unauthenticated', 'too_large'))
            return
        except Exception as exc:  # a bug: an answer, not a dead callback
            self.count('internal')
            self._error(query, '', b'', 'internal', f'{type(exc).__name__}: {exc}', member=False)
            return
        why = self.lane(admitted.task).put(admitted.client, (query, admitted), size)
        if why:
            self.count(why)
            self._error(query, admitted.ident, admitted.request_digest, 'busy',
                        f'busy: {why.replace("_", " ")} (retry later or elsewhere)')

    def lane(self, task: str) -> FairQueue:
        """The queue a task waits in: chat's own (the upstream's time), or the models'."""
        return self.upstream if task == 'chat' else self.queue

    def lanes(self) -> list[tuple[FairQueue, int, str]]:
        """(queue, worker threads, name) of each lane, as `limits` sizes them."""
        limits = self.gate.limits
        if self.upstream is self.queue:
            return [(self.queue, limits.workers, 'serve')]
        return [(self.queue, limits.workers, 'serve'),
                (self.upstream, limits.chat_workers, 'chat')]

    def close(self) -> list:
        """Close every lane; what was still queued, to be answered (not left to time out)."""
        return [item for queue, _, _ in self.lanes() for item in queue.close()]

    def serve(self, queue: FairQueue | None = None) -> None:
        """Worker loop: answer requests queued in `queue` (the models' lane by default) until it
        is closed."""
        queue = self.queue if queue is None else queue
        while True:
            item = queue.get()
            if item is None:
                return
            query, admitted = item
            try:
                self.answer(query, admitted)
            finally:
                queue.done(admitted.client)
            del query, item  # dropping the query sends the final reply marker at once

    def answer(self, query, admitted: Admitted) -> None:
        queue_ms = (time.perf_counter() - admitted.queued_at) * 1000.0 if admitted.queued_at else 0.0
        try:
            body = self._open(admitted)
            if admitted.task == ERASE_TASK:
                reply = erase_reply(self.log, self.signer, self.instance, admitted.client,
                                    admitted.role, body)
                self.count('erased')
            else:
                subject_ref = body.pop('subject_ref', '')
                if subject_ref:
                    check_ref(subject_ref)
                reply = self.server.answer(admitted.task, body)
                if self.log is not None and admitted.task != 'hello':
                    self.log.record(admitted.client, subject_ref, admitted.task, admitted.ident,
                                    admitted.body)
        except RequestInvalid as exc:
            self.count('erase_refused_' + exc.code if admitted.task == ERASE_TASK else 'errors')
            self._error(query, admitted.ident, admitted.request_digest, exc.code, str(exc))
            return
        except Exception as exc:  # a bug or a broken model: an answer, not a dead server
            self.count('internal')
            self._error(query, admitted.ident, admitted.request_digest, 'internal',
                        f'{type(exc).__name__}: {exc}')
            return
        self.count('served')
        reply['server'] = self.instance
        reply['queue_ms'] = round(queue_ms, 3)
        try:
            query.reply(query.key_expr, self.signer.reply(admitted.ident,
                                                          admitted.request_digest, reply))
        except Exception:  # the querier left (timeout): nothing to answer
            self.count('reply_failed')

    def _open(self, admitted: Admitted) -> dict:
        """The request body, unsealed if it was sealed to this server's identity."""
        body = parse_request(admitted.body)
        if 'sealed' in body:
            blob = body.pop('sealed')
            if not isinstance(blob, str) or len(blob) > 2 * self.gate.limits.max_request_bytes:
                raise RequestInvalid('bad_request', 'sealed must be a base64 string')
            try:
                inner = parse_request(sealed.unseal(self.signer.private_key, base64.b64decode(
                    blob, validate=True), sealed_aad(admitted.task, admitted.client)))
            except (CredentialsError, binascii.Error, ValueError) as exc:
                raise RequestInvalid('bad_request', f'sealed body unreadable: {exc}') from None
            body.update(inner)
            self.count('unsealed')
        body['id'] = admitted.ident
        return body

    def _error(self, query, ident: str, request_digest: bytes, code: str, error: str,
               member: bool = True) -> None:
        """A signed refusal, if its budget allows: `member` (an admitted request's, or one
        refused for its sender's rate) or not (no member is known to have sent it)."""
        with self._lock:
            budget = self._refusals.get(member)
            if budget is None:
                limits = self.gate.limits
                rate = limits.signed_refusals_per_s if member else \
                    limits.unauthenticated_refusals_per_s
                budget = self._refusals[member] = TokenBucket(rate, 2 * rate, self.gate.clock)
            if not budget.take():
                self.stats['refusal_unanswered'] += 1
                if not member:
                    self.stats['refusal_unanswered_unauthenticated'] += 1
                return
        try:
            query.reply_err(self.signer.reply(ident, request_digest, {
                'id': ident, 'ok': False, 'code': code, 'error': error[:1000],
                'server': self.instance}))
        except Exception:
            self.count('reply_failed')


def load_config(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding='utf-8'))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f'{path}: {exc}') from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a mapping')
    return data


def build_service(config: dict, identity: keys.Identity, *, instance: str,
                  extra_latency_ms: float = 0.0, server: CloudServer | None = None,
                  clock=time.time, data_dir: str = '') -> CloudService:
    """The server, its gate, signer, queue and request log from config/cloud.yaml's `auth`,
    `limits` and `request_log` (`data_dir` names the log's folder instead)."""
    auth = config.get('auth') or {}
    if not isinstance(auth, dict):
        raise ValueError('cloud.yaml auth: expected a mapping')
    roles = auth.get('client_roles', ['robot', 'operator'])
    if not isinstance(roles, list) or not roles or not set(roles) <= set(keys.ROLES):
        raise ValueError(f'cloud.yaml auth.client_roles: a list of {", ".join(keys.ROLES)}')
    if identity.role != 'cloud':
        raise ValueError(f'identity {identity.name!r} has role {identity.role!r}; the cloud tier '
                         'signs its answers as a `cloud` identity')
    limits = Limits.from_config(config.get('limits'))
    log = request_log_from_config(config, data_dir)
    server = server or CloudServer(config, extra_latency_ms=extra_latency_ms)
    verifier = Verifier(identity.ca.read_bytes(), roles, clock=clock)
    # the members in the keys folder are known from the start: never refused as busy when a
    # stranger's flood of new certificates spends the budget for checking new ones
    verifier.certs.preload(identity.ca.parent)
    gate = Gate(verifier, limits, clock, instance)

    def lane(max_in_flight: int | None = None) -> FairQueue:
        return FairQueue(limits.queue_per_client, limits.queue_total, limits.queued_bytes_total,
                         max_in_flight=max_in_flight)
    # One robot's chats hold at most half the chat workers (by default): the rest stay for the
    # others.
    return CloudService(server, gate, Signer(identity), lane(), instance, log,
                        upstream=lane(chat_in_flight(limits)))


def chat_in_flight(limits: Limits) -> int:
    """How many of one client's chats may wait on the upstream at once: `chat_per_client`,
    or half the chat workers when it is not set."""
    return limits.chat_per_client or max(1, -(-limits.chat_workers // 2))


def session_config_for(mode: str, connect, listen, multicast_scouting: bool, identity,
                       keys_dir):
    """The server's Zenoh config. A secure server in peer mode holds its own links to the
    fleet's rules (made from the certificates in `keys_dir`), as the router and a peer bridge
    do: without them, any member reaching a listening server could put, subscribe and serve
    under any key through it."""
    from loom_ros.bridge.zenoh_link import session_config
    rules = None
    if mode == 'peer' and identity is not None:
        from loom_ros.bridge.zenoh_router import router_access_control
        rules, _ = router_access_control(keys_dir)
    return session_config(mode, connect, listen, multicast_scouting, identity=identity,
                          access_control=rules)


def main(argv=None) -> int:
    from loom_ros.config.params import config_dir
    parser = argparse.ArgumentParser(prog='loom_cloud', description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=str(config_dir() / 'cloud.yaml'))
    parser.add_argument('--mode', choices=['client', 'peer'])
    parser.add_argument('--connect', action='append', help='router endpoint (repeatable)')
    parser.add_argument('--listen', action='append', help='endpoint to listen on (peer mode)')
    parser.add_argument('--keys-dir', help='fleet credentials (default: cloud.yaml auth.keys_dir)')
    parser.add_argument('--identity', help='the cloud identity that signs answers (default: '
                        'cloud.yaml auth.identity); several servers may share one')
    parser.add_argument('--insecure', action='store_true',
                        help='Zenoh over plain TCP without mutual TLS (default: cloud.yaml '
                        'zenoh.insecure, false); logged as a warning')
    parser.add_argument('--instance', default=re.sub(r'[^A-Za-z0-9_.-]', '-', (
                            f'{socket.gethostname()}-{os.getpid()}'))[-64:].lstrip('-._'),
                        help='this server\'s name in its answers and its own key (letters, '
                        'digits, _ . -; default: host-pid)')
    parser.add_argument('--data-dir', default='',
                        help='where this server keeps its request log (per sender and data '
                        'subject, erased on a fleet erasure request; default: cloud.yaml '
                        'request_log.dir, none: nothing is kept)')
    parser.add_argument('--extra-latency-ms', type=float, default=0.0,
                        help='emulated WAN latency added to every answer (tests, benchmarks)')
    args = parser.parse_args(argv)

    import zenoh
    from loom_ros.bridge.zenoh_link import INSECURE_WARNING
    try:
        check_instance(args.instance)
        config = load_config(args.config)
        z = config.get('zenoh', {})
        auth = config.get('auth') or {}
        keys_dir = args.keys_dir or auth.get('keys_dir', keys.DEFAULT_KEYS_DIR)
        identity = keys.load(keys_dir, args.identity or auth.get('identity', 'cloud'))
        service = build_service(config, identity, instance=args.instance,
                                extra_latency_ms=args.extra_latency_ms, data_dir=args.data_dir)
        server = service.server
        insecure = args.insecure or z.get('insecure', False) is True
        if insecure:
            print(f'loom_cloud: WARNING {INSECURE_WARNING}', file=sys.stderr, flush=True)
        session = zenoh.open(session_config_for(
            args.mode or z.get('mode', 'client'), args.connect or z.get('connect', []),
            args.listen or z.get('listen', []), bool(z.get('multicast_scouting', False)),
            None if insecure else identity, keys_dir))
    except (ValueError, CredentialsError, zenoh.ZError) as exc:
        print(f'loom_cloud: cannot start: {exc}', file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # a missing model package: ModelError
        print(f'loom_cloud: cannot start: {type(exc).__name__}: {exc}', file=sys.stderr, flush=True)
        return 1
    prefix = config.get('key_prefix', KEY_PREFIX)
    # Zenoh's callback only admits (bounded work); models run on this process's worker threads.
    queryable = session.declare_queryable(f'{prefix}/*', service.on_query, complete=True)
    alone = session.declare_queryable(instance_key(args.instance, '*', prefix), service.on_query,
                                      complete=True)   # a robot's spread first attempts
    # Fleet erasure: every server answers (a robot asks ALL), each for what it keeps.
    eraser = session.declare_queryable(erase_key(prefix), service.on_erase, complete=True)
    stop = stop_event()
    workers = [threading.Thread(target=service.serve, args=(queue,), daemon=True,
                                name=f'loom-cloud-{name}-{i}')
               for queue, count, name in service.lanes() for i in range(count)]
    for worker in workers:
        worker.start()
    print(json.dumps({'ready': True, 'key': f'{prefix}/*', 'own_key': instance_key(
                          args.instance, '*', prefix), 'intents': server.intents.labels,
                      'identity': identity.name, 'instance': args.instance,
                      'erase_key': erase_key(prefix),
                      'keeps': str(service.log.path) if service.log else ''}), flush=True)
    while not stop.wait(0.2):
        pass
    queryable.undeclare()
    alone.undeclare()
    eraser.undeclare()
    for query, admitted in service.close():   # answered, not left to time out
        service._error(query, admitted.ident, admitted.request_digest, 'busy',
                       'busy: the server is stopping (retry elsewhere)')
        del query
    deadline = time.monotonic() + 10.0   # one bound for all: a chat may wait on its upstream
    for worker in workers:
        worker.join(timeout=max(0.0, deadline - time.monotonic()))
    left = sum(worker.is_alive() for worker in workers)
    if left:   # a chat still waiting on its upstream: its answer would find the session closed
        service.stats['workers_left_running'] = left
    session.close()
    if service.log is not None and not left:   # a worker still running may yet write to it
        service.log.close()
    print(json.dumps({'stats': dict(service.stats)}), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
