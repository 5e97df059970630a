"""What Loom keeps is this user's alone, whatever the umask (attack review finding 4): under umask
022 the storage root was 755 and db/agents.db, consent.db and audit.db 644, so another local user
read a subject's consent rows with `strings`. Now the root and the folders made for databases are
0700, every database (with its -wal and -shm) is 0600, and an existing root or database open to
group or others is tightened when this user owns it, refused when another user does (a reader
leaves it as it is). Real SQLite, real files, a real `loom consent` process."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from harness import WAIT_LIMIT_S, MsClock
from loom_ros.bus.event import Event
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY
from loom_ros.security.audit import AuditLog
from loom_ros.security.keyring import EncryptionSettings, Keyring, MasterKey, write_key_file
from loom_ros.storage import sqlite as sqlite_mod
from loom_ros.storage.consent import ConsentRegistry, ConsentState, SubjectRefs, consent_path
from loom_ros.storage.direct import DirectDatabase
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.service import Settings, StorageService
from loom_ros.storage.sqlite import open_database
from loom_ros.storage.storage import Storage, StorageConfig


class GrantAll:
    @staticmethod
    def lookup(subject: str, purpose: str) -> ConsentState:
        return ConsentState(purpose, True, True, 'test')


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    """The usual umask (the test process may run under a stricter one, which hid the bug)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def event(text: str, i: int = 0) -> Event:
    return Event(type='speech.utterance', source='mic', id=f'e-{uuid.uuid4().hex[:8]}',
                 timestamp_ms=1_700_000_000_000 + i, payload=json.dumps({'text': text}).encode(),
                 metadata={SUBJECT_METADATA_KEY: 'alice.smith@example.com'})


def open_storage(root: Path, unit: str = 'agents', **kw) -> Storage:
    return Storage(StorageConfig(root=str(root), unit=unit, **kw), clock=MsClock(), env={},
                   consent=GrantAll)


def private_files(root: Path) -> dict[str, str]:
    """Every file and folder under `root` that group or others may use, with its mode."""
    found = {}
    for path in [root, *root.rglob('*')]:
        if path.is_symlink():
            continue
        if mode(path) & 0o077:
            found[str(path.relative_to(root))] = f'{mode(path):04o}'
    return found


def test_a_new_store_is_this_users_alone_under_umask_022(tmp_path, umask_022):
    root = tmp_path / 'fresh' / '.loom'
    with open_storage(root) as storage:
        storage.episodes.record('a', event('hello')).wait(WAIT_LIMIT_S)
        storage.flush()
        layout = StorageLayout.at(root)
        db = layout.database('agents')
        assert mode(root) == 0o700 and mode(db.parent) == 0o700
        assert mode(db) == 0o600
        for suffix in ('-wal', '-shm'):
            assert Path(f'{db}{suffix}').exists() and mode(f'{db}{suffix}') == 0o600, suffix
        assert private_files(root) == {}
    # the folders above the root that it had to make are nobody else's either
    assert mode(tmp_path / 'fresh') == 0o700


def test_every_shared_database_is_made_0600(tmp_path, umask_022):
    """consent.db, audit.db, a DirectDatabase and a bare open_database, each the first thing made
    under a new root: the root they make is 0700, the files (and their -wal, -shm) 0600."""
    root = tmp_path / 'root'
    audit = AuditLog(root / 'audit.db')
    audit.append('cli', 'consent_change', note='x')
    registry = ConsentRegistry(consent_path(root), audit=audit, refs=SubjectRefs.at(root / 'keys'))
    registry.grant('alice.smith@example.com', 'cloud', 'test')
    direct = DirectDatabase(root / 'router.db', ['create table if not exists t (x)'])
    direct.write('insert into t values (1)')
    conn = open_database(root / 'db' / 'bare.db')
    conn.execute('create table t (x)')
    try:
        assert mode(root) == 0o700 and mode(root / 'db') == 0o700
        for name in ('audit.db', 'consent.db', 'router.db', 'db/bare.db'):
            assert mode(root / name) == 0o600, name
        assert private_files(root) == {}
    finally:
        conn.close()
        direct.close()
        registry.close()
        audit.close()


def test_loom_consent_under_umask_022_leaves_nothing_readable(tmp_path):
    """The reviewer's reproduction: `loom consent grant` on a new root, then an agent's database
    and a key table, all from a shell with umask 022."""
    root = tmp_path / '.loom4'
    key = tmp_path / 'master.key'
    write_key_file(key, [MasterKey.generate()])
    script = (
        'from loom_ros.security.keyring import Keyring, EncryptionSettings\n'
        'from loom_ros.storage.sqlite import open_database\n'
        'from loom_ros.storage.layout import StorageLayout\n'
        f'k = Keyring.open({str(root)!r}, EncryptionSettings(True, {str(key)!r}), {{}})\n'
        "k.subject_key('alice.smith@example.com'); k.close()\n"
        f"c = open_database(StorageLayout.at({str(root)!r}).database('agents'))\n"
        "c.execute('create table t (x)'); c.close()\n")
    done = subprocess.run(
        ['sh', '-c', 'umask 022 && "$0" -m loom_ros.cli.consent grant alice.smith@example.com '
                     'cloud --root "$1" && "$0" -c "$2"', sys.executable, str(root), script],
        capture_output=True, text=True, timeout=WAIT_LIMIT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (root / 'consent.db').is_file() and (root / 'db' / 'agents.db').is_file()
    assert private_files(root) == {}, private_files(root)


def make_open_store(root: Path) -> dict[str, str]:
    """A store as the old code left it under umask 022: root and db/ 755, databases and their
    WAL 644. Returns the text written, to read back."""
    with open_storage(root) as storage:
        storage.episodes.record('a', event('kept before')).wait(WAIT_LIMIT_S)
    AuditLog(root / 'audit.db').close()
    os.chmod(root, 0o755)
    os.chmod(root / 'db', 0o755)
    for path in [*root.glob('*.db*'), *(root / 'db').glob('*.db*')]:
        os.chmod(path, 0o644)
    stale_wal = root / 'db' / 'agents.db-wal'
    stale_wal.write_bytes(b'')          # a WAL the old code left behind, open to everyone
    os.chmod(stale_wal, 0o644)
    return {'text': 'kept before'}


def test_an_existing_open_store_is_tightened_and_still_opens(tmp_path):
    root = tmp_path / 'root'
    make_open_store(root)
    with open_storage(root) as storage:
        rows = storage.query('select payload from episodes')
        assert any('kept before' in r['payload'] for r in rows)
        storage.episodes.record('a', event('kept after', 1)).wait(WAIT_LIMIT_S)
        assert mode(root) == 0o700 and mode(root / 'db') == 0o700
        assert mode(root / 'db' / 'agents.db') == 0o600
        assert mode(root / 'db' / 'agents.db-wal') == 0o600
    AuditLog(root / 'audit.db').close()   # a shared database: tightened by its next writer
    assert private_files(root) == {}, private_files(root)


def test_the_storage_service_tightens_a_root_and_its_units(tmp_path):
    root = tmp_path / 'root'
    make_open_store(root)
    service = StorageService(Settings(StorageLayout.at(root), embedder='hash'),
                             consent=GrantAll, env={})
    try:
        assert service.units() == ['agents']
        assert mode(root) == 0o700 and mode(root / 'db' / 'agents.db') == 0o600
    finally:
        service.close()


def test_what_another_user_owns_is_refused_not_changed(tmp_path, monkeypatch):
    """A root or database open to group or others that this user does not own cannot be
    tightened: a writer refuses it with what to do; a reader leaves it as it is and reads."""
    root = tmp_path / 'root'
    make_open_store(root)
    real = os.geteuid()
    monkeypatch.setattr(sqlite_mod.os, 'geteuid', lambda: real + 1000)   # someone else now
    with pytest.raises(StorageError, match=r'storage.root .*0755 lets group or others at the '
                                           r'storage root; owned by uid'):
        open_storage(root)
    assert mode(root) == 0o755
    reader = StorageService(Settings(StorageLayout.at(root), embedder='hash'), read_only=True,
                            consent=GrantAll, env={})
    reader.close()
    assert mode(root) == 0o755
    # the root put right by its owner, the database still open to others: refused by name
    os.chmod(root, 0o700)
    os.chmod(root / 'db', 0o700)
    with pytest.raises(StorageError, match=r'agents.db: mode 0644 lets group or others at this '
                                           r'database; owned by uid'):
        open_storage(root)
    assert mode(root / 'db' / 'agents.db') == 0o644


def test_a_shared_sticky_folder_is_never_made_private(tmp_path):
    """storage.root pointing at a folder like /tmp: it is not chmod-ed (that would break every
    other user of it), the storage refuses it."""
    shared = tmp_path / 'shared'
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(StorageError, match='sticky'):
        open_storage(shared)
    assert mode(shared) == 0o1777


def test_databases_opened_from_threads_are_all_0600(tmp_path, umask_022):
    """No umask change (process-wide): databases made on several threads at once, while another
    thread makes plain files, are each 0600, and the plain files keep the process umask."""
    root = tmp_path / 'root'
    errors, plain = [], []

    def make_db(i):
        try:
            open_database(root / 'db' / f'u{i}.db').close()
        except Exception as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    def make_plain():
        for i in range(50):
            path = tmp_path / f'plain{i}'
            path.write_bytes(b'x')
            plain.append(mode(path))

    threads = [threading.Thread(target=make_db, args=(i,)) for i in range(16)]
    threads.append(threading.Thread(target=make_plain))
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_LIMIT_S)
    assert not errors, errors
    assert {mode(p) for p in (root / 'db').glob('*.db')} == {0o600}
    assert set(plain) == {0o644}


def test_the_key_table_stays_0600(tmp_path, umask_022):
    key = tmp_path / 'master.key'
    write_key_file(key, [MasterKey.generate()])
    with Keyring.open(tmp_path / 'root', EncryptionSettings(True, str(key)), {}) as keyring:
        keyring.subject_key('alice.smith@example.com')
    assert mode(tmp_path / 'root' / 'keys') == 0o700
    assert mode(tmp_path / 'root' / 'keys' / 'datakeys.db') == 0o600
    assert private_files(tmp_path / 'root') == {}


def test_a_file_system_without_modes_is_warned_about_and_used(tmp_path, monkeypatch, caplog):
    """chmod refused (vfat, some network shares) on this user's own store: it still opens, with
    a warning naming the path (an existing store must keep opening)."""
    root = tmp_path / 'root'
    make_open_store(root)

    def refuse(path, mode):
        raise PermissionError(1, 'Operation not permitted')

    monkeypatch.setattr(sqlite_mod.os, 'chmod', refuse)
    with caplog.at_level('WARNING', logger='loom.storage'):
        with open_storage(root) as storage:
            assert storage.query('select count(*) as n from episodes')[0]['n'] == 1
    assert mode(root) == 0o755
    assert f'{root}: mode 0755 lets group or others at the storage root' in caplog.text
