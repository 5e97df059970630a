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
    # The per-CPU tickers watched the run's window: what they saw, and whether at SCHED_FIFO.
    machine = run['machine']
    assert set(machine) == {'fifo', 'gaps', 'max_gap_ms'} and machine['gaps'] >= 0
    assert (machine['max_gap_ms'] > 15.0) == (machine['gaps'] > 0)


def test_a_ticker_gap_counts_in_the_window_it_overlaps(tmp_path):
    """ticker_window: a gap counts where its interval (its line's time minus the gap) meets
    the window; one ticker not at SCHED_FIFO makes the whole reading not FIFO."""
    sys.path.insert(0, str(REPO / 'bench'))
    from face_chain_bench import ticker_window
    ms = 1_000_000
    cpu0, cpu1 = tmp_path / 'ticker_0.txt', tmp_path / 'ticker_1.txt'
    cpu0.write_text(f'# fifo 1\n{1000 * ms} 40.0\n{2050 * ms} 100.0\n{5000 * ms} 20.0\n')
    cpu1.write_text(f'# fifo 1\n{1990 * ms} 16.5\n')
    window = ticker_window([cpu0, cpu1], 1500 * ms, 2000 * ms)
    assert window == {'fifo': True, 'gaps': 2, 'max_gap_ms': 100.0}   # ends 2050 (from 1950)
    assert ticker_window([cpu0], 3000 * ms, 4000 * ms) == \
        {'fifo': True, 'gaps': 0, 'max_gap_ms': 0.0}
    cpu1.write_text('# fifo 0\n')
    assert not ticker_window([cpu0, cpu1], 0, 10_000 * ms)['fifo']
    assert not ticker_window([tmp_path / 'missing.txt'], 0, 1)['fifo']
