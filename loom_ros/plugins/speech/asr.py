"""Command recognition with pocketsphinx 5: a JSGF grammar (or keyphrase list) built from
config/speech.yaml, fed 16 kHz mono int16 chunks as they arrive from a microphone.

Free dictation with the bundled en-us model is mostly wrong; a small grammar of commands is
right and takes ~10 ms an utterance, which is what a robot's voice interface needs. A voice
activity endpointer (pocketsphinx.Endpointer, webrtc VAD) cuts the stream into utterances:
partial hypotheses come out while one is being spoken, the final result (with the decoder's
posterior as confidence) when it ends. Silence produces nothing.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loom_ros.plugins.speech.audio import AudioFormatError, pcm_from_bytes
from loom_ros.plugins.speech.config import AsrConfig, SpeechConfigError, SLOT


class ModelError(RuntimeError):
    """The acoustic model or dictionary is missing or unusable; says which file."""


@dataclass
class Recognition:
    """One recognition result: a partial hypothesis or the final text of an utterance."""

    text: str
    confidence: float
    partial: bool
    phrase: str = ''                     # the configured phrase (template) it matched
    slots: dict[str, str] = field(default_factory=dict)
    start_s: float = 0.0                 # stream time of the utterance's start
    end_s: float = 0.0
    decode_ms: float = 0.0               # decoder time spent on this utterance so far

    def as_dict(self) -> dict:
        return {'text': self.text, 'confidence': round(self.confidence, 4),
                'partial': self.partial, 'phrase': self.phrase, 'slots': dict(self.slots),
                'start_s': round(self.start_s, 3), 'end_s': round(self.end_s, 3)}


def model_paths(model_dir: str | Path = '') -> tuple[Path, Path]:
    """(acoustic model dir, dictionary) of pocketsphinx's bundled en-us model, or of model_dir."""
    if model_dir:
        base = Path(model_dir)
    else:
        try:
            from pocketsphinx import get_model_path
        except ImportError:
            raise ModelError('pocketsphinx is not installed (run tools/setup.sh)') from None
        base = Path(get_model_path()) / 'en-us'
    hmm, dic = base / 'en-us', base / 'cmudict-en-us.dict'
    for needed in ('mdef', 'means', 'variances', 'transition_matrices', 'feat.params'):
        if not (hmm / needed).is_file():
            raise ModelError(f'acoustic model file {hmm / needed} is missing '
                             '(reinstall pocketsphinx or fix asr.model_dir)')
    if not dic.is_file():
        raise ModelError(f'pronunciation dictionary {dic} is missing')
    return hmm, dic


def jsgf_grammar(config: AsrConfig) -> str:
    """The JSGF text for the configured phrases; each slot becomes its own rule."""
    lines = ['#JSGF V1.0;', 'grammar loom;']
    for name, options in config.slots.items():
        lines.append(f'<slot_{name}> = ' + ' | '.join(f'( {o} )' for o in options) + ';')
    alts = [SLOT.sub(lambda m: f'<slot_{m.group(1)}>', p) for p in config.phrases]
    lines.append('public <command> = ' + ' | '.join(f'( {a} )' for a in alts) + ';')
    return '\n'.join(lines) + '\n'


class SpeechRecognizer:
    """Streaming recognizer: feed() chunks, get partial and final Recognitions back.

    Not shared between threads without its lock (feed/finish/reset take it).
    """

    def __init__(self, config: AsrConfig):
        try:
            from pocketsphinx import Decoder, Endpointer
        except ImportError:
            raise ModelError('pocketsphinx is not installed (run tools/setup.sh)') from None
        self.config = config
        self.sample_rate = config.sample_rate
        hmm, dic = model_paths(config.model_dir)
        try:
            self._decoder = Decoder(hmm=str(hmm), dict=str(dic), lm=None, loglevel='FATAL',
                                    dither=config.dither, seed=config.seed)
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f'pocketsphinx cannot load the model in {hmm}: {exc}') from None
        missing = sorted(w for w in config.words() if self._decoder.lookup_word(w) is None)
        if missing:
            raise SpeechConfigError(f'words not in the pronunciation dictionary {dic.name}: '
                                    f'{", ".join(missing)} '
                                    '(rephrase or add them to the dictionary)')
        if config.mode == 'grammar':
            try:
                self._decoder.add_jsgf_string('loom', jsgf_grammar(config))
            except RuntimeError as exc:
                raise SpeechConfigError(f'the phrase grammar does not compile: {exc}') from None
        else:
            self._add_keyphrases()
        self._decoder.activate_search('loom')
        self._endpointer_cls = Endpointer
        self._lock = threading.Lock()
        self.stats = {'chunks': 0, 'utterances': 0, 'rejected': 0, 'partials': 0,
                      'final_from_partial': 0,
                      'bad_chunks': 0}
        self._new_stream()

    def _add_keyphrases(self) -> None:
        fd, path = tempfile.mkstemp(suffix='.kws', prefix='loom-')
        try:
            with os.fdopen(fd, 'w') as f:
                for phrase in self.config.expanded():
                    f.write(f'{phrase} /{self.config.keyphrase_threshold:g}/\n')
            self._decoder.add_kws('loom', path)
        except RuntimeError as exc:
            raise SpeechConfigError(f'the keyphrase list is not usable: {exc}') from None
        finally:
            os.unlink(path)

    def _new_stream(self) -> None:
        cfg = self.config
        try:
            self._ep = self._endpointer_cls(window=cfg.vad_window_s, ratio=cfg.vad_ratio,
                                            vad_mode=cfg.vad_mode, sample_rate=self.sample_rate)
        except ValueError as exc:
            raise SpeechConfigError(f'voice activity settings are not usable: {exc}') from None
        self._frame_bytes = self._ep.frame_bytes
        self._pending = bytearray()
        self._in_utt = False
        self._last_partial = ''
        self._last_complete = ''
        self._utt_start = 0.0
        self._decode_ns = 0

    # -- streaming ---------------------------------------------------------------------------
    def feed(self, chunk: bytes | bytearray | memoryview | np.ndarray,
             sample_rate: int | None = None) -> list[Recognition]:
        """Decode one chunk of 16 kHz mono int16 audio; return what it completed (partials,
        finals). AudioFormatError for another rate or a malformed chunk (nothing is consumed)."""
        data = self._check(chunk, sample_rate)
        with self._lock:
            self.stats['chunks'] += 1
            self._pending += data
            out: list[Recognition] = []
            fb, pos = self._frame_bytes, 0
            while len(self._pending) - pos >= fb:
                self._frame(bytes(self._pending[pos:pos + fb]), out)
                pos += fb
            del self._pending[:pos]
            return out

    def finish(self) -> list[Recognition]:
        """End of the stream: complete an utterance still being spoken, then start afresh."""
        with self._lock:
            out: list[Recognition] = []
            if self._ep.in_speech:
                speech = self._ep.end_stream(bytes(self._pending[:self._frame_bytes]))
                if speech:   # None or b'' when the endpointer holds nothing more
                    if not self._in_utt:
                        self._start_utt()
                    self._process(speech)
            if self._in_utt:
                final = self._end_utt(self._ep.speech_end or self._utt_start)
                if final is not None:
                    out.append(final)
            self._new_stream()
            return out

    def reset(self) -> None:
        """Drop any utterance in progress (no result) and start a new stream."""
        with self._lock:
            if self._in_utt:
                self._decoder.end_utt()
            self._new_stream()

    def recognize(self, samples: np.ndarray | bytes, sample_rate: int | None = None,
                  chunk_samples: int = 1600) -> list[Recognition]:
        """The final results for a whole clip fed in chunks (as a mic would), then finish()."""
        data = self._check(samples, sample_rate)
        finals = []
        for i in range(0, len(data), 2 * chunk_samples):
            finals += [r for r in self.feed(data[i:i + 2 * chunk_samples]) if not r.partial]
        return finals + self.finish()

    # -- internals ---------------------------------------------------------------------------
    def _check(self, chunk, sample_rate: int | None) -> bytes:
        rate = self.sample_rate if sample_rate is None else sample_rate
        if rate != self.sample_rate:
            self.stats['bad_chunks'] += 1
            raise AudioFormatError(f'audio at {rate} Hz; the recognizer takes {self.sample_rate} '
                                   'Hz mono int16 (resample with '
                                   'loom_ros.plugins.speech.audio.resample)')
        if isinstance(chunk, np.ndarray):
            if chunk.dtype != np.int16 or chunk.ndim != 1:
                self.stats['bad_chunks'] += 1
                raise AudioFormatError(f'samples must be a 1-D int16 array (mono), got '
                                       f'{chunk.dtype} with shape {chunk.shape}')
            return chunk.astype('<i2', copy=False).tobytes()
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            self.stats['bad_chunks'] += 1
            raise AudioFormatError(f'audio must be int16 PCM bytes, got {type(chunk).__name__}')
        try:
            pcm_from_bytes(chunk)
        except AudioFormatError:
            self.stats['bad_chunks'] += 1
            raise
        return bytes(chunk)

    def _frame(self, frame: bytes, out: list[Recognition]) -> None:
        was_speech = self._ep.in_speech
        speech = self._ep.process(frame)
        if speech is None:
            return
        if not was_speech or not self._in_utt:
            self._start_utt()
        self._process(speech)
        if not self._ep.in_speech:
            final = self._end_utt(self._ep.speech_end)
            if final is not None:
                out.append(final)
        elif self.config.partial_results:
            start = time.perf_counter_ns()
            hyp = self._decoder.hyp()
            self._decode_ns += time.perf_counter_ns() - start
            text = ' '.join(hyp.hypstr.split()) if hyp is not None else ''
            if text and text != self._last_partial:
                self._last_partial = text
                if self.config.mode == 'grammar' and self.config.match(text) is not None:
                    self._last_complete = text
                self.stats['partials'] += 1
                out.append(Recognition(text=text, confidence=0.0, partial=True,
                                       start_s=self._utt_start, end_s=self._ep.speech_end,
                                       decode_ms=self._decode_ns / 1e6))

    def _start_utt(self) -> None:
        self._decoder.start_utt()
        self._in_utt = True
        self._last_partial = ''
        self._last_complete = ''   # the latest partial that was a whole phrase
        self._utt_start = self._ep.speech_start
        self._decode_ns = 0

    def _process(self, speech: bytes) -> None:
        if not speech:
            return
        start = time.perf_counter_ns()
        self._decoder.process_raw(speech, False, False)
        self._decode_ns += time.perf_counter_ns() - start

    def _end_utt(self, end_s: float) -> Recognition | None:
        start = time.perf_counter_ns()
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        confidence = min(1.0, max(0.0, float(self._decoder.get_prob()))) if hyp else 0.0
        self._decode_ns += time.perf_counter_ns() - start
        self._in_utt = False
        text = ' '.join(hyp.hypstr.split()) if hyp is not None else ''
        if not text and self.config.mode == 'keyphrase':
            text = self._last_partial   # a spotted keyphrase that end_utt no longer reports
        if not text:
            return None      # noise or a cough: nothing the grammar accepts
        match = self.config.match(text)
        if self.config.mode == 'grammar' and match is None and self._last_complete:
            # pocketsphinx's final search sometimes drops the last word that its partials had
            # (seen: "... in london" partial, "... in" final, on speech with a hard stop). The
            # latest partial that was a whole phrase is the better answer; counted.
            text = self._last_complete
            match = self.config.match(text)
            self.stats['final_from_partial'] += 1
        if (self.config.mode == 'grammar' and match is None) \
                or confidence < self.config.min_confidence:
            # The search stopped inside a phrase (e.g. "what is the weather"): not a command.
            self.stats['rejected'] += 1
            return None
        self.stats['utterances'] += 1
        phrase, slots = match if match is not None else ('', {})
        return Recognition(text=text, confidence=confidence, partial=False, phrase=phrase,
                           slots=slots, start_s=self._utt_start, end_s=end_s,
                           decode_ms=self._decode_ns / 1e6)
