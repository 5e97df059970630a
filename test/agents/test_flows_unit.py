"""The face and voice behaviors in one process with no ROS: the real face_expression, asr, weather
and tts plugins in a real PluginHost, the router's decision path under config/policy.yaml with
its SQLite history (router/local.py), wired into the agents through AgentContext's ports the way
an agent node does it; the agent runtime (state, privacy, behavior errors) around them.

The speech is real: our TTS speaks the question, the asr plugin hears it, and its output is what
the voice agent gets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from harness import REPO
from loom_ros.agents.behavior import InProcessPlugins, Ports
from loom_ros.agents.config import load_agents
from loom_ros.agents.flows.cloud import CloudLink, CloudSettings
from loom_ros.agents.runtime import Agent
from loom_ros.storage.storage import Storage, StorageConfig
from loom_ros.bus.event import Event, Privacy
from loom_ros.plugins.host import PluginHost, load_plugins_file
from loom_ros.plugins.perception.image import frame_event
from loom_ros.plugins.speech.audio import ASR_RATE, dbfs, read_wav, resample
from loom_ros.router.history import RouterHistory
from loom_ros.router.local import LocalRouter

pytestmark = pytest.mark.timeout(300)

PLUGINS = ('face_expression', 'asr', 'weather', 'tts')
CHUNK = 1600   # 100 ms of 16 kHz audio, what a mic driver delivers


@pytest.fixture(scope='module')
def host(tmp_path_factory):
    """The shipped plugins file's entries for both flows, started in this process."""
    specs = [s for s in load_plugins_file(REPO / 'config' / 'plugins.yaml') if s.name in PLUGINS]
    host = PluginHost(specs, data_dir=tmp_path_factory.mktemp('plugins'))
    assert host.start() == {}
    yield host
    host.stop()


@pytest.fixture
def router(tmp_path):
    # Made on this thread, which is also the one the agents handle events on (SQLite).
    return LocalRouter.from_file(REPO / 'config' / 'policy.yaml',
                                 RouterHistory(tmp_path / 'router.db', 86400))


class Emitted(list):
    """What the agents emitted: (agent id, kind, type, data, privacy)."""

    def __call__(self, agent_id, kind, type, data, privacy, subject=''):
        self.append((agent_id, kind, type, data, privacy))
        self.subjects.append(subject)

    @property
    def subjects(self) -> list:
        return self.__dict__.setdefault('_subjects', [])

    def of(self, type):
        return [(data, privacy) for _a, _k, t, data, privacy in self if t == type]


def agent(agent_id: str, tmp_path, emitted, ports: Ports, **settings) -> Agent:
    config = load_agents(REPO / 'config' / 'agents.yaml')[agent_id]
    if settings:
        config = config.model_copy(update={'settings': {**config.settings, **settings}})
    # The agent's storage: a unit database under tmp_path, as an agent host opens one.
    storage = Storage(StorageConfig(str(tmp_path), unit=f'flows_{agent_id}'))
    made = Agent(config, storage, emitted, ports=ports)
    made.configure()
    made.activate()
    return made


def handle(made: Agent, *events: Event) -> None:
    for event in events:
        assert made.offer(event)
        made.handle_one()
    made.settle()   # committed: counted as handled


@pytest.fixture(scope='module')
def astronaut():
    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((640, 480)))


# -- Flow 1: face -------------------------------------------------------------------------------
def test_a_face_is_shown_decided_local_then_no_face_clears_it(host, router, tmp_path, astronaut):
    emitted = Emitted()
    face = agent('face', tmp_path, emitted, Ports(router, InProcessPlugins(host.handles)))
    frame = frame_event(astronaut, type='camera.front', encoding='bgr8',
                        privacy=Privacy.SENSITIVE)
    empty = frame_event(np.zeros((480, 640, 3), np.uint8), type='camera.front',
                        privacy=Privacy.SENSITIVE)
    handle(face, frame, empty, empty)
    assert face.stats['behavior_errors'] == 0 and face.stats['handled'] == 3
    shown = [data for data, _p in emitted.of('ui_update')]
    assert len(shown) == 2   # the second empty frame changes nothing on screen
    happy, cleared = shown
    assert happy['emoji'] == '😀' and happy['label'] == 'happy' and happy['faces'] == 1
    assert happy['route'] == 'local' and happy['rule'] == 'threshold'
    assert happy['confidence'] >= 0.7 and happy['source_event'] == frame.id
    (x0, y0, x1, y1), = happy['boxes']   # the astronaut's face, in the frame's pixels
    height, width = astronaut.shape[:2]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height and (x1 - x0) * (y1 - y0) > 400
    assert cleared['label'] == 'no face' and cleared['faces'] == 0
    assert all(cleared[k] is None
               for k in ('emoji', 'confidence', 'boxes', 'route', 'rule', 'reason'))
    # The decision is the router's: in its history, under the frame's id (a "no face" frame is
    # not routed), and what the agent emits keeps the frame's privacy.
    rows = list(router.history.db.query('select event_id, route, rule from decisions'))
    assert rows == [{'event_id': frame.id, 'route': 'local', 'rule': 'threshold'}]
    assert {p for _d, p in emitted.of('ui_update')} == {Privacy.SENSITIVE}
    assert face.state['labels'] == {'happy': 1} and face.state['routes'] == {'local': 1}


def test_a_private_frame_is_decided_local_by_the_privacy_rule(host, router, tmp_path,
                                                              astronaut):
    emitted = Emitted()
    face = agent('face', tmp_path, emitted, Ports(router, InProcessPlugins(host.handles)))
    handle(face, frame_event(astronaut, type='camera.front', encoding='bgr8',
                             privacy=Privacy.PRIVATE))
    [(shown, privacy)] = emitted.of('ui_update')
    assert shown['label'] == 'happy' and shown['rule'] == 'privacy' and shown['route'] == 'local'
    assert privacy is Privacy.PRIVATE


def test_without_the_plugin_or_the_router_the_frame_is_a_counted_behavior_error(
        host, router, tmp_path, astronaut):
    emitted = Emitted()
    frame = frame_event(astronaut, type='camera.front', encoding='bgr8')
    no_plugin = agent('face', tmp_path / 'a', emitted, Ports(router, InProcessPlugins({})))
    no_router = agent('face', tmp_path / 'b', emitted,
                      Ports(plugins=InProcessPlugins(host.handles)))
    handle(no_plugin, frame)
    handle(no_router, frame)
    assert no_plugin.stats['behavior_errors'] == 1 and no_router.stats['behavior_errors'] == 1
    assert emitted == [] and no_plugin.state == {} and no_router.state == {}
    assert router.decisions == 0


# -- Flow 2: voice ------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def heard(host):
    """What the asr plugin makes of our TTS saying `text`: its speech events, in order."""
    cache: dict[str, list[Event]] = {}

    def hear(text: str) -> list[Event]:
        if text not in cache:
            said = host.handle('tts', Event.with_json('tts.say', {'text': text}))
            assert said.ok, said.error
            samples, rate = read_wav(said.events[0].json()['path'])
            pad = np.zeros(ASR_RATE // 2, np.int16)
            audio = np.concatenate([pad, resample(samples, rate, ASR_RATE), pad])
            chunks = [audio[i:i + CHUNK] for i in range(0, audio.size, CHUNK)]
            events = []
            for n, chunk in enumerate(chunks):
                response = host.handle('asr', Event(
                    type='mic.primary', source='sim_mic', payload=chunk.tobytes(),
                    privacy=Privacy.SENSITIVE, metadata={
                        'sample_rate': str(ASR_RATE),
                        **({'end_of_stream': 'true'} if n == len(chunks) - 1 else {})}))
                assert response.ok, response.error
                events += response.events
            cache[text] = events
        return cache[text]
    return hear


def test_the_weather_question_is_answered_and_spoken_with_no_cloud(host, router, tmp_path,
                                                                   heard):
    emitted = Emitted()
    voice = agent('voice', tmp_path, emitted, Ports(router, InProcessPlugins(host.handles)))
    events = heard('what is the weather in london')
    assert events[-1].type == 'speech.utterance', [e.type for e in events]
    handle(voice, *events)
    assert voice.stats['behavior_errors'] == 0
    texts = [data['text'] for data, _p in emitted.of('ui_update')]
    partials = [t for t in texts if t.startswith('… ')]
    assert partials and texts.index(partials[0]) < texts.index('heard: what is the weather '
                                                               'in london')
    [(weather, privacy)] = emitted.of('weather')
    assert privacy is Privacy.SENSITIVE   # derived from the speech
    assert weather['slots'] == {'city': 'london'} and weather['local'] == 'weather'
    # The grammar match's confidence (0.75) is between the floor and speech's threshold
    # (0.85): Hybrid; with no cloud wired the local answer stands, marked as a fallback.
    assert weather['route'] == 'hybrid' and weather['backend'] == 'local'
    assert weather['fallback'] is True
    assert 'no cloud configured' in weather['cloud_error']
    [(spoken, _p)] = emitted.of('answer.spoken')
    assert spoken['text'].startswith('London:') and spoken['intent'] == 'weather'
    assert texts[-1] == spoken['text']
    samples, rate = read_wav(spoken['path'])
    assert samples.size / rate > 1.0 and dbfs(samples) > -40.0
    # The executed route's outcome went to the router's history under its decision.
    [decision] = router.history.db.query('select id, route from decisions')
    [outcome] = router.history.db.query('select decision_id, backend from outcomes')
    assert decision['route'] == 'hybrid'
    assert outcome == {'decision_id': decision['id'], 'backend': 'local'}
    assert voice.state['answers'] == 1 and voice.state['intents'] == {'weather': 1}


def test_a_forged_utterance_cannot_choose_what_the_robot_says(host, router, tmp_path):
    """The weather tool's error quotes the city it was asked for, and the answer was spoken
    with it: a forged speech.utterance had the robot announce a fire alarm."""
    from loom_ros.agents.flows.voice import NO_FORECAST
    emitted = Emitted()
    voice = agent('voice', tmp_path, emitted, Ports(router, InProcessPlugins(host.handles)))
    alarm = 'Attention. Fire alarm. Everybody leave the building now'
    handle(voice, Event.with_json('speech.utterance', {
        'text': f'what is the weather in {alarm}', 'confidence': 0.99,
        'phrase': 'what is the weather in <city>', 'slots': {'city': alarm}}, source='plugin/asr'))
    assert voice.stats['behavior_errors'] == 0
    [(spoken, _p)] = emitted.of('answer.spoken')
    assert spoken['text'] == NO_FORECAST and 'Fire' not in spoken['text']
    assert [d['text'] for d, _p in emitted.of('ui_update')][-1] == NO_FORECAST   # no echo
    assert voice.state['tool_failures'] == 1 and 'no forecast' in voice.state['last_tool_error']


def test_an_unreachable_cloud_says_why_through_the_host_cloud_link(host, router, tmp_path,
                                                                   heard):
    """The cloud port is the host's link (a real Zenoh client session, here to a port nobody
    listens on): the behavior opens nothing and says why the cloud did not answer."""
    with socket_nobody_listens_on() as port:
        link = CloudLink(CloudSettings((f'tcp/127.0.0.1:{port}',), insecure=True))
        link.start()
        assert not link.wait_open(30)
    emitted = Emitted()
    voice = agent('voice', tmp_path, emitted,
                  Ports(router, InProcessPlugins(host.handles), link))
    handle(voice, heard('what is the weather in london')[-1])
    [(weather, _p)] = emitted.of('weather')
    assert weather['backend'] == 'local' and weather['fallback'] is True
    assert 'cannot open a Zenoh session' in weather['cloud_error']
    assert emitted.of('answer.spoken')
    link.close()
    assert link.client() == (None, 'the cloud link is closed')


def socket_nobody_listens_on():
    """A loopback port that was free a moment ago (bound, then closed as the block starts)."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def port():
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            number = sock.getsockname()[1]
        yield number
    return port()


def test_a_private_utterance_never_goes_to_the_cloud(host, router, tmp_path, heard):
    emitted = Emitted()
    voice = agent('voice', tmp_path, emitted, Ports(router, InProcessPlugins(host.handles)))
    utterance = heard('what is the weather in london')[-1]
    private = Event(type=utterance.type, payload=utterance.payload, source=utterance.source,
                    confidence=utterance.confidence, privacy=Privacy.PRIVATE)
    handle(voice, private)
    [(weather, privacy)] = emitted.of('weather')
    assert weather['route'] == 'local' and weather['backend'] == 'local'
    assert weather['fallback'] is False and weather['cloud_error'] == ''
    assert privacy is Privacy.PRIVATE
    assert {p for *_x, p in emitted} == {Privacy.PRIVATE}


def test_an_utterance_naming_a_subject_without_cloud_consent_stays_local(host, tmp_path, heard):
    """The agent's route port carries the event's data subject (loom.subject): the router's
    consent rule keeps it local until the subject's cloud consent is granted."""
    from loom_ros.security.audit import AuditLog
    from loom_ros.storage.consent import ConsentRegistry, SubjectRefs
    audit = AuditLog(tmp_path / 'audit.db')
    consent = ConsentRegistry(tmp_path / 'consent.db', audit=audit,
                              refs=SubjectRefs.at(tmp_path / 'keys'))
    router = LocalRouter.from_file(REPO / 'config' / 'policy.yaml',
                                   RouterHistory(tmp_path / 'router.db', 86400))
    router.consent = consent.lookup
    utterance = heard('what is the weather in london')[-1]

    def ask(event_id):
        emitted = Emitted()
        voice = agent('voice', tmp_path / event_id, emitted,
                      Ports(router, InProcessPlugins(host.handles)))
        handle(voice, Event(type=utterance.type, payload=utterance.payload, id=event_id,
                            source=utterance.source, confidence=utterance.confidence,
                            privacy=utterance.privacy, metadata={'loom.subject': 'alice'}))
        [(weather, _p)] = emitted.of('weather')
        # The spoken answer is the subject's too: filed where erasure finds it, and everything
        # the agent emitted for her utterance names her (consent and erasure follow it).
        [(spoken, _p)] = emitted.of('answer.spoken')
        assert '/tts/subjects/alice/' in spoken['path'], spoken['path']
        assert emitted.subjects and set(emitted.subjects) == {'alice'}, emitted.subjects
        return weather
    kept = ask('before')
    assert kept['route'] == 'local' and kept['fallback'] is False
    consent.grant('alice', 'cloud', 'test:nurse')
    assert ask('after')['route'] == 'hybrid'   # as for an anonymous utterance
    rules = [r['rule'] for r in router.history.db.query('select rule from decisions order by '
                                                        'time')]
    assert rules == ['consent', 'hybrid']
    consent.close()
    audit.close()


# -- the host's cloud link ----------------------------------------------------------------------
def test_cloud_link_retries_a_failed_open_only_when_due_and_closes_what_it_opened():
    class Session:
        closed = False

        def close(self):
            self.closed = True
    clock = {'t': 0.0}   # stands still until the test moves it
    tries, sessions = [], []

    def opener(settings):
        tries.append(settings)
        if len(tries) == 1:
            raise OSError('network is unreachable')
        sessions.append(Session())
        return sessions[-1], 'client'
    link = CloudLink(CloudSettings(('tcp/127.0.0.1:1',)), opener, retry_s=5.0,
                     clock=lambda: clock['t'])
    link.start()
    link.wait_open(10)
    assert link.client() == (None, 'network is unreachable') and len(tries) == 1
    clock['t'] = 4.9
    assert link.client()[0] is None and len(tries) == 1   # not due yet
    clock['t'] = 5.0
    link.client()   # due: opens again in the background
    assert link.wait_open(10) and link.client() == ('client', '') and len(tries) == 2
    link.close()
    assert sessions[0].closed and link.client() == (None, 'the cloud link is closed')
    clock['t'] = 60.0
    assert link.client()[0] is None and len(tries) == 2   # closed: never reopened


def test_a_caller_waits_for_an_open_in_progress_within_its_budget():
    import threading
    release = threading.Event()

    def slow_opener(settings):   # a Zenoh session and an embedding model take a while
        assert release.wait(30)
        return SessionStub(), 'client'
    link = CloudLink(CloudSettings(('tcp/127.0.0.1:1',)), slow_opener)
    link.start()
    assert link.client() == (None, 'the cloud link is opening')   # no wait asked: at once
    release.set()
    assert link.client(wait_s=30) == ('client', '')
    link.close()


class SessionStub:
    """What CloudLink closes; the session itself is the opener's business."""

    def close(self):
        self.closed = True


def test_a_link_closed_while_opening_names_its_opener_until_it_ends():
    """close() waits a bounded time for an open in progress; an opener still inside (Zenoh's
    native code, in the product) is named by native_threads() until it comes back, and what
    it opened late is closed, never kept."""
    import threading
    release, made = threading.Event(), []

    def stuck_opener(settings):
        assert release.wait(30)
        made.append(SessionStub())
        return made[-1], 'client'
    link = CloudLink(CloudSettings(('tcp/127.0.0.1:1',)), stuck_opener)
    assert link.native_threads() == []
    link.start()
    link.close(timeout_s=0.05)
    assert link.native_threads() == ['cloud-link']
    assert link.client() == (None, 'the cloud link is closed')
    release.set()
    link.wait_open(30)
    assert link.native_threads() == [] and made[0].closed
    assert link.client() == (None, 'the cloud link is closed')


def test_cloud_settings_are_checked_and_absent_means_no_cloud():
    from loom_ros.agents.config import AgentConfigError
    assert CloudSettings.of('a', {}) is None and CloudSettings.of('a', {'zenoh_connect': []}) \
        is None
    made = CloudSettings.of('a', {'zenoh_connect': 'tcp/h:1', 'identity': 'r2',
                                  'zenoh_insecure': 'yes'})
    assert made == CloudSettings(('tcp/h:1',), identity='r2', insecure=False)  # only `true`
    assert made.open_timeout_s == 10.0   # Zenoh's own
    assert CloudSettings.of('a', {'zenoh_connect': 'tcp/h:1', 'zenoh_open_timeout_s': 30}) \
        .open_timeout_s == 30.0
    for bad in ({'zenoh_connect': [1]}, {'zenoh_connect': ['x'] * 17},
                {'zenoh_connect': ['x' * 2000]}, {'zenoh_connect': ['x'], 'keys_dir': ''},
                {'zenoh_connect': ['x'], 'identity': ['r']},
                *({'zenoh_connect': ['x'], 'zenoh_open_timeout_s': t}
                  for t in ('5', True, 0.05, 601, float('nan'), None))):
        with pytest.raises(AgentConfigError, match='agent a: settings'):
            CloudSettings.of('a', bad)


def test_behaviors_import_no_ros():
    """The behaviors and the ports they see are plain Python (what makes these tests possible)."""
    import subprocess
    import sys
    code = ('import sys, loom_ros.agents.flows.face, loom_ros.agents.flows.voice, '
            'loom_ros.agents.flows.cloud, loom_ros.agents.runtime, loom_ros.router.local; '
            'print(sorted(m for m in sys.modules if m.split(".")[0] == "rclpy"))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=Path(REPO), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]'


def test_a_cloud_request_names_its_subject_only_by_the_roots_keyed_hash(tmp_path):
    """What the voice flow sends the cloud for an event naming a data subject: the keyed hash
    the storage node's fleet erasure asks the cloud to erase by (SubjectRefs under the root's
    keys), never the id; nothing for anonymous events, invalid ids or a host without the key."""
    from collections import deque

    from loom_ros.agents.behavior import AgentContext
    from loom_ros.storage.consent import SubjectRefs
    refs = SubjectRefs.at(tmp_path / 'keys')
    ctx = AgentContext('voice', {}, deque(), lambda *a: None, ports=Ports(subject_refs=refs.ref))
    named = Event.with_json('speech.utterance', {'text': 'hi'},
                            metadata={'loom.subject': 'alice'})
    ref = ctx.subject_ref(named)
    assert ref == SubjectRefs.at(tmp_path / 'keys').ref('alice') and 'alice' not in ref
    assert ref != refs.ref('bob')
    assert ctx.subject_ref(Event.with_json('speech.utterance', {'text': 'hi'})) == ''
    for bad in ('', '../etc', 'x' * 5000):
        assert ctx.subject_ref(Event.with_json('speech.utterance', {'text': 'hi'},
                                               metadata={'loom.subject': bad})) == ''
    keyless = AgentContext('voice', {}, deque(), lambda *a: None)
    assert keyless.subject_ref(named) == ''


def test_a_cloud_link_that_keeps_failing_warns_once_a_minute_with_a_count():
    """A robot without its fleet router retries the link every 5 s; the same failure is warned
    about the first time, when its reason changes, and then at most once a minute, with how
    many failures went unsaid (the launch run logged one line per retry)."""
    clock = {'t': 0.0}
    reasons = ['no route to host'] * 5 + ['connection refused']
    logged = []

    def opener(_settings):
        raise OSError(reasons.pop(0) if reasons else 'connection refused')
    link = CloudLink(CloudSettings(('tcp/127.0.0.1:1',)), opener, retry_s=5.0,
                     clock=lambda: clock['t'], log=lambda level, msg: logged.append(msg))

    def fail_at(t):
        clock['t'] = t
        if t == 0.0:
            link.start()
        else:
            link.client()   # due: opens again in the background
        assert not link.wait_open(10)   # joins the opening thread: its warning is logged
    for t in (0.0, 5.0, 10.0, 15.0):
        fail_at(t)
    assert len(logged) == 1 and 'no route to host' in logged[0]
    fail_at(60.0)   # a minute after the first warning: said again, with the count
    assert len(logged) == 2 and '3 more failures' in logged[1]
    fail_at(65.0)   # a new reason: said at once
    assert len(logged) == 3 and 'connection refused' in logged[2]
    link.close()
