"""The benchmark stays runnable: a short latency run writes its JSON and table (no timing
assertions here; numbers live in bench/results)."""
import json
import subprocess
import sys

from harness import REPO


def test_quick_latency_run_writes_results(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / 'bench' / 'bus_bench.py'), 'latency',
                           '--quick', '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / 'bus.json').read_text())
    rows = {(r['where'], r['level']) for r in results['latency']}
    assert rows == {(w, l) for w in ('in_process', 'cross_process')
                    for l in ('realtime', 'batched', 'background')}
    for row in results['latency']:  # structure only: how many arrive depends on machine load
        for side in ('loom', 'raw'):
            assert 0 < row[side]['received_per_sub'][0] <= row[side]['sent']
            assert row[side]['latency']['p50_us'] <= row[side]['latency']['p99_us']
    assert '| where | level |' in (tmp_path / 'bus.md').read_text()
    assert results['machine']['cores'] >= 1
