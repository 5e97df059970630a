"""Objects in any S3-compatible store (AWS S3, MinIO, Ceph, Garage...) through the MinIO client
(pinned in constraints.txt). S3 puts are atomic per object. Every failure of the store (refused
credentials, missing bucket, server down, timeout, cut connection) is a StorageError naming the
object and the reason, so the lifecycle leaves its move undone and retries it at a later round.

A store opened for a storage root (`owner_file`) claims its bucket folder with an owner marker
(`<prefix>/.loom-owner.json`, the root's random id): the lifecycle's recovery deletes every
archive object its database does not know, so two roots in one folder (the same prefix, or none,
on two robots) would delete each other's archives. A folder (or a folder above it) another root
claims is refused with FolderClaimedError; markers are never listed, written or deleted as
objects, and a folder below ours that another root claims is left out of our listings.
Tested against a live S3 server (moto's, test/storage/test_s3_backend.py and
test_s3_shared_bucket.py)."""
from __future__ import annotations

import io
import json
import os
import re
import secrets
import socket
import threading
from collections import Counter
from pathlib import Path

import certifi
import urllib3

from loom_ros.security.keyring import MAX_PLAINTEXT_BYTES, OVERHEAD
from loom_ros.storage.base import ObjectStore, check_key
from loom_ros.storage.durable import read_regular
from loom_ros.storage.errors import StorageError

try:
    from minio import Minio
    from minio.error import MinioException, S3Error
    from minio.helpers import check_bucket_name
except ImportError:     # optional backend: only a configured endpoint needs it
    Minio = None

# A dead or black-holed endpoint must not hold a storage round (and its lock) for minutes: the
# MinIO client's own default is 5 minutes per socket operation and 5 retries.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0     # per socket read, not per object
RETRIES = 3               # connection errors and 500/502/503/504; S3 PUT/DELETE are idempotent
# The longest object Loom writes (a ciphertext of the longest plaintext); a longer one in the
# bucket is refused while it is read, never held in memory whole.
MAX_OBJECT_BYTES = MAX_PLAINTEXT_BYTES + OVERHEAD
CHUNK_BYTES = 1 << 20
NOT_FOUND = ('NoSuchKey', 'NoSuchObject', 'ResourceNotFound')
CREDENTIAL_CODES = ('InvalidAccessKeyId', 'SignatureDoesNotMatch', 'AccessDenied',
                    'ExpiredToken', 'InvalidToken')
# The owner marker: its name is no Loom key at a folder's top (check_key refuses a leading dot),
# so nothing lists it as an archive or a blob, and `_key` refuses it deeper down.
OWNER_MARKER = '.loom-owner.json'
MAX_MARKER_BYTES = 4096            # a marker is ~200 bytes; a longer one is refused unread
OWNER_ID_FILE = 'objects.owner'    # in the storage root: the id its markers hold
OWNER_ID = re.compile(r'^[0-9a-f]{32}$')
MARKER_KIND = 'loom object store owner'
TAKEN = ('PreconditionFailed', 'ConditionalRequestConflict')   # a conditional put lost


class TooLongError(StorageError):
    """An object longer than the reader allows: refused while read, never held whole."""


class FolderClaimedError(StorageError):
    """The bucket folder (or one above it) belongs to another storage root, or holds a marker
    that is not a Loom owner marker: nothing is listed, written or deleted there."""


def root_owner_id(path: str | os.PathLike) -> str:
    """The storage root's owner id (32 random hex digits) in the 0600 file `path`, made the
    first time: written aside, then linked into place, so processes racing to make it all read
    the one that won and none reads a part."""
    path = Path(path)
    try:
        try:
            data = read_regular(path, 64)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f'{path.name}.{secrets.token_hex(8)}.part')
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                try:
                    os.write(fd, (secrets.token_hex(16) + '\n').encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                try:
                    os.link(tmp, path)
                except FileExistsError:    # another process made it first: theirs holds
                    pass
            finally:
                os.unlink(tmp)
            data = read_regular(path, 64)
    except OSError as exc:
        raise StorageError(f'{path}: cannot read or create the object store owner id: '
                           f'{exc.strerror or exc}') from None
    value = data.decode('ascii', 'replace').strip()
    if not OWNER_ID.match(value):
        raise StorageError(f'{path}: not an object store owner id (32 hex digits); remove it to '
                           'make a new one, then remove the old marker from the bucket folder')
    return value


def http_client(connect_s: float = CONNECT_TIMEOUT_S, read_s: float = READ_TIMEOUT_S,
                retries: int = RETRIES) -> urllib3.PoolManager:
    """The MinIO client's connection pool with bounded timeouts and retries."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_s, read=read_s), maxsize=10,
        cert_reqs='CERT_REQUIRED', ca_certs=os.environ.get('SSL_CERT_FILE') or certifi.where(),
        retries=urllib3.Retry(total=retries, backoff_factor=0.2,
                              status_forcelist=[500, 502, 503, 504]))


def _reason(exc: BaseException) -> str:
    """What went wrong, in a line an operator can act on."""
    if Minio is not None and isinstance(exc, S3Error):
        text = f'{exc.code}: {exc.message}'
        if exc.code in CREDENTIAL_CODES:
            text += ' (check LOOM_S3_ACCESS_KEY, LOOM_S3_SECRET_KEY and the bucket policy)'
        elif exc.code == 'NoSuchBucket':
            text += ' (create the bucket, or set storage.objects.bucket)'
        return text
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        if isinstance(exc.reason, urllib3.exceptions.ResponseError):
            return f'the S3 server keeps failing ({exc.reason})'
        return f'S3 endpoint unreachable ({exc.reason})'
    if getattr(exc, '_code', None) == 403:    # a 403 without an S3 error body
        return f'access denied ({exc}); check LOOM_S3_ACCESS_KEY and LOOM_S3_SECRET_KEY'
    return f'{type(exc).__name__}: {exc}'


class S3ObjectStore(ObjectStore):
    name = 's3'

    def __init__(self, endpoint: str, bucket: str, access_key: str = '', secret_key: str = '',
                 secure: bool = True, prefix: str = '', client=None,
                 http: urllib3.PoolManager | None = None, max_bytes: int = MAX_OBJECT_BYTES,
                 owner_file: str | os.PathLike | None = None):
        """`endpoint`: host[:port] (`secure` picks https); `prefix`: a folder in the bucket
        this store keeps to (a bucket shared by robots). `http`: the connection pool (default:
        http_client()); `max_bytes`: the longest object written or read. `owner_file`: the
        storage root's owner id file (root_owner_id): the folder is claimed for that root at
        the first request and checked at every listing (what config opens: object_store);
        None: an unclaimed view of the bucket as it is (tools, tests). Nothing is requested
        here."""
        if Minio is None:
            raise StorageError('storage.objects.endpoint is set but the minio package is not '
                               'installed (pip install -c constraints.txt minio)')
        if bool(access_key) != bool(secret_key):
            raise StorageError('S3 credentials: set both LOOM_S3_ACCESS_KEY and '
                               'LOOM_S3_SECRET_KEY, or neither (a bucket open to anonymous use)')
        try:
            check_bucket_name(bucket)
        except (TypeError, ValueError) as exc:
            raise StorageError(f'storage.objects.bucket {str(bucket)[:80]!r}: {exc}') from None
        prefix = prefix.strip('/')
        if prefix:
            try:
                check_key(prefix)
            except StorageError as exc:
                raise StorageError(f'storage.objects.prefix: {exc}') from None
        self.bucket, self.prefix, self.max_bytes = bucket, prefix, max_bytes
        # refused: 'not_a_key' (listed names someone else put there), 'oversize' (objects),
        # 'claimed' (listed objects in a folder below ours that another root claims)
        self.rejected: Counter = Counter()
        self.owner_file = Path(owner_file) if owner_file is not None else None
        self._owner = ''                  # the root's id, once read
        self._claimed = False             # the marker checked (or written) by this store
        self._claim_lock = threading.Lock()
        try:
            self.client = client or Minio(endpoint, access_key=access_key or None,
                                          secret_key=secret_key or None, secure=secure,
                                          http_client=http or http_client())
        except (TypeError, ValueError) as exc:
            raise StorageError(f'storage.objects.endpoint {str(endpoint)[:120]!r}: {exc} (give '
                               'host[:port]; storage.objects.secure picks https)') from None
        self._errors = (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError)

    def _key(self, key: str) -> str:
        key = check_key(key)
        if key.rsplit('/', 1)[-1] == OWNER_MARKER:
            raise StorageError(f'object key {key[:80]!r}: {OWNER_MARKER} is the name of a bucket '
                               "folder's owner marker, never an object; refused")
        return f'{self.prefix}/{key}' if self.prefix else key

    def _marker_name(self, folder: str) -> str:
        return f'{folder}/{OWNER_MARKER}' if folder else OWNER_MARKER

    def _folder_url(self, folder: str) -> str:
        return (f's3://{self.bucket}/{folder}/' if folder
                else f's3://{self.bucket}/ (the bucket root)')

    def _read_marker(self, folder: str) -> dict | None:
        """The owner marker of `folder` (None: there is none), read to at most
        MAX_MARKER_BYTES; one that is not a Loom marker is a FolderClaimedError."""
        name = self._marker_name(folder)
        try:
            data = self._read(name, MAX_MARKER_BYTES)
        except _Missing:
            return None
        except TooLongError:
            why = f'longer than {MAX_MARKER_BYTES} bytes'
        else:
            why = ''
            try:
                marker = json.loads(data.decode('utf-8'))
            except (UnicodeDecodeError, ValueError):
                why = 'not JSON'
            else:
                if (not isinstance(marker, dict) or marker.get('kind') != MARKER_KIND
                        or not isinstance(marker.get('owner'), str)
                        or not OWNER_ID.match(marker['owner'])):
                    why = f'not a {{"kind": "{MARKER_KIND}", "owner": <32 hex digits>}} object'
                else:
                    return marker
        raise FolderClaimedError(
            f's3://{self.bucket}/{name}: not a Loom owner marker ({why}); whose folder this is '
            'is unknown, so nothing is done there: if no other robot uses this folder, remove '
            'the marker (the next start claims the folder again)')

    def _refuse(self, folder: str, marker: dict, above: bool) -> FolderClaimedError:
        def shown(field: str) -> str:
            value = marker.get(field)
            return repr(value[:80]) if isinstance(value, str) else '?'
        where = self._folder_url(self.prefix)
        if above:
            where += f' is inside {self._folder_url(folder)}:'
        else:
            where += ':'
        return FolderClaimedError(
            f'{where} another storage root uses this bucket folder (owner '
            f"{marker['owner'][:12]}, host {shown('host')}, root {shown('root')}; this root's "
            f'id is in {self.owner_file}); give each robot its own storage.objects.prefix, '
            "none inside another robot's")

    def _claim(self) -> None:
        """Make sure this root owns the folder: the first time, that no folder above it is
        claimed by another root; every time, that its own marker holds this root's id,
        writing the marker when there is none (put only if absent, then read back). Raises
        before anything is listed, written or deleted for the caller."""
        if self.owner_file is None:
            return
        with self._claim_lock:
            if not self._owner:
                self._owner = root_owner_id(self.owner_file)
            if not self._claimed and self.prefix:
                parts = self.prefix.split('/')
                for depth in range(len(parts)):
                    above = '/'.join(parts[:depth])
                    marker = self._read_marker(above)
                    if marker is not None and marker['owner'] != self._owner:
                        raise self._refuse(above, marker, True)
            marker = self._read_marker(self.prefix)
            if marker is None:
                self._write_marker()
                marker = self._read_marker(self.prefix)
                if marker is None:
                    raise StorageError(f's3://{self.bucket}/{self._marker_name(self.prefix)}: '
                                       'written, then not found; the store does not keep what '
                                       'it is given')
            if marker['owner'] != self._owner:
                raise self._refuse(self.prefix, marker, False)
            self._claimed = True

    def _write_marker(self) -> None:
        """The marker, only if there is none (If-None-Match: *, so of two roots claiming at
        once one wins; a store without conditional writes replaces, and the read back after it
        and the check at every listing tell the loser)."""
        name = self._marker_name(self.prefix)
        data = json.dumps({'kind': MARKER_KIND, 'owner': self._owner,
                           'host': socket.gethostname()[:64],
                           'root': str(self.owner_file.parent)[:200]}).encode()
        headers = {'Content-Type': 'application/json', 'If-None-Match': '*'}
        try:
            try:
                # the public put_object sends no condition header (it makes any unknown header
                # user metadata); minio pinned in constraints.txt
                self.client._put_object(self.bucket, name, data, headers=headers)
            except S3Error as exc:
                if exc.code in TAKEN:
                    return                       # someone wrote one first: the caller reads it
                if exc.code != 'NotImplemented':
                    raise
                self.client.put_object(self.bucket, name, io.BytesIO(data), len(data),
                                       content_type='application/json')
        except self._errors as exc:
            raise self._fail('write', name, exc) from None

    def _fail(self, what: str, name: str, exc: BaseException) -> StorageError:
        return StorageError(f's3://{self.bucket}/{name}: cannot {what}: {_reason(exc)}')

    def _oversize(self, name: str, size: int, limit: int | None = None) -> StorageError:
        self.rejected['oversize'] += 1
        return TooLongError(f's3://{self.bucket}/{name}: {size} bytes or more, longer than '
                            f'{self.max_bytes if limit is None else limit}; refused')

    def put(self, key: str, data: bytes) -> None:
        name = self._key(key)
        if len(data) > self.max_bytes:
            raise self._oversize(name, len(data))
        if not self._claimed:
            self._claim()
        try:
            self.client.put_object(self.bucket, name, io.BytesIO(data), len(data))
        except self._errors as exc:
            raise self._fail('write', name, exc) from None

    def get(self, key: str) -> bytes:
        name = self._key(key)
        if not self._claimed:
            self._claim()
        try:
            return self._read(name, self.max_bytes)
        except _Missing as exc:
            raise self._fail('read', name, exc.cause) from None

    def _read(self, name: str, limit: int) -> bytes:
        """The object `name`, refused past `limit` bytes while read (never held whole);
        _Missing when there is no such object."""
        try:
            response = self.client.get_object(self.bucket, name)
            try:
                length = int(response.headers.get('content-length') or 0)
                if length > limit:
                    raise self._oversize(name, length, limit)
                chunks, total = [], 0
                # in bounded chunks (a server may send more than it announced); a body cut
                # short raises (urllib3 checks its length)
                for chunk in response.stream(min(CHUNK_BYTES, limit + 1)):
                    total += len(chunk)
                    if total > limit:
                        raise self._oversize(name, total, limit)
                    chunks.append(chunk)
                return b''.join(chunks)
            finally:
                response.close()
                response.release_conn()
        except S3Error as exc:
            if exc.code in NOT_FOUND:
                raise _Missing(exc) from None
            raise self._fail('read', name, exc) from None
        except self._errors as exc:
            raise self._fail('read', name, exc) from None

    def delete(self, key: str) -> None:
        name = self._key(key)
        if not self._claimed:
            self._claim()
        try:
            self.client.remove_object(self.bucket, name)
        except self._errors as exc:
            raise self._fail('delete', name, exc) from None

    def size(self, key: str) -> int:
        """Bytes of an object, without reading it (so a reader can bound it first)."""
        name = self._key(key)
        if not self._claimed:
            self._claim()
        try:
            return int(self.client.stat_object(self.bucket, name).size or 0)
        except self._errors as exc:
            raise self._fail('read', name, exc) from None

    def exists(self, key: str) -> bool:
        """False only for a missing object: a HEAD on a missing bucket also answers 404, so a
        miss is checked against the bucket (a missing bucket is an error, not an absence)."""
        name = self._key(key)
        if not self._claimed:
            self._claim()
        try:
            self.client.stat_object(self.bucket, name)
            return True
        except S3Error as exc:
            if exc.code not in NOT_FOUND:
                raise self._fail('read', name, exc) from None
        except self._errors as exc:
            raise self._fail('read', name, exc) from None
        try:
            found = self.client.bucket_exists(self.bucket)
        except self._errors as exc:
            raise self._fail('read', name, exc) from None
        if not found:
            raise StorageError(f's3://{self.bucket}/{name}: cannot read: NoSuchBucket: the '
                               'bucket does not exist (create the bucket, or set '
                               'storage.objects.bucket)')
        return False

    def list(self, prefix: str = '') -> list[tuple[str, int]]:
        """Every object in the folder `prefix` (as the local store: `a/b` and `a/b/` are the
        same folder). Names that are not Loom keys (put there by someone else) are skipped and
        counted in `rejected`, so one stray object never stops a lifecycle's recovery. Owner
        markers are never listed, nor anything in a folder below ours that another store
        claims (counted: 'claimed'); a claimed store checks its own marker after every listing
        (callers delete what they list and do not know), so a lost claim lists nothing."""
        if prefix == '':
            sub, full = '', self.prefix + '/' if self.prefix else ''
        else:
            sub = prefix[:-1] if isinstance(prefix, str) and prefix.endswith('/') else prefix
            full = self._key(sub) + '/'
        cut = len(self.prefix) + 1 if self.prefix else 0
        found = []
        try:
            for obj in self.client.list_objects(self.bucket, prefix=full, recursive=True):
                found.append((obj.object_name or '', bool(obj.is_dir), int(obj.size or 0)))
            # a folder between ours and the listed one that a store claims: none of it is ours
            parts = sub.split('/') if sub else []
            between = [self._marker_name('/'.join(filter(None, [self.prefix, *parts[:depth]])))
                       for depth in range(1, len(parts))]
            inside_claim = any(self._present(name) for name in between)
        except self._errors as exc:
            raise self._fail('list', full, exc) from None
        self._claim()
        if inside_claim:
            self.rejected['claimed'] += len(found)
            return []
        own = self._marker_name(self.prefix)
        claimed = tuple(name[:-len(OWNER_MARKER)] for name, _, _ in found
                        if name.endswith('/' + OWNER_MARKER) and name != own)
        out = []
        for name, is_dir, size in found:
            if name == own:
                continue
            if claimed and name.startswith(claimed):
                self.rejected['claimed'] += 1
                continue
            try:
                if is_dir or not name.startswith(full):
                    raise StorageError(name)
                out.append((check_key(name[cut:]), size))
            except StorageError:
                self.rejected['not_a_key'] += 1
        return sorted(out)

    def _present(self, name: str) -> bool:
        """Whether object `name` exists (a HEAD); other failures raise."""
        try:
            self.client.stat_object(self.bucket, name)
            return True
        except S3Error as exc:
            if exc.code in NOT_FOUND:
                return False
            raise


class _Missing(Exception):
    """_read's answer for an object that is not there (its S3Error in `cause`)."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause
