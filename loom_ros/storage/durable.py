"""Replace a file so that a crash leaves either the old or the new one, never a torn one:
write a temporary file next to it, fsync it, rename it over the path, fsync the folder. The one
copy of that sequence for the object store's blobs and archives and the keyring's master key.
read_regular is its reading side: one plain file, bounded, never through a link."""
from __future__ import annotations

import os
import stat
from pathlib import Path


class NotRegularError(OSError):
    """read_regular's refusal: a link, a folder, a device or a FIFO (nothing was read)."""


class TooLargeError(OSError):
    """read_regular's refusal: more bytes than the caller allows (nothing was read)."""


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the plain file at `path`, at most `max_bytes`. The name is opened without
    following a link (O_NOFOLLOW) and without blocking on a FIFO, then the open file itself is
    checked (fstat: a regular file, its size), so nothing swapped in after a check is read;
    `read` is asked for the size found, never the limit (it reserves what it is asked for). A
    file that changed length while it was read is an OSError too."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularError(f'{path}: not a plain file')
        if info.st_size > max_bytes:
            raise TooLargeError(f'{path}: {info.st_size} bytes, more than {max_bytes}')
        with os.fdopen(fd, 'rb', closefd=False) as stream:
            data = stream.read(info.st_size + 1)
    finally:
        os.close(fd)
    if len(data) != info.st_size:
        raise OSError(f'{path}: {len(data)} bytes read, {info.st_size} when opened: it changed '
                      'while it was read')
    return data


def write_atomic(path: Path, data: bytes, tmp: Path, *, mode: int = 0o600,
                 exclusive: bool = False, dir_mode: int = 0o777) -> None:
    """Write `data` to `path` through `tmp` (same folder). `exclusive`: refuse a `tmp` that
    exists (someone else mid-write, or a leftover to look at) instead of truncating it. OSError
    as the system said it; the temporary file is removed on the way out."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        fd = os.open(tmp, flags, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
