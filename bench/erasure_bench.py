"""Erasure benchmark (issue 17): how long `forget` takes against the amount a unit database
holds (10,000, 100,000 and 1,000,000 records), next to a raw SQLite baseline of the same run
that gives the same physical guarantee on a copy of the same file (secure_delete, DELETE,
wal_checkpoint(TRUNCATE), VACUUM, wal_checkpoint(TRUNCATE)), and the plain DELETE alone (rows
unlinked, their bytes still in free pages: not an erasure, the floor).

Each size: one unit database of N episode rows (about 200 B payloads) of 1,000 data subjects
(N / 1,000 rows each) plus their agents' state; erasing one subject (a different one each run)
with `storage.erasure.forget`, interleaved run by run with the baseline on its copy. Both rewrite
the whole file (VACUUM), so the time grows with what is held, not with what is erased.

Writes bench/results/erasure.json and erasure.md (machine + LOOM_BENCH_NOTE).
Run: python bench/erasure_bench.py [--sizes 10000,100000,1000000] [--runs 5] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loom_ros.bus.privacy import ConsentState  # noqa: E402
from loom_ros.storage import schema  # noqa: E402
from loom_ros.storage.erasure import forget  # noqa: E402
from loom_ros.storage.layout import StorageLayout  # noqa: E402
from loom_ros.storage.sqlite import file_bytes, open_database  # noqa: E402
from loom_ros.storage.storage import Storage, StorageConfig  # noqa: E402
from loom_ros.storage.stores import EpisodeStore  # noqa: E402

import table  # noqa: E402  (bench/table.py: percentiles, the machine line)

T0 = 1_700_000_000_000
OUT = Path(__file__).resolve().parent / 'results'
SUBJECTS = 1000


class GrantAll:
    @staticmethod
    def lookup(subject: str, purpose: str) -> ConsentState:
        return ConsentState(purpose, True, True, 'bench')


def build(root: Path, n: int) -> Path:
    """A storage root whose unit database holds `n` episodes of SUBJECTS subjects (and each
    subject's agent state, noted in kv_subjects): tables made by the layer, rows bulk-loaded."""
    with Storage(StorageConfig(root=str(root), unit='bench'), consent=GrantAll) as storage:
        path = storage.path
    conn = open_database(path)
    for index in ('episodes_time_agent', 'episodes_subject'):
        conn.execute(f'drop index {index}')   # bulk load first, index after (schema.ensure)
    payload = 'the user said something about coffee, the kitchen and the weather %08d ' * 2
    conn.execute('BEGIN')
    chunk = 50000
    for start in range(0, n, chunk):
        rows = []
        for i in range(start, min(n, start + chunk)):
            text = payload % (i, i)
            rows.append((f'agent{i % 50}', f'e{i}', T0 + i, 'speech.heard', 'mic', '["t"]', text,
                         len(text) + 68, f'person-{i % SUBJECTS}'))
        conn.executemany(EpisodeStore.INSERT_SUBJECT, rows)
    conn.executemany("insert into kv values ('agent_state', ?, 2, ?, ?)",
                     [(f'state-{s}', json.dumps({'state': {'seen': s}, 'events': 1}), T0)
                      for s in range(SUBJECTS)])
    conn.executemany("insert into kv_subjects values ('agent_state', ?, ?)",
                     [(f'state-{s}', f'person-{s}') for s in range(SUBJECTS)])
    conn.execute('COMMIT')
    schema.ensure(conn, path)   # the indexes the layer makes, as it makes them
    conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    conn.close()
    return path


def raw_erase(path: Path, subject: str) -> tuple[float, int]:
    """The baseline: the same physical erasure in raw SQLite. (seconds, rows)."""
    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute('PRAGMA secure_delete=ON')
    conn.execute('BEGIN IMMEDIATE')
    rows = conn.execute('delete from episodes where subject = ?', (subject,)).rowcount
    conn.execute("delete from kv where (ns, key) in (select ns, key from kv_subjects where "
                 'subject = ?)', (subject,))
    conn.execute('delete from kv_subjects where subject = ?', (subject,))
    conn.execute('COMMIT')
    conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    conn.execute('VACUUM')
    conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    conn.close()
    return time.perf_counter() - started, rows


def raw_delete(path: Path, subject: str) -> float:
    """DELETE alone (what a flag-style delete costs; not an erasure: the bytes stay)."""
    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute('BEGIN IMMEDIATE')
    conn.execute('delete from episodes where subject = ?', (subject,))
    conn.execute('COMMIT')
    conn.close()
    return time.perf_counter() - started


def size_run(work: Path, n: int, runs: int) -> dict:
    root = work / f'root-{n}'
    started = time.perf_counter()
    path = build(root, n)
    build_s = time.perf_counter() - started
    copy, floor = work / f'raw-{n}.db', work / f'floor-{n}.db'
    shutil.copy(path, copy)
    shutil.copy(path, floor)
    layout = StorageLayout.at(root)
    held = file_bytes(path)
    layer, raw, plain, erased = [], [], [], []
    for run in range(runs):   # interleaved: the machine's drift hits both alike
        subject = f'person-{run * 7 % SUBJECTS}'
        t = time.perf_counter()
        receipt = forget(layout, subject, requested_by='bench')
        layer.append(time.perf_counter() - t)
        erased.append(receipt.counts['episodes'])
        seconds, rows = raw_erase(copy, subject)
        raw.append(seconds)
        assert rows == receipt.counts['episodes'], (rows, receipt.counts)
        plain.append(raw_delete(floor, subject))
    out = {'records': n, 'runs': runs, 'db_bytes': held, 'build_s': build_s,
           'rows_erased_per_run': erased[0], 'state_rows_erased_per_run': 1,
           'layer_s': table.summary(layer, 1), 'raw_erase_s': table.summary(raw, 1),
           'raw_delete_only_s': table.summary(plain, 1),
           'db_bytes_after': file_bytes(path)}
    out['ratio_p50'] = out['layer_s']['p50'] / out['raw_erase_s']['p50']
    shutil.rmtree(root, ignore_errors=True)
    for p in (copy, floor):
        for suffix in ('', '-wal', '-shm'):
            Path(f'{p}{suffix}').unlink(missing_ok=True)
    return out


def report(info: dict) -> str:
    lines = ['# Erasure benchmark', '',
             f'`python bench/erasure_bench.py` (issue 17). {info["machine"]}; {info["note"]}.', '',
             'One unit database per size: N episode rows (~200 B payloads) of 1,000 data '
             'subjects (N / 1,000 rows each) and their agents\' state. Each run erases a '
             'different subject with `storage.erasure.forget` (locks, audit-free, every store '
             'of the root, secure_delete, WAL checkpoint, VACUUM), interleaved run by run with '
             'the raw SQLite baseline on a copy of the same file (secure_delete, the same '
             'DELETEs, checkpoint, VACUUM, checkpoint: the same physical guarantee). "DELETE '
             'alone" leaves the bytes in free pages: not an erasure, shown as the floor. Seconds, '
             f'P50 / P99 / max over the runs (with {info["runs"]} runs P99 is about the max).', '',
             '| records held | database | rows erased | forget (layer) | raw erase (baseline) | '
             'layer / raw (P50) | DELETE alone (P50) | build |',
             '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in info['sizes']:
        lines.append(
            f'| {r["records"]:,} | {r["db_bytes"] / 1e6:.1f} MB | {r["rows_erased_per_run"]:,} '
            f'+ 1 state | {table.fmt(r["layer_s"], 3)} | {table.fmt(r["raw_erase_s"], 3)} | '
            f'{r["ratio_p50"]:.2f}x | {r["raw_delete_only_s"]["p50"]:.4f} | '
            f'{r["build_s"]:.1f} s |')
    lines += ['', 'Both sides rewrite the whole file (VACUUM), so an erasure costs about the time '
              'to copy what the database holds, whatever is erased; the layer adds opening the '
              'unit under its locks (its lifecycle and cold index), the other stores of the root '
              '(router history, consent, keys, objects, traces, recordings, plugin data: empty '
              'or absent here).']
    return '\n'.join(lines) + '\n'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sizes', default='10000,100000,1000000')
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--quick', action='store_true', help='10,000 and 100,000 records, 3 runs')
    ap.add_argument('--out', default=str(OUT))
    args = ap.parse_args()
    sizes = [10000, 100000] if args.quick else [int(s) for s in args.sizes.split(',')]
    runs = 3 if args.quick else max(1, args.runs)
    info = {'machine': table.machine(),
            'note': os.environ.get('LOOM_BENCH_NOTE', 'taken with nothing else running'),
            'runs': runs, 'sizes': []}
    with tempfile.TemporaryDirectory(prefix='loom_erasure_bench_') as tmp:
        for n in sizes:
            result = size_run(Path(tmp), n, runs)
            info['sizes'].append(result)
            print(json.dumps(result), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'erasure.json').write_text(json.dumps(info, indent=1) + '\n')
    (out / 'erasure.md').write_text(report(info))
    print(report(info))
    return 0


if __name__ == '__main__':
    sys.exit(main())
