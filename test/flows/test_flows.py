"""The seed's two flows end to end, through `loom bringup` (robot nodes in one process, a Zenoh
router and the cloud tier beside it) and `loom record`, on the simulated sensors: the astronaut
photo yields the happy emoji on loom/ui/state; the weather question yields the weather intent
and a non-silent spoken WAV; every hop leaves its span in one trace; the MCAP file reads back."""
from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import pytest
import yaml

from harness import REPO, loom_cli


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _params(tmp: Path) -> Path:
    data = yaml.safe_load((REPO / 'config' / 'loom.yaml').read_text())

    def section(name):   # sections are keyed /**/<node> (any namespace)
        key = name if name == '/**' else f'/**/{name}'
        return data.setdefault(key, {}).setdefault('ros__parameters', {})
    section('/**').setdefault('storage', {})['root'] = str(tmp)   # every path derives from it
    section('/**')['telemetry']['tracing'].update(exporter='file', file=str(tmp / 'trace.jsonl'))
    section('sim_sensors').update(imu_rate_hz=50.0, camera_rate_hz=5.0,
                                  camera_scenes=['astronaut', 'empty'], camera_scene_s=1.0,
                                  mic_gap_s=1.0,
                                  mic_utterances=['what is the weather in london'])
    path = tmp / 'params.yaml'
    path.write_text(yaml.safe_dump(data))
    # A cloud budget far above any answer time: the test checks the route, not the speed.
    agents = yaml.safe_load((REPO / 'config' / 'agents.yaml').read_text())
    for entry in agents['agents']:
        if entry['id'] == 'voice':
            entry['settings']['cloud_budget_ms'] = 30000
    (tmp / 'agents.yaml').write_text(yaml.safe_dump(agents))
    return path


@pytest.fixture(scope='module')
def system(ros, tmp_path_factory):
    """One bring-up for the module: what it showed on the UI and said, then its files."""
    import subprocess
    import sys

    from std_msgs.msg import String

    from loom_ros.bus.bus import create_bus
    from loom_ros.bus.qos import to_qos_profile
    tmp = tmp_path_factory.mktemp('flows')
    params = _params(tmp)
    procs = [subprocess.Popen([sys.executable, *loom_cli(
        'bringup', '--config', str(params), '--zenoh-port', str(_free_port()),
        '--agents-file', str(tmp / 'agents.yaml'), '--keys-dir', str(tmp / 'keys'),
        '--log-dir', str(tmp))], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True),
        subprocess.Popen([sys.executable, *loom_cli('record', '--output', str(tmp / 'rec.mcap'))],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    seen = {'ui': [], 'intents': []}
    sub = ros.node.create_subscription(String, 'loom/ui/state',
                                       lambda m: seen['ui'].append(json.loads(m.data)),
                                       to_qos_profile('batched'))
    bus = create_bus(ros.node, 'loom_test')
    bus.subscribe('agent.voice.intent', lambda e, _t: seen['intents'].append(e))

    class Alive:   # what RosHarness.wait_for checks
        def __init__(self, popen):
            self.popen, self.args = popen, popen.args

        def finish(self):
            out = self.popen.communicate(timeout=30)[0]
            return self.popen.returncode, out, ''
    try:
        def answered_on_ui():
            """The spoken answer's intent, and the same text on the UI (two topics: either
            may arrive first)."""
            spoken = [e.json()['text'] for e in seen['intents'] if e.type == 'answer.spoken']
            return bool(spoken) and any(s.get('text') == spoken[0] for s in seen['ui'])
        def no_face_after_a_face():
            labels = [s.get('label') for s in seen['ui']]
            return 'happy' in labels and 'no face' in labels[labels.index('happy'):]
        ros.wait_for(lambda: no_face_after_a_face() and answered_on_ui(),
                     'a happy emoji, then no face, and the spoken answer on the UI',
                     limit=90, alive=[Alive(p) for p in procs])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        outputs = [proc.communicate(timeout=60)[0] for proc in procs]
        ros.node.destroy_subscription(sub)
        bus.destroy()
    return {'tmp': tmp, 'ui': seen['ui'], 'intents': seen['intents'],
            'codes': [p.returncode for p in procs], 'outputs': outputs}


def test_the_astronaut_photo_yields_the_happy_emoji_decided_local(system):
    face = [s for s in system['ui'] if s.get('label') == 'happy']
    assert face[0]['emoji'] == '😀'
    assert face[0]['route'] == 'local' and face[0]['rule'] == 'threshold'
    assert 'threshold' in face[0]['reason']
    assert system['codes'] == [0, 0], system['outputs']


def test_no_face_clears_what_the_last_face_showed(system):
    # Issue 15, fault 6: the ui merges partial updates, so "no face" kept the previous face's
    # confidence, route and reason.
    states = system['ui']
    labels = [s.get('label') for s in states]
    after = states[labels.index('happy'):]
    empty = next(s for s in after if s.get('label') == 'no face')
    assert empty.get('emoji') is None and empty.get('faces') == 0
    for stale in ('confidence', 'route', 'rule', 'reason'):
        assert stale not in empty, empty


def test_the_weather_question_yields_the_weather_intent_and_a_spoken_wav(system):
    from loom_ros.plugins.speech.audio import dbfs, read_wav
    weather = [e.json() for e in system['intents'] if e.type == 'weather']
    assert weather and weather[0]['slots'] == {'city': 'london'}
    assert weather[0]['route'] == 'hybrid'            # local now, refined in the cloud
    assert weather[0]['backend'] == 'cloud', weather[0]
    spoken = [e.json() for e in system['intents'] if e.type == 'answer.spoken'][0]
    assert spoken['text'].startswith('London:')
    samples, rate = read_wav(spoken['path'])
    assert samples.size / rate > 1.0 and dbfs(samples) > -40.0   # speech, not silence
    # The UI showed the transcript first (immediate feedback), then the answer.
    texts = [s.get('text') for s in system['ui'] if s.get('text')]
    assert 'heard: what is the weather in london' in texts
    assert texts.index('heard: what is the weather in london') < texts.index(spoken['text'])


def _chain(by_id: dict, leaf: dict) -> list[str]:
    names, span = [], leaf
    while span is not None:
        names.append(span['name'] + (f":{span['attributes']['loom.topic']}"
                                     if 'loom.topic' in span['attributes'] else ''))
        span = by_id.get(span['parent_span_id'])
    return names[::-1]


def test_every_hop_leaves_its_span_in_one_trace(system):
    from loom_ros.telemetry.tracing import read_spans
    spans = read_spans(str(system['tmp'] / 'trace.jsonl'))
    ui = [s for s in spans if s['name'] == 'HandleEvent' and
          s['attributes'].get('loom.topic') == 'agent.face.action']
    by_id = {s['span_id']: s for s in spans}
    chains = [(_chain(by_id, s), s['trace_id']) for s in ui]
    # camera frame event > agent > plugins > router > ui_update published > ui plugin handles it
    full = [(c, t) for c, t in chains if c[0] == 'PublishEvent:camera.front']
    assert full, chains[:3]
    chain = full[0][0]
    assert 'FaceAgent' in chain and chain[-1] == 'HandleEvent:agent.face.action'
    assert chain.index('FaceAgent') < chain.index('PublishEvent:agent.face.action')
    names = {}
    for s in spans:
        names.setdefault(s['trace_id'], set()).add(s['name'])
    # Every frame runs the model; a frame with a face is routed too ("no face" frames are not).
    assert all('LocalInference' in names[t] for _, t in full)
    assert any({'LocalInference', 'RouteDecision'} <= names[t] for _, t in full)
    # Flow 2: audio > asr > voice agent > router > cloud > tool > speech, one trace.
    speak = [s for s in spans if s['name'] == 'SpeakAnswer'][0]
    voice = {s['name'] for s in spans if s['trace_id'] == speak['trace_id']}
    assert {'PublishEvent', 'HandleEvent', 'VoiceAgent', 'RouteDecision', 'CloudRequest',
            'ToolCall', 'SpeakAnswer'} <= voice
    assert _chain(by_id, speak)[0] == 'PublishEvent:mic.primary'


def test_the_mcap_recording_reads_back_with_the_mcap_library(system):
    from mcap.reader import make_reader
    from rclpy.serialization import deserialize_message

    from loom_ros.cli.record import message_class
    counts, ui = {}, []
    with open(system['tmp'] / 'rec.mcap', 'rb') as stream:
        reader = make_reader(stream)
        for schema, channel, message in reader.iter_messages():
            assert schema.encoding == 'ros2msg' and channel.message_encoding == 'cdr'
            msg = deserialize_message(message.data, message_class(schema.name))
            counts[channel.topic] = counts.get(channel.topic, 0) + 1
            if channel.topic.endswith('loom/ui/state'):
                ui.append(json.loads(msg.data))
    assert any(s.get('label') == 'happy' for s in ui)
    assert {'/loom/ui/markers', '/router/decisions', '/imu/data'} <= set(counts), counts
