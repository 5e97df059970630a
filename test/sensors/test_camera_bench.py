"""The camera-frame benchmark stays runnable: a tiny run writes its JSON and table (no timing
assertions here; numbers live in bench/results/camera.md)."""
import json
import subprocess
import sys

from harness import REPO, WAIT_LIMIT_S


def test_camera_bench_smoke(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / 'bench' / 'camera_bench.py'), '--options', 'loom',
         '--modes', '30hz', '--kinds', 'raw,loom,service', '--frames', '5', '--rounds', '1',
         '--ranges', 'LOCALHOST', '--out', str(tmp_path)],
        capture_output=True, text=True, timeout=3 * WAIT_LIMIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / 'camera.json').read_text())['rows']
    assert {r['kind'] for r in rows} == {'raw', 'loom', 'service'}
    assert all(r['sent'] == 5 and 0 <= r['received'] <= 5 for r in rows), rows
    table = (tmp_path / 'camera.md').read_text()
    assert '| LOCALHOST | loom | 30hz | realtime | service |' in table
