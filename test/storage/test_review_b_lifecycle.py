"""Review B of the storage layer's data lifecycle: links planted under the object root, due rows
that starved behind rows a longer policy keeps, rows of a subject whose `store` consent was
withdrawn, non-finite ages and sizes, one unit database that cannot be opened, a damaged cold
index header and a file where the cold folder belongs. Real SQLite files, real faiss, real files
and links under tmp_path; ages from an injected clock."""
from __future__ import annotations

import gzip
import json
import re
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import faiss
import numpy as np
import pytest

from harness import WAIT_LIMIT_S, MsClock, T0_MS, loom_cli
from loom_ros.bus.event import Event
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY
from loom_ros.security.audit import AuditLog
from loom_ros.storage.backend.local import LocalObjectStore
from loom_ros.storage.cold import MAGIC
from loom_ros.storage.consent import ConsentRegistry, SubjectRefs, consent_path
from loom_ros.storage.embedding import HashEmbedder
from loom_ros.storage.errors import IndexMismatchError, StorageError
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.lifecycle import (Lifecycle, LifecycleParams, PolicyRule, TierPolicy,
                                        load_policies)
from loom_ros.storage.service import Settings, StorageService, default_params, settings_from_params
from loom_ros.storage.storage import Storage, StorageConfig

T0 = T0_MS
DAY_MS = 86_400_000


def event(i: int, ts: int, text: str = '', subject: str | None = None,
          type_: str = 'chat.said') -> Event:
    metadata = {SUBJECT_METADATA_KEY: subject} if subject else {}
    return Event(type=type_, source='mic', id=f'e{i}-{uuid.uuid4().hex[:6]}', timestamp_ms=ts,
                 payload=json.dumps({'text': text or f'said {i}'}).encode(), tags=['t'],
                 metadata=metadata)


def write(root: Path, unit: str, events: list[tuple[str, Event]], clock) -> None:
    """Events through the storage layer's writer, committed, the unit closed."""
    with Storage(StorageConfig(root=str(root), unit=unit), clock=clock) as storage:
        ticket = None
        for agent, e in events:
            ticket = storage.episodes.record(agent, e)
        if ticket is not None:
            ticket.wait(WAIT_LIMIT_S)
        storage.flush()


def open_lifecycle(root: Path, unit: str, clock, params: LifecycleParams, **kw) -> Lifecycle:
    layout = StorageLayout.at(root)
    return Lifecycle(layout, unit, kw.pop('objects', LocalObjectStore(layout.objects)),
                     HashEmbedder(), params, clock=clock, **kw)


def loom(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *loom_cli('storage', *args)], capture_output=True,
                          text=True, timeout=120)


# -- 1. links under the object root ----------------------------------------------------------
def test_recovery_never_walks_into_or_deletes_through_a_link_under_the_object_root(tmp_path):
    root, outside = tmp_path / 'root', tmp_path / 'outside'
    clock = MsClock()
    write(root, 't', [('a', event(i, T0 + i)) for i in range(3)], clock)
    # someone else's files, and a link to them where this unit's archive files go
    (outside / 'warm').mkdir(parents=True)
    victim = outside / 'warm' / '0001700000000000-deadbeef0000.jsonl.gz'
    victim.write_bytes(gzip.compress(b'{"id":1}\n'))
    objects = StorageLayout.at(root).objects
    (objects / 'archive').mkdir(parents=True)
    (objects / 'archive' / 't').symlink_to(outside, target_is_directory=True)
    store = LocalObjectStore(objects)
    lc = open_lifecycle(root, 't', clock, LifecycleParams(), objects=store)
    try:
        # recovery dropped archive objects no row knows: never one reached through the link
        assert victim.read_bytes() == gzip.compress(b'{"id":1}\n')
        assert lc.links_refused == 1 and store.refused == 1
        assert store.list('archive/t/') == [] and store.list() == []
    finally:
        lc.close()
    # a link in place of a file is neither listed nor followed either (the link itself stays)
    (objects / 'archive' / 't').unlink()
    (objects / 'archive' / 't' / 'warm').mkdir(parents=True)
    planted = objects / 'archive' / 't' / 'warm' / victim.name
    planted.symlink_to(victim)
    (objects / 'archive' / 't' / 'warm' / 'real.bin').write_bytes(b'x' * 5)
    store = LocalObjectStore(objects)
    assert store.list('archive/t/') == [('archive/t/warm/real.bin', 5)]
    assert store.refused == 1
    with pytest.raises(StorageError):
        store.get(f'archive/t/warm/{victim.name}')
    assert victim.exists() and planted.is_symlink()


def test_retention_and_reads_refuse_a_linked_folder_above_an_archive_file(tmp_path):
    root, outside = tmp_path / 'root', tmp_path / 'outside'
    clock = MsClock()
    write(root, 't', [('a', event(i, T0 + i * 1000)) for i in range(4)], clock)
    params = LifecycleParams(default=TierPolicy(warm_s=60, cold=False, archive_s=3600))
    lc = open_lifecycle(root, 't', clock, params)
    clock.ms = T0 + 120_000
    assert lc.run_once().archived == 4
    (key,) = [k for (k,) in lc.conn.execute("select key from archive where state = 'done'")]
    lc.close()
    # the unit's warm archive folder moved out of the root and a link left in its place: the
    # files it reaches are someone else's now
    folder = StorageLayout.at(root).objects / 'archive' / 't' / 'warm'
    outside.mkdir()
    folder.rename(outside / 'warm')
    folder.symlink_to(outside / 'warm', target_is_directory=True)
    elsewhere = outside / 'warm' / Path(key).name
    assert elsewhere.is_file()
    lc = open_lifecycle(root, 't', clock, params)
    try:
        with pytest.raises(StorageError, match='symbolic link.*not followed'):
            lc.read_archive(key)
        clock.ms = T0 + 120_000 + 3_700_000     # past archive_s: retention deletes the file
        with pytest.raises(StorageError, match=re.escape(str(folder)) + '.*symbolic link'):
            lc.expire_archive()
        assert elsewhere.is_file()               # never deleted through the link
    finally:
        lc.close()


def test_a_failed_archive_write_leaves_no_pending_row_and_the_move_is_done_later(tmp_path):
    """A put that fails (here a file where the unit's archive folder goes; a full disk alike)
    left its 'pending' archive row behind every round until the next open."""
    root = tmp_path / 'root'
    clock = MsClock()
    write(root, 't', [('a', event(i, T0 + i * 1000)) for i in range(4)], clock)
    params = LifecycleParams(default=TierPolicy(warm_s=60, cold=False, archive_s=3600))
    blocker = StorageLayout.at(root).objects / 'archive' / 't'
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text('not a folder')
    lc = open_lifecycle(root, 't', clock, params)
    try:
        clock.ms = T0 + 120_000
        for _round in range(3):
            with pytest.raises(Exception):
                lc.run_once()
            assert lc.conn.execute('select count(*) from archive').fetchone()[0] == 0
            assert lc.conn.execute('select count(*) from episodes').fetchone()[0] == 4
        blocker.unlink()   # space is back
        assert lc.run_once().archived == 4
        assert lc.conn.execute("select state from archive").fetchall() == [('done',)]
    finally:
        lc.close()


# -- 2. due rows behind rows a longer policy keeps ------------------------------------------
def test_rows_a_longer_policy_keeps_never_starve_another_agents_due_rows(tmp_path):
    root, clock = tmp_path / 'root', MsClock()
    # 300 older events of an agent whose warm tier lasts 10 days, then 5 of one with a minute
    write(root, 't', [('slow', event(i, T0 + i)) for i in range(300)]
          + [('fast', event(1000 + i, T0 + 1000 + i)) for i in range(5)], clock)
    params = LifecycleParams(default=TierPolicy(warm_s=60, cold_s=30 * 86400),
                             rules=[PolicyRule(agent='slow', policy=TierPolicy(warm_s=10 * 86400))],
                             move_batch=10, bucket_s=10)
    lc = open_lifecycle(root, 't', clock, params)

    def warm(agent: str) -> int:
        return lc.conn.execute('select count(*) from episodes where agent_id = ?',
                               (agent,)).fetchone()[0]
    try:
        clock.ms = T0 + 120_000
        for _ in range(3):   # each look reads 20 pages of 10 rows, and the next one resumes
            lc.run_once()
        assert warm('fast') == 0 and warm('slow') == 300
        assert lc.conn.execute("select sum(count) from cold where agent_id = 'fast'"
                               ).fetchone()[0] == 5
        clock.ms = T0 + 11 * DAY_MS              # now the slow agent's rows are due too
        for _ in range(3):
            lc.run_once()
        assert warm('slow') == 0
        assert lc.conn.execute('select sum(count) from cold').fetchone()[0] == 305
    finally:
        lc.close()


# -- 3. store consent withdrawn --------------------------------------------------------------
def test_rows_of_a_subject_whose_store_consent_was_withdrawn_are_dropped_and_counted(tmp_path):
    root, clock = tmp_path / 'root', MsClock()
    root.mkdir()
    audit = AuditLog(root / 'audit.db')
    consent = ConsentRegistry(consent_path(root), audit=audit, refs=SubjectRefs.at(root / 'keys'))
    for subject in ('alice', 'bob', 'carol'):
        consent.grant(subject, 'store', 'cli:test')
    canary = {who: f'CANARY{who}{uuid.uuid4().hex}' for who in ('alice', 'bob', 'anon')}
    # the storage opens the root's registry: every event below is kept (consent given)
    write(root, 't', [('a1', event(i, T0 + i * 1000, canary['alice'], 'alice')) for i in range(3)]
          + [('a1', event(10 + i, T0 + i * 1000, canary['bob'], 'bob')) for i in range(2)]
          + [('a1', event(20 + i, T0 + i * 1000, canary['anon'])) for i in range(2)], clock)
    params = LifecycleParams(default=TierPolicy(warm_s=60, cold_s=600), bucket_s=10)
    lc = open_lifecycle(root, 't', clock, params)   # asks the root's registry as well
    try:
        consent.withdraw('alice', 'store', 'cli:test')
        clock.ms = T0 + 120_000
        report = lc.move_warm()
        assert (report.consent_deleted, report.condensed, report.memories) == (3, 4, 2)
        assert lc.conn.execute('select count(*) from episodes').fetchone()[0] == 0
        assert sorted(r[0] for r in lc.conn.execute('select subject from cold')) == ['', 'bob']
        # counted as the writer counts an event it may not keep: per agent, type and day
        assert [tuple(r) for r in lc.conn.execute('select * from withheld')] == [
            ('a1', 'chat.said', '2023-11-14', 3)]
        consent.withdraw('bob', 'store', 'cli:test')
        clock.ms += 600_000
        report = lc.move_cold()
        assert (report.consent_deleted, report.archived, report.deleted) == (1, 1, 0)
        assert lc.conn.execute('select count(*) from cold').fetchone()[0] == 0
        (key,) = [k for (k,) in lc.conn.execute('select key from archive')]
        (record,) = lc.read_archive(key)
        assert 'subject' not in record and canary['anon'] in record['summary']
        assert lc.usage()['withheld']['rows'] == 5      # alice's 3 events and bob's memory of 2
        assert lc.run_once().consent_deleted == 0
    finally:
        lc.close()
    objects = b''.join(p.read_bytes() for p in (root / 'objects').rglob('*') if p.is_file())
    assert canary['anon'].encode() in gzip.decompress(objects)   # the scan sees the text
    assert canary['alice'].encode() not in gzip.decompress(objects)
    assert canary['bob'].encode() not in gzip.decompress(objects)
    # A registry that cannot be read: nothing moves, nothing is deleted on a guess.
    write(root, 't', [('a1', event(30, T0 + 2 * DAY_MS, 'carol said', 'carol'))], clock)
    consent.close()
    audit.close()
    for path in root.glob('consent.db*'):
        path.unlink()
    consent_path(root).write_bytes(b'this is not a database' * 200)
    lc = open_lifecycle(root, 't', clock, params)
    try:
        clock.ms = T0 + 3 * DAY_MS
        with pytest.raises(StorageError, match='consent registry cannot be read.*nothing moved'):
            lc.move_warm()
        assert lc.conn.execute("select count(*) from episodes where subject = 'carol'"
                               ).fetchone()[0] == 1
    finally:
        lc.close()


# -- 4. NaN and infinity ---------------------------------------------------------------------
@pytest.mark.parametrize('key, value', [
    ('storage.lifecycle.warm_s', float('nan')), ('storage.lifecycle.archive_s', float('inf')),
    ('storage.lifecycle.bucket_s', float('nan')), ('storage.budget.total_bytes', float('inf')),
    ('storage.index.nprobe', float('nan')), ('storage.max_moves_per_round', float('inf')),
    ('storage.move_period_s', float('nan')), ('storage.stats_period_s', float('inf')),
    ('storage.lifecycle.clock_tolerance_s', float('nan')),
    ('storage.lifecycle.clock_settle_s', 0.5)])
def test_non_finite_parameters_are_refused_by_name(tmp_path, key, value):
    params = {**default_params(), 'storage.root': str(tmp_path)}
    assert settings_from_params(params, {}).lifecycle.default.warm_s > 0   # as shipped: fine
    with pytest.raises(StorageError, match=re.escape(key) + ': must be a finite number'):
        settings_from_params({**params, key: value}, {})


def test_the_clock_rules_are_node_parameters(tmp_path):
    params = {**default_params(), 'storage.root': str(tmp_path)}
    shipped = settings_from_params(params, {}).lifecycle
    assert (shipped.clock_tolerance_s, shipped.clock_settle_s) == (60.0, 3600.0)
    mine = settings_from_params({**params, 'storage.lifecycle.clock_tolerance_s': 5.0,
                                 'storage.lifecycle.clock_settle_s': 600.0}, {}).lifecycle
    assert (mine.clock_tolerance_s, mine.clock_settle_s) == (5.0, 600.0)


@pytest.mark.parametrize('rule', ['{agent: x, warm_s: .nan}', '{type: y, cold_s: .inf}',
                                  '{archive_s: -.inf}'])
def test_non_finite_policy_ages_are_refused_naming_the_rule(tmp_path, rule):
    path = tmp_path / 'policies.yaml'
    path.write_text(f'- {{agent: ok, warm_s: 30}}\n- {rule}\n')
    with pytest.raises(StorageError, match='rule 1: .*_s must be a finite number'):
        load_policies(str(path), TierPolicy())


# -- 5. one unit database that cannot be opened ------------------------------------------------
def test_one_unit_that_cannot_be_opened_is_reported_and_the_others_move(tmp_path):
    root, clock = tmp_path / 'root', MsClock()
    for unit in ('a', 'b'):
        write(root, unit, [('agent', event(i, T0 + i * 1000)) for i in range(3)], clock)
    layout = StorageLayout.at(root)
    bad = layout.database('bad')
    bad.write_bytes(b'not a database, not at all' * 400)
    settings = Settings(layout, lifecycle=LifecycleParams(default=TierPolicy(warm_s=60),
                                                         bucket_s=10))
    service = StorageService(settings, embedder=HashEmbedder(), clock=clock)
    try:
        assert service.units() == ['a', 'b'] and list(service.failed) == ['bad']
        assert str(bad) in service.error
        clock.ms = T0 + 120_000
        report = service.run_round()
        assert report.condensed == 6 and report.memories == 2        # both good units moved
        assert str(bad) in service.error
        # a unit damaged after the start: the same
        late = layout.database('late')
        late.write_bytes(b'\0garbage' * 1000)
        write(root, 'a', [('agent', event(9, T0 + 200_000))], clock)
        clock.ms = T0 + 400_000
        report = service.run_round()
        assert report.condensed == 1
        assert str(bad) in service.error and str(late) in service.error
        assert service.stats()['failed_units'] == ['bad', 'late']
        bad.unlink()                               # gone: no longer reported
        late.unlink()
        service.run_round()
        assert service.error == '' and service.failed == {}
    finally:
        service.close()
    # a mover that can open no unit at all stops with that unit's error (as before)
    only = tmp_path / 'only'
    StorageLayout.at(only).database('x').parent.mkdir(parents=True)
    StorageLayout.at(only).database('x').write_bytes(b'garbage' * 100)
    with pytest.raises(StorageError, match=re.escape(str(StorageLayout.at(only).database('x')))):
        StorageService(Settings(StorageLayout.at(only)), embedder=HashEmbedder(), clock=clock)


# -- 6. a damaged cold index ------------------------------------------------------------------
def _flat_body(n: int) -> bytes:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(384))
    index.add_with_ids(np.ones((n, 384), np.float32), np.arange(n, dtype=np.int64))
    return faiss.serialize_index(index).tobytes()


def _header(good: bytes) -> bytes:
    return good[:12 + struct.unpack_from('<I', good, 8)[0]]


def _huge_vector(n: int) -> bytes:
    """A flat index whose vector size field says far more than the file holds."""
    body = bytearray(_flat_body(n))
    at = body.find(struct.pack('<Q', n * 384))   # its size in floats
    assert at > 0
    body[at:at + 8] = struct.pack('<Q', 1 << 36)   # 256 GiB
    return bytes(body)


def _plain_flat() -> bytes:
    """An index of a kind Loom never saves (no ids): not flat-with-ids, not IVF."""
    index = faiss.IndexFlatIP(384)
    index.add(np.ones((3, 384), np.float32))
    return faiss.serialize_index(index).tobytes()


@pytest.mark.parametrize('damage', ['no seq', 'a list', 'seq text', 'plain flat', 'huge vector',
                                    'huge file'])
def test_a_damaged_cold_index_is_a_clear_error_naming_the_file(tmp_path, damage):
    root, clock = tmp_path / 'root', MsClock()
    write(root, 't', [('a', event(i, T0 + i * 1000)) for i in range(30)], clock)
    params = LifecycleParams(default=TierPolicy(warm_s=60), bucket_s=10)
    lc = open_lifecycle(root, 't', clock, params)
    clock.ms = T0 + 200_000
    lc.run_once()
    rows = lc.usage()['cold']['rows']
    lc.close()
    path = StorageLayout.at(root).cold_index('t')
    good = path.read_bytes()
    head = _header(good)
    header = json.loads(head[12:])

    def with_header(value, body=good[len(head):]) -> bytes:
        text = json.dumps(value).encode()
        return MAGIC + struct.pack('<I', len(text)) + text + body
    if damage == 'no seq':
        path.write_bytes(with_header({k: v for k, v in header.items() if k != 'seq'}))
    elif damage == 'a list':
        path.write_bytes(with_header([header]))
    elif damage == 'seq text':
        path.write_bytes(with_header({**header, 'seq': 'many'}))
    elif damage == 'plain flat':
        path.write_bytes(head + _plain_flat())
    elif damage == 'huge vector':
        path.write_bytes(head + _huge_vector(rows))
    else:   # a good index grown (sparse) past what an index of this database can take
        with open(path, 'r+b') as stream:
            stream.truncate(1024**3)
    with pytest.raises(IndexMismatchError,
                       match=re.escape(str(path)) + r'.*--rebuild-index') as caught:
        open_lifecycle(root, 't', clock, params)
    assert isinstance(caught.value, StorageError)
    # and what the message says it is: rebuilt from the rows, then it opens
    lc = open_lifecycle(root, 't', clock, params, rebuild=True)
    try:
        assert lc.index.ntotal == rows
    finally:
        lc.close()
    open_lifecycle(root, 't', clock, params).close()


# -- 7. a file where the cold folder belongs --------------------------------------------------
def test_a_file_where_the_cold_folder_belongs_is_a_clear_error(tmp_path):
    root, clock = tmp_path / 'root', MsClock()
    write(root, 't', [('a', event(0, T0))], clock)
    cold = StorageLayout.at(root).root / 'cold'
    cold.write_text('not a folder')
    with pytest.raises(StorageError, match=re.escape(str(cold)) + '.*is not a folder'):
        open_lifecycle(root, 't', clock, LifecycleParams())
    done = loom('compact', '--root', str(root), '--embedder', 'hash')
    assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr
    assert f'{cold}: ' in done.stderr and 'is not a folder' in done.stderr
    assert cold.read_text() == 'not a folder'


def test_rounds_skipped_for_the_clock_are_in_the_stats(tmp_path):
    """The lifecycle's skipped rounds (clock_untrusted) reach service.stats(), so storage/stats
    and `loom storage stats` show them, not only /diagnostics."""
    root, clock = tmp_path / 'root', MsClock()
    write(root, 'a', [('agent', event(i, T0 + i * 1000)) for i in range(3)], clock)
    settings = Settings(StorageLayout.at(root),
                        lifecycle=LifecycleParams(default=TierPolicy(warm_s=60), bucket_s=10))
    service = StorageService(settings, embedder=HashEmbedder(), clock=clock)
    try:
        clock.ms = 1_000   # 1970: a robot without a real-time clock, before NTP
        assert service.run_round().condensed == 0
        stats = service.stats()
        assert (stats['clock_untrusted'], stats['budget_unreachable']) == (1, 0)
        clock.ms = T0 + 120_000
        assert service.run_round().condensed == 3
        assert service.stats()['clock_untrusted'] == 1
    finally:
        service.close()
