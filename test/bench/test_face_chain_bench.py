"""The face-chain benchmark stays runnable: the raw rclpy chain alone for a few seconds writes
its JSON and table (structure only, no timing assertions; numbers live in bench/results)."""
import json
import os
import subprocess
import sys

from harness import REPO


def test_short_chain_run_writes_results(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / 'bench' / 'face_chain_bench.py'),
                           '--kinds', 'chain', '--rounds', '1', '--duration', '2',
                           '--domain', os.environ['ROS_DOMAIN_ID'], '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / 'face_chain.json').read_text())
    (run,) = results['runs']
    chain = run['chain']
    # Two seconds at 30 Hz after the warm-up; every frame with a face made a state.
    assert run['kind'] == 'chain' and 30 <= chain['n'] == len(run['chain_samples']) <= 70
    assert 0 < chain['p50'] <= chain['p99'] <= chain['max']
    assert results['pooled']['chain/chain']['n'] == chain['n']
    assert '| round | kind | load |' in (tmp_path / 'face_chain.md').read_text()
