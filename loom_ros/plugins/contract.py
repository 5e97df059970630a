"""The plugin contract: the seed's Init / HandleEvent / Health / Shutdown as a Python class with a
metadata record, declared capabilities, and discovery through entry points (`loom.plugins`).

This module is pure Python (no rclpy): plugins are written and tested against it alone. The plugin
host node maps Init/Shutdown onto lifecycle transitions and HandleEvent/Health onto services; the
sandboxes (subprocess, WASM) run the same classes behind the same contract.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import entry_points
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loom_ros.bus.event import Event

ENTRY_POINT_GROUP = 'loom.plugins'


class PluginType(str, Enum):
    """The seed's plugin types."""

    FEATURE_EXTRACTOR = 'feature_extractor'
    MODEL_BACKEND = 'model_backend'
    TOOL = 'tool'
    ACTUATOR = 'actuator'


class Capability(str, Enum):
    """What a plugin may do. A plugin declares what it needs; the host grants at most that, and
    every use goes through PluginContext.require, which refuses (and audits) the rest."""

    CAMERA_READ = 'camera.read'
    MIC_READ = 'mic.read'
    ACTUATOR_MOTION = 'actuator.motion'
    TTS = 'tts'
    UI_WRITE = 'ui.write'
    NETWORK = 'network'
    STORAGE_READ = 'storage.read'
    STORAGE_WRITE = 'storage.write'
    MEMORY_READ = 'memory.read'
    PROCESS_SPAWN = 'process.spawn'  # start processes (they run outside the guard)
    NATIVE_CODE = 'native.code'      # ctypes, SQLite extensions: native code outside the guard


class PluginError(RuntimeError):
    """A plugin that cannot start or answer: bad config, missing or corrupt model, bad input.
    `audit_reason`: the words the audit log keeps when the message quotes what it must not
    (a sandboxed child's stderr); None: the message itself."""

    def __init__(self, *args, audit_reason: str | None = None):
        super().__init__(*args)
        self.audit_reason = audit_reason


class CapabilityDenied(PermissionError):
    """A plugin tried something it did not declare or was not granted."""

    def __init__(self, plugin: str, capability: str, detail: str = ''):
        super().__init__(f'plugin {plugin!r} may not use {capability!r}'
                         + (f' ({detail})' if detail else '')
                         + '; declare it in the plugin metadata and grant it in config')
        self.plugin, self.capability, self.detail = plugin, capability, detail


class PluginNotFound(LookupError):
    """An unknown plugin name; says which ones are installed."""


class PluginMetadata(BaseModel):
    """Who a plugin is and what it needs: name, version, type, capabilities, topics read/written."""

    model_config = ConfigDict(extra='forbid', frozen=True)

    name: str = Field(min_length=1)
    version: str = '0.1.0'
    type: PluginType
    capabilities: tuple[Capability, ...] = ()
    reads: tuple[str, ...] = ()      # Loom topics or event types it consumes
    writes: tuple[str, ...] = ()     # Loom topics or event types it produces
    description: str = ''

    @field_validator('name')
    @classmethod
    def _name_is_identifier(cls, value: str) -> str:
        if not value.replace('_', 'a').replace('-', 'a').isalnum():
            raise ValueError(f'plugin name {value!r}: letters, digits, _ and - only')
        return value


class HealthState(str, Enum):
    OK = 'ok'
    DEGRADED = 'degraded'
    FAILED = 'failed'


@dataclass
class HealthStatus:
    """Health(): a level and a reason an operator can act on."""

    state: HealthState = HealthState.OK
    message: str = ''
    details: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state is HealthState.OK


@dataclass
class PluginResponse:
    """HandleEvent(): the events a plugin produced (results, actions), or an error that says why."""

    ok: bool = True
    events: list[Event] = field(default_factory=list)
    error: str = ''
    latency_ms: float = 0.0

    @classmethod
    def failure(cls, error: str) -> 'PluginResponse':
        return cls(ok=False, error=error)


AuditSink = Callable[[dict], None]


@dataclass
class PluginContext:
    """What the host gives a plugin at Init: its config, its granted capabilities, an audit sink.

    `require` is the one runtime check: call it before every privileged operation.
    `audit` records actuator commands (and the host records every refusal through it).
    """

    plugin: str
    config: dict[str, Any] = field(default_factory=dict)
    granted: frozenset[str] = frozenset()
    audit_sink: AuditSink | None = None
    data_dir: str = ''   # where a plugin with storage.write may write
    ros_node: Any = None  # the host's rclpy node, for actuators that publish ROS messages; None
                          # when the plugin runs outside ROS (unit tests, sandboxes)
    direct: dict[str, 'Plugin'] = field(default_factory=dict)  # plugins in the same process, by
                                                               # name: calls skip serialization

    def require(self, capability: Capability | str, detail: str = '') -> None:
        cap = capability.value if isinstance(capability, Capability) else str(capability)
        if cap not in self.granted:
            self.audit('capability_denied', capability=cap, detail=detail)
            raise CapabilityDenied(self.plugin, cap, detail)

    def audit(self, kind: str, **fields: Any) -> None:
        if self.audit_sink is not None:
            # The host's keys last: a plugin's fields cannot rename who wrote the record or
            # what kind it is, nor date it.
            self.audit_sink({**fields, 'ts_ms': time.time_ns() // 1_000_000,
                             'plugin': self.plugin, 'kind': kind})


class Plugin:
    """Base class of every plugin. Subclasses set `metadata` and override the four calls.

    init: load models and resources; raise PluginError with a clear reason if anything is wrong
    (missing, truncated or wrong-shaped model). handle_event: one event in, a PluginResponse out;
    never raise for bad input (return PluginResponse.failure). health: cheap. shutdown: release.
    """

    metadata: ClassVar[PluginMetadata]

    def __init__(self) -> None:
        self.ctx: PluginContext | None = None

    def init(self, ctx: PluginContext) -> None:
        self.ctx = ctx

    def handle_event(self, event: Event) -> PluginResponse:
        raise NotImplementedError

    def health(self) -> HealthStatus:
        return HealthStatus()

    def shutdown(self) -> None:
        pass


def installed_plugins() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_plugin_class(name: str) -> type[Plugin]:
    """The plugin class registered under `name`; PluginNotFound lists the installed ones."""
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        raise PluginNotFound(f'no plugin {name!r} in entry point group {ENTRY_POINT_GROUP}; '
                             f'installed: {", ".join(installed_plugins()) or "none"}')
    cls = matches[0].load()
    if not (isinstance(cls, type) and issubclass(cls, Plugin)
            and isinstance(getattr(cls, 'metadata', None), PluginMetadata)):
        raise PluginError(f'entry point {name!r} ({matches[0].value}) is not a Plugin subclass '
                          'with a PluginMetadata `metadata`')
    return cls
