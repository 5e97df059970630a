"""Command recognition with pocketsphinx 5: a JSGF grammar (or keyphrase list) built from
config/speech.yaml, fed 16 kHz mono int16 chunks as they arrive from a microphone.

Free dictation with the bundled en-us model is mostly wrong; a small grammar of commands is
right and takes ~10 ms an utterance, which is what a robot's voice interface needs. A voice
activity endpointer (pocketsphinx.Endpointer, webrtc VAD) cuts the stream into utterances:
partial hypotheses come out while one is being spoken, the final result (with the decoder's
posterior as confidence) when it ends. Silence produces nothing.

Bounded: a chunk longer than `max_chunk_s` is refused (AudioFormatError, counted `long_chunks`),
and an utterance longer than `max_utterance_s` is dropped with no result (counted `too_long`) and
the stream restarted. Each chunk may carry a `tier` (an ordered value: the plugin passes its
privacy tier); a result carries the greatest tier among the chunks its audio came from, including
the lookback the endpointer keeps before speech starts.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import deque
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
    # The greatest `tier` given with any chunk this utterance's audio (from its start, the
    # endpointer's lookback included, up to now) came from; None when no chunk gave one.
    tier: object = None

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
        # The decoder's cepstral mean as of the last accepted utterance: the mean adapts to
        # what it hears, and seconds of loud noise skew it so far that the next command is
        # no longer recognised; an utterance dropped as too long gives it back.
        self._good_cmn = self._decoder.get_cmn()
        self.stats = {'chunks': 0, 'utterances': 0, 'rejected': 0, 'partials': 0,
                      'final_from_partial': 0,
                      'bad_chunks': 0, 'long_chunks': 0, 'too_long': 0, 'cut': 0}
        # Stream time (seconds of audio fed over this recognizer's life, every stream) and, per
        # run of chunks, (end time, tier): what audio each result came from.
        self._fed_s = 0.0          # end of the audio fed (pending bytes included)
        self._consumed_s = 0.0     # end of the audio given to the endpointer
        self._stream_t0 = 0.0      # where the current endpointer's clock starts
        self._tiers: deque[list] = deque()
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
        # The endpointer's clock restarts; its zero is the audio it is given next.
        self._stream_t0 = self._consumed_s

    def _drop_stream(self) -> None:
        """A new stream with nothing carried over: pending bytes and their tiers dropped."""
        self._fed_s = self._consumed_s
        self._tiers.clear()
        self._new_stream()

    # -- streaming ---------------------------------------------------------------------------
    def feed(self, chunk: bytes | bytearray | memoryview | np.ndarray,
             sample_rate: int | None = None, tier=None, new_stream: bool = False,
             bounded: bool = False) -> list[Recognition]:
        """Decode one chunk of 16 kHz mono int16 audio; return what it completed (partials,
        finals). AudioFormatError for another rate, a malformed chunk, or with `bounded` (what
        the asr plugin asks: its chunks come from the bus) one longer than max_chunk_s (nothing
        is consumed). `tier`: an ordered label of this chunk (the plugin's
        privacy tier) that results carry (the greatest of their audio's). `new_stream`: once
        the chunk is accepted, first drop whatever the stream holds (an utterance in progress
        gives no result, counted `cut`) and start afresh with this chunk."""
        data = self._check(chunk, sample_rate, limit=bounded)
        with self._lock:
            if new_stream:
                if self._in_utt:
                    self._decoder.end_utt()
                    self.stats['cut'] += 1
                self._drop_stream()
            self.stats['chunks'] += 1
            self._fed_s += len(data) / (2 * self.sample_rate)
            if tier is not None:
                self._add_tier(tier)
            buf = bytes(self._pending) + data
            self._pending = bytearray()
            out: list[Recognition] = []
            fb, pos = self._frame_bytes, 0
            while len(buf) - pos >= fb:
                self._consumed_s += fb / (2 * self.sample_rate)
                self._frame(buf[pos:pos + fb], out)
                pos += fb
            self._pending = bytearray(buf[pos:])
            self._trim_tiers()
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
            self._drop_stream()
            return out

    def reset(self) -> None:
        """Drop any utterance in progress (no result) and start a new stream."""
        with self._lock:
            if self._in_utt:
                self._decoder.end_utt()
            self._drop_stream()

    def recognize(self, samples: np.ndarray | bytes, sample_rate: int | None = None,
                  chunk_samples: int = 1600) -> list[Recognition]:
        """The final results for a whole clip fed in chunks (as a mic would), then finish()."""
        data = self._check(samples, sample_rate, limit=False)
        finals = []
        for i in range(0, len(data), 2 * chunk_samples):
            finals += [r for r in self.feed(data[i:i + 2 * chunk_samples]) if not r.partial]
        return finals + self.finish()

    # -- internals ---------------------------------------------------------------------------
    def _check(self, chunk, sample_rate: int | None, limit: bool = False) -> bytes:
        rate = self.sample_rate if sample_rate is None else sample_rate
        if limit:   # before any copy or conversion: the length alone decides
            size = chunk.size if isinstance(chunk, np.ndarray) else \
                len(chunk) // 2 if isinstance(chunk, (bytes, bytearray)) else \
                chunk.nbytes // 2 if isinstance(chunk, memoryview) else 0
            if size > self.config.max_chunk_s * self.sample_rate:
                self.stats['bad_chunks'] += 1
                self.stats['long_chunks'] += 1
                raise AudioFormatError(
                    f'a chunk of {size} samples ({size / self.sample_rate:.2f} s) is longer than '
                    f'asr.max_chunk_s ({self.config.max_chunk_s:g} s): send the audio in '
                    'shorter chunks')
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

    # -- where results' audio came from ------------------------------------------------------------
    _MAX_TIER_RUNS = 64   # more runs of tiers: the oldest two merged (the greater tier kept)

    def _add_tier(self, tier) -> None:
        runs = self._tiers
        if runs and runs[-1][1] == tier:
            runs[-1][0] = self._fed_s
            return
        runs.append([self._fed_s, tier])
        if len(runs) > self._MAX_TIER_RUNS:
            first = runs.popleft()
            runs[0][1] = max(first[1], runs[0][1])

    def _restore_cmn(self) -> None:
        try:
            self._decoder.set_cmn(self._good_cmn)
        except (RuntimeError, ValueError):
            pass   # keep the adapted mean: recognition degrades, nothing breaks

    def _trim_tiers(self) -> None:
        """Forget the tiers of audio no result can come from any more: before the utterance in
        progress, or, between utterances, older than the endpointer's lookback window."""
        frame = self._ep.frame_length
        if self._in_utt or self._ep.in_speech:
            floor = self._utt_abs_start() - frame
        else:
            floor = self._consumed_s - self.config.vad_window_s - 2 * frame
        while self._tiers and self._tiers[0][0] <= floor:
            self._tiers.popleft()

    def _utt_abs_start(self) -> float:
        return self._stream_t0 + self._utt_start

    def _utt_tier(self):
        """The greatest tier of the chunks overlapping the utterance so far (a frame of
        slack before its start: stricter, never laxer)."""
        floor = self._utt_abs_start() - self._ep.frame_length
        tiers = [tier for end, tier in self._tiers if end > floor]
        return max(tiers) if tiers else None

    def _frame(self, frame: bytes, out: list[Recognition]) -> None:
        was_speech = self._ep.in_speech
        speech = self._ep.process(frame)
        if speech is None:
            return
        if not was_speech or not self._in_utt:
            self._start_utt()
        self._process(speech)
        # The endpointer hands over speech a window behind what it has been given.
        if self._ep.in_speech and self._consumed_s - self.config.vad_window_s \
                - self._utt_abs_start() > self.config.max_utterance_s:
            # Noise (or someone) that never stops: drop the hypothesis, and restart the stream
            # so the endpointer looks for a new start and later commands are heard.
            self._decoder.end_utt()
            self.stats['too_long'] += 1
            self._restore_cmn()
            self._new_stream()
            return
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
                                       decode_ms=self._decode_ns / 1e6,
                                       tier=self._utt_tier()))

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
        self._good_cmn = self._decoder.get_cmn()
        phrase, slots = match if match is not None else ('', {})
        return Recognition(text=text, confidence=confidence, partial=False, phrase=phrase,
                           slots=slots, start_s=self._utt_start, end_s=end_s,
                           decode_ms=self._decode_ns / 1e6, tier=self._utt_tier())
