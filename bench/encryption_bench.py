"""Encryption at rest benchmark (issue 17): what AES-256-GCM under per-subject and per-day keys
costs, every number next to the same run without encryption (interleaved op by op, so a busy
machine's drift hits both sides alike):

1. per event: an episode row as the layer makes it (cut + secrets masked), without and with the
   payload sealed under its subject's key (and opened again), for 256 B and 4 KiB payloads;
   and through the layer: one event's write (stores.EpisodeStore.entry) in a storage without
   and one with encryption (payload sealed into its SQLite row), then committed;
2. blobs: put + get through the local object store (write, fsync, rename) without and with the
   encrypting wrapper, for 1 KiB, 64 KiB and 1 MiB;
3. archive moves: warm events straight to archive files (100 subjects + anonymous), plain (one
   file per move) against encrypted (one file per subject and per day);
4. keys: creating a subject's key (a durable insert into the key table), destroying one (with
   the WAL checkpoint), rotating the master key over 10,000 data keys.

Writes bench/results/encryption.json and encryption.md (machine + LOOM_BENCH_NOTE).
Run: python bench/encryption_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cryptography

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loom_ros.bus.event import Event  # noqa: E402
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, ConsentState  # noqa: E402
from loom_ros.security.keyring import (EncryptionSettings, Keyring, MasterKey,  # noqa: E402
                                       write_key_file)
from loom_ros.storage.backend.encrypted import EncryptedObjectStore  # noqa: E402
from loom_ros.storage.backend.local import LocalObjectStore  # noqa: E402
from loom_ros.storage.embedding import HashEmbedder  # noqa: E402
from loom_ros.storage.lifecycle import Lifecycle, LifecycleParams, TierPolicy  # noqa: E402
from loom_ros.storage.storage import Storage, StorageConfig  # noqa: E402
from loom_ros.storage.stores import episode_row  # noqa: E402

import table  # noqa: E402  (bench/table.py: percentiles, timers, the machine line)
from table import Timer, summary  # noqa: E402

T0 = 1_700_000_000_000
OUT = Path(__file__).resolve().parent / 'results'


def keyring(root: Path) -> Keyring:
    path = root / 'master.key'
    if not path.exists():
        write_key_file(path, [MasterKey.generate()])
    return Keyring.open(root / 'root', EncryptionSettings(True, str(path)), {})


class GrantAll:
    """Every subject consents to storage (the benchmark is about encryption)."""

    @staticmethod
    def lookup(subject: str, purpose: str) -> ConsentState:
        return ConsentState(purpose, True, True, 'bench')


def per_event(root: Path, n: int) -> dict:
    """The episode row alone, and its payload sealed and opened, op by op interleaved."""
    out = {}
    with keyring(root) as ring:
        subjects = [f'person-{i}' for i in range(100)]
        for s in subjects:
            ring.subject_key(s)
        for size in (256, 4096):
            body = (b'the user said something about coffee and the kitchen ' * 100)[:size]
            events = [Event(type='speech.heard', source='mic', id=f'e{i}', payload=body,
                            timestamp_ms=T0 + i) for i in range(n)]
            row_t, seal_t, open_t = Timer(), Timer(), Timer()
            for i, event in enumerate(events):
                row = row_t(episode_row, 'agent', event)
                context = b'episode\x00' + event.id.encode()
                blob = seal_t(ring.encrypt, row[6].encode(), context, subjects[i % 100])
                open_t(ring.decrypt, blob, context)
            r = {'row_us': row_t.stats(1e6), 'seal_us': seal_t.stats(1e6),
                 'open_us': open_t.stats(1e6), 'overhead_bytes': len(blob) - len(row[6].encode())}
            # the event path with encryption = row + seal: its cost relative to the row alone
            r['ratio_cpu_mean'] = (r['row_us']['cpu_mean'] + r['seal_us']['cpu_mean']) / \
                r['row_us']['cpu_mean']
            r['ratio_wall_p50'] = (r['row_us']['p50'] + r['seal_us']['p50']) / r['row_us']['p50']
            out[size] = r
    return out


def layer_event(root: Path, n: int) -> dict:
    """One event's write as the layer builds it (stores.EpisodeStore.entry: masking, the row,
    its consent, and with encryption its payload sealed under the subject's or the day's key),
    in two storages of one run, without and with encryption, interleaved op by op; then the
    same events committed through each writer (wall time for all of them)."""
    key_path = root / 'master.key'
    root.mkdir(parents=True)
    write_key_file(key_path, [MasterKey.generate()])
    stores = {mode: Storage(StorageConfig(
        root=str(root / mode), unit='bench',
        encryption=EncryptionSettings(mode == 'encrypted', str(key_path))), env={},
        consent=GrantAll) for mode in ('plain', 'encrypted')}
    body = b'{"text":"the user said something about coffee and the kitchen, twice"}' * 3
    evs = [Event(type='speech.heard', source='mic', id=f'e{i}', payload=body,
                 timestamp_ms=T0 + i, metadata={SUBJECT_METADATA_KEY: f'person-{i % 100}'}
                 if i % 5 else {}) for i in range(n)]
    timers = {mode: table.Timer() for mode in stores}
    for event in evs:
        for mode, storage in stores.items():
            timers[mode](storage.episodes.entry, 'agent', event)
    out = {mode: t.stats(1e6) for mode, t in timers.items()}
    for mode, storage in stores.items():
        started = time.perf_counter()
        for event in evs:
            ticket = storage.episodes.record('agent', event)
        ticket.wait(120)
        out[mode]['committed_per_s'] = n / (time.perf_counter() - started)
        storage.close()
    out['ratio_cpu_mean'] = out['encrypted']['cpu_mean'] / out['plain']['cpu_mean']
    out['added_cpu_us'] = out['encrypted']['cpu_mean'] - out['plain']['cpu_mean']
    out['payload_bytes'], out['events'] = len(body), n
    return out


def blobs(root: Path, n: int) -> dict:
    out = {}
    with keyring(root) as ring:
        plain = LocalObjectStore(root / 'plain')
        enc = EncryptedObjectStore(LocalObjectStore(root / 'enc'), ring)
        for size in (1024, 64 * 1024, 1024 * 1024):
            data = os.urandom(size)
            count = n if size < 1024 * 1024 else max(10, n // 5)
            t = {k: Timer() for k in ('plain_put', 'enc_put', 'plain_get', 'enc_get')}
            for i in range(count):
                key = f'blobs/{size}/{i}'
                t['plain_put'](plain.put, key, data)
                t['enc_put'](enc.put, key, data, subject=f'person-{i % 50}')
                t['plain_get'](plain.get, key)
                t['enc_get'](enc.get, key)
            s = {k: v.stats(1e3) for k, v in t.items()}
            for op in ('put', 'get'):
                s[f'ratio_{op}_p50'] = s[f'enc_{op}']['p50'] / s[f'plain_{op}']['p50']
                s[f'ratio_{op}_cpu'] = s[f'enc_{op}']['cpu_mean'] / s[f'plain_{op}']['cpu_mean']
            out[size] = s
    return out


def moves(root: Path, n: int) -> dict:
    out = {}
    for mode in ('plain', 'encrypted'):
        folder = root / f'moves-{mode}'
        key_path = folder / 'master.key'
        folder.mkdir(parents=True)
        write_key_file(key_path, [MasterKey.generate()])
        enc = EncryptionSettings(mode == 'encrypted', str(key_path))
        with Storage(StorageConfig(root=str(folder / 'root'), unit='bench', encryption=enc),
                     env={}, consent=GrantAll) as s:
            for i in range(n):   # 80 % of them about one of 100 subjects
                subject = {SUBJECT_METADATA_KEY: f'person-{(i + 1) % 100}'} if i % 5 != 4 else {}
                s.episodes.record('agent', Event(type='speech.heard', source='mic', id=f'e{i}',
                                                 payload=b'a sentence of about sixty bytes '
                                                 b'said by someone %d' % i,
                                                 timestamp_ms=T0 + i * 1000, metadata=subject))
            s.flush(120)
            params = LifecycleParams(default=TierPolicy(warm_s=60, cold=False),
                                     move_batch=5000)
            lc = Lifecycle(s.layout, s.unit, s.objects, HashEmbedder(), params,
                           clock=lambda: T0 + (n + 1000) * 1000)
            spent = {'encrypt': 0.0, 'decrypt': 0.0, 'file writes': 0.0}
            store = s.objects.inner if s.keyring else s.objects

            def timed(fn, what):
                def run(*args, **kw):
                    t = time.perf_counter()
                    try:
                        return fn(*args, **kw)
                    finally:
                        spent[what] += time.perf_counter() - t
                return run

            store.put = timed(store.put, 'file writes')     # where the move's time goes
            if s.keyring:
                s.keyring.encrypt = timed(s.keyring.encrypt, 'encrypt')
                # the payloads come out of SQLite encrypted: opened before they are archived
                s.keyring.decrypt = timed(s.keyring.decrypt, 'decrypt')
            started = time.perf_counter()
            moved = 0
            while True:
                report = lc.move_warm()
                if not report.archived:
                    break
                moved += report.archived
            seconds = time.perf_counter() - started
            files = lc.conn.execute('select count(*), sum(bytes) from archive').fetchone()
            lc.close()
        out[mode] = {'events': moved, 'seconds': seconds, 'events_per_s': moved / seconds,
                     'us_per_event': seconds / moved * 1e6, 'files': files[0], 'bytes': files[1],
                     'encrypt_s': spent['encrypt'], 'decrypt_s': spent['decrypt'],
                     'file_writes_s': spent['file writes'],
                     'keys_created': s.keyring.created if s.keyring else 0}
    out['ratio_seconds'] = out['encrypted']['seconds'] / out['plain']['seconds']
    return out


def keys(root: Path, n: int) -> dict:
    clock = time.perf_counter
    with keyring(root / 'keys') as ring:
        create = []
        for i in range(n):
            t = clock()
            ring.subject_key(f'subject-{i}')
            create.append(clock() - t)
        destroy = []
        for i in range(min(200, n)):
            t = clock()
            ring.destroy(f'subject-{i}')
            destroy.append(clock() - t)
        t = clock()
        rotated = ring.rotate(MasterKey.generate())
        rotate_s = clock() - t
    return {'create_ms': summary(create, 1e3), 'destroy_ms': summary(destroy, 1e3),
            'rotate_keys': rotated['rewrapped'], 'rotate_s': rotate_s}


def machine() -> str:
    return table.machine(cryptography=cryptography.__version__)


fmt = table.fmt


def report(info: dict) -> str:
    lines = ['# Encryption at rest benchmark', '',
             f'`python bench/encryption_bench.py` (issue 17). {info["machine"]}; {info["note"]}.',
             '', 'Per event and blobs: each op with encryption is timed next to the same op '
             'without, interleaved op by op in one run. Archive moves: the same events moved '
             'without, then with encryption, in one process. Key operations have no plaintext '
             'counterpart. AES-256-GCM, a random 96-bit nonce per message, keys cached in memory '
             'once unwrapped.', '',
             '## Per event (episode row: cut + secrets masked; with encryption: plus its '
             'payload sealed under the subject\'s key)', '',
             'Wall P50 / P99 / max, then CPU P50 (this thread only), in µs. The ratio is (row + '
             'seal) / row, on mean CPU time and on wall P50.', '',
             '| payload | row alone | seal | open (decrypt) | ratio CPU / wall | bytes added |',
             '| --- | --- | --- | --- | --- | --- |']
    for size, r in info['per_event'].items():
        cells = [f'{fmt(r[k])} (CPU {r[k]["cpu_p50"]:.1f})' for k in ('row_us', 'seal_us',
                                                                       'open_us')]
        lines.append(f'| {int(size):,} B | {" | ".join(cells)} | {r["ratio_cpu_mean"]:.2f}x / '
                     f'{r["ratio_wall_p50"]:.2f}x | {r["overhead_bytes"]} |')
    if 'layer_event' in info:
        r = info['layer_event']
        lines += ['', f'## Per event through the layer ({r["events"]:,} events, '
                  f'{r["payload_bytes"]} B payload, 80 % naming one of 100 subjects)', '',
                  'stores.EpisodeStore.entry, the write of one event as an agent\'s commit builds '
                  'it (masking, row, consent; with encryption the payload sealed into the '
                  'row), in two storages of one run, interleaved; then the same events committed '
                  'through each writer.', '',
                  '| | wall P50 / P99 / max µs | CPU mean µs | committed events/s |',
                  '| --- | --- | --- | --- |']
        for mode in ('plain', 'encrypted'):
            m = r[mode]
            lines.append(f'| {mode} | {table.fmt(m)} | {m["cpu_mean"]:.1f} | '
                         f'{m["committed_per_s"]:,.0f} |')
        lines += ['', f'Encryption adds {r["added_cpu_us"]:.1f} µs of CPU per event '
                  f'({r["ratio_cpu_mean"]:.2f}x).']
    lines += ['', '## Blobs (local object store: put = write, fsync, rename; get reads the file)',
              '', 'Wall P50 / P99 / max ms, CPU P50 ms in brackets; ratios encrypted / plain on '
              'wall P50 and on mean CPU.', '',
              '| size | put plain | put encrypted | ratio wall / CPU | get plain | get encrypted | '
              'ratio wall / CPU |', '| --- | --- | --- | --- | --- | --- | --- |']
    for size, r in info['blobs'].items():
        cells = {k: f'{fmt(r[k], 2)} ({r[k]["cpu_p50"]:.2f})' for k in
                 ('plain_put', 'enc_put', 'plain_get', 'enc_get')}
        lines.append(f'| {int(size) // 1024:,} KiB | {cells["plain_put"]} | {cells["enc_put"]} | '
                     f'{r["ratio_put_p50"]:.2f}x / {r["ratio_put_cpu"]:.2f}x | '
                     f'{cells["plain_get"]} | {cells["enc_get"]} | {r["ratio_get_p50"]:.2f}x / '
                     f'{r["ratio_get_cpu"]:.2f}x |')
    m = info['moves']
    lines += ['', '## Archive moves (warm events straight to archive, 80 % of them from 100 '
              'subjects, 20 % anonymous)', '',
              '| | events | seconds | µs per event | of which encrypting (s) | of which decrypting '
              'rows (s) | of which file writes (s) | files | bytes |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for mode in ('plain', 'encrypted'):
        r = m[mode]
        lines.append(f'| {mode} | {r["events"]:,} | {r["seconds"]:.2f} | {r["us_per_event"]:.1f} '
                     f'| {r["encrypt_s"]:.3f} | {r.get("decrypt_s", 0):.3f} | '
                     f'{r["file_writes_s"]:.2f} | {r["files"]:,} | {r["bytes"]:,} |')
    e = m['encrypted']
    lines += ['', f'Encrypted / plain: {m["ratio_seconds"]:.2f}x the time. Encrypting (key '
              f'lookup, creating the {e["keys_created"]} data keys seen for the first time (a '
              f'durable insert each), AES-GCM) took {e["encrypt_s"]:.3f} s of it; opening the '
              f'payloads, encrypted in their SQLite rows, {e.get("decrypt_s", 0):.3f} s; writing '
              f'{e["files"]:,} files (one per subject and per day, each written, fsynced and '
              f'renamed) {e["file_writes_s"]:.2f} s, against {m["plain"]["file_writes_s"]:.2f} s '
              f'for {m["plain"]["files"]:,} files without encryption.']
    k = info['keys']
    lines += ['', '## Keys', '',
              '- a new subject\'s data key (random key, wrapped, durable insert, '
              f'synchronous=FULL): '
              f'P50 / P99 / max {fmt(k["create_ms"], 2)} ms over {k["create_ms"]["n"]:,} subjects;',
              f'- destroying one (delete with secure_delete + WAL checkpoint TRUNCATE): '
              f'{fmt(k["destroy_ms"], 2)} ms;',
              f'- rotating the master key over {k["rotate_keys"]:,} data keys: '
              f'{k["rotate_s"]:.2f} s (500 per transaction).']
    return '\n'.join(lines) + '\n'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='fewer iterations (a smoke run)')
    ap.add_argument('--out', default=str(OUT))
    args = ap.parse_args()
    scale = 10 if args.quick else 1
    info = {'machine': machine(),
            'note': os.environ.get('LOOM_BENCH_NOTE', 'taken with nothing else running')}
    with tempfile.TemporaryDirectory(prefix='loom_encryption_bench_') as tmp:
        root = Path(tmp)
        info['per_event'] = per_event(root / 'e', 20000 // scale)
        info['layer_event'] = layer_event(root / 'l', 20000 // scale)
        info['blobs'] = blobs(root / 'b', 500 // scale)
        info['moves'] = moves(root / 'm', 20000 // scale)
        info['keys'] = keys(root / 'k', 10000 // scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'encryption.json').write_text(json.dumps(info, indent=1) + '\n')
    (out / 'encryption.md').write_text(report(info))
    print(report(info))
    return 0


if __name__ == '__main__':
    sys.exit(main())
