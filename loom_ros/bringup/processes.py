"""Child processes that end with their parent, even when the parent is SIGKILLed.

A SIGKILLed `loom bringup` or lifecycle manager cannot stop what it started, and orphans keep
ports and files (a Zenoh router holding its port made the next bring-up fail). On Linux the
child asks the kernel for a signal when its parent dies (prctl PR_SET_PDEATHSIG), set between
fork and exec by `Popen(preexec_fn=die_with_parent())`. Elsewhere the helper does nothing.

The kernel's "parent" is the thread that forked: spawn from a thread that lives as long as the
process (the main thread, or the executor thread of a node that spins until exit).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
# Loaded here, not in the child: between fork and exec only the prctl call itself runs.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith('linux') else None


def die_with_parent(signum: int = signal.SIGTERM):
    """A preexec_fn that makes the child receive `signum` when this process dies; if this
    process already died before the call took effect, the child signals itself at once."""
    parent = os.getpid()

    def preexec() -> None:
        if _LIBC is None:
            return
        _LIBC.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)
    return preexec
