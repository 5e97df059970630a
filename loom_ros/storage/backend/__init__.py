"""Object-store backends: the local folder (default) and S3-compatible stores."""
from __future__ import annotations

from loom_ros.storage.base import ObjectStore
from loom_ros.storage.errors import StorageError


def object_store(local_root, endpoint: str = '', bucket: str = '', access_key: str = '',
                 secret_key: str = '', secure: bool = True, prefix: str = '') -> ObjectStore:
    """The local folder store unless an S3 endpoint is configured."""
    if not endpoint:
        from loom_ros.storage.backend.local import LocalObjectStore
        return LocalObjectStore(local_root)
    if not bucket:
        raise StorageError('storage.objects.endpoint is set but storage.objects.bucket is empty')
    from loom_ros.storage.backend.s3 import S3ObjectStore
    return S3ObjectStore(endpoint, bucket, access_key, secret_key, secure=secure, prefix=prefix)
