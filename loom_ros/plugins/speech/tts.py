"""Text to speech: pyttsx3 on espeak-ng writes each sentence to a WAV file, headless.

pyttsx3 is not thread-safe, keeps one espeak engine per process, and its run loop can hang (an
empty text never finishes, and it asserts on it). So by default synthesis runs in a child
process (`python -m loom_ros.plugins.speech.tts --worker`) that speaks JSON lines on a pipe:
the parent waits with a timeout, and a worker that hangs is killed and restarted on the next
call. `isolation: inline` runs pyttsx3 in this process instead (a timeout cancels the
utterance, but a hung espeak-ng cannot be replaced). Either way the WAV appears complete, by a
rename, only once espeak-ng has finished the utterance (see _Pyttsx3Engine).
Playback (aplay) happens only when config asks for it and a sound card exists.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path

from loom_ros.bringup.processes import Process
from loom_ros.plugins.sandbox.subprocess import child_environment
from loom_ros.plugins.speech.audio import AudioFormatError, read_wav
from loom_ros.plugins.speech.config import TtsConfig

ESPEAK_LIBRARY = 'libespeak-ng.so.1'   # what pyttsx3's espeak driver loads on Linux
MAX_REPLY_CHARS = 64 * 1024            # a worker's reply line is a few dozen bytes
WORKER_PASS_ENV = ('ESPEAK_DATA_PATH',)   # the worker's besides the sandbox's allowlist


class TTSError(RuntimeError):
    """Speech that could not be produced: missing engine, bad voice, bad text, timeout."""


@dataclass
class SpeechOutput:
    path: str
    duration_s: float
    sample_rate: int
    synth_ms: float
    played: bool = False
    play_error: str = ''


def check_espeak(library: str = ESPEAK_LIBRARY) -> None:
    """TTSError with the fix when the espeak-ng shared library pyttsx3 needs cannot be loaded."""
    try:
        ctypes.CDLL(library)
    except OSError as exc:
        raise TTSError(f'espeak-ng is not installed: pyttsx3 needs the shared library {library} '
                       f'({exc}); on Debian/Ubuntu: apt install libespeak-ng1 espeak-ng-data') \
            from None


def audio_output_available() -> bool:
    """A sound card and aplay: false in containers and CI, where playing is skipped."""
    try:
        cards = Path('/proc/asound/cards').read_text()
    except OSError:
        return False
    return bool(shutil.which('aplay')) and 'no soundcards' not in cards and bool(cards.strip())


def play(path: str | Path, timeout_s: float) -> str:
    """Play a WAV with aplay; '' when it played, else why not (never raises)."""
    if not audio_output_available():
        return 'no audio device'
    try:
        done = subprocess.run(['aplay', '-q', str(path)], capture_output=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f'aplay failed: {exc}'
    return '' if done.returncode == 0 else f'aplay exit {done.returncode}: {done.stderr[-200:]!r}'


# -- the pyttsx3 part (runs in the worker, or inline) ---------------------------------------------
class _Pyttsx3Engine:
    """pyttsx3's espeak-ng, with the voice checked (pyttsx3 ignores an unknown voice silently)
    and each utterance synthesized to completion before synthesize() returns.

    Why not pyttsx3's save_to_file + runAndWait: its espeak driver starts espeak-ng in
    AUDIO_OUTPUT_RETRIEVAL mode, where espeak_Synth only queues the text and espeak-ng's own
    thread synthesizes it; runAndWait returns after one 10 ms sleep, and the driver writes the
    WAV later from that thread (dropping the last buffer, and now and then cancelling the next
    utterance from its stale "is playing" check). On a loaded machine the caller then read a
    missing or half-written file ("no usable WAV ... no such file", "empty WAV"). Here our own
    callback collects every buffer of this utterance (tagged with its own id), we wait for
    espeak-ng's end-of-message event, and the WAV appears at `path` complete, by one rename."""

    SAMPLE_RATE = 22050   # what espeak-ng voices synthesize at (pyttsx3 assumes it too)

    def __init__(self, voice: str, rate_wpm: int, volume: float):
        check_espeak()
        with contextlib.redirect_stdout(io.StringIO()):
            import pyttsx3
            from pyttsx3.drivers import _espeak
            try:
                self.engine = pyttsx3.init('espeak')   # initializes espeak-ng once per process
            except Exception as exc:   # pyttsx3 raises RuntimeError/OSError from espeak init
                raise TTSError(f'pyttsx3 cannot start espeak-ng: {exc}') from None
        self._espeak = _espeak
        voices = self.engine.getProperty('voices')
        wanted = voice.lower()
        match = next((v.id for v in voices if wanted in (v.id.lower(), v.id.split('/')[-1].lower(),
                                                          v.name.lower())), None)
        if match is None:
            english = sorted(v.id.split('/')[-1] for v in voices if '/en' in v.id)
            raise TTSError(f'espeak-ng has no voice {voice!r}; '
                           f'English voices: {", ".join(english)}')
        # Set directly: pyttsx3 only queues properties until its next run loop.
        if _espeak.SetVoiceByName(match.encode()) != _espeak.EE_OK:
            raise TTSError(f'espeak-ng cannot select voice {match!r}')
        _espeak.SetParameter(_espeak.RATE, int(rate_wpm), 0)
        _espeak.SetParameter(_espeak.VOLUME, int(round(volume * 100)), 0)
        self._ids = itertools.count(1)
        self._current = 0            # the id of the utterance being collected (0: none)
        self._chunks: list[bytes] = []
        self._done = threading.Event()
        _espeak.SetSynthCallback(self._on_synth)   # replaces the driver's; pyttsx3 keeps a ref

    def _on_synth(self, wav, numsamples, events) -> int:
        """espeak-ng's thread: keep this utterance's samples; anything else is stale."""
        i, mine, finished = 0, False, False
        while events[i].type != self._espeak.EVENT_LIST_TERMINATED:
            if events[i].user_data == self._current and self._current:
                mine = True
                finished = finished or events[i].type == self._espeak.EVENT_MSG_TERMINATED
            i += 1
        if mine and numsamples > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, numsamples * 2))
        if finished:
            self._done.set()
        return 0

    def synthesize(self, text: str, path: str, timeout_s: float = 60.0) -> None:
        """Write `text` as a complete WAV at `path`, or raise; the file never exists half-made."""
        utterance = next(self._ids)
        self._chunks, self._current = [], utterance
        self._done.clear()
        status = self._espeak.Synth(text.encode('utf-8'),
                                    flags=self._espeak.ENDPAUSE | self._espeak.CHARS_UTF8,
                                    user_data=utterance)
        if status != self._espeak.EE_OK:
            self._current = 0
            raise TTSError(f'espeak-ng refused the text (status {status})')
        finished = self._done.wait(timeout_s)
        self._current = 0
        if not finished:
            self._espeak.Cancel()
            raise TTSError(f'espeak-ng did not finish within {timeout_s} s')
        partial = f'{path}.{os.getpid()}-{utterance}.part'
        try:
            with wave.open(partial, 'wb') as wav:
                wav.setnchannels(1)
                wav.setsampwidth(2)
                wav.setframerate(self.SAMPLE_RATE)
                wav.writeframes(b''.join(self._chunks))
            os.replace(partial, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)


def _worker_main() -> int:
    """JSON lines in on stdin, JSON lines out on the original stdout; nothing else on it."""
    out = os.fdopen(os.dup(1), 'w', buffering=1)
    os.dup2(2, 1)   # anything a library prints goes to stderr, never into the protocol
    config = json.loads(sys.stdin.readline())
    try:
        engine = _Pyttsx3Engine(config['voice'], config['rate_wpm'], config['volume'])
    except TTSError as exc:
        out.write(json.dumps({'ok': False, 'error': str(exc)}) + '\n')
        return 1
    out.write(json.dumps({'ok': True, 'ready': True}) + '\n')
    for line in sys.stdin:
        request = json.loads(line)
        try:
            engine.synthesize(request['text'], request['path'])
            out.write(json.dumps({'ok': True}) + '\n')
        except Exception as exc:  # reported to the parent, which raises TTSError
            out.write(json.dumps({'ok': False, 'error': f'{type(exc).__name__}: {exc}'}) + '\n')
    return 0


class _Worker:
    """The parent's handle on one worker process, started by bringup.processes: its own process
    group, SIGKILLed should this process die (even when started from a request thread), and a
    bounded tail of its stderr for the reason it died."""

    def __init__(self, config: TtsConfig):
        # The sandbox's allowlist (Loom's package root on PYTHONPATH, no secrets): the worker
        # runs espeak-ng on text from events and needs none of this process's keys.
        env = child_environment(WORKER_PASS_ENV)
        self.process = Process(
            [sys.executable, '-m', 'loom_ros.plugins.speech.tts', '--worker'], name='loom-tts',
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            death_signal=signal.SIGKILL).start()
        self.proc = self.process.popen
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.send({'voice': config.voice, 'rate_wpm': config.rate_wpm, 'volume': config.volume})

    def send(self, obj: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(obj) + '\n')
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            self.process.wait(5)
            raise TTSError(f'the TTS worker {self.process.exit_reason()} ({exc})') from None

    def receive(self, timeout_s: float) -> dict:
        if not self.selector.select(timeout_s):
            raise TimeoutError
        line = self.proc.stdout.readline(MAX_REPLY_CHARS)
        if not line:
            self.process.wait(5)
            raise TTSError(f'the TTS worker {self.process.exit_reason()}')
        try:
            return json.loads(line)
        except ValueError:
            raise TTSError(f'the TTS worker sent a broken reply: {line[:200]!r}') from None

    def close(self) -> None:
        self.process.kill()   # its whole group, at once: it keeps no state
        self.selector.close()
        with contextlib.suppress(OSError):
            self.proc.stdout.close()


_INLINE_LOCK = threading.Lock()   # one pyttsx3 engine per process, used by one thread at a time


class Speaker:
    """say(text, path) -> SpeechOutput. Starts its engine at construction so errors come early."""

    def __init__(self, config: TtsConfig | None = None, *, espeak_library: str = ESPEAK_LIBRARY):
        self.config = config or TtsConfig()
        check_espeak(espeak_library)
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._inline: _Pyttsx3Engine | None = None
        self.stats = {'said': 0, 'errors': 0, 'timeouts': 0, 'restarts': 0, 'empty_wav_retries': 0}
        if self.config.isolation == 'inline':
            with _INLINE_LOCK:
                self._inline = _Pyttsx3Engine(self.config.voice, self.config.rate_wpm,
                                              self.config.volume)
        else:
            self._start_worker()

    def _start_worker(self) -> None:
        worker = _Worker(self.config)
        try:
            reply = worker.receive(max(self.config.timeout_s, 30.0))  # imports on a loaded machine
        except TimeoutError:
            worker.close()
            raise TTSError('the TTS worker did not start in time') from None
        except TTSError:
            worker.close()
            raise
        if not reply.get('ok'):
            worker.close()
            raise TTSError(reply.get('error', 'the TTS worker failed to start'))
        self._worker = worker

    def say(self, text: str, path: str | Path) -> SpeechOutput:
        """Synthesize `text` into the WAV file `path`; play it when config.play and a device."""
        if not isinstance(text, str) or not text.strip():
            raise TTSError('nothing to say: text is empty')
        if len(text) > self.config.max_chars:
            raise TTSError(f'text of {len(text)} characters exceeds tts.max_chars '
                           f'({self.config.max_chars})')
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        start = time.perf_counter()
        # Empty WAVs used to come from reading pyttsx3's file before its driver had written it
        # (see _Pyttsx3Engine); should espeak-ng itself give no samples, one more synthesis is
        # tried (counted), and both failing is an error.
        for attempt in range(2):
            with self._lock:
                try:
                    self._synthesize(text, str(path))
                except TTSError:
                    self.stats['errors'] += 1
                    raise
            try:
                samples, rate = read_wav(path)
            except AudioFormatError as exc:
                self.stats['errors'] += 1
                raise TTSError(f'espeak-ng produced no usable WAV: {exc}') from None
            if samples.size:
                break
            self.stats['empty_wav_retries'] += 1
        else:
            self.stats['errors'] += 1
            raise TTSError(f'espeak-ng produced an empty WAV for {text[:40]!r}')
        synth_ms = (time.perf_counter() - start) * 1000
        out = SpeechOutput(str(path), samples.size / rate, rate, synth_ms)
        if self.config.play:
            out.play_error = play(path, out.duration_s + 5.0)
            out.played = not out.play_error
        self.stats['said'] += 1
        return out

    def _synthesize(self, text: str, path: str) -> None:
        if self._inline is not None:
            with _INLINE_LOCK:
                try:
                    self._inline.synthesize(text, path, self.config.timeout_s)
                except Exception as exc:
                    raise TTSError(f'pyttsx3 failed: {type(exc).__name__}: {exc}') from None
            return
        if self._worker is None or self._worker.proc.poll() is not None:
            if self._worker is not None:
                self._worker.close()
            self.stats['restarts'] += 1
            self._start_worker()
        try:
            self._worker.send({'text': text, 'path': path})
            reply = self._worker.receive(self.config.timeout_s)
        except TimeoutError:
            self.stats['timeouts'] += 1
            self._worker.close()
            self._worker = None
            raise TTSError(f'speech synthesis did not finish in {self.config.timeout_s} s '
                           '(the TTS worker was killed; the next call starts a new one)') from None
        except TTSError:
            self._worker.close()
            self._worker = None
            raise
        if not reply.get('ok'):
            raise TTSError(f'speech synthesis failed: {reply.get("error")}')

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    def __enter__(self) -> 'Speaker':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == '__main__' and sys.argv[1:] == ['--worker']:
    sys.exit(_worker_main())
