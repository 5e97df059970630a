"""Capability grants and the runtime guard for plugins that run in the host's process.

Grants: a plugin gets what it declared (PluginMetadata.capabilities) AND its config grants AND
the host allows. Asking in config for something the plugin did not declare, or that the host
does not allow, or that does not exist, is a config error: the host refuses that plugin at Init.

The guard: plugins are supposed to call PluginContext.require before privileged work, but a
plugin that forgets (or oversteps on purpose) is still caught. While the host runs a plugin's
code, a Python audit hook (sys.addaudithook) checks its operations against the plugin's grants:
- network (socket connect/bind/send, name lookups) needs `network`;
- opening a file for writing, removing, renaming or creating files needs `storage.write`;
- opening a file for reading outside `readable_roots()` (the interpreter, installed packages and
  the models they ship, system libraries and data, Loom's package and config) needs
  `storage.read` (or `storage.write`);
- opening an SQLite file needs `storage.read` or `memory.read` when read-only (`mode=ro`),
  `storage.write` otherwise; without `storage.write` its connections may ATTACH nothing;
- starting a process (subprocess, os.system, exec, fork, posix_spawn) needs `process.spawn`;
- ctypes (loading a library, looking up a symbol, raw memory, C calls) and SQLite extensions
  need `native.code`, except loading a library an installed package ships, by its path, and
  looking up its symbols (as importing a C extension would).
Which plugin is acting: the thread's (PluginContext set by `acting_as`, inherited by threads the
plugin starts), else the process's (`act_as_process`: a subprocess plugin's worker, where every
thread is the plugin). Each refusal raises CapabilityDenied at the offending call and is audited
through the context (`capability_denied`), which is what the host counts.

What an audit hook cannot stop: native code already loaded (a C extension, or a ctypes function
pointer some library looked up before the plugin ran), Python code that rewrites this module's
state or sys.path, thread pools the host created before the plugin ran, and children of a granted
`process.spawn`. It is not a security boundary against a hostile plugin, in the host's process
or in the subprocess sandbox's worker (whose own code can switch it off); WASM is. The subprocess
sandbox adds rlimits, its own address space and process tree, and an allowlisted environment,
not isolation. It makes an honest plugin's mistakes loud.
"""
from __future__ import annotations

import _thread
import functools
import os
import site
import sqlite3
import sys
import sysconfig
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from loom_ros.plugins.contract import Capability, PluginContext, PluginMetadata

ALL_CAPABILITIES = frozenset(c.value for c in Capability)


class CapabilityConfigError(ValueError):
    """A grant in config that cannot be given; names the plugin, the capability and why."""


def _names(values: Iterable, plugin: str, where: str) -> set[str]:
    out = set()
    for value in values or ():
        name = value.value if isinstance(value, Capability) else value
        if not isinstance(name, str) or name not in ALL_CAPABILITIES:
            raise CapabilityConfigError(
                f'plugin {plugin!r}: unknown capability {value!r} in {where}; known: '
                f'{", ".join(sorted(ALL_CAPABILITIES))}')
        out.add(name)
    return out


def declared_by(metadata: PluginMetadata) -> set[str]:
    return {Capability(c).value for c in metadata.capabilities}


def grant(plugin: str, metadata: PluginMetadata, requested: Iterable,
          allowed: Iterable = ALL_CAPABILITIES) -> frozenset[str]:
    """The capabilities `plugin` gets: what config requests, each of which must be declared by
    the plugin and allowed by the host. Anything else is a CapabilityConfigError."""
    declared = declared_by(metadata)
    wanted = _names(requested, plugin, 'its grants')
    ceiling = _names(allowed, plugin, 'the host\'s allowed_capabilities')
    undeclared = sorted(wanted - declared)
    if undeclared:
        raise CapabilityConfigError(
            f'plugin {plugin!r} ({metadata.name} {metadata.version}) is granted '
            f'{", ".join(undeclared)} in config but does not declare it (declares: '
            f'{", ".join(sorted(declared)) or "nothing"}); remove the grant')
    forbidden = sorted(wanted - ceiling)
    if forbidden:
        raise CapabilityConfigError(
            f'plugin {plugin!r} is granted {", ".join(forbidden)} in config but this host does '
            f'not allow it (allowed_capabilities: {", ".join(sorted(ceiling)) or "none"})')
    return frozenset(wanted)


# -- the runtime guard ---------------------------------------------------------------------------
_current = threading.local()
_installed = False
_install_lock = threading.Lock()
_process_ctx: PluginContext | None = None  # the worker of a subprocess plugin: every thread
_original_start_new_thread = _thread.start_new_thread
_original_sqlite_connect = sqlite3.connect

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_NETWORK_EVENTS = frozenset({
    'socket.connect', 'socket.bind', 'socket.sendto', 'socket.sendmsg', 'socket.getaddrinfo',
    'socket.gethostbyname', 'socket.gethostbyaddr', 'socket.getnameinfo',
    'urllib.Request', 'http.client.connect', 'ftplib.connect', 'smtplib.connect',
})
_WRITE_EVENTS = frozenset({
    'os.remove', 'os.rename', 'os.rmdir', 'os.mkdir', 'os.truncate', 'os.link', 'os.symlink',
    'os.chmod', 'os.chown', 'shutil.rmtree', 'shutil.move', 'shutil.copyfile', 'os.utime',
})
_SPAWN_EVENTS = frozenset({
    'subprocess.Popen', 'os.system', 'os.exec', 'os.posix_spawn', 'os.spawn', 'os.fork',
    'os.forkpty', 'pty.spawn',
})
# Loading a library, looking up a symbol, reading or writing raw memory, calling a C function:
# each is a way around every other check, so all need native.code.
_NATIVE_EVENTS = frozenset({
    'ctypes.dlopen', 'ctypes.dlsym', 'ctypes.dlsym/handle', 'ctypes.cdata', 'ctypes.string_at',
    'ctypes.wstring_at', 'ctypes.PyObj_FromPtr', 'ctypes.call_function',
    'sqlite3.enable_load_extension', 'sqlite3.load_extension',
})
_WATCHED = (_NETWORK_EVENTS | _WRITE_EVENTS | _SPAWN_EVENTS | _NATIVE_EVENTS
            | {'open', 'sqlite3.connect'})
_SQLITE_ATTACH = 24  # sqlite3 authorizer action code of ATTACH
_SYSTEM_READ_ROOTS = ('/usr/lib', '/usr/lib64', '/usr/share', '/usr/local/lib', '/usr/local/share',
                      '/lib', '/lib64', '/etc/ssl', '/etc/ca-certificates', '/dev/null',
                      '/dev/zero', '/dev/urandom', '/dev/random')
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding loom_ros/


_roots_cache: dict[tuple, tuple[str, ...]] = {}


def readable_roots() -> tuple[str, ...]:
    """Where any plugin may read without storage.read: the interpreter and installed packages
    (code and the model files they ship), the system's shared libraries and data, Loom's own
    package and config, and the ROS share directories. Home directories, /etc, /proc, /tmp and
    other plugins' data are not. Entries of sys.path count, so code that edits sys.path widens it
    (one of the things a Python-level guard cannot stop)."""
    key = (tuple(p for p in sys.path if isinstance(p, str)), os.getcwd())
    cached = _roots_cache.get(key)
    if cached is not None:
        return cached
    with _quiet():
        roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(_PACKAGE_ROOT / 'loom_ros'),
                 str(_PACKAGE_ROOT / 'config'), os.environ.get('LOOM_CONFIG_DIR', ''),
                 *_SYSTEM_READ_ROOTS}
        paths = sysconfig.get_paths()
        roots.update(paths.get(k, '') for k in ('stdlib', 'platstdlib', 'purelib', 'platlib'))
        for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
            if prefix:
                roots.update({os.path.join(prefix, 'share'), os.path.join(prefix, 'lib')})
        roots.update(p for p in key[0] if p not in ('', '/', key[1]) and os.path.isdir(p))
        cached = tuple(sorted({os.path.realpath(r).rstrip('/') or '/' for r in roots if r}))
    if len(_roots_cache) > 64:
        _roots_cache.clear()
    _roots_cache[key] = cached
    return cached


def install_guard() -> None:
    """Add the audit hook once per process (hooks cannot be removed; it costs a dictionary
    lookup per audited operation while no plugin code runs); make threads started while acting
    as a plugin inherit that plugin (a thread-local context alone let a plugin's own threads run
    unchecked); and limit ATTACH on connections a plugin opens. The last two wrap
    _thread.start_new_thread and sqlite3.connect: code holding the originals gets past them."""
    global _installed
    with _install_lock:
        if not _installed:
            sys.addaudithook(_hook)
            _thread.start_new_thread = _start_new_thread
            threading._start_new_thread = _start_new_thread  # what Thread.start calls
            sqlite3.connect = sqlite3.dbapi2.connect = _sqlite_connect
            _installed = True


def _start_new_thread(function, args, kwargs=None):
    """_thread.start_new_thread, with the starting thread's plugin carried into the new one."""
    ctx = getattr(_current, 'ctx', None)
    if ctx is not None:
        function = functools.partial(_run_as, ctx, function)
    return _original_start_new_thread(function, args, kwargs or {})


def _sqlite_connect(*args, **kwargs):
    """sqlite3.connect, with ATTACH limited on a plugin's connections (the audit event comes
    before the connection can be configured, so this wraps the call instead)."""
    conn = _original_sqlite_connect(*args, **kwargs)
    ctx = current_plugin()
    if ctx is not None:
        _limit_attach(ctx, conn)
    return conn


def _run_as(ctx: PluginContext, function, *args, **kwargs):
    _current.ctx = ctx
    return function(*args, **kwargs)


def act_as_process(ctx: PluginContext | None) -> None:
    """Every thread of this process that is not acting as another plugin acts as `ctx`: for the
    worker of a subprocess plugin, whose whole process is the plugin (threads however started,
    thread pools, library callbacks)."""
    global _process_ctx
    install_guard()
    _process_ctx = ctx


@contextmanager
def acting_as(ctx: PluginContext | None):
    """Run the block as plugin `ctx`: guarded operations are checked against its grants.
    Nested calls (a plugin calling a same-process plugin) switch to the callee and back."""
    previous = getattr(_current, 'ctx', None)
    _current.ctx = ctx
    try:
        yield
    finally:
        _current.ctx = previous


def current_plugin() -> PluginContext | None:
    if getattr(_current, 'quiet', False):
        return None
    return getattr(_current, 'ctx', None) or _process_ctx


@contextmanager
def _quiet():
    """The guard's own work (audit writes) is not checked."""
    before = getattr(_current, 'quiet', False)
    _current.quiet = True
    try:
        yield
    finally:
        _current.quiet = before


def _deny(ctx: PluginContext, capability: str, detail: str) -> None:
    with _quiet():
        ctx.require(capability, detail)  # audits and raises CapabilityDenied


def _hook(event: str, args: tuple) -> None:
    if event not in _WATCHED:
        return
    ctx = current_plugin()
    if ctx is None:
        return
    granted = ctx.granted
    if event in _NETWORK_EVENTS:
        if 'network' not in granted:
            _deny(ctx, 'network', f'{event} {_short(args)}')
    elif event == 'open':
        _check_open(ctx, args)
    elif event == 'sqlite3.connect':
        _check_sqlite(ctx, str(args[0])[:4096] if args else '')
    elif event in _WRITE_EVENTS:
        if 'storage.write' not in granted:
            _deny(ctx, 'storage.write', f'{event} {_short(args)}')
    elif event in _SPAWN_EVENTS:
        if 'process.spawn' not in granted:
            _deny(ctx, 'process.spawn', f'{event} {_short(args)}')
        with _quiet():
            ctx.audit('process_spawn', detail=f'{event} {_short(args)}')
    elif event in _NATIVE_EVENTS:
        if 'native.code' not in granted and not _packaged_library(event, args):
            _deny(ctx, 'native.code', f'{event} {_short(args)}')


def _packaged_library(event: str, args: tuple) -> bool:
    """A library an installed Python package ships, loaded or looked up by path (what packages
    such as ai_edge_litert do, no different from importing a C extension). Libraries found by
    name (libc), the process itself (dlopen(None)) and raw memory still need native.code."""
    if event == 'ctypes.dlopen':
        name = args[0] if args else None
    elif event == 'ctypes.dlsym':
        name = getattr(args[0], '_name', None) if args else None
    else:
        return False
    if not isinstance(name, str) or '/' not in name:
        return False
    real = os.path.realpath(name[:4096])
    return any(real.startswith(root + '/') for root in _package_roots())


@functools.lru_cache(maxsize=1)
def _package_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get('purelib', ''), paths.get('platlib', ''), *site.getsitepackages()}
    return tuple(sorted({os.path.realpath(r).rstrip('/') for r in roots if r}))


def _check_open(ctx: PluginContext, args: tuple) -> None:
    path, _mode, flags = (tuple(args) + (None, None, None))[:3]
    if isinstance(flags, int) and flags & _WRITE_FLAGS:
        if 'storage.write' not in ctx.granted:
            _deny(ctx, 'storage.write', f'open {_short((path,))} for writing')
        return
    if isinstance(path, int) or ctx.granted & {'storage.read', 'storage.write'}:
        return  # an fd already open, or reads are granted
    if not _readable(path):
        _deny(ctx, 'storage.read', f'open {_short((path,))} for reading')


def _readable(path) -> bool:
    try:
        real = os.path.realpath(os.fsdecode(path)[:4096])
    except (TypeError, ValueError):
        return False
    return any(real == root or real.startswith(root + '/') for root in readable_roots())


def _check_sqlite(ctx: PluginContext, database: str) -> None:
    granted = ctx.granted
    if database in ('', ':memory:') or 'mode=memory' in database:
        return
    if _read_only_uri(database):
        if not granted & {'storage.read', 'memory.read', 'storage.write'}:
            _deny(ctx, 'storage.read', f'sqlite3.connect {database[:200]!r}')
    elif 'storage.write' not in granted:
        _deny(ctx, 'storage.write', f'sqlite3.connect {database[:200]!r} read-write (open it with '
                                    "a 'file:...?mode=ro' URI to read)")


def _limit_attach(ctx: PluginContext, conn: sqlite3.Connection) -> None:
    """ATTACH opens (or creates) another database file behind every other check: without
    storage.write a plugin's connections allow no attached databases, and an authorizer refuses
    and audits the attempt. A plugin that replaces the authorizer and raises the limit again on
    purpose gets past this: only WASM contains code like that."""
    if 'storage.write' in ctx.granted:
        return
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)

    def authorizer(action, arg1, _arg2, _db, _trigger):
        if action != _SQLITE_ATTACH:
            return sqlite3.SQLITE_OK
        with _quiet():
            ctx.audit('capability_denied', capability='storage.write',
                      detail=f'sqlite ATTACH {str(arg1)[:200]!r}')
        return sqlite3.SQLITE_DENY
    conn.set_authorizer(authorizer)


def _read_only_uri(database: str) -> bool:
    if not database.startswith('file:'):
        return False
    query = database.partition('?')[2]
    return any(part == 'mode=ro' for part in query.split('&'))


def _short(args: tuple, limit: int = 160) -> str:
    text = repr(tuple(a[:limit + 1] if isinstance(a, (str, bytes)) else a for a in args))
    return text if len(text) <= limit else text[:limit] + '...'
