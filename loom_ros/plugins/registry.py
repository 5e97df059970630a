"""Which plugins live in this process, so an agent calls them directly (Event objects in and
out, no serialization), and a service client for the ones that live elsewhere.

    from loom_ros.plugins.registry import plugin_handle
    weather = plugin_handle('weather', node)        # local if a host in this process runs it,
    response = weather.handle_event(event)          # else the <host>/weather/handle_event service

A plugin host registers its running plugins when it configures and removes them at cleanup.
`local_plugins()` is the process-wide map {name: PluginHandle}. A remote call blocks the calling
thread until the answer arrives, so make it from an agent's own thread (behaviors run there),
never from an executor callback of the same node.
"""
from __future__ import annotations

import threading

from loom_ros.bus.event import Event
from loom_ros.bus.replies import ReplyPaths
from loom_ros.plugins.contract import (
    HealthState, HealthStatus, PluginError, PluginResponse,
)

_LOCK = threading.Lock()
_LOCAL: dict[str, object] = {}   # name -> PluginHandle
_OWNER: dict[str, int] = {}      # name -> id() of the host that registered it


def register(host) -> None:
    """Publish `host`'s running plugins process-wide; a name another host registered is an error."""
    with _LOCK:
        for name, handle in host.handles.items():
            owner = _OWNER.get(name)
            if owner is not None and owner != id(host):
                raise PluginError(f'plugin name {name!r} is already served by another host in '
                                  'this process; give one of them another name')
        for name, handle in host.handles.items():
            _LOCAL[name], _OWNER[name] = handle, id(host)


def unregister(host) -> None:
    with _LOCK:
        for name in [n for n, owner in _OWNER.items() if owner == id(host)]:
            _LOCAL.pop(name, None)
            _OWNER.pop(name, None)


def local_plugins() -> dict[str, object]:
    """A snapshot of {name: PluginHandle} for plugins running in this process."""
    with _LOCK:
        return dict(_LOCAL)


def plugin_handle(name: str, node=None, host: str = '/plugin_host', timeout_s: float = 5.0):
    """The plugin `name`: its in-process handle when a host here runs it, else (given a node) a
    ServicePlugin calling `<host>/<name>/handle_event` and `<host>/<name>/health`."""
    with _LOCK:
        local = _LOCAL.get(name)
    if local is not None:
        return local
    if node is None:
        raise PluginError(f'plugin {name!r} does not run in this process and no node was given '
                          'to reach it through its service')
    return ServicePlugin(node, name, host, timeout_s)


class ServicePlugin:
    """A plugin in another process, through the host's HandleEvent and Health services. Same
    calls as a PluginHandle; failures (no service, timeout) come back as failures."""

    def __init__(self, node, name: str, host: str = '/plugin_host', timeout_s: float = 5.0):
        from loom_msgs.srv import HandleEvent, Health
        self.name, self.timeout_s = name, timeout_s
        base = f'{host.rstrip("/")}/{name}'
        self._handle = node.create_client(HandleEvent, f'{base}/handle_event')
        self._health = node.create_client(Health, f'{base}/health')
        self._replies = ReplyPaths(node)   # each client's first exchange is a probe

    def _call(self, client, request):
        if not client.wait_for_service(timeout_sec=self.timeout_s):
            return None, f'service {client.srv_name} is not available'
        return self._replies.ask(client, request, threading.Event(), self.timeout_s)

    def handle_event(self, event: Event) -> PluginResponse:
        from loom_msgs.srv import HandleEvent
        result, error = self._call(self._handle, HandleEvent.Request(event=event.to_msg()))
        if result is None:
            return PluginResponse.failure(error)
        return response_from_msg(result.response)

    def health(self) -> HealthStatus:
        from loom_msgs.srv import Health
        result, error = self._call(self._health, Health.Request())
        if result is None:
            return HealthStatus(HealthState.FAILED, error)
        return health_from_msg(result.status)


# -- message conversion (used by the host node too) -------------------------------------------
_LEVELS = {HealthState.OK: 0, HealthState.DEGRADED: 1, HealthState.FAILED: 2}


def response_to_msg(response: PluginResponse):
    from loom_msgs.msg import PluginResponse as PluginResponseMsg
    return PluginResponseMsg(ok=response.ok, error=response.error,
                             events=[e.to_msg() for e in response.events],
                             latency_ms=float(response.latency_ms))


def response_from_msg(msg) -> PluginResponse:
    return PluginResponse(ok=msg.ok, error=msg.error,
                          events=[Event.from_msg(m) for m in msg.events],
                          latency_ms=msg.latency_ms)


def health_to_msg(plugin: str, status: HealthStatus):
    from loom_msgs.msg import HealthStatus as HealthStatusMsg
    from loom_msgs.msg import KeyValue
    return HealthStatusMsg(plugin=plugin, level=_LEVELS[HealthState(status.state)],
                           message=status.message,
                           details=[KeyValue(key=k, value=str(v))
                                    for k, v in status.details.items()])


def health_from_msg(msg) -> HealthStatus:
    state = {v: k for k, v in _LEVELS.items()}.get(msg.level, HealthState.FAILED)
    return HealthStatus(state, msg.message, {kv.key: kv.value for kv in msg.details})
