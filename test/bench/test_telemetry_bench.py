"""The telemetry benchmark stays runnable: a quick run writes its JSON and table (structure only;
numbers live in bench/results)."""
import json
import subprocess
import sys

from harness import REPO


def test_quick_telemetry_run_writes_results(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / 'bench' / 'telemetry_bench.py'), '--quick',
                           '--out', str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / 'telemetry.json').read_text())
    timed = [r for r in results['publish'] if 'mean_us' in r]
    assert len(timed) == 6 and timed[0]['ratio_to_baseline'] == 1.0
    assert all(r['p50_us'] <= r['p99_us'] <= r['max_us'] for r in timed)
    assert any(r.get('spans', 0) > 0 for r in results['publish'])
    assert {r['operation'] for r in results['histogram']} >= {'Histogram.record (locked)'}
    assert '| scenario |' in (tmp_path / 'telemetry.md').read_text()
