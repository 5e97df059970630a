"""Objects as files under one folder: written to a temporary name, fsynced, then renamed, so an
object is either whole or absent, even after SIGKILL or a power cut.

Nothing is followed out of the folder through a link: every folder between the root and an
object must be a real folder (not a symbolic link), listing never descends into a link nor
lists one, and reading opens the object itself without following a link. What was refused is
counted (`refused`), so a link planted under the folder can make the lifecycle's recovery,
retention or budgets neither read nor delete a file elsewhere."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from loom_ros.security.keyring import MAX_PLAINTEXT_BYTES, OVERHEAD
from loom_ros.storage.base import ObjectStore, check_key
from loom_ros.storage.durable import TooLargeError, read_regular, write_atomic
from loom_ros.storage.errors import StorageError, StorageFullError, is_full

TMP_SUFFIX = '.part'
MAX_OBJECT_BYTES = MAX_PLAINTEXT_BYTES + OVERHEAD   # as the S3 store: longer is not read


class LinkRefusedError(StorageError):
    """A symbolic link (or something else that is not a plain folder) between the object root
    and an object: not followed, nothing read or deleted through it."""


class LocalObjectStore(ObjectStore):
    name = 'local'

    def __init__(self, root: str | os.PathLike, max_bytes: int = MAX_OBJECT_BYTES):
        self.root, self.max_bytes = Path(root), int(max_bytes)
        self.refused = 0   # links (and entries resolving outside the root) not followed

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _check_folders(self, key: str) -> Path:
        """The path of `key`, once every folder between the root and it is a real folder (or
        absent: put creates it): a link there would lead out of the root."""
        path = self._path(key)
        folder = self.root
        for part in key.split('/')[:-1]:
            folder = folder / part
            try:
                mode = os.lstat(folder).st_mode
            except FileNotFoundError:
                break
            except OSError as exc:
                raise StorageError(f'{folder}: cannot read: {exc.strerror}') from None
            if not stat.S_ISDIR(mode):
                self.refused += 1
                what = 'a symbolic link' if stat.S_ISLNK(mode) else 'not a folder'
                raise LinkRefusedError(f'{folder}: {what} under the object root {self.root}; '
                                       'not followed (remove it)')
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._check_folders(key)
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
        path = self._check_folders(key)
        try:
            return read_regular(path, self.max_bytes)
        except TooLargeError:
            raise StorageError(f'{path}: more than {self.max_bytes} bytes, longer than any '
                               'object Loom writes; not read') from None
        except OSError as exc:   # a link planted under the folder is not followed
            raise StorageError(f'{path}: cannot read: {exc.strerror or exc}') from None

    def delete(self, key: str) -> None:
        """Remove the object; a link at its name is removed itself (never what it points to),
        a link in a folder above it is refused (LinkRefusedError)."""
        path = self._check_folders(key)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f'{path}: cannot delete: {exc.strerror}') from None

    def size(self, key: str) -> int:
        """Bytes of an object, without reading it (so a reader can bound it first)."""
        path = self._check_folders(key)
        try:
            info = os.lstat(path)
        except OSError as exc:
            raise StorageError(f'{path}: cannot read: {exc.strerror}') from None
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f'{path}: not a plain file; not read')
        return info.st_size

    def exists(self, key: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self._check_folders(key)).st_mode)
        except (StorageError, OSError):   # a link above it (refused) or nothing there
            return False

    def list(self, prefix: str = '') -> list[tuple[str, int]]:
        """(key, bytes) of the plain files under `prefix`. Links are neither listed nor
        descended into (nor is a prefix reached through one): each is counted in `refused`."""
        base = self.root
        for part in (prefix.strip('/').split('/') if prefix.strip('/') else []):
            base = base / part
            try:
                mode = os.lstat(base).st_mode
            except OSError:
                return []
            if stat.S_ISLNK(mode):
                self.refused += 1
                return []
            if not stat.S_ISDIR(mode):
                return []
        if base == self.root:
            try:
                if not stat.S_ISDIR(os.stat(base).st_mode):   # the root itself may be a link
                    return []
            except OSError:
                return []
        out = []
        for dirpath, dirs, files in os.walk(base, followlinks=False):
            folder = Path(dirpath)
            for name in list(dirs):
                try:
                    mode = os.lstat(folder / name).st_mode
                except OSError:
                    dirs.remove(name)
                    continue
                if not stat.S_ISDIR(mode):   # a link to a folder: never walked into
                    self.refused += 1
                    dirs.remove(name)
            for name in files:
                if name.endswith(TMP_SUFFIX):
                    continue
                full = folder / name
                try:
                    info = os.lstat(full)
                except OSError:
                    continue
                if stat.S_ISLNK(info.st_mode):
                    self.refused += 1
                    continue
                if not stat.S_ISREG(info.st_mode):
                    continue
                out.append((full.relative_to(self.root).as_posix(), info.st_size))
        return sorted(out)
