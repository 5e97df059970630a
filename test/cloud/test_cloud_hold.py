"""A cloud tier that holds (issue 14), across real processes on loopback: a Zenoh router,
`loom_cloud` servers with the real model, a fake queryable in its own process, a local HTTP
server standing in for the chat upstream. Each test repeats the attack the issue reports."""
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cloud_fixtures import cloud, fleet, net, signed_get, stop_stats, stranger  # noqa: F401
from harness import WAIT_LIMIT_S
from loom_ros.cloud.client import CloudClient
from loom_ros.cloud.protocol import Signer, encode
from loom_ros.security import keys

# A fake cloud in its own process: it answers every request at once, echoing the request's id,
# in turn unsigned, signed by another robot of the fleet, and signed by another authority's
# `cloud`; every answer says the intent is `move`.
FAKE = '''
import sys, time, zenoh
from loom_ros.bridge.zenoh_link import session_config
from loom_ros.cloud.protocol import Signer, digest, encode, unpack
from loom_ros.security import keys
port, fleet, stranger = sys.argv[1:4]
forgers = [None, Signer(keys.load(fleet, 'robot2')), Signer(keys.load(stranger, 'cloud'))]
count = [0]
def forge(query):
    data = query.payload.to_bytes()
    ident = unpack(data)[0]['id']
    body = {'id': ident, 'ok': True, 'task': 'intent', 'cost': 0.0, 'model': 'fake',
            'server': 'fake', 'result': {'intent': 'move', 'confidence': 1.0, 'input': 'text'}}
    forger = forgers[count[0] % 3]
    count[0] += 1
    query.reply(query.key_expr, encode(body) if forger is None
                else forger.reply(ident, digest(data), body))
session = zenoh.open(session_config('client', [f'tcp/127.0.0.1:{port}']))
queryable = session.declare_queryable('loom/cloud/infer/*', forge, complete=True)
print('ready', flush=True)
while True:
    time.sleep(3600)
'''

BUDGET_MS = 10_000.0


def test_forged_replies_are_rejected_and_the_genuine_answer_taken(cloud, net, spawn, port, fleet,
                                                                  stranger):
    # An insecure router: the fake must get through for the cloud tier's own check to be tested.
    cloud('--instance', 'genuine', secure=False)
    fake = spawn('-c', FAKE, str(port), str(fleet), str(stranger.cert.parent.parent))
    assert fake.popen.stdout.readline().strip() == 'ready'
    session = net.session('robot1')
    # Asking every server, the fake (which answers at once) is heard first: wait until all three
    # kinds of forgery were rejected, every answer taken the genuine one.
    client = CloudClient.from_keys(session, fleet, 'robot1', ask_all=True)
    answers = []
    deadline = time.monotonic() + WAIT_LIMIT_S
    while client.stats['forged_reply'] < 3:
        assert time.monotonic() < deadline, f'the fake was never heard: {client.stats}'
        result = client.infer('intent', {'text': 'will it rain today'}, BUDGET_MS)
        assert result.ok, (result, client.stats)
        answers.append((result.result['intent'], result.server, result.model))
    # The default client asks one server first (whichever Zenoh picks) and all on a forgery.
    default = CloudClient.from_keys(session, fleet, 'robot1')
    for _ in range(3):
        result = default.infer('intent', {'text': 'will it rain today'}, BUDGET_MS)
        assert result.ok and result.attempts <= 2, (result, default.stats)
        answers.append((result.result['intent'], result.server, result.model))
    assert set(answers) == {('weather', 'genuine', 'minilm-logreg-intent')}


def test_a_reply_whose_status_disagrees_with_its_signed_body_is_forged(net, fleet):
    # Review finding: Zenoh's ok/err status of a reply is not signed and the client believed it
    # over the signed body, so a router turning a signed refusal into an answer made the client
    # take an empty result as the cloud's. A cloud identity here answers as such a router would
    # pass it on: a genuine signed body under the opposite status.
    from loom_ros.cloud.protocol import digest, unpack
    net.router()
    signer, served = Signer(keys.load(fleet, 'cloud')), []

    def flipped(query):
        data = query.payload.to_bytes()
        ident = unpack(data)[0]['id']
        if len(served) % 2 == 0:   # a refusal, passed on as an answer
            query.reply(query.key_expr, signer.reply(ident, digest(data), {
                'id': ident, 'ok': False, 'code': 'busy', 'error': 'later', 'server': 's'}))
        else:                      # an answer, passed on as a refusal
            query.reply_err(signer.reply(ident, digest(data), {
                'id': ident, 'ok': True, 'task': 'intent', 'cost': 0.0, 'model': 'm',
                'server': 's', 'result': {'intent': 'move', 'confidence': 1.0}}))
        served.append(ident)
    queryable = net.session('cloud').declare_queryable('loom/cloud/infer/*', flipped,
                                                       complete=True)
    client = CloudClient.from_keys(net.session('robot1'), fleet, 'robot1')
    for _ in range(2):
        result = client.infer('intent', {'text': 'will it rain today'}, 2000.0)
        assert not result.ok and result.code == 'forged', (result, client.stats)
    assert len(served) >= 2 and client.stats['forged_reply'] >= 2
    queryable.undeclare()


class Upstream:
    """A local OpenAI-compatible chat endpoint that records what it was sent. With `hold` set
    to a threading.Event, it answers only once that is set (a slow upstream, released by the
    test rather than by a clock)."""

    def __init__(self):
        self.seen: list[dict] = []
        self.hold: threading.Event | None = None
        self.padding = 0   # bytes of whitespace added to each answer
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                upstream.seen.append({'path': self.path, 'auth': self.headers.get('Authorization'),
                                      'body': body})
                if upstream.hold is not None:
                    upstream.hold.wait(WAIT_LIMIT_S)
                answer = json.dumps({'choices': [{'message': {'content': 'hi from upstream'}}],
                                     'usage': {'total_tokens': 3}}).encode() + b' ' * upstream.padding
                self.send_response(200)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}/v1'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.close()


def test_unauthenticated_requests_are_refused_and_chat_never_forwarded(
        cloud, net, fleet, stranger, upstream, monkeypatch):
    monkeypatch.setenv('LOOM_CLOUD_CHAT_URL', upstream.url)
    monkeypatch.setenv('LOOM_CLOUD_CHAT_KEY', 'sk-operator-secret')
    server = cloud(secure=False)   # the outsider reaches the cloud tier: its own check holds
    session = net.session()
    robot = keys.load(fleet, 'robot1')
    router = keys.load(fleet, 'router')   # the fleet's, but not a role that may ask
    genuine = Signer(robot).request('chat', {'text': 'hello'}, 'r1', int(time.time() * 1000))
    tampered = genuine.replace(b'hello', b'jello')
    stale = Signer(robot).request('chat', {'text': 'hi'}, 'old', int(time.time() * 1000) - 3600_000)
    attacks = {
        'unsigned chat': ('chat', encode({'id': 'a1', 'text': 'hi'})),
        'unsigned intent': ('intent', encode({'id': 'a2', 'text': 'will it rain'})),
        'unsigned embed': ('embed', encode({'id': 'a3', 'texts': ['hello']})),
        'another authority': ('chat', Signer(stranger).request('chat', {'text': 'hi'}, 'a4',
                                                               int(time.time() * 1000))),
        'router role': ('chat', Signer(router).request('chat', {'text': 'hi'}, 'a5',
                                                       int(time.time() * 1000))),
        'tampered body': ('chat', tampered),
        'an hour old': ('chat', stale),
        'garbage': ('chat', b'LOOMC1 {"id":' + b'[' * 5000),
    }
    for what, (task, payload) in attacks.items():
        ok, reply, signer = signed_get(session, robot, task, {}, payload=payload)
        assert (ok, reply['code'], signer) == (False, 'unauthenticated', 'cloud'), what
    assert upstream.seen == []   # nothing was forwarded, so the bearer key never left

    # The genuine request is forwarded once, with the key; replaying it is refused.
    ok, reply, _ = signed_get(session, robot, 'chat', {}, payload=genuine)
    assert ok and reply['result']['text'] == 'hi from upstream'
    ok, reply, _ = signed_get(session, robot, 'chat', {}, payload=genuine)
    assert (ok, reply['code']) == (False, 'unauthenticated') and 'already seen' in reply['error']
    assert [s['auth'] for s in upstream.seen] == ['Bearer sk-operator-secret']
    stats = stop_stats(server)
    assert stats['unauthenticated'] == 7 and stats['stale'] == 1 and stats['replay'] == 1
    assert stats['served'] == 1


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise AssertionError(f'{field} not in /proc/{pid}/status')


def test_a_flood_from_one_client_does_not_starve_another(cloud, net, fleet):
    server = cloud()
    pid = server.popen.pid
    victim = CloudClient.from_keys(net.session('robot1'), fleet, 'robot1')
    assert victim.infer('intent', {'text': 'warm up'}, BUDGET_MS).ok
    base_kib = _rss_kib(pid, 'VmRSS')

    # robot2 floods: 200 embed requests of ~500 kB each (about a second of model time each),
    # all sent at once without waiting; 100 MB that an unbounded queue would hold.
    flood_session = net.session('robot2')
    flooder = Signer(keys.load(fleet, 'robot2'))
    answers = {'ok': 0, 'busy': 0, 'other': 0}
    lock = threading.Lock()

    def on_reply(reply):
        with lock:
            if reply.ok is not None:
                answers['ok'] += 1
            else:
                answers['busy' if b'"busy"' in reply.err.payload.to_bytes() else 'other'] += 1
    texts = ['word ' * 50_000, 'more ' * 50_000]
    for _ in range(200):
        flood_session.get('loom/cloud/infer/embed', on_reply, timeout=120.0, payload=flooder.request(
            'embed', {'texts': texts}, uuid.uuid4().hex, int(time.time() * 1000)))

    # robot1 is still answered, each request within its budget, while the flood is queued.
    for text in ('will it rain today', 'stop right now', 'what time is it'):
        result = victim.infer('intent', {'text': text}, BUDGET_MS)
        assert result.ok, (result, victim.stats)
        assert result.latency_ms < BUDGET_MS
    deadline = time.monotonic() + WAIT_LIMIT_S
    while answers['busy'] < 150:   # the flood is answered `busy`, not queued
        assert time.monotonic() < deadline, answers
        time.sleep(0.05)
    grown_mb = (_rss_kib(pid, 'VmRSS') - base_kib) / 1024
    print(f'server RSS grew {grown_mb:.0f} MB, peak {(_rss_kib(pid, "VmHWM") - base_kib) / 1024:.0f} MB')
    assert grown_mb < 200, f'server grew {grown_mb:.0f} MB'
    stats = stop_stats(server)
    assert stats.get('client_queue_full', 0) + stats.get('rate_limited', 0) >= 150
    assert answers['other'] == 0


def test_a_chat_waiting_on_its_upstream_does_not_hold_up_other_robots(cloud, net, fleet, upstream,
                                                                      monkeypatch):
    """One model worker (the default): robot2's chat sits in the upstream, which answers only
    when the test says; robot1's intents are answered meanwhile, by the models' own lane. On one
    lane they waited for the chat (up to its 30 s timeout)."""
    monkeypatch.setenv('LOOM_CLOUD_CHAT_URL', upstream.url)
    upstream.hold = threading.Event()
    server = cloud()
    victim = CloudClient.from_keys(net.session('robot1'), fleet, 'robot1')
    assert victim.infer('intent', {'text': 'warm up'}, BUDGET_MS).ok
    chats: list = []
    robot2, session2 = keys.load(fleet, 'robot2'), net.session('robot2')
    chat = threading.Thread(target=lambda: chats.append(signed_get(
        session2, robot2, 'chat', {'text': 'tell me a story'}, timeout=WAIT_LIMIT_S)))
    chat.start()
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not upstream.seen:   # the chat is inside the upstream now
        assert time.monotonic() < deadline and chat.is_alive(), chats
        time.sleep(0.01)
    try:
        for text in ('will it rain today', 'stop right now'):
            result = victim.infer('intent', {'text': text}, BUDGET_MS)
            assert result.ok, (result, victim.stats)
        assert chats == [] and chat.is_alive()   # answered while the chat still waits
    finally:
        upstream.hold.set()
    chat.join(WAIT_LIMIT_S)
    (ok, reply, signer), = chats
    assert (ok, reply['result']['text'], signer) == (True, 'hi from upstream', 'cloud')
    # An upstream answering past 1 MiB is read no further: an error, not the server's memory.
    upstream.padding = 2 << 20
    ok, reply, _ = signed_get(session2, robot2, 'chat', {'text': 'again'}, timeout=WAIT_LIMIT_S)
    assert (ok, reply['code']) == (False, 'upstream') and 'more than 1048576' in reply['error']
    stats = stop_stats(server)
    # three intents and robot2's one chat, besides the hellos robot1's client learns servers by
    assert stats['served'] >= 4 and len(upstream.seen) == 2 and stats['errors'] == 1
