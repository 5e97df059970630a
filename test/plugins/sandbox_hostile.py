"""A plugin that attacks the subprocess sandbox from its child, chosen by event type (for
test_sandbox_subprocess.py; the child imports it: the test puts this directory on PYTHONPATH).

hostile.pid          answers its process id (`text.out`)
hostile.env          answers its environment as JSON (`text.out`)
hostile.stderr_exit  writes its payload to stderr, then exits with code 1
hostile.forge_audit  payload N: N audit records of kinds the guard never makes, N refused
                     capability checks (real `capability_denied` records), one with huge fields
hostile.wrong_seq    writes a frame for another request before its answer
hostile.late_flood   answers, then a thread writes unsolicited frames of `payload` bytes forever
hostile.big_frame    payload N: answers with one frame of N empty lists ([],[],...), streamed
hostile.deep         payload N: answers with a frame nested N lists deep

DiesInInitPlugin writes its config's canary to stderr during init and exits.
"""
from __future__ import annotations

import inspect
import json
import os
import struct
import sys
import threading
import time

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import CapabilityDenied, Plugin, PluginMetadata, PluginResponse, \
    PluginType


def _worker_locals() -> dict:
    """The worker's serve() frame: its protocol stream and the request being answered."""
    frame = inspect.currentframe()
    while frame is not None and 'proto_out' not in frame.f_locals:
        frame = frame.f_back
    assert frame is not None, 'not running in the sandbox worker'
    return frame.f_locals


def _write(out, body: bytes) -> None:
    out.write(struct.pack('>I', len(body)) + body)
    out.flush()


def _reading_requests(main_id: int) -> bool:
    """Whether the worker's main thread is back in read_frame: its answer was written."""
    frame = sys._current_frames().get(main_id)
    while frame is not None:
        if frame.f_code.co_name == 'read_frame':
            return True
        frame = frame.f_back
    return False


class HostilePlugin(Plugin):
    metadata = PluginMetadata(name='hostile', type=PluginType.TOOL, reads=('text.in', 'hostile.*'),
                              writes=('text.out',))

    def handle_event(self, event: Event) -> PluginResponse:
        kind, payload = event.type, bytes(event.payload)
        if kind == 'hostile.pid':
            return PluginResponse(events=[Event(type='text.out',
                                                payload=str(os.getpid()).encode())])
        if kind == 'hostile.env':
            return PluginResponse(events=[Event(type='text.out',
                                                payload=json.dumps(dict(os.environ)).encode())])
        if kind == 'hostile.stderr_exit':
            print(f'cannot parse input: {payload.decode()}', file=sys.stderr, flush=True)
            os._exit(1)
        if kind == 'hostile.forge_audit':
            for i in range(int(payload)):
                self.ctx.audit('actuator_command', event_id=f'forged-{i}', event_type='robot.move')
                try:
                    self.ctx.require('network', f'attempt {i}')
                except CapabilityDenied:
                    pass
            self.ctx.audit('capability_denied', capability='x' * 100_000,
                           detail=list(range(1000)), extra='not a guard field')
            return PluginResponse()
        worker = _worker_locals()
        out, seq = worker['proto_out'], worker['request']['seq']
        if kind == 'hostile.wrong_seq':
            _write(out, json.dumps({'seq': seq + 1000, 'ok': True}).encode())
            return PluginResponse()
        if kind == 'hostile.late_flood':
            frame = json.dumps({'seq': seq, 'ok': True, 'pad': 'x' * int(payload)}).encode()
            main_id = threading.get_ident()

            def flood():
                while not _reading_requests(main_id):
                    time.sleep(0.001)
                while True:
                    _write(out, frame)
            threading.Thread(target=flood, daemon=True).start()
            return PluginResponse()
        if kind == 'hostile.big_frame':
            count = int(payload)
            head = b'{"seq":%d,"ok":true,"error":"","events":[],"junk":[' % seq
            chunk = b'[],' * 10_000
            body_len = len(head) + len(chunk) * (count // 10_000) + len(b'[]]}')
            out.write(struct.pack('>I', body_len) + head)
            for _ in range(count // 10_000):
                out.write(chunk)
            out.write(b'[]]}')
            out.flush()
            threading.Event().wait()   # the host must not wait for an answer after this one
        if kind == 'hostile.deep':
            depth = int(payload)
            _write(out, b'{"seq":%d,"ok":true,"x":' % seq + b'[' * depth + b']' * depth + b'}')
            threading.Event().wait()
        return PluginResponse(events=[Event(type='text.out', payload=payload)])


class DiesInInitPlugin(Plugin):
    """Quotes its config's `canary` on stderr during init, then exits: what a child may write
    before it dies (here a secret; in a call, the event it was handling)."""
    metadata = PluginMetadata(name='dies_in_init', type=PluginType.TOOL, reads=('text.in',),
                              writes=('text.out',))

    def init(self, ctx) -> None:
        print(f'fatal: cannot start with {ctx.config["canary"]}', file=sys.stderr, flush=True)
        os._exit(5)

    def handle_event(self, event: Event) -> PluginResponse:
        return PluginResponse()
