"""Encryption at rest inside SQLite (docs/encryption.md): episode payloads and cold summaries are
AES-GCM ciphertext under the data subject's key (anonymous: the UTC day's), on real files. The
canaries are never in any byte under the root, even before an erasure; the store APIs, the
lifecycle, the storage service, the tools' reader and export read them back; a destroyed key
leaves a surviving row unreadable; a missing or wrong key stops the process at start."""
from __future__ import annotations

import json
import sqlite3
import uuid
import zipfile
from contextlib import closing
from pathlib import Path

import pytest

from harness import WAIT_LIMIT_S
from loom_ros.agents.memory import EpisodicMemory
from loom_ros.agents.state import AgentStore
from loom_ros.bus.event import Event
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, ConsentState
from loom_ros.security.keyring import (DecryptError, EncryptionSettings, Keyring, KeyringError,
                                       MasterKey, ShreddedError, write_key_file)
from loom_ros.storage.backend.local import LocalObjectStore
from loom_ros.storage.embedding import HashEmbedder
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.erasure import ErasureError, export
from loom_ros.storage.lifecycle import Lifecycle, LifecycleParams, TierPolicy
from loom_ros.storage.readers import AgentMemoryReader
from loom_ros.storage.rowcipher import episode_context
from loom_ros.storage.service import Settings, StorageService
from loom_ros.storage.storage import Storage, StorageConfig

T0 = 1_700_000_000_000


class GrantAll:
    @staticmethod
    def lookup(subject: str, purpose: str) -> ConsentState:
        return ConsentState(purpose, True, True, 'test')


class Clock:
    def __init__(self):
        self.ms = T0

    def __call__(self) -> int:
        return self.ms


def settings(tmp_path: Path) -> EncryptionSettings:
    key = tmp_path / 'master.key'
    if not key.exists():
        write_key_file(key, [MasterKey.generate()])
    return EncryptionSettings(True, str(key))


def open_storage(tmp_path: Path, clock, encryption=None) -> Storage:
    return Storage(StorageConfig(root=str(tmp_path / 'root'), unit='host',
                                 encryption=encryption or settings(tmp_path)),
                   clock=clock, env={}, consent=GrantAll)


def event(subject: str | None, text: str, at_ms: int) -> Event:
    return Event(type='speech.heard', source='mic', id=f'e-{uuid.uuid4().hex[:10]}',
                 payload=json.dumps({'text': text}).encode(), timestamp_ms=at_ms,
                 metadata={SUBJECT_METADATA_KEY: subject} if subject else {})


def every_byte(root: Path) -> bytes:
    return b''.join(p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file())


def texts(rows) -> list[str]:
    return sorted(json.loads(r['payload'])['text'] for r in rows)


def test_payloads_and_summaries_are_ciphertext_on_disk_and_read_back(tmp_path):
    clock = Clock()
    canary = {who: f'CANARY{who}{uuid.uuid4().hex}' for who in ('alice', 'bob', 'anon', 'agent')}
    storage = open_storage(tmp_path, clock)
    root = storage.layout.root
    try:
        for who in ('alice', 'bob', 'anon'):
            storage.episodes.record('a1', event(None if who == 'anon' else who, canary[who],
                                                T0)).wait(WAIT_LIMIT_S)
        agent = AgentStore(storage, 'a2')      # an agent's commit: state + episodes, one write
        agent.record(event('alice', canary['agent'], T0 + 1))
        agent.commit({'n': 1}, 1, 'x').wait(WAIT_LIMIT_S)
        storage.flush()
        stored = storage.query('select typeof(payload) as t from episodes')
        assert [r['t'] for r in stored] == ['blob'] * 4
        data = every_byte(root)
        for who, text in canary.items():
            assert text.encode() not in data, who          # not in the file, the WAL, anywhere
        # read back through the store APIs
        assert texts(storage.episodes.query('a1')) == sorted(canary[w] for w in
                                                             ('alice', 'bob', 'anon'))
        assert texts(EpisodicMemory(agent).query()) == [canary['agent']]
        # the tools' reader: with the key (a text search runs over the decrypted rows) ...
        reader = AgentMemoryReader(storage.layout, keyring=storage.keyring)
        assert texts(reader.episodes('a1', text=canary['bob'][6:20], asker='bob')) == \
            [canary['bob']]
        assert texts(reader.episodes('a1', asker='bob')) == sorted([canary['bob'],
                                                                   canary['anon']])
        # ... another subject's encrypted row does not answer a text search it matches
        assert reader.episodes('a1', text=canary['bob'][6:20], asker='alice') == []
        # ... and without it: a clear error, never ciphertext handed out as text
        with pytest.raises(KeyringError, match='encrypted at rest'):
            AgentMemoryReader(storage.layout).episodes('a1', asker='')
        # the storage service (node, `loom storage query`) reads them decrypted too
        service = StorageService(Settings(storage.layout, encryption=settings(tmp_path)),
                                 embedder=HashEmbedder(), clock=clock, read_only=True, env={})
        try:
            assert texts(service.query('episodes')) == sorted(canary.values())
        finally:
            service.close()
        # cold memories quote payloads: their summaries are ciphertext too
        lifecycle = Lifecycle(storage.layout, 'host', storage.objects, HashEmbedder(),
                              LifecycleParams(default=TierPolicy(warm_s=60, cold_s=600),
                                              bucket_s=10), clock=clock, consent=GrantAll)
        clock.ms = T0 + 120_000
        assert lifecycle.move_warm().memories == 4     # per agent and per subject
        found = lifecycle.search('speech heard', k=10)
        assert sorted(m['summary'].split(': ', 1)[1] for m in found) == sorted(
            json.dumps({'text': canary[w]}) for w in ('alice', 'bob', 'anon', 'agent'))
        assert {r[0] for r in lifecycle.conn.execute('select typeof(summary) from cold')} == \
            {'blob'}
        lifecycle.close()
        service = StorageService(Settings(storage.layout, encryption=settings(tmp_path)),
                                 embedder=HashEmbedder(), clock=clock, read_only=True, env={})
        try:
            assert sorted(m['summary'][-50:] for m in service.query(
                'memories', text='speech heard')) == sorted(m['summary'][-50:] for m in found)
        finally:
            service.close()
        data = every_byte(root)
        for who, text in canary.items():
            assert text.encode() not in data, who
    finally:
        storage.close()


def test_a_destroyed_key_leaves_a_surviving_row_unreadable(tmp_path):
    clock = Clock()
    storage = open_storage(tmp_path, clock)
    try:
        for who in ('alice', 'bob'):
            storage.episodes.record('a', event(who, f'{who}-said', T0)).wait(WAIT_LIMIT_S)
        storage.flush()
        backup = tmp_path / 'backup.db'   # a backup of the file, taken before the erasure
        with closing(sqlite3.connect(storage.path)) as source, \
                closing(sqlite3.connect(backup)) as copy:
            source.backup(copy)
        assert storage.keyring.destroy('alice')['keys'] == 1
        # the row survived (no erasure ran): the store leaves it out, it cannot be opened
        assert texts(storage.episodes.query('a')) == ['bob-said']
        row = storage.query("select * from episodes where subject = 'alice'")[0]
        with pytest.raises(ShreddedError, match='crypto-shredded'):
            storage.cipher.open(row['payload'], episode_context(
                row['agent_id'], row['event_id'], row['time_ms'], 'alice'))
        # the backup copy of the file holds the same ciphertext: unreadable too
        conn = sqlite3.connect(backup)
        payload, event_id = conn.execute("select payload, event_id from episodes where "
                                         "subject = 'alice'").fetchone()
        conn.close()
        with pytest.raises(ShreddedError):
            storage.keyring.decrypt(payload, episode_context('a', event_id, T0, 'alice'))
        # a ciphertext moved to another row (another subject) fails authentication
        storage.write("update episodes set payload = (select payload from episodes where "
                      "subject = 'bob') where subject = 'alice'").wait(WAIT_LIMIT_S)
        with pytest.raises(DecryptError, match='fails authentication'):
            storage.episodes.query('a')
    finally:
        storage.close()


def test_missing_or_wrong_key_stops_at_start_never_plaintext(tmp_path):
    clock = Clock()
    with open_storage(tmp_path, clock) as storage:
        storage.episodes.record('a', event('alice', 'alice-secret', T0)).wait(WAIT_LIMIT_S)
    wrong = tmp_path / 'wrong.key'
    write_key_file(wrong, [MasterKey.generate()])
    with pytest.raises(KeyringError, match='wrong master key'):
        open_storage(tmp_path, clock, EncryptionSettings(True, str(wrong)))
    with pytest.raises(KeyringError, match='no master key'):
        open_storage(tmp_path, clock, EncryptionSettings(True, ''))
    with pytest.raises(KeyringError, match='refusing to write plaintext'):
        Storage(StorageConfig(root=str(tmp_path / 'root'), unit='host'), clock=clock,
                consent=GrantAll)
    # the storage node's lifecycle without the key is refused the same way
    layout = StorageLayout.at(tmp_path / 'root')
    with pytest.raises(KeyringError, match='refusing to write plaintext'):
        Lifecycle(layout, 'host', LocalObjectStore(layout.objects), HashEmbedder())
    # nothing was left locked by the refusals, and the row is still there and readable
    with open_storage(tmp_path, clock) as storage:
        assert texts(storage.episodes.query('a')) == ['alice-secret']


def test_export_decrypts_with_the_key_and_refuses_without(tmp_path):
    clock = Clock()
    with open_storage(tmp_path, clock) as storage:
        storage.episodes.record('a', event('alice', 'alice-export', T0)).wait(WAIT_LIMIT_S)
        layout = storage.layout
    keyring = Keyring.open(layout.root, settings(tmp_path), {})
    try:
        counts = export(layout, 'alice', tmp_path / 'a.zip', keyring=keyring)
        assert counts['episodes'] == 1
        with zipfile.ZipFile(tmp_path / 'a.zip') as archive:
            data = json.loads(archive.read('subject.json'))
        assert json.loads(data['episodes'][0]['payload'])['text'] == 'alice-export'
    finally:
        keyring.close()
    with pytest.raises(ErasureError, match='master-key-file'):
        export(layout, 'alice', tmp_path / 'b.zip')
    assert not (tmp_path / 'b.zip').exists()
