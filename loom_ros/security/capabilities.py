"""Capability grants and the runtime guard for plugins that run in the host's process.

Grants: a plugin gets what it declared (PluginMetadata.capabilities) AND its config grants AND
the host allows. Asking in config for something the plugin did not declare, or that the host
does not allow, or that does not exist, is a config error: the host refuses that plugin at Init.

The guard: plugins are supposed to call PluginContext.require before privileged work, but a
plugin that forgets (or oversteps on purpose) is still caught. While the host runs a plugin's
code on a thread, a Python audit hook (sys.addaudithook) checks that thread's operations against
the plugin's grants: network (socket connect/bind/send, name lookups) needs `network`; opening a
file for writing, removing, renaming or creating files needs `storage.write`; opening an SQLite
file needs `storage.read` or `memory.read` when read-only (`mode=ro`), `storage.write` otherwise;
starting a process is allowed but audited (`process_spawn`): the child is outside the guard.
Each refusal raises CapabilityDenied at the offending call and is audited through the context.
Audit hooks are not a security boundary against hostile native code or threads the plugin starts
itself; the sandboxes (WASM, subprocess) are. They make an honest plugin's mistakes loud.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable
from contextlib import contextmanager

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
_WATCHED = _NETWORK_EVENTS | _WRITE_EVENTS | _SPAWN_EVENTS | {'open', 'sqlite3.connect'}


def install_guard() -> None:
    """Add the audit hook once per process (hooks cannot be removed; it costs a dictionary
    lookup per audited operation while no plugin code runs)."""
    global _installed
    with _install_lock:
        if not _installed:
            sys.addaudithook(_hook)
            _installed = True


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
    return getattr(_current, 'ctx', None)


def _deny(ctx: PluginContext, capability: str, detail: str) -> None:
    _current.ctx = None  # the audit write itself must not be checked
    try:
        ctx.require(capability, detail)  # audits and raises CapabilityDenied
    finally:
        _current.ctx = ctx


def _hook(event: str, args: tuple) -> None:
    if event not in _WATCHED:
        return
    ctx = getattr(_current, 'ctx', None)
    if ctx is None:
        return
    granted = ctx.granted
    if event in _NETWORK_EVENTS:
        if 'network' not in granted:
            _deny(ctx, 'network', f'{event} {_short(args)}')
    elif event == 'open':
        path, _mode, flags = (tuple(args) + (None, None, None))[:3]
        if isinstance(flags, int) and flags & _WRITE_FLAGS and 'storage.write' not in granted:
            _deny(ctx, 'storage.write', f'open {path!r} for writing')
    elif event == 'sqlite3.connect':
        database = str(args[0]) if args else ''
        if database in ('', ':memory:') or 'mode=memory' in database:
            return
        if _read_only_uri(database):
            if not granted & {'storage.read', 'memory.read'}:
                _deny(ctx, 'storage.read', f'sqlite3.connect {database!r}')
        elif 'storage.write' not in granted:
            _deny(ctx, 'storage.write', f'sqlite3.connect {database!r} read-write (open it with '
                                        "a 'file:...?mode=ro' URI to read)")
    elif event in _WRITE_EVENTS:
        if 'storage.write' not in granted:
            _deny(ctx, 'storage.write', f'{event} {_short(args)}')
    elif event in _SPAWN_EVENTS:
        # No capability names process creation, and plugins use worker processes legitimately
        # (text to speech does): allowed, but on the audit record, since a child process is
        # outside this guard. Isolation that holds for children is the subprocess sandbox.
        _current.ctx = None
        try:
            ctx.audit('process_spawn', detail=f'{event} {_short(args)}')
        finally:
            _current.ctx = ctx


def _read_only_uri(database: str) -> bool:
    if not database.startswith('file:'):
        return False
    query = database.partition('?')[2]
    return any(part == 'mode=ro' for part in query.split('&'))


def _short(args: tuple, limit: int = 160) -> str:
    text = repr(tuple(args))
    return text if len(text) <= limit else text[:limit] + '...'
