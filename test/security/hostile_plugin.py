"""A test-only plugin that tries every escape issue 13 (fault 9) found, one per event type; run it
as a subprocess plugin (`hostile_plugin:HostilePlugin`, with test/security on PYTHONPATH).

Each escape answers `escaped` with what it managed, or raises (the worker answers a failure).
Payloads: a path for the file escapes, a port for `thread_connect`."""
from __future__ import annotations

import ctypes
import os
import socket
import sqlite3
import subprocess
import threading
import time

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import Capability, Plugin, PluginMetadata, PluginResponse, PluginType


def escaped(what: str) -> PluginResponse:
    return PluginResponse(events=[Event(type='escaped', payload=what.encode())])


class HostilePlugin(Plugin):
    metadata = PluginMetadata(name='hostile', type=PluginType.TOOL,
                              capabilities=(Capability.PROCESS_SPAWN, Capability.STORAGE_READ),
                              description='test plugin: tries to escape its sandbox')

    def handle_event(self, event: Event) -> PluginResponse:
        arg = bytes(event.payload).decode()
        kind = event.type
        if kind == 'read':
            with open(arg, encoding='utf-8') as stream:
                return escaped(stream.read())
        if kind == 'ctypes_write':  # write a file through libc, past the open() audit event
            libc = ctypes.CDLL(None)
            fd = libc.open(arg.encode(), os.O_WRONLY | os.O_CREAT, 0o644)
            libc.write(fd, b'pwned', 5)
            libc.close(fd)
            return escaped('ctypes')
        if kind == 'attach':  # a new database file from a connection that needs no grant
            conn = sqlite3.connect(':memory:')
            conn.execute('ATTACH DATABASE ? AS x', (arg,))
            conn.execute('CREATE TABLE x.t (v)')
            conn.commit()
            return escaped('attach')
        if kind == 'thread_connect':
            outcome: list[str] = []

            def connect() -> None:
                try:
                    socket.create_connection(('127.0.0.1', int(arg)), 1).close()
                    outcome.append('connected')
                except OSError as exc:  # CapabilityDenied is a PermissionError
                    outcome.append(f'{type(exc).__name__}: {exc}')
            thread = threading.Thread(target=connect)
            thread.start()
            thread.join()
            return escaped(outcome[0])
        if kind == 'spawn':
            subprocess.run(['true'], check=True)
            return escaped('spawned')
        if kind == 'double_fork':  # a grandchild in its own session, holding the worker's pipes
            read_end, write_end = os.pipe()
            middle = os.fork()
            if middle == 0:
                os.setsid()
                if os.fork() == 0:
                    os.write(write_end, str(os.getpid()).encode())
                    while True:
                        time.sleep(3600)
                os._exit(0)
            os.waitpid(middle, 0)
            os.close(write_end)
            return escaped(os.read(read_end, 32).decode())
        if kind == 'hog':
            hoard = []
            while True:
                hoard.append(bytearray(64 * 1024 * 1024))
        return PluginResponse(events=[Event(type='pong')])
