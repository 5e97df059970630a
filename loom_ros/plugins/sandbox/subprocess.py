"""Out-of-process plugins: a plugin class run in a child process with resource limits, behind a
proxy that presents the plugin contract, so the host treats it like an in-process plugin.

The child (loom_ros.plugins.sandbox.worker) is started by bringup.processes (Loom's one way to
start processes): its own session and process group, SIGKILLed should the host die, a bounded
stderr tail for crash reasons. It runs as a child subreaper, under rlimits that are on by
default: address space (`memory_bytes`, 1 GiB), CPU seconds over its life (`cpu_seconds`,
3600), open files (`open_files`, 1024), the size of any file it writes (`file_size_bytes`,
256 MiB) and no core dumps; 0 or None lifts one. It talks length-prefixed JSON over its
stdin/stdout. A crash (the child exits), a hang (no answer within `call_timeout_s`), running out
of memory or a protocol violation is detected, answered as a PluginResponse.failure that says why,
and the child is started again on the next call. More than `max_restarts` such failures in a row
(no successful call in between) mark the plugin FAILED: it then refuses calls with a clear error
until `restart()` is called.

The host's side is bounded against the child: frames over wire.MAX_FRAME_BYTES (8 MiB) are
refused from their header, JSON with too many elements or too deep a nesting before or as it is
parsed, and the child answers exactly one frame per request. Anything else (a frame nobody asked
for, a wrong sequence number, a refused frame) is a protocol violation: counted
(`protocol_violations`), the child's process group SIGKILLed at once (a child flooding the pipe
filled the host's memory before), the waiting call answered with the reason, and the child
restarted as after a crash.

Environment: the child gets an allowlist of the host's (CHILD_ENVIRONMENT: paths, locale, the
interpreter's settings), the names in `pass_env`, and its tree token; never the rest (secrets
such as API keys live there).

Audit: the child may forward only the records its capability guard makes (CHILD_AUDIT_KINDS),
at most MAX_CHILD_AUDIT_RECORDS per answer, scalar fields cut to MAX_CHILD_AUDIT_CHARS, each
marked `reported_by: sandboxed_child`; the rest are counted (`audit_refused`, `audit_dropped`).
What the child wrote to stderr may be quoted in a failure's error and in health, never in the
audit log (its size is recorded): it may quote the private event it was handling.

Capabilities: the child runs the plugin under the same capability guard as in-process plugins
(`guard`, default on), for the whole process and all its threads: network, file reads outside the
runtime's own files, writes, SQLite and ATTACH need their grants, starting processes needs
`process.spawn` and ctypes `native.code`. That guard is a Python audit hook in the child's own
interpreter: it keeps an honest plugin's mistakes loud, but a hostile plugin can switch it off
(`loom_ros.security.capabilities._process_ctx = None`) or go around it with native code. What
holds against a hostile plugin is only what the kernel enforces: the rlimits, a separate address
space, the environment allowlist, and the whole tree killed on failure. The child runs as the same
user, in the same namespaces, without seccomp: it can read and write whatever that user can and
use the network. With `guard: false` only the plugin's own PluginContext.require checks apply.

Stopping: every descendant of the child is found through /proc, both by parentage (the child is a
subreaper, so double-forked grandchildren stay below it) and by a token in the environment it
passes down (which finds processes orphaned by a child that already died, unless they cleared
their environment); all are frozen with SIGSTOP until no new one appears, then SIGKILLed with the
child's process group. shutdown() therefore returns within a bounded time even when a grandchild
left the process group and holds the child's pipes.

RLIMIT_CPU counts the child's whole life: a child that reaches it is killed and restarted with a
fresh budget (that counts as a failure only if no call succeeded since the last one).
"""
from __future__ import annotations

import collections
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loom_ros.bringup.processes import Process
from loom_ros.bus.event import Event
from loom_ros.plugins.contract import (HealthState, HealthStatus, Plugin, PluginContext,
                                       PluginError, PluginMetadata, PluginResponse)
from loom_ros.plugins.sandbox.wire import (WireError, event_to_wire, health_from_wire,
                                           read_frame, response_from_wire, write_frame)
from loom_ros.plugins.sandbox import worker as worker_module

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])  # the directory holding loom_ros/
STDERR_TAIL_LINES = 40
DEFAULT_MEMORY_BYTES = 1 << 30
DEFAULT_CPU_SECONDS = 3600.0
DEFAULT_OPEN_FILES = 1024
DEFAULT_FILE_SIZE_BYTES = 256 << 20
TREE_TOKEN_VARIABLE = 'LOOM_SANDBOX_TOKEN'
# What the child inherits of the host's environment: what the worker needs to start and import
# Loom and its plugins (PATH, PYTHONPATH, the venv's native libraries), locale and time zone, the
# interpreter's settings and CA paths (not secrets). Anything else only through `pass_env`.
CHILD_ENVIRONMENT = frozenset({
    'PATH', 'HOME', 'LANG', 'LANGUAGE', 'TZ', 'TMPDIR', 'PYTHONPATH', 'PYTHONFAULTHANDLER',
    'PYTHONDONTWRITEBYTECODE', 'PYTHONUNBUFFERED', 'PYTHONIOENCODING', 'LD_LIBRARY_PATH',
    '_ROS_WHEELS_BOOTSTRAP_COMPLETE', 'SSL_CERT_FILE', 'SSL_CERT_DIR', 'OMP_NUM_THREADS',
    'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'})
CHILD_ENVIRONMENT_PREFIXES = ('LC_',)


def child_environment(pass_env=(), environ=None) -> dict[str, str]:
    """What a child process Loom starts from its own code gets of this process's environment:
    CHILD_ENVIRONMENT, the LC_ names and `pass_env`, with Loom's package root on PYTHONPATH.
    The plugin sandbox and the speech worker use it; the rest (API keys, the storage master
    key, cloud tokens) stays in this process."""
    environ = os.environ if environ is None else environ
    env = {name: value for name, value in environ.items()
           if name in CHILD_ENVIRONMENT or name.startswith(CHILD_ENVIRONMENT_PREFIXES)
           or name in pass_env}
    env['PYTHONPATH'] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get('PYTHONPATH')) if p)
    return env
# The records the child's capability guard makes (PluginContext.require and
# loom_ros.security.capabilities), with the fields they carry; a child may forward no others.
CHILD_AUDIT_KINDS = {'capability_denied': ('capability', 'detail'), 'process_spawn': ('detail',)}
MAX_CHILD_AUDIT_RECORDS = 32    # per answer: a call that is refused more often is counted
MAX_CHILD_AUDIT_CHARS = 512     # per field
REPLY_QUEUE_FRAMES = 2          # the one answer being waited for, and the end of the stream
_KILL_ROUNDS = 50        # rescans while freezing a tree that keeps forking
_JOIN_READERS_S = 5.0    # the pipes close once the whole tree is dead
_WAIT_DEAD_S = 5.0       # for SIGKILLed processes to exit


def _parents(proc: Path) -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    out = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / 'stat').read_bytes()
            out[int(entry.name)] = int(stat.rpartition(b')')[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return out


def _marked(proc: Path, token: bytes, pids) -> set[int]:
    """The processes among `pids` whose environment carries `token`."""
    found = set()
    for pid in pids:
        try:
            if token in (proc / str(pid) / 'environ').read_bytes().split(b'\0'):
                found.add(pid)
        except OSError:
            continue
    return found


def process_tree(root: int, token: bytes = b'', proc: Path = Path('/proc')) -> set[int]:
    """`root` (if alive), its descendants, and any process whose environment holds `token`
    (descendants orphaned when their parent died), never this process or init."""
    parents = _parents(proc)
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, parent in parents.items():
        children[parent].append(pid)
    tree, todo = set(), [root] if root in parents else []
    if token:
        todo += _marked(proc, token, parents)
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, ()))
    return tree - {os.getpid(), 0, 1}


def kill_tree(root: int, token: bytes = b'') -> int:
    """Freeze (SIGSTOP) the tree until no new process appears, then SIGKILL all of it. A
    stopped process can neither fork nor exit, so nothing escapes between scan and kill.
    Returns how many processes were killed."""
    stopped: set[int] = set()
    for _ in range(_KILL_ROUNDS):
        new = process_tree(root, token) - stopped
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    _wait_dead(stopped, _WAIT_DEAD_S)
    return len(stopped)


def _wait_dead(pids: set[int], timeout_s: float) -> None:
    """Until every pid has exited (gone or a zombie): SIGKILL is delivered asynchronously."""
    deadline = time.monotonic() + timeout_s
    waiting = set(pids)
    while waiting and time.monotonic() < deadline:
        waiting = {pid for pid in waiting if _running(pid)}
        if waiting:
            time.sleep(0.005)


def _running(pid: int) -> bool:
    try:
        state = Path(f'/proc/{pid}/stat').read_bytes().rpartition(b')')[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b'Z', b'X')


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Eof:
    """What the reader thread queues when the child's stdout ends or breaks."""

    def __init__(self, why: str):
        self.why = why


_HELLO = object()   # what a new child's first frame answers


class _Child:
    """One generation of the child process (started by bringup.processes: own session and
    group, SIGKILLed if the host dies, a bounded stderr tail for crash reasons): its pipes and a
    reader thread that queues the one frame a request asked for."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.token = f'{TREE_TOKEN_VARIABLE}={secrets.token_hex(16)}'
        env = {**env, TREE_TOKEN_VARIABLE: self.token.partition('=')[2]}
        self.expecting: object = _HELLO  # the seq of the one frame the host waits for, or None
        self.violation = ''  # why the child was stopped for breaking the protocol ('' if not)
        self.process = Process(args, name='loom-sandbox', env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, tail_lines=STDERR_TAIL_LINES,
                               death_signal=signal.SIGKILL).start()
        self.popen = self.process.popen
        self.replies: queue.Queue = queue.Queue(maxsize=REPLY_QUEUE_FRAMES)
        self.killed = 0  # processes of its tree (itself included) killed by kill()
        self.on_kill = None  # called after the tree is killed (the proxy counts it)
        self.reader = threading.Thread(target=self._read_replies, daemon=True,
                                       name='loom-sandbox-out')
        self.reader.start()

    def _read_replies(self) -> None:
        """Queue the frame the host asked for; anything else stops the child. Nothing the child
        writes accumulates in the host: one frame at a time, each bounded by the wire."""
        try:
            while True:
                message = read_frame(self.popen.stdout)
                if message is None:
                    self._offer(_Eof('the child closed its output'))
                    return
                why = self._unsolicited(message)
                if why:
                    self._broke_protocol(why)
                    return
                self.expecting = None
                try:
                    self.replies.put_nowait(message)
                except queue.Full:
                    self._broke_protocol('it sent more frames than the host reads')
                    return
        except (WireError, OSError, ValueError, RecursionError) as exc:
            self._broke_protocol(f'broken output: {exc}')

    def _unsolicited(self, message) -> str:
        """Why `message` is not the frame the host waits for ('' when it is). Says nothing the
        child wrote: the reason goes to the audit log."""
        expected = self.expecting
        if not isinstance(message, dict):
            return f'it sent a JSON {type(message).__name__}, not an object'
        if expected is None:
            return 'it sent a frame while no request was waiting'
        if expected is _HELLO:
            return '' if message.get('op') == 'hello' else 'its first frame was not its hello'
        if message.get('seq') != expected:
            return f'it sent a frame that answers another request while {expected} was waiting'
        return ''

    def _broke_protocol(self, why: str) -> None:
        """Stop the child's group at once (it may be flooding the pipe); the proxy kills the
        rest of its tree, counts the violation and restarts it."""
        self.violation = why
        self._offer(_Eof(why))
        self.process.send_signal(signal.SIGKILL)

    def _offer(self, item) -> None:
        try:
            self.replies.put_nowait(item)
        except queue.Full:
            pass  # an answer nobody took yet: the proxy looks at `violation` and the exit

    def send(self, message: dict) -> None:
        self.process.clear_tail()  # a crash reason quotes only what this request made it say
        self.expecting = message['seq']   # before the write: the answer may come at once
        try:
            write_frame(self.popen.stdin, message)
        except WireError:
            self.expecting = None   # refused before anything was written
            raise

    def kill(self) -> None:
        """SIGKILL the child's whole tree: its process group, its descendants (also those that
        left the group) and orphans carrying its token. Bounded: a reader blocked on a pipe some
        survivor still holds is left behind (a daemon thread) rather than waited for."""
        if self.popen.poll() is None:
            _signal(self.popen.pid, signal.SIGSTOP)  # no more forks while the tree is scanned
        self.killed += kill_tree(self.popen.pid, self.token.encode())
        if self.on_kill is not None:
            self.on_kill(self)
        self.process.stop(timeout_s=0, signum=signal.SIGKILL)   # the group; closes stdin
        if self.reader is not threading.current_thread():
            self.reader.join(timeout=_JOIN_READERS_S)
        if not self.reader.is_alive():  # closing under a blocked reader would block on its lock
            try:
                self.popen.stdout.close()
            except OSError:
                pass

    def last_stderr(self) -> str:
        return self.process.last_words()


class ChildFailure(Exception):
    """The child crashed, hung or broke the protocol; the message says which and why.

    `reason` is the host's own words, the only part the audit log keeps; str() adds the child's
    last stderr line (`last_words`) for the caller and health."""

    def __init__(self, reason: str, hang: bool = False, *, violation: bool = False,
                 last_words: str = '', stderr_chars: int = 0):
        super().__init__(reason + (f'; its last words: {last_words}' if last_words else ''))
        self.reason, self.hang, self.violation = reason, hang, violation
        self.stderr_chars = stderr_chars


class SubprocessPlugin(Plugin):
    """A proxy Plugin whose real plugin runs in a resource-limited child process."""

    def __init__(self, target: str, *, cpu_seconds: float | None = DEFAULT_CPU_SECONDS,
                 memory_bytes: int | None = DEFAULT_MEMORY_BYTES,
                 open_files: int | None = DEFAULT_OPEN_FILES,
                 file_size_bytes: int | None = DEFAULT_FILE_SIZE_BYTES,
                 call_timeout_s: float = 10.0,
                 start_timeout_s: float = 60.0, health_timeout_s: float = 5.0,
                 max_restarts: int = 3, guard: bool = True, python: str | None = None,
                 pass_env: list[str] | tuple[str, ...] = ()) -> None:
        """`pass_env`: names of host environment variables the child gets besides
        CHILD_ENVIRONMENT (an operator's choice, e.g. a proxy or a model path)."""
        super().__init__()
        if call_timeout_s <= 0 or start_timeout_s <= 0 or max_restarts < 0:
            raise PluginError(f'{target}: call_timeout_s and start_timeout_s must be > 0, '
                              'max_restarts >= 0')
        self.target = target
        self.cpu_seconds, self.memory_bytes = cpu_seconds, memory_bytes
        self.open_files, self.file_size_bytes = open_files, file_size_bytes
        self.call_timeout_s, self.start_timeout_s = float(call_timeout_s), float(start_timeout_s)
        self.health_timeout_s = float(health_timeout_s)
        self.max_restarts = int(max_restarts)
        self.guard = bool(guard)
        self.python = python or sys.executable
        self.pass_env = tuple(str(name) for name in pass_env)
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._seq = 0
        self._failed = ''
        self._consecutive_failures = 0
        self._last_error = ''
        self._last_reason = ''   # the last child failure in the host's words (for the audit)
        self._busy_since: float | None = None
        self.stats = {'calls': 0, 'failures': 0, 'crashes': 0, 'timeouts': 0, 'restarts': 0,
                      'denied': 0, 'tree_killed': 0, 'protocol_violations': 0,
                      'audit_refused': 0, 'audit_dropped': 0}
        with self._lock:
            self.metadata = self._start()  # per instance: one proxy class serves every plugin

    # -- child lifecycle --------------------------------------------------------------------
    def _args(self) -> list[str]:
        args = [self.python, '-m', worker_module.__name__, self.target]
        if self.cpu_seconds:
            args += ['--cpu-seconds', str(self.cpu_seconds)]
        if self.memory_bytes:
            args += ['--memory-bytes', str(int(self.memory_bytes))]
        if self.open_files:
            args += ['--open-files', str(int(self.open_files))]
        if self.file_size_bytes:
            args += ['--file-size-bytes', str(int(self.file_size_bytes))]
        if self.guard:
            args.append('--guard')
        return args

    def _env(self) -> dict[str, str]:
        """The allowlisted part of the host's environment (the rest may hold its secrets)."""
        env = child_environment(self.pass_env)
        if self.memory_bytes:
            env.setdefault('OPENBLAS_NUM_THREADS', '1')  # its per-thread buffers eat address space
        return env

    def _count_kill(self, child: _Child) -> None:
        self.stats['tree_killed'] += child.killed
        child.killed = 0

    def _start(self) -> PluginMetadata:
        """Start a child and read its hello; PluginError with the child's reason if it fails."""
        child = _Child(self._args(), self._env())
        child.on_kill = self._count_kill
        try:
            hello = self._receive(child, None, self.start_timeout_s, 'starting')
        except ChildFailure as exc:
            child.kill()
            raise PluginError(f'subprocess plugin {self.target}: {exc}',
                              audit_reason=f'subprocess plugin {self.target}: {exc.reason}') \
                from None
        if hello.get('error') or not isinstance(hello.get('metadata'), dict):
            child.kill()
            raise PluginError(f'subprocess plugin {self.target} cannot load: '
                              f'{hello.get("error") or "no metadata in its hello"}')
        try:
            metadata = PluginMetadata.model_validate(hello['metadata'])
        except ValueError as exc:
            child.kill()
            raise PluginError(f'subprocess plugin {self.target}: bad metadata: {exc}') from None
        self._child = child
        return metadata

    def _restart(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child = None
        self._start()
        self.stats['restarts'] += 1
        if self.ctx is not None:
            self._init_child(self.ctx)
            self.ctx.audit('sandbox_restart', target=self.target,
                           restarts=self.stats['restarts'], last_error=self._last_reason)

    def _init_child(self, ctx: PluginContext) -> None:
        reply = self._request({'op': 'init', 'ctx': {
            'plugin': ctx.plugin, 'config': ctx.config, 'granted': sorted(ctx.granted),
            'data_dir': ctx.data_dir}}, self.start_timeout_s, 'init')
        self._forward_audit(reply)
        if not reply.get('ok'):
            raise PluginError(f'plugin {self.label!r} failed init in its subprocess: '
                              f'{reply.get("error")}')

    def _forward_audit(self, reply: dict) -> None:
        """The child's guard records into the host's sink, marked as the child's word: only
        CHILD_AUDIT_KINDS with their fields, at most MAX_CHILD_AUDIT_RECORDS per answer. The
        child is the plugin, so it could claim any kind (an `actuator_command` it never made) and
        any number (150,000 rows held the host 13.6 s); those are counted, not written.
        Refusals are counted (`denied`)."""
        records = reply.get('audit')
        if not isinstance(records, list):
            return
        forwarded, refused, dropped = 0, 0, 0
        for record in records:
            kind = record.get('kind') if isinstance(record, dict) else None
            fields = CHILD_AUDIT_KINDS.get(kind) if isinstance(kind, str) else None
            if fields is None:
                refused += 1
                continue
            if forwarded == MAX_CHILD_AUDIT_RECORDS:
                dropped += 1
                continue
            forwarded += 1
            if kind == 'capability_denied':
                self.stats['denied'] += 1
            if self.ctx is not None:
                self.ctx.audit(kind, **{name: _scalar(record.get(name)) for name in fields},
                               reported_by='sandboxed_child')
        self.stats['audit_refused'] += refused
        self.stats['audit_dropped'] += dropped
        if (refused or dropped) and self.ctx is not None:   # one record of the host's own
            self.ctx.audit('sandbox_audit_refused', target=self.target, refused=refused,
                           dropped=dropped)

    def _receive(self, child: _Child, seq: int | None, timeout: float, what: str) -> dict:
        """The child's reply to `seq` (or its hello), or ChildFailure saying why there is none.
        The reader queues only the frame asked for: anything else is a violation."""
        try:
            message = child.replies.get(timeout=timeout)
        except queue.Empty:
            raise ChildFailure(f'no answer while {what} within {timeout:g} s '
                               '(hung); killed', hang=True) from None
        if isinstance(message, _Eof):
            raise self._failure(child, what)
        if not isinstance(message, dict) or (seq is not None and message.get('seq') != seq):
            raise ChildFailure(f'the child broke the protocol while {what}: an answer to '
                               'another request; killed', violation=True)
        return message

    def _failure(self, child: _Child, what: str) -> ChildFailure:
        """Why `child` gave no answer: the protocol violation it was stopped for, else how it
        exited (and its last stderr line, kept out of the audit)."""
        if child.violation:
            return ChildFailure(f'the child broke the protocol while {what}: {child.violation}; '
                                'killed', violation=True)
        return self._exit_reason(child, what)

    def _exit_reason(self, child: _Child, what: str) -> ChildFailure:
        try:
            code = child.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return ChildFailure(f'the child closed its output while {what} but is still '
                                'running; killed')
        if code == worker_module.EXIT_OUT_OF_MEMORY:
            why = 'ran out of memory'
            if self.memory_bytes:
                why += f' (address-space limit {self.memory_bytes} bytes, RLIMIT_AS)'
        elif code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f'signal {-code}'
            why = f'was killed by {name}'
            if -code == signal.SIGXCPU:
                why += f' (CPU time limit {self.cpu_seconds:g} s, RLIMIT_CPU)'
        else:
            why = f'exited with code {code}'
        return ChildFailure(f'the child {why} while {what}', last_words=child.last_stderr(),
                            stderr_chars=sum(len(line) for line in child.process.tail()))

    def _request(self, message: dict, timeout: float, what: str) -> dict:
        """Send and wait for the answer; ChildFailure after killing a child that hung or broke
        the protocol."""
        child = self._child
        if child is None:
            raise ChildFailure('no child running')
        if child.violation or child.popen.poll() is not None:
            raise self._failure(child, what)
        self._seq += 1
        message['seq'] = self._seq
        try:
            child.send(message)
        except WireError:
            raise   # the request itself is over the wire's bounds: nothing was written
        except (OSError, ValueError):
            raise self._failure(child, what) from None
        try:
            return self._receive(child, self._seq, timeout, what)
        except ChildFailure:
            child.kill()
            raise

    def _child_failed(self, exc: ChildFailure, hang: bool) -> str:
        """Count a crash, hang or protocol violation; FAILED after too many in a row. Returns the
        error to report. The audit record keeps the host's words, the exit code and how much
        the child wrote to stderr, not what it wrote (it may quote a private event)."""
        self.stats['timeouts' if hang else 'protocol_violations' if exc.violation
                   else 'crashes'] += 1
        self._consecutive_failures += 1
        exit_code = None
        if self._child is not None:
            self._child.kill()
            exit_code = self._child.popen.poll()
            self._child = None
        error = f'plugin {self.label!r} (subprocess): {exc}'
        self._last_reason = exc.reason
        if self._consecutive_failures > self.max_restarts:
            self._failed = (f'{self._consecutive_failures} crashes or hangs in a row '
                            f'(max_restarts {self.max_restarts}); last: {exc}')
            error += '; marked FAILED'
        else:
            error += '; restarting on the next call'
        if self.ctx is not None:
            self.ctx.audit('sandbox_failure', target=self.target, error=exc.reason,
                           exit_code=exit_code, stderr_chars=exc.stderr_chars,
                           failed=bool(self._failed))
        return error

    @property
    def label(self) -> str:
        """The name errors use: the host's instance name once initialised, else the metadata's."""
        return self.ctx.plugin if self.ctx is not None else self.metadata.name

    # -- the contract -----------------------------------------------------------------------
    def init(self, ctx: PluginContext) -> None:
        super().init(ctx)
        with self._lock:
            if self._child is None:
                self._start()
            try:
                self._init_child(ctx)
            except ChildFailure as exc:
                self._child_failed(exc, hang=exc.hang)
                raise PluginError(f'plugin {self.label!r} died during init: {exc}',
                                  audit_reason=f'plugin {self.label!r} died during init: '
                                  f'{exc.reason}') from None

    def handle_event(self, event: Event) -> PluginResponse:
        start = time.perf_counter()
        response = self._handle(event)
        response.latency_ms = (time.perf_counter() - start) * 1000.0
        return response

    def _handle(self, event: Event) -> PluginResponse:
        with self._lock:
            self.stats['calls'] += 1
            if self._failed:
                return self._fail(f'plugin {self.label!r} is failed and refuses calls: '
                                  f'{self._failed}')
            self._busy_since = time.monotonic()
            child = self._child
            if child is not None and child.violation:  # between calls: counted, then restarted
                error = self._child_failed(self._failure(child, 'idle'), hang=False)
                if self._failed:
                    self._busy_since = None
                    return self._fail(error)
            try:
                if self._child is None or self._child.popen.poll() is not None:
                    self._restart()
                reply = self._request({'op': 'handle', 'event': event_to_wire(event)},
                                      self.call_timeout_s, 'handling an event')
            except ChildFailure as exc:
                return self._fail(self._child_failed(exc, hang=exc.hang))
            except WireError as exc:  # an event the wire cannot carry: not the child's failure
                return self._fail(f'plugin {self.label!r} (subprocess): cannot send the event: '
                                  f'{exc}')
            except PluginError as exc:  # a restart that could not start or init the child
                self._consecutive_failures += 1
                self._failed = f'could not restart: {exc}'
                return self._fail(f'plugin {self.label!r} {self._failed}')
            finally:
                self._busy_since = None
            self._forward_audit(reply)
            if reply.get('fatal'):
                limit = (f' under its address-space limit of {self.memory_bytes} bytes (RLIMIT_AS)'
                         if self.memory_bytes else '')
                exc = ChildFailure(f'the child ran out of memory (MemoryError){limit} while '
                                   'handling an event and was stopped')
                return self._fail(self._child_failed(exc, hang=False))
            self._consecutive_failures = 0
            response = response_from_wire({k: reply[k] for k in ('ok', 'error', 'events')
                                           if k in reply}, self.metadata.name)
            if not response.ok:
                self._fail(response.error)
            return response

    def _fail(self, error: str) -> PluginResponse:
        self.stats['failures'] += 1
        self._last_error = error
        return PluginResponse.failure(error)

    def health(self) -> HealthStatus:
        """FAILED when refusing calls; DEGRADED while a child is dead, hung, or recovering from
        failures; else the plugin's own Health() from the child. Never blocks on a running call."""
        details = {k: str(v) for k, v in self.stats.items()}
        details.update(target=self.target, consecutive_failures=str(self._consecutive_failures),
                       last_error=self._last_error)
        if not self._lock.acquire(blocking=False):
            busy = self._busy_since
            elapsed = time.monotonic() - busy if busy is not None else 0.0
            state = HealthState.DEGRADED if elapsed > self.call_timeout_s else HealthState.OK
            return HealthStatus(state, f'a call has been running for {elapsed:.1f} s', details)
        try:
            if self._failed:
                return HealthStatus(HealthState.FAILED, self._failed, details)
            child = self._child
            if child is None or child.violation or child.popen.poll() is not None:
                if child is not None:  # died or broke the protocol between calls: count it now
                    error = self._child_failed(self._failure(child, 'idle'), hang=False)
                    self._last_error = details['last_error'] = error
                if self._failed:
                    return HealthStatus(HealthState.FAILED, self._failed, details)
                return HealthStatus(HealthState.DEGRADED, 'no child running; it starts on the '
                                    f'next call; last: {self._last_error}', details)
            try:
                reply = self._request({'op': 'health'}, self.health_timeout_s, 'answering health')
            except ChildFailure as exc:
                error = self._child_failed(exc, hang=exc.hang)
                self._last_error = details['last_error'] = error
                state = HealthState.FAILED if self._failed else HealthState.DEGRADED
                return HealthStatus(state, error, details)
            self._forward_audit(reply)
            details.update(denied=str(self.stats['denied']))
            health = health_from_wire(reply.get('health'))
            health.details = {**health.details, **details, 'pid': str(child.popen.pid)}
            if health.state is HealthState.OK and self._consecutive_failures:
                health.state = HealthState.DEGRADED
                health.message = f'recovering; last: {self._last_error}'
            return health
        finally:
            self._lock.release()

    def restart(self) -> None:
        """Start a fresh child and clear FAILED (an operator's decision after a fix)."""
        with self._lock:
            self._failed, self._consecutive_failures = '', 0
            self._restart()

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.popen.pid if child is not None and child.popen.poll() is None else None

    def shutdown(self) -> None:
        """Ask the child to shut down, then kill its whole process tree whatever it did
        (bounded: at most about 5 s for the answer, 5 s for the exit, then the kill)."""
        with self._lock:
            child, self._child = self._child, None
            if child is None:
                return
            if child.popen.poll() is None:
                try:
                    self._seq += 1
                    child.send({'op': 'shutdown', 'seq': self._seq})
                    self._receive(child, self._seq, min(self.call_timeout_s, 5.0), 'shutting down')
                    child.popen.wait(timeout=5)
                except (ChildFailure, OSError, ValueError, subprocess.TimeoutExpired):
                    pass
            child.kill()

    def __del__(self) -> None:
        child = getattr(self, '_child', None)
        try:
            if child is not None and child.popen.poll() is None:
                child.kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass


def _scalar(value):
    """A field of a record the child forwards, fit for the audit log: scalars, text cut short."""
    if value is None or isinstance(value, (bool, float)) or (
            isinstance(value, int) and -2**63 <= value < 2**63):
        return value
    return (value if isinstance(value, str) else type(value).__name__)[:MAX_CHILD_AUDIT_CHARS]
