"""Encryption at rest in the storage layer, on real files: blobs and archive files through the
encrypting object store (one file per data subject, one per UTC day for anonymous data),
crypto-shredding of a subject's archives, retention shredding whole days, clear errors at
start, and `loom storage rotate-key` run as a user runs it while a process keeps working."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import loom_cli

from loom_ros.bus.event import Event
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, ConsentState
from loom_ros.security.keyring import (DecryptError, EncryptionSettings, KeyringError, MasterKey,
                                       ShreddedError, read_key_file, write_key_file)
from loom_ros.storage.backend.encrypted import EncryptedObjectStore
from loom_ros.storage.backend.local import LocalObjectStore
from loom_ros.storage.embedding import HashEmbedder
from loom_ros.storage.errors import StorageError
from loom_ros.storage.lifecycle import Lifecycle, LifecycleParams, PolicyRule, TierPolicy
from loom_ros.storage.storage import Storage, StorageConfig

DAY_MS = 86_400_000
T0 = 1_700_000_000_000            # 2023-11-14 22:13 UTC: events below straddle two UTC days


class Clock:
    def __init__(self, ms: int = T0):
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def open_storage(tmp_path: Path, clock, key_path: Path | None = None, env=None) -> Storage:
    key_path = key_path or tmp_path / 'master.key'
    if not key_path.exists():
        write_key_file(key_path, [MasterKey.generate()])
    return Storage(StorageConfig(root=str(tmp_path / 'root'), unit='host',
                                 encryption=EncryptionSettings(True, str(key_path))),
                   clock=clock, env=env or {}, consent=GrantAll)


class GrantAll:
    """Every subject consents to storage (storage consent: test_storage_consent.py)."""

    @staticmethod
    def lookup(subject: str, purpose: str) -> ConsentState:
        return ConsentState(purpose, True, True, 'test')


def files_under(folder: Path) -> bytes:
    return b''.join(p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file())


def test_blobs_are_encrypted_bound_to_their_key_and_never_read_as_plaintext(tmp_path):
    clock = Clock()
    with open_storage(tmp_path, clock) as storage:
        objects = storage.objects
        assert isinstance(objects, EncryptedObjectStore) and objects.name == 'encrypted local'
        objects.put('blobs/alice/answer.wav', b'RIFF alice canary 5d1e', subject='alice')
        objects.put('blobs/anon/frame.jpg', b'\xff\xd8 anonymous canary 8b20')
        assert objects.get('blobs/alice/answer.wav') == b'RIFF alice canary 5d1e'
        assert objects.get('blobs/anon/frame.jpg') == b'\xff\xd8 anonymous canary 8b20'
        folder = storage.layout.objects
        assert b'canary' not in files_under(folder)
        assert objects.key_id('blobs/alice/answer.wav') != objects.key_id('blobs/anon/frame.jpg')
        # copied to another key: refused (the object key is bound into the ciphertext)
        shutil.copy(folder / 'blobs/alice/answer.wav', folder / 'blobs/bob.wav')
        with pytest.raises(DecryptError, match='blobs/bob.wav: .*fails authentication'):
            objects.get('blobs/bob.wav')
        # a plaintext file planted in the store is refused, never returned as it is
        (folder / 'blobs/planted.txt').write_bytes(b'plain bytes')
        with pytest.raises(DecryptError, match='not a Loom ciphertext'):
            objects.get('blobs/planted.txt')
        # a huge object is refused before it is read (a sparse file: no disk used)
        with open(folder / 'blobs/huge.bin', 'wb') as f:
            f.truncate(600 * 1024 * 1024)
        with pytest.raises(DecryptError, match='longer than any ciphertext'):
            objects.get('blobs/huge.bin')
        assert storage.keyring.rejected == {'tampered': 1, 'bad_magic': 1, 'oversize': 1}


def add_subject_column(storage: Storage) -> None:
    """The data-subject column of episodes (issue 17's "Data subjects"); archives follow it."""
    if not any(r['name'] == 'subject' for r in storage.query('pragma table_info(episodes)')):
        storage.write("alter table episodes add column subject text not null default ''").wait(10)


def record(storage: Storage, agent: str, text: str, at_ms: int, subject: str = ''):
    storage.episodes.record(agent, Event(type='speech.heard', source='mic', id=text,
                                         payload=text.encode(), timestamp_ms=at_ms,
                                         metadata={SUBJECT_METADATA_KEY: subject} if subject
                                         else {})).wait(10)


def lifecycle(storage: Storage, clock, archive_s: float = 0.0) -> Lifecycle:
    default = TierPolicy(warm_s=60, cold_s=600, archive_s=archive_s)
    raw = PolicyRule(agent='raw', policy=TierPolicy(warm_s=60, cold=False, archive_s=archive_s))
    return Lifecycle(storage.layout, storage.unit, storage.objects, HashEmbedder(),
                     LifecycleParams(default=default, rules=[raw], bucket_s=5), clock=clock,
                     consent=GrantAll)


def archive_keys(lc: Lifecycle) -> list[str]:
    return [k for (k,) in lc.conn.execute("select key from archive where state = 'done' "
                                          'order by key')]


def test_archives_are_per_subject_and_a_shredded_subject_stays_unreadable(tmp_path):
    clock = Clock()
    with open_storage(tmp_path, clock) as storage:
        add_subject_column(storage)
        for i in range(4):
            record(storage, 'raw', f'alice-canary-{i}', T0 + i * 3_600_000, 'alice')
            record(storage, 'raw', f'bob-canary-{i}', T0 + i * 3_600_000, 'bob')
            record(storage, 'raw', f'anon-canary-{i}', T0 + i * 3_600_000)   # crosses midnight
            record(storage, 'chat', f'cold-canary-{i}', T0 + i * 1000)
        clock.ms = T0 + 2 * DAY_MS
        lc = lifecycle(storage, clock)
        lc.run_once()
        keys = archive_keys(lc)
        by_key = {k: lc.read_archive(k) for k in keys}
        owners = {k: {r.get('subject', '') for r in records} for k, records in by_key.items()}
        assert all(len(o) == 1 for o in owners.values())      # one subject (or none) per file
        alice = [k for k, o in owners.items() if o == {'alice'}]
        bob = [k for k, o in owners.items() if o == {'bob'}]
        anonymous_raw = [k for k in keys if '/warm/' in k and owners[k] == {''}]
        cold = [k for k in keys if '/cold/' in k]
        assert len(alice) == 1 and len(bob) == 1 and len(anonymous_raw) == 2   # two UTC days
        assert len(cold) == 1 and 'cold-canary-0' in by_key[cold[0]][0]['summary']
        assert sorted(r['payload'] for r in by_key[alice[0]]) == \
            [f'alice-canary-{i}' for i in range(4)]
        ids = {k: storage.objects.key_id(k) for k in keys}
        assert len({ids[alice[0]], ids[bob[0]], *(ids[k] for k in anonymous_raw)}) == 4
        assert b'canary' not in files_under(storage.layout.objects)
        # a copy taken before the erasure (a backup of the archive)
        backup = (storage.layout.objects / alice[0]).read_bytes()
        assert storage.keyring.destroy('alice')['keys'] == 1
        lc.close()
    # a fresh process holding the master key cannot read alice's archive nor its backup copy
    with open_storage(tmp_path, clock) as storage:
        lc = lifecycle(storage, clock)
        with pytest.raises(ShreddedError, match='crypto-shredded'):
            lc.read_archive(alice[0])
        with pytest.raises(ShreddedError):
            storage.keyring.decrypt(backup, EncryptedObjectStore.context(alice[0]))
        assert [r['payload'] for r in lc.read_archive(bob[0])][0] == 'bob-canary-0'
        assert all(lc.read_archive(k) for k in anonymous_raw + cold)
        lc.close()


def test_retention_shreds_whole_days(tmp_path):
    clock = Clock()
    with open_storage(tmp_path, clock) as storage:
        for day in range(3):   # each written on its day (what the lifecycle ages by)
            clock.ms = T0 + day * DAY_MS
            record(storage, 'raw', f'day-{day}', T0 + day * DAY_MS)
        clock.ms = T0 + 2 * DAY_MS + 120_000
        lc = lifecycle(storage, clock, archive_s=2.5 * 86_400)
        lc.run_once()
        keys = archive_keys(lc)
        assert len(keys) == 3
        copies = {k: (storage.layout.objects / k).read_bytes() for k in keys}
        clock.ms = T0 + int(3.6 * DAY_MS)       # the files of days 0 and 1 are past archive_s
        report = lc.run_once()
        assert report.archive_deleted == 2 and len(archive_keys(lc)) == 1
        shredded = [k for k in keys if k not in archive_keys(lc)]
        for key in shredded:     # even a copy kept elsewhere is unreadable now
            with pytest.raises(ShreddedError):
                storage.keyring.decrypt(copies[key], EncryptedObjectStore.context(key))
        assert lc.read_archive(archive_keys(lc)[0])[0]['payload'] == 'day-2'
        lc.close()


def test_wrong_or_missing_master_key_stops_storage_at_start(tmp_path):
    clock = Clock()
    with open_storage(tmp_path, clock) as storage:
        storage.objects.put('blobs/x', b'x', subject='sam')
    wrong = tmp_path / 'wrong.key'
    write_key_file(wrong, [MasterKey.generate()])
    with pytest.raises(KeyringError, match='wrong master key'):
        open_storage(tmp_path, clock, wrong)
    with pytest.raises(KeyringError, match='no master key'):
        Storage(StorageConfig(root=str(tmp_path / 'root'), unit='host',
                              encryption=EncryptionSettings(True, '')), clock=clock, env={})
    os.chmod(tmp_path / 'master.key', 0o644)
    with pytest.raises(KeyringError, match='chmod 600'):
        open_storage(tmp_path, clock)
    os.chmod(tmp_path / 'master.key', 0o600)
    with open_storage(tmp_path, clock) as storage:     # nothing was left locked by the failures
        assert storage.objects.get('blobs/x') == b'x'
    # encryption turned off later: refused at start, never plaintext beside the ciphertext
    with pytest.raises(KeyringError, match='holds rows encrypted at rest, but storage.encryption '
                                           'is off'):
        Storage(StorageConfig(root=str(tmp_path / 'root'), unit='host'), clock=clock)


def loom(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *loom_cli('storage', *args)], capture_output=True,
                          text=True, timeout=120)


def test_rotate_key_from_the_command_line_while_a_process_keeps_working(tmp_path):
    clock = Clock()
    key_path = tmp_path / 'master.key'
    made = loom('keygen', str(key_path))
    assert made.returncode == 0 and oct(key_path.stat().st_mode)[-3:] == '600', made.stderr
    old = read_key_file(key_path)
    shutil.copy(key_path, tmp_path / 'old.key')
    with open_storage(tmp_path, clock, key_path) as storage:
        for name in ('ana', 'ben', 'cy'):
            storage.objects.put(f'blobs/{name}', name.encode(), subject=name)
        storage.objects.put('blobs/day', b'anonymous', time_ms=T0)
        done = loom('rotate-key', '--root', str(tmp_path / 'root'), '--key-file', str(key_path),
                    '--json')
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result['previous_master_id'] == old[0].id and result['rewrapped'] == 4
        assert result['retired'] == [old[0].id] and result['done']
        new = read_key_file(key_path)
        assert [k.id for k in new] == [result['master_id']]
        # the running process still reads and writes (it re-reads the key file)
        assert storage.objects.get('blobs/ben') == b'ben'
        storage.objects.put('blobs/dee', b'dee', subject='dee')
        assert storage.keyring.master_id == result['master_id']
    with pytest.raises(KeyringError, match='wrong master key'):
        open_storage(tmp_path, clock, tmp_path / 'old.key')
    with open_storage(tmp_path, clock, key_path) as storage:
        assert [storage.objects.get(f'blobs/{n}') for n in ('ana', 'dee', 'day')] == \
            [b'ana', b'dee', b'anonymous']
    os.chmod(key_path, 0o640)
    refused = loom('rotate-key', '--root', str(tmp_path / 'root'), '--key-file', str(key_path))
    assert refused.returncode == 1 and 'chmod 600' in refused.stderr


def test_damaged_archive_files_are_clear_errors(tmp_path):
    """read_archive on a plain store: truncated or garbage files are refused, not half read."""
    clock = Clock()
    with Storage(StorageConfig(root=str(tmp_path / 'root'), unit='host'), clock=clock) as storage:
        for i in range(50):
            record(storage, 'raw', f'event-{i}', T0 + i)
        clock.ms = T0 + DAY_MS
        objects = LocalObjectStore(storage.layout.objects)
        lc = Lifecycle(storage.layout, storage.unit, objects, HashEmbedder(), LifecycleParams(
            default=TierPolicy(warm_s=60, cold=False)), clock=clock, consent=GrantAll)
        lc.run_once()
        (key,) = archive_keys(lc)
        assert len(lc.read_archive(key)) == 50
        body = objects.get(key)
        objects.put(key, body[:len(body) // 2])
        with pytest.raises(StorageError, match='truncated'):
            lc.read_archive(key)
        objects.put(key, b'\x1f\x8b' + bytes(100))
        with pytest.raises(StorageError, match='damaged'):
            lc.read_archive(key)
        lc.close()
