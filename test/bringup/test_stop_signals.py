"""bringup.stop_signals in real processes: a SIGINT whose handler runs while the main thread holds
the stop Event's own lock (where `Event.wait` was when `loom bringup` hung on the demo's SIGINT
until SIGKILL) still stops the process; rclpy's Future the same; restore() puts the previous
handlers back and leaves no thread or descriptor behind; and no Loom module installs a stop
handler of its own."""
import ast
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from harness import REPO, WAIT_LIMIT_S

from loom_ros.bringup.stop_signals import on_stop_signal

# The handler runs at the first bytecode boundary after os.kill returns: inside the `with`.
INSIDE_THE_LOCK = '''
import os, signal, sys, threading
{setup}
print('armed', flush=True)
with {lock}:   # the state Event.wait / Future.add_done_callback are in, now and then
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):
        pass
print('handler returned', flush=True)
print('stopped' if {stopped} else 'not stopped', flush=True)
'''


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=WAIT_LIMIT_S)


EVENT = dict(setup='from loom_ros.bringup.stop_signals import on_stop_signal\n'
                   'stop = threading.Event()\n'
                   'on_stop_signal(lambda signum: stop.set())',
             lock='stop._cond', stopped='stop.wait(30)')
FUTURE = dict(setup='import time\n'
                    'from rclpy.task import Future\n'
                    'from loom_ros.bringup.stop_signals import on_stop_signal\n'
                    'stop = Future()\n'
                    'on_stop_signal(lambda signum: stop.set_result(signum))\n'
                    'def finished():\n'
                    '    deadline = time.monotonic() + 30\n'
                    '    while not stop.done() and time.monotonic() < deadline:\n'
                    '        time.sleep(0.01)\n'
                    '    return stop.done() and stop.result() == signal.SIGINT',
              lock='stop._lock', stopped='finished()')


@pytest.mark.parametrize('stop', [EVENT, FUTURE], ids=['event', 'rclpy_future'])
def test_a_signal_inside_the_stops_own_lock_still_stops(stop):
    """threading.Event (bring-up, the CLIs) and rclpy's Future (run_node, record)."""
    done = run(INSIDE_THE_LOCK.format(**stop))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split('\n')[:3] == ['armed', 'handler returned', 'stopped']


def test_what_it_replaces_hangs_there():
    """The same moment with the handler that `loom bringup` had: the process never gets past
    the handler (killed by the timeout here), so the two tests above test the real hazard."""
    code = textwrap.dedent(INSIDE_THE_LOCK.format(
        setup='stop = threading.Event()\n'
              'signal.signal(signal.SIGINT, lambda *_: stop.set())',
        lock='stop._cond', stopped='stop.wait(30)'))
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == 'armed\n'
        # From here the new handler returns at once (the tests above); this one never does.
        out, _ = proc.communicate(timeout=3)
        raise AssertionError(f'the old handler returned: {out!r}')
    except subprocess.TimeoutExpired:
        pass
    finally:
        proc.kill()
        proc.wait()


# The main thread blocked in native code for good (a default pthread mutex locked twice: no
# signal ends the wait), as an executor stuck in C would be: Python never runs a handler there.
STUCK_IN_NATIVE = '''
import ctypes, os, signal, sys, threading, time
{setup}
libc = ctypes.CDLL(None)   # CDLL calls release the GIL: the other threads go on
mutex = ctypes.create_string_buffer(64)   # all zeros: PTHREAD_MUTEX_INITIALIZER in glibc
libc.pthread_mutex_lock(mutex)
def arm():
    # 'armed' only once the main thread waits inside the C call: glibc marks the lock word 2
    # (locked, with a waiter) right before its futex wait, with no bytecode left to run.
    while int.from_bytes(mutex.raw[:4], sys.byteorder) != 2:
        time.sleep(0.001)
    print('armed', flush=True)
threading.Thread(target=arm, daemon=True).start()
libc.pthread_mutex_lock(mutex)
'''


def interrupt_when_armed(code: str, timeout_s: float) -> tuple[str, int | None]:
    """Run `code`, SIGINT it once it says 'armed': what it printed after, and its exit code
    (None: still running after `timeout_s`, then killed)."""
    proc = subprocess.Popen([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == 'armed\n', proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, _err = proc.communicate(timeout=timeout_s)
        return out, proc.returncode
    except subprocess.TimeoutExpired:
        return '', None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_main_thread_stuck_in_native_code_still_hears_the_stop():
    """The wakeup descriptor: the interpreter's C handler writes the signal, the relay hears it
    while the main thread never comes back to Python."""
    out, code = interrupt_when_armed(STUCK_IN_NATIVE.format(setup=(
        'from loom_ros.bringup.stop_signals import on_stop_signal\n'
        'on_stop_signal(lambda signum: (print("stopped", signum, flush=True), os._exit(0)))')),
        WAIT_LIMIT_S)
    assert (out, code) == (f'stopped {int(signal.SIGINT)}\n', 0)


def test_a_python_level_handler_never_runs_there():
    """The same process with the handler only (what stop_signals had): the stop never comes,
    so the test above tests the real hazard."""
    out, code = interrupt_when_armed(STUCK_IN_NATIVE.format(setup=(
        'signal.signal(signal.SIGINT, lambda *_: (print("stopped", flush=True), os._exit(0)))')),
        timeout_s=3)
    assert (out, code) == ('', None)


def test_other_handled_signals_reach_the_wakeup_descriptor_but_do_not_stop():
    """Every signal with a Python handler is written to the wakeup descriptor: only the stop
    signals asked for call on_stop."""
    done = run('''
        import os, signal, threading
        from loom_ros.bringup.stop_signals import on_stop_signal
        heard, got = [], threading.Event()
        on_stop_signal(lambda signum: (heard.append(signum), got.set()), [signal.SIGTERM])
        signal.signal(signal.SIGUSR1, lambda *_: None)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        got.wait(30)
        print(sorted(set(heard)), flush=True)   # once or twice: the C and the Python handler
    ''')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f'[{int(signal.SIGTERM)}]'


def test_a_wakeup_descriptor_taken_since_still_leaves_the_stop_heard():
    """asyncio.run on the main thread with signal handlers resets the wakeup descriptor when it
    closes; the Python-level handler still writes the stop."""
    done = run('''
        import asyncio, os, signal, threading
        from loom_ros.bringup.stop_signals import on_stop_signal
        got = threading.Event()
        on_stop_signal(lambda signum: got.set())
        async def main():
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: None)
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        asyncio.run(main())
        print('wakeup', signal.set_wakeup_fd(-1), flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        print('stopped' if got.wait(30) else 'not stopped', flush=True)
    ''')
    assert done.returncode == 0, done.stderr
    assert done.stdout.split('\n')[:2] == ['wakeup -1', 'stopped']


def test_a_forked_child_with_its_own_handler_does_not_stop_its_parent():
    """A fork without exec keeps the interpreter's wakeup descriptor, the parent's pipe: the
    child forgets it at fork."""
    done = run('''
        import os, signal, threading
        from loom_ros.bringup.stop_signals import on_stop_signal
        stop = threading.Event()
        on_stop_signal(lambda signum: stop.set())
        child = os.fork()
        if child == 0:
            signal.signal(signal.SIGTERM, lambda *_: None)   # its own, no pipe
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0)
        os.waitpid(child, 0)
        print('parent stopped' if stop.wait(1.0) else 'parent running', flush=True)
    ''')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'parent running'


def test_restores_out_of_order_never_give_back_a_closed_pipe():
    """A installed, B installed (its 'before' is A's pipe), A restored (closed), B restored: the
    descriptor must not go back to A's number, which a file opened since may hold."""
    done = run('''
        import os, signal, tempfile
        from loom_ros.bringup.stop_signals import on_stop_signal
        restore_a = on_stop_signal(lambda signum: None)
        restore_b = on_stop_signal(lambda signum: None)
        restore_a()
        reused = os.open(tempfile.mkstemp()[1], os.O_WRONLY | os.O_NONBLOCK)
        restore_b()
        print('wakeup', signal.set_wakeup_fd(-1), flush=True)
    ''')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'wakeup -1'


def opened_pipes(monkeypatch) -> list:
    """The descriptors of every os.pipe() made from here on (to see them closed)."""
    made, real = [], os.pipe

    def pipe():
        fds = real()
        made.extend(fds)
        return fds
    monkeypatch.setattr(os, 'pipe', pipe)
    return made


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_restore_puts_the_handlers_back_and_leaves_nothing_running(monkeypatch):
    fds = opened_pipes(monkeypatch)
    before_sigint = signal.getsignal(signal.SIGINT)
    before_wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before_wakeup)
    heard = []
    got = threading.Event()
    restore = on_stop_signal(lambda signum: (heard.append(signum), got.set()))
    assert signal.getsignal(signal.SIGINT) is not before_sigint and len(fds) == 2
    relay = [t for t in threading.enumerate() if t.name == 'loom-stop']
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert got.wait(WAIT_LIMIT_S)
        assert set(heard) == {signal.SIGTERM}   # once or twice (the C and the Python handler)
        wakeup = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(wakeup)
        assert wakeup == fds[1]   # the pipe's write end is the process's wakeup descriptor
    finally:
        restore()
    restore()   # once is enough; a second call closes nothing that is not its own
    assert signal.getsignal(signal.SIGINT) is before_sigint
    assert signal.set_wakeup_fd(-1) == before_wakeup   # the one before it is back
    signal.set_wakeup_fd(before_wakeup)
    for thread in relay:
        thread.join(WAIT_LIMIT_S)
    assert relay and not any(t.is_alive() for t in relay)
    assert all(closed(fd) for fd in fds)


def test_off_the_main_thread_it_refuses_and_leaves_nothing(monkeypatch):
    fds = opened_pipes(monkeypatch)
    errors = []

    def install():
        try:
            on_stop_signal(lambda signum: None)
        except ValueError as exc:   # signal.signal: main thread only
            errors.append(exc)
    thread = threading.Thread(target=install)
    thread.start()
    thread.join(WAIT_LIMIT_S)
    assert len(errors) == 1 and len(fds) == 2
    deadline = threading.Event()
    for _ in range(100):   # the relay ends once it reads end-of-file
        if all(closed(fd) for fd in fds):
            break
        deadline.wait(0.05)
    assert all(closed(fd) for fd in fds)


def test_a_child_signalled_before_exec_does_not_stop_its_parent():
    """Between fork and exec a child runs its parent's Python (the preexec), handlers included:
    a SIGTERM there must end the child, not reach the parent through the shared pipe."""
    done = run('''
        import os, signal, sys, threading
        from loom_ros.bringup.processes import Process
        from loom_ros.bringup.stop_signals import on_stop_signal
        stop = threading.Event()
        on_stop_signal(lambda signum: stop.set())
        child = Process([sys.executable, '-c', 'print("exec reached")'],
                        preexec=lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        code = child.wait(30)
        print('child', code, 'parent stopped' if stop.wait(1.0) else 'parent running',
              flush=True)
    ''')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f'child {-signal.SIGTERM} parent running'


def test_no_loom_module_installs_a_stop_handler_of_its_own():
    """signal.signal(...) anywhere in loom_ros: only in stop_signals, and in a child before exec
    (processes.py puts SIGINT back to its default)."""
    allowed = {'loom_ros/bringup/stop_signals.py', 'loom_ros/bringup/processes.py'}
    found = []
    for path in sorted((Path(REPO) / 'loom_ros').rglob('*.py')):
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == 'signal' and isinstance(node.func.value, ast.Name) and \
                    node.func.value.id == 'signal' and rel not in allowed:
                found.append(f'{rel}:{node.lineno}')
    assert found == []
