"""The one way Loom starts and stops child processes (bring-up, the demo, the lifecycle manager's
agent hosts, plugin sandboxes, the TTS worker).

    proc = Process([sys.executable, '-m', 'loom_ros.router.router_node'], name='router',
                   env={**os.environ, 'X': '1'}, stdout=subprocess.PIPE).start()
    ...
    if not proc.running:
        log(f'router {proc.exit_reason()}')       # "exited with code 1; last words: ..."
    proc.stop(timeout_s=10)                         # SIGINT to its group, SIGKILL after 10 s

What every child gets:
- its own session and process group (`new_group`), so stopping it stops what it started too;
- death with this process, even by SIGKILL (Linux PR_SET_PDEATHSIG, `death_signal`): a
  SIGKILLed `loom bringup` or manager otherwise leaves orphans holding ports and files (a Zenoh
  router holding its port made the next bring-up fail). The kernel's "parent" is the thread that
  forked, not the process, so a child forked from a short-lived thread would be killed when that
  thread ends: Process forks on the main thread when called there, else on one forking thread
  that lives as long as this process (see `_Forker`);
- a stop that runs out of time asks the child for its threads' stacks before SIGKILL, when it
  was started with `stacks_signal` (Loom's nodes: stop_signals.STACKS_SIGNAL, which their
  faulthandler answers even while a thread holds the GIL), so a hang is said, not only killed;
- by default (`stderr=TAIL`) its stderr read by a thread into a bounded tail (lines cut at
  MAX_LINE_BYTES, `tail_lines` kept) for error messages, optionally echoed to a stream so logs
  still reach the console.

RestartPolicy / Restarts decide restarts (exponential backoff, a limit, forgiveness after a
stable run) without side effects and with an injected clock; Supervised applies them to a
Process factory.
"""
from __future__ import annotations

import collections
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Callable, Sequence

from loom_ros.bringup.stop_signals import STOP_SIGNALS

PR_SET_PDEATHSIG = 1
# Loaded here, not in the child: between fork and exec only the prctl call itself runs.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith('linux') else None

TAIL = 'tail'            # stderr=TAIL: read it into a bounded tail (the default)
TAIL_LINES = 40
MAX_LINE_BYTES = 4096    # a longer stderr "line" is cut: a child cannot make the tail unbounded
_JOIN_READER_S = 2.0     # stop(): for the stderr reader to see the pipe close
_KILLED_WAIT_S = 5.0     # stop(): for the process to be gone after SIGKILL
_STACKS_WAIT_S = 1.0     # stop(): for a child's stack dump (stacks_signal) before SIGKILL
_CATCH_UP_S = 0.5        # last_words(): for the tail to take a dead child's last lines


def die_with_parent(signum: int = signal.SIGTERM):
    """A preexec_fn that makes the child receive `signum` when the forking thread dies; if this
    process already died before the call took effect, the child signals itself at once."""
    parent = os.getpid()

    def preexec() -> None:
        # SIGINT is how every Loom process is asked to stop (it commits its state on the way
        # out). A shell starts background jobs with SIGINT ignored, and an ignored disposition
        # is inherited: without this, `loom bringup &`'s nodes would wait for SIGKILL. SIGTERM
        # too: until exec this is still the parent's Python, whose stop handler (stop_signals)
        # would take the signal below and tell the *parent* to stop through their shared pipe
        # (the wakeup descriptor, the same pipe, stop_signals forgets at every fork).
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_DFL)
        if _LIBC is None:
            return
        _LIBC.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)
    return preexec


class _Forker:
    """One thread that lives as long as the process and runs the forks asked of it from other
    threads: PR_SET_PDEATHSIG fires when the *forking thread* ends, and a sandboxed plugin or a
    TTS worker is often (re)started from an executor or request thread. Process-wide by nature
    (it stands for the kernel's per-thread rule), created on first use."""

    _lock = threading.Lock()
    _instance: '_Forker | None' = None

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name='loom-forker').start()

    @classmethod
    def get(cls) -> '_Forker':
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _run(self) -> None:
        while True:
            make, box, done = self._jobs.get()
            try:
                box['value'] = make()
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                box['error'] = exc
            done.set()

    def call(self, make: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        box, done = {}, threading.Event()
        self._jobs.put((make, box, done))
        done.wait()
        if 'error' in box:
            raise box['error']
        return box['value']


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f'signal {code}'


class Process:
    """One child process: configure, start(), then poll/stop/exit_reason. `popen` is the
    subprocess.Popen (for pipes a caller asked for: stdin/stdout=PIPE). Not restarted here: make
    a new Process (Supervised does)."""

    def __init__(self, args: Sequence[str], *, name: str = '', env: dict | None = None,
                 cwd: str | None = None, stdin=None, stdout=None, stderr=TAIL,
                 echo_stderr: IO[str] | None = None, tail_lines: int = TAIL_LINES,
                 death_signal: int | None = signal.SIGTERM, new_group: bool = True,
                 text: bool = False, bufsize: int = -1, preexec: Callable[[], None] | None = None,
                 close_fds: bool = True, stacks_signal: int | None = None):
        """`env`: the child's whole environment (None: this one's). `stderr`: TAIL (kept in a
        tail, echoed to `echo_stderr` if given), or anything Popen takes (a file, DEVNULL, None
        to inherit). `death_signal`: what the child gets when this process dies (None: nothing).
        `preexec`: more to run in the child before exec (e.g. rlimits), after the death signal.
        `stacks_signal`: sent to the child alone when stop() runs out of time, before SIGKILL
        (only for children that answer it with their stacks: its default action kills)."""
        self.args = [str(a) for a in args]
        self.name = name or os.path.basename(self.args[0])
        self.env, self.cwd = env, cwd
        self._stdin, self._stdout, self._stderr = stdin, stdout, stderr
        self.echo_stderr = echo_stderr
        self.death_signal, self.new_group = death_signal, new_group
        self.text, self.bufsize, self.close_fds = text, bufsize, close_fds
        self._preexec = preexec
        self.stacks_signal = stacks_signal
        self._tail: collections.deque[str] = collections.deque(maxlen=max(1, int(tail_lines)))
        self._tail_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.popen: subprocess.Popen | None = None
        self.started_at: float | None = None   # time.monotonic() at start

    # -- start ------------------------------------------------------------------------------
    def start(self) -> 'Process':
        if self.popen is not None:
            raise RuntimeError(f'{self.name} was started already; make a new Process')
        death = die_with_parent(self.death_signal) if self.death_signal else None
        extra = self._preexec

        def preexec() -> None:
            if death is not None:
                death()
            if extra is not None:
                extra()
        stderr = subprocess.PIPE if self._stderr == TAIL else self._stderr

        def make() -> subprocess.Popen:
            return subprocess.Popen(
                self.args, env=self.env, cwd=self.cwd, stdin=self._stdin, stdout=self._stdout,
                stderr=stderr, start_new_session=self.new_group, close_fds=self.close_fds,
                preexec_fn=preexec if (death or extra) else None, text=self.text,
                bufsize=self.bufsize)
        on_main = threading.current_thread() is threading.main_thread()
        self.popen = make() if on_main or death is None else _Forker.get().call(make)
        self.started_at = time.monotonic()
        if self._stderr == TAIL:
            self._reader = threading.Thread(target=self._read_stderr, daemon=True,
                                            name=f'loom-stderr-{self.name}'[:60])
            self._reader.start()
        return self

    def _read_stderr(self) -> None:
        stream = self.popen.stderr
        try:
            while True:
                line = stream.readline(MAX_LINE_BYTES)
                if not line:
                    return
                if isinstance(line, bytes):
                    line = line.decode(errors='replace')
                line = line.rstrip('\r\n')
                with self._tail_lock:
                    self._tail.append(line)
                if self.echo_stderr is not None:
                    try:
                        self.echo_stderr.write(line + '\n')
                        self.echo_stderr.flush()
                    except (OSError, ValueError):
                        self.echo_stderr = None   # the echo target closed: keep the tail only
        except (OSError, ValueError):
            return

    # -- state ------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def poll(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if still running after `timeout` seconds."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self) -> list[str]:
        """The last stderr lines (with stderr=TAIL), oldest first."""
        with self._tail_lock:
            return list(self._tail)

    def clear_tail(self) -> None:
        """Forget the tail, e.g. before a request whose failure should quote only itself."""
        with self._tail_lock:
            self._tail.clear()

    def last_words(self) -> str:
        """The last non-blank stderr line ('' if none); once the child has exited, after the
        tail caught up with what it wrote (bounded: a grandchild may hold the pipe open)."""
        if self._reader is not None and self.poll() is not None:
            self._reader.join(_CATCH_UP_S)
        return next((line for line in reversed(self.tail()) if line.strip()), '')

    def exit_reason(self) -> str:
        """'running', 'exited with code N' or 'was killed by SIGx', plus its last stderr line."""
        code = self.poll()
        if code is None:
            return 'running' if self.popen is not None else 'not started'
        why = f'was killed by {_signal_name(-code)}' if code < 0 else f'exited with code {code}'
        last = self.last_words()
        return why + (f'; last words: {last}' if last else '')

    # -- stop -------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """SIGINT, without waiting (stop_together)."""
        self.send_signal(signal.SIGINT)

    def send_signal(self, signum: int) -> bool:
        """Send `signum` to the child's process group (to the child alone without new_group).
        False when there was nothing left to signal."""
        if self.popen is None:
            return False
        try:
            if self.new_group:
                os.killpg(self.popen.pid, signum)
            elif self.popen.poll() is None:
                self.popen.send_signal(signum)
            else:
                return False
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def stop(self, timeout_s: float = 10.0, signum: int = signal.SIGINT) -> int | None:
        """`signum` to the whole group, up to `timeout_s` for the child to exit, then SIGKILL
        to the group (which also takes stragglers the child left behind). Returns the exit code
        (None only if it survived SIGKILL for 5 s: a process stuck in the kernel)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None and signum != signal.SIGKILL:
            self.send_signal(signum)
            self.wait(timeout_s)
            if self.stacks_signal is not None and self.popen.poll() is None:
                try:   # its stacks to its stderr (the tail, the echo): where it hung
                    os.kill(self.popen.pid, self.stacks_signal)
                except ProcessLookupError:
                    pass
                self.wait(_STACKS_WAIT_S)
        if self.new_group or self.popen.poll() is None:
            self.send_signal(signal.SIGKILL)
        code = self.wait(_KILLED_WAIT_S)
        streams = [self.popen.stdin]
        if self._reader is not None:
            self._reader.join(_JOIN_READER_S)
            if not self._reader.is_alive():   # closing under a blocked reader would block
                streams.append(self.popen.stderr)
        for stream in streams:
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        return code

    def kill(self) -> int | None:
        """SIGKILL the whole group at once."""
        return self.stop(signum=signal.SIGKILL)


def stop_together(children, timeout_s: float) -> list[int | None]:
    """SIGINT to every child (Process or Supervised) at once, then each stopped on one
    deadline `timeout_s` away, not a wait of its own each: SIGKILL to what is left then. The
    exit codes, in order; at most stop_bound_s(timeout_s) when one needs SIGKILL."""
    children = list(children)
    for child in children:
        child.interrupt()
    deadline = time.monotonic() + timeout_s
    return [child.stop(max(0.0, deadline - time.monotonic())) for child in children]


def stop_bound_s(timeout_s: float) -> float:
    """The longest `Process.stop(timeout_s)` takes: the wait, the stack dump's, the wait after
    SIGKILL, the stderr reader's join."""
    return timeout_s + _STACKS_WAIT_S + _KILLED_WAIT_S + _JOIN_READER_S


def spawn(args: Sequence[str], **options) -> Process:
    """Process(args, **options).start()."""
    return Process(args, **options).start()


# -- restarts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RestartPolicy:
    """How often a dead child is started again: after `initial_backoff_s`, doubling (`factor`)
    up to `max_backoff_s`; at most `max_restarts` restarts, counted afresh once the child has
    run `stable_after_s` without failing."""

    max_restarts: int = 5
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    factor: float = 2.0
    stable_after_s: float = 60.0

    def backoff_s(self, restarts: int) -> float:
        """The wait before restart number `restarts` (1 for the first)."""
        if restarts <= 0:
            return 0.0
        return min(self.max_backoff_s, self.initial_backoff_s * self.factor ** (restarts - 1))


class Restarts:
    """Pure restart bookkeeping for one child, on an injected clock (seconds, monotonic).

    started() when a child (re)starts; failed(reason) when it dies: returns the clock time at
    which the next start may happen, or None once `max_restarts` is spent (`gave_up` then holds
    the reason). due() says whether that time has come."""

    def __init__(self, policy: RestartPolicy = RestartPolicy(),
                 clock: Callable[[], float] = time.monotonic):
        self.policy, self.clock = policy, clock
        self.count = 0                 # restarts so far (since the last stable run)
        self.total = 0                 # restarts ever
        self.up_since: float | None = None
        self.next_at: float | None = None
        self.gave_up = ''

    def started(self) -> None:
        self.up_since, self.next_at = self.clock(), None

    def failed(self, reason: str) -> float | None:
        now = self.clock()
        if self.up_since is not None and now - self.up_since >= self.policy.stable_after_s:
            self.count = 0   # it ran well for a while: this is a new failure, not a crash loop
        self.up_since = None
        if self.count >= self.policy.max_restarts:
            self.gave_up = f'{reason}; gave up after {self.count} restarts'
            self.next_at = None
            return None
        self.count += 1
        self.total += 1
        self.next_at = now + self.policy.backoff_s(self.count)
        return self.next_at

    def due(self) -> bool:
        return self.next_at is not None and self.clock() >= self.next_at

    def reset(self) -> None:
        """An operator's fresh start: the count and any give-up are forgotten."""
        self.count, self.gave_up, self.next_at = 0, '', None


class Supervised:
    """A child kept running: `make()` returns a new (unstarted) Process; poll() starts it, notices
    its death and starts a new one when the RestartPolicy allows. Call poll() periodically (a
    timer, a loop); nothing here runs by itself. `on_event(kind, text)` hears 'started',
    'exited', 'gave_up'."""

    def __init__(self, make: Callable[[], Process], policy: RestartPolicy = RestartPolicy(),
                 clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[str, str], None] | None = None):
        self.make, self.on_event = make, on_event
        self.restarts = Restarts(policy, clock)
        self.process: Process | None = None
        self.stopped = False

    @property
    def state(self) -> str:
        """'running', 'waiting' (to restart), 'failed' (gave up) or 'stopped'."""
        if self.stopped:
            return 'stopped'
        if self.restarts.gave_up:
            return 'failed'
        return 'running' if self.process is not None and self.process.running else 'waiting'

    def poll(self) -> str:
        if self.stopped or self.restarts.gave_up:
            return self.state
        if self.process is not None and not self.process.running:
            reason = f'{self.process.name} {self.process.exit_reason()}'
            self.process = None
            self._tell('exited', reason)
            if self.restarts.failed(reason) is None:
                self._tell('gave_up', self.restarts.gave_up)
                return self.state
        if self.process is None and (self.restarts.next_at is None or self.restarts.due()):
            self.process = self.make().start()
            self.restarts.started()
            self._tell('started', f'{self.process.name} pid {self.process.pid}')
        return self.state

    def interrupt(self) -> None:
        """Not restarted from now on; SIGINT to the running process (stop_together)."""
        self.stopped = True
        if self.process is not None:
            self.process.interrupt()

    def stop(self, timeout_s: float = 10.0, signum: int = signal.SIGINT) -> int | None:
        self.stopped = True
        process, self.process = self.process, None
        return process.stop(timeout_s, signum) if process is not None else None

    def _tell(self, kind: str, text: str) -> None:
        if self.on_event is not None:
            self.on_event(kind, text)
