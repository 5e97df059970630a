"""Shared memory that dead Fast DDS processes leave behind, found and given back.

Every Fast DDS participant keeps a segment in /dev/shm (16 MiB with Loom's profile,
config/fastdds.xml), removed when it closes. A process that dies without closing (SIGKILL, a
crash, a supervisor's kill of a hung node, `os._exit`) leaves it there, and its RAM with it,
until a reboot. Measured on the development VM after a day of test runs: 13 GB of its 24 GB in
6,000 such files. (Fast DDS removes a dead participant's segment itself when a live peer that
had it open notices the death; one that no live peer had open stays: a whole system killed at
once, a node alone on its domain.) So whoever restarts Loom's processes (`loom bringup`, the
lifecycle manager) can give them back when it starts and after each death it handles, off its
own thread: with their `shm_cleanup` (off by default, README).

The rule is Fast DDS's own (`fastdds shm clean`, tools/fastdds/shm/clean.py): each segment has a
lock file (`<name>_el`) that its owner holds a flock on while it lives, so one that can be
locked exclusively has no live owner, and the lock file and the segment go. Ports (a few hundred
KB each) are left alone: the next participant of the domain opens the same port files again and
Fast DDS renews a dead one itself, and a pass between that participant's open and its lock
would take its port from under it; a segment's name is new for every participant.

It runs in-process rather than through that tool, which opens every lock file for appending as
whoever runs it: it follows a symbolic link planted in the world-writable /dev/shm (as root,
creating a file wherever it points) and blocks for good on a FIFO; it is found on PATH and,
through a shell wrapper, left running when timed out. Here a lock file is opened read-only
without following links or blocking, and only a regular file of this user is touched. A lock
file younger than `min_age_s` is left for a later run: Fast DDS creates one and then locks it,
and a file taken in between would be a live participant's.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from loom_ros.bus.qos import FASTDDS_RMWS, rmw_of

SHM_DIR = Path('/dev/shm')
MIN_AGE_S = 1.0
MAX_FILES = 100_000   # names looked at in one run: /dev/shm is anyone's to fill
# Fast DDS 3 (Kilted on) names them fastdds_*, Fast DDS 2 (Humble, Jazzy) fastrtps_*.
_SEGMENT_LOCK = re.compile(r'^(fastdds|fastrtps)_[0-9a-z]{16}_el$')


@dataclass(frozen=True)
class Cleaned:
    """What one run removed; `skipped` or `error` say why it did not run or failed."""

    segments: int = 0
    young: int = 0   # unlocked lock files left for a later run (maybe a participant starting)
    skipped: str = ''
    error: str = ''

    def __str__(self) -> str:
        if self.skipped or self.error:
            return self.skipped or self.error
        return (f'removed {self.segments} shared-memory segment(s) left by dead Fast DDS '
                'processes')


def _dead(directory: Path, name: str, now: float, min_age_s: float) -> bool | None:
    """True: a lock file of this user that no live process holds, older than min_age_s (the
    lock is taken while it is looked at); None: the same, but young; False: leave it."""
    try:
        fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:   # a symbolic link (ELOOP), gone meanwhile, not ours to read
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False   # a live participant holds it
            raise
        return None if now - info.st_ctime < min_age_s else True
    finally:
        os.close(fd)   # releases the lock too


def _remove(directory: Path, name: str) -> None:
    """Unlink a regular file of this user (a link is never followed; anything else stays)."""
    try:
        info = os.lstat(directory / name)
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
            os.unlink(directory / name)
    except OSError:
        pass


def clean_dead_segments(environ: Mapping[str, str] = os.environ, *, directory: Path = SHM_DIR,
                        min_age_s: float = MIN_AGE_S,
                        clock: Callable[[], float] = time.time) -> Cleaned:
    """One pass over `directory`. Only for a Fast DDS rmw: the others keep no such files."""
    rmw = rmw_of(environ)
    if rmw not in FASTDDS_RMWS:
        return Cleaned(skipped=f'{rmw[:64]} keeps no Fast DDS shared memory')
    try:
        with os.scandir(directory) as entries:
            names = [e.name for _, e in zip(range(MAX_FILES), entries)]
    except OSError as exc:
        return Cleaned(error=f'cannot list {directory}: {exc.strerror or exc}'[:300])
    segments = young = 0
    now = clock()
    for name in names:
        if not _SEGMENT_LOCK.match(name):
            continue
        try:
            dead = _dead(directory, name, now, min_age_s)
        except OSError as exc:
            return Cleaned(segments, young, error=f'cannot lock {name}: {exc}'[:300])
        if dead is None:
            young += 1
        elif dead:
            _remove(directory, name[:-3])   # the segment, then its lock file
            _remove(directory, name)
            segments += 1
    return Cleaned(segments, young)


class Janitor:
    """Runs clean_dead_segments on a thread of its own when asked (a supervisor's executor must
    not wait on a pass over /dev/shm). Asks while a run is under way make one more run after it,
    not one each: a crash loop costs at most one run at a time. `report(cleaned)` hears each run
    that removed something or failed; a report or a run that raises is swallowed, never the
    end of the janitor."""

    def __init__(self, report: Callable[[Cleaned], None],
                 clean: Callable[[], Cleaned] = clean_dead_segments,
                 sleep: Callable[[float], None] = time.sleep):
        self.report, self.clean, self.sleep = report, clean, sleep
        self.runs = 0
        self.removed = 0   # segments, over every run
        self._lock = threading.Lock()
        self._wanted = False
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        with self._lock:
            self._wanted = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name='loom-shm-janitor')
                self._thread.start()

    def _run(self) -> None:
        retried = False
        try:
            while True:
                with self._lock:
                    if not self._wanted:   # under the lock: an ask from now starts a new thread
                        self._thread = None
                        return
                    self._wanted = False
                try:
                    cleaned = self.clean()
                except Exception as exc:  # a bug here must not end the asks that follow
                    cleaned = Cleaned(error=f'shared-memory cleaning failed: {exc!r}'[:300])
                with self._lock:
                    self.runs += 1
                    self.removed += cleaned.segments
                if cleaned.error or cleaned.segments:
                    try:
                        self.report(cleaned)
                    except Exception:  # a closed stderr, a logger torn down: not worth a stop
                        pass
                if cleaned.young and not retried:   # once more when they are old enough
                    retried = True
                    self.sleep(MIN_AGE_S)
                    with self._lock:
                        self._wanted = True
                else:
                    retried = False
        finally:   # ended by something that is not an Exception: the next ask starts anew
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def idle(self, timeout_s: float) -> bool:
        """Wait until no run is under way or asked for (tests, and a clean stop)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                return True
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
