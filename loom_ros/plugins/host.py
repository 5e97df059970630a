"""The plugin host's core (no rclpy): load plugins by name from a plugins file, give each its
context (capability grants, audit sink, data folder, same-process plugins), and run
Init / HandleEvent / Health / Shutdown with error isolation.

One plugin's failure never reaches another: a plugin failing Init is marked failed and the others
start; a plugin raising in handle_event becomes PluginResponse.failure (counted); a capability
refusal is audited and counted. The ROS shell (host_node.py) maps this onto lifecycle
transitions, services and bus subscriptions.

Plugins are named in config by entry point (group `loom.plugins`) or as `module:Class`. A plugin's
`mode` picks where it runs: `in_process` (guarded by loom_ros.security.capabilities), or a
sandbox (`subprocess`, `wasm`) through loom_ros.plugins.sandbox.sandboxed_plugin, which returns a
proxy with the same contract.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loom_ros.bus.event import Event, EventRejected
from loom_ros.bus.privacy import (
    SUBJECT_METADATA_KEY, audit_excerpt, effective_privacy, named_subject)
from loom_ros.bus.names import TopicNameError, TopicPattern, validate_topic
from loom_ros.config.params import read_yaml, refuse_unknown_keys
from loom_ros.plugins.contract import (
    CapabilityDenied, HealthState, HealthStatus, Plugin, PluginContext, PluginError,
    PluginMetadata, PluginNotFound, PluginResponse, PluginType, load_plugin_class,
)
from loom_ros.security.capabilities import (
    ALL_CAPABILITIES, CapabilityConfigError, acting_as, declared_by, grant, install_guard,
)

IN_PROCESS = 'in_process'
# Events one answer may carry: a plugin answers one event, and 60,000 from one WASM call were
# all published before this bound.
MAX_RESPONSE_EVENTS = 256
# A call running longer than this makes health() DEGRADED (a sandbox's own call timeout is 10 s
# by default; an in-process plugin has none).
BUSY_DEGRADED_S = 10.0


class PluginsFileError(ValueError):
    """A plugins file that cannot be used; names the file, the entry and the reason."""


class PluginSpec(BaseModel):
    """One entry of the plugins file: which plugin, how it runs, what it may do, what it reads."""

    model_config = ConfigDict(extra='forbid')

    name: str = Field(min_length=1)        # instance name: services, registry, audit records
    plugin: str = ''                       # entry point name or module:Class ('' = name)
    mode: Literal['in_process', 'subprocess', 'wasm'] = IN_PROCESS
    config: dict[str, Any] = Field(default_factory=dict)
    grants: list[str] = Field(default_factory=list)   # deny by default
    inputs: list[str] = Field(default_factory=list)   # Loom topics or patterns it is fed from
    output_topic: str = ''                 # '' = plugin.<name>.output
    sandbox: dict[str, Any] = Field(default_factory=dict)  # options for the sandbox mode
    enabled: bool = True
    # false: a failed Init leaves this plugin failed and the host goes on (degraded, on its
    # health); true: the host refuses configure, naming the plugin and why
    required: bool = True

    @field_validator('name')
    @classmethod
    def _name(cls, value: str) -> str:
        if not value[0].isalpha() or not value.replace('_', 'a').isalnum() or '__' in value:
            raise ValueError(f'plugin name {value!r}: a letter first, then letters, digits and '
                             'single underscores (it names ROS services)')
        return value

    @field_validator('inputs')
    @classmethod
    def _inputs(cls, value: list[str]) -> list[str]:
        for topic in value:
            try:
                TopicPattern.parse(topic)
            except TopicNameError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator('output_topic')
    @classmethod
    def _output(cls, value: str) -> str:
        if value:
            try:
                validate_topic(value)
            except TopicNameError as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def target(self) -> str:
        return self.plugin or self.name

    @property
    def output(self) -> str:
        return self.output_topic or f'plugin.{self.name}.output'


def load_plugins_file(path: str | Path) -> list[PluginSpec]:
    """The `plugins:` list of a YAML file, validated; PluginsFileError says where and why."""
    data = read_yaml(path, PluginsFileError)
    if not isinstance(data, dict) or not isinstance(data.get('plugins'), list):
        raise PluginsFileError(f'{path}: expected a mapping with a `plugins:` list')
    refuse_unknown_keys(data, {'plugins'}, str(path), PluginsFileError)
    return parse_specs(data['plugins'], str(path))


def parse_specs(entries: list, where: str = 'plugins') -> list[PluginSpec]:
    specs, seen = [], set()
    for i, entry in enumerate(entries):
        try:
            spec = PluginSpec.model_validate(entry)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = '.'.join(str(p) for p in first['loc'])[:120]
            name = str(entry.get('name', i))[:80] if isinstance(entry, dict) else i
            raise PluginsFileError(f'{where}: plugin {name!r}: {loc}: {first["msg"]}') from None
        if spec.name in seen:
            raise PluginsFileError(f'{where}: plugin name {spec.name!r} appears twice')
        seen.add(spec.name)
        specs.append(spec)
    return specs


def resolve_class(target: str) -> type[Plugin]:
    """A plugin class from an entry point name or a `module:Class` path."""
    if ':' not in target:
        return load_plugin_class(target)
    module_name, _, attr = target.partition(':')
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginNotFound(f'plugin {target!r}: cannot import module {module_name!r}: '
                             f'{exc}') from None
    for part in attr.split('.'):
        obj = getattr(obj, part, None)
        if obj is None:
            raise PluginNotFound(f'plugin {target!r}: module {module_name!r} has no {attr!r}')
    if not (isinstance(obj, type) and issubclass(obj, Plugin)
            and isinstance(getattr(obj, 'metadata', None), PluginMetadata)):
        raise PluginError(f'{target!r} is not a Plugin subclass with a PluginMetadata `metadata`')
    return obj


class SlotState(str, Enum):
    LOADED = 'loaded'
    RUNNING = 'running'
    FAILED = 'failed'
    STOPPED = 'stopped'


@dataclass
class Slot:
    """One configured plugin in the host: its spec, instance, context, state and counters."""

    spec: PluginSpec
    plugin: Plugin | None = None
    ctx: PluginContext | None = None
    state: SlotState = SlotState.LOADED
    error: str = ''
    counters: Counter = field(default_factory=Counter)
    latency_ms_total: float = 0.0
    lock: threading.RLock = field(default_factory=threading.RLock)
    call_started: float = 0.0   # perf_counter of the call running now (0: none)
    writes: list | None = None  # a sandboxed plugin's declared output types (Host._writes)

    @property
    def guarded(self) -> bool:
        return self.spec.mode == IN_PROCESS

    @property
    def metadata(self) -> PluginMetadata | None:
        return getattr(self.plugin, 'metadata', None)


class PluginHandle(Plugin):
    """A plugin as other code in the same process sees it: calls go through the host (error
    isolation, counters, capability guard) and pass Event objects, never serialized. The host
    owns the lifecycle, so init and shutdown here do nothing."""

    def __init__(self, host: 'PluginHost', name: str, metadata: PluginMetadata):
        super().__init__()
        self.host, self.name, self.metadata = host, name, metadata

    def init(self, ctx: PluginContext) -> None:  # the host initialises the real plugin
        pass

    def handle_event(self, event: Event) -> PluginResponse:
        return self.host.handle(self.name, event)

    def health(self) -> HealthStatus:
        return self.host.health(self.name)

    def shutdown(self) -> None:
        pass

    def __repr__(self) -> str:
        return f'<PluginHandle {self.name} ({self.metadata.name} {self.metadata.version})>'


class PluginHost:
    """Plugins of one process: built from specs, started, called, stopped."""

    def __init__(self, specs: list[PluginSpec], *, audit_sink=None, data_dir: str | Path = '',
                 allowed_capabilities=ALL_CAPABILITIES, ros_node=None, guard: bool = True,
                 logger=None):
        self.slots: dict[str, Slot] = {s.name: Slot(s) for s in specs if s.enabled}
        self.audit_sink = audit_sink
        self.data_dir = str(Path(os.path.expanduser(str(data_dir))).resolve()) if data_dir else ''
        self.allowed = frozenset(allowed_capabilities)
        self.ros_node = ros_node
        self.guard = guard
        self.logger = logger or logging.getLogger('loom.plugins')
        self.handles: dict[str, PluginHandle] = {}  # running plugins, for direct calls
        if guard:
            install_guard()

    # -- audit ----------------------------------------------------------------------------------
    def _sink_for(self, slot: Slot):
        def sink(record: dict) -> None:
            if record.get('kind') == 'capability_denied':
                slot.counters['denied'] += 1
            if self.audit_sink is not None:
                self.audit_sink(record)
        return sink

    def _audit(self, slot: Slot, kind: str, **fields) -> None:
        self._sink_for(slot)({'ts_ms': time.time_ns() // 1_000_000, 'plugin': slot.spec.name,
                              'kind': kind, **fields})

    # -- Init -----------------------------------------------------------------------------------
    def start(self) -> dict[str, str]:
        """Init every configured plugin; returns {name: reason} for those that failed."""
        failed = {}
        for name, slot in self.slots.items():
            if slot.state is SlotState.RUNNING:
                continue
            try:
                self._start(slot)
            except Exception as exc:  # one plugin's failure must not stop the others
                slot.state, slot.error = SlotState.FAILED, _reason(exc)
                slot.counters['init_failed'] += 1
                failed[name] = slot.error
                self.handles.pop(name, None)
                self.logger.error(f'plugin {name} failed to start: {slot.error}')
                try:
                    # the host's words where the message quotes a child's stderr
                    said = getattr(exc, 'audit_reason', None) or slot.error
                    self._audit(slot, 'init_failed', error=said, target=slot.spec.target,
                                mode=slot.spec.mode)
                except Exception as audit_exc:
                    self.logger.error(f'cannot audit the failure of {name}: {audit_exc}')
        return failed

    def _start(self, slot: Slot) -> None:
        spec = slot.spec
        slot.plugin = self._build(spec)
        metadata = slot.metadata
        if not isinstance(metadata, PluginMetadata):
            raise PluginError(f'{spec.target!r} has no PluginMetadata')
        granted = grant(spec.name, metadata, spec.grants, self.allowed)
        data_dir = os.path.join(self.data_dir, spec.name) if self.data_dir else ''
        if data_dir and 'storage.write' in granted:
            os.makedirs(data_dir, exist_ok=True)
        slot.ctx = PluginContext(plugin=spec.name, config=dict(spec.config), granted=granted,
                                 audit_sink=self._sink_for(slot), data_dir=data_dir,
                                 ros_node=self.ros_node, direct=self.handles)
        with slot.lock, acting_as(slot.ctx if self.guard and slot.guarded else None):
            slot.plugin.init(slot.ctx)
        declared = sorted(declared_by(metadata))
        self._audit(slot, 'plugin_init', version=metadata.version, type=metadata.type.value,
                    mode=spec.mode, target=spec.target, declared=declared, granted=sorted(granted))
        ungranted = sorted(set(declared) - granted)
        if ungranted:
            self.logger.warning(f'plugin {spec.name} declares {", ".join(ungranted)} but config '
                                'does not grant it: such calls will be refused')
        slot.state, slot.error = SlotState.RUNNING, ''
        self.handles[spec.name] = PluginHandle(self, spec.name, metadata)

    def _build(self, spec: PluginSpec) -> Plugin:
        if spec.mode == IN_PROCESS:
            return resolve_class(spec.target)()
        try:
            from loom_ros.plugins.sandbox import sandboxed_plugin
        except ImportError as exc:
            raise PluginError(f'plugin {spec.name}: mode {spec.mode!r} needs loom_ros.plugins.'
                              f'sandbox, which cannot be imported: {exc}') from None
        return sandboxed_plugin(spec.mode, spec.target, spec.sandbox)

    # -- HandleEvent ----------------------------------------------------------------------------
    def handle(self, name: str, event: Event) -> PluginResponse:
        """One event into plugin `name`; any failure comes back as PluginResponse.failure."""
        slot = self.slots.get(name)
        if slot is None:
            return PluginResponse.failure(f'no plugin {name!r} in this host (have: '
                                          f'{", ".join(self.slots) or "none"})')
        with slot.lock:
            slot.counters['calls'] += 1
            if slot.state is not SlotState.RUNNING:
                slot.counters['failed'] += 1
                return PluginResponse.failure(
                    f'plugin {name} is not running ({slot.state.value}'
                    + (f': {slot.error}' if slot.error else '') + ')')
            try:
                event.validate()
            except EventRejected as exc:
                slot.counters['bad_input'] += 1
                slot.counters['failed'] += 1
                return PluginResponse.failure(f'plugin {name}: refused input event: {exc}')
            if slot.metadata.type is PluginType.ACTUATOR:
                try:  # every actuator command is on record before it runs (fail closed)
                    self._audit(slot, 'actuator_command', event_id=event.id,
                                event_type=event.type, source=event.source,
                                payload=_excerpt(event))
                except Exception as exc:
                    slot.counters['failed'] += 1
                    return PluginResponse.failure(f'plugin {name}: actuator command not run, '
                                                  f'the audit log refused it: {exc}')
            start = slot.call_started = time.perf_counter()
            try:
                # A copy: the caller's event may be every subscriber's in this process, and
                # the floor of what the plugin answers is read from it (_checked).
                with acting_as(slot.ctx if self.guard and slot.guarded else None):
                    response = slot.plugin.handle_event(event.copy())
            except CapabilityDenied as exc:
                response = PluginResponse.failure(str(exc))
            except Exception as exc:  # a plugin bug is an answer, not a crash
                slot.counters['raised'] += 1
                response = PluginResponse.failure(f'plugin {name} raised {_reason(exc)}')
                self.logger.error(f'plugin {name} raised on event {event.id} ({event.type}): '
                                  f'{_reason(exc)}')
            finally:
                slot.call_started = 0.0
            latency = (time.perf_counter() - start) * 1000.0
            response = self._checked(slot, event, response)
            response.latency_ms = latency
            slot.latency_ms_total += latency
            slot.counters['handled' if response.ok else 'failed'] += 1
            return response

    def _checked(self, slot: Slot, event: Event, response) -> PluginResponse:
        """The plugin's answer as it may leave the host, or a failure (counted bad_output).

        An answer is filed under its question's data subject: one that names none gets it
        (an invalid id carried as is, a present but empty one as '..', which no consent check
        accepts, as agents do); one that names another is refused whole, since either record
        would be wrong: under the plugin's subject it moves the question's data into another
        person's export, under the question's it files what the plugin says is someone else's.
        An answer to an anonymous question may name a subject (a recogniser identifies
        someone). An answer is never less private than its question."""
        name = slot.spec.name
        if not isinstance(response, PluginResponse):
            slot.counters['bad_output'] += 1
            return PluginResponse.failure(f'plugin {name} returned {type(response).__name__}, '
                                          'not a PluginResponse')
        events = response.events
        if not isinstance(events, (list, tuple)) or len(events) > MAX_RESPONSE_EVENTS:
            slot.counters['bad_output'] += 1
            count = len(events) if isinstance(events, (list, tuple)) else '?'
            return PluginResponse.failure(f'plugin {name} answered with {count} events: at most '
                                          f'{MAX_RESPONSE_EVENTS}, in a list')
        subject = named_subject(event)
        floor = effective_privacy(event)
        writes = None if slot.guarded else self._writes(slot)
        own = getattr(slot.metadata, 'name', '') or name
        own_names = (own, f'plugin/{own}')   # how a plugin names itself (perception: plugin/x)
        for out in response.events:
            if not isinstance(out, Event):
                slot.counters['bad_output'] += 1
                return PluginResponse.failure(f'plugin {name} produced a '
                                              f'{type(out).__name__}, not an Event')
            if not isinstance(out.metadata, dict):
                slot.counters['bad_output'] += 1
                return PluginResponse.failure(f'plugin {name} produced an event whose metadata '
                                              f'is a {type(out.metadata).__name__}, not a dict')
            # The host says who answered and to what: a sandboxed plugin's events came back
            # under its own metadata name, so the bus's "never feed a plugin its own output"
            # check missed them and an output topic among its inputs looped for ever; and a
            # claimed in_reply_to would tie the answer to someone else's question.
            if out.source != name:
                if out.source and out.source not in own_names:   # its own name: no claim
                    slot.counters['source_replaced'] += 1
                out.source = name
            out.metadata['in_reply_to'] = event.id
            if writes is not None and not any(w.matches(out.type) for w in writes):
                slot.counters['bad_output'] += 1   # untrusted code: only what it declared
                return PluginResponse.failure(
                    f'plugin {name} produced an event of type {str(out.type)[:64]!r}, which its '
                    f'metadata does not declare (writes: {", ".join(slot.metadata.writes)})')
            # An answer is about whom its question was about, so consent and erasure find it.
            if subject and SUBJECT_METADATA_KEY not in out.metadata:
                out.metadata[SUBJECT_METADATA_KEY] = subject
                slot.counters['subject_carried'] += 1
            elif subject and named_subject(out) != subject:
                slot.counters['bad_output'] += 1   # no id in the text: it is logged and returned
                return PluginResponse.failure(f'plugin {name} filed an answer under another data '
                                              "subject than its question's")
            # An answer is as private as its question (field or metadata, the strictest).
            if effective_privacy(out) < floor:
                slot.counters['privacy_raised'] += 1
                out.privacy = floor
            try:
                out.validate()
            except EventRejected as exc:
                slot.counters['bad_output'] += 1
                return PluginResponse.failure(f'plugin {name} produced an invalid event: {exc}')
        return response

    @staticmethod
    def _writes(slot: Slot) -> list[TopicPattern]:
        """The event types a sandboxed plugin declared it writes (`ros:` topics are not
        events), read once per slot. Exact types only: the declaration is the plugin's own
        word, and `**` would allow anything."""
        if slot.writes is None:
            patterns = []
            for text in getattr(slot.metadata, 'writes', ()) or ():
                if isinstance(text, str) and not text.startswith('ros:'):
                    try:
                        pattern = TopicPattern.parse(text)
                    except TopicNameError:
                        continue   # never matches: an event of that type is refused
                    if not pattern.is_wildcard:
                        patterns.append(pattern)
            slot.writes = patterns
        return slot.writes

    # -- Health ---------------------------------------------------------------------------------
    def health(self, name: str) -> HealthStatus:
        slot = self.slots.get(name)
        if slot is None:
            return HealthStatus(HealthState.FAILED, f'no plugin {name!r} in this host')
        if slot.state is not SlotState.RUNNING:
            status = HealthStatus(HealthState.FAILED, f'{slot.state.value}'
                                  + (f': {slot.error}' if slot.error else ''))
        elif not slot.lock.acquire(blocking=False):
            # A call is running: health() waits for no call (the health service and
            # /diagnostics froze for as long as a slow plugin's call took); one running past
            # BUSY_DEGRADED_S is reported, or a call that never returns would look healthy.
            started = slot.call_started
            running = time.perf_counter() - started if started else 0.0
            status = HealthStatus(
                HealthState.DEGRADED if running > BUSY_DEGRADED_S else HealthState.OK,
                f'busy: a call is running for {running:.1f} s' if started else
                'busy: a call is running')
        else:
            try:
                try:
                    with acting_as(slot.ctx if self.guard and slot.guarded else None):
                        status = slot.plugin.health()
                finally:
                    slot.lock.release()
                if not isinstance(status, HealthStatus):
                    raise PluginError(f'health() returned {type(status).__name__}')
            except Exception as exc:
                slot.counters['health_errors'] += 1
                status = HealthStatus(HealthState.FAILED, f'health() raised {_reason(exc)}')
        details = dict(status.details)
        details.update({k: str(v) for k, v in sorted(slot.counters.items())})
        handled = slot.counters['handled'] + slot.counters['failed']
        if handled:
            details['mean_latency_ms'] = f'{slot.latency_ms_total / handled:.3f}'
        details['state'] = slot.state.value
        details['mode'] = slot.spec.mode
        if slot.ctx is not None:
            details['granted'] = ','.join(sorted(slot.ctx.granted))
        return HealthStatus(status.state, status.message, details)

    # -- Shutdown -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Shutdown every running plugin; one that raises is logged and the others still stop."""
        for name, slot in self.slots.items():
            self.handles.pop(name, None)
            if slot.state is not SlotState.RUNNING:
                continue
            try:
                with slot.lock, acting_as(slot.ctx if self.guard and slot.guarded else None):
                    slot.plugin.shutdown()
            except Exception as exc:
                slot.counters['shutdown_errors'] += 1
                self.logger.error(f'plugin {name} failed to shut down cleanly: {_reason(exc)}')
            slot.state = SlotState.STOPPED

    # -- views ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def running(self) -> list[str]:
        return [n for n, s in self.slots.items() if s.state is SlotState.RUNNING]

    def counters(self, name: str) -> dict[str, int]:
        return dict(self.slots[name].counters)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, (PluginError, CapabilityConfigError, PluginNotFound, PluginsFileError)):
        return text
    return f'{type(exc).__name__}: {text}' if text else type(exc).__name__


def _excerpt(event: Event, limit: int = 512) -> str:
    """The payload as the audit may keep it: text only for a Public, anonymous event."""
    payload = bytes(event.payload)
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return f'<{len(payload)} bytes>'
    return audit_excerpt(event, text, limit)
