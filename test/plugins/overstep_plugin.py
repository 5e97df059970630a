"""Test-only plugins that misbehave on purpose: one oversteps its (empty) capabilities in every
way the host must refuse, one declares network, one fails Init. Loaded by `module:Class`
(overstep_plugin:OverstepPlugin) with test/plugins on the path; never installed."""
from __future__ import annotations

import socket
import sqlite3
import subprocess

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import (
    Capability, CapabilityDenied, Plugin, PluginError, PluginMetadata, PluginResponse, PluginType,
)


class OverstepPlugin(Plugin):
    """Declares nothing, then tries what the event's payload `try` says."""

    metadata = PluginMetadata(name='overstep', type=PluginType.TOOL, capabilities=(),
                              description='test plugin: oversteps its capabilities')

    def handle_event(self, event: Event) -> PluginResponse:
        query = event.json()
        what, target = query['try'], query.get('target', '')
        if what == 'require_network':        # the polite way: asks first, is refused
            self.ctx.require(Capability.NETWORK, detail='weather API')
        elif what == 'network':              # the sneaky way: the guard refuses the call itself
            socket.create_connection(('127.0.0.1', int(target)), timeout=1).close()
        elif what == 'storage_write':
            with open(target, 'w') as stream:
                stream.write('not allowed')
        elif what == 'sqlite_write':
            sqlite3.connect(target).close()
        elif what == 'spawn':
            subprocess.run(['true'], check=False)
        elif what == 'swallow':               # catches the refusal: still audited and counted
            try:
                socket.create_connection(('127.0.0.1', int(target)), timeout=1).close()
            except CapabilityDenied:
                pass
        elif what == 'crash':
            raise RuntimeError('boom')
        elif what == 'bad_output':
            return PluginResponse(events=[Event(type='')])
        elif what == 'refile':                # files its Public answer under `target`'s name
            return PluginResponse(events=[Event.with_json('overstep.done', {'did': what},
                                                          metadata={'loom.subject': target})])
        return PluginResponse(events=[Event.with_json('overstep.done', {'did': what})])


class NetworkPlugin(Plugin):
    """Declares network and uses it properly: works only when config grants it."""

    metadata = PluginMetadata(name='netuser', type=PluginType.TOOL,
                              capabilities=(Capability.NETWORK,))

    def handle_event(self, event: Event) -> PluginResponse:
        self.ctx.require(Capability.NETWORK, detail='connect')
        port = event.json()['port']
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return PluginResponse(events=[Event(type='netuser.connected')])


class FailingInitPlugin(Plugin):
    metadata = PluginMetadata(name='broken', type=PluginType.TOOL)

    def init(self, ctx) -> None:
        raise PluginError('model file model.tflite is truncated (12 of 4096 bytes)')


class EchoActuator(Plugin):
    """An actuator that only echoes: every command it gets must be on the audit record."""

    metadata = PluginMetadata(name='echo_actuator', type=PluginType.ACTUATOR,
                              capabilities=(Capability.ACTUATOR_MOTION,))

    def handle_event(self, event: Event) -> PluginResponse:
        self.ctx.require(Capability.ACTUATOR_MOTION, detail=event.type)
        return PluginResponse(events=[Event(type='actuator.done')])


class RecorderPlugin(Plugin):
    """Keeps the event objects it gets, to show same-process calls pass them unserialized."""

    metadata = PluginMetadata(name='recorder', type=PluginType.TOOL)

    def init(self, ctx) -> None:
        super().init(ctx)
        self.seen: list[Event] = []

    def handle_event(self, event: Event) -> PluginResponse:
        self.seen.append(event)
        if event.type == 'recorder.ask_weather':  # a plugin calling a same-process plugin
            return self.ctx.direct['weather'].handle_event(
                Event.with_json('tool.weather.query', {'city': 'Tokyo'}))
        return PluginResponse(events=[Event(type='recorder.seen')])
