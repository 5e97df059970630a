"""Issue 13, fault 10 (at rest): secrets were stored in clear in audit.db, agents' episodes and
`loom record` MCAP files. Each path gets secret-looking text (a sensitive key=value, a bearer
token, a field named like a secret); the raw bytes of what it wrote must not hold the secrets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcap.reader import make_reader
from rclpy.serialization import serialize_message

from loom_ros.agents.config import AgentConfig
from loom_ros.agents.runtime import Agent
from loom_ros.bus.event import Event
from loom_ros.cli.record import McapRecorder
from loom_ros.security.audit import AuditLog
from loom_ros.storage.storage import Storage, StorageConfig

SECRET_TEXT = 'login with password=Hunter2Secret, header Authorization: Bearer tok3nABCDEF123456'
SECRETS = [b'Hunter2Secret', b'tok3nABCDEF123456', b'Sess1onValue77']


def raw_bytes(db: Path) -> bytes:
    """The database file and whatever its WAL still holds."""
    return b''.join(p.read_bytes() for p in db.parent.glob(f'{db.name}*'))


def assert_no_secret(data: bytes, where: str) -> None:
    leaked = [s for s in SECRETS if s in data]
    assert not leaked, f'{where} holds {leaked}'


def test_audit_records_are_masked_before_they_are_stored(tmp_path):
    path = tmp_path / 'audit.db'
    log = AuditLog(path)
    log.append('tts', 'tts_say', text=SECRET_TEXT, session='Sess1onValue77',
               nested={'cmd': [SECRET_TEXT]}, long='x' * 100_000 + SECRET_TEXT)
    log({'plugin': 'arm', 'kind': 'capability_denied', 'detail': SECRET_TEXT})
    (say, denied) = log.query()
    assert say['fields']['session'] == '***' and 'password=***' in say['fields']['text']
    assert len(say['fields']['long']) <= 2000 and '***' in denied['fields']['detail']
    log.close()
    assert_no_secret(raw_bytes(path), 'audit.db')


def test_episodes_are_masked_before_they_are_stored(tmp_path):
    storage = Storage(StorageConfig(str(tmp_path), unit='host'))   # the agent host's database
    agent = Agent(AgentConfig(id='face', behavior='counter', subscriptions=['t']),
                  storage, lambda *args: None)
    agent.configure()
    agent.activate()
    agent.offer(Event.with_json('speech.utterance', {'text': SECRET_TEXT,
                                                     'api_key': 'Sess1onValue77'},
                                id='e1', tags=['token=Sess1onValue77']))
    agent.handle_one()
    agent.settle()   # committed
    (episode,) = agent.recall('episodic')
    assert 'password=***' in episode['payload'] and episode['tags'] == ['token=***']
    agent.cleanup()
    storage.close()
    stored = raw_bytes(tmp_path / 'db' / 'host.db')
    assert b'password=***' in stored   # the episode is there, masked
    assert_no_secret(stored, 'host.db')


def loom_event(msg_cls, kv_cls, id: str, payload: bytes):
    return msg_cls(id=id, type='agent.voice.intent', source='voice', payload=list(payload),
                   tags=[SECRET_TEXT], metadata=[kv_cls(key='session_id', value='Sess1onValue77'),
                                                 kv_cls(key='note', value=SECRET_TEXT)])


def test_mcap_recordings_are_masked_before_they_are_written(tmp_path):
    from loom_msgs.msg import Event as EventMsg, EventBatch, KeyValue
    from std_msgs.msg import String
    path = tmp_path / 'rec.mcap'
    recorder = McapRecorder(path)
    topics = {'loom/agent/voice/intent': 'loom_msgs/msg/Event',
              'loom/batch': 'loom_msgs/msg/EventBatch', 'chatter': 'std_msgs/msg/String'}
    for topic, full_type in topics.items():
        recorder.add_topic(topic, full_type)
    text = json.dumps({'intent': 'login', 'text': SECRET_TEXT}).encode()
    binary = bytes(range(256)) * 4   # e.g. audio: stored as it came
    recorder.write('loom/agent/voice/intent', serialize_message(
        loom_event(EventMsg, KeyValue, 'e1', text)))
    recorder.write('loom/batch', serialize_message(EventBatch(events=[
        loom_event(EventMsg, KeyValue, 'e2', binary),
        loom_event(EventMsg, KeyValue, 'e3', text + b' ' * 70_000)])))
    recorder.write('chatter', serialize_message(String(data=SECRET_TEXT)))
    recorder.write('chatter', b'\x00\x01 not CDR')
    recorder.close()
    assert recorder.counts == {'loom/agent/voice/intent': 1, 'loom/batch': 1, 'chatter': 1}
    assert recorder.unreadable == {'chatter': 1} and recorder.cut() == 1
    assert_no_secret(path.read_bytes(), 'the MCAP file')
    with open(path, 'rb') as stream:   # chunks are compressed: look at every message too
        messages = [(channel.topic, message.data)
                    for _, channel, message in make_reader(stream).iter_messages()]
    assert len(messages) == 3
    for topic, data in messages:
        assert_no_secret(data, topic)
    assert bytes(binary) in messages[1][1]
