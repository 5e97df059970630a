"""Entries of the plugins file run inside another node's process (an agent host's
`host_plugins`), on the plugin host's own settings: the same specs, capability grants, run-time
guard, audit log and data folder. A call is then a function call with the Event object, not a
HandleEvent request carrying the event (a 786 KB camera frame) to another process (issue 15).

The handles are handed to whoever asked (an AgentNode's local plugins); nothing is registered
process-wide, so a plugin host in the same process may run the same entry for its own callers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from loom_ros.bus.event import Event
from loom_ros.config.params import by_node, config_dir, load_params_file, node_defaults
from loom_ros.config.paths import usable_dir, usable_file
from loom_ros.plugins.contract import PluginError, PluginResponse
from loom_ros.plugins.host import PluginHost, PluginSpec, PluginsFileError, load_plugins_file
from loom_ros.security.audit import AuditLog
from loom_ros.storage.layout import StorageLayout, derived

HOST_NODE = 'plugin_host'   # whose parameters (config/loom.yaml section) these settings are


@dataclass(frozen=True)
class HostSettings:
    """The plugin host's parameters that decide how a plugin runs (see host_node.PARAMETERS)."""

    plugins_file: str = ''
    audit_db: str = ''
    data_dir: str = ''
    allowed_capabilities: tuple[str, ...] = ()
    guard: bool = True

    @classmethod
    def from_params(cls, params: Mapping) -> 'HostSettings':
        return cls(str(params['plugins_file']), str(params['audit_db']), str(params['data_dir']),
                   tuple(str(c) for c in params['allowed_capabilities']), bool(params['guard']))

    def under(self, layout: StorageLayout) -> 'HostSettings':
        """'' paths made the ones under the storage root (as the plugin host node does)."""
        return replace(self, audit_db=derived(self.audit_db, layout.audit),
                       data_dir=derived(self.data_dir, layout.root / 'plugins'))

    @classmethod
    def shipped(cls, defaults_path: str | None = None) -> 'HostSettings':
        """The plugin host's defaults from config/loom.yaml (LOOM_CONFIG_DIR honoured)."""
        return cls.from_params(node_defaults(HOST_NODE, defaults_path))

    @classmethod
    def of_files(cls, params_files=(), defaults_path: str | None = None) -> 'HostSettings':
        """What a plugin_host started with these ROS params files would run with: the defaults,
        then each file's `/**` and plugin_host sections, in order (as ROS applies them)."""
        merged = node_defaults(HOST_NODE, defaults_path)
        for path in params_files:
            sections = by_node(load_params_file(path))
            merged.update(sections.get('/**', {}))
            merged.update(sections.get(HOST_NODE, {}))
        return cls.from_params(merged)

    @property
    def path(self) -> str:
        return self.plugins_file or str(config_dir() / 'plugins.yaml')


def pick_specs(specs: list[PluginSpec], names, where: str) -> list[PluginSpec]:
    """The entries named (a disabled one runs when named, as in the plugin host); PluginsFileError
    naming the file and what it has for a name it lacks."""
    known = {s.name: s for s in specs}
    missing = [n for n in names if n not in known]
    if missing:
        raise PluginsFileError(f'{where}: no plugin {", ".join(map(repr, missing))} (have: '
                               f'{", ".join(known) or "none"})')
    return [known[n].model_copy(update={'enabled': True}) for n in dict.fromkeys(names)]


class _NotRunning:
    """A named entry whose Init failed (required: false): calls answer why, in-process, rather
    than going on to another process's service."""

    def __init__(self, host: PluginHost, name: str):
        self.host, self.name = host, name

    def handle_event(self, event: Event) -> PluginResponse:
        return self.host.handle(self.name, event)

    def health(self):
        return self.host.health(self.name)


class EmbeddedPlugins:
    """A PluginHost core with only the named entries and its audit log, started and stopped as
    one. `start` raises (PluginsFileError, PluginError, ConfigError, AuditError,
    CapabilityConfigError) with the reason when an entry cannot run and is required."""

    def __init__(self, settings: HostSettings, *, ros_node=None, logger=None):
        self.settings, self.ros_node, self.logger = settings, ros_node, logger
        self.host: PluginHost | None = None
        self.audit: AuditLog | None = None
        self.failed: dict[str, str] = {}   # entries that failed Init but are not required

    def specs(self) -> list[PluginSpec]:
        return load_plugins_file(self.settings.path)

    def start(self, specs: list[PluginSpec]) -> dict[str, object]:
        """Init `specs` (pick_specs of the file) and return {name: handle} of every one."""
        path = self.settings.path
        try:
            usable_dir(self.settings.data_dir, f'{HOST_NODE}.data_dir')
            self.audit = AuditLog(usable_file(self.settings.audit_db, f'{HOST_NODE}.audit_db'))
            self.host = PluginHost(
                specs, audit_sink=self.audit, data_dir=self.settings.data_dir,
                allowed_capabilities=list(self.settings.allowed_capabilities),
                ros_node=self.ros_node, guard=self.settings.guard, logger=self.logger)
            failed = self.host.start()
            required = [n for n in failed if self.host.slots[n].spec.required]
            if required:
                raise PluginError('; '.join(f'{path}: plugin {n}: {failed[n]}' for n in required))
        except Exception:
            self.stop()
            raise
        self.failed = failed
        return self.handles()

    def handles(self) -> dict[str, object]:
        if self.host is None:
            return {}
        return {name: self.host.handles.get(name) or _NotRunning(self.host, name)
                for name in self.host.slots}

    def stop(self) -> None:
        """Shutdown of every plugin, then the audit log; safe to call twice."""
        host, self.host = self.host, None
        if host is not None:
            host.stop()
        audit, self.audit = self.audit, None
        if audit is not None:
            audit.close()
