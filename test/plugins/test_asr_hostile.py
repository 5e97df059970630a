"""The asr plugin against a hostile or careless mic stream, with the real parts: espeak-ng speech
made by our own TTS (loom_ros.sensors.scenes.speak_clips, as the simulated microphone does) fed
in 100 ms chunks to pocketsphinx with the repository's grammar.

- A transcript is at least as private as the strictest chunk its audio came from and is only
  ever filed under the data subject who spoke it: a Public, anonymous silence chunk from another
  publisher had ended a Sensitive speaker's utterance and made "turn left" Public and nobody's.
- A chunk longer than asr.max_chunk_s is refused at once (one 131 s chunk held the host 3.3 s).
- Noise that never stops ends at asr.max_utterance_s and the commands after it are heard (900 s
  of noise had kept one utterance open, growing memory and silencing every command).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.privacy import effective_privacy, named_subject
from loom_ros.plugins.contract import PluginContext, load_plugin_class
from loom_ros.plugins.speech.config import SpeechConfigError, load_config, parse_config

pytestmark = pytest.mark.timeout(120)

RATE = 16000
CHUNK = 1600   # 100 ms, what sim_sensors sends


@pytest.fixture(scope='module')
def turn_left() -> np.ndarray:
    from loom_ros.sensors import scenes
    return scenes.speak_clips(['turn left'])[0].samples


def asr_plugin(**asr):
    plugin = load_plugin_class('asr')()
    plugin.init(PluginContext(plugin='asr', granted=frozenset({'mic.read'}),
                              config={'asr': asr} if asr else {}))
    return plugin


def chunks(samples: np.ndarray, privacy=Privacy.SENSITIVE, subject: str | None = None,
           source: str = 'sim_sensors/mic', **metadata) -> list[Event]:
    meta = {'sample_rate': str(RATE), **metadata,
            **({'loom.subject': subject} if subject is not None else {})}
    return [Event(type='mic.primary', source=source, privacy=privacy, metadata=dict(meta),
                  payload=samples[i:i + CHUNK].astype('<i2').tobytes())
            for i in range(0, samples.size, CHUNK)]


def feed(plugin, events: list[Event]) -> list[Event]:
    out = []
    for event in events:
        response = plugin.handle_event(event)
        assert response.ok, response.error
        out += response.events
    return out


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.int16)


def described(events: list[Event]) -> list[tuple]:
    return [(e.type, e.json()['text'], effective_privacy(e).name, named_subject(e))
            for e in events]


# -- whose words, how private ------------------------------------------------------------------
def test_a_transcript_is_as_private_as_the_strictest_chunk_it_heard(turn_left):
    """Dave's words, Sensitive (one chunk in the middle Private by its metadata), ended by Public
    silence that also names dave: every result is Private and dave's (was: the final took the
    ending chunk's Public)."""
    plugin = asr_plugin()
    speech = chunks(turn_left[:24000], subject='dave')
    speech[len(speech) // 2].metadata['loom.privacy'] = 'private'
    out = feed(plugin, chunks(silence(0.5), subject='dave') + speech
               + chunks(silence(2.0), privacy=Privacy.PUBLIC, subject='dave', source='other'))
    finals = [e for e in out if e.type == 'speech.utterance']
    assert [e.json()['text'] for e in finals] == ['turn left'], described(out)
    assert any(e.type == 'speech.partial' for e in out)
    assert effective_privacy(finals[0]) is Privacy.PRIVATE and finals[0].privacy is \
        Privacy.PRIVATE
    assert all(effective_privacy(e) >= Privacy.SENSITIVE and named_subject(e) == 'dave'
               for e in out), described(out)
    # Silence that follows, all Public, is a new utterance's business only: nothing comes out.
    assert feed(plugin, chunks(silence(1.0), privacy=Privacy.PUBLIC, subject='dave')) == []


def test_public_anonymous_silence_cannot_take_a_speakers_words(turn_left):
    """The attack: dave's Sensitive words, then Public, subject-less silence from another
    publisher. No transcript comes out Public or anonymous; the utterance is cut (counted)."""
    plugin = asr_plugin()
    out = feed(plugin, chunks(silence(0.5), subject='dave')
               + chunks(turn_left[:24000], subject='dave')
               + chunks(silence(3.0), privacy=Privacy.PUBLIC, source='attacker'))
    assert out and all(named_subject(e) == 'dave' and effective_privacy(e) >= Privacy.SENSITIVE
                       for e in out), described(out)
    assert not any(e.type == 'speech.utterance' for e in out), described(out)
    details = plugin.health().details
    assert details['subject_cuts'] == '1' and details['cut'] == '1'
    # dave speaking again is heard, and is his.
    again = feed(plugin, chunks(turn_left, subject='dave'))
    assert [(t, text, p, s) for t, text, p, s in described(again) if t == 'speech.utterance'] \
        == [('speech.utterance', 'turn left', 'SENSITIVE', 'dave')]


def test_an_attackers_words_are_never_filed_under_someone_else(turn_left):
    """Anonymous Public words ended by chunks naming dave: nothing comes out under dave, and
    the words between stay anonymous (their partials)."""
    plugin = asr_plugin()
    out = feed(plugin, chunks(silence(0.5), privacy=Privacy.PUBLIC, source='attacker')
               + chunks(turn_left[:24000], privacy=Privacy.PUBLIC, source='attacker')
               + chunks(silence(3.0), subject='dave'))
    assert out and all(named_subject(e) == '' for e in out), described(out)
    assert not any(e.type == 'speech.utterance' for e in out), described(out)
    assert plugin.health().details['subject_cuts'] == '1'
    # Changing subject between utterances cuts nothing: two people, two transcripts.
    plugin = asr_plugin()
    out = feed(plugin, chunks(turn_left, subject='alice') + chunks(turn_left, subject='bob')
               + chunks(turn_left, privacy=Privacy.PUBLIC))
    assert [(s, p) for t, _, p, s in described(out) if t == 'speech.utterance'] == [
        ('alice', 'SENSITIVE'), ('bob', 'SENSITIVE'), ('', 'PUBLIC')]
    assert plugin.health().details['subject_cuts'] == '0'


# -- bounds ------------------------------------------------------------------------------------
def test_a_chunk_longer_than_max_chunk_s_is_refused_at_once_and_counted(turn_left):
    plugin = asr_plugin()
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(2 * 1024 * 1024 - 64) * 6000).clip(-32768, 32767)
    start = time.perf_counter()
    response = plugin.handle_event(Event(type='mic.primary', payload=noise.astype('<i2').tobytes(),
                                         privacy=Privacy.SENSITIVE))
    elapsed = time.perf_counter() - start
    assert not response.ok and 'max_chunk_s' in response.error and '131.07 s' in response.error
    assert elapsed < 0.5, elapsed
    details = plugin.health().details
    assert details['bad_events'] == '1' and details['long_chunks'] == '1'
    # One second, the default limit, is still taken; then speech is heard as before.
    assert plugin.handle_event(Event(type='mic.primary', payload=silence(1.0).tobytes())).ok
    texts = [e.json()['text'] for e in feed(plugin, chunks(turn_left))
             if e.type == 'speech.utterance']
    assert texts == ['turn left']


def test_noise_that_never_stops_ends_at_max_utterance_s_and_commands_are_heard(turn_left):
    plugin = asr_plugin(max_utterance_s=2.0)
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(5 * RATE) * 6000).clip(-32768, 32767).astype(np.int16)
    open_for, longest = 0, 0
    for event in chunks(noise):
        response = plugin.handle_event(event)
        assert response.ok, response.error
        assert not any(e.type == 'speech.utterance' for e in response.events)
        open_for = open_for + 1 if plugin.recognizer._in_utt else 0
        longest = max(longest, open_for)
    # 100 ms chunks: never open past max_utterance_s (and the endpointer's 0.3 s window)
    assert longest <= 24, longest
    details = plugin.health().details
    assert int(details['too_long']) >= 2 and details['utterances'] == '0'
    texts = [e.json()['text'] for e in feed(plugin, chunks(turn_left))
             if e.type == 'speech.utterance']
    assert texts == ['turn left']


def test_the_bounds_are_in_the_shipped_config_and_checked_at_load():
    asr = load_config().asr
    assert asr.max_chunk_s == 1.0 and asr.max_utterance_s == 10.0
    ok = parse_config({'asr': {'phrases': ['stop'], 'max_chunk_s': 0.5,
                               'max_utterance_s': 2}}).asr
    assert (ok.max_chunk_s, ok.max_utterance_s) == (0.5, 2.0)
    for key, bad in [('max_chunk_s', 0), ('max_chunk_s', -1), ('max_chunk_s', 11),
                     ('max_chunk_s', float('nan')), ('max_chunk_s', float('inf')),
                     ('max_chunk_s', '1.0'), ('max_chunk_s', True),
                     ('max_utterance_s', 0.1), ('max_utterance_s', 1e9),
                     ('max_utterance_s', float('nan')), ('max_utterance_s', '10')]:
        with pytest.raises(SpeechConfigError, match=f'asr.{key}'):
            parse_config({'asr': {'phrases': ['stop'], key: bad}})
    with pytest.raises(SpeechConfigError, match='max_utterance_s .* longer than vad_window_s'):
        parse_config({'asr': {'phrases': ['stop'], 'max_utterance_s': 1.0,
                              'vad_window_s': 2.0}})
