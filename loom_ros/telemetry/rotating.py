"""An append-only text file with a size cap, shared by several processes: past `max_bytes` it is
renamed to `<path>.1` (older ones shift to `.2` ... `.<keep>`, the last is deleted) and a new one
begins. Trace spans and JSON log lines grew without bound (10 MB in a 30 s demo), on a robot whose
disk is small; this keeps them to about (keep + 1) x max_bytes.

Several processes append to one file (every node of the demo writes the same trace file): the
rotation is done under an flock by whoever sees the file full first, and every writer reopens the
path when the file it holds is no longer the one at the path (its inode changed).
"""
from __future__ import annotations

import fcntl
import os
import threading


class RotatingAppender:
    def __init__(self, path: str, max_bytes: int = 0, keep: int = 2):
        if max_bytes < 0 or keep < 0:
            raise ValueError('max_bytes and keep must be >= 0')
        self.path = os.path.abspath(path)
        self.max_bytes = int(max_bytes)   # 0: no cap
        self.keep = int(keep)             # rotated files kept (0: a full file is just emptied)
        self.rotations = 0
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._stream = self._open()

    def _open(self):
        return open(self.path, 'a', encoding='utf-8', buffering=1)

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def write(self, text: str) -> None:
        with self._lock:
            if self._stream.closed:
                raise ValueError(f'{self.path}: closed')
            if self.max_bytes:
                self._follow()
                if os.fstat(self._stream.fileno()).st_size + len(text) > self.max_bytes:
                    self._rotate()
            self._stream.write(text)

    def flush(self) -> None:
        with self._lock:
            if not self._stream.closed:
                self._stream.flush()

    def close(self) -> None:
        with self._lock:
            self._stream.close()

    def _follow(self) -> None:
        """Reopen the path when another process rotated the file this one holds."""
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(self._stream.fileno()).st_ino:
            self._stream.close()
            self._stream = self._open()

    def _rotate(self) -> None:
        with open(self.path + '.lock', 'a') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._follow()   # someone may have rotated while we waited
                if os.fstat(self._stream.fileno()).st_size == 0:
                    return
                self._stream.close()
                if self.keep == 0:
                    os.truncate(self.path, 0)
                else:
                    for n in range(self.keep - 1, 0, -1):
                        older = f'{self.path}.{n}'
                        if os.path.exists(older):
                            os.replace(older, f'{self.path}.{n + 1}')
                    os.replace(self.path, f'{self.path}.1')
                self._stream = self._open()
                self.rotations += 1
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
