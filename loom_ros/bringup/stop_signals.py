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
The Python-level handler still writes too (the descriptor may have been taken since: an asyncio
loop's signal handling resets it), so `on_stop` may be called twice for one signal: every
caller's stop is idempotent. A forked child forgets the descriptor (os.register_at_fork): a
signal there must not reach the parent through the pipe they share until exec.

    stop = stop_event()            # set by the first SIGINT or SIGTERM
    while not stop.wait(0.2): ...

    restore = on_stop_signal(lambda signum: ...)   # any action; returns the undo
    restore()                      # the previous handlers back (a CLI inside a longer process)
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
from typing import Callable, Iterable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What a supervisor sends before SIGKILL to a Loom process that did not stop in time: its
# faulthandler writes every thread's stack to stderr, from C, even while a thread holds the GIL.
STACKS_SIGNAL = signal.SIGUSR2

# The write ends this module has made the wakeup descriptor and not yet closed: restore() gives
# the descriptor back only to one of these or to one it did not make (never to a closed pipe of
# its own whose number may since name another file).
_ours: set[int] = set()
_ours_lock = threading.Lock()


def _forget_wakeup_in_child() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:   # not the interpreter's main thread: nothing to forget here
        pass


os.register_at_fork(after_in_child=_forget_wakeup_in_child)


def on_stop_signal(on_stop: Callable[[int], None],
                   signums: Iterable[int] = STOP_SIGNALS) -> Callable[[], None]:
    """Call `on_stop(signum)` on a thread of its own for each of `signums` received, once or
    twice each (the first one stops; later ones are the caller's to ignore). Must be called on
    the main thread, as signal.signal must. Returns a function that puts the previous handlers
    back."""
    read_fd, write_fd = os.pipe()   # not inherited by children (PEP 446)
    os.set_blocking(write_fd, False)   # a full pipe (signals nobody reads) drops, never blocks
    pipe = {'write': write_fd}   # restore() takes the descriptor out before it closes it

    wanted = frozenset(int(s) for s in signums)
    pipe['woken'] = False   # the wakeup descriptor is ours: restore() gives it back

    def handler(signum, _frame) -> None:
        fd = pipe['write']
        if fd is None:   # a handler restore() has replaced, called late
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
        try:
            for signum, old in previous.items():
                signal.signal(signum, old)
        finally:
            with _ours_lock:
                try:
                    if pipe['woken']:
                        _give_back_wakeup(fd, pipe['wakeup_before'], pipe['before_was_ours'])
                finally:
                    _ours.discard(fd)
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
        with _ours_lock:
            before = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            pipe.update(woken=True, wakeup_before=before, before_was_ours=before in _ours)
            _ours.add(write_fd)
    except BaseException:   # e.g. not on the main thread: nothing half-installed is left
        restore()
        raise
    return restore


def _give_back_wakeup(ours: int, before: int, before_was_ours: bool) -> None:
    """The wakeup descriptor back to `before` if it is still `ours` (one set since stays), unless
    `before` was a pipe of this module's that is closed now (its number may name another file
    since): then none. Called with _ours_lock held."""
    current = signal.set_wakeup_fd(-1)
    if current != ours:   # taken since: theirs stays
        back = current
    elif before_was_ours and before not in _ours:
        back = -1
    else:
        back = before
    try:
        signal.set_wakeup_fd(back, warn_on_full_buffer=False)
    except (ValueError, OSError):   # closed, or made blocking, since: none
        signal.set_wakeup_fd(-1)


def _stderr():
    """sys.stderr when it is a file (faulthandler writes to its descriptor), else the process's
    own stderr (sys.stderr replaced, as under pytest)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, ValueError, OSError):
        return sys.__stderr__


def answer_stacks_signal() -> None:
    """STACKS_SIGNAL writes every thread's stack to stderr (and nothing else: the process goes
    on). Main thread only."""
    faulthandler.register(STACKS_SIGNAL, file=_stderr(), all_threads=True, chain=False)


def dump_stacks() -> None:
    """Every thread's stack on stderr now (faulthandler: native-stuck threads too)."""
    faulthandler.dump_traceback(file=_stderr(), all_threads=True)


def stop_event(signums: Iterable[int] = STOP_SIGNALS) -> threading.Event:
    """A threading.Event set when one of `signums` arrives (on_stop_signal's thread sets it):
    what a process's main loop waits on. Main thread only; for good (no restore)."""
    stop = threading.Event()
    on_stop_signal(lambda _signum: stop.set(), signums)
    return stop
