"""Blobs (storage/blobs.py) behind the configured object store: the local folder under the root
by default, a live S3 server (moto's, test_s3_backend.S3Server) when storage.objects says so,
configured from parameters the way every node is (layout.node_objects, service settings).
Consent, bounds and integrity; `forget` and `export` reach a subject's blobs and their index
rows on either backend (a subject id with ':' and '@', valid ids, included)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
import zipfile

import pytest
from harness import REPO, WAIT_LIMIT_S, MsClock, loom_cli

from loom_ros.storage.backend import ObjectSettings
from loom_ros.storage.backend.encrypted import EncryptedObjectStore
from loom_ros.storage.blobs import BlobStore, fetch_recording, store_recording
from loom_ros.security.audit import AuditLog
from loom_ros.storage.consent import ConsentRegistry, SubjectRefs, consent_path
from loom_ros.storage.erasure import export, forget
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.service import default_params, object_backend, settings_from_params
from loom_ros.storage.storage import Storage, StorageConfig
from test_erasure import Subject, hits, plant
from test_s3_backend import objects_on_server, s3  # noqa: F401  (the live S3 server fixture)

ALICE, BOB, CAROL = 'user:alice@ward4', 'bob+1', 'carol'   # carol never gave store consent


def consenting(root) -> None:
    layout = StorageLayout.at(root)
    audit = AuditLog(layout.audit)
    registry = ConsentRegistry(consent_path(root), audit=audit, refs=SubjectRefs.at(layout.keys))
    for subject in (ALICE, BOB):
        registry.grant(subject, 'store', 'cli:test')
    registry.close()
    audit.close()


def wav(tag: str) -> bytes:
    return b'RIFF' + f'CANARY{tag}{uuid.uuid4().hex}'.encode() + b'\x00\xff' * 100


def rows(storage: Storage) -> dict:
    return {r['key']: r['bytes'] for r in storage.query('select key, bytes from blobs')}


def test_blobs_in_the_local_folder_with_consent_bounds_and_integrity(tmp_path):
    root = tmp_path / 'root'
    consenting(root)
    with Storage(StorageConfig(root=str(root), unit='host'), clock=MsClock()) as storage:
        blobs = storage.blobs
        assert isinstance(blobs, BlobStore) and storage.objects.name == 'local'
        data = {s: wav(s) for s in (ALICE, BOB, CAROL, '')}
        mine = blobs.put('answers', 'a1.wav', data[ALICE], subject=ALICE, content_type='audio/wav')
        assert mine.key == f'subjects/{ALICE}/answers/a1.wav' and mine.bytes == len(data[ALICE])
        anon = blobs.put('frames', 'f1.raw', data[''])
        assert anon.key == 'blobs/frames/f1.raw'
        assert blobs.put('answers', 'c1.wav', data[CAROL], subject=CAROL) is None   # counted
        assert blobs.withheld == 1 and storage.withheld == 1
        assert (root / 'objects' / mine.key).read_bytes() == data[ALICE]
        assert data[CAROL] not in b''.join(p.read_bytes() for p in root.rglob('*')
                                           if p.is_file())
        assert blobs.get(mine.key) == data[ALICE] and blobs.get(anon.key) == data['']
        assert [r.key for r in blobs.list(subject=ALICE)] == [mine.key]
        assert [r.key for r in blobs.list()] == [anon.key]
        assert blobs.ref(mine.key).content_type == 'audio/wav'

        # hostile input: refused before anything is written, each counted
        small = BlobStore(storage, max_bytes=1000)
        refusals = [(('answers', '../up.wav', b'x'), {}, 'blob name'),
                    (('a/b', 'x.wav', b'x'), {}, 'blob kind'),
                    (('answers', 'x.wav', b'x'), {'subject': '../etc'}, 'data subject'),
                    (('answers', 'x.wav', b'x' * 1001), {}, 'more than 1000'),
                    (('answers', 'x.wav', b'x'), {'content_type': 'text/html; x=<script>'},
                     'content type'),
                    (('answers', 'x.wav', 'text'), {}, 'must be bytes')]
        for args, kw, match in refusals:
            with pytest.raises(StorageError, match=match):
                small.put(*args, **kw)
        assert sum(small.rejected.values()) == len(refusals)
        # listing: a bad kind, subject or limit is a counted StorageError; the limit is capped
        for kw, match in (({'kind': '../x'}, 'blob kind'), ({'subject': '../etc'}, 'subject'),
                          ({'limit': 'many'}, 'not a number')):
            with pytest.raises(StorageError, match=match):
                small.list(**kw)
        assert sum(small.rejected.values()) == len(refusals) + 3
        assert len(blobs.list(subject=ALICE, limit=10**12)) == 1
        for bad in ('archive/host/x', '../x', f'subjects/{ALICE}/answers/none.wav'):
            with pytest.raises(StorageError):
                blobs.get(bad)

        # an object cut short (or replaced) behind the store's back is refused, not returned
        (root / 'objects' / anon.key).write_bytes(data[''][:10])
        with pytest.raises(StorageError, match='10 bytes in the object store'):
            blobs.get(anon.key)
        blobs.delete(anon.key)
        assert blobs.list() == [] and not (root / 'objects' / anon.key).exists()

    receipt = forget(StorageLayout.at(root), ALICE, requested_by='dpo:test')
    assert receipt.counts['blobs'] == 1 and not (root / 'objects' / mine.key).exists()
    with Storage(StorageConfig(root=str(root), unit='host')) as storage:
        assert storage.blobs.list(subject=ALICE) == []


def s3_params(root, server, bucket: str) -> dict:
    params = default_params()
    params.update({'storage.root': str(root), 'storage.embedder': 'hash',
                   'storage.objects.endpoint': server.endpoint, 'storage.objects.bucket': bucket,
                   'storage.objects.prefix': 'fleet/robot1', 'storage.objects.secure': False})
    return params


def test_blobs_follow_storage_objects_to_s3_and_forget_and_export_reach_them(s3, tmp_path):
    bucket = s3.new_bucket()
    root = tmp_path / 'root'
    consenting(root)
    params = s3_params(root, s3, bucket)
    env = {'LOOM_S3_ACCESS_KEY': s3.access_key, 'LOOM_S3_SECRET_KEY': s3.secret_key}
    objects = ObjectSettings.from_params(params, env)
    assert objects == settings_from_params(params, env).objects   # one reading for every process
    data = {s: wav(s) for s in (ALICE, BOB)}
    with Storage(StorageConfig(root=str(root), unit='host', objects=objects)) as storage:
        assert storage.objects.name == 's3'
        keys = {s: storage.blobs.put('answers', f'{i}.wav', data[s], subject=s,
                                     content_type='audio/wav').key
                for i, s in enumerate((ALICE, BOB))}
        anon = storage.blobs.put('frames', 'f.raw', b'anonymous frame').key
        on_server = objects_on_server(s3, bucket)
        assert on_server == {f'fleet/robot1/{keys[ALICE]}': data[ALICE],
                             f'fleet/robot1/{keys[BOB]}': data[BOB],
                             f'fleet/robot1/{anon}': b'anonymous frame'}
        assert not (root / 'objects').exists()   # nothing went to the local folder
        assert storage.blobs.get(keys[BOB]) == data[BOB]

    layout = StorageLayout.at(root)
    backend = object_backend(settings_from_params(params, env))   # as the node and CLI get it
    out = tmp_path / 'alice.zip'
    counts = export(layout, ALICE, out, objects=backend)
    assert counts['media'] == 1
    with zipfile.ZipFile(out) as archive:
        assert archive.read('media/answers/0.wav') == data[ALICE]
        assert data[BOB] not in b''.join(archive.read(n) for n in archive.namelist())
    receipt = forget(layout, ALICE, requested_by='dpo:test', objects=backend)
    assert receipt.counts['blobs'] == 1 and receipt.files >= 1, json.dumps(receipt.as_dict())
    assert sorted(objects_on_server(s3, bucket)) == [f'fleet/robot1/{anon}',
                                                      f'fleet/robot1/{keys[BOB]}']
    with Storage(StorageConfig(root=str(root), unit='host', objects=objects)) as storage:
        assert set(rows(storage)) == {anon, keys[BOB]}
        assert storage.blobs.get(keys[BOB]) == data[BOB]


def test_every_node_declares_the_object_store_and_reads_it_the_same_way(ros):
    import rclpy
    from rclpy.node import Node

    from loom_ros.storage.layout import OBJECT_PARAMETERS, node_layout, node_objects
    node = Node('blob_probe', context=ros.node.context, parameter_overrides=[
        rclpy.parameter.Parameter('storage.objects.endpoint', value='s3.example:9000'),
        rclpy.parameter.Parameter('storage.objects.bucket', value='robots')])
    try:
        node_layout(node, 'agent')
        assert all(node.has_parameter(spec.name) for spec in OBJECT_PARAMETERS)
        found = node_objects(node, {'LOOM_S3_ACCESS_KEY': 'ak', 'LOOM_S3_SECRET_KEY': 'sk'})
        assert found == ObjectSettings('s3.example:9000', 'robots', '', True, 'ak', 'sk')
        assert 'sk' not in repr(found)   # keys never in logs
        assert node.describe_parameter('storage.objects.endpoint').read_only
    finally:
        node.destroy_node()


def recorded(data: bytes) -> bytes:
    """Every message of an MCAP's bytes, joined (what a scan for canaries reads)."""
    from mcap.reader import make_reader
    return b'\x00'.join(m.data for _s, _c, m in make_reader(io.BytesIO(data)).iter_messages())


def test_a_stored_recording_on_s3_is_exported_from_and_rewritten_there_by_forget(s3, tmp_path):
    """`loom record --store`'s step: the recording (two subjects' events and anonymous ones,
    test_erasure.plant's) goes to S3 as blobs/recordings/run.mcap; export copies B's events out
    of it, forget rewrites it there without A's, and its index row still reads it."""
    bucket = s3.new_bucket()
    root = tmp_path / 'root'
    a, b = Subject('A'), Subject('B')
    expected = plant(root, [a, b])
    params = s3_params(root, s3, bucket)
    env = {'LOOM_S3_ACCESS_KEY': s3.access_key, 'LOOM_S3_SECRET_KEY': s3.secret_key}
    local = root / 'recordings' / 'run.mcap'
    ref = store_recording(local, params, env)
    assert ref.key == 'blobs/recordings/run.mcap' and not local.exists()
    before = objects_on_server(s3, bucket)[f'fleet/robot1/{ref.key}']
    assert hits(recorded(before), a) and hits(recorded(before), b)

    layout = StorageLayout.at(root)
    backend = object_backend(settings_from_params(params, env))
    out = tmp_path / 'b.zip'
    counts = export(layout, b.id, out, objects=backend)
    assert counts['recording_messages'] == expected[b.id]['recording_messages']
    with zipfile.ZipFile(out) as archive:
        theirs = recorded(archive.read('media/recordings/run.mcap'))
    assert b.canaries['batch'] in theirs and b.canaries['frame0'] in theirs
    assert hits(theirs, a) == []

    receipt = forget(layout, a.id, requested_by='dpo:test', objects=backend)
    assert receipt.counts['recording_messages'] == expected[a.id]['recording_messages']
    after = objects_on_server(s3, bucket)[f'fleet/robot1/{ref.key}']
    assert hits(recorded(after), a) == []
    assert b.canaries['batch'] in recorded(after) and b.canaries['frame0'] in recorded(after)
    objects = ObjectSettings.from_params(params, env)
    with Storage(StorageConfig(root=str(root), unit='recorder', objects=objects)) as storage:
        assert storage.blobs.get(ref.key) == after   # its row says the new length
    # back to a local file for `loom play` (never over an existing one)
    fetched = tmp_path / 'fetched.mcap'
    assert fetch_recording('run.mcap', fetched, params, env).bytes == len(after)
    assert fetched.read_bytes() == after
    with pytest.raises(StorageError, match='exists'):
        fetch_recording('run.mcap', fetched, params, env)
    with pytest.raises(StorageError, match='not stored'):
        fetch_recording('other.mcap', tmp_path / 'other.mcap', params, env)


def test_loom_record_store_moves_its_file_into_the_object_store(tmp_path):
    root, output = tmp_path / 'root', tmp_path / 'short.mcap'
    done = subprocess.run(
        [sys.executable, *loom_cli('record', '--output', str(output), '--duration', '0.3',
                                   '--topics', 'h1_nothing_here', '--root', str(root),
                                   '--store')],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT_LIMIT_S)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]
    stored = root / 'objects' / 'blobs' / 'recordings' / 'short.mcap'
    assert {'stored': 'blobs/recordings/short.mcap', 'bytes': stored.stat().st_size} in lines
    assert not output.exists() and stored.read_bytes()[:5] == b'\x89MCAP'
    # a file that is not there (or not a plain file) is a clear error, nothing stored
    missing = store_recording_cli(root, tmp_path / 'gone.mcap')
    assert missing.returncode == 1 and 'not a plain file' in missing.stderr


def store_recording_cli(root, path):
    code = ('import os, sys\n'
            'from loom_ros.storage.blobs import store_recording\n'
            'from loom_ros.storage.errors import StorageError\n'
            'from loom_ros.storage.service import default_params\n'
            'try:\n'
            f'    store_recording({str(path)!r}, {{**default_params(), "storage.root": '
            f'{str(root)!r}}}, os.environ)\n'
            'except StorageError as exc:\n'
            '    print(exc, file=sys.stderr); sys.exit(1)\n')
    return subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, timeout=WAIT_LIMIT_S)


def test_encrypted_blobs_on_s3_are_ciphertext_and_forget_shreds_them(s3, tmp_path):
    """Encryption on: a subject's blob is sealed under the subject's key on the server; forget
    deletes it and destroys the key, so a copy taken before cannot be opened; B's still reads."""
    from loom_ros.security.keyring import EncryptionSettings, Keyring, ShreddedError
    from test_s3_backend import master_key
    bucket = s3.new_bucket()
    root = tmp_path / 'root'
    consenting(root)
    enc = EncryptionSettings(True, str(master_key(tmp_path)))
    env = {'LOOM_S3_ACCESS_KEY': s3.access_key, 'LOOM_S3_SECRET_KEY': s3.secret_key}
    objects = ObjectSettings.from_params(s3_params(root, s3, bucket), env)
    data = {s: wav(s) for s in (ALICE, BOB)}
    with Storage(StorageConfig(root=str(root), unit='host', objects=objects, encryption=enc),
                 env=env) as storage:
        assert storage.objects.name == 'encrypted s3'
        keys = {s: storage.blobs.put('answers', 'a.wav', data[s], subject=s).key
                for s in (ALICE, BOB)}
        on_server = objects_on_server(s3, bucket)
        assert not any(d in blob for d in data.values() for blob in on_server.values())
        assert storage.blobs.get(keys[ALICE]) == data[ALICE]
    copy = on_server[f'fleet/robot1/{keys[ALICE]}']
    layout = StorageLayout.at(root)
    keyring = Keyring.open(root, enc, env)
    try:
        receipt = forget(layout, ALICE, requested_by='dpo:test', keyring=keyring,
                         objects=objects.open(layout.objects))
        assert receipt.counts['blobs'] == 1 and receipt.counts['keys'] == 1
        with pytest.raises(ShreddedError):
            keyring.decrypt(copy, EncryptedObjectStore.context(keys[ALICE]))
    finally:
        keyring.close()
    assert sorted(objects_on_server(s3, bucket)) == [f'fleet/robot1/{keys[BOB]}']
    with Storage(StorageConfig(root=str(root), unit='host', objects=objects, encryption=enc),
                 env=env) as storage:
        assert storage.blobs.get(keys[BOB]) == data[BOB]


def test_blobs_show_as_a_tier_in_the_stats_without_a_budget(tmp_path):
    from loom_ros.storage.service import StorageService
    from loom_ros.storage.embedding import HashEmbedder
    root = tmp_path / 'root'
    consenting(root)
    with Storage(StorageConfig(root=str(root), unit='host'), clock=MsClock()) as storage:
        storage.blobs.put('answers', 'a.wav', b'x' * 300, subject=ALICE)
        storage.blobs.put('frames', 'f.raw', b'y' * 200)
    params = {**default_params(), 'storage.root': str(root), 'storage.embedder': 'hash',
              'storage.budget.total_bytes': 10**9}
    service = StorageService(settings_from_params(params, {}), embedder=HashEmbedder())
    try:
        stats = service.stats()
        assert {k: stats['tiers']['blobs'][k] for k in ('rows', 'bytes')} == \
            {'rows': 2, 'bytes': 500}
        assert 'budget_bytes' not in stats['tiers']['blobs']
    finally:
        service.close()


def test_a_forget_cut_off_before_its_index_rows_is_mended_by_running_it_again(tmp_path):
    """A crash between forget's rewrite of a stored recording and the update of its index row
    leaves the row with the old length, and every read refuses the recording; forget run again
    finds nothing of the subject in it and brings the row to the object's length."""
    root = tmp_path / 'root'
    a, b = Subject('A'), Subject('B')
    plant(root, [a, b])
    params = {**default_params(), 'storage.root': str(root), 'storage.embedder': 'hash'}
    ref = store_recording(root / 'recordings' / 'run.mcap', params, {})
    layout = StorageLayout.at(root)
    forget(layout, a.id, requested_by='dpo:test')
    stored = root / 'objects' / ref.key
    after = stored.read_bytes()
    assert hits(recorded(after), a) == [] and len(after) < ref.bytes
    with Storage(StorageConfig(root=str(root), unit='recorder')) as storage:
        storage.write('update blobs set bytes = ? where key = ?', (ref.bytes, ref.key)).wait()
        with pytest.raises(StorageError, match='recorded; not returned'):
            storage.blobs.get(ref.key)
    receipt = forget(layout, a.id, requested_by='dpo:test')
    assert receipt.counts['recording_messages'] == 0
    assert any('its index said another length' in line for line in receipt.not_covered)
    fetched = tmp_path / 'fetched.mcap'
    assert fetch_recording('run.mcap', fetched, params, {}).bytes == len(after)
    assert fetched.read_bytes() == after and b.canaries['batch'] in recorded(after)


def test_a_local_object_grown_past_the_limit_is_refused_unread(tmp_path):
    from loom_ros.storage.backend.local import LocalObjectStore
    store = LocalObjectStore(tmp_path, max_bytes=64)
    store.put('blobs/x/fits', b'a' * 64)
    assert store.get('blobs/x/fits') == b'a' * 64
    (tmp_path / 'blobs' / 'x' / 'big').write_bytes(b'b' * 65)   # written there by someone else
    with pytest.raises(StorageError, match='more than 64 bytes'):
        store.get('blobs/x/big')
    # a link planted under the folder is not followed, whatever it points at
    secret = tmp_path.parent / f'{tmp_path.name}-outside.txt'
    secret.write_bytes(b'not an object')
    (tmp_path / 'blobs' / 'x' / 'link').symlink_to(secret)
    with pytest.raises(StorageError, match='cannot read'):
        store.get('blobs/x/link')
    os.mkfifo(tmp_path / 'blobs' / 'x' / 'fifo')     # nor does a FIFO block the reader
    with pytest.raises(StorageError, match='cannot read: .*not a plain file'):
        store.get('blobs/x/fifo')
