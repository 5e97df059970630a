"""Objects in any S3-compatible store (AWS S3, MinIO, Ceph, Garage...) through the MinIO client
(pinned in constraints.txt). S3 puts are atomic per object. Every failure of the store (refused
credentials, missing bucket, server down, timeout, cut connection) is a StorageError naming the
object and the reason, so the lifecycle leaves its move undone and retries it at a later round.
Tested against a live S3 server (moto's, test/storage/test_s3_backend.py)."""
from __future__ import annotations

import io
import os
from collections import Counter

import certifi
import urllib3

from loom_ros.security.keyring import MAX_PLAINTEXT_BYTES, OVERHEAD
from loom_ros.storage.base import ObjectStore, check_key
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
                 http: urllib3.PoolManager | None = None, max_bytes: int = MAX_OBJECT_BYTES):
        """`endpoint`: host[:port] (`secure` picks https); `prefix`: a folder in the bucket
        this store keeps to (a bucket shared by robots). `http`: the connection pool (default:
        http_client()); `max_bytes`: the longest object written or read."""
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
        # refused: 'not_a_key' (listed names someone else put there), 'oversize' (objects)
        self.rejected: Counter = Counter()
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
        return f'{self.prefix}/{key}' if self.prefix else key

    def _fail(self, what: str, name: str, exc: BaseException) -> StorageError:
        return StorageError(f's3://{self.bucket}/{name}: cannot {what}: {_reason(exc)}')

    def _oversize(self, name: str, size: int) -> StorageError:
        self.rejected['oversize'] += 1
        return StorageError(f's3://{self.bucket}/{name}: {size} bytes or more, longer than '
                            f'{self.max_bytes}; refused')

    def put(self, key: str, data: bytes) -> None:
        name = self._key(key)
        if len(data) > self.max_bytes:
            raise self._oversize(name, len(data))
        try:
            self.client.put_object(self.bucket, name, io.BytesIO(data), len(data))
        except self._errors as exc:
            raise self._fail('write', name, exc) from None

    def get(self, key: str) -> bytes:
        name = self._key(key)
        try:
            response = self.client.get_object(self.bucket, name)
            try:
                length = int(response.headers.get('content-length') or 0)
                if length > self.max_bytes:
                    raise self._oversize(name, length)
                chunks, total = [], 0
                # in bounded chunks (a server may send more than it announced); a body cut
                # short raises (urllib3 checks its length)
                for chunk in response.stream(CHUNK_BYTES):
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise self._oversize(name, total)
                    chunks.append(chunk)
                return b''.join(chunks)
            finally:
                response.close()
                response.release_conn()
        except self._errors as exc:
            raise self._fail('read', name, exc) from None

    def delete(self, key: str) -> None:
        name = self._key(key)
        try:
            self.client.remove_object(self.bucket, name)
        except self._errors as exc:
            raise self._fail('delete', name, exc) from None

    def size(self, key: str) -> int:
        """Bytes of an object, without reading it (so a reader can bound it first)."""
        name = self._key(key)
        try:
            return int(self.client.stat_object(self.bucket, name).size or 0)
        except self._errors as exc:
            raise self._fail('read', name, exc) from None

    def exists(self, key: str) -> bool:
        """False only for a missing object: a HEAD on a missing bucket also answers 404, so a
        miss is checked against the bucket (a missing bucket is an error, not an absence)."""
        name = self._key(key)
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
        counted in `rejected`, so one stray object never stops a lifecycle's recovery."""
        if prefix == '':
            full = self.prefix + '/' if self.prefix else ''
        else:
            full = self._key(prefix[:-1] if isinstance(prefix, str) and prefix.endswith('/')
                             else prefix) + '/'
        cut = len(self.prefix) + 1 if self.prefix else 0
        out = []
        try:
            for obj in self.client.list_objects(self.bucket, prefix=full, recursive=True):
                name = obj.object_name or ''
                try:
                    if obj.is_dir or not name.startswith(full):
                        raise StorageError(name)
                    out.append((check_key(name[cut:]), int(obj.size or 0)))
                except StorageError:
                    self.rejected['not_a_key'] += 1
        except self._errors as exc:
            raise self._fail('list', full, exc) from None
        return sorted(out)
