"""Object-store backends: the local folder (default) and S3-compatible stores, optionally
encrypted (encrypted.py)."""
from __future__ import annotations

from loom_ros.storage.base import ObjectStore
from loom_ros.storage.errors import StorageError


def object_store(local_root, endpoint: str = '', bucket: str = '', access_key: str = '',
                 secret_key: str = '', secure: bool = True, prefix: str = '',
                 keyring=None) -> ObjectStore:
    """The local folder store unless an S3 endpoint is configured; encrypting through `keyring`
    (security/keyring.py) when one is given (storage.encryption.enabled)."""
    if not endpoint:
        from loom_ros.storage.backend.local import LocalObjectStore
        store = LocalObjectStore(local_root)
    elif not bucket:
        raise StorageError('storage.objects.endpoint is set but storage.objects.bucket is empty')
    else:
        from loom_ros.storage.backend.s3 import S3ObjectStore
        store = S3ObjectStore(endpoint, bucket, access_key, secret_key, secure=secure,
                              prefix=prefix)
    if keyring is None:
        return store
    from loom_ros.storage.backend.encrypted import EncryptedObjectStore
    return EncryptedObjectStore(store, keyring)
