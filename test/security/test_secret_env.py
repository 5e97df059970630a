"""Secrets in the environment reach only the processes that use them (attack review finding 5),
and the master key file is read only if it is a regular file (finding 7b).

- Bring-up handed its whole environment to every node: with LOOM_STORAGE_MASTER_KEY and
  LOOM_S3_SECRET_KEY set, all 7 nodes (sim_sensors, camera_adapter, ...) had both. Now only the
  nodes that open storage with a keyring or the object store get them (the storage node, and the
  lifecycle manager, which starts and with composition hosts the agents).
- The keyring read LOOM_STORAGE_MASTER_KEY and left it in os.environ, for every plugin loaded
  later and every process started later to inherit. Now it is taken out at its first read (as the
  heartbeat key is) and every later keyring of the process still opens with it.
- A FIFO as the master key file blocked the open forever.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import WAIT_LIMIT_S
from loom_ros.bringup import nodes as table
from loom_ros.security import keyring as keyring_mod
from loom_ros.security.keyring import (MASTER_KEY_ENV, EncryptionSettings, Keyring, KeyringError,
                                       MasterKey, MasterKeySource, read_key_file, write_key_file)
from loom_ros.storage.backend import ACCESS_KEY_ENV, SECRET_KEY_ENV, ObjectSettings
from loom_ros.storage.consent import ConsentState
from loom_ros.storage.storage import Storage, StorageConfig

SECRETS = {MASTER_KEY_ENV: MasterKey.generate().encoded(), ACCESS_KEY_ENV: 'AKIAEXAMPLE',
           SECRET_KEY_ENV: 's3-secret-value'}


class GrantAll:
    @staticmethod
    def lookup(subject: str, purpose: str) -> ConsentState:
        return ConsentState(purpose, True, True, 'test')


@pytest.fixture
def env_key(monkeypatch):
    """A master key in this process's environment; what the keyring kept of it forgotten after."""
    key = MasterKey.generate()
    monkeypatch.setattr(keyring_mod, '_env_taken', None, raising=False)
    monkeypatch.setenv(MASTER_KEY_ENV, key.encoded())
    yield key
    keyring_mod._env_taken = None


# -- bring-up: who gets which secret ----------------------------------------------------------

def test_the_table_names_the_secrets_each_node_needs():
    assert set(table.SECRET_ENV) == {MASTER_KEY_ENV, ACCESS_KEY_ENV, SECRET_KEY_ENV}
    assert table.MASTER_KEY_ENV == MASTER_KEY_ENV
    needing = {n.name for n in table.NODES if n.secrets}
    assert needing == {'storage', table.MANAGER}
    for name in needing:
        assert set(table.by_name(name).secrets) == set(table.SECRET_ENV)


def test_nodes_without_storage_get_no_secret():
    base = {**os.environ, **SECRETS, 'LOOM_OTHER': 'kept'}
    for node in table.NODES:
        env = table.node_env(node, base)
        assert env['LOOM_OTHER'] == 'kept' and env['PATH'] == base['PATH']
        for name, value in SECRETS.items():
            if node.name in ('storage', table.MANAGER):
                assert env[name] == value, (node.name, name)
            else:
                assert name not in env, (node.name, name)
                assert value not in ''.join(env.values()), (node.name, name)


def test_side_processes_can_be_given_an_environment_without_secrets():
    base = {**os.environ, **SECRETS}
    assert not set(table.without_secrets(base)) & set(SECRETS)
    assert table.without_secrets(base, (MASTER_KEY_ENV,))[MASTER_KEY_ENV] == \
        SECRETS[MASTER_KEY_ENV]
    assert table.without_secrets(base)['PATH'] == base['PATH']


def test_launch_blanks_the_secrets_it_cannot_remove():
    """launch's additional_env adds and changes only: a node that must not have a secret gets it
    set to '', which the keyring and the object store read as unset."""
    base = {**os.environ, **SECRETS}
    for node in table.NODES:
        added = table.env_additions(node, base)
        effective = {**base, **added}
        for name, value in SECRETS.items():
            if node.secrets:
                assert effective[name] == value
            else:
                assert added[name] == '', (node.name, name)
        if not node.secrets:
            with pytest.raises(KeyringError, match='no master key'):
                MasterKeySource.of('', effective)
            settings = ObjectSettings.from_params({}, effective)
            assert settings.access_key == settings.secret_key == ''
    # nothing to blank when the secrets are not set
    plain = {k: v for k, v in os.environ.items() if k not in table.SECRET_ENV}
    for node in table.NODES:
        assert not set(table.env_additions(node, plain)) & set(table.SECRET_ENV)


def test_the_nodes_without_secrets_open_no_keyring_nor_object_store():
    """What the table says holds in the nodes' code: none of the modules of a node without
    secrets opens a keyring, a Storage or an object store (a node that starts to must be given
    its secrets in the table)."""
    markers = ('Keyring', 'StorageConfig(', 'node_objects', 'ObjectSettings', MASTER_KEY_ENV,
               SECRET_KEY_ENV)
    root = Path(table.__file__).resolve().parents[2]
    for node in table.NODES:
        if node.secrets:
            continue
        modules = {node.module, node.node_class.partition(':')[0]}
        for module in modules:
            source = (root / (module.replace('.', '/') + '.py')).read_text(encoding='utf-8')
            used = [m for m in markers if m in source]
            assert not used, (node.name, module, used)


# -- the keyring takes the key out of the environment -------------------------------------------

def test_the_key_leaves_the_environment_once_read_and_still_opens_every_keyring(tmp_path,
                                                                             env_key):
    first = Keyring.open(tmp_path / 'root', EncryptionSettings(True, ''), os.environ)
    try:
        assert MASTER_KEY_ENV not in os.environ
        assert first.master_id == env_key.id
        # a second keyring of the process (each agent of a host opens its own Storage)
        with Keyring.open(tmp_path / 'root', EncryptionSettings(True, ''), os.environ) as second:
            assert second.master_id == env_key.id
        assert keyring_mod.env_master_key_given()
        # a process started now does not inherit it
        child = subprocess.run(
            [sys.executable, '-c', f'import os; print(os.environ.get({MASTER_KEY_ENV!r}, "-"))'],
            capture_output=True, text=True, timeout=WAIT_LIMIT_S)
        assert child.stdout.strip() == '-'
    finally:
        first.close()


def test_storage_opened_with_the_process_environment_takes_the_key_out(tmp_path, env_key):
    config = StorageConfig(root=str(tmp_path / 'root'), unit='host',
                           encryption=EncryptionSettings(True, ''))
    with Storage(config, consent=GrantAll) as storage:
        assert storage.keyring.master_id == env_key.id
    assert MASTER_KEY_ENV not in os.environ
    with Storage(config, consent=GrantAll) as again:   # the node reconfigured: still opens
        assert again.keyring.master_id == env_key.id


def test_a_key_set_again_replaces_the_one_kept(tmp_path, env_key, monkeypatch):
    assert keyring_mod.env_master_key(os.environ) == env_key.encoded()
    newer = MasterKey.generate()
    monkeypatch.setenv(MASTER_KEY_ENV, newer.encoded())
    assert keyring_mod.env_master_key(os.environ) == newer.encoded()
    assert MASTER_KEY_ENV not in os.environ


def test_a_mapping_given_is_read_not_changed(env_key):
    given = {MASTER_KEY_ENV: 'x'}
    assert keyring_mod.env_master_key(given) == 'x' and given == {MASTER_KEY_ENV: 'x'}
    assert os.environ[MASTER_KEY_ENV] == env_key.encoded()   # os.environ not read


# -- the master key file ------------------------------------------------------------------------

def read_in_child(path: Path) -> subprocess.CompletedProcess:
    """read_key_file in a process of its own: a hang is a timeout here, not a stuck test."""
    code = ('import sys\nfrom loom_ros.security.keyring import read_key_file, KeyringError\n'
            'try:\n    read_key_file(sys.argv[1])\nexcept KeyringError as exc:\n'
            '    print(exc); sys.exit(3)\nprint("read")\n')
    try:
        return subprocess.run([sys.executable, '-c', code, str(path)], capture_output=True,
                              text=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f'reading {path} hung')


def test_a_fifo_as_the_master_key_file_is_refused_at_once(tmp_path):
    fifo = tmp_path / 'master.key'
    os.mkfifo(fifo, 0o600)
    done = read_in_child(fifo)
    assert done.returncode == 3 and 'not a regular file' in done.stdout, done


def test_other_files_that_are_not_regular_are_refused(tmp_path):
    folder = tmp_path / 'folder.key'
    folder.mkdir(mode=0o700)
    for path in (folder, Path('/dev/null')):
        with pytest.raises(KeyringError, match='not a regular file'):
            read_key_file(path)


def test_a_regular_key_file_and_a_link_to_one_still_read(tmp_path):
    key = MasterKey.generate()
    path = tmp_path / 'master.key'
    write_key_file(path, [key])
    link = tmp_path / 'mounted.key'     # secret mounts are links to the file
    link.symlink_to(path)
    assert [k.id for k in read_key_file(path)] == [k.id for k in read_key_file(link)] == [key.id]
    os.chmod(path, 0o644)
    with pytest.raises(KeyringError, match='chmod 600'):
        read_key_file(link)   # the target is what is checked
