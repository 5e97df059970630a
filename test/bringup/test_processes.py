"""bringup.processes with real processes: the stderr tail (bounded) and exit reasons, the env
given, stop that escalates to SIGKILL after its bound and takes the whole group, death with the
parent even when the child was started from a thread that ended; and the restart policy on an
injected clock (plus Supervised restarting a real child)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from loom_ros.bringup.processes import (MAX_LINE_BYTES, Process, RestartPolicy, Restarts,
                                        Supervised, spawn, stop_together)
from harness import REPO, WAIT_LIMIT_S

PY = sys.executable


def wait_until(condition, what, limit=WAIT_LIMIT_S):
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f'timed out waiting for {what}')
        time.sleep(0.01)


def alive(pid):
    try:
        state = open(f'/proc/{pid}/stat').read().rpartition(')')[2].split()[0]
    except OSError:
        return False
    return state not in ('Z', 'X')


def test_exit_reason_quotes_the_last_stderr_line_and_the_tail_is_bounded():
    script = textwrap.dedent(f"""
        import sys
        for i in range(100):
            print(f'line {{i}}', file=sys.stderr)
        print('x' * {MAX_LINE_BYTES * 3}, file=sys.stderr)
        print('the real reason', file=sys.stderr)
        sys.exit(3)
    """)
    proc = spawn([PY, '-c', script], name='talker', tail_lines=10)
    assert proc.wait(WAIT_LIMIT_S) == 3
    assert proc.exit_reason() == 'exited with code 3; last words: the real reason'
    tail = proc.tail()
    assert len(tail) == 10 and tail[-1] == 'the real reason'
    assert max(len(line) for line in tail) <= MAX_LINE_BYTES


def test_the_child_gets_exactly_the_env_given():
    out = subprocess.PIPE
    proc = spawn([PY, '-c', 'import os; print(sorted(k for k in os.environ '
                  'if k.startswith("LOOM_T")))'], env={**os.environ, 'LOOM_T1': 'a'}, stdout=out,
                 text=True)
    assert proc.popen.stdout.read().strip() == "['LOOM_T1']"
    assert proc.wait(WAIT_LIMIT_S) == 0


def test_stop_sends_sigint_then_kills_the_whole_group_after_its_bound():
    # The child ignores SIGINT and starts a grandchild in its group that does too.
    script = textwrap.dedent("""
        import signal, subprocess, sys
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        g = subprocess.Popen([sys.executable, '-c',
                              'import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); '
                              'time.sleep(600)'])
        print(g.pid, flush=True)
        signal.pause()
    """)
    proc = spawn([PY, '-c', script], stdout=subprocess.PIPE, text=True)
    grandchild = int(proc.popen.stdout.readline())
    start = time.monotonic()
    code = proc.stop(timeout_s=0.5)
    assert code == -signal.SIGKILL and time.monotonic() - start >= 0.5
    assert proc.exit_reason() == 'was killed by SIGKILL'
    wait_until(lambda: not alive(grandchild), 'the grandchild to be killed with the group')


def test_stop_returns_as_soon_as_a_child_exits_on_sigint():
    proc = spawn([PY, '-c', 'import time; print("up", flush=True); time.sleep(600)'],
                 stdout=subprocess.PIPE, text=True)
    assert proc.popen.stdout.readline() == 'up\n'
    start = time.monotonic()
    assert proc.stop(timeout_s=WAIT_LIMIT_S) == -signal.SIGINT or proc.poll() == 1
    assert time.monotonic() - start < WAIT_LIMIT_S / 2


def test_a_child_stops_on_sigint_even_when_its_parent_ignores_sigint():
    """A shell starts background jobs (`loom bringup &`) with SIGINT ignored, and children
    inherit that: spawn gives them SIGINT back, so stop() is not left to SIGKILL."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = spawn([PY, '-c', 'import time; print("up", flush=True); time.sleep(600)'],
                     stdout=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert proc.popen.stdout.readline() == 'up\n'
    assert proc.stop(timeout_s=WAIT_LIMIT_S) == -signal.SIGINT


@pytest.mark.parametrize('from_thread', [False, True])
def test_children_die_with_their_parent_even_from_a_finished_thread(from_thread):
    """A parent starts a child (from the main thread, or from a thread that then ends) and is
    SIGKILLed: the child must die too. Before that, an echo through the child after the thread
    ended proves it was not killed when the thread ended (a signal pending at the thread's exit
    would be delivered before the child could answer)."""
    parent = textwrap.dedent(f"""
        import subprocess, sys, threading, time
        from loom_ros.bringup.processes import spawn
        box = {{}}
        def start():
            box['p'] = spawn([sys.executable, '-c', 'import sys\\n'
                              'for line in sys.stdin: print(line, end="", flush=True)'],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if {from_thread}:
            t = threading.Thread(target=start); t.start(); t.join()
        else:
            start()
        child = box['p'].popen
        child.stdin.write('ping\\n'); child.stdin.flush()
        print(child.pid, child.stdout.readline().strip() or 'dead', flush=True)
        time.sleep(600)
    """)
    proc = Process([PY, '-c', parent], stdout=subprocess.PIPE, text=True,
                   death_signal=None).start()
    try:
        pid, answer = proc.popen.stdout.readline().split()
        assert answer == 'ping', proc.exit_reason()
        proc.popen.kill()
        proc.wait(WAIT_LIMIT_S)
        wait_until(lambda: not alive(int(pid)), 'the child to die with its parent')
    finally:
        proc.kill()


def test_restart_policy_backs_off_exponentially_gives_up_and_forgives_a_stable_run():
    now = [0.0]
    r = Restarts(RestartPolicy(max_restarts=3, initial_backoff_s=0.5, max_backoff_s=1.5,
                               stable_after_s=10.0), clock=lambda: now[0])
    r.started()
    assert r.failed('crash') == 0.5 and not r.due()
    now[0] = 0.5
    assert r.due()
    r.started()
    assert r.failed('crash') == 1.5          # 0.5 + 1.0
    now[0] = 1.5
    r.started()
    assert r.failed('crash') == 3.0          # capped at 1.5
    now[0] = 3.0
    r.started()
    assert r.failed('crash again') is None and r.gave_up == 'crash again; gave up after 3 restarts'
    r.reset()
    r.started()
    now[0] = 20.0                            # ran 17 s: a new failure, not a crash loop
    assert r.failed('late crash') == 20.5 and r.count == 1 and r.total == 4


def test_supervised_restarts_a_dying_child_until_the_limit():
    now = [0.0]
    events = []
    sup = Supervised(lambda: Process([PY, '-c', 'import sys; print("boom", file=sys.stderr); '
                                      'sys.exit(2)'], name='crasher'),
                     RestartPolicy(max_restarts=2, initial_backoff_s=1.0),
                     clock=lambda: now[0], on_event=lambda kind, text: events.append((kind, text)))
    assert sup.poll() in ('running', 'waiting')
    first = sup.process
    wait_until(lambda: first.poll() is not None, 'the first child to exit')
    assert sup.poll() == 'waiting'           # backing off 1 s on the injected clock
    assert ('exited', 'crasher exited with code 2; last words: boom') in events
    now[0] = 1.0
    sup.poll()
    assert sup.process is not None and sup.process is not first
    for t in (10.0, 20.0):
        proc = sup.process
        wait_until(lambda: proc.poll() is not None, 'the child to exit')
        sup.poll()
        now[0] = t
        sup.poll()
    assert sup.state == 'failed' and events[-1][0] == 'gave_up'
    assert [kind for kind, _ in events].count('started') == 3


def test_stop_together_interrupts_every_child_then_kills_the_stubborn_on_one_deadline():
    """Bring-up's nodes and side processes: SIGINT to all at once, SIGKILL to those still
    running at the deadline; a Supervised child stopped so is not started again."""
    stubborn = 'import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); ' \
               'print("up", flush=True); time.sleep(600)'
    polite = 'import time; print("up", flush=True); time.sleep(600)'
    first = spawn([PY, '-c', stubborn], stdout=subprocess.PIPE, text=True)
    second = spawn([PY, '-c', stubborn], stdout=subprocess.PIPE, text=True)
    kept = Supervised(lambda: Process([PY, '-c', polite], stdout=subprocess.PIPE, text=True))
    kept.poll()
    for proc in (first, second, kept.process):
        assert proc.popen.stdout.readline() == 'up\n'
    start = time.monotonic()
    codes = stop_together([first, second, kept], 0.5)
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, -signal.SIGINT]
    assert time.monotonic() - start >= 0.5   # the stubborn got their time
    assert kept.poll() == 'stopped' and kept.process is None


def test_a_stop_out_of_time_asks_for_the_stacks_before_sigkill_even_with_the_gil_held():
    """stacks_signal: the child (as run_node sets it up) holds the GIL for good in C, so no
    Python handler, thread or stop watch of its own can run; its faulthandler still writes every
    thread's stack to stderr on the supervisor's question, then SIGKILL ends it."""
    script = textwrap.dedent("""
        import ctypes, sys
        from loom_ros.bringup.stop_signals import answer_stacks_signal, on_stop_signal
        on_stop_signal(lambda signum: sys.exit(0))
        answer_stacks_signal()
        libc = ctypes.PyDLL(None)   # PyDLL: the call keeps the GIL
        mutex = ctypes.create_string_buffer(64)   # all zeros: PTHREAD_MUTEX_INITIALIZER
        def holding_the_gil_for_good():
            libc.pthread_mutex_lock(mutex)
            print('armed', flush=True)
            libc.pthread_mutex_lock(mutex)
        holding_the_gil_for_good()
    """)
    proc = spawn([PY, '-c', script], stdout=subprocess.PIPE, text=True, cwd=REPO,
                 stacks_signal=signal.SIGUSR2)
    assert proc.popen.stdout.readline() == 'armed\n', proc.tail()
    code = proc.stop(timeout_s=0.5)
    said = '\n'.join(proc.tail())
    assert code == -signal.SIGKILL
    assert 'in holding_the_gil_for_good' in said, said

