"""`loom_cloud`: the cloud inference tier, answering Zenoh queries on `loom/cloud/infer/<task>`.

    loom_cloud --connect tcp/<router>:7447            # config/cloud.yaml for the rest

Tasks: `embed` (MiniLM, the robot's model, in bigger batches), `intent` (a logistic-regression
intent classifier on MiniLM embeddings, trained at start from config/cloud.yaml's phrases;
accepts text or an embedding, so Sensitive events can be classified from their vectors), and
`chat` (an OpenAI-compatible endpoint whose URL and key come from the environment). Each reply
echoes the request's correlation id; errors are Zenoh error replies with a code and a reason.
Prints one JSON line `{"ready": true, ...}` once it answers.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from loom_ros.cloud.protocol import KEY_PREFIX, RequestInvalid, encode, parse_request

DIM = 384


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
        self.max_batch = int(config.get('embed', {}).get('max_batch', 256))
        self.costs = {k: float(v) for k, v in config.get('costs', {}).items()}
        self.chat = config.get('chat', {})
        self.extra_latency_s = max(0.0, extra_latency_ms) / 1000.0
        self.served = self.errors = 0

    def answer(self, task: str, body: dict) -> dict:
        handler = {'embed': self._embed, 'intent': self._intent, 'chat': self._chat}.get(task)
        if handler is None:
            raise RequestInvalid('unknown_task', f'unknown task {task!r}: expected embed, '
                                 'intent or chat')
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
                data = json.loads(r.read())
            text = data['choices'][0]['message']['content']
        except urllib.error.HTTPError as exc:
            raise RequestInvalid('upstream', f'chat endpoint answered HTTP {exc.code}') from None
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise RequestInvalid('upstream', f'chat endpoint failed: {exc!r}') from None
        return {'text': text, 'usage': data.get('usage', {})}, model

    # -- Zenoh ----------------------------------------------------------------------------
    def handle(self, query) -> None:
        """Answer one zenoh.Query: a reply, or an error reply; never raises."""
        task = str(query.key_expr).rsplit('/', 1)[-1]
        body: dict = {}
        try:
            body = parse_request(query.payload.to_bytes() if query.payload is not None else b'')
            reply = self.answer(task, body)
        except RequestInvalid as exc:
            self.errors += 1
            query.reply_err(encode({'id': body.get('id', ''), 'ok': False, 'code': exc.code,
                                    'error': str(exc)}))
            return
        except Exception as exc:  # a bug or a broken model: an answer, not a dead server
            self.errors += 1
            query.reply_err(encode({'id': body.get('id', ''), 'ok': False, 'code': 'internal',
                                    'error': f'{type(exc).__name__}: {exc}'}))
            return
        self.served += 1
        query.reply(query.key_expr, encode(reply))


def load_config(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding='utf-8'))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f'{path}: {exc}') from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a mapping')
    return data


def main(argv=None) -> int:
    from loom_ros.config.params import config_dir
    parser = argparse.ArgumentParser(prog='loom_cloud', description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=str(config_dir() / 'cloud.yaml'))
    parser.add_argument('--mode', choices=['client', 'peer'])
    parser.add_argument('--connect', action='append', help='router endpoint (repeatable)')
    parser.add_argument('--listen', action='append', help='endpoint to listen on (peer mode)')
    parser.add_argument('--extra-latency-ms', type=float, default=0.0,
                        help='emulated WAN latency added to every answer (tests, benchmarks)')
    args = parser.parse_args(argv)

    import zenoh
    from loom_ros.bridge.zenoh_link import session_config
    try:
        config = load_config(args.config)
        z = config.get('zenoh', {})
        server = CloudServer(config, extra_latency_ms=args.extra_latency_ms)
        session = zenoh.open(session_config(
            args.mode or z.get('mode', 'client'), args.connect or z.get('connect', []),
            args.listen or z.get('listen', []), bool(z.get('multicast_scouting', False))))
    except (ValueError, zenoh.ZError) as exc:
        print(f'loom_cloud: cannot start: {exc}', file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # a missing model package: ModelError
        print(f'loom_cloud: cannot start: {type(exc).__name__}: {exc}', file=sys.stderr, flush=True)
        return 1
    prefix = config.get('key_prefix', KEY_PREFIX)
    pending: queue.SimpleQueue = queue.SimpleQueue()
    # Zenoh's callback only queues the query: models run on this process's worker thread, not on
    # Zenoh's runtime threads.
    queryable = session.declare_queryable(f'{prefix}/*', pending.put)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    def serve():
        while True:
            query = pending.get()
            if query is None:
                return
            server.handle(query)
            del query  # dropping the query sends the final reply marker at once
    worker = threading.Thread(target=serve, daemon=True, name='loom-cloud-serve')
    worker.start()
    print(json.dumps({'ready': True, 'key': f'{prefix}/*', 'intents': server.intents.labels}),
          flush=True)
    while not stop.wait(0.2):  # polled: a handler calling set() inside a bare wait() can hang
        pass
    queryable.undeclare()
    pending.put(None)
    worker.join(timeout=10.0)
    session.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
