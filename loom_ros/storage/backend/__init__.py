"""Object-store backends: the local folder (default) and S3-compatible stores, optionally
encrypted (encrypted.py). ObjectSettings is the one description of which one a process uses
(storage.objects.* in config/loom.yaml's `/**` section, S3 keys from the environment), so every
process under a root (storage node, agent hosts, `loom forget`) writes and erases the same
store."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loom_ros.storage.base import ObjectStore
from loom_ros.storage.errors import StorageError

ACCESS_KEY_ENV = 'LOOM_S3_ACCESS_KEY'
SECRET_KEY_ENV = 'LOOM_S3_SECRET_KEY'
PARAMETER_PREFIX = 'storage.objects.'


@dataclass(frozen=True)
class ObjectSettings:
    """Where blobs and archive files go: `endpoint` '' is the local folder under the root;
    else an S3-compatible bucket (`prefix`: a folder in it, for robots sharing one bucket).
    The keys never come from parameters (files that are shared and logged), only from the
    environment (from_params)."""

    endpoint: str = ''
    bucket: str = ''
    prefix: str = ''
    secure: bool = True
    access_key: str = field(default='', repr=False)
    secret_key: str = field(default='', repr=False)

    @classmethod
    def from_params(cls, params: Mapping, env: Mapping) -> 'ObjectSettings':
        """From flat `storage.objects.*` parameters (missing ones: the defaults above) and
        LOOM_S3_ACCESS_KEY / LOOM_S3_SECRET_KEY from `env`."""
        def text(name: str) -> str:
            value = params.get(PARAMETER_PREFIX + name, '')
            if not isinstance(value, str):
                raise StorageError(f'{PARAMETER_PREFIX}{name}: must be a string, got '
                                   f'{str(value)[:80]!r}')
            return value
        secure = params.get(PARAMETER_PREFIX + 'secure', True)
        if not isinstance(secure, bool):
            raise StorageError(f'{PARAMETER_PREFIX}secure: must be true or false, got '
                               f'{str(secure)[:80]!r}')
        return cls(text('endpoint'), text('bucket'), text('prefix'), secure,
                   env.get(ACCESS_KEY_ENV, ''), env.get(SECRET_KEY_ENV, ''))

    @property
    def is_local(self) -> bool:
        return not self.endpoint

    def open(self, local_root, keyring=None) -> ObjectStore:
        """The store these settings name (`local_root`: the root's objects/ folder; an S3
        folder is claimed for the root above it: object_store)."""
        return object_store(local_root, self.endpoint, self.bucket, self.access_key,
                            self.secret_key, self.secure, self.prefix, keyring=keyring)


def object_store(local_root, endpoint: str = '', bucket: str = '', access_key: str = '',
                 secret_key: str = '', secure: bool = True, prefix: str = '',
                 keyring=None) -> ObjectStore:
    """The local folder store unless an S3 endpoint is configured; encrypting through `keyring`
    (security/keyring.py) when one is given (storage.encryption.enabled). An S3 store claims
    its bucket folder for the storage root (`local_root`'s parent, whose owner id file it
    keeps), so two roots never share one folder and delete each other's archives."""
    if not endpoint:
        from loom_ros.storage.backend.local import LocalObjectStore
        store = LocalObjectStore(local_root)
    elif not bucket:
        raise StorageError('storage.objects.endpoint is set but storage.objects.bucket is empty')
    else:
        from loom_ros.storage.backend.s3 import OWNER_ID_FILE, S3ObjectStore
        store = S3ObjectStore(endpoint, bucket, access_key, secret_key, secure=secure,
                              prefix=prefix, owner_file=Path(local_root).parent / OWNER_ID_FILE)
    if keyring is None:
        return store
    from loom_ros.storage.backend.encrypted import EncryptedObjectStore
    return EncryptedObjectStore(store, keyring)
