"""Two robots (two storage roots) on one S3 bucket never delete each other's archives: the
lifecycle's recovery deletes every archive object its database does not know, so a store
opened from config claims its bucket folder with an owner marker and a second root on the same
folder (the default empty prefix on two robots, or a copied prefix) is refused before it lists
or deletes anything. Against moto's live S3 server (test_s3_backend.S3Server), through the
stores config opens (backend.ObjectSettings.open) and the real lifecycle."""
from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys

import pytest
from harness import T0_MS, WAIT_LIMIT_S
from test_s3_backend import (Clock, archive_lifecycle, done_keys, objects_on_server,  # noqa: F401
                             s3, write_events)

from loom_ros.storage.backend import ObjectSettings
from loom_ros.storage.backend.s3 import (MAX_MARKER_BYTES, OWNER_ID_FILE, OWNER_MARKER,
                                         FolderClaimedError, root_owner_id)
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import StorageLayout

T0 = T0_MS
ARCHIVE_AT = T0 + 60_000 + 600_000 + 10_000       # warm -> cold -> archive (archive_lifecycle)


def configured(server, root, bucket: str, prefix: str = ''):
    """The object store `root` opens as config/loom.yaml configures it."""
    return ObjectSettings(server.endpoint, bucket, prefix, False, server.access_key,
                          server.secret_key).open(StorageLayout.at(root).objects)


def marker_name(prefix: str) -> str:
    return f'{prefix}/{OWNER_MARKER}' if prefix else OWNER_MARKER


def everything(server, bucket: str) -> dict[str, bytes]:
    """Every object in the bucket, owner markers included."""
    return objects_on_server(server, bucket, markers=True)


def archived_robot(server, root, bucket: str, prefix: str, clock) -> list[str]:
    """A robot whose unit `host` archived a few events into the bucket folder; its keys."""
    write_events(root, clock, [('chat', f'{root.name} canary {i}', '') for i in range(4)])
    lc = archive_lifecycle(root, configured(server, root, bucket, prefix), clock)
    try:
        clock.ms = ARCHIVE_AT
        assert lc.run_once().archived >= 1
        return done_keys(lc)
    finally:
        lc.close()


@pytest.mark.parametrize('prefix', ['', 'fleet/shared'], ids=['bucket-root', 'copied-prefix'])
def test_a_second_root_on_the_same_folder_is_refused_and_the_first_keeps_its_archives(
        s3, tmp_path, prefix):
    bucket = s3.new_bucket()
    clock = Clock()
    robot1, robot2 = tmp_path / 'robot1', tmp_path / 'robot2'
    keys = archived_robot(s3, robot1, bucket, prefix, clock)
    archive = objects_on_server(s3, bucket)
    assert sorted(archive) == [f'{prefix}/{k}' if prefix else k for k in keys]
    owner = root_owner_id(robot1 / OWNER_ID_FILE)
    # robot 2, same unit name, same bucket and prefix: its recovery at open would have deleted
    # robot 1's whole archive (no row of its own knows them)
    write_events(robot2, clock, [('chat', 'robot2 canary', '')])
    refused = ''
    try:
        archive_lifecycle(robot2, configured(s3, robot2, bucket, prefix), clock).close()
    except FolderClaimedError as exc:
        refused = str(exc)
    assert objects_on_server(s3, bucket) == archive          # none of robot 1's deleted
    folder = f's3://{bucket}/{prefix}/' if prefix else f's3://{bucket}/ (the bucket root)'
    assert re.search(
        f'{re.escape(folder)}: another storage root uses this bucket folder \\(owner '
        f'{owner[:12]}, .*root {re.escape(repr(str(robot1)))}.*give each robot its own '
        'storage.objects.prefix', refused), refused
    before = everything(s3, bucket)
    assert json.loads(before[marker_name(prefix)])['owner'] == owner
    store2 = configured(s3, robot2, bucket, prefix)
    for call in (lambda: store2.put('blobs/x', b'x'), lambda: store2.delete(keys[0]),
                 lambda: store2.get(keys[0]), lambda: store2.list()):
        with pytest.raises(FolderClaimedError, match='another storage root'):
            call()
    assert everything(s3, bucket) == before
    # robot 1 itself, reopened (another process of its root): its archive whole and readable
    lc = archive_lifecycle(robot1, configured(s3, robot1, bucket, prefix), clock)
    try:
        assert done_keys(lc) == keys
        assert sum(r['count'] for k in keys for r in lc.read_archive(k)) == 4
    finally:
        lc.close()
    assert everything(s3, bucket) == before


def test_two_prefixes_in_one_bucket_both_work_and_recovery_of_one_never_touches_the_other(
        s3, tmp_path):
    bucket = s3.new_bucket()
    clock = Clock()
    robot1, robot2 = tmp_path / 'robot1', tmp_path / 'robot2'
    keys1 = archived_robot(s3, robot1, bucket, 'fleet/robot1', clock)
    clock.ms = T0
    keys2 = archived_robot(s3, robot2, bucket, 'fleet/robot2', clock)
    assert keys1 and keys2
    store1 = configured(s3, robot1, bucket, 'fleet/robot1')
    store2 = configured(s3, robot2, bucket, 'fleet/robot2')
    # a stray archive object in robot 1's folder (a crash between a delete's commit and the
    # object's): robot 1's recovery removes it, robot 2's objects stay
    store1.put('archive/host/cold/0000000000000-stray.jsonl.gz', b'stray')
    before2 = {k: v for k, v in everything(s3, bucket).items() if k.startswith('fleet/robot2/')}
    for root, store, keys in ((robot1, store1, keys1), (robot2, store2, keys2)):
        lc = archive_lifecycle(root, store, clock)          # recovery: list, delete unknown
        try:
            assert done_keys(lc) == keys
        finally:
            lc.close()
    assert [k for k, _ in store1.list()] == keys1 and [k for k, _ in store2.list()] == keys2
    on_server = everything(s3, bucket)
    assert {k: v for k, v in on_server.items() if k.startswith('fleet/robot2/')} == before2
    assert sorted(on_server) == sorted(
        [f'fleet/robot1/{OWNER_MARKER}', f'fleet/robot2/{OWNER_MARKER}']
        + [f'fleet/robot1/{k}' for k in keys1] + [f'fleet/robot2/{k}' for k in keys2])


def test_a_folder_inside_another_roots_folder_is_refused_or_left_out(s3, tmp_path):
    """Prefixes may nest: a root inside a claimed folder is refused at once; a folder claimed
    inside ours before we claimed ours is never listed (so never deleted) by us."""
    bucket = s3.new_bucket()
    outer, inner, late = tmp_path / 'outer', tmp_path / 'inner', tmp_path / 'late'
    configured(s3, outer, bucket, 'fleet').put('blobs/outer.bin', b'o')
    with pytest.raises(FolderClaimedError, match=(
            f's3://{bucket}/fleet/robot2/ is inside s3://{bucket}/fleet/: another storage root '
            'uses this bucket folder')):
        configured(s3, inner, bucket, 'fleet/robot2').put('blobs/inner.bin', b'i')
    # the other way round: robot 2 claimed fleet2/robot2 first, then a root takes fleet2
    configured(s3, inner, bucket, 'fleet2/robot2').put('archive/host/cold/1-a.jsonl.gz', b'a')
    wide = configured(s3, late, bucket, 'fleet2')
    wide.put('archive/host/cold/2-b.jsonl.gz', b'b')
    assert wide.list() == [('archive/host/cold/2-b.jsonl.gz', 1)]
    assert wide.list('robot2') == [] and wide.list('robot2/archive/host') == []
    assert wide.rejected['claimed'] >= 2
    for key, _ in wide.list():                 # a recovery that knows none of them
        wide.delete(key)
    assert sorted(everything(s3, bucket)) == [
        f'fleet/{OWNER_MARKER}', 'fleet/blobs/outer.bin', f'fleet2/{OWNER_MARKER}',
        f'fleet2/robot2/{OWNER_MARKER}', 'fleet2/robot2/archive/host/cold/1-a.jsonl.gz']


def test_the_marker_survives_list_and_delete_and_is_never_an_object(s3, tmp_path):
    bucket = s3.new_bucket()
    root = tmp_path / 'robot1'
    store = configured(s3, root, bucket)
    store.put('blobs/a.bin', b'a')
    store.put('archive/host/cold/1-a.jsonl.gz', b'z')
    marker = everything(s3, bucket)[OWNER_MARKER]
    # a second process of the same root (an agent host beside the storage node): the same id
    assert configured(s3, root, bucket).list() == store.list()
    assert [k for k, _ in store.list()] == ['archive/host/cold/1-a.jsonl.gz', 'blobs/a.bin']
    assert not store.rejected                  # the marker is no stray name either
    # no object key at a folder's top (a leading dot), refused by name deeper down
    for key, match in ((OWNER_MARKER, 'object key .*use letters'),
                       (f'blobs/{OWNER_MARKER}', 'owner marker, never an object; refused'),
                       (f'archive/host/{OWNER_MARKER}', 'owner marker, never an object')):
        for call in (lambda: store.delete(key), lambda: store.put(key, b'{}'),
                     lambda: store.get(key), lambda: store.exists(key)):
            with pytest.raises(StorageError, match=match):
                call()
    for key, _ in store.list():                # everything a recovery could delete
        store.delete(key)
    assert store.list() == [] and everything(s3, bucket) == {OWNER_MARKER: marker}
    # the id file: 32 hex digits, 0600, in the root
    info = os.stat(root / OWNER_ID_FILE)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert json.loads(marker)['owner'] == (root / OWNER_ID_FILE).read_text().strip()


def test_a_marker_replaced_under_a_claimed_store_stops_its_next_listing(s3, tmp_path):
    """Two roots claiming one empty folder at the same moment on a store without conditional
    writes: the loser's marker is replaced; its next listing (what a recovery deletes from)
    says so instead of listing the winner's objects."""
    bucket = s3.new_bucket()
    store = configured(s3, tmp_path / 'robot1', bucket, 'fleet/r1')
    store.put('archive/host/cold/1-a.jsonl.gz', b'a')
    other = tmp_path / 'robot2'
    forged = json.dumps({'kind': 'loom object store owner',
                         'owner': root_owner_id(other / OWNER_ID_FILE),
                         'host': 'robot2\x1b[31m', 'root': str(other)}).encode()
    s3.raw().put_object(bucket, f'fleet/r1/{OWNER_MARKER}', io.BytesIO(forged), len(forged))
    with pytest.raises(FolderClaimedError, match=r"host 'robot2\\x1b\[31m'"):
        store.list()
    assert 'fleet/r1/archive/host/cold/1-a.jsonl.gz' in everything(s3, bucket)


@pytest.mark.parametrize('content, why', [
    (b'{not json', 'not JSON'),
    (b'\xff\xfe', 'not JSON'),
    (b'["loom object store owner"]', 'not a {"kind"'),
    (json.dumps({'kind': 'loom object store owner', 'owner': 'A' * 32}).encode(),
     'not a {"kind"'),
    (json.dumps({'kind': 'something else', 'owner': '0' * 32}).encode(), 'not a {"kind"'),
    (b' ' * (MAX_MARKER_BYTES + 1), f'longer than {MAX_MARKER_BYTES} bytes'),
    (b'{' * (8 * 1024 * 1024), f'longer than {MAX_MARKER_BYTES} bytes'),
], ids=['bad-json', 'not-utf8', 'not-an-object', 'bad-owner', 'other-kind', 'one-byte-over',
        'huge'])
def test_a_forged_marker_is_a_clear_error_and_nothing_is_done_there(s3, tmp_path, content, why):
    bucket = s3.new_bucket()
    raw = s3.raw()
    raw.put_object(bucket, f'fleet/r1/{OWNER_MARKER}', io.BytesIO(content), len(content))
    raw.put_object(bucket, 'fleet/r1/archive/host/cold/1-a.jsonl.gz', io.BytesIO(b'a'), 1)
    before = everything(s3, bucket)
    store = configured(s3, tmp_path / 'robot1', bucket, 'fleet/r1')
    for call in (lambda: store.list('archive/host'), lambda: store.put('blobs/x', b'x'),
                 lambda: store.delete('archive/host/cold/1-a.jsonl.gz')):
        with pytest.raises(FolderClaimedError, match=(
                f's3://{bucket}/fleet/r1/{OWNER_MARKER}: not a Loom owner marker '
                f'\\({re.escape(why)}.*remove the marker')):
            call()
    assert everything(s3, bucket) == before
    # a forged marker in a folder above ours refuses us the same way
    other = configured(s3, tmp_path / 'robot2', bucket, 'fleet/r1/deeper')
    with pytest.raises(FolderClaimedError, match='not a Loom owner marker'):
        other.put('blobs/x', b'x')


def test_the_owner_id_is_made_once_even_by_racing_processes(tmp_path):
    """Every process of a root (the storage node, agent hosts, `loom forget`) claims with the
    same id: made once, by whichever process wins; none reads a part of it."""
    path = tmp_path / 'root' / OWNER_ID_FILE
    code = ('import sys; from loom_ros.storage.backend.s3 import root_owner_id; '
            'print(root_owner_id(sys.argv[1]))')
    children = [subprocess.Popen([sys.executable, '-c', code, str(path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [child.communicate(timeout=WAIT_LIMIT_S) for child in children]
    assert all(child.returncode == 0 for child in children), results
    ids = {out.strip() for out, _ in results}
    assert len(ids) == 1 and ids == {path.read_text().strip()}
    assert sorted(p.name for p in path.parent.iterdir()) == [OWNER_ID_FILE]   # no leftovers
    path.write_text('not an id\n')
    with pytest.raises(StorageError, match='not an object store owner id'):
        root_owner_id(path)
    path.write_bytes(b'0' * 4096)
    with pytest.raises(StorageError, match='cannot read or create the object store owner id'):
        root_owner_id(path)
