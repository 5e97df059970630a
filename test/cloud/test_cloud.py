"""The cloud tier across real processes on loopback: a Zenoh router, `loom_cloud` with the real
MiniLM model and intent classifier, and the robot-side client running the router's decisions."""
import json

import numpy as np
import pytest

from cloud_fixtures import cloud, fleet, net, signed_get  # noqa: F401  (fixtures)
from loom_ros.bus.event import Privacy
from loom_ros.cloud.client import CloudClient, InferenceRequest, UploadRefused, execute_route
from loom_ros.router.decision import Decision, Route, RouteRequest, decide
from loom_ros.router.policy import load_policy
from loom_ros.config.params import config_dir
from loom_ros.security import keys


@pytest.fixture(scope='module')
def embedder():
    from loom_ros.agents.embedding import MiniLMEmbedder
    return MiniLMEmbedder()


def test_server_answers_tasks_with_correlation_ids_and_errors_as_replies(cloud, net, embedder,
                                                                         fleet):
    cloud()
    session = net.session('robot1')
    robot = keys.load(fleet, 'robot1')

    def raw_get(key, payload: bytes):
        """A signed request of this body; the server's signed (ok, reply)."""
        ok, reply, signer = signed_get(session, robot, key.rsplit('/', 1)[-1],
                                       json.loads(payload) if payload.startswith(b'{"') else {},
                                       ident=_id(payload))
        assert signer == 'cloud'
        return ok, reply

    ok, reply = raw_get('loom/cloud/infer/embed',
                        json.dumps({'id': 'c1', 'texts': ['hello', 'stop', 'weather']}).encode())
    assert ok and reply['id'] == 'c1' and reply['cost'] == 0.0005
    vectors = np.array(reply['result']['embeddings'])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors, embedder.embed(['hello', 'stop', 'weather']), atol=1e-5)

    for text, label in [('will it be rainy tomorrow', 'weather'), ('halt immediately', 'stop'),
                        ('what time is it please', 'time'), ('drive to the kitchen', 'move'),
                        ('good morning robot', 'greeting')]:
        ok, reply = raw_get('loom/cloud/infer/intent',
                            json.dumps({'id': text, 'text': text}).encode())
        assert ok and reply['id'] == text
        assert (reply['result']['intent'], reply['result']['input']) == (label, 'text'), text
    # The same answer from the embedding alone (what a Sensitive request sends).
    vector = embedder.embed(['will it be rainy tomorrow'])[0].tolist()
    ok, by_vector = raw_get('loom/cloud/infer/intent',
                            json.dumps({'id': 'v', 'embedding': vector}).encode())
    assert ok and by_vector['result']['intent'] == 'weather'
    assert by_vector['result']['input'] == 'embedding'

    errors = {
        'loom/cloud/infer/translate': (b'{"id":"e1","text":"x"}', 'unknown_task', 'e1'),
        'loom/cloud/infer/embed': (b'{"id":"e3","texts":[1,2]}', 'bad_request', 'e3'),
        'loom/cloud/infer/chat': (b'{"id":"e4","text":"hi"}', 'not_configured', 'e4'),
    }
    for key, (payload, code, corr) in errors.items():
        ok, reply = raw_get(key, payload)
        assert (ok, reply['code'], reply['id']) == (False, code, corr), key
    assert 'LOOM_CLOUD_CHAT_URL' in raw_get('loom/cloud/infer/chat',
                                            b'{"id":"x","text":"hi"}')[1]['error']
    bad_vector = raw_get('loom/cloud/infer/intent', b'{"id":"y","embedding":[1,2]}')
    assert bad_vector[1]['code'] == 'bad_request'


def _id(payload: bytes) -> str:
    try:
        return str(json.loads(payload).get('id', '')) or 'anon'
    except ValueError:
        return 'anon'


def local_intent(request):
    return {'intent': 'unknown', 'source': 'local'}, 0.4


def test_a_sealed_body_opens_only_in_a_request_its_sealer_signed(cloud, net, embedder, fleet):
    # Review finding: the seal was bound to the task only, so robot2 could put robot1's sealed
    # embedding (seen on a shared router) in a request of its own and get robot1's answer.
    cloud()
    client = CloudClient.from_keys(net.session('robot1'), fleet, 'robot1', embedder=embedder)
    body = client.body_for('intent', 'will it be rainy tomorrow', Privacy.SENSITIVE, 'raw')
    assert set(body) == {'sealed'}
    session = net.session('robot2')
    ok, reply, _ = signed_get(session, keys.load(fleet, 'robot1'), 'intent', dict(body),
                              ident='own')
    assert ok and reply['result']['intent'] == 'weather'       # its sealer's request: opened
    ok, reply, signer = signed_get(session, keys.load(fleet, 'robot2'), 'intent', dict(body),
                                   ident='reused')
    assert signer == 'cloud' and not ok and reply['code'] == 'bad_request', reply
    assert 'sealed body unreadable' in reply['error'] and 'result' not in reply


def test_routes_run_cloud_hybrid_and_fall_back_with_costs(cloud, net, embedder, fleet):
    cloud()
    client = CloudClient.from_keys(net.session('robot1'), fleet, 'robot1', embedder=embedder)
    policy = load_policy(config_dir() / 'policy.yaml')
    reported = []

    def run(privacy=Privacy.PUBLIC, confidence=0.3, text='is it going to rain later'):
        rp = policy.policy_for('speech.utterance')
        decision = decide(RouteRequest('speech.utterance', privacy=privacy,
                                       local_confidence=confidence),
                          rp, cloud_cost=policy.cost_of(rp.cloud_model))
        request = InferenceRequest('intent', text, privacy, 5000.0, 'speech.utterance')
        return decision, execute_route(decision, request, local_intent, client, reported.append)

    decision, result = run()
    assert decision.route is Route.CLOUD
    assert (result.backend, result.answer['intent'], result.answer['input']) == \
        ('cloud', 'weather', 'text')
    assert result.cost == 0.002 and not result.fallback
    assert reported[-1].backend == 'cloud' and reported[-1].cost == 0.002

    decision, result = run(confidence=0.6)  # Hybrid: local now, refined by the cloud
    assert decision.route is Route.HYBRID and result.backend == 'cloud'
    assert result.answer['intent'] == 'weather'

    # Sensitive: decided with upload 'embedding'; the text is embedded here, only the vector goes.
    decision, result = run(privacy=Privacy.SENSITIVE)
    assert decision.upload == 'embedding'
    assert (result.answer['intent'], result.answer['input']) == ('weather', 'embedding')
    assert client.stats['sealed'] == 1   # sealed to the cloud's certificate on the way up

    # Private: the router keeps it local, and the client refuses to send it even if asked.
    decision, result = run(privacy=Privacy.PRIVATE)
    assert decision.route is Route.LOCAL and result.backend == 'local'
    with pytest.raises(UploadRefused):
        client.body_for('intent', 'secret', Privacy.PRIVATE, 'raw')
    forced = execute_route(Decision(Route.CLOUD, 0.3, 'test', 'forced', upload='raw'),
                           InferenceRequest('intent', 'secret', Privacy.LOCAL_ONLY), local_intent,
                           client)
    assert forced.fallback and forced.backend == 'local' and 'never leaves' in forced.cloud_error
    assert client.spent == pytest.approx(0.006)
    assert len(client.ledger) == 3


def test_cloud_timeout_falls_back_to_local(cloud, net, fleet):
    cloud('--extra-latency-ms', '3000')  # a cloud slower than any budget below
    client = CloudClient.from_keys(net.session('robot1'), fleet, 'robot1', retries=2)
    decision = Decision(Route.CLOUD, 0.3, 'default', 'cloud', upload='raw', cloud_cost=0.002)
    request = InferenceRequest('intent', 'what time is it', latency_budget_ms=300.0,
                               event_type='speech.utterance', decision_id='d1')
    result = execute_route(decision, request, local_intent, client)
    assert (result.route, result.backend, result.fallback) == ('cloud', 'local', True)
    assert result.answer == {'intent': 'unknown', 'source': 'local'}
    assert result.cloud_error.startswith('timeout')
    assert result.cost == 0.0 and client.spent == 0.0
    assert (result.outcome.decision_id, result.outcome.backend) == ('d1', 'local')
    assert client.stats['failed_timeout'] == 1
