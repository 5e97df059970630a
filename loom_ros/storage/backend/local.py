"""Objects as files under one folder: written to a temporary name, fsynced, then renamed, so an
object is either whole or absent, even after SIGKILL or a power cut."""
from __future__ import annotations

import os
from pathlib import Path

from loom_ros.security.keyring import MAX_PLAINTEXT_BYTES, OVERHEAD
from loom_ros.storage.base import ObjectStore, check_key
from loom_ros.storage.durable import TooLargeError, read_regular, write_atomic
from loom_ros.storage.errors import StorageError, StorageFullError, is_full

TMP_SUFFIX = '.part'
MAX_OBJECT_BYTES = MAX_PLAINTEXT_BYTES + OVERHEAD   # as the S3 store: longer is not read


class LocalObjectStore(ObjectStore):
    name = 'local'

    def __init__(self, root: str | os.PathLike, max_bytes: int = MAX_OBJECT_BYTES):
        self.root, self.max_bytes = Path(root), int(max_bytes)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            write_atomic(path, data, tmp)
        except OSError as exc:
            if is_full(exc):
                raise StorageFullError(f'{path}: disk full ({exc.strerror})') from None
            raise StorageError(f'{path}: cannot write: {exc.strerror}') from None

    def get(self, key: str) -> bytes:
        """The object's bytes, read to at most max_bytes: a file grown past that under the
        folder (by anyone) is refused, not read into memory, and a link is not followed."""
        path = self._path(key)
        try:
            return read_regular(path, self.max_bytes)
        except TooLargeError:
            raise StorageError(f'{path}: more than {self.max_bytes} bytes, longer than any '
                               'object Loom writes; not read') from None
        except OSError as exc:   # a link planted under the folder is not followed
            raise StorageError(f'{path}: cannot read: {exc.strerror or exc}') from None

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f'{self._path(key)}: cannot delete: {exc.strerror}') from None

    def size(self, key: str) -> int:
        """Bytes of an object, without reading it (so a reader can bound it first)."""
        try:
            return self._path(key).stat().st_size
        except OSError as exc:
            raise StorageError(f'{self._path(key)}: cannot read: {exc.strerror}') from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = '') -> list[tuple[str, int]]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.endswith(TMP_SUFFIX):
                    continue
                full = Path(dirpath) / name
                try:
                    out.append((full.relative_to(self.root).as_posix(), full.stat().st_size))
                except OSError:
                    continue
        return sorted(out)
