"""An object store that encrypts: every object (blob, archive file) is sealed with AES-256-GCM
under its data subject's key, or for anonymous data under the key of its UTC day
(security/keyring.py), before it reaches the store underneath (local folder or S3). The object
key is bound into the associated data, so a ciphertext copied or renamed to another key, a
changed header or a changed byte is refused, never returned. Reading never falls back to
plaintext: an object without the header is an error."""
from __future__ import annotations

from loom_ros.security.keyring import MAX_PLAINTEXT_BYTES, OVERHEAD, DecryptError, Keyring
from loom_ros.storage.base import ObjectStore, check_key
from loom_ros.storage.errors import StorageError

_CONTEXT = b'loom object v1\x00'


class EncryptedObjectStore(ObjectStore):
    """put/get through `keyring`; delete, exists and list as the inner store (sizes are those
    of the ciphertexts, which budgets count)."""

    def __init__(self, inner: ObjectStore, keyring: Keyring):
        self.inner, self.keyring = inner, keyring
        self.name = f'encrypted {inner.name}'

    @staticmethod
    def context(key: str) -> bytes:
        return _CONTEXT + check_key(key).encode()

    def put(self, key: str, data: bytes, subject: str | None = None,
            time_ms: int | None = None) -> None:
        """Store `data` encrypted under `subject`'s key, or (no subject) the key of the UTC day
        of `time_ms` (default: now)."""
        if len(data) > MAX_PLAINTEXT_BYTES:
            raise StorageError(f'object {key[:80]!r}: {len(data)} bytes, more than '
                               f'{MAX_PLAINTEXT_BYTES}')
        self.inner.put(key, self.keyring.encrypt(data, self.context(key), subject, time_ms))

    def get(self, key: str) -> bytes:
        size = getattr(self.inner, 'size', None)
        if size is not None and size(key) > MAX_PLAINTEXT_BYTES + OVERHEAD:
            self.keyring.rejected['oversize'] += 1
            raise DecryptError(f'object {key}: {size(key)} bytes, longer than any ciphertext '
                               'Loom writes; not read')
        blob = self.inner.get(key)
        try:
            return self.keyring.decrypt(blob, self.context(key))
        except DecryptError as exc:
            raise type(exc)(f'object {key}: {exc}') from None

    def key_id(self, key: str) -> str:
        """The hex id of the data key an object is under ('' when it has no valid header)."""
        found = self.keyring.key_id_of(self.inner.get(key))
        return found.hex() if found else ''

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = '') -> list[tuple[str, int]]:
        return self.inner.list(prefix)
