"""A node process whose executor's shutdown hangs still exits after SIGINT (bus/executor.py).

rclpy's EventsExecutor was seen hanging in shutdown now and then; a router node then never
exited after SIGINT (a CI run). `run_node` bounds that wait: the node still goes through its
shutdown transition (state committed, files closed), then the process exits with its code. A
main thread that never comes back from a callback is bounded too (the stop watch), with its
stack said: a sim_sensors node in a CI run was SIGKILLed 20 s after SIGINT, having said nothing.
Real process, real rclpy and a real EventsExecutor whose shutdown is made to block."""
import signal
import subprocess
import sys
import textwrap
import threading

from harness import REPO, WAIT_LIMIT_S

from loom_ros.bus import executor as loom_executor

NODE = textwrap.dedent('''
    import sys
    import threading
    from pathlib import Path

    import rclpy
    from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn

    from loom_ros.bus import executor as loom_executor

    MARK = Path(sys.argv[1])
    HANG = sys.argv[2] == 'hang'
    HANG_DESTROY = sys.argv[2] == 'hang_destroy'
    STUCK = sys.argv[2] == 'stuck'
    HANG_SHUTDOWN = sys.argv[2] == 'hang_shutdown'
    SLOW_START = sys.argv[2] == 'slow_start'
    NOTICE_S = 1.0 if sys.argv[2] in ('stuck', 'slow_start') else 60.0

    def stuck_in_native_code():
        """A callback that never returns, blocked in C (a default mutex locked twice): the main
        thread never comes back to Python, as an executor stuck in native code would not."""
        import ctypes
        libc = ctypes.CDLL(None)
        mutex = ctypes.create_string_buffer(64)   # all zeros: PTHREAD_MUTEX_INITIALIZER
        libc.pthread_mutex_lock(mutex)
        libc.pthread_mutex_lock(mutex)

    class Stuck(type(loom_executor.make_executor())):
        def shutdown(self, timeout_sec=None):
            if HANG:
                threading.Event().wait()   # never returns, as the hang seen in CI
            return super().shutdown(timeout_sec)

    class Node(LifecycleNode):
        def __init__(self):
            super().__init__('shutdown_probe')
            if SLOW_START:   # the stop signal comes while the node is being made
                print('ready', flush=True)
                import time
                time.sleep(2 * NOTICE_S)
            self.create_timer(0.05, self.ready)

        def ready(self):
            print('ready', flush=True)
            if STUCK:
                stuck_in_native_code()

        def on_shutdown(self, state):
            if HANG_SHUTDOWN:
                threading.Event().wait()   # a shutdown transition that never returns
            MARK.write_text('finalized')
            return TransitionCallbackReturn.SUCCESS

        def destroy_node(self):
            if HANG_DESTROY:
                threading.Event().wait()   # a teardown that never returns
            super().destroy_node()

    def stuck_executor():
        context = rclpy.get_default_context()   # as rclpy.experimental.EventsExecutor does
        executor = Stuck(context)
        context.on_shutdown(executor.wake)
        return executor

    sys.exit(loom_executor.run_node(Node, executor_factory=stuck_executor, close_s=1.0,
                                    notice_s=NOTICE_S))
''')


def _run_until_ready_then_interrupt(tmp_path, mode):
    mark = tmp_path / f'{mode}.mark'
    proc = subprocess.Popen([sys.executable, '-c', NODE, str(mark), mode], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'ready', proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=WAIT_LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err, mark


def test_a_hanging_executor_shutdown_is_bounded_and_the_node_is_still_finalized(tmp_path):
    code, err, mark = _run_until_ready_then_interrupt(tmp_path, 'hang')
    assert code == 0, err
    assert 'the executor did not shut down (still running after 1 s)' in err
    assert mark.read_text() == 'finalized'


def test_a_hanging_teardown_is_bounded_after_the_node_was_finalized(tmp_path):
    code, err, mark = _run_until_ready_then_interrupt(tmp_path, 'hang_destroy')
    assert code == 0, err
    assert 'destroying the node and shutting rclpy down did not finish (still running after 1 s)' in err
    assert mark.read_text() == 'finalized'


def test_a_normal_shutdown_says_nothing_and_finalizes(tmp_path):
    code, err, mark = _run_until_ready_then_interrupt(tmp_path, 'ok')
    assert code == 0, err
    assert 'did not shut down' not in err and 'took over' not in err
    assert 'did not come back' not in err
    assert mark.read_text() == 'finalized'


def test_a_main_thread_stuck_in_a_callback_is_said_with_its_stack_and_the_node_finalized(tmp_path):
    """The stop watch: the stop signal is heard (stop_signals' wakeup descriptor), the main thread
    never comes back, so after notice_s every thread's stack is said, the node still goes through
    its shutdown and the process exits 70 (a fault for its supervisor), not at SIGKILL."""
    code, err, mark = _run_until_ready_then_interrupt(tmp_path, 'stuck')
    assert code == loom_executor.STUCK_EXIT_CODE == 70, err
    assert 'the main thread did not come back from spinning within 1 s of the stop signal' in err
    assert 'stuck_in_native_code' in err   # where it is stuck, from the stack dump
    assert mark.read_text() == 'finalized'


def test_a_stop_while_the_node_is_being_made_waits_for_it_and_stops_cleanly(tmp_path):
    """The watch's clock runs from the spin, not from the signal: a node whose construction
    outlasts notice_s is not taken for stuck."""
    code, err, mark = _run_until_ready_then_interrupt(tmp_path, 'slow_start')
    assert code == 0, err
    assert 'did not come back' not in err
    assert mark.read_text() == 'finalized'


def test_a_shutdown_transition_that_hangs_is_bounded_and_said(tmp_path):
    code, err, mark = _run_until_ready_then_interrupt(tmp_path, 'hang_shutdown')
    assert code == 1, err
    assert 'its shutdown did not finish (still running after 2 s); exiting 1 without it' in err
    assert not mark.exists()


def _watch(notice_s: float):
    exits = []
    exited = threading.Event()
    watch = loom_executor.StopWatch(notice_s, 1.0, lambda: None,
                                    exit=lambda code: (exits.append(code), exited.set()))
    return watch, exits, exited


def test_the_watch_and_the_main_thread_never_both_finalize():
    """Fired first: the main thread is told not to go on (it waits for the watch's exit)."""
    watch, exits, exited = _watch(0.0)
    watch.start()
    watch.spinning()
    assert exited.wait(WAIT_LIMIT_S)
    assert exits == [loom_executor.STUCK_EXIT_CODE]
    assert watch.noticed() is False


def test_a_main_thread_back_in_time_stops_the_watch():
    watch, exits, exited = _watch(3600.0)
    watch.start()
    watch.spinning()
    assert watch.noticed() is True
    assert not watch._fire()   # what the watch asks when its time is up: too late, nothing
    assert exits == []
