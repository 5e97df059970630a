"""The child side of a subprocess plugin: `python -m loom_ros.plugins.sandbox.worker TARGET`.

First makes itself a child subreaper (children the plugin double-forks reparent to it, not to
init, so the host finds and kills them), applies its resource limits (RLIMIT_CPU, RLIMIT_AS,
RLIMIT_NOFILE, RLIMIT_FSIZE, RLIMIT_CORE 0), then loads the plugin class (an entry point name or `module:Class`), says hello with its metadata, then
answers length-prefixed JSON requests on stdin/stdout (see loom_ros.plugins.sandbox.wire):
  {"seq", "op": "init", "ctx": {plugin, config, granted, data_dir}} -> {"seq", "ok", "error"}
  {"seq", "op": "handle", "event": {...}} -> {"seq", "ok", "error", "events", "audit", "fatal"}
  {"seq", "op": "health"}                 -> {"seq", "ok", "health": {state, message, details}}
  {"seq", "op": "shutdown"}               -> {"seq", "ok"} and exit 0
With --guard, the whole process runs under the host's capability guard
(loom_ros.security.capabilities.act_as_process): every thread, including threads the plugin
starts, is checked against the plugin's grants; importing the plugin's module runs with no grants,
and its calls from `init` on with what the host granted. Starting processes needs process.spawn,
ctypes needs native.code (the worker's own ctypes call, the subreaper, happens before the guard).
The protocol keeps the original stdout to itself: the plugin's prints go to stderr, and stdin
reads see an empty stream. Audit records the plugin makes travel back with each answer (the host
keeps only the guard's kinds, and so many). An answer the host would refuse (over the wire's
frame or element bounds) is replaced by a failure answer that says so.
A MemoryError is answered (`fatal`) and the worker exits with EXIT_OUT_OF_MEMORY, since the
plugin's state cannot be trusted after it.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import resource
import sys
import traceback

EXIT_BAD_PLUGIN = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_PROTOCOL = 4
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphaned descendants reparent to this process instead of init (Linux prctl), so a
    double-forked grandchild stays in the tree the host kills. False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def apply_limits(cpu_seconds: float | None, memory_bytes: int | None,
                 open_files: int | None = None, file_size_bytes: int | None = None) -> None:
    """CPU seconds over the child's life (SIGXCPU at the limit, SIGKILL a second later), the
    address-space size (allocations beyond it fail: MemoryError in Python), open files, the size
    of any file it writes (EFBIG beyond it: Python ignores SIGXFSZ), and no core dumps. Children
    inherit them. A limit can only be lowered: the hard limit is set too."""
    def lower(which: int, value: int) -> None:
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
    if cpu_seconds:
        soft = max(1, int(round(cpu_seconds)))
        _old, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1 if hard ==
                                                 resource.RLIM_INFINITY else min(soft + 1, hard)))
    if memory_bytes:
        lower(resource.RLIMIT_AS, int(memory_bytes))
    if open_files:
        lower(resource.RLIMIT_NOFILE, int(open_files))
    if file_size_bytes:
        lower(resource.RLIMIT_FSIZE, int(file_size_bytes))
    lower(resource.RLIMIT_CORE, 0)


def load_target(target: str):
    """The plugin class: `package.module:Class`, or an entry point name in `loom.plugins`."""
    from loom_ros.plugins.contract import Plugin, PluginError, PluginMetadata, load_plugin_class
    if ':' not in target:
        return load_plugin_class(target)
    module_name, _, class_name = target.partition(':')
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Plugin)
            and isinstance(getattr(cls, 'metadata', None), PluginMetadata)):
        raise PluginError(f'{target} is not a Plugin subclass with a PluginMetadata `metadata`')
    return cls


def _protocol_streams():
    """Keep the real stdin/stdout for frames; point fds 0 and 1 elsewhere for the plugin."""
    proto_in = os.fdopen(os.dup(0), 'rb')
    proto_out = os.fdopen(os.dup(1), 'wb')
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return proto_in, proto_out


def _guard(enabled: bool, audit: list):
    """The capability guard's act_as_process (the whole process is the plugin), or nothing."""
    if not enabled:
        return lambda ctx: None
    from loom_ros.plugins.contract import PluginContext
    from loom_ros.security.capabilities import act_as_process
    act_as_process(PluginContext(plugin='(loading)', audit_sink=audit.append))
    return act_as_process


def serve(target: str, proto_in, proto_out, memory_bytes: int | None,
          guard: bool = False) -> int:
    from loom_ros.plugins.contract import PluginContext
    from loom_ros.plugins.sandbox.wire import (WireError, event_from_wire, health_to_wire,
                                               read_frame, response_to_wire, write_frame)
    audit: list[dict] = []
    act_as = _guard(guard, audit)  # from here on, everything this process does is checked
    try:
        cls = load_target(target)
        plugin = cls()
    except Exception as exc:  # noqa: BLE001 - anything wrong with the plugin is reported
        write_frame(proto_out, {'op': 'hello', 'error': f'{type(exc).__name__}: {exc}'})
        return EXIT_BAD_PLUGIN
    write_frame(proto_out, {'op': 'hello', 'pid': os.getpid(),
                            'metadata': cls.metadata.model_dump(mode='json')})
    audit[:] = []  # what loading the module tried is not this plugin's record yet
    while True:
        try:
            request = read_frame(proto_in)
        except WireError as exc:
            print(f'loom worker: bad request frame: {exc}', file=sys.stderr)
            return EXIT_PROTOCOL
        if request is None:  # the parent went away
            plugin.shutdown()
            return 0
        seq, op = request.get('seq'), request.get('op')
        reply: dict = {'seq': seq, 'ok': True, 'error': ''}
        try:
            if op == 'init':
                wire_ctx = request['ctx']
                ctx = PluginContext(plugin=wire_ctx['plugin'], config=dict(wire_ctx['config']),
                                    granted=frozenset(wire_ctx['granted']),
                                    data_dir=wire_ctx.get('data_dir', ''),
                                    audit_sink=audit.append)
                act_as(ctx)
                plugin.init(ctx)
            elif op == 'handle':
                event = event_from_wire(request['event'])
                reply.update(response_to_wire(plugin.handle_event(event)))
            elif op == 'health':
                reply['health'] = health_to_wire(plugin.health())
            elif op == 'shutdown':
                plugin.shutdown()
                write_frame(proto_out, reply)
                return 0
            else:
                reply.update(ok=False, error=f'unknown op {op!r}')
        except MemoryError:
            reply.update(ok=False, fatal=True, error='ran out of memory (MemoryError)'
                         + (f' under its address-space limit of {memory_bytes} bytes'
                            if memory_bytes else ''))
        except Exception as exc:  # noqa: BLE001 - a plugin error becomes a failure answer
            reply.update(ok=False, error=f'{op} raised {type(exc).__name__}: {exc}')
            traceback.print_exc(file=sys.stderr)
        reply['audit'], audit[:] = list(audit), []
        try:
            write_frame(proto_out, reply)
        except WireError as exc:  # too big for the host to take: a failure that says so
            write_frame(proto_out, {'seq': seq, 'ok': False, 'fatal': reply.get('fatal', False),
                                    'error': f'{op}: its answer cannot be sent: {exc}'})
        if reply.get('fatal'):
            return EXIT_OUT_OF_MEMORY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('target', help='entry point name or module:Class')
    parser.add_argument('--cpu-seconds', type=float, default=None)
    parser.add_argument('--memory-bytes', type=int, default=None)
    parser.add_argument('--open-files', type=int, default=None)
    parser.add_argument('--file-size-bytes', type=int, default=None)
    parser.add_argument('--guard', action='store_true', help='apply the capability guard')
    args = parser.parse_args(argv)
    become_subreaper()
    apply_limits(args.cpu_seconds, args.memory_bytes, args.open_files, args.file_size_bytes)
    proto_in, proto_out = _protocol_streams()
    return serve(args.target, proto_in, proto_out, args.memory_bytes, args.guard)


if __name__ == '__main__':
    sys.exit(main())
