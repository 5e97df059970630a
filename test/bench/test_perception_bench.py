"""The perception benchmark stays runnable: a few frames write its JSON and table (structure only,
no timing assertions; numbers live in bench/results)."""
import json
import subprocess
import sys

from harness import REPO


def test_short_perception_run_writes_results(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / 'bench' / 'perception_bench.py'),
                           '--frames', '5', '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / 'perception.json').read_text())
    assert results['frame']['faces'] == [1] and results['frame']['labels'] == ['happy']
    for stage in ('decode_png', 'detect', 'expression', 'total_raw', 'baseline_face_invoke'):
        summary = results['stages'][stage]
        assert summary['n'] == 5 and 0 < summary['p50_ms'] <= summary['p99_ms'] <= summary['max_ms']
    assert '| stage | what | P50 |' in (tmp_path / 'perception.md').read_text()
