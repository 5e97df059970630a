"""Masking: a secret, a token, an e-mail address or a Private payload never reaches a log line,
in the JSON file, in plain `logging` output, or through rclpy's logger on /rosout."""
from __future__ import annotations

import io
import json
import logging

import pytest

from loom_ros.bus.event import Event, Privacy
from loom_ros.telemetry.logs import (
    MASK, SUBJECT_MASK, JsonFormatter, MaskingFilter, NodeLog, mask_event, mask_text, mask_value,
    sensitive_name,
)

SECRETS = {
    'bearer': 'Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlc2VjcmV0',
    'openai': 'sk-proj-Zx81Kd93hQaPle02nXv7tR55',
    'github': 'ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8',
    'aws': 'AKIAIOSFODNN7EXAMPLE',
    'email': 'ada.lovelace@example.org',
    'password': 'hunter2-correct-horse',
}
PRIVATE_PAYLOAD = b'{"transcript": "my PIN is 4711"}'


def _leaks(text: str) -> list[str]:
    raw = [SECRETS['bearer'].split()[1], SECRETS['openai'], SECRETS['github'], SECRETS['aws'],
           SECRETS['email'], SECRETS['password'], 'my PIN is 4711']
    return [s for s in raw if s in text]


def test_sensitive_field_names():
    for name in ('token', 'api_key', 'X-Api-Key', 'authToken', 'db.password', 'Authorization',
                 'client_secret', 'cookie', 'credentials'):
        assert sensitive_name(name), name
    for name in ('monkey', 'topic', 'privacy', 'event_type', 'keyboard_layout', 'author'):
        assert not sensitive_name(name), name


def test_patterns_in_free_text():
    text = (f"calling cloud with Authorization: {SECRETS['bearer']} key {SECRETS['openai']} "
            f"repo {SECRETS['github']} aws {SECRETS['aws']} for {SECRETS['email']} "
            f"password={SECRETS['password']} api_key: 'abc123xyz'")
    masked = mask_text(text)
    assert _leaks(masked) == []
    assert 'abc123xyz' not in masked
    assert 'Authorization: ***' in masked and '<email>' in masked
    assert mask_text('event 7f3a9c01d2e4b5a6 on camera.front.face took 3 ms') == \
        'event 7f3a9c01d2e4b5a6 on camera.front.face took 3 ms'   # ordinary text stays


def test_private_payloads_are_replaced_and_others_masked():
    private = Event(type='speech.utterance', payload=PRIVATE_PAYLOAD, privacy=Privacy.PRIVATE,
                    metadata={'auth_token': 'abc', 'traceparent': '00-0af7-01'})
    view = mask_event(private)
    assert view['payload'] == f'<private: {len(PRIVATE_PAYLOAD)} bytes not logged>'
    assert view['metadata'] == {'auth_token': MASK, 'traceparent': '00-0af7-01'}
    public = Event(type='note', payload=f'mail {SECRETS["email"]}'.encode())
    assert mask_event(public)['payload'] == 'mail <email>'
    nested = mask_value({'request': {'headers': {'Authorization': 'x'}, 'body': [SECRETS['email']]}})
    assert nested == {'request': {'headers': {'Authorization': MASK}, 'body': ['<email>']}}


def _log_everything(log: NodeLog):
    event = Event(type='speech.utterance', payload=PRIVATE_PAYLOAD, privacy=Privacy.PRIVATE)
    log.info(f"cloud call for {SECRETS['email']} with {SECRETS['bearer']}",
             api_key=SECRETS['openai'], event=event, password=SECRETS['password'],
             detail={'github': SECRETS['github'], 'aws': SECRETS['aws']}, route='cloud')
    log.error(f"upload failed: token={SECRETS['openai']}")


def test_json_log_file_never_contains_a_secret(tmp_path):
    path = tmp_path / 'node.jsonl'
    log = NodeLog('masking_test_json', json_target=str(path), level='debug')
    _log_everything(log)
    for handler in logging.getLogger('loom.masking_test_json').handlers:
        handler.flush()
    text = path.read_text()
    assert _leaks(text) == []
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line['level'] for line in lines] == ['INFO', 'ERROR']
    first = lines[0]
    assert first['api_key'] == MASK and first['password'] == MASK and first['route'] == 'cloud'
    assert first['event']['payload'].startswith('<private:')
    assert first['node'] == 'masking_test_json' and first['ts'].endswith('+00:00')


def test_plain_logging_output_is_masked_by_the_filter():
    stream = io.StringIO()
    text_handler = logging.StreamHandler(stream)
    text_handler.addFilter(MaskingFilter())
    text_handler.setFormatter(logging.Formatter('%(levelname)s %(message)s'))
    json_stream = io.StringIO()
    json_handler = logging.StreamHandler(json_stream)
    json_handler.setFormatter(JsonFormatter(node='n'))
    logger = logging.getLogger('loom.masking_test_plain')
    logger.propagate = False
    logger.addHandler(text_handler)
    logger.addHandler(json_handler)
    logger.warning('login for %s with %s', SECRETS['email'], SECRETS['bearer'],
                   extra={'secret': SECRETS['password']})
    try:
        raise RuntimeError(f"cloud said no to {SECRETS['openai']}")
    except RuntimeError:
        logger.exception('request failed')
    for out in (stream.getvalue(), json_stream.getvalue()):
        assert _leaks(out) == [], out
    assert 'WARNING login for <email> with Bearer ***' in stream.getvalue()
    assert json.loads(json_stream.getvalue().splitlines()[0])['secret'] == MASK


def test_rclpy_logger_and_rosout_only_see_masked_text(ros):
    from rcl_interfaces.msg import Log
    seen: list[str] = []
    sub = ros.node.create_subscription(Log, '/rosout', lambda m: seen.append(m.msg), 100)
    try:
        log = NodeLog('loom_test', node=ros.node)
        marker = 'rosout-masking-check'
        ros.wait_for(lambda: ros.node.count_publishers('/rosout') > 0, '/rosout publisher')
        returned = log.warning(f"{marker} {SECRETS['email']} {SECRETS['bearer']}",
                               token=SECRETS['github'])
        assert _leaks(json.dumps(returned)) == []
        ros.wait_for(lambda: any(marker in m for m in seen), 'the log line on /rosout', limit=30)
        line = next(m for m in seen if marker in m)
        assert _leaks(line) == [] and '<email>' in line and MASK in line
    finally:
        ros.node.destroy_subscription(sub)


def test_a_nodes_own_log_calls_are_masked_and_structured(ros, tmp_path):
    """Once telemetry is attached, plain `node.get_logger().warning(...)` calls (what every node
    writes) are masked on /rosout and written as masked JSON lines; rclpy's per-call-site
    throttling still tells two call sites apart."""
    from rcl_interfaces.msg import Log
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from loom_ros.telemetry.node_telemetry import attach_telemetry
    path = tmp_path / 'node.jsonl'
    node = Node('masked_node', context=ros.node.context, parameter_overrides=[
        Parameter('telemetry.log.json', value=True), Parameter('telemetry.log.file', value=str(path)),
        Parameter('telemetry.metrics.period_s', value=0.0),
        Parameter('telemetry.diagnostics.period_s', value=0.0)])
    telemetry = attach_telemetry(node, 'event_monitor')
    seen: list[str] = []
    sub = ros.node.create_subscription(Log, '/rosout', lambda m: seen.append(m.msg), 100)
    try:
        ros.wait_for(lambda: ros.node.count_publishers('/rosout') > 0, '/rosout publisher')
        marker = 'own-log-masking-check'
        for _ in range(3):   # two call sites, each throttled: each logs once
            node.get_logger().warning(f"{marker} a {SECRETS['openai']}", throttle_duration_sec=60)
            node.get_logger().warning(f"{marker} b {SECRETS['email']}", throttle_duration_sec=60)
        ros.wait_for(lambda: sum(marker in m for m in seen) >= 2, 'both lines on /rosout', limit=30)
        lines = [m for m in seen if marker in m]
        assert len(lines) == 2 and all(_leaks(m) == [] for m in lines)
        records = [json.loads(line) for line in path.read_text().splitlines() if marker in line]
        assert len(records) == 2 and _leaks(path.read_text()) == []
        assert records[0]['level'] == 'WARN' and '<email>' in records[1]['msg']
    finally:
        ros.node.destroy_subscription(sub)
        telemetry.destroy()
        node.destroy_node()


def test_what_an_event_logs_follows_its_effective_privacy_keys_and_subject(tmp_path):
    """helper-76's cases: a Public field with 'loom.privacy: private' metadata is Private
    (bus/privacy.effective_privacy) so its payload is not logged; an e-mail as a metadata key
    is masked as one as a value is; the data subject's id is never logged."""
    path = tmp_path / 'privacy.jsonl'
    log = NodeLog('masking_test_privacy', json_target=str(path))
    stated = Event.with_json('speech.transcript', {'text': 'my PIN is 4711, I live at 5 Elm St'},
                             privacy=Privacy.PUBLIC, metadata={
                                 'loom.privacy': 'private', SECRETS['email']: 'seen',
                                 'loom.subject': 'face:1234'})
    view = log.info('handled', event=stated)['event']
    assert view['payload'] == f'<private: {len(stated.payload)} bytes not logged>'
    assert view['privacy'] == 'PUBLIC'   # the field as it was; the payload says why
    assert view['metadata'] == {'loom.privacy': 'private', '<email>': 'seen',
                                'loom.subject': SUBJECT_MASK}
    local = mask_event(Event(type='x', payload=b'secret plan', metadata={
        'privacy': 'LocalOnly', 'loom.subject': 'bob@example.com'}))
    assert local['payload'] == '<local_only: 11 bytes not logged>'
    assert local['metadata']['loom.subject'] == SUBJECT_MASK
    unreadable = mask_event(Event(type='x', payload=b'secret plan', metadata={
        'loom.privacy': 'whatever'}))   # a tier that cannot be read stays home: LocalOnly
    assert unreadable['payload'] == '<local_only: 11 bytes not logged>'
    public = mask_event(Event(type='x', payload=b'hello', metadata={
        'a@b.io': '1', 'c@d.io': '2', 'Bearer abcdefgh12': 'x'}))
    assert public['payload'] == 'hello'
    assert public['metadata'] == {'<email>': '1', '<email>#1': '2', 'Bearer ***': 'x'}
    for handler in logging.getLogger('loom.masking_test_privacy').handlers:
        handler.flush()
    text = path.read_text()
    assert '4711' not in text and SECRETS['email'] not in text and 'face:1234' not in text
