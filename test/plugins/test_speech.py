"""Speech plugins with the real parts: espeak-ng speech made by our own TTS (pyttsx3, in its
worker process), resampled to 16 kHz and fed in mic-sized chunks to pocketsphinx with the
repository's config/speech.yaml grammar."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from loom_ros.bus.event import Event, Privacy
from loom_ros.plugins.contract import (CapabilityDenied, HealthState, PluginContext, PluginError,
                                       load_plugin_class)
from loom_ros.plugins.speech.asr import SpeechRecognizer, jsgf_grammar
from loom_ros.plugins.speech.audio import (ASR_RATE, AudioFormatError, dbfs, read_wav, resample,
                                           voiced_seconds, write_wav)
from loom_ros.plugins.speech.config import (AsrConfig, SpeechConfigError, TtsConfig, load_config,
                                            parse_config)
from loom_ros.plugins.speech.tts import Speaker, TTSError

pytestmark = pytest.mark.timeout(300)

CHUNK = 1600   # 100 ms at 16 kHz, what a mic driver typically delivers
PAD = np.zeros(ASR_RATE // 2, dtype=np.int16)   # half a second of silence each side
WEATHER = ['what is the weather in tokyo', 'what is the weather in new york']
COMMANDS = ['stop', 'go forward', 'turn left']


@pytest.fixture(scope='module')
def config():
    return load_config()


@pytest.fixture(scope='module')
def speaker(config):
    with Speaker(config.tts) as s:
        yield s


@pytest.fixture(scope='module')
def speech(speaker, tmp_path_factory):
    """16 kHz clips (with silence around) of phrases spoken by our TTS, made once per module."""
    folder = tmp_path_factory.mktemp('speech')
    cache: dict[str, np.ndarray] = {}

    def clip(text: str) -> np.ndarray:
        if text not in cache:
            out = speaker.say(text, folder / f'{len(cache)}.wav')
            samples, rate = read_wav(out.path)
            cache[text] = np.concatenate([PAD, resample(samples, rate, ASR_RATE), PAD])
        return cache[text]
    return clip


def feed_chunks(rec: SpeechRecognizer, samples: np.ndarray) -> list:
    results = []
    for i in range(0, samples.size, CHUNK):
        results += rec.feed(samples[i:i + CHUNK].tobytes())
    return results + rec.finish()


# -- config ----------------------------------------------------------------------------------
def test_default_config_has_robot_commands_and_weather_questions(config):
    sentences = config.asr.expanded()
    for command in ('stop', 'go forward', 'go backward', 'turn left', 'turn right'):
        assert command in sentences
    weather = [s for s in sentences if s.startswith('what is the weather in ')]
    assert len(weather) >= 3 and 'what is the weather in london' in weather
    assert config.asr.match('what is the weather in new york') == (
        'what is the weather in <city>', {'city': 'new york'})
    assert '<slot_city>' in jsgf_grammar(config.asr)


def test_bad_config_files_name_the_problem(tmp_path):
    bad_yaml = tmp_path / 'bad.yaml'
    bad_yaml.write_text('asr: [unclosed\n')
    with pytest.raises(SpeechConfigError, match='not valid YAML'):
        load_config(bad_yaml)
    with pytest.raises(SpeechConfigError, match='cannot read'):
        load_config(tmp_path / 'missing.yaml')
    unknown = tmp_path / 'unknown.yaml'
    unknown.write_text('asr: {phrases: [stop], colour: red}\n')
    with pytest.raises(SpeechConfigError, match='asr.colour'):
        load_config(unknown)
    with pytest.raises(SpeechConfigError, match='slot <city>'):
        parse_config({'asr': {'phrases': ['go to <city>']}})
    with pytest.raises(SpeechConfigError, match='sample_rate'):
        parse_config({'asr': {'phrases': ['stop'], 'sample_rate': 44100}})


def test_words_missing_from_the_dictionary_are_named():
    with pytest.raises(SpeechConfigError, match='zorblax'):
        SpeechRecognizer(AsrConfig(phrases=['stop', 'go to zorblax']))


# -- text to speech --------------------------------------------------------------------------
def test_tts_writes_a_non_silent_wav_of_plausible_length(speaker, tmp_path):
    out = speaker.say('Turn left, please.', tmp_path / 'say.wav')
    samples, rate = read_wav(out.path)
    assert rate == out.sample_rate and samples.size / rate == pytest.approx(out.duration_s)
    assert 0.3 <= out.duration_s <= 5.0
    assert dbfs(samples) > -40.0                       # speech, not silence
    assert voiced_seconds(samples, rate) >= 0.3
    assert not out.played                               # config says play: false


def test_tts_refuses_bad_requests_clearly(speaker, tmp_path):
    with pytest.raises(TTSError, match='empty'):
        speaker.say('   ', tmp_path / 'x.wav')
    with pytest.raises(TTSError, match='max_chars'):
        speaker.say('a' * 5000, tmp_path / 'x.wav')
    with pytest.raises(TTSError, match='no voice'):
        Speaker(TtsConfig(voice='no-such-voice'))
    with pytest.raises(TTSError, match='espeak-ng is not installed.*libespeak-ng1'):
        Speaker(espeak_library='libespeak-ng-missing.so.1')


def test_a_hung_worker_is_killed_and_replaced(tmp_path):
    with Speaker(TtsConfig(timeout_s=0.5)) as s:
        first = s._worker.proc
        os.kill(first.pid, signal.SIGSTOP)   # a worker that hangs: it never answers
        with pytest.raises(TTSError, match='did not finish'):
            s.say('hello robot', tmp_path / 'a.wav')
        assert first.poll() is not None and s.stats['timeouts'] == 1
        s.config.timeout_s = 30.0
        out = s.say('hello robot', tmp_path / 'b.wav')
        assert out.duration_s > 0.3 and s.stats['restarts'] == 1


def test_the_worker_gets_no_secret_of_this_process(tmp_path, monkeypatch):
    """It speaks text from events: the host's keys stay in the host (the sandbox's allowlist)."""
    monkeypatch.setenv('LOOM_CLOUD_TOKEN', 'host-only-secret')
    monkeypatch.setenv('LOOM_STORAGE_MASTER_KEY', 'host-only-master-key')
    monkeypatch.setenv('LC_MESSAGES', 'C')
    with Speaker(TtsConfig()) as s:
        environ = Path(f'/proc/{s._worker.proc.pid}/environ').read_bytes().split(b'\0')
        names = {item.split(b'=', 1)[0].decode() for item in environ if item}
        assert 'LOOM_CLOUD_TOKEN' not in names and 'LOOM_STORAGE_MASTER_KEY' not in names
        assert b'host-only' not in b'\0'.join(environ)
        assert {'PATH', 'PYTHONPATH', 'LC_MESSAGES'} <= names   # what it runs on is kept
        assert s.say('hello robot', tmp_path / 'env.wav').duration_s > 0.3


def test_inline_isolation_also_writes_speech(tmp_path):
    s = Speaker(TtsConfig(isolation='inline'))
    out = s.say('stop', tmp_path / 'inline.wav')
    assert 0.3 <= out.duration_s <= 5.0


# -- recognition -----------------------------------------------------------------------------
def test_tts_speech_of_configured_commands_is_recognised(config, speech):
    rec = SpeechRecognizer(config.asr)
    for phrase in COMMANDS + WEATHER:
        finals = [r for r in feed_chunks(rec, speech(phrase)) if not r.partial]
        assert [r.text for r in finals] == [phrase]
        assert 0.0 < finals[0].confidence <= 1.0
    assert rec.stats['utterances'] == len(COMMANDS + WEATHER)


def test_weather_question_carries_the_city_as_a_slot(config, speech):
    rec = SpeechRecognizer(config.asr)
    finals = rec.recognize(speech('what is the weather in tokyo'))
    assert len(finals) == 1
    assert finals[0].phrase == 'what is the weather in <city>'
    assert finals[0].slots == {'city': 'tokyo'}
    assert finals[0].start_s < finals[0].end_s


def test_partials_come_before_the_final_result(config, speech):
    rec = SpeechRecognizer(config.asr)
    results = feed_chunks(rec, speech('what is the weather in tokyo'))
    kinds = [r.partial for r in results]
    assert kinds[-1] is False and kinds.count(False) == 1
    partials = [r.text for r in results if r.partial]
    assert len(partials) >= 2 and partials[0] != results[-1].text
    assert results[-1].text.startswith(partials[0])


def test_an_utterance_cut_off_by_the_end_of_the_stream_is_finished(config, speech):
    rec = SpeechRecognizer(config.asr)
    clip = speech('go forward')[:-PAD.size]   # the stream stops before the trailing silence
    results = []
    for i in range(0, clip.size, CHUNK):
        results += rec.feed(clip[i:i + CHUNK])
    assert not [r for r in results if not r.partial]
    assert [r.text for r in rec.finish()] == ['go forward']


def test_silence_and_faint_noise_produce_no_utterance(config):
    rec = SpeechRecognizer(config.asr)
    assert feed_chunks(rec, np.zeros(3 * ASR_RATE, dtype=np.int16)) == []
    noise = np.random.default_rng(0).normal(0, 30, 3 * ASR_RATE).astype(np.int16)
    assert [r for r in feed_chunks(rec, noise) if not r.partial] == []
    assert rec.stats['utterances'] == 0


def test_wrong_sample_rate_or_format_is_a_clear_error(config, speech):
    rec = SpeechRecognizer(config.asr)
    with pytest.raises(AudioFormatError, match='44100 Hz.*16000 Hz'):
        rec.feed(np.zeros(441, dtype=np.int16), sample_rate=44100)
    with pytest.raises(AudioFormatError, match='odd length'):
        rec.feed(b'\x00\x01\x02')
    with pytest.raises(AudioFormatError, match='int16'):
        rec.feed(np.zeros(160, dtype=np.float32))
    with pytest.raises(AudioFormatError, match='mono'):
        rec.feed(np.zeros((160, 2), dtype=np.int16))
    assert rec.stats['bad_chunks'] == 4
    # Nothing was consumed: the recognizer still works.
    assert [r.text for r in rec.recognize(speech('stop'))] == ['stop']


def test_reset_drops_a_half_heard_utterance(config, speech):
    rec = SpeechRecognizer(config.asr)
    clip = speech('turn left')
    rec.feed(clip[:clip.size // 2])
    rec.reset()
    assert rec.finish() == []
    assert [r.text for r in rec.recognize(speech('turn left'))] == ['turn left']


def test_keyphrase_mode_spots_a_command(speech):
    rec = SpeechRecognizer(AsrConfig(mode='keyphrase', phrases=['stop', 'go forward']))
    assert [r.text for r in rec.recognize(speech('stop'))] == ['stop']


# -- audio helpers ---------------------------------------------------------------------------
def test_wav_round_trip_and_resampling_keep_the_signal(tmp_path):
    t = np.arange(22050) / 22050
    tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    path = write_wav(tmp_path / 'tone.wav', tone, 22050)
    samples, rate = read_wav(path)
    assert rate == 22050 and np.array_equal(samples, tone)
    down = resample(samples, 22050, 16000)
    assert down.size == 16000 and abs(dbfs(down) - dbfs(tone)) < 0.5
    (tmp_path / 'junk.wav').write_bytes(b'RIFF\x00\x00')
    with pytest.raises(AudioFormatError, match='not a readable PCM WAV'):
        read_wav(tmp_path / 'junk.wav')


# -- the plugins -----------------------------------------------------------------------------
def mic_events(samples: np.ndarray, rate: int = ASR_RATE, last: bool = True) -> list[Event]:
    chunks = [samples[i:i + CHUNK] for i in range(0, samples.size, CHUNK)]
    return [Event(type='mic.front', source='sim_mic', payload=c.tobytes(),
                  metadata={'sample_rate': str(rate),
                            **({'end_of_stream': 'true'} if last and n == len(chunks) - 1
                               else {})},
                  privacy=Privacy.SENSITIVE)
            for n, c in enumerate(chunks)]


def asr_plugin():
    plugin = load_plugin_class('asr')()
    plugin.init(PluginContext(plugin='asr', granted=frozenset({'mic.read'})))
    return plugin


def test_asr_plugin_turns_mic_events_into_speech_events(speech):
    plugin = asr_plugin()
    out = []
    for event in mic_events(speech('what is the weather in new york')):
        response = plugin.handle_event(event)
        assert response.ok, response.error
        out += response.events
    assert {e.type for e in out} == {'speech.partial', 'speech.utterance'}
    final = out[-1]
    assert final.type == 'speech.utterance' and out[0].type == 'speech.partial'
    data = final.json()
    assert data['text'] == 'what is the weather in new york' and data['partial'] is False
    assert data['slots'] == {'city': 'new york'}
    assert final.confidence == pytest.approx(data['confidence'], abs=1e-4)
    assert final.privacy is Privacy.SENSITIVE and final.source == 'asr'
    assert all(e.json()['partial'] is True for e in out[:-1])
    assert plugin.health().details['utterances'] == '1'


def test_asr_plugin_counts_bad_events_and_keeps_going(speech):
    plugin = asr_plugin()
    wrong_rate = plugin.handle_event(mic_events(speech('stop'), rate=8000)[0])
    assert not wrong_rate.ok and '8000 Hz' in wrong_rate.error
    stereo = plugin.handle_event(Event(type='mic', payload=b'\0' * 64,
                                       metadata={'channels': '2'}))
    assert not stereo.ok and 'mono' in stereo.error
    not_mic = plugin.handle_event(Event(type='camera.front', payload=b''))
    assert not not_mic.ok and 'mic' in not_mic.error
    odd = plugin.handle_event(Event(type='mic', payload=b'\0\0\0'))
    assert not odd.ok
    health = plugin.health()
    assert health.state is HealthState.OK and health.details['bad_events'] == '4'
    texts = [e.json()['text'] for ev in mic_events(speech('stop'))
             for e in plugin.handle_event(ev).events if e.type == 'speech.utterance']
    assert texts == ['stop']


def test_asr_plugin_needs_mic_read_and_a_valid_config(tmp_path):
    with pytest.raises(CapabilityDenied, match='mic.read'):
        load_plugin_class('asr')().init(PluginContext(plugin='asr'))
    with pytest.raises(PluginError, match='zorblax'):
        load_plugin_class('asr')().init(PluginContext(
            plugin='asr', granted=frozenset({'mic.read'}),
            config={'asr': {'phrases': ['zorblax'], 'slots': {}}}))


def test_tts_plugin_writes_speech_the_asr_plugin_understands(tmp_path):
    audit: list[dict] = []
    tts = load_plugin_class('tts')()
    tts.init(PluginContext(plugin='tts', granted=frozenset({'tts', 'storage.write'}),
                           data_dir=str(tmp_path), audit_sink=audit.append))
    try:
        response = tts.handle_event(Event.with_json('tts.say', {'text': 'turn left'}))
        assert response.ok, response.error
        (done,) = response.events
        data = done.json()
        assert done.type == 'tts.done' and 0.3 <= data['duration_s'] <= 5.0
        path = Path(data['path'])
        assert path.parent == tmp_path / 'tts' and path.is_file()
        assert audit and audit[-1]['kind'] == 'tts_say' and audit[-1]['text'] == 'turn left'

        samples, rate = read_wav(path)
        asr = asr_plugin()
        heard = [e.json()['text'] for ev in mic_events(np.concatenate([PAD, resample(samples, rate),
                                                                      PAD]))
                 for e in asr.handle_event(ev).events if e.type == 'speech.utterance']
        assert heard == ['turn left']

        # An agent action addressed to the speaker is spoken; one for another actuator is not.
        said = tts.handle_event(Event.with_json('agent.a1.action', {'action': 'say',
                                                                    'text': 'hello robot'}))
        assert said.ok and said.events[0].json()['text'] == 'hello robot'
        other = tts.handle_event(Event.with_json('agent.a1.action', {'action': 'move'}))
        assert other.ok and other.events == []
        for payload in (b'not json', b'[1, 2]', json.dumps({'text': ''}).encode()):
            bad = tts.handle_event(Event(type='tts.say', payload=payload))
            assert not bad.ok and bad.error
        assert tts.health().details['bad_events'] == '3'
    finally:
        tts.shutdown()


def test_tts_plugin_needs_its_capabilities_and_a_data_dir(tmp_path):
    with pytest.raises(CapabilityDenied, match='storage.write'):
        load_plugin_class('tts')().init(PluginContext(plugin='tts', granted=frozenset({'tts'}),
                                                      data_dir=str(tmp_path)))
    with pytest.raises(PluginError, match='data_dir'):
        load_plugin_class('tts')().init(PluginContext(
            plugin='tts', granted=frozenset({'tts', 'storage.write'})))
    with pytest.raises(PluginError, match='no voice'):
        load_plugin_class('tts')().init(PluginContext(
            plugin='tts', granted=frozenset({'tts', 'storage.write'}), data_dir=str(tmp_path),
            config={'tts': {'voice': 'no-such-voice'}}))


def test_tts_audits_no_words_of_an_anonymous_request_above_public(tmp_path):
    """The append-only audit cannot be erased: an anonymous but Private (or Sensitive, by its
    metadata) request is on record by id, type and size, its words are not; a Public one keeps
    its text as before."""
    from loom_ros.bus.event import Privacy
    audit: list[dict] = []
    tts = load_plugin_class('tts')()
    tts.init(PluginContext(plugin='tts', granted=frozenset({'tts', 'storage.write'}),
                           data_dir=str(tmp_path), audit_sink=audit.append))
    try:
        for i, (privacy, metadata) in enumerate(((Privacy.PRIVATE, {}),
                                                 (Privacy.PUBLIC, {'loom.privacy': 'sensitive'}))):
            said = tts.handle_event(Event.with_json('tts.say', {'text': 'my pin is 4321'},
                                                    id=f'p{i}', privacy=privacy,
                                                    metadata=metadata))
            assert said.ok, said.error
            record = audit[-1]
            assert record['kind'] == 'tts_say' and '4321' not in json.dumps(record)
            assert (record['request_id'], record['request_type'], record['chars']) == (
                f'p{i}', 'tts.say', len('my pin is 4321'))
            assert record['withheld'].startswith('the event is')
        assert tts.handle_event(Event.with_json('tts.say', {'text': 'hello'})).ok
        assert audit[-1]['text'] == 'hello'
    finally:
        tts.shutdown()


def test_a_simulated_microphone_stream_keeps_being_recognised():
    """The stream the simulated microphone plays (silence, then utterances with gaps of exact
    zeros, one recognizer throughout): after the first, each utterance comes out as a final
    result. pocketsphinx's final search once dropped "london" that its partials had; the
    recognizer then takes the latest partial that is a whole phrase."""
    from loom_ros.plugins.speech.asr import SpeechRecognizer
    from loom_ros.plugins.speech.config import load_config
    from loom_ros.sensors import scenes
    london, tokyo = scenes.speak_clips(['what is the weather in london',
                                        'what is the weather in tokyo'])
    rate = scenes.MIC_RATE
    gap = np.zeros(5 * rate, dtype=np.int16)
    audio = np.concatenate([np.zeros(2 * rate, dtype=np.int16), london.samples, gap,
                            tokyo.samples, gap, london.samples, gap, tokyo.samples, gap])
    recognizer = SpeechRecognizer(load_config().asr)
    finals = [r.slots.get('city') for i in range(0, audio.size, rate // 10)
              for r in recognizer.feed(audio[i:i + rate // 10].tobytes(), rate) if not r.partial]
    assert finals[-3:] == ['tokyo', 'london', 'tokyo']


def test_a_spoken_answer_to_a_data_subject_is_theirs_and_forget_erases_it(tmp_path):
    """A tts.say naming a data subject (the voice flow passes on the question's loom.subject)
    writes its WAV under <root>/plugins/tts/subjects/<subject>/ (the host gives each plugin
    <root>/plugins/<name> as its data_dir), where erasure looks: forget removes alice's answer
    and keeps bob's and the anonymous one; the audit names neither her text nor her folder; an
    invalid id is refused."""
    from loom_ros.storage.erasure import forget
    from loom_ros.storage.layout import StorageLayout
    audit: list[dict] = []
    tts = load_plugin_class('tts')()
    tts.init(PluginContext(plugin='tts', granted=frozenset({'tts', 'storage.write'}),
                           data_dir=str(tmp_path / 'plugins' / 'tts'), audit_sink=audit.append))
    try:
        def say(text, **metadata):
            response = tts.handle_event(Event.with_json('tts.say', {'text': text},
                                                        metadata=metadata))
            assert response.ok, response.error
            return Path(response.events[0].json()['path'])
        alice = say('turn left', **{'loom.subject': 'alice'})
        bob = say('turn right', **{'loom.subject': 'bob'})
        anonymous = say('stop')
        assert alice.parent == tmp_path / 'plugins' / 'tts' / 'subjects' / 'alice'
        assert anonymous.parent == tmp_path / 'plugins' / 'tts' / 'tts'
        said = [r for r in audit if r.get('kind') == 'tts_say']
        assert len(said) == 3 and not any('alice' in str(r) or 'turn left' in str(r)
                                          for r in said)
        assert any('stop' in str(r) for r in said)   # an anonymous answer is audited as before
        for bad in ('../etc', 'x' * 5000, ''):
            refused = tts.handle_event(Event.with_json('tts.say', {'text': 'hi'},
                                                       metadata={'loom.subject': bad}))
            assert not refused.ok and 'subject' in refused.error
        assert not (tmp_path / 'etc').exists()
    finally:
        tts.shutdown()
    receipt = forget(StorageLayout.at(tmp_path), 'alice')
    assert receipt.counts['plugin_files'] >= 1
    assert not alice.exists() and bob.is_file() and anonymous.is_file()
