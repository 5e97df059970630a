"""Objects in any S3-compatible store (AWS S3, MinIO, Ceph, Garage...) through the MinIO client
(pinned in constraints.txt). S3 puts are atomic per object. Not exercised against a live store in
this repository's tests (no network where they run): see docs/storage.md."""
from __future__ import annotations

import io

from loom_ros.storage.base import ObjectStore, check_key
from loom_ros.storage.errors import StorageError


class S3ObjectStore(ObjectStore):
    name = 's3'

    def __init__(self, endpoint: str, bucket: str, access_key: str = '', secret_key: str = '',
                 secure: bool = True, prefix: str = '', client=None):
        try:
            from minio import Minio
        except ImportError:
            raise StorageError('storage.objects.endpoint is set but the minio package is not '
                               'installed (pip install -c constraints.txt minio)') from None
        self.bucket, self.prefix = bucket, prefix.strip('/')
        self.client = client or Minio(endpoint, access_key=access_key or None,
                                      secret_key=secret_key or None, secure=secure)
        self._error = self._errors()

    @staticmethod
    def _errors():
        from minio.error import MinioException
        return (MinioException, OSError)

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f'{self.prefix}/{key}' if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data))
        except self._error as exc:
            raise StorageError(f's3://{self.bucket}/{self._key(key)}: cannot write: {exc}') from None

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(self.bucket, self._key(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        except self._error as exc:
            raise StorageError(f's3://{self.bucket}/{self._key(key)}: cannot read: {exc}') from None

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, self._key(key))
        except self._error as exc:
            raise StorageError(f's3://{self.bucket}/{self._key(key)}: cannot delete: {exc}') from None

    def size(self, key: str) -> int:
        """Bytes of an object, without reading it (so a reader can bound it first)."""
        try:
            return int(self.client.stat_object(self.bucket, self._key(key)).size or 0)
        except self._error as exc:
            raise StorageError(f's3://{self.bucket}/{self._key(key)}: cannot read: {exc}') from None

    def exists(self, key: str) -> bool:
        from minio.error import S3Error
        try:
            self.client.stat_object(self.bucket, self._key(key))
            return True
        except S3Error as exc:
            if exc.code in ('NoSuchKey', 'NoSuchObject', 'ResourceNotFound'):
                return False
            raise StorageError(f's3://{self.bucket}/{self._key(key)}: {exc}') from None

    def list(self, prefix: str = '') -> list[tuple[str, int]]:
        full = self._key(prefix) if prefix else (self.prefix + '/' if self.prefix else '')
        cut = len(self.prefix) + 1 if self.prefix else 0
        try:
            return sorted((o.object_name[cut:], int(o.size or 0)) for o in
                          self.client.list_objects(self.bucket, prefix=full, recursive=True))
        except self._error as exc:
            raise StorageError(f's3://{self.bucket}/{full}: cannot list: {exc}') from None
