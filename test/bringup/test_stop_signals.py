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


def test_a_signal_inside_the_stop_events_own_lock_still_stops():
    done = run(INSIDE_THE_LOCK.format(
        setup='from loom_ros.bringup.stop_signals import on_stop_signal\n'
              'stop = threading.Event()\n'
              'on_stop_signal(lambda signum: stop.set())',
        lock='stop._cond', stopped='stop.wait(30)'))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split('\n')[:3] == ['armed', 'handler returned', 'stopped']


def test_a_signal_inside_the_futures_own_lock_still_completes_it():
    done = run(INSIDE_THE_LOCK.format(
        setup='import time\n'
              'from rclpy.task import Future\n'
              'from loom_ros.bringup.stop_signals import on_stop_signal\n'
              'stop = Future()\n'
              'on_stop_signal(lambda signum: stop.set_result(signum))\n'
              'def finished():\n'
              '    deadline = time.monotonic() + 30\n'
              '    while not stop.done() and time.monotonic() < deadline:\n'
              '        time.sleep(0.01)\n'
              '    return stop.done() and stop.result() == signal.SIGINT',
        lock='stop._lock', stopped='finished()'))
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


def test_restore_puts_the_handlers_back_and_leaves_nothing_running():
    before_fds = set(os.listdir('/proc/self/fd'))
    before_sigint = signal.getsignal(signal.SIGINT)
    heard = []
    got = threading.Event()
    restore = on_stop_signal(lambda signum: (heard.append(signum), got.set()))
    assert signal.getsignal(signal.SIGINT) is not before_sigint
    os.kill(os.getpid(), signal.SIGTERM)
    assert got.wait(WAIT_LIMIT_S)
    assert heard == [signal.SIGTERM]
    restore()
    assert signal.getsignal(signal.SIGINT) is before_sigint
    relay = [t for t in threading.enumerate() if t.name == 'loom-stop']
    for thread in relay:
        thread.join(WAIT_LIMIT_S)
    assert not any(t.is_alive() for t in relay)
    assert set(os.listdir('/proc/self/fd')) == before_fds


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
