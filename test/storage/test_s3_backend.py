"""The S3 object store against a live S3 server: moto's, in a subprocess on a loopback port, with
real SigV4 authentication (an IAM user made at start; every later request is checked). Through
Loom's own APIs: the store, the encrypting store over it, the lifecycle's archive tier, the
storage service configured as config/loom.yaml configures it; errors (wrong credentials,
missing bucket, bad settings, hostile keys, the server down mid-run) are StorageErrors and lose
nothing."""
from __future__ import annotations

import gzip
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
from harness import T0_MS, WAIT_LIMIT_S, MsClock, free_port
from minio import Minio

from loom_ros.bus.event import Event
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, ConsentState
from loom_ros.security.keyring import (DecryptError, EncryptionSettings, Keyring, MasterKey,
                                       ShreddedError, write_key_file)
from loom_ros.storage.backend import object_store
from loom_ros.storage.backend.encrypted import EncryptedObjectStore
from loom_ros.storage.backend.s3 import OWNER_MARKER, S3ObjectStore, http_client
from loom_ros.storage.base import MAX_KEY_CHARS
from loom_ros.storage.embedding import HashEmbedder
from loom_ros.storage.errors import StorageError
from loom_ros.storage.layout import StorageLayout
from loom_ros.storage.lifecycle import Lifecycle, LifecycleParams, TierPolicy
from loom_ros.storage.service import StorageService, default_params, settings_from_params
from loom_ros.storage.storage import Storage, StorageConfig

T0 = T0_MS
IAM_SETUP_ACTIONS = 3     # create_user, put_user_policy, create_access_key


class S3Server:
    """moto's S3 server (`python -m moto.server`) on a free loopback port. With `auth`, the
    first IAM_SETUP_ACTIONS requests make an IAM user allowed s3:*, and every later request
    must be signed with its keys (moto checks the signature)."""

    def __init__(self, folder: Path, auth: bool):
        self.folder, self.auth = folder, auth
        folder.mkdir(parents=True, exist_ok=True)
        self.access_key, self.secret_key = 'loom-test', 'loom-test-secret'
        self.popen = None
        for _attempt in range(5):   # another process may take the free port before moto does
            self.port = free_port()
            if self.start():
                break
        else:
            pytest.fail(f'moto server did not start: {self.log()}')
        if auth:
            self._make_user()

    @property
    def endpoint(self) -> str:
        return f'127.0.0.1:{self.port}'

    def log(self) -> str:
        return (self.folder / 'server.log').read_text(errors='replace')[-2000:]

    def start(self) -> bool:
        """Start on self.port; True once the port answers, False if the server exited."""
        env = dict(os.environ)
        if self.auth:
            env['INITIAL_NO_AUTH_ACTION_COUNT'] = str(IAM_SETUP_ACTIONS)
        with open(self.folder / 'server.log', 'ab') as log:
            self.popen = subprocess.Popen(
                [sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + WAIT_LIMIT_S
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                return False
            try:
                socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.05)   # polling the condition (the port answering)
        self.kill()
        pytest.fail(f'moto server on port {self.port} did not answer in {WAIT_LIMIT_S} s: '
                    f'{self.log()}')

    def _make_user(self) -> None:
        iam = boto3.client('iam', endpoint_url=f'http://{self.endpoint}', region_name='us-east-1',
                           aws_access_key_id='setup', aws_secret_access_key='setup')
        iam.create_user(UserName='loom')
        iam.put_user_policy(UserName='loom', PolicyName='s3', PolicyDocument=json.dumps({
            'Version': '2012-10-17',
            'Statement': [{'Effect': 'Allow', 'Action': 's3:*', 'Resource': '*'}]}))
        key = iam.create_access_key(UserName='loom')['AccessKey']
        self.access_key, self.secret_key = key['AccessKeyId'], key['SecretAccessKey']

    def raw(self) -> Minio:
        """A plain MinIO client: what anyone with the keys sees on the server."""
        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key,
                     secure=False)

    def new_bucket(self) -> str:
        name = f'loom-{uuid.uuid4().hex[:12]}'
        self.raw().make_bucket(name)
        return name

    def store(self, bucket: str, **kw) -> S3ObjectStore:
        return S3ObjectStore(self.endpoint, bucket, kw.pop('access_key', self.access_key),
                             kw.pop('secret_key', self.secret_key), secure=False, **kw)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(WAIT_LIMIT_S)


def objects_on_server(server: S3Server, bucket: str, markers: bool = False) -> dict[str, bytes]:
    """Every object in the bucket; the folders' owner markers only with `markers`
    (test_s3_shared_bucket.py)."""
    raw = server.raw()
    out = {}
    for obj in raw.list_objects(bucket, recursive=True):
        if not markers and obj.object_name.rsplit('/', 1)[-1] == OWNER_MARKER:
            continue
        response = raw.get_object(bucket, obj.object_name)
        try:
            out[obj.object_name] = response.read()
        finally:
            response.close()
            response.release_conn()
    return out


@pytest.fixture(scope='module')
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp('s3'), auth=True)
    yield server
    server.kill()


Clock = MsClock


class GrantAll:
    """Every subject consents to storage (storage consent: test_storage_consent.py)."""

    @staticmethod
    def lookup(subject: str, purpose: str) -> ConsentState:
        return ConsentState(purpose, True, True, 'test')


def master_key(tmp_path: Path) -> Path:
    path = tmp_path / 'master.key'
    if not path.exists():
        write_key_file(path, [MasterKey.generate()])
    return path


def write_events(root: Path, clock, events: list[tuple[str, str, str]],
                 encryption: EncryptionSettings | None = None) -> None:
    """(agent, text, subject) events one second apart from T0, in the unit database `host`."""
    with Storage(StorageConfig(root=str(root), unit='host',
                               encryption=encryption or EncryptionSettings()),
                 clock=clock, env={}, consent=GrantAll) as storage:
        for i, (agent, text, subject) in enumerate(events):
            storage.episodes.record(agent, Event(
                type='speech.heard', source='mic', id=f'e{i}', payload=text.encode(),
                timestamp_ms=T0 + i * 1000,
                metadata={SUBJECT_METADATA_KEY: subject} if subject else {})).wait(10)


def done_keys(lc: Lifecycle) -> list[str]:
    return [k for (k,) in lc.conn.execute("select key from archive where state = 'done' "
                                          'order by key')]


# -- the store --------------------------------------------------------------------------------
def test_objects_round_trip_on_a_live_server_under_a_prefix(s3):
    bucket = s3.new_bucket()
    store = s3.store(bucket, prefix='/robots/r1/')
    big = os.urandom(6 * 1024 * 1024 + 17)          # over 5 MiB: a multipart upload
    store.put('blobs/answer.wav', b'RIFF one')
    store.put('blobs/answer.wav', b'RIFF two')      # replaced whole
    store.put('blobs/empty.bin', b'')
    store.put('archive/host/warm/big.jsonl.gz', big)
    assert store.get('blobs/answer.wav') == b'RIFF two'
    assert store.get('blobs/empty.bin') == b''
    assert store.get('archive/host/warm/big.jsonl.gz') == big
    assert store.size('archive/host/warm/big.jsonl.gz') == len(big)
    assert store.exists('blobs/answer.wav') and not store.exists('blobs/missing.wav')
    # on the server: under the prefix, nothing else
    raw = s3.raw()
    assert sorted(o.object_name for o in raw.list_objects(bucket, recursive=True)) == [
        'robots/r1/archive/host/warm/big.jsonl.gz', 'robots/r1/blobs/answer.wav',
        'robots/r1/blobs/empty.bin']
    # another robot's object and a stray name that is no Loom key, in the same bucket
    raw.put_object(bucket, 'robots/r2/blobs/other.wav', io.BytesIO(b'x'), 1)
    raw.put_object(bucket, 'robots/r1/blobs/odd name?.wav', io.BytesIO(b'y'), 1)
    assert store.list() == [('archive/host/warm/big.jsonl.gz', len(big)),
                            ('blobs/answer.wav', 8), ('blobs/empty.bin', 0)]
    assert store.rejected == {'not_a_key': 1}
    # a folder, with or without its slash, as the local store; never a partial name
    assert store.list('blobs') == store.list('blobs/') == [('blobs/answer.wav', 8),
                                                            ('blobs/empty.bin', 0)]
    assert store.list('blo') == [] and store.list('archive/host/') == store.list()[:1]
    assert store.bytes_used('blobs') == 8
    store.delete('blobs/answer.wav')
    store.delete('blobs/answer.wav')                 # already gone: no error
    assert not store.exists('blobs/answer.wav')
    with pytest.raises(StorageError, match=r's3://loom-\w+/robots/r1/blobs/answer.wav: cannot '
                                           'read: NoSuchKey'):
        store.get('blobs/answer.wav')
    # the same bucket without a prefix sees every robot's keys
    assert [k for k, _ in s3.store(bucket).list('robots')] == [
        'robots/r1/archive/host/warm/big.jsonl.gz', 'robots/r1/blobs/empty.bin',
        'robots/r2/blobs/other.wav']


HOSTILE_KEYS = ['../escape', 'blobs/../../etc/passwd', '/etc/passwd', 'a' * 5000,
                'a' * (MAX_KEY_CHARS + 1), 'blobs/a\x00b', '', 'blobs//x', './x', 'blobs/x y',
                'blobs/\u202eevil', None, b'bytes']


def test_hostile_keys_are_refused_before_any_request(s3):
    bucket = s3.new_bucket()
    store = s3.store(bucket)
    store.put('blobs/ok', b'ok')
    for key in HOSTILE_KEYS:
        for call in (lambda: store.put(key, b'x'), lambda: store.get(key),
                     lambda: store.delete(key), lambda: store.exists(key),
                     lambda: store.size(key), lambda: store.list(key or None)):
            with pytest.raises(StorageError, match='object key'):
                call()
    assert [o.object_name for o in s3.raw().list_objects(bucket, recursive=True)] == ['blobs/ok']
    # no request at all: the same calls against a port nobody listens on name the key, not
    # the unreachable server
    offline = S3ObjectStore(f'127.0.0.1:{free_port()}', bucket, 'k', 's', secure=False)
    with pytest.raises(StorageError, match='object key'):
        offline.put('../escape', b'x')
    # a prefix that is not a key is refused when the store is made
    for prefix in ('../other', 'a/../../b', 'robots/\x00', 'a' * 5000):
        with pytest.raises(StorageError, match='storage.objects.prefix'):
            s3.store(bucket, prefix=prefix)


# -- errors -----------------------------------------------------------------------------------
def test_wrong_credentials_are_clear_storage_errors(s3):
    bucket = s3.new_bucket()
    s3.store(bucket).put('blobs/ok', b'ok')
    cases = [(s3.access_key, 'wrong-secret', 'SignatureDoesNotMatch'),
             ('AKIAWRONGWRONGWRONG0', s3.secret_key, 'InvalidAccessKeyId')]
    for access_key, secret_key, code in cases:
        store = s3.store(bucket, access_key=access_key, secret_key=secret_key)
        for call in (lambda: store.put('blobs/x', b'x'), lambda: store.get('blobs/ok'),
                     lambda: store.list(), lambda: store.exists('blobs/ok'),
                     lambda: store.delete('blobs/ok')):
            with pytest.raises(StorageError, match=f'{code}.*LOOM_S3_ACCESS_KEY'):
                call()
    anonymous = s3.store(bucket, access_key='', secret_key='')
    with pytest.raises(StorageError, match='access denied.*LOOM_S3_ACCESS_KEY'):
        anonymous.get('blobs/ok')
    with pytest.raises(StorageError, match='set both LOOM_S3_ACCESS_KEY and LOOM_S3_SECRET_KEY'):
        s3.store(bucket, access_key='only-the-id', secret_key='')
    # nothing was written or removed by the refused requests
    assert objects_on_server(s3, bucket) == {'blobs/ok': b'ok'}


def test_a_missing_bucket_is_an_error_never_an_absent_object(s3):
    store = s3.store('loom-no-such-bucket')
    for call in (lambda: store.put('blobs/x', b'x'), lambda: store.get('blobs/x'),
                 lambda: store.list(), lambda: store.exists('blobs/x'),
                 lambda: store.size('blobs/x'), lambda: store.delete('blobs/x')):
        with pytest.raises(StorageError, match='NoSuchBucket.*create the bucket'):
            call()


def test_a_deleted_bucket_is_an_error_even_after_use(s3):
    """A HEAD on a missing bucket answers 404 like a missing object: exists() must not say
    False for an object whose bucket is gone."""
    bucket = s3.new_bucket()
    store = s3.store(bucket)
    store.put('blobs/x', b'x')
    assert store.exists('blobs/x') and not store.exists('blobs/y')
    s3.raw().remove_object(bucket, 'blobs/x')
    s3.raw().remove_bucket(bucket)
    with pytest.raises(StorageError, match='NoSuchBucket.*create the bucket'):
        store.exists('blobs/x')


def test_objects_longer_than_the_bound_are_refused_not_read_whole(s3):
    bucket = s3.new_bucket()
    store = s3.store(bucket, max_bytes=1024)
    store.put('blobs/edge', b'e' * 1024)
    assert store.get('blobs/edge') == b'e' * 1024
    with pytest.raises(StorageError, match='longer than 1024; refused'):
        store.put('blobs/long', b'l' * 1025)
    s3.raw().put_object(bucket, 'blobs/planted', io.BytesIO(b'p' * 4096), 4096)
    with pytest.raises(StorageError, match='blobs/planted: 4096 bytes or more, longer than 1024'):
        store.get('blobs/planted')
    assert store.rejected == {'oversize': 2}
    assert sorted(objects_on_server(s3, bucket)) == ['blobs/edge', 'blobs/planted']


def test_bad_settings_are_refused_when_the_store_is_made(s3):
    for endpoint, bucket, match in (
            (f'http://{s3.endpoint}', 'loom', 'storage.objects.endpoint .*host\\[:port\\]'),
            (f'{s3.endpoint}/path', 'loom', 'storage.objects.endpoint'),
            (s3.endpoint, 'bad..bucket', 'storage.objects.bucket'),
            (s3.endpoint, 'x' * 64, 'storage.objects.bucket'),
            (s3.endpoint, '../up', 'storage.objects.bucket'),
            (s3.endpoint, '', 'storage.objects.bucket is empty')):
        with pytest.raises(StorageError, match=match):
            object_store('/nonexistent', endpoint, bucket, s3.access_key, s3.secret_key,
                         secure=False)
    # https (the default) to a plain-http server: a clear error at the first request
    tls = S3ObjectStore(s3.endpoint, s3.new_bucket(), s3.access_key, s3.secret_key,
                        http=http_client(retries=0))
    with pytest.raises(StorageError, match='cannot list: S3 endpoint unreachable.*SSL'):
        tls.list()


# -- encryption over S3 -----------------------------------------------------------------------
def test_encrypted_objects_on_s3_are_ciphertext_and_shredding_makes_them_unreadable(s3,
                                                                                   tmp_path):
    bucket = s3.new_bucket()
    keyring = Keyring.open(tmp_path, EncryptionSettings(True, str(master_key(tmp_path))), {})
    try:
        store = EncryptedObjectStore(s3.store(bucket), keyring)
        store.put('blobs/alice/answer.wav', b'RIFF alice canary 5d1e', subject='alice')
        store.put('blobs/anon/frame.jpg', b'\xff\xd8 anonymous canary 8b20')
        assert store.get('blobs/alice/answer.wav') == b'RIFF alice canary 5d1e'
        on_server = objects_on_server(s3, bucket)
        assert sorted(on_server) == ['blobs/alice/answer.wav', 'blobs/anon/frame.jpg']
        assert not any(b'canary' in data for data in on_server.values())
        raw = s3.raw()
        # a ciphertext copied to another key on the server: refused, never returned
        raw.put_object(bucket, 'blobs/bob.wav', io.BytesIO(on_server['blobs/alice/answer.wav']),
                       len(on_server['blobs/alice/answer.wav']))
        with pytest.raises(DecryptError, match='blobs/bob.wav: .*fails authentication'):
            store.get('blobs/bob.wav')
        # plaintext planted on the server: refused
        raw.put_object(bucket, 'blobs/planted.txt', io.BytesIO(b'plain'), 5)
        with pytest.raises(DecryptError, match='not a Loom ciphertext'):
            store.get('blobs/planted.txt')
        keyring.destroy('alice')
        with pytest.raises(ShreddedError, match='crypto-shredded'):
            store.get('blobs/alice/answer.wav')
        assert store.get('blobs/anon/frame.jpg') == b'\xff\xd8 anonymous canary 8b20'
    finally:
        keyring.close()


# -- the lifecycle's archive tier on S3 -------------------------------------------------------
def archive_lifecycle(root: Path, objects, clock) -> Lifecycle:
    return Lifecycle(StorageLayout.at(str(root)), 'host', objects, HashEmbedder(),
                     LifecycleParams(default=TierPolicy(warm_s=60, cold_s=600, archive_s=3600),
                                     bucket_s=5), clock=clock, consent=GrantAll)


def test_the_archive_tier_writes_to_s3_reads_back_recovers_and_expires(s3, tmp_path):
    bucket = s3.new_bucket()
    clock = Clock()
    root = tmp_path / 'root'
    write_events(root, clock, [('chat', f'archived canary {i}', '') for i in range(6)])
    store = s3.store(bucket, prefix='robot1')
    # an archive object no row knows (a crash between a delete's commit and the object's)
    store.put('archive/host/cold/0000000000000-stray.jsonl.gz', gzip.compress(b'{}\n'))
    lc = archive_lifecycle(root, store, clock)
    try:
        assert store.list('archive/host') == []                # recovery removed the stray
        clock.ms = T0 + 60_000 + 600_000 + 10_000             # warm -> cold -> archive
        report = lc.run_once()
        assert report.condensed == 6 and report.archived >= 1
        keys = done_keys(lc)
        assert [k for k, _ in store.list('archive/host')] == keys
        assert sorted(o.object_name for o in s3.raw().list_objects(bucket, recursive=True)) == \
            [f'robot1/{k}' for k in keys]
        assert not (root / 'objects').exists() or not any((root / 'objects').rglob('*'))
        records = [r for k in keys for r in lc.read_archive(k)]
        assert sum(r['count'] for r in records) == 6      # memories quote first and last
        summaries = ' '.join(r['summary'] for r in records)
        assert 'archived canary 0' in summaries and 'archived canary 5' in summaries
        assert lc.usage()['archive']['bytes'] == store.bytes_used('archive/host')
        clock.ms += 3_600_000 + 1                              # past archive_s
        assert lc.run_once().archive_deleted == len(keys)
        assert store.list() == [] and done_keys(lc) == []
    finally:
        lc.close()


def test_encrypted_archives_on_s3_hold_no_plaintext_and_shred_per_subject(s3, tmp_path):
    bucket = s3.new_bucket()
    clock = Clock()
    root = tmp_path / 'root'
    encryption = EncryptionSettings(True, str(master_key(tmp_path)))
    write_events(root, clock, [('raw', f'alice canary {i}', 'alice') for i in range(3)] +
                 [('raw', f'bob canary {i}', 'bob') for i in range(3)], encryption)
    keyring = Keyring.open(root, encryption, {}, clock)
    store = EncryptedObjectStore(s3.store(bucket), keyring)
    lc = Lifecycle(StorageLayout.at(str(root)), 'host', store, HashEmbedder(), LifecycleParams(
        default=TierPolicy(warm_s=60, cold=False)), clock=clock,
        consent=GrantAll)   # raw events archived
    try:
        clock.ms = T0 + 120_000
        assert lc.run_once().archived == 6
        keys = done_keys(lc)
        by_subject = {r['subject']: k for k in keys for r in lc.read_archive(k)}
        assert sorted(by_subject) == ['alice', 'bob'] and len(keys) == 2
        assert not any(b'canary' in data for data in objects_on_server(s3, bucket).values())
        keyring.destroy('alice')
        with pytest.raises(ShreddedError):
            lc.read_archive(by_subject['alice'])
        assert sorted(r['payload'] for r in lc.read_archive(by_subject['bob'])) == \
            [f'bob canary {i}' for i in range(3)]
    finally:
        lc.close()
        keyring.close()


# -- the storage service configured as config/loom.yaml configures it -----------------------
def service_params(root: Path, server: S3Server, bucket: str, **more) -> dict:
    params = default_params()
    params.update({'storage.root': str(root), 'storage.embedder': 'hash',
                   'storage.lifecycle.warm_s': 60.0, 'storage.lifecycle.cold_s': 600.0,
                   'storage.objects.endpoint': server.endpoint, 'storage.objects.bucket': bucket,
                   'storage.objects.prefix': 'fleet/robot1', 'storage.objects.secure': False,
                   **more})
    return params


def test_the_storage_service_configured_for_s3_archives_there_encrypted(s3, tmp_path):
    bucket = s3.new_bucket()
    clock = Clock()
    root = tmp_path / 'root'
    key_file = master_key(tmp_path)
    write_events(root, clock, [('chat', f'service canary {i}', '') for i in range(4)],
                 EncryptionSettings(True, str(key_file)))
    params = service_params(root, s3, bucket, **{
        'storage.encryption.enabled': True, 'storage.encryption.master_key_file': str(key_file)})
    env = {'LOOM_S3_ACCESS_KEY': s3.access_key, 'LOOM_S3_SECRET_KEY': s3.secret_key}
    service = StorageService(settings_from_params(params, env), embedder=HashEmbedder(),
                             clock=clock, env=env)
    try:
        assert service.objects.name == 'encrypted s3'
        clock.ms = T0 + 700_000
        report = service.run_round()
        assert service.error == '' and report.condensed == 4 and report.archived >= 1
        lc = service.lifecycles['host']
        keys = done_keys(lc)
        on_server = objects_on_server(s3, bucket)
        assert sorted(on_server) == [f'fleet/robot1/{k}' for k in keys]
        assert not any(b'canary' in data for data in on_server.values())
        records = [r for k in keys for r in lc.read_archive(k)]
        assert sum(r['count'] for r in records) == 4      # memories quote first and last
        summaries = ' '.join(r['summary'] for r in records)
        assert 'service canary 0' in summaries and 'service canary 3' in summaries
        assert service.stats()['tiers']['archive']['rows'] == report.archived
    finally:
        service.close()
    # a wrong key in the environment: refused at start (the lifecycle's recovery lists the
    # archive), the node says why
    env['LOOM_S3_SECRET_KEY'] = 'not-the-secret'
    with pytest.raises(StorageError,
                       match='cannot list: SignatureDoesNotMatch.*LOOM_S3_SECRET_KEY'):
        StorageService(settings_from_params(params, env), embedder=HashEmbedder(), clock=clock,
                       env=env)


def test_server_down_mid_run_loses_nothing_and_the_move_is_retried(tmp_path):
    server = S3Server(tmp_path / 's3', auth=False)
    try:
        bucket = server.new_bucket()
        clock = Clock()
        root = tmp_path / 'root'
        write_events(root, clock, [('chat', f'kept canary {i}', '') for i in range(5)])
        env = {'LOOM_S3_ACCESS_KEY': server.access_key, 'LOOM_S3_SECRET_KEY': server.secret_key}
        settings = settings_from_params(service_params(root, server, bucket), env)
        service = StorageService(settings, embedder=HashEmbedder(), clock=clock, env=env)
        try:
            server.kill()                                       # down mid-run
            clock.ms = T0 + 700_000
            report = service.run_round()
            assert 'cannot write: S3 endpoint unreachable' in service.error
            assert report.archived == 0
            lc = service.lifecycles['host']
            memories = lc.conn.execute('select count(*) from cold').fetchone()[0]
            assert memories >= 1 and done_keys(lc) == []        # still in the cold tier
            # back (a fresh moto keeps nothing, as the empty bucket before): retried
            assert server.start()
            server.raw().make_bucket(bucket)
            report = service.run_round()
            assert service.error == '' and report.archived == memories
            keys = done_keys(lc)
            records = [r for k in keys for r in lc.read_archive(k)]
            assert sum(r['count'] for r in records) == 5
            summaries = ' '.join(r['summary'] for r in records)
            assert 'kept canary 0' in summaries and 'kept canary 4' in summaries
            assert lc.conn.execute('select count(*) from cold').fetchone()[0] == 0
        finally:
            service.close()
        # the next start drops what the failed write left pending; the archive is whole
        service = StorageService(settings, embedder=HashEmbedder(), clock=clock, env=env)
        try:
            lc = service.lifecycles['host']
            assert lc.conn.execute("select count(*) from archive where state != 'done'"
                                   ).fetchone()[0] == 0
            assert [k for k, _ in service.objects.list('archive/host')] == done_keys(lc) == keys
        finally:
            service.close()
    finally:
        server.kill()


def test_a_server_that_stops_answering_is_a_bounded_error_and_recovery_cleans_up(s3, tmp_path):
    """The server frozen (SIGSTOP): requests are accepted and never answered. The write fails
    after the store's read timeout (here short; the default is READ_TIMEOUT_S), the rows stay;
    once it answers again the move is retried, and the next open drops what the failed write
    left pending, on the server too if that write landed late."""
    bucket = s3.new_bucket()
    clock = Clock()
    root = tmp_path / 'root'
    write_events(root, clock, [('chat', f'frozen canary {i}', '') for i in range(3)])
    store = s3.store(bucket, http=http_client(connect_s=2.0, read_s=0.5, retries=0))
    lc = archive_lifecycle(root, store, clock)
    clock.ms = T0 + 60_000 + 600_000 + 10_000
    assert lc.move_warm().condensed == 3
    os.kill(s3.popen.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StorageError, match='cannot write: S3 endpoint unreachable'):
            lc.move_cold()
    finally:
        os.kill(s3.popen.pid, signal.SIGCONT)
    try:
        pending = [k for (k,) in lc.conn.execute(
            "select key from archive where state = 'pending'")]
        # the failed file's row: pending until recovery (or dropped at once), never done
        assert len(pending) <= 1 and done_keys(lc) == []
        assert lc.conn.execute('select count(*) from cold').fetchone()[0] >= 1
        assert lc.move_cold().archived >= 1                   # retried
        keys = done_keys(lc)
        assert sum(r['count'] for k in keys for r in lc.read_archive(k)) == 3
    finally:
        lc.close()
    lc = archive_lifecycle(root, store, clock)                # recovery at open
    try:
        assert lc.conn.execute("select count(*) from archive where state != 'done'"
                               ).fetchone()[0] == 0
        assert done_keys(lc) == keys
        on_server = set(objects_on_server(s3, bucket))
        assert set(keys) <= on_server <= set(keys) | set(pending)
    finally:
        lc.close()


def test_forget_and_export_reach_the_archives_on_s3(s3, tmp_path):
    """With storage.objects on S3, `forget` erases a subject's archived records on the server
    (not only under the root's local objects/), another subject's stay, and `export` reads the
    subject's archived records from there (unencrypted archives: no key to shred)."""
    from loom_ros.storage.erasure import export, forget
    from loom_ros.storage.layout import StorageLayout
    bucket = s3.new_bucket()
    clock = Clock()
    root = tmp_path / 'root'
    write_events(root, clock, [('chat', f'alice canary {i}', 'alice') for i in range(3)]
                 + [('chat', f'bob canary {i}', 'bob') for i in range(3)])
    store = s3.store(bucket, prefix='robot1')
    lc = archive_lifecycle(root, store, clock)
    try:
        clock.ms = T0 + 60_000 + 600_000 + 10_000             # warm -> cold -> archive
        assert lc.run_once().archived >= 1
    finally:
        lc.close()

    def on_server() -> bytes:   # every archive object, decompressed (gzip members join)
        raw = s3.raw()
        return gzip.decompress(b''.join(raw.get_object(bucket, o.object_name).read()
                                        for o in raw.list_objects(bucket, recursive=True)))
    assert b'alice canary' in on_server() and b'bob canary' in on_server()
    layout = StorageLayout.at(root)
    exported = export(layout, 'alice', tmp_path / 'alice.zip', objects=store)
    assert exported.get('archive', 0) >= 1
    receipt = forget(layout, 'alice', objects=store)
    assert receipt.counts['archive_records'] >= 1, receipt.counts
    left = on_server()
    assert b'alice' not in left and b'bob canary' in left
    assert not any('unreadable' in note for note in receipt.not_covered), receipt.not_covered
