"""The speech benchmark stays runnable: a quick run writes its JSON and table (structure only;
the numbers live in bench/results/speech.*)."""
import json
import subprocess
import sys

from harness import REPO


def test_quick_speech_run_writes_results(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / 'bench' / 'speech_bench.py'), '--quick',
                           '--out', str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / 'speech.json').read_text())
    for key in ('baseline_raw_pocketsphinx', 'recognizer_total', 'recognizer_end_latency'):
        row = results['asr'][key]
        assert row['n'] > 0 and row['p50_ms'] <= row['p99_ms'] <= row['max_ms']
    for key in ('baseline_espeak_ng_cli', 'speaker_worker_process', 'pyttsx3_inline'):
        assert results['tts'][key]['n'] == results['sentences']
    assert results['ratios']['asr_p50'] > 0 and results['ratios']['tts_p50'] > 0
    assert '| path | P50 |' in (tmp_path / 'speech.md').read_text()
