"""The keyring of encryption at rest (loom_ros/security/keyring.py) on real files: master keys
from a 0600 file or the environment, per-subject and per-day data keys in the SQLite key table,
crypto-shredding that leaves no wrapped key on disk, rotation, and hostile ciphertexts."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from loom_ros.security.keyring import (KEYRING_FILE, MASTER_KEY_ENV, DecryptError,
                                       EncryptionSettings, Keyring, KeyringError, MasterKey,
                                       MasterKeySource, ShreddedError, day_of, read_key_file,
                                       encryption_settings, write_key_file)

DAY_MS = 86_400_000
T0 = 1_700_000_000_000           # 2023-11-14
CTX = b'test/object'


class Clock:
    def __init__(self, ms: int = T0):
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def key_file(tmp_path: Path, *keys: MasterKey, name: str = 'master.key') -> Path:
    path = tmp_path / name
    write_key_file(path, list(keys) or [MasterKey.generate()], replace=True)
    return path


def open_ring(root: Path, path: Path, clock=None) -> Keyring:
    return Keyring.open(root, EncryptionSettings(True, str(path)), {}, clock or Clock())


def disk_bytes(root: Path) -> bytes:
    """Every byte of the key table as it lies on disk: the file, its WAL and shared memory."""
    base = root / 'keys' / KEYRING_FILE
    return b''.join(Path(f'{base}{s}').read_bytes() for s in ('', '-wal', '-shm')
                    if Path(f'{base}{s}').exists())


def wrapped_of(root: Path) -> dict[bytes, bytes]:
    conn = sqlite3.connect(root / 'keys' / KEYRING_FILE)
    try:
        return dict(conn.execute('select key_id, wrapped from data_keys'))
    finally:
        conn.close()


def test_round_trip_per_subject_and_per_day(tmp_path):
    with open_ring(tmp_path / 'root', key_file(tmp_path)) as ring:
        alice = ring.encrypt(b'alice canary 7f3a', CTX, 'alice')
        bob = ring.encrypt(b'bob canary 91c2', CTX, 'bob')
        day1 = ring.encrypt(b'anonymous one', CTX, None, T0)
        day2 = ring.encrypt(b'anonymous two', CTX, None, T0 + DAY_MS)
        assert b'canary' not in alice + bob
        assert ring.decrypt(alice, CTX) == b'alice canary 7f3a'
        assert ring.decrypt(bob, CTX) == b'bob canary 91c2'
        assert ring.decrypt(day2, CTX) == b'anonymous two'
        ids = {Keyring.key_id_of(c) for c in (alice, bob, day1, day2)}
        assert len(ids) == 4     # a key per subject and per day
        assert Keyring.key_id_of(ring.encrypt(b'x', CTX, 'alice')) == Keyring.key_id_of(alice)
        assert ring.stats()['subject_keys'] == 2 and ring.stats()['day_keys'] == 2
        assert (tmp_path / 'root' / 'keys' / KEYRING_FILE).stat().st_mode & 0o077 == 0
    # another process (a second key table connection) reads the same keys
    with open_ring(tmp_path / 'root', tmp_path / 'master.key') as again:
        assert again.decrypt(alice, CTX) == b'alice canary 7f3a'
        assert again.decrypt(day1, CTX) == b'anonymous one'


def test_same_subject_gets_one_key_across_connections(tmp_path):
    path = key_file(tmp_path)
    with open_ring(tmp_path / 'root', path) as a, open_ring(tmp_path / 'root', path) as b:
        assert a.subject_key('carol').key_id == b.subject_key('carol').key_id
        assert a.day_key(T0).key_id == b.day_key(T0 + 1000).key_id


def test_destroyed_subject_is_unreadable_and_physically_gone(tmp_path):
    root, path = tmp_path / 'root', key_file(tmp_path)
    with open_ring(root, path) as ring:
        alice = ring.encrypt(b'alice data', CTX, 'alice')
        bob = ring.encrypt(b'bob data', CTX, 'bob')
        alice_id = Keyring.key_id_of(alice)
        wrapped = wrapped_of(root)[alice_id]
        assert wrapped in disk_bytes(root)
        receipt = ring.destroy('alice')
        assert receipt == {'keys': 1, 'key_ids': [alice_id.hex()], 'checkpointed': True}
        with pytest.raises(ShreddedError, match='crypto-shredded'):
            ring.decrypt(alice, CTX)
        assert ring.decrypt(bob, CTX) == b'bob data'
    # with the master key, from a fresh process: still gone; the wrapped key is on no page
    assert wrapped not in disk_bytes(root)
    assert alice_id not in wrapped_of(root)
    with open_ring(root, path) as ring:
        with pytest.raises(ShreddedError):
            ring.decrypt(alice, CTX)
        assert ring.decrypt(bob, CTX) == b'bob data'
        assert ring.rejected['shredded'] == 1
        # new data of the same subject gets a new key; the old ciphertext stays unreadable
        again = ring.encrypt(b'alice later', CTX, 'alice')
        assert Keyring.key_id_of(again) != alice_id
        with pytest.raises(ShreddedError):
            ring.decrypt(alice, CTX)


def test_destroy_in_one_process_reaches_another_processes_cache(tmp_path):
    root, path = tmp_path / 'root', key_file(tmp_path)
    with open_ring(root, path) as writer, open_ring(root, path) as eraser:
        blob = writer.encrypt(b'cached', CTX, 'dave')
        assert writer.decrypt(blob, CTX) == b'cached'       # the key is now in writer's cache
        eraser.destroy('dave')
        with pytest.raises(ShreddedError):
            writer.decrypt(blob, CTX)


def test_days_are_shredded_whole(tmp_path):
    with open_ring(tmp_path / 'root', key_file(tmp_path)) as ring:
        blobs = {d: ring.encrypt(b'day %d' % d, CTX, None, T0 + d * DAY_MS) for d in range(4)}
        subject = ring.encrypt(b'a subject', CTX, 'erin', T0)
        assert ring.destroy_day(day_of(T0))['keys'] == 1
        with pytest.raises(ShreddedError):
            ring.decrypt(blobs[0], CTX)
        assert ring.destroy_days_before(T0 + 3 * DAY_MS)['keys'] == 2    # days 1 and 2
        for d in (1, 2):
            with pytest.raises(ShreddedError):
                ring.decrypt(blobs[d], CTX)
        assert ring.decrypt(blobs[3], CTX) == b'day 3'
        assert ring.decrypt(subject, CTX) == b'a subject'     # subject keys are not day keys
        with pytest.raises(KeyringError, match='YYYY-MM-DD'):
            ring.destroy_day("2023-11-14' or 1=1 --")


def test_hostile_ciphertexts_are_refused_and_counted(tmp_path):
    with open_ring(tmp_path / 'root', key_file(tmp_path)) as ring:
        good = ring.encrypt(b'payload', CTX, 'frank')
        flipped = bytearray(good)
        flipped[-1] ^= 1
        forged_id = bytearray(good)
        forged_id[5] ^= 0xFF                       # another (unknown) key id in the header
        other = ring.encrypt(b'other', CTX, 'gina')
        swapped = good[:5] + other[5:21] + good[21:]   # gina's key id on frank's ciphertext
        long_id = good[:4] + bytes([200]) + good[5:]
        cases = [
            (bytes(flipped), 'tampered', 'fails authentication'),
            (bytes(forged_id), 'unknown_key', 'not in'),
            (swapped, 'tampered', 'fails authentication'),
            (long_id, 'bad_header', 'key id length 200'),
            (b'LKE\x02' + good[4:], 'bad_version', 'version 2'),
            (b'plain text, not encrypted', 'bad_magic', 'not a Loom ciphertext'),
            (good[:20], 'truncated', 'shorter than'),
        ]
        for blob, reason, message in cases:
            before = ring.rejected[reason]
            with pytest.raises(DecryptError, match=message):
                ring.decrypt(blob, CTX)
            assert ring.rejected[reason] == before + 1, reason
        with pytest.raises(DecryptError, match='fails authentication'):
            ring.decrypt(good, b'another/object')     # bound to where it was stored
        assert ring.decrypt(good, CTX) == b'payload'
        assert ring.stats()['rejected_total'] == len(cases) + 1


def test_wrong_or_missing_master_key_fails_at_start(tmp_path):
    root = tmp_path / 'root'
    with open_ring(root, key_file(tmp_path)) as ring:
        blob = ring.encrypt(b'x', CTX, 'hank')
    wrong = key_file(tmp_path, MasterKey.generate(), name='wrong.key')
    with pytest.raises(KeyringError, match='wrong master key'):
        open_ring(root, wrong)
    with pytest.raises(KeyringError, match='no master key'):
        Keyring.open(root, EncryptionSettings(True, ''), {})
    with pytest.raises(KeyringError, match='both'):
        Keyring.open(root, EncryptionSettings(True, str(wrong)),
                     {MASTER_KEY_ENV: MasterKey.generate().encoded()})
    with pytest.raises(KeyringError, match='cannot open'):
        open_ring(root, tmp_path / 'absent.key')
    # the right key from the environment works as well as from the file
    right = read_key_file(tmp_path / 'master.key')[0]
    with Keyring.open(root, EncryptionSettings(True, ''), {MASTER_KEY_ENV: right.encoded()}) as r:
        assert r.decrypt(blob, CTX) == b'x'
    with pytest.raises(KeyringError, match='wrong master key'):
        Keyring.open(root, EncryptionSettings(True, ''),
                     {MASTER_KEY_ENV: MasterKey.generate().encoded()})


@pytest.mark.parametrize('mode', [0o640, 0o604, 0o620, 0o660])
def test_group_or_world_accessible_key_file_is_refused(tmp_path, mode):
    path = key_file(tmp_path)
    os.chmod(path, mode)
    with pytest.raises(KeyringError, match=f'mode {mode:04o} lets group or others'):
        open_ring(tmp_path / 'root', path)
    assert not (tmp_path / 'root' / 'keys' / KEYRING_FILE).exists()


def test_bad_key_files_are_refused_without_echoing_them(tmp_path):
    secret_looking = 'c2VjcmV0LXZhbHVlLXRoYXQtaXMtbm90LTMyLWJ5dGVz'
    for text, message in [(secret_looking, 'not a 256-bit key'), ('# only a comment\n', 'no '
                          'master key'), ('x' * 5000, 'larger than')]:
        path = tmp_path / 'bad.key'
        path.write_text(text)
        os.chmod(path, 0o600)
        with pytest.raises(KeyringError, match=message) as info:
            open_ring(tmp_path / 'root', path)
        assert secret_looking not in str(info.value)
    (tmp_path / 'dir.key').mkdir(mode=0o700)
    with pytest.raises(KeyringError, match='not a regular file'):
        open_ring(tmp_path / 'root', tmp_path / 'dir.key')
    with pytest.raises(KeyringError, match='refusing to overwrite'):
        write_key_file(tmp_path / 'bad.key', [MasterKey.generate()])


def test_settings_from_params():
    assert encryption_settings({}) == EncryptionSettings(False, '')
    assert encryption_settings({'storage.encryption.enabled': True,
                                 'storage.encryption.master_key_file': '/k'}) == \
        EncryptionSettings(True, '/k')
    with pytest.raises(KeyringError, match='true or false'):
        encryption_settings({'storage.encryption.enabled': 'yes'})


def test_rotation_keeps_everything_readable_and_retires_the_old_master(tmp_path):
    root = tmp_path / 'root'
    old = MasterKey.generate()
    path = key_file(tmp_path, old)
    with open_ring(root, path) as ring:
        blobs = {f's{i}': ring.encrypt(b'subject %d' % i, CTX, f's{i}') for i in range(7)}
        blobs['day'] = ring.encrypt(b'anonymous', CTX, None, T0)
        old_wrapped = list(wrapped_of(root).values())
    new = MasterKey.generate()
    # A rotation cut short after one batch: the new master is current, some keys are still
    # under the old one, and the old master still opens them.
    write_key_file(path, [new, old], replace=True)
    with open_ring(root, path) as ring:
        part = ring.rotate(new, batch=3, max_batches=1)
        assert (part['rewrapped'], part['done']) == (3, False)
        masters = {m for _k, m in sqlite3.connect(root / 'keys' / KEYRING_FILE).execute(
            'select key_id, master_id from data_keys')}
        assert masters == {old.id, new.id}
        assert all(ring.decrypt(b, CTX) for b in blobs.values())
        assert ring.encrypt(b'during', CTX, 'late') and ring.rotating() == [old.id]
    with pytest.raises(KeyringError, match='wrong master key'):
        open_ring(root, key_file(tmp_path, old, name='old-only.key'))
    with open_ring(root, key_file(tmp_path, new, name='new-only.key')) as ring:
        with pytest.raises(KeyringError, match=f'wrapped under master key {old.id}'):
            for blob in blobs.values():
                ring.decrypt(blob, CTX)
    # resumed: every key under the new master, the old one retired and gone from the disk
    with open_ring(root, path) as ring:
        done = ring.rotate()
        assert done['done'] and done['retired'] == [old.id] and done['checkpointed']
        assert done['rewrapped'] == 5     # 7 subjects + 1 day + 'late' - 3 done before - 'late'
    disk = disk_bytes(root)
    assert not any(w in disk for w in old_wrapped)
    with open_ring(root, key_file(tmp_path, new, name='new-only.key')) as ring:
        assert {n: ring.decrypt(b, CTX) for n, b in blobs.items()}['s6'] == b'subject 6'
        assert ring.master_id == new.id
    with pytest.raises(KeyringError, match='wrong master key'):
        open_ring(root, key_file(tmp_path, old, name='old-only.key'))


def test_a_running_process_follows_a_rotation_of_its_key_file(tmp_path):
    """No downtime: a process that started with the old key file keeps reading and writing
    while another rotates, by re-reading the file when it meets the new master."""
    root, old = tmp_path / 'root', MasterKey.generate()
    path = key_file(tmp_path, old)
    with open_ring(root, path) as running:
        before = running.encrypt(b'before', CTX, 'ivan')
        new = MasterKey.generate()
        write_key_file(path, [new, old], replace=True)
        with open_ring(root, path) as rotator:
            assert rotator.rotate(new)['done']
        write_key_file(path, [new], replace=True)
        assert running.decrypt(before, CTX) == b'before'     # cache dropped, rewrapped key read
        after = running.encrypt(b'after', CTX, 'judy')         # created under the new master
        assert running.master_id == new.id
    with open_ring(root, key_file(tmp_path, new, name='new.key')) as ring:
        assert ring.decrypt(after, CTX) == b'after'


def test_tampered_key_table_is_refused(tmp_path):
    root, path = tmp_path / 'root', key_file(tmp_path)
    with open_ring(root, path) as ring:
        one = ring.encrypt(b'one', CTX, 'kim')
        two = ring.encrypt(b'two', CTX, 'lee')
    conn = sqlite3.connect(root / 'keys' / KEYRING_FILE)
    rows = dict(conn.execute("select name, wrapped from data_keys where kind = 'subject'"))
    # swap the two wrapped keys: each is bound to its own id and name, so neither opens
    conn.execute("update data_keys set wrapped = ? where name = 'kim'", (rows['lee'],))
    conn.commit()
    conn.close()
    with open_ring(root, path) as ring:
        with pytest.raises(KeyringError, match='tampered'):
            ring.decrypt(one, CTX)
        assert ring.decrypt(two, CTX) == b'two'


def test_source_parses_several_keys_and_bounds_them():
    keys = [MasterKey.generate() for _ in range(5)]
    two = MasterKeySource.of('', {MASTER_KEY_ENV: f'{keys[0].encoded()},{keys[1].encoded()}'})
    assert [k.id for k in two.load()] == [keys[0].id, keys[1].id]
    with pytest.raises(KeyringError, match='more than 4'):
        MasterKeySource.of('', {MASTER_KEY_ENV: ','.join(k.encoded() for k in keys)}).load()
    assert keys[0].encoded() not in repr(keys[0])
