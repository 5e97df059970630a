"""How Loom processes spin: rclpy's EventsExecutor (Kilted, ~8x faster here), else the
SingleThreadedExecutor (Jazzy has no EventsExecutor).

Measured on rclpy 9.1.2: `EventsExecutor.spin()` neither fires timers nor returns on rclpy's own
SIGINT handling (it hangs in context cleanup), while `spin_until_future_complete` works. So Loom
processes install their own SIGINT/SIGTERM handlers that complete a future, and spin until it.

No endless exit either: the EventsExecutor's shutdown was seen hanging now and then (a router
node never exited after SIGINT in a CI run; `loom bringup`'s readiness watcher bounds it too).
`run_node` waits for it at most `EXECUTOR_CLOSE_S`, then still takes the node through its
shutdown transition (state committed, files closed) and leaves the rest to a hard exit; the
node's destruction and rclpy's shutdown get the same bound.

No stop that never comes either: a main thread that does not come back from spinning within
`STOP_NOTICE_S` of SIGINT/SIGTERM (stuck in native code, or in a callback that never returns)
would keep the process alive until its supervisor's SIGKILL, with nothing said. `run_node`'s
stop watch then writes every thread's stack to stderr (the evidence), takes the node through its
shutdown on the watch's thread (bounded as above) and exits 70: a fault, said and counted by
the supervisor, not a clean stop. The watch's clock runs only once the node spins (a stop during
its construction waits for it), and either the watch or the main thread finalizes, never both.

No silent death: an exception escaping a callback (timer, subscription, service) comes out of
`spin_until_future_complete`; `spin_until` counts it per node (`callback_errors`, and the node's
bus stats under `callback_error`), logs it at most once a second, and keeps spinning.
Measured on rclpy 9.1.2: the EventsExecutor keeps firing a timer after its callback raised.
"""
from __future__ import annotations

import gc
import inspect
import os
import sys
import threading
import time
from collections import Counter

from rclpy.executors import ExternalShutdownException

from loom_ros.bringup.stop_signals import answer_stacks_signal, dump_stacks, on_stop_signal
from loom_ros.bus.event import RejectReason

# The most a process waits for the executor's shutdown, and again for destroying the node and
# rclpy's shutdown: bring-up and launch give a node 20 s after SIGINT (nodes.STOP_TIMEOUT_S),
# and a node's own shutdown transition (agents committing) must fit in between.
EXECUTOR_CLOSE_S = 5.0
# The most the main thread may take to come back from spinning after a stop signal (a callback
# running then finishes first: the plugin host's configure takes about 4 s here, more on a busy
# machine); the stop watch's own teardown (EXECUTOR_CLOSE_S) still ends before the supervisor's
# SIGKILL at 20 s.
STOP_NOTICE_S = 12.0
STUCK_EXIT_CODE = 70   # EX_SOFTWARE: not a node that could not start (1), not a signal's death

# Exceptions that escaped a callback, per fully qualified node name (all nodes of the executor
# whose callback raised: rclpy does not say which one it was).
callback_errors: Counter = Counter()
ERROR_LOG_PERIOD_S = 1.0


def make_executor(context=None):
    try:
        from rclpy.experimental import EventsExecutor
    except ImportError:  # Jazzy and older
        from rclpy.executors import SingleThreadedExecutor
        return SingleThreadedExecutor(context=context)
    return EventsExecutor(context=context)


def spin_until(executor, future, poll_s: float = 0.5, clock=time.monotonic,
               once: bool = False) -> None:
    """Spin until `future` is done, returning to Python every `poll_s` so signals are handled.
    A callback's exception is counted and logged (throttled), and spinning goes on. `once`:
    turn with spin_once, for rclpy's SingleThreadedExecutor, whose spin_until_future_complete
    adds a done-callback to the future at every call (two a second, kept until it is done)."""
    last_log = new_log_throttle()
    while not future.done():
        if once:
            spin_once_counted(executor, poll_s, last_log, clock)
        else:
            _counted(executor, lambda: executor.spin_until_future_complete(
                future, timeout_sec=poll_s), clock, last_log)


def new_log_throttle() -> list:
    """The error-log throttle of one spinning loop: [time of its last error log]."""
    return [-ERROR_LOG_PERIOD_S]


def spin_once_counted(executor, timeout_sec: float, last_log: list,
                      clock=time.monotonic) -> None:
    """One executor turn whose callback failures are counted and logged as spin_until counts
    them, instead of escaping (a loop that turns the executor itself: record's drain).
    `last_log`: the loop's throttle (new_log_throttle)."""
    _counted(executor, lambda: executor.spin_once(timeout_sec=timeout_sec), clock, last_log)


def _counted(executor, turn, clock, last_log: list) -> None:
    try:
        turn()
    except (KeyboardInterrupt, ExternalShutdownException):
        raise
    except Exception as exc:  # noqa: BLE001: any callback's failure, counted below
        if not executor.context.ok():
            raise   # rclpy is shutting down: not a callback's fault, nothing left to spin
        now = clock()
        log = now - last_log[0] >= ERROR_LOG_PERIOD_S
        if log:
            last_log[0] = now
        _record_callback_error(executor, exc, log)


def _record_callback_error(executor, exc: Exception, log: bool) -> None:
    """Count a callback's exception on each node of the executor (and its bus, if it has one)."""
    for node in executor.get_nodes():
        callback_errors[node.get_fully_qualified_name()] += 1
        stats = getattr(getattr(node, 'bus', None), 'stats', None)
        if stats is not None:
            stats.reject(RejectReason.CALLBACK_ERROR)
        if log:
            node.get_logger().error(
                f'a callback raised {type(exc).__name__}: {str(exc)[:300]} (counted as '
                f'callback_error, {callback_errors[node.get_fully_qualified_name()]} so far); '
                'the node keeps spinning')


def timer_callback(callback):
    """`callback` for create_timer with its signature precomputed: rclpy's executors call
    inspect.signature on a timer's callback at every tick (to see whether it wants a TimerInfo),
    about 40 us for a bound method here, 4 us with this: a 200 Hz timer saves ~1 % of a core."""
    def tick():
        callback()
    tick.__signature__ = inspect.Signature()
    tick.__wrapped_callback__ = callback
    return tick


class HeapHolds:
    """Who holds this process's heap settled (its active hosts), and what each asks of the
    collector. The freeze and the thresholds are process-wide, as CPython's collector is, and
    several hosts can share a process (the launch file composes the agents into the manager's):
    one host deactivating must not hand the others' heap back or restart the full passes they
    hold. So each change goes through here: the freeze is undone, and CPython's thresholds put
    back, when the last holder lets go; meanwhile the thresholds follow the holders still
    there (young and middle: the largest any asks; full passes held while any holds them). A
    host that lets go while others stay keeps what it froze frozen until the last one goes:
    objects it releases are still freed by their counts, only cycles among them wait."""

    def __init__(self):
        self._asks: dict[object, tuple[bool, int, int]] = {}   # holder -> (hold, young, middle)
        self._lock = threading.Lock()

    def settle(self, holder) -> None:
        """`holder` just became active: what it configured lives as long as it does. Collected
        once, then frozen (gc.freeze): the collector's full passes walk every object of the
        process, and a host of 1,000 agents stalled every thread 100-260 ms at each one,
        several times a minute (bench/results/agents.md). Objects freed by their counts are
        still freed; `unsettle` lets what configure made be collected again."""
        gc.collect()
        gc.freeze()
        with self._lock:
            self._asks.setdefault(holder, (False, 0, 0))
            self._apply()

    def hold_full_passes(self, holder, young: int = 0, middle: int = 0) -> None:
        """`holder` is active and settled: what it made since (its subscriptions) is frozen
        too, and CPython starts no full pass on its own any more; the holder runs `full_pass`
        on a timer instead. A full pass stops every thread while it walks each unfrozen
        long-lived object: in a host of 1,000 agents at 10,000 events/s CPython started one
        every 0.6 s, 22-100 ms each, and the steady state had left nothing for them (0 objects
        in cycles in 3 s; bench/results/agents.md). Young and middle passes go on, cycles that
        die young are still collected; `young` and `middle` (0: CPython's) set how often. A
        young pass walks the young objects still alive: at CPython's 700 allocations it came
        every few events and caught the events in flight (mailboxes, pending commits), which
        then went on to be walked again by the middle passes; at 50,000 most of them are gone
        by the next pass (docs/storage.md)."""
        gc.freeze()
        with self._lock:
            self._asks[holder] = (True, max(0, int(young)), max(0, int(middle)))
            self._apply()

    def unsettle(self, holder) -> None:
        """`holder` deactivates or cleans up: its asks go. The last holder to go gives the
        frozen objects back to the collector (the released ones can be collected again;
        cycles among them would otherwise never be) with CPython's own thresholds, full passes
        included."""
        with self._lock:
            self._asks.pop(holder, None)
            if not self._asks:
                gc.unfreeze()
            self._apply()

    def holders(self) -> int:
        with self._lock:
            return len(self._asks)

    def _apply(self) -> None:
        holding = [(young, middle) for hold, young, middle in self._asks.values() if hold]
        if not holding:
            gc.set_threshold(*CPYTHON_GC_THRESHOLDS)
            return
        gc.set_threshold(max(y for y, _ in holding) or CPYTHON_GC_THRESHOLDS[0],
                         max(m for _, m in holding) or CPYTHON_GC_THRESHOLDS[1],
                         NO_AUTOMATIC_FULL_PASS)


# CPython's own thresholds (young, middle, full: a full pass after that many middle ones, when
# enough objects survived since the last), put back when the last holder goes.
CPYTHON_GC_THRESHOLDS = gc.get_threshold()
NO_AUTOMATIC_FULL_PASS = 2**31 - 1   # middle passes before a full one: never, in practice
# The collector is one per process, so who holds it is too (what AgentNode and the core bench
# use; a test may make its own HeapHolds).
HEAP = HeapHolds()


def full_pass() -> tuple[int, float]:
    """One full collection now: (objects found unreachable, milliseconds it took)."""
    start = time.perf_counter()
    found = gc.collect()
    return found, (time.perf_counter() - start) * 1000.0


class ReleasingLifecycleNode:
    """Mixin before LifecycleNode: cleanup and shutdown both release what configure made (the
    node's `_release`, which must be idempotent), so no path leaves a service or session open."""

    def on_cleanup(self, state):
        from rclpy.lifecycle import TransitionCallbackReturn
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        from rclpy.lifecycle import TransitionCallbackReturn
        self._release()
        return TransitionCallbackReturn.SUCCESS


class StartFailed(RuntimeError):
    """A node that cannot start (its configure or activate failed): the process exits 1."""

    def __init__(self, node, reason: str):
        super().__init__(reason)
        self.node = node


def run_node(node_factory, args=None, executor_factory=make_executor,
             close_s: float = EXECUTOR_CLOSE_S, notice_s: float = STOP_NOTICE_S) -> int:
    """The demos' main(): init, spin until Ctrl-C / SIGTERM / shutdown, then tear down cleanly.
    Returns the exit code: 1 when the node could not start, else 0. An executor whose shutdown
    does not return within `close_s` is left behind: the node is still finalized, then the
    process exits at once (os._exit) with the same code, saying so on stderr. A main thread
    that has not come back from spinning `notice_s` after the stop signal: StopWatch."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions
    from rclpy.task import Future

    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = Future()
    node = executor = None
    watch = StopWatch(notice_s, close_s, lambda: node)

    def request_stop(signum):
        if not stop.done():
            stop.set_result(signum)
            watch.start()

    on_stop_signal(request_stop)   # set on a thread of its own, never in the handler
    answer_stacks_signal()   # a supervisor's last question before SIGKILL (processes.py)
    code = 0
    try:
        node = node_factory()
        executor = executor_factory()
        executor.add_node(node)
        watch.spinning()
        spin_until(executor, stop)
    except StartFailed as exc:   # said by the node already; a dead node must not look alive
        node, code = exc.node, 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if not watch.noticed():   # too late: the watch is finalizing and exits the process
            threading.Event().wait()
        who = node.get_fully_qualified_name() if node is not None else 'loom node'
        end_process(executor, node, who, code, close_s,
                    finalize=None if node is None else lambda: finalize_node(node))
    return code


class StopWatch:
    """After a stop signal, the main thread has `notice_s` from when it spins (`spinning()`) to
    come back (`noticed()`). If it has not, it is stuck where no stop reaches it: every thread's
    stack goes to stderr, the node's shutdown runs here (at most `close_s`; the stuck thread may
    hold what it needs) and the process exits STUCK_EXIT_CODE. Exactly one of the two goes on:
    `noticed()` says False when the watch fired first. `node()` gives the node, or None."""

    def __init__(self, notice_s: float, close_s: float, node, exit=os._exit):
        self.notice_s, self.close_s, self._node, self._exit = notice_s, close_s, node, exit
        self._spinning = threading.Event()
        self._back = threading.Event()
        self._lock = threading.Lock()
        self._state = 'waiting'   # then 'noticed' (the main thread goes on) or 'fired'

    def start(self) -> None:
        """The stop signal came (called once: with the stop future's first result)."""
        threading.Thread(target=self._watch, daemon=True, name='loom-stop-watch').start()

    def spinning(self) -> None:
        """The node is made and its executor about to spin: the clock may run."""
        self._spinning.set()

    def noticed(self) -> bool:
        """The main thread is back: True when it goes on with the usual teardown (end_process
        bounds it), False when the watch already fired (it finalizes and exits)."""
        with self._lock:
            if self._state == 'fired':
                return False
            self._state = 'noticed'
        self._back.set()
        self._spinning.set()   # a watch still waiting for the spin ends
        return True

    def _fire(self) -> bool:
        with self._lock:
            if self._state != 'waiting':
                return False
            self._state = 'fired'
            return True

    def _watch(self) -> None:
        self._spinning.wait()
        if self._back.wait(self.notice_s) or not self._fire():
            return
        node = self._node()
        who = node.get_fully_qualified_name() if node is not None else 'loom node'
        print(f'{who}: the main thread did not come back from spinning within '
              f'{self.notice_s:g} s of the stop signal; every thread\'s stack follows, then '
              f'the node\'s shutdown without it and exit {STUCK_EXIT_CODE}',
              file=sys.stderr, flush=True)
        dump_stacks()
        if node is not None:
            why = within(lambda: finalize_node(node), self.close_s, 'stop-watch-finalize')
            if why:
                print(f'{who}: its shutdown did not finish ({why})', file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit(STUCK_EXIT_CODE)


def end_process(executor, node, who: str, code: int, close_s: float = EXECUTOR_CLOSE_S,
                finalize=None) -> None:
    """How a process that spun `node` on `executor` ends: the executor's shutdown, waited for
    at most `close_s`; `finalize()` either way (commit, close files), at most twice that (one
    that raises or hangs: exit 1 at once); then the node destroyed and rclpy shut down, waited
    for at most `close_s` too. When the executor's shutdown hung,
    destroying would wait on it: the process says so on stderr and exits at once with `code`,
    as it does when destroying or rclpy's shutdown hangs, or when the node still has threads
    in native code (exit_hazards)."""
    import rclpy
    why = '' if executor is None else within(executor.shutdown, close_s, 'executor-shutdown')
    closed = not why.startswith(STILL_RUNNING)
    if why:
        print(f'{who}: the executor did not shut down ({why}); '
              + ('finishing without it, then exiting' if not closed else 'going on'),
              file=sys.stderr, flush=True)
    if finalize is not None:
        # Bounded too: a shutdown transition stuck in a callback would hold the process until
        # SIGKILL with nothing said. The node is then not torn down under it: the exit is next.
        why = within(finalize, close_s * 2, 'finalize')
        if why:   # raised or still running: a fault (exit 1), and nothing more is waited for
            print(f'{who}: its shutdown did not finish ({why}); exiting 1 without it',
                  file=sys.stderr, flush=True)
            closed, code = False, 1
    if closed:
        def tear_down():
            if node is not None:
                node.destroy_node()
            rclpy.try_shutdown()
        why = within(tear_down, close_s, 'node-teardown')
        if not why:
            left = exit_hazards(node)
            if not left:
                return
            print(f'{who}: {", ".join(left)} still inside native code after the shutdown; '
                  f'exiting now with {code} (one coming back while the interpreter exits would '
                  'abort the process)', file=sys.stderr, flush=True)
        else:
            print(f'{who}: destroying the node and shutting rclpy down did not finish ({why}); '
                  'exiting without it', file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_hazards(node) -> list[str]:
    """The node's threads still inside native code after its shutdown (its `exit_hazards()`,
    when it has one: the Zenoh bridge's opener or closer). Such a thread that comes back into
    Python while the interpreter exits makes glibc abort the process ("FATAL: exception not
    rethrown"), so end_process exits with os._exit instead when there is any."""
    hazards = getattr(node, 'exit_hazards', None)
    if hazards is None:
        return []
    try:
        return list(hazards())
    except Exception as exc:  # noqa: BLE001 - asking must not turn a clean stop into a fault
        return [f'unknown ({exc!r})'[:200]]


STILL_RUNNING = 'still running after'   # how within() says the call did not end in time


def within(call, limit_s: float, name: str) -> str:
    """Run `call` on a daemon thread, at most `limit_s`: '' when it returned, else why not (it
    raised: what; or it was still running). What may hang in rclpy's teardown (an executor's
    shutdown, destroying a node) is run this way; a call that raised did not do its work, so it
    is not counted as done (a stop that raised had looked clean)."""
    raised: list[BaseException] = []

    def run():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, whatever it is
            raised.append(exc)
    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join(limit_s)
    if worker.is_alive():
        return f'{STILL_RUNNING} {limit_s:g} s'
    return f'raised {raised[0]!r}'[:500] if raised else ''


def finalize_node(node) -> None:
    """A lifecycle node goes through its shutdown transition on the way out (Ctrl-C, SIGTERM),
    so on_shutdown commits state and closes sessions and files; a plain node runs its
    `on_exit()` if it has one (the lifecycle manager stops the agents it started), so that work
    is not cut by the bound on destroying the node."""
    trigger = getattr(node, 'trigger_shutdown', None)
    if trigger is None:
        on_exit = getattr(node, 'on_exit', None)
        if on_exit is not None:
            on_exit()
        return
    try:
        trigger()
    except Exception as exc:  # already finalized, or a transition that is not allowed now
        node.get_logger().debug(f'no shutdown transition on exit: {exc}')


def run_lifecycle_node(node_factory, args=None, **run) -> int:
    """run_node for a lifecycle node with an `autostart` parameter: standalone (`ros2 run`), it
    configures and activates itself when autostart is true, and exits 1 with the reason when it
    cannot (a node left unconfigured would look alive to `ros2 node list` and to launch);
    with autostart false a lifecycle manager drives it, and a failed transition is its to report."""
    from rclpy.lifecycle import TransitionCallbackReturn

    def started():
        node = node_factory()
        if node.get_parameter('autostart').value:
            for step in ('configure', 'activate'):
                if getattr(node, f'trigger_{step}')() != TransitionCallbackReturn.SUCCESS:
                    reason = getattr(node, 'configure_error', '') or 'see the lines above'
                    node.get_logger().error(f'{step} failed ({reason}); exiting with code 1')
                    raise StartFailed(node, reason)
        return node
    return run_node(started, args, **run)
