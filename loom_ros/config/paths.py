"""Paths from configuration checked at configure, so an unusable one (missing parent that cannot
be made, not a folder, read-only, full) refuses the node's configure with the parameter and the
path, instead of a node that starts and fails later or says nothing useful."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from loom_ros.config.params import ConfigError

# Written and synced once per check: enough for SQLite's first pages, so a full disk shows here.
PROBE_BYTES = 8192
PROBE_NAME = '.loom_write_probe'


def usable_dir(path: str | os.PathLike, key: str) -> Path:
    """`path` ('~' expanded) as a folder Loom can write to, made if missing; ConfigError naming
    `key` (the parameter) and the path says why not."""
    folder = Path(os.path.expanduser(str(path)))
    shown = str(folder)[:300]
    if not str(path):
        raise ConfigError(f'{key}: empty path')
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f'{key} {shown}: not a folder (a file is in the way)') from None
    except OSError as exc:
        raise ConfigError(f'{key} {shown}: cannot create the folder: {exc.strerror}') from None
    if not folder.is_dir():
        raise ConfigError(f'{key} {shown}: not a folder')
    probe = folder / PROBE_NAME
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if os.write(fd, b'\0' * PROBE_BYTES) < PROBE_BYTES:   # the last free blocks
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        why = {errno.ENOSPC: 'the disk is full', errno.EROFS: 'read-only file system',
               errno.EACCES: 'not writable', errno.EDQUOT: 'disk quota exceeded'}.get(
            exc.errno, exc.strerror)
        raise ConfigError(f'{key} {shown}: cannot write there ({why})') from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return folder


def usable_file(path: str | os.PathLike, key: str) -> Path:
    """A file Loom writes (an SQLite database, a JSON-lines log): its folder is usable_dir and
    the file, if it exists, is a regular file it can open for writing."""
    target = Path(os.path.expanduser(str(path)))
    if not str(path):
        raise ConfigError(f'{key}: empty path')
    usable_dir(target.parent, f'{key} (its folder)')
    if target.exists():
        if not target.is_file():
            raise ConfigError(f'{key} {str(target)[:300]}: not a regular file')
        try:
            with open(target, 'ab'):
                pass
        except OSError as exc:
            raise ConfigError(f'{key} {str(target)[:300]}: cannot open for writing: '
                              f'{exc.strerror}') from None
    return target
