"""The speech plugins behind the plugin contract: `asr` (mic audio events in, recognised commands
out) and `tts` (say requests in, WAV files and a done event out).

Mic event format (what `asr` reads): type `mic` or `mic.<name>`, payload = raw little-endian
int16 mono PCM, metadata `sample_rate` (default 16000; anything else is refused, resample first),
optional `channels` ("1") and `encoding` ("s16le"), and `end_of_stream: "true"` on the last
chunk of a stream to finish an utterance still being spoken. Chunks of any length up to
`max_chunk_s` (1 s by default; longer ones are refused and counted `long_chunks`).

Outputs: `speech.partial` {text, confidence, partial: true} while an utterance is spoken and
`speech.utterance` {text, confidence, partial: false, phrase, slots, start_s, end_s} when it ends;
the event's confidence is the decoder's posterior. Its privacy is the strictest effective privacy
(field or metadata) of every chunk its audio came from, and its `loom.subject` the one those
chunks name: a stream holds one subject's audio at a time (see AsrPlugin.handle_event). A chunk
longer than `max_chunk_s` is refused; an utterance longer than `max_utterance_s` is dropped.
`tts` takes `tts.say` or action events with a JSON object {text} (an action naming another
`action`/`tool` than say/speak/tts is ignored), writes <data_dir>/tts/<time>-<id>.wav and emits
`tts.done` {path, duration_s, sample_rate, text, request_id, played}.
Plugin config (ctx.config): `config_file` (default config/speech.yaml) and `asr`/`tts` mappings
whose keys override that file's section.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.privacy import (SUBJECT_METADATA_KEY, SubjectError, audit_excerpt,
                                  audit_withholds, effective_privacy, event_subject,
                                  named_subject)
from loom_ros.plugins.contract import (Capability, HealthState, HealthStatus, Plugin,
                                       PluginContext, PluginError, PluginMetadata, PluginResponse,
                                       PluginType)
from loom_ros.plugins.speech.audio import AudioFormatError
from loom_ros.plugins.speech.config import (AsrConfig, SpeechConfigError, TtsConfig, load_config,
                                            parse_config)

PARTIAL_TYPE = 'speech.partial'
UTTERANCE_TYPE = 'speech.utterance'
SAY_TYPE = 'tts.say'
DONE_TYPE = 'tts.done'
_SAY_ACTIONS = {'say', 'speak', 'tts'}
# A data subject's files go under <data_dir>/subjects/<subject>/ (data_dir: the plugin's own
# folder, <root>/plugins/tts), the folder erasure and export walk for every plugin
# (<root>/plugins/<plugin>/subjects/<subject>/, docs/privacy.md).
SUBJECTS = 'subjects'


def _section(ctx: PluginContext, name: str):
    """The `name` section of the speech config with ctx.config[name] overriding its keys."""
    config = ctx.config or {}
    try:
        base = load_config(config.get('config_file'))
        merged = base.model_dump()
        override = config.get(name) or {}
        if not isinstance(override, dict):
            raise SpeechConfigError(f'plugin config {name!r} must be a mapping')
        merged[name] = {**merged[name], **override}
        return getattr(parse_config(merged, f'{ctx.plugin} config'), name)
    except SpeechConfigError as exc:
        raise PluginError(str(exc)) from None


class AsrPlugin(Plugin):
    """Recognises the configured commands in a mic stream (one stream per plugin instance)."""

    metadata = PluginMetadata(
        name='asr', type=PluginType.FEATURE_EXTRACTOR, capabilities=(Capability.MIC_READ,),
        reads=('mic', 'mic.*'), writes=(PARTIAL_TYPE, UTTERANCE_TYPE),
        description='Command recognition (pocketsphinx 5, JSGF grammar or keyphrases) on 16 kHz '
                    'int16 mic chunks, with partial results')

    def __init__(self) -> None:
        super().__init__()
        self.recognizer = None
        self.config: AsrConfig | None = None
        self.counts = {'events': 0, 'bad_events': 0, 'partials': 0, 'utterances': 0,
                       'subject_cuts': 0}
        self.last_error = ''
        # The data subject ('' anonymous) of the audio in the recognizer's stream; None when
        # it holds none (start, or after an end_of_stream).
        self._subject: str | None = None

    def init(self, ctx: PluginContext) -> None:
        super().init(ctx)
        ctx.require(Capability.MIC_READ, 'asr listens to mic events')
        from loom_ros.plugins.speech.asr import ModelError, SpeechRecognizer
        self.config = _section(ctx, 'asr')
        try:
            self.recognizer = SpeechRecognizer(self.config)
        except (ModelError, SpeechConfigError) as exc:
            raise PluginError(f'asr: {exc}') from None

    def handle_event(self, event: Event) -> PluginResponse:
        """Feed one mic chunk; emit the partials and finals it completes.

        Whose words, and how private: every transcript is stamped with the strictest effective
        privacy of all the chunks its audio came from (the recognizer tracks it from the
        utterance's start, the endpointer's lookback included), never with the tier of
        whichever chunk happened to end it (one Public silence chunk from another publisher had
        made a Sensitive speaker's words Public and anonymous). And a stream holds one data
        subject's audio at a time: a chunk naming another subject than the stream's (another
        id, none after one, or one after none) starts a fresh stream, and an utterance in
        progress is dropped with no result, counted `subject_cuts`. Dropped rather than
        finished under the first subject: the endpointer runs a window behind, so the first
        speaker's last ~0.3 s would have to be flushed, and a cut-off command can be a
        different command ("stop moving" heard as "stop", in the grammar); the speaker's
        words so far only ever went out (as partials) under their own name, and no transcript
        ever holds two people's audio under one name (nor an attacker's under someone else's).
        """
        start = time.perf_counter()
        self.counts['events'] += 1
        if self.recognizer is None:
            return self._bad('asr is not initialised')
        if not isinstance(event.type, str) or not (event.type == 'mic'
                                                   or event.type.startswith('mic.')):
            return self._bad(f'asr reads mic audio events (mic, mic.*), got {event.type!r}')
        self.ctx.require(Capability.MIC_READ, event.type)
        meta = event.metadata if isinstance(event.metadata, dict) else {}
        try:
            rate = int(meta.get('sample_rate', self.config.sample_rate))
        except (TypeError, ValueError):
            return self._bad(f'metadata sample_rate {meta.get("sample_rate")!r} is not an integer')
        if str(meta.get('channels', '1')) != '1':
            return self._bad(f'{meta.get("channels")} channels: asr takes mono audio')
        if str(meta.get('encoding', 's16le')).lower() not in ('s16le', 'int16', 'pcm_s16le'):
            return self._bad(f'encoding {meta.get("encoding")!r}: asr takes s16le (int16 PCM)')
        if not isinstance(event.payload, (bytes, bytearray, memoryview)):
            return self._bad('payload must be int16 PCM bytes')
        tier = effective_privacy(event)
        subject = named_subject(event)
        switch = self._subject is not None and subject != self._subject
        cut_before = self.recognizer.stats['cut']
        try:
            results = self.recognizer.feed(event.payload, rate, tier=int(tier),
                                           new_stream=switch, bounded=True)
        except AudioFormatError as exc:
            return self._bad(str(exc))
        self.counts['subject_cuts'] += self.recognizer.stats['cut'] - cut_before
        self._subject = subject
        if str(meta.get('end_of_stream', '')).lower() == 'true':
            results += self.recognizer.finish()
            self._subject = None
        events = []
        for r in results:
            kind = PARTIAL_TYPE if r.partial else UTTERANCE_TYPE
            self.counts['partials' if r.partial else 'utterances'] += 1
            # The strictest tier of the audio it came from (LocalOnly if somehow unknown).
            privacy = Privacy(r.tier) if r.tier is not None else Privacy.LOCAL_ONLY
            events.append(Event.with_json(
                kind, r.as_dict() if not r.partial else
                {'text': r.text, 'confidence': r.confidence, 'partial': True},
                source=self.metadata.name, confidence=float(r.confidence),
                # What someone said is theirs: the transcript names the audio's data subject
                # (consent, erasure and the spoken answer follow it).
                metadata={'mic': event.type, 'audio_event': str(event.id),
                          **({SUBJECT_METADATA_KEY: subject} if subject else {})},
                privacy=privacy, frame_id=event.frame_id))
        return PluginResponse(events=events, latency_ms=(time.perf_counter() - start) * 1000)

    def _bad(self, error: str) -> PluginResponse:
        self.counts['bad_events'] += 1
        self.last_error = error
        return PluginResponse.failure(error)

    def health(self) -> HealthStatus:
        if self.recognizer is None:
            return HealthStatus(HealthState.FAILED, 'not initialised')
        details = {k: str(v) for k, v in {**self.counts, **self.recognizer.stats}.items()}
        if self.last_error:
            details['last_error'] = self.last_error
        return HealthStatus(HealthState.OK, f'{self.config.mode} over '
                            f'{len(self.config.expanded())} phrases', details)

    def shutdown(self) -> None:
        if self.recognizer is not None:
            self.recognizer.reset()
        self.recognizer = None


class TtsPlugin(Plugin):
    """Speaks text: a WAV under ctx.data_dir/tts per request, then `tts.done`."""

    metadata = PluginMetadata(
        name='tts', type=PluginType.ACTUATOR,
        capabilities=(Capability.TTS, Capability.STORAGE_WRITE,
                      Capability.PROCESS_SPAWN,   # its pyttsx3 worker process
                      Capability.NATIVE_CODE),    # espeak-ng through ctypes
        reads=(SAY_TYPE, 'agent.*.action'), writes=(DONE_TYPE,),
        description='Text to speech with pyttsx3 on espeak-ng: WAV file (played where a sound '
                    'card exists and config asks), then tts.done')

    def __init__(self) -> None:
        super().__init__()
        self.speaker = None
        self.config: TtsConfig | None = None
        self.out_dir: Path | None = None
        self.counts = {'events': 0, 'bad_events': 0, 'said': 0, 'ignored': 0}
        self.last_error = ''

    def init(self, ctx: PluginContext) -> None:
        super().init(ctx)
        ctx.require(Capability.TTS, 'tts speaks')
        ctx.require(Capability.STORAGE_WRITE, 'tts writes WAV files')
        if not ctx.data_dir:
            raise PluginError('tts needs a data_dir to write its WAV files into')
        from loom_ros.plugins.speech.tts import Speaker, TTSError
        self.config = _section(ctx, 'tts')
        self.out_dir = Path(ctx.data_dir) / 'tts'
        # <root>/plugins/tts/subjects/<subject>/ (ctx.data_dir is the plugin's own folder)
        self.subjects_dir = Path(ctx.data_dir) / SUBJECTS
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PluginError(f'tts cannot create {self.out_dir}: {exc}') from None
        try:
            self.speaker = Speaker(self.config)
        except TTSError as exc:
            raise PluginError(f'tts: {exc}') from None

    def handle_event(self, event: Event) -> PluginResponse:
        from loom_ros.plugins.speech.tts import TTSError
        start = time.perf_counter()
        self.counts['events'] += 1
        if self.speaker is None:
            return self._bad('tts is not initialised')
        try:
            data = json.loads(event.payload)
        except (TypeError, ValueError, UnicodeDecodeError):
            return self._bad(f'{event.type}: payload is not JSON (expected {{"text": ...}})')
        if not isinstance(data, dict):
            return self._bad(f'{event.type}: payload must be a JSON object with "text"')
        verb = data.get('action', data.get('tool'))
        if event.type != SAY_TYPE and verb is not None and str(verb).lower() not in _SAY_ACTIONS:
            self.counts['ignored'] += 1   # an action for another actuator
            return PluginResponse()
        text = data.get('text')
        if not isinstance(text, str) or not text.strip():
            return self._bad(f'{event.type}: "text" must be a non-empty string')
        try:   # an answer to a data subject is theirs: filed where erasure finds it
            subject = event_subject(event)
        except SubjectError as exc:
            return self._bad(f'{event.type}: {exc}')
        folder = self.subjects_dir / subject if subject else self.out_dir
        if subject:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                return self._bad(f'tts cannot create the subject folder: {exc.strerror}')
        name = re.sub(r'[^A-Za-z0-9_-]', '_', str(event.id))[:64]
        path = folder / f'{time.strftime("%Y%m%dT%H%M%S")}-{name}.wav'
        # The append-only audit keeps nothing erasure could not take back, nor anyone's words
        # from an event above Public: then only the request's id, type and size, and the file's
        # name (a time and the request id), never its subject folder.
        withheld = audit_withholds(event)
        self.ctx.require(Capability.TTS, audit_excerpt(event, text, 60))
        self.ctx.require(Capability.STORAGE_WRITE, path.name if withheld else str(path))
        if withheld:
            self.ctx.audit('tts_say', path=path.name, request_id=str(event.id),
                           request_type=event.type, chars=len(text), withheld=withheld)
        else:
            self.ctx.audit('tts_say', text=audit_excerpt(event, text, 200), path=str(path),
                           request_id=str(event.id))
        try:
            out = self.speaker.say(text, path)
        except TTSError as exc:
            return self._bad(str(exc))
        self.counts['said'] += 1
        self._prune(folder)
        done = Event.with_json(DONE_TYPE, {
            'path': out.path, 'duration_s': round(out.duration_s, 3),
            'sample_rate': out.sample_rate, 'text': text, 'request_id': str(event.id),
            'played': out.played}, source=self.metadata.name,
            metadata={'request_type': event.type}, privacy=event.privacy)
        return PluginResponse(events=[done], latency_ms=(time.perf_counter() - start) * 1000)

    def _prune(self, folder: Path) -> None:
        files = sorted(folder.glob('*.wav'), key=lambda p: p.stat().st_mtime_ns)
        for old in files[:max(0, len(files) - self.config.keep_last)]:
            old.unlink(missing_ok=True)

    def _bad(self, error: str) -> PluginResponse:
        self.counts['bad_events'] += 1
        self.last_error = error
        return PluginResponse.failure(error)

    def health(self) -> HealthStatus:
        if self.speaker is None:
            return HealthStatus(HealthState.FAILED, 'not initialised')
        details = {k: str(v) for k, v in {**self.counts, **self.speaker.stats}.items()}
        if self.last_error:
            details['last_error'] = self.last_error
        state = HealthState.DEGRADED if self.speaker.stats['timeouts'] else HealthState.OK
        return HealthStatus(state, f'voice {self.config.voice}, {self.config.isolation}', details)

    def shutdown(self) -> None:
        if self.speaker is not None:
            self.speaker.close()
        self.speaker = None
