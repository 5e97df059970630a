"""Replace a file so that a crash leaves either the old or the new one, never a torn one:
write a temporary file next to it, fsync it, rename it over the path, fsync the folder. The one
copy of that sequence for the object store's blobs and archives and the keyring's master key."""
from __future__ import annotations

import os
from pathlib import Path


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
