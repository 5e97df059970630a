"""Shared memory that dead Fast DDS processes leave behind, given back with Fast DDS's own tool.

Every Fast DDS participant keeps a segment in /dev/shm (16 MiB with Loom's profile,
config/fastdds.xml), removed when it closes. A process that dies without closing (SIGKILL, a
crash, a supervisor's kill of a hung node, `os._exit`) leaves it there, and its RAM with it,
until a reboot or `fastdds shm clean`, which removes exactly the segments and ports whose lock
no live process holds. Measured on the development VM after a day of test runs: 13 GB of its
24 GB in 6,000 such files. So whoever restarts Loom's processes (`loom bringup`, the lifecycle
manager) runs that tool when it starts and after each death it handles, off its own thread.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from loom_ros.bus.qos import DEFAULT_RMW, FASTDDS_RMWS

TOOL = 'fastdds'   # Fast DDS's command-line tool (the ros_fastdds wheel, or /opt/ros/<distro>/bin)
TIMEOUT_S = 30.0
MAX_OUTPUT_CHARS = 4096   # what is read of the tool's answer before it is parsed
_COUNT = re.compile(r'^(\d{1,9}) zombie (segments|ports) cleaned$', re.M)


@dataclass(frozen=True)
class Cleaned:
    """What one run of the tool removed; `skipped` or `error` say why it did not run or failed."""

    segments: int = 0
    ports: int = 0
    skipped: str = ''
    error: str = ''

    def __str__(self) -> str:
        if self.skipped or self.error:
            return self.skipped or self.error
        return (f'removed {self.segments} shared-memory segment(s) and {self.ports} port(s) '
                'left by dead Fast DDS processes')


def find_tool(which: Callable[..., str | None] = shutil.which) -> str | None:
    """The tool beside this Python first (a virtual environment's bin), then on PATH."""
    here = str(Path(sys.executable).parent)
    return which(TOOL, path=here) or which(TOOL)


def clean_dead_segments(environ: Mapping[str, str] = os.environ, *, tool: str | None = None,
                        timeout_s: float = TIMEOUT_S,
                        find: Callable[[], str | None] = find_tool) -> Cleaned:
    """Run `fastdds shm clean` once (`tool`, or the one `find` finds). Only for a Fast DDS rmw:
    the others keep no such files."""
    rmw = (environ.get('RMW_IMPLEMENTATION') or DEFAULT_RMW).strip()
    if rmw not in FASTDDS_RMWS:
        return Cleaned(skipped=f'{rmw[:64]} keeps no Fast DDS shared memory')
    tool = tool or find()
    if tool is None:
        return Cleaned(error=f'Fast DDS\'s `{TOOL}` tool is not on PATH: shared memory left by '
                       'dead processes stays until `fastdds shm clean` or a reboot')
    try:
        done = subprocess.run([tool, 'shm', 'clean'], capture_output=True, text=True,
                              errors='replace', timeout=timeout_s, stdin=subprocess.DEVNULL,
                              env=dict(environ))
    except subprocess.TimeoutExpired:
        return Cleaned(error=f'`{TOOL} shm clean` did not finish within {timeout_s:g} s')
    except OSError as exc:
        return Cleaned(error=f'`{TOOL} shm clean` could not run: {exc}'[:300])
    out = done.stdout[:MAX_OUTPUT_CHARS]
    counts = {kind: int(n) for n, kind in _COUNT.findall(out)}
    if done.returncode != 0 or set(counts) != {'segments', 'ports'}:
        said = (done.stderr[:MAX_OUTPUT_CHARS] or out).strip().splitlines()[-1:] or ['nothing']
        return Cleaned(error=f'`{TOOL} shm clean` exited {done.returncode}: {said[0][:200]!r}')
    return Cleaned(counts['segments'], counts['ports'])


class Janitor:
    """Runs clean_dead_segments on a thread of its own when asked (a supervisor's executor must
    not wait on a subprocess). Asks while a run is under way make one more run after it, not one
    each: a crash loop costs at most one run at a time. `report(cleaned)` hears each run that
    removed something or failed."""

    def __init__(self, report: Callable[[Cleaned], None],
                 clean: Callable[[], Cleaned] = clean_dead_segments):
        self.report, self.clean = report, clean
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
        while True:
            with self._lock:
                if not self._wanted:
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
            if cleaned.error or cleaned.segments or cleaned.ports:
                self.report(cleaned)

    def idle(self, timeout_s: float) -> bool:
        """Wait until no run is under way or asked for (tests, and a clean stop)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        with self._lock:
            return self._thread is None
