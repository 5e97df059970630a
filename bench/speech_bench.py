"""Benchmark of the speech plugins' cores: recognition and synthesis latency per utterance, each
beside a baseline measured in the same run on the same input.

    python bench/speech_bench.py [--quick]     # writes bench/results/speech.md and speech.json

ASR: every sentence of config/speech.yaml's grammar, spoken by our TTS (espeak-ng, en-us,
150 wpm), resampled to 16 kHz with 0.5 s of silence each side, fed to SpeechRecognizer in 100 ms
chunks (endpointing, partials, final). Measured per utterance: the total processing time, the
real-time factor (processing / audio seconds), and the end latency (the feed() call that
returns the final result). Baseline: raw pocketsphinx (same model, grammar and dither) decoding
the same samples in one process_raw call, no endpointer, no partials.
TTS: Speaker.say (pyttsx3 in its worker process) per sentence vs the espeak-ng CLI
(`espeak-ng -v en-us -s 150 -w out.wav TEXT`, a process per sentence, the usual shell-out), and
pyttsx3 inline (no process boundary).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bus_bench import machine, summarize  # noqa: E402  (same machine record and percentiles)


def ms(values_us: dict) -> dict:
    return {k.replace('_us', '_ms'): (round(v / 1000, 2) if k.endswith('_us') else v)
            for k, v in values_us.items()}


def tts_bench(sentences: list[str], repeats: int, folder: Path) -> tuple[dict, dict]:
    from loom_ros.plugins.speech.config import load_config
    from loom_ros.plugins.speech.tts import Speaker
    cfg = load_config().tts
    worker, inline, cli, durations = [], [], [], []
    clips = {}
    with Speaker(cfg) as speaker:
        inline_speaker = Speaker(cfg.model_copy(update={'isolation': 'inline'}))
        speaker.say('warm up', folder / 'warm.wav')
        inline_speaker.say('warm up', folder / 'warm2.wav')
        for r in range(repeats):
            for n, text in enumerate(sentences):
                start = time.perf_counter_ns()
                out = speaker.say(text, folder / f'w{n}.wav')
                worker.append((time.perf_counter_ns() - start) / 1000)
                durations.append(out.duration_s)
                clips[text] = out.path
                start = time.perf_counter_ns()
                inline_speaker.say(text, folder / f'i{n}.wav')
                inline.append((time.perf_counter_ns() - start) / 1000)
                start = time.perf_counter_ns()
                subprocess.run(['espeak-ng', '-v', cfg.voice, '-s', str(cfg.rate_wpm), '-w',
                                str(folder / f'c{n}.wav'), text], check=True)
                cli.append((time.perf_counter_ns() - start) / 1000)
    result = {'baseline_espeak_ng_cli': ms(summarize(cli)),
              'speaker_worker_process': ms(summarize(worker)),
              'pyttsx3_inline': ms(summarize(inline)),
              'audio_seconds_mean': round(float(np.mean(durations)), 2)}
    return result, clips


def asr_bench(clips: dict[str, str], repeats: int) -> dict:
    from loom_ros.plugins.speech.asr import SpeechRecognizer, jsgf_grammar, model_paths
    from loom_ros.plugins.speech.audio import ASR_RATE, read_wav, resample
    from loom_ros.plugins.speech.config import load_config
    from pocketsphinx import Decoder
    cfg = load_config().asr
    pad = np.zeros(ASR_RATE // 2, dtype=np.int16)
    audio = {}
    for text, path in clips.items():
        samples, rate = read_wav(path)
        audio[text] = np.concatenate([pad, resample(samples, rate, ASR_RATE), pad])

    hmm, dic = model_paths()
    raw = Decoder(hmm=str(hmm), dict=str(dic), lm=None, loglevel='FATAL', dither=cfg.dither,
                  seed=cfg.seed)
    raw.add_jsgf_string('loom', jsgf_grammar(cfg))
    raw.activate_search('loom')
    rec = SpeechRecognizer(cfg)
    total, end_latency, rtf, raw_total, raw_rtf, wait = [], [], [], [], [], []
    right = raw_right = n = 0
    for _ in range(repeats):
        for text, samples in audio.items():
            seconds = samples.size / ASR_RATE
            data = samples.tobytes()
            n += 1
            # Loom: 100 ms chunks through endpointing, partials and the final result.
            finals, spent = [], 0
            for i in range(0, len(data), 3200):
                start = time.perf_counter_ns()
                got = rec.feed(data[i:i + 3200])
                took = time.perf_counter_ns() - start
                spent += took
                for r in got:
                    if not r.partial:
                        end_latency.append(took / 1000)
                        # Stream time when the result came out, past the endpointer's speech end:
                        # the VAD window a final result waits for (algorithmic, not CPU).
                        wait.append((min(i + 3200, len(data)) / 2 / ASR_RATE - r.end_s) * 1e6)
                finals += [r for r in got if not r.partial]
            start = time.perf_counter_ns()
            finals += rec.finish()
            spent += time.perf_counter_ns() - start
            total.append(spent / 1000)
            rtf.append(spent / 1e9 / seconds)
            right += [r.text for r in finals] == [text]
            # Baseline: raw pocketsphinx on the same samples, one call.
            start = time.perf_counter_ns()
            raw.start_utt()
            raw.process_raw(data, False, True)
            raw.end_utt()
            hyp = raw.hyp()
            took = time.perf_counter_ns() - start
            raw_total.append(took / 1000)
            raw_rtf.append(took / 1e9 / seconds)
            raw_right += hyp is not None and hyp.hypstr == text
    return {'baseline_raw_pocketsphinx': ms(summarize(raw_total)),
            'recognizer_total': ms(summarize(total)),
            'recognizer_end_latency': ms(summarize(end_latency)),
            'final_after_speech_end': ms(summarize(wait)),
            'real_time_factor': {'recognizer_p50': round(float(np.percentile(rtf, 50)), 4),
                                 'baseline_p50': round(float(np.percentile(raw_rtf, 50)), 4)},
            'accuracy': {'recognizer': f'{right}/{n}', 'baseline': f'{raw_right}/{n}'},
            'audio_seconds_mean': round(float(np.mean([a.size / ASR_RATE
                                                        for a in audio.values()])), 2)}


def write_markdown(results: dict, path: Path) -> None:
    m = results['machine']
    asr, tts = results['asr'], results['tts']
    lines = ['# Speech benchmark', '',
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}; "
             f"Python {m['python']}; {m['date']}. {results['note']}", '',
             f"Sentences: every sentence of the config/speech.yaml grammar "
             f"({results['sentences']}), x{results['repeats']}. Latency in milliseconds.", '',
             '| path | P50 | P99 | max | n |', '| --- | --- | --- | --- | --- |']
    rows = [('ASR baseline: raw pocketsphinx, one call', asr['baseline_raw_pocketsphinx']),
            ('ASR: SpeechRecognizer, 100 ms chunks, per utterance', asr['recognizer_total']),
            ('ASR: end latency (feed call returning the final)', asr['recognizer_end_latency']),
            ('ASR: audio time from speech end to final (VAD window)',
             asr['final_after_speech_end']),
            ('TTS baseline: espeak-ng CLI per sentence', tts['baseline_espeak_ng_cli']),
            ('TTS: Speaker (pyttsx3 worker process)', tts['speaker_worker_process']),
            ('TTS: pyttsx3 inline', tts['pyttsx3_inline'])]
    for name, s in rows:
        lines.append(f"| {name} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} | {s['n']} |")
    r = results['ratios']
    lines += ['', f"ASR per utterance over raw pocketsphinx, P50 ratio: {r['asr_p50']} "
              f"(real-time factor P50 {asr['real_time_factor']['recognizer_p50']} vs "
              f"{asr['real_time_factor']['baseline_p50']}; utterances "
              f"{asr['audio_seconds_mean']} s on average). Accuracy in this run: recognizer "
              f"{asr['accuracy']['recognizer']}, raw baseline {asr['accuracy']['baseline']}. "
              'The recognizer is cheaper than the baseline because its endpointer hands only '
              'speech to the decoder (the baseline also decodes the 1 s of padding silence); '
              'a final result arrives one VAD window (vad_window_s) after speech ends.',
              f"TTS Speaker over espeak-ng CLI, P50 ratio: {r['tts_p50']} (sentences of "
              f"{tts['audio_seconds_mean']} s of audio on average). pyttsx3's espeak driver "
              'polls its loop every 10 ms, which is most of its time; the CLI pays a process '
              'start per sentence.']
    path.write_text('\n'.join(lines) + '\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='fewer repeats (smoke test)')
    parser.add_argument('--out', default=str(HERE / 'results'))
    args = parser.parse_args()
    from loom_ros.plugins.speech.config import load_config
    sentences = load_config().asr.expanded()
    repeats = 1 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix='loom-speech-bench-') as tmp:
        tts, clips = tts_bench(sentences, repeats, Path(tmp))
        asr = asr_bench(clips, repeats)
    results = {
        'machine': machine(),
        'note': 'Measured while other engineers ran builds and tests on the same 2 cores '
                '(under load): the lead re-runs this.',
        'sentences': len(sentences), 'repeats': repeats, 'asr': asr, 'tts': tts,
        'ratios': {
            'asr_p50': round(asr['recognizer_total']['p50_ms']
                             / asr['baseline_raw_pocketsphinx']['p50_ms'], 2),
            'tts_p50': round(tts['speaker_worker_process']['p50_ms']
                             / tts['baseline_espeak_ng_cli']['p50_ms'], 2)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'speech.json').write_text(json.dumps(results, indent=1) + '\n')
    write_markdown(results, out / 'speech.md')
    print((out / 'speech.md').read_text())


if __name__ == '__main__':
    main()
