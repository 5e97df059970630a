"""Example plugins for the sandboxes, used by the tests, the benchmark and the docs. They are not
registered as entry points: run them by path, e.g. `loom_ros.plugins.sandbox.examples:FaultyPlugin`.

UpperPlugin does real work (the same as the WASM example test/plugins/wasm/upper.wat), so the
three ways of running a plugin can be compared. FaultyPlugin misbehaves on demand, so the
subprocess sandbox can be shown to survive crashes, hangs and memory hogs.
"""
from __future__ import annotations

import os
import socket
import threading
import time

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import (Capability, HealthStatus, Plugin, PluginContext,
                                       PluginError, PluginMetadata, PluginResponse, PluginType)


class UpperPlugin(Plugin):
    """`text.in` with a UTF-8 payload in, `text.upper` with the payload upper-cased out."""

    metadata = PluginMetadata(name='example_upper', type=PluginType.FEATURE_EXTRACTOR,
                              reads=('text.in',), writes=('text.upper',),
                              description='Upper-cases a text payload (example).')

    def handle_event(self, event: Event) -> PluginResponse:
        try:
            text = bytes(event.payload).decode()
        except UnicodeDecodeError:
            return PluginResponse.failure('no text payload')
        return PluginResponse(events=[Event(type='text.upper', source=self.metadata.name,
                                            payload=text.upper().encode())])


class FaultyPlugin(UpperPlugin):
    """UpperPlugin that misbehaves when asked, by event type:

    fault.crash  aborts the process (SIGABRT)        fault.exit   exits with payload as code
    fault.hang   never answers                       fault.raise  raises RuntimeError
    fault.hog    allocates memory until it runs out  fault.spin   burns CPU until stopped
    fault.pid    answers its process id (`fault.pid` event, payload = pid)
    fault.network  asks for the network capability (refused and audited unless granted)
    fault.connect  opens a TCP connection to 127.0.0.1:9 without asking first (payload: port)
    Config `fail_init: true` makes init raise PluginError.
    """

    metadata = PluginMetadata(name='example_faulty', type=PluginType.TOOL,
                              reads=('text.in', 'fault.*'), writes=('text.upper', 'fault.pid'),
                              description='Crashes, hangs or hogs memory on demand (example).')

    def init(self, ctx: PluginContext) -> None:
        super().init(ctx)
        if ctx.config.get('fail_init'):
            raise PluginError('asked to fail at init (fail_init: true)')

    def handle_event(self, event: Event) -> PluginResponse:
        kind = event.type
        if kind == 'fault.crash':
            os.abort()
        if kind == 'fault.exit':
            os._exit(int(event.payload or b'1'))
        if kind == 'fault.hang':
            threading.Event().wait()
        if kind == 'fault.raise':
            raise RuntimeError('asked to raise')
        if kind == 'fault.hog':
            hoard = []
            while True:
                hoard.append(bytearray(16 * 1024 * 1024))
        if kind == 'fault.spin':
            while True:
                time.process_time()
        if kind == 'fault.network':
            self.ctx.require(Capability.NETWORK, 'example asked for it')
            return PluginResponse()
        if kind == 'fault.connect':
            try:
                socket.create_connection(('127.0.0.1', int(event.payload or b'9')), 1).close()
            except ConnectionError:
                pass  # nothing listens there: reaching the port at all was the point
            return PluginResponse()
        if kind == 'fault.pid':
            return PluginResponse(events=[Event(type='fault.pid', source=self.metadata.name,
                                                payload=str(os.getpid()).encode())])
        return super().handle_event(event)

    def health(self) -> HealthStatus:
        return HealthStatus(details={'pid': str(os.getpid())})
