"""Fuzzing the cloud protocol (issue 13, standing test): any request bytes give a request object
or RequestInvalid, any reply bytes a checked reply or ReplyInvalid, and the real server's
`answer` (real MiniLM model) gives a reply or RequestInvalid for any parsed request."""
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loom_ros.cloud.protocol import ReplyInvalid, RequestInvalid, parse_reply, parse_request

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.just(10**400), st.floats(),
              st.text(max_size=20)),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12)
raw = st.one_of(st.binary(max_size=256),
                st.builds(lambda n, o: o * n, st.integers(1, 200_000),
                          st.sampled_from([b'[', b'{"id":[', b'{"a":{"b":'])),
                st.just(b'{"id":"\\ud800"}'), st.just(b' ' * (5 * 2**20)))


@FUZZ
@given(raw)
def test_request_bytes(data):
    try:
        body = parse_request(data)
    except RequestInvalid as exc:
        assert exc.code == 'bad_request'
        return
    assert isinstance(body, dict) and isinstance(body.get('id', ''), str)


@FUZZ
@given(st.one_of(raw, st.builds(lambda d: json.dumps(d).encode(),
                                st.dictionaries(st.sampled_from(['id', 'ok', 'result', 'cost',
                                                                 'code', 'error', 'model']),
                                                json_value))))
def test_reply_bytes(data):
    try:
        reply = parse_reply(data)
    except ReplyInvalid:
        return
    float(reply.get('cost', 0))
    assert isinstance(reply.get('result', {}), dict)


@pytest.fixture(scope='module')
def server():
    from loom_ros.cloud.server import CloudServer, load_config
    from loom_ros.config.params import config_dir
    return CloudServer(load_config(config_dir() / 'cloud.yaml'))


body_values = st.one_of(json_value, st.lists(st.text(max_size=12), min_size=1, max_size=3),
                        st.lists(st.floats(width=32), min_size=384, max_size=384),
                        st.lists(st.integers(), min_size=384, max_size=384))


@settings(FUZZ, max_examples=120)
@example('intent', {'embedding': [10**400] * 384})   # numpy: OverflowError, not ValueError
@given(st.sampled_from(['embed', 'intent', 'chat', 'other']),
       st.dictionaries(st.sampled_from(['id', 'text', 'texts', 'embedding', 'messages']),
                       body_values, max_size=3))
def test_server_answers_or_refuses_any_request(server, monkeypatch, task, body):
    monkeypatch.delenv('LOOM_CLOUD_CHAT_URL', raising=False)
    try:
        request = parse_request(json.dumps(body).encode())
        reply = server.answer(task, request)
    except RequestInvalid:
        return
    assert reply['ok'] is True
    json.dumps(reply)
