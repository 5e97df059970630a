"""`loom storage stats|query|compact` as a user runs it: a real process on real files written
through the storage layer at a time far in the past (its injected clock: the lifecycle ages a
row from when the store wrote it; the CLI uses wall time)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from harness import loom_cli

from loom_ros.bus.event import Event
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.storage import Storage, StorageConfig

OLD_MS = 1_700_000_000_000   # 2023-11: past every default age except archive's (kept)


def loom(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *loom_cli('storage', *args)], capture_output=True,
                          text=True, timeout=120)


def test_stats_query_compact_and_rebuild(tmp_path):
    root = str(tmp_path)
    now = [OLD_MS]
    with Storage(StorageConfig(root=root, unit='host1'), clock=lambda: now[0]) as s:
        for i in range(50):
            now[0] = OLD_MS + i * 1000
            s.episodes.record('greeter', Event(type='speech.heard', source='mic', id=f'e{i}',
                                                payload=b'the user asked for coffee %d' % i,
                                                timestamp_ms=OLD_MS + i * 1000))
        now[0] = time.time_ns() // 1_000_000
        s.episodes.record('greeter', Event(type='speech.heard', source='mic', id='new',
                                           payload=b'fresh')).wait(10)
    stats = loom('stats', '--root', root, '--embedder', 'hash', '--json')
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)['tiers']['warm']['rows'] == 51
    found = loom('query', 'episodes', '--root', root, '--embedder', 'hash', '--agent', 'greeter',
                 '--until-ms', str(OLD_MS + 4_500))
    assert [json.loads(line)['event_id'] for line in found.stdout.splitlines()] == \
        ['e0', 'e1', 'e2', 'e3', 'e4']
    # Times past SQLite's 64-bit integers are the ends of time, not an OverflowError traceback
    # (review finding).
    wide = loom('query', 'episodes', '--root', root, '--embedder', 'hash', '--agent', 'greeter',
                '--since-ms', str(-10**20), '--until-ms', str(10**20), '--limit', '100')
    assert wide.returncode == 0 and len(wide.stdout.splitlines()) == 51, wide.stderr
    compact = loom('compact', '--root', root, '--embedder', 'hash', '--json')
    assert compact.returncode == 0, compact.stderr
    tiers = json.loads(compact.stdout)['tiers']
    # 2020 is past warm (1 day) and cold (30 days): condensed, then archived (kept: archive_s 0)
    buckets = len({(OLD_MS + i * 1000) // 60_000 for i in range(50)})   # bucket_s 60
    assert (tiers['warm']['rows'], tiers['cold']['rows'], tiers['archive']['rows']) == (1, 0, buckets)
    StorageLayout.at(root).cold_index('host1').write_bytes(b'garbage')
    broken = loom('query', 'memories', 'coffee', '--root', root, '--embedder', 'hash')
    assert broken.returncode == 1 and '--rebuild-index' in broken.stderr
    fixed = loom('compact', '--rebuild-index', '--root', root, '--embedder', 'hash')
    assert fixed.returncode == 0 and 'cold index rebuilt' in fixed.stdout, fixed.stderr
    bad = loom('query', 'episodes', '--root', root, '--unit', 'nope', '--embedder', 'hash')
    assert bad.returncode == 1 and "no storage database 'nope'" in bad.stderr
