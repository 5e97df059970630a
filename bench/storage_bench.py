"""Storage layer benchmark (issue 16), every number next to a raw SQLite baseline of the same run:

1. durable event writes/s: raw executemany in one transaction, raw one transaction per row, and
   the layer's group commit (episodes with masking, episodes pre-masked, agent state + episode
   per event), with commit latency (submit -> committed) P50/P99/max;
2. paced load: 1,000 agents x 10 events/s for --paced-seconds, state + episode per event,
   commit latency; (growth) raw commits of 100 rows from 1,000 agents as the table grows to
   --growth-rows, with the episode index led by time (now) and by agent (before);
   (consent) what storage consent costs per event: anonymous (no lookup) against a subject's
   event answered from the consent cache, asked every time, and withheld (part `consent`);
3. how agents share files: one database per process vs one file per agent behind the same
   writer (one transaction per file per batch);
4. lifecycle move cost per 10,000 events (warm -> cold with the hash embedder and with MiniLM,
   cold -> archive);
5. the cold tier at --cold-vectors (default 1,000,000): build, save, reload, search P50/P99 and
   recall@10 against exact search, index and database bytes;
6. RSS after each part.

Writes bench/results/storage.json and storage.md (machine + LOOM_BENCH_NOTE).
Run: python bench/storage_bench.py [--cold-vectors N] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loom_ros.bus.event import Event  # noqa: E402
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY  # noqa: E402
from loom_ros.security.audit import AuditLog  # noqa: E402
from loom_ros.storage.consent import ConsentRegistry, SubjectRefs, consent_path  # noqa: E402
from loom_ros.storage.backend.local import LocalObjectStore  # noqa: E402
from loom_ros.storage.cold import IndexParams, encode  # noqa: E402
from loom_ros.storage.embedding import HashEmbedder  # noqa: E402
from loom_ros.storage.lifecycle import Lifecycle, LifecycleParams, TierPolicy  # noqa: E402
from loom_ros.storage import schema  # noqa: E402
from loom_ros.storage.schema import DDL  # noqa: E402
from loom_ros.storage.sqlite import file_bytes, open_database  # noqa: E402
from loom_ros.storage.storage import Storage, StorageConfig  # noqa: E402
from loom_ros.storage.stores import EpisodeStore, episode_row  # noqa: E402

import table  # noqa: E402  (bench/table.py: percentiles, timers, the machine line)
from table import pct, rss_mb  # noqa: E402

T0 = 1_700_000_000_000
OUT = Path(__file__).resolve().parent / 'results'


def events(n: int, agents: int = 1000) -> list[tuple[str, Event]]:
    return [(f'a{i % agents}', Event(type='sensor.imu', source='imu0', id=f'e{i}',
                                     payload=b'{"ax":0.01,"ay":-0.02,"az":9.81,"n":%d}' % i,
                                     timestamp_ms=T0 + i)) for i in range(n)]


def raw_db(root: Path) -> sqlite3.Connection:
    conn = open_database(root / 'raw.db')
    for statement in DDL:
        conn.execute(statement)
    return conn


# -- 1. throughput ---------------------------------------------------------------------------
def throughput(root: Path, n: int) -> dict:
    evs = events(n)
    rows = [(*row, len(row[6]) + len(row[5]) + 64) for row in
            (episode_row(a, e, lambda text: text) for a, e in evs)]   # pre-masked
    # The inputs (200,000 events and their rows) are this benchmark's, not the layer's work:
    # kept out of the collector's generations, so its full collections, which grew with them
    # and landed in some runs and not others, do not decide the numbers.
    gc.collect()
    gc.freeze()
    sql = EpisodeStore.INSERT
    out = {}
    conn = raw_db(root)
    t, cpu = time.perf_counter(), time.process_time()
    conn.execute('BEGIN')
    conn.executemany(sql, rows)
    conn.execute('COMMIT')
    out['raw_executemany_per_s'] = n / (time.perf_counter() - t)
    out['raw_executemany_per_cpu_s'] = n / (time.process_time() - cpu)
    per_row = min(n, 20000)
    lat = []
    t = time.perf_counter()
    for row in rows[:per_row]:
        s = time.perf_counter()
        conn.execute('BEGIN')
        conn.execute(sql, row)
        conn.execute('COMMIT')
        lat.append(time.perf_counter() - s)
    out['raw_txn_per_row_per_s'] = per_row / (time.perf_counter() - t)
    out['raw_txn_per_row_latency_us'] = [pct(lat, 50) * 1e6, pct(lat, 99) * 1e6, max(lat) * 1e6]
    conn.close()

    def layer(name, submit, count, events=None, hot=0):
        """`count` submits; `events`: how many events they carry (default one each). `hot`:
        events per agent kept in memory (recent()); 0 as the agent hosts open their storage
        (agents/agent_node.py: an agent's working memory is its hot tier)."""
        events = count if events is None else events
        storage = Storage(StorageConfig(root=str(root), unit=name, max_delay_ms=2.0,
                                        hot_max_events=hot))
        sample, tickets = [], []
        t, cpu = time.perf_counter(), time.process_time()
        for i in range(count):
            s = time.perf_counter()
            ticket = submit(storage, i)
            if i % 50 == 0:
                sample.append((s, ticket))
        ticket.wait(120)
        elapsed = time.perf_counter() - t
        lat = [tk.committed_at - s for s, tk in sample]
        result = {'per_s': events / elapsed, 'per_cpu_s': events / (time.process_time() - cpu),
                  'batches': storage.writer.batches,
                  'latency_ms': [pct(lat, 50) * 1e3, pct(lat, 99) * 1e3, max(lat) * 1e3]}
        storage.close()
        return result

    # An agent that commits every 100 events (persist: interval), or a burst handled before its
    # commit: its state and those 100 episodes in one write, each episode masked, consent-checked
    # and sealed as above.
    by_agent: dict[str, list] = {}
    for agent, event in evs:
        by_agent.setdefault(agent, []).append(event)
    chunks = [(agent, es[i:i + 100]) for agent, es in by_agent.items()
              for i in range(0, len(es), 100)]

    def state_and_100(s, i):
        agent, es = chunks[i]
        return s.agent_state.commit(agent, {'n': i}, i, es[-1].id, es)
    out['layer_state_plus_100_episodes'] = layer('state100', state_and_100, len(chunks),
                                                 events=sum(len(es) for _, es in chunks))
    out['layer_episodes_masked'] = layer(
        'masked', lambda s, i: s.episodes.record(*evs[i]), n)
    # The same with the hot ring at its default (64 events per agent): 64,000 events and their
    # tickets alive, which every full collection of the garbage collector walks.
    out['layer_episodes_masked_hot'] = layer(
        'masked_hot', lambda s, i: s.episodes.record(*evs[i]), n, hot=64)
    out['layer_episodes_premasked'] = layer(
        'premasked', lambda s, i: s.writer.submit(((sql, rows[i]),)), n)

    def state_and_episode(s, i):
        agent, event = evs[i]
        return s.agent_state.commit(agent, {'n': i}, i, event.id, [event])
    out['layer_state_plus_episode'] = layer('state', state_and_episode, n // 2)

    out['rss_mb'] = rss_mb()
    gc.unfreeze()
    return out


# -- 2. paced load ---------------------------------------------------------------------------
def paced(root: Path, agents: int = 1000, rate: int = 10, seconds: float = 5.0) -> dict:
    storage = Storage(StorageConfig(root=str(root), unit='paced', max_delay_ms=2.0))
    total, per_tick = int(agents * rate * seconds), agents * rate // 100
    evs = events(total, agents)
    lat, done = [], threading.Event()
    pending: list = []
    t0, i = time.perf_counter(), 0
    while i < total:     # ticks of 10 ms, agents*rate/100 events each
        target = t0 + (i // per_tick) * 0.01
        while time.perf_counter() < target:
            time.sleep(0.0005)
        for _ in range(per_tick):
            agent, event = evs[i]
            s = time.perf_counter()
            pending.append((s, storage.agent_state.commit(agent, {'n': i}, i, event.id, [event])))
            i += 1
    pending[-1][1].wait(60)
    elapsed = time.perf_counter() - t0
    lat = [tk.committed_at - s for s, tk in pending]
    out = {'agents': agents, 'offered_per_s': agents * rate, 'handled': len(pending),
           'seconds': seconds,
           'achieved_per_s': total / elapsed, 'batches': storage.writer.batches,
           'latency_ms': [pct(lat, 50) * 1e3, pct(lat, 99) * 1e3, max(lat) * 1e3]}
    storage.close()
    done.set()
    return out


# -- 2a. growth: commit rate as the warm tier grows ----------------------------------------
OLD_EPISODE_INDEXES = ('create index episodes_agent_time on episodes (agent_id, time_ms)',
                       'create index episodes_time on episodes (time_ms)')


# The episode index by event id (schema.py: partial, the episodes that name a data subject), as
# the growth part adds it to time-first; and the same on every row, the alternative.
EVENT_ID_INDEX = schema.EPISODES_BY_EVENT
FULL_EVENT_ID_INDEX = 'create index episodes_event on episodes (event_id)'
NAMED_EVERY = 10    # growth: one episode in ten names a data subject


def loom_ids(total: int, sources: int = 8) -> list[str]:
    """Event ids as Loom's publishers make them (bus/event.py new_event_id: a random 16-hex
    prefix per process and a hex counter), `sources` processes interleaved."""
    prefixes = [f'{random.Random(s).getrandbits(64):016x}' for s in range(sources)]
    return [f'{prefixes[i % sources]}{i // sources + 1:x}' for i in range(total)]


def growth(root: Path, total: int, agents: int = 1000, per_commit: int = 100,
           step: int = 100_000) -> dict:
    """Raw SQLite commits of `per_commit` episode rows from `agents` agents (10 ms of 10,000
    events/s), rows/s for each `step` rows as the table grows to `total`: the schema's episode
    indexes (time first, and event id) against time first alone and against the agent-first
    indexes of before, in the same run; then what finding an episode by event id costs at that
    size with the event-id index and without it (a scan: EpisodeStore.origin for an id this
    process did not note)."""
    evs = events(total, agents)
    ids = loom_ids(total)
    rows = [(r[0], ids[i], *r[2:], len(r[6]) + len(r[5]) + 64,
             f'person-{i % 100}' if i % NAMED_EVERY == 0 else '')
            for i, r in enumerate(episode_row(a, e, lambda t: t) for a, e in evs)]
    out = {'agents': agents, 'per_commit': per_commit, 'step': step, 'named_every': NAMED_EVERY}
    lookup = EpisodeStore.ORIGIN
    probes = [ids[i] for i in range(0, total, NAMED_EVERY * max(1, total // 2000))]
    for name in ('agent_first', 'time_first', 'time_first_event_id', 'time_first_event_id_all'):
        conn = raw_db(root / name)
        schema.upgrade_subjects(conn)     # the subject index, as a Loom file has it
        conn.execute('drop index if exists episodes_event')
        if name == 'agent_first':
            conn.execute('drop index episodes_time_agent')
            for statement in OLD_EPISODE_INDEXES:
                conn.execute(statement)
        if name == 'time_first_event_id':
            conn.execute(EVENT_ID_INDEX)
        if name == 'time_first_event_id_all':
            conn.execute(FULL_EVENT_ID_INDEX)
        rates = []
        for start in range(0, total, step):
            t = time.perf_counter()
            for b in range(start, min(total, start + step), per_commit):
                conn.execute('BEGIN')
                conn.executemany(EpisodeStore.INSERT_SUBJECT, rows[b:b + per_commit])
                conn.execute('COMMIT')
            rates.append((min(total, start + step) - start) / (time.perf_counter() - t))
        out[name] = rates
        print(f'growth {name}: ' + ', '.join(f'{r:,.0f}' for r in rates), flush=True)
        if name in ('time_first', 'time_first_event_id'):
            lat = []
            for probe in probes[:20 if name == 'time_first' else len(probes)]:
                t = time.perf_counter()
                assert conn.execute(lookup, (probe,)).fetchall()
                lat.append(time.perf_counter() - t)
            out[f'{name}_lookup_ms'] = [pct(lat, 50) * 1e3, pct(lat, 99) * 1e3, max(lat) * 1e3,
                                        len(lat)]
            print(f'growth {name}: lookup by event id P50 {pct(lat, 50) * 1e3:.3f} ms',
                  flush=True)
        conn.close()
    return out


# -- 2b. consent per event ------------------------------------------------------------------
class LookupOnly:
    """The registry without version(): ConsentCache then asks it on every event (uncached)."""

    def __init__(self, registry):
        self.lookup = registry.lookup


def consent(root: Path, n: int) -> dict:
    """What storage consent costs per event: the write of one event built by the layer
    (stores.EpisodeStore.entry: masking, the row, and for an event naming a subject its `store`
    consent), interleaved op by op: anonymous (no lookup: the baseline), a subject with consent
    answered from the cache (one PRAGMA data_version says it is fresh), the same asked every
    time (a lookup per event), and a subject without consent (counted, not kept)."""
    root.mkdir(parents=True)
    audit = AuditLog(root / 'audit.db')
    registry = ConsentRegistry(consent_path(root), audit=audit, refs=SubjectRefs.at(root / 'keys'))
    subjects = [f'person-{i}' for i in range(100)]
    for subject in subjects:
        registry.grant(subject, 'store', 'bench')
    reader = ConsentRegistry(consent_path(root), read_only=True)   # as Storage opens it
    cached = Storage(StorageConfig(root=str(root), unit='cached'), consent=reader)
    uncached = Storage(StorageConfig(root=str(root), unit='uncached'),
                       consent=LookupOnly(reader))
    body = b'{"text":"the user said something about coffee and the kitchen"}'

    def ev(i: int, subject: str | None) -> Event:
        return Event(type='speech.heard', source='mic', id=f'e{i}', payload=body,
                     timestamp_ms=T0 + i,
                     metadata={SUBJECT_METADATA_KEY: subject} if subject else {})

    timers = {k: table.Timer() for k in ('anonymous', 'cached', 'uncached', 'withheld')}
    for i in range(n):
        subject = subjects[i % 100]
        timers['anonymous'](cached.episodes.entry, 'a', ev(i, None))
        timers['cached'](cached.episodes.entry, 'a', ev(i, subject))
        timers['uncached'](uncached.episodes.entry, 'a', ev(i, subject))
        timers['withheld'](cached.episodes.entry, 'a', ev(i, 'nobody'))
    out = {k: t.stats(1e6) for k, t in timers.items()}
    base = out['anonymous']
    for key in ('cached', 'uncached', 'withheld'):
        out[key]['ratio_cpu_mean'] = out[key]['cpu_mean'] / base['cpu_mean']
        out[key]['added_cpu_us'] = out[key]['cpu_mean'] - base['cpu_mean']
    out['cache_hits'], out['events'] = cached.consent.hits, n
    for closing in (cached, uncached, reader, registry, audit):
        closing.close()
    return out


# -- 3. file sharing -------------------------------------------------------------------------
def sharing(root: Path, files: int = 100, batches: int = 50, per_batch: int = 1000) -> dict:
    """Same writes, one commit per batch (one file) vs one commit per file per batch."""
    evs = events(batches * per_batch, files)
    rows = [(*row, len(row[6]) + len(row[5]) + 64) for row in
            (episode_row(a, e, lambda text: text) for a, e in evs)]   # pre-masked
    one = raw_db(root / 'one')
    t = time.perf_counter()
    for b in range(batches):
        one.execute('BEGIN')
        one.executemany(EpisodeStore.INSERT, rows[b * per_batch:(b + 1) * per_batch])
        one.execute('COMMIT')
    single = len(rows) / (time.perf_counter() - t)
    conns = [raw_db(root / f'many{k}') for k in range(files)]
    t = time.perf_counter()
    for b in range(batches):
        chunk = rows[b * per_batch:(b + 1) * per_batch]
        for k, conn in enumerate(conns):
            conn.execute('BEGIN')
            conn.executemany(EpisodeStore.INSERT, chunk[k::files])
            conn.execute('COMMIT')
    many = len(rows) / (time.perf_counter() - t)
    for conn in conns + [one]:
        conn.close()
    return {'files': files, 'batch_rows': per_batch, 'one_db_per_s': single,
            'file_per_agent_per_s': many, 'ratio': single / many}


# -- 4. move cost ----------------------------------------------------------------------------
def moves(root: Path, embedder, name: str, n: int = 10000) -> dict:
    clock = [T0]
    storage = Storage(StorageConfig(root=str(root), unit=name), clock=lambda: clock[0])
    for i in range(n):   # 10 agents, 2 types, one event every 10 ms: ~100 s of data
        ticket = storage.episodes.record(f'a{i % 10}', Event(
            type='sensor.imu' if i % 2 else 'speech.heard', source='robot', id=f'e{i}',
            payload=(b'{"az":9.81,"n":%d}' % i) if i % 2 else b'the user asked about the red mug %d' % i,
            timestamp_ms=T0 + i * 10))
    ticket.wait(60)
    lc = Lifecycle(storage.layout, name, LocalObjectStore(storage.layout.objects), embedder,
                   LifecycleParams(default=TierPolicy(warm_s=60, cold_s=600), bucket_s=10,
                                   move_batch=10000), clock=lambda: clock[0])
    clock[0] = T0 + n * 10 + 61_000
    t = time.perf_counter()
    report = lc.run_once(max_moves=100)
    warm_s = time.perf_counter() - t
    clock[0] += 600_000
    t = time.perf_counter()
    archived = lc.run_once(max_moves=100)
    cold_s = time.perf_counter() - t
    lc.close()
    storage.close()
    return {'events': n, 'memories': report.memories, 'warm_to_cold_s': warm_s,
            'cold_to_archive_s': cold_s, 'archived_memories': archived.archived,
            'per_10k_events_s': warm_s * 10000 / n}


# -- 5. the cold tier at scale ---------------------------------------------------------------
def corpus(n: int, dim: int = 384, seed: int = 7, chunk: int = 50000, draw: int = 0):
    """Clustered vectors with low intrinsic dimension (what sentence embeddings look like more
    than uniform noise does): 2,000 topics, 24-d variation within a topic, a little noise."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(2000, dim)).astype(np.float32)
    basis = rng.normal(size=(24, dim)).astype(np.float32) / np.sqrt(24)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        r = np.random.default_rng((seed * 1000 + start) * 7 + draw)
        x = (centers[r.integers(0, 2000, m)] + 0.3 * r.normal(size=(m, 24)).astype(np.float32)
             @ basis + 0.1 * r.normal(size=(m, dim)).astype(np.float32))
        yield start, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def cold(root: Path, n: int, queries: int = 200) -> dict:
    storage = Storage(StorageConfig(root=str(root), unit='cold'))
    storage.close()
    conn = open_database(storage.path)
    t = time.perf_counter()
    for start, x in corpus(n):
        codes = encode(x)
        conn.execute('BEGIN')
        conn.executemany('insert into cold (id, agent_id, type, source, first_ms, last_ms, count, '
                         "summary, code, bytes) values (?, 'a', 'sensor.imu', 'imu0', ?, ?, 1, "
                         "'', ?, 400)", [(start + i + 1, T0 + start + i, T0 + start + i, c)
                                         for i, c in enumerate(codes)])
        conn.execute('COMMIT')
    insert_s = time.perf_counter() - t
    conn.close()
    rng = np.random.default_rng(99)
    q_src = next(corpus(queries, draw=1))[1]   # same topics, other samples
    qs = q_src / np.linalg.norm(q_src, axis=1, keepdims=True)
    exact = [[] for _ in range(queries)]
    for start, x in corpus(n):       # exact top-10 over the float vectors, chunk by chunk
        scores = qs @ x.T
        for j in range(queries):
            top = np.argpartition(-scores[j], 10)[:10]
            exact[j] = sorted(exact[j] + [(float(scores[j, t]), start + int(t) + 1) for t in top],
                              reverse=True)[:10]
    params = IndexParams(train_at=20000, nlist=1024 if n >= 500000 else 512, pq_m=48, nprobe=32,
                         rerank=40, train_sample=60000)
    t = time.perf_counter()
    lc = Lifecycle(storage.layout, 'cold', LocalObjectStore(storage.layout.objects),
                   HashEmbedder(), index_params=params, rebuild=True)
    build_s = time.perf_counter() - t
    rss_built = rss_mb()
    lc.close()
    t = time.perf_counter()
    lc = Lifecycle(storage.layout, 'cold', LocalObjectStore(storage.layout.objects),
                   HashEmbedder(), index_params=params)
    load_s = time.perf_counter() - t
    lat, hits = [], 0
    for j in range(queries):
        s = time.perf_counter()
        found = lc.search(vector=qs[j], k=10)
        lat.append(time.perf_counter() - s)
        hits += len({m['id'] for m in found} & {i for _, i in exact[j]})
    # The index alone (no re-rank), for comparison.
    ann_hits = 0
    for j in range(queries):
        ann_hits += len(set(lc.index.candidates(qs[j], 10)) & {i for _, i in exact[j]})
    flat_lat = []
    sample = next(corpus(min(n, 100000)))[1]
    import faiss
    flat = faiss.IndexFlatIP(384)
    flat.add(sample)
    for j in range(queries):
        s = time.perf_counter()
        flat.search(qs[j:j + 1], 10)
        flat_lat.append(time.perf_counter() - s)
    out = {'vectors': n, 'insert_rows_s': insert_s, 'build_s': build_s, 'reload_s': load_s,
           'index_kind': lc.index.kind, 'index_file_bytes': lc.index.path.stat().st_size,
           'db_bytes': file_bytes(storage.path), 'params': params.__dict__,
           'search_ms': [pct(lat, 50) * 1e3, pct(lat, 99) * 1e3, max(lat) * 1e3],
           'recall_at_10': hits / (10 * queries),
           'exact_cosine_top1_top10': [float(np.mean([e[0][0] for e in exact])),
                                       float(np.mean([e[9][0] for e in exact]))], 'recall_at_10_index_only': ann_hits / (10 * queries),
           'raw_flat_100k_search_ms': [pct(flat_lat, 50) * 1e3, pct(flat_lat, 99) * 1e3],
           'rss_mb_after_build': rss_built, 'rss_mb': rss_mb()}
    lc.close()
    return out


def machine() -> str:
    return table.machine(faiss=__import__('faiss').__version__)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--events', type=int, default=200000)
    ap.add_argument('--cold-vectors', type=int, default=1_000_000)
    ap.add_argument('--minilm', action='store_true', help='also time warm -> cold with MiniLM')
    ap.add_argument('--out', default=str(OUT))
    ap.add_argument('--growth-rows', type=int, default=600_000)
    ap.add_argument('--paced-seconds', type=float, default=30.0)
    ap.add_argument('--parts', default='throughput,growth,paced,consent,sharing,moves,cold',
                    help='comma list; results merge into an existing storage.json')
    args = ap.parse_args()
    # As in every Loom process: its bus sets bus.gil_switch_interval_ms (0.5 ms by default), and
    # the writer thread shares the GIL with whoever submits.
    sys.setswitchinterval(0.0005)
    parts = set(args.parts.split(','))
    out = Path(args.out)
    old = out / 'storage.json'
    info = json.loads(old.read_text()) if old.exists() and parts != {
        'throughput', 'growth', 'paced', 'consent', 'sharing', 'moves', 'cold'} else {}
    note = os.environ.get('LOOM_BENCH_NOTE', 'taken with nothing else running')
    info.setdefault('runs', {})
    for part in parts:
        info['runs'][part] = f'{machine()}; {note}'
    info['machine'], info['note'] = machine(), note
    root = Path(tempfile.mkdtemp(prefix='loom_storage_bench_'))
    try:
        if 'throughput' in parts:
            info['throughput'] = throughput(root / 't', args.events)
            print(json.dumps(info['throughput']), flush=True)
        if 'growth' in parts:
            info['growth'] = growth(root / 'g', args.growth_rows)
        if 'paced' in parts:
            info['paced'] = paced(root / 'p', seconds=args.paced_seconds)
            print(json.dumps(info['paced']), flush=True)
        if 'consent' in parts:
            info['consent'] = consent(root / 'consent', min(args.events, 20000))
            print(json.dumps(info['consent']), flush=True)
        if 'sharing' in parts:
            info['sharing'] = sharing(root / 's')
            print(json.dumps(info['sharing']), flush=True)
        if 'moves' in parts:
            info['moves_hash'] = moves(root / 'm', HashEmbedder(), 'hash')
            print(json.dumps(info['moves_hash']), flush=True)
            if args.minilm:
                from loom_ros.agents.embedding import MiniLMEmbedder
                info['moves_minilm'] = moves(root / 'm2', MiniLMEmbedder(), 'minilm')
                print(json.dumps(info['moves_minilm']), flush=True)
        if 'cold' in parts:
            info['cold'] = cold(root / 'c', args.cold_vectors)
            print(json.dumps(info['cold']), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'storage.json').write_text(json.dumps(info, indent=1))
    (out / 'storage.md').write_text(report(info))
    print(report(info))
    return 0


_ms = table.ms


def report(info: dict) -> str:
    lines = ['# Storage layer benchmark', '', '`python bench/storage_bench.py` (issue 16); each part '
             'names the machine and the conditions it ran under:', '']
    lines += [f'- {part}: {text}' for part, text in sorted(info.get('runs', {}).items())]
    if 'throughput' in info:
        t = info['throughput']
        raw, raw_cpu = t['raw_executemany_per_s'], t.get('raw_executemany_per_cpu_s', 0)
        lines += ['', '## Durable event writes (WAL, synchronous=NORMAL: survives SIGKILL)', '',
                  'events/s is wall time; events per CPU-second counts only this process\'s CPU '
                  '(all threads), which a busy machine distorts much less.', '',
                  '| path | events/s | vs raw | events per CPU-s | vs raw | commit latency P50 / P99 / max |',
                  '| --- | --- | --- | --- | --- | --- |',
                  f'| raw SQLite, executemany in one transaction | {raw:,.0f} | 1.00x | {raw_cpu:,.0f} | 1.00x | - |',
                  f'| raw SQLite, one transaction per row | {t["raw_txn_per_row_per_s"]:,.0f} | '
                  f'{t["raw_txn_per_row_per_s"] / raw:.2f}x | - | - | '
                  + _ms([v / 1000 for v in t['raw_txn_per_row_latency_us']], 3) + ' |']
        for key, label in (('layer_episodes_premasked', 'layer: episodes, payload pre-masked'),
                           ('layer_episodes_masked', 'layer: episodes (secrets masked per event)'),
                           ('layer_episodes_masked_hot',
                            'layer: episodes (masked per event), hot ring of 64 per agent'),
                           ('layer_state_plus_episode', 'layer: agent state + episode per event'),
                           ('layer_state_plus_100_episodes',
                            'layer: agent state + 100 episodes per write (masked per event)')):
            r = t.get(key)
            if r is None:
                continue
            cpu = r.get('per_cpu_s', 0)
            lines.append(f'| {label} | {r["per_s"]:,.0f} | {r["per_s"] / raw:.2f}x | {cpu:,.0f} | '
                         f'{cpu / raw_cpu if raw_cpu else 0:.2f}x | {_ms(r["latency_ms"])} '
                         f'({r["batches"]} batches) |')
        lines += ['', 'The layer rows run with no hot ring, as agent hosts open their storage '
                  '(an agent\'s working memory is its hot tier), but one. '
                  'Group commit waits at most 2 ms for a batch to fill; latency is submit to '
                  'commit of every 50th write while one thread submits as fast as it can (so it '
                  'includes the queue in front of it).']
    if 'growth' in info:
        g = info['growth']
        lines += ['', f'## Growth: commit rate as the warm tier grows ({g["agents"]:,} agents, '
                  f'{g["per_commit"]} rows a commit, raw SQLite)', '',
                  'Rows/s over each successive '
                  f'{g["step"]:,} rows. agent-first: the indexes (agent_id, time_ms) and '
                  '(time_ms) that episodes had before; time-first: the one index (time_ms, '
                  'agent_id), and (subject), without an event-id index; then with (event_id) '
                  "where subject != '' (what episodes has now), and with (event_id) on every row. "
                  f'One episode in {g.get("named_every", 10)} names a data subject; event ids as '
                  'Loom makes them (8 publishing processes, each a random prefix and a hex '
                  'counter). With agent_id first, every commit writes one index page per agent '
                  'it touches into the WAL.', '',
                  '| rows in the table | ' + ' | '.join(
                      f'{(i + 1) * g["step"]:,}' for i in range(len(g['time_first']))) + ' |',
                  '| --- |' + ' --- |' * len(g['time_first'])]
        labels = {'agent_first': 'agent-first', 'time_first': 'time-first',
                  'time_first_event_id': 'time-first + event id of named episodes (now)',
                  'time_first_event_id_all': 'time-first + event id of every episode'}
        for key, label in labels.items():
            if key in g:
                lines.append(f'| {label} | ' + ' | '.join(f'{r:,.0f}' for r in g[key]) + ' |')
        if 'time_first_event_id_lookup_ms' in g:
            with_index, scan = g['time_first_event_id_lookup_ms'], g['time_first_lookup_ms']
            lines += ['', f'Finding one episode by event id in the {len(g["time_first"]) * g["step"]:,}'
                      f'-row table (EpisodeStore.origin for an id not noted in this process), '
                      f'ms P50 / P99 / max: with the event-id index {_ms(with_index[:3], 3)} '
                      f'({with_index[3]} lookups); without it, a scan, {_ms(scan[:3])} '
                      f'({scan[3]} lookups).']
    if 'paced' in info:
        p = info['paced']
        lines += ['', f'## Paced: {p["agents"]} agents x 10 events/s, state + episode committed per event',
                  '', f'Offered {p["offered_per_s"]:,}/s for {p.get("seconds", 5):.0f} s, handled {p["handled"]:,} '
                  f'({p["achieved_per_s"]:,.0f}/s), {p["batches"]} batches; commit latency P50 / P99 / '
                  f'max {_ms(p["latency_ms"])}.']
    if 'consent' in info:
        c = info['consent']
        lines += ['', f'## Storage consent per event ({c["events"]:,} events of each kind, '
                  'interleaved)', '',
                  'The write of one event as the layer builds it (masking, the row, the `store` '
                  'consent of its subject); µs, wall P50 / P99 / max and mean CPU of this '
                  'thread. Anonymous events ask nothing: the baseline.', '',
                  '| event | wall P50 / P99 / max | CPU mean | added CPU | vs anonymous |',
                  '| --- | --- | --- | --- | --- |',
                  f'| anonymous (baseline) | {table.fmt(c["anonymous"])} | '
                  f'{c["anonymous"]["cpu_mean"]:.1f} | - | 1.00x |']
        for key, label in (('cached', 'subject with consent, cached answer (data_version '
                                      'check)'),
                           ('uncached', 'subject with consent, registry asked every event'),
                           ('withheld', 'subject without consent (counted, not kept)')):
            r = c[key]
            lines.append(f'| {label} | {table.fmt(r)} | {r["cpu_mean"]:.1f} | '
                         f'{r["added_cpu_us"]:+.1f} | {r["ratio_cpu_mean"]:.2f}x |')
        lines += ['', 'The cache is dropped whenever the registry\'s version moves (a change by '
                  'this process, or PRAGMA data_version: a commit by any other), so a withdrawal '
                  'holds for every event after it returned.']
    if 'sharing' in info:
        s = info['sharing']
        lines += ['', f'## One database per process vs one file per agent ({s["batch_rows"]} writes a batch)',
                  '', '| layout | rows/s |', '| --- | --- |',
                  f'| one database, one commit per batch | {s["one_db_per_s"]:,.0f} |',
                  f'| {s["files"]} files, one commit per file per batch | {s["file_per_agent_per_s"]:,.0f} |',
                  '', f'One database: {s["ratio"]:.2f}x the rows/s of one file per agent.']
    if 'moves_hash' in info:
        lines += ['', '## Lifecycle moves', '',
                  '| embedder | events | memories | warm -> cold | per 10,000 events | cold -> archive |',
                  '| --- | --- | --- | --- | --- | --- |']
        for key in ('moves_hash', 'moves_minilm'):
            if key in info:
                m = info[key]
                lines.append(f'| {key.split("_")[1]} | {m["events"]:,} | {m["memories"]} | '
                             f'{m["warm_to_cold_s"]:.2f} s | {m["per_10k_events_s"]:.2f} s | '
                             f'{m["cold_to_archive_s"]:.3f} s ({m["archived_memories"]} memories) |')
    if 'cold' in info:
        c = info['cold']
        lines += ['', f'## Cold tier: {c["vectors"]:,} memories', '',
                  f'IVF{c["params"]["nlist"]},PQ{c["params"]["pq_m"]} (nprobe {c["params"]["nprobe"]}), '
                  f're-ranked on the int8 codes in SQLite ({c["params"]["rerank"]}x candidates).', '',
                  '| measure | value |', '| --- | --- |',
                  f'| recall@10 vs exact float search | {c["recall_at_10"]:.3f} |',
                  f'| recall@10 of the index alone (no re-rank) | {c["recall_at_10_index_only"]:.3f} |',
                  f'| search P50 / P99 / max (index + SQLite re-rank) | {_ms(c["search_ms"])} |',
                  f'| raw faiss exact search over 100,000 floats, P50 / P99 | {_ms(c["raw_flat_100k_search_ms"])} |',
                  f'| build (train + add, from the stored codes) | {c["build_s"]:.1f} s |',
                  f'| reload (read index + replay log) | {c["reload_s"]:.2f} s |',
                  f'| index file | {c["index_file_bytes"] / 1e6:.1f} MB |',
                  f'| database (rows with int8 codes) | {c["db_bytes"] / 1e6:.1f} MB |',
                  f'| RSS after build / at end | {c["rss_mb_after_build"]:.0f} / {c["rss_mb"]:.0f} MB |',
                  '', 'Vectors are synthetic (2,000 topics with 24-d variation and noise; see corpus()); '
                  'queries are other draws from the same topics (their exact nearest neighbours have mean '
                  f'cosine {c["exact_cosine_top1_top10"][0]:.2f} (1st) and {c["exact_cosine_top1_top10"][1]:.2f} '
                  '(10th)). Embedding a million texts with MiniLM on this machine would take hours.']
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    sys.exit(main())
