"""What `loom record` keeps for a replay, and what it lets the privacy hook take out: camera frames
and mic audio byte for byte (even a frame whose bytes happen to be valid UTF-8 and longer than
the masked-text limit), text payloads still masked; the hook's STRIP empties a payload and marks
it, a hook that raises strips, and the default keeps every tier (the recorder is local)."""
from __future__ import annotations

import json

import numpy as np
from mcap.reader import make_reader
from rclpy.serialization import deserialize_message, serialize_message

from loom_ros.bus import topics
from loom_ros.bus.names import to_ros_topic
from loom_ros.cli.record import (
    CAMERA_TOPICS, DEFAULT_TOPICS, KEEP, MAX_MASKED_PAYLOAD, STRIP, STRIPPED_KEY, McapRecorder,
)

SECRET = 'call me with password=Hunter2Secret'


def _event(id, payload: bytes, privacy=0, **metadata):
    from loom_msgs.msg import Event, KeyValue
    return Event(id=id, type='t', payload=payload, privacy=privacy,
                 metadata=[KeyValue(key=k, value=v) for k, v in metadata.items()])


def _read(path):
    from loom_msgs.msg import Event
    with open(path, 'rb') as stream:
        return [deserialize_message(m.data, Event)
                for _, _, m in make_reader(stream).iter_messages()]


def test_the_default_topics_hold_what_a_replay_needs():
    for topic in (topics.ROUTER_DECISIONS, topics.ROUTER_OUTCOMES, 'loom/mic/primary',
                  to_ros_topic(topics.MIC_PRIMARY_SPEECH)):
        assert topic in DEFAULT_TOPICS
    assert to_ros_topic(topics.CAMERA_FRONT) in CAMERA_TOPICS   # --camera: large, opt-in


def test_frames_and_audio_are_kept_byte_for_byte_and_text_is_still_masked(tmp_path):
    # A dark frame: every byte < 0x80, so it decodes as UTF-8; larger than the text limit.
    frame = (np.arange(256 * 400 * 3) % 100).astype(np.uint8).tobytes()
    assert len(frame) > MAX_MASKED_PAYLOAD
    frame.decode()
    audio = np.zeros(1600, dtype='<i2').tobytes()
    recorder = McapRecorder(tmp_path / 'rec.mcap')
    recorder.add_topic('/loom/camera/front', 'loom_msgs/msg/Event')
    for id, payload, metadata in (('f', frame, {'encoding': 'rgb8', 'width': '256'}),
                                  ('a', audio, {'encoding': 's16le'}),
                                  ('t', json.dumps({'text': SECRET}).encode(), {}),
                                  ('x', SECRET.encode(), {'encoding': 'not-a-media-type'})):
        recorder.write('/loom/camera/front', serialize_message(_event(id, payload, **metadata)))
    recorder.close()
    kept = {e.id: bytes(e.payload) for e in _read(tmp_path / 'rec.mcap')}
    assert kept['f'] == frame and kept['a'] == audio and recorder.cut() == 0
    assert b'Hunter2Secret' not in kept['t'] and b'password=***' in kept['t']
    assert b'Hunter2Secret' not in kept['x']   # only known media encodings skip masking


def test_the_privacy_hook_strips_what_it_refuses_and_a_failing_hook_strips(tmp_path):
    from loom_msgs.msg import EventBatch
    seen = []

    def hook(event):
        seen.append((event.id, event.privacy))
        if event.id == 'boom':
            raise RuntimeError('consent registry down')
        return STRIP if event.privacy >= 2 else KEEP
    recorder = McapRecorder(tmp_path / 'rec.mcap', privacy=hook)
    recorder.add_topic('/e', 'loom_msgs/msg/Event')
    recorder.add_topic('/b', 'loom_msgs/msg/EventBatch')
    recorder.write('/e', serialize_message(_event('pub', b'public words', 0)))
    recorder.write('/e', serialize_message(_event('priv', b'private words', 2)))
    recorder.write('/b', serialize_message(EventBatch(events=[
        _event('local', b'local only', 3), _event('boom', b'when the hook fails', 0)])))
    recorder.close()
    assert seen == [('pub', 0), ('priv', 2), ('local', 3), ('boom', 0)]
    assert recorder.stripped() == 3
    with open(tmp_path / 'rec.mcap', 'rb') as stream:
        events = {}
        for _, channel, m in make_reader(stream).iter_messages():
            msg = deserialize_message(m.data, EventBatch if channel.topic == '/b' else
                                      type(_event('', b'')))
            for e in (msg.events if channel.topic == '/b' else [msg]):
                events[e.id] = e
    assert bytes(events['pub'].payload) == b'public words'
    for id in ('priv', 'local', 'boom'):
        assert bytes(events[id].payload) == b''
        assert {kv.key: kv.value for kv in events[id].metadata}[STRIPPED_KEY] == 'privacy'


def test_by_default_every_tier_is_kept_on_the_local_disk(tmp_path):
    recorder = McapRecorder(tmp_path / 'rec.mcap')
    recorder.add_topic('/e', 'loom_msgs/msg/Event')
    for privacy in range(4):
        recorder.write('/e', serialize_message(_event(f'p{privacy}', b'words', privacy)))
    recorder.close()
    assert recorder.stripped() == 0
    assert [bytes(e.payload) for e in _read(tmp_path / 'rec.mcap')] == [b'words'] * 4
