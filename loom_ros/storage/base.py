"""The object-store interface blobs and archive files go through: a local folder by default
(backend/local.py), any S3-compatible store when configured (backend/s3.py)."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod

from loom_ros.storage.errors import StorageError

MAX_KEY_CHARS = 512
_KEY = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.=/:@+-]*$')   # : @ +: data subject ids


def check_key(key: str) -> str:
    """Object keys are relative paths of safe characters: no `..`, no leading `/`."""
    if (not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or not _KEY.match(key)
            or any(part in ('', '.', '..') for part in key.split('/'))):
        raise StorageError(f'object key {str(key)[:80]!r}: use letters, digits, _ . = : @ + - '
                           f'and / (no empty, . or .. parts), at most {MAX_KEY_CHARS} '
                           'characters')
    return key


class ObjectStore(ABC):
    """Whole objects by key. put is durable and atomic when it returns (a reader sees the old
    object or the new one, never a part)."""

    name = 'objects'

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; no error if it is not there."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = '') -> list[tuple[str, int]]:
        """(key, bytes) of every object under `prefix`, sorted by key."""

    def bytes_used(self, prefix: str = '') -> int:
        return sum(size for _, size in self.list(prefix))
