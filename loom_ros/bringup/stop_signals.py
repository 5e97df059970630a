"""How a Loom process hears SIGINT / SIGTERM: the handler only writes a byte to a pipe, and a
thread of its own runs the process's stop (set an Event, complete rclpy's Future).

Why not `signal.signal(SIGINT, lambda *_: stop.set())`: Python runs a handler on the main thread
between two bytecodes, wherever that thread is, and `threading.Event.set()` and rclpy's
`Future.set_result()` take a non-reentrant lock that the interrupted main thread may be holding
(`Event.wait`'s own condition: the handler then ran inside `Condition.__exit__`). The handler
waits for itself and the process hangs for good: `loom bringup` ignored the demo's SIGINT
this way until it was SIGKILLed, its nodes never stopped (2 of 8 test runs). A `os.write` to a
pipe takes no Python lock, so the handler always returns; the stop runs on the `loom-stop`
thread, where waiting for the main thread's lock is an ordinary wait.

Nor does the stop wait for the main thread at all: Python runs a handler only when the main
thread next executes bytecode, and a main thread blocked in native code (an executor's spin, a
deadlocked lock in C) never does. The pipe is the process's signal wakeup descriptor
(`signal.set_wakeup_fd`): the interpreter's C-level handler writes the signal's number there the
moment the signal arrives, so the `loom-stop` thread hears it whatever the main thread is doing.

    stop = stop_event()            # set by the first SIGINT or SIGTERM
    while not stop.wait(0.2): ...

    restore = on_stop_signal(lambda signum: ...)   # any action; returns the undo
    restore()                      # the previous handlers back (a CLI inside a longer process)
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Iterable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_stop_signal(on_stop: Callable[[int], None],
                   signums: Iterable[int] = STOP_SIGNALS) -> Callable[[], None]:
    """Call `on_stop(signum)` on a thread of its own for each of `signums` received (the first
    one stops; later ones are the caller's to ignore). Must be called on the main thread, as
    signal.signal must. Returns a function that puts the previous handlers back."""
    read_fd, write_fd = os.pipe()   # not inherited by children (PEP 446)
    os.set_blocking(write_fd, False)   # a full pipe (signals nobody reads) drops, never blocks
    pipe = {'write': write_fd}   # restore() takes the descriptor out before it closes it

    wanted = frozenset(int(s) for s in signums)
    pipe['woken'] = False   # the C-level handler writes (set_wakeup_fd); else `handler` does

    def handler(signum, _frame) -> None:
        fd = pipe['write']
        if fd is None or pipe['woken']:   # replaced by restore(), or written already
            return
        try:
            os.write(fd, bytes((signum & 0xFF,)))
        except OSError:   # full: the stop is already under way
            pass

    def relay() -> None:
        try:
            while got := os.read(read_fd, 64):   # empty: restore() closed the pipe
                for signum in got:
                    if signum not in wanted:   # the wakeup fd hears every handled signal
                        continue
                    try:
                        on_stop(signum)
                    except Exception as exc:  # noqa: BLE001 - the next signal still counts
                        print(f'loom: stopping on signal {signum} failed: {exc!r}',
                              file=sys.stderr, flush=True)
        except OSError:
            pass
        finally:
            os.close(read_fd)

    previous: dict = {}

    def restore() -> None:
        """The previous handlers back, the relay ended (once; later calls do nothing)."""
        fd, pipe['write'] = pipe['write'], None
        if fd is None:
            return
        for signum, old in previous.items():
            signal.signal(signum, old)
        if pipe['woken']:
            current = signal.set_wakeup_fd(pipe['wakeup_before'])
            if current != fd:   # another's since ours: theirs stays
                signal.set_wakeup_fd(current)
        os.close(fd)   # the relay reads end-of-file and ends

    try:
        # The relay first: a handler installed with no reader would swallow every stop.
        threading.Thread(target=relay, daemon=True, name='loom-stop').start()
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    try:
        for signum in wanted:
            previous[signum] = signal.signal(signum, handler)
        pipe['wakeup_before'] = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        pipe['woken'] = True
    except BaseException:   # e.g. not on the main thread: nothing half-installed is left
        restore()
        raise
    return restore


def stop_event(signums: Iterable[int] = STOP_SIGNALS) -> threading.Event:
    """A threading.Event set when one of `signums` arrives (on_stop_signal's thread sets it):
    what a process's main loop waits on. Main thread only; for good (no restore)."""
    stop = threading.Event()
    on_stop_signal(lambda _signum: stop.set(), signums)
    return stop
