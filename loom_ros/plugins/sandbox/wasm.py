"""WASM plugins: a WebAssembly module run in wasmtime behind the plugin contract, with a fuel
budget per call, store limits, and no file system or network unless granted.

Store limits (wasmtime's store limiter, one store per instance): linear memory at most
`memory_limit_bytes`, each table at most `table_elements_limit` elements, one instance, one
memory and at most `max_tables` tables. Instantiating a module that declares more fails at init;
`memory.grow` and `table.grow` past a limit return -1 (the module may trap on it). Both bound what
a module can take from the host's memory. After each call the exported memory and tables are
measured: a call that leaves memory within a page of its limit, or a table over half its limit (it
could not double), is counted (`limit_hits`), the instance is thrown away (its memory goes back)
and health says DEGRADED until a call ends below that. wasmtime does not report a refused grow
itself, so this is measured, not exact; tables the module does not export are bounded the same
way but cannot be measured. A module that keeps growing after -1 runs out of fuel (a trap).

A runaway or crashing module traps; the trap becomes a PluginResponse.failure that says why, the
instance is thrown away (its state may be half-updated) and the next call gets a fresh one. After
more than `max_restarts` traps in a row the plugin is FAILED and refuses calls. The host process
never goes down with it.

ABI (version 1), all integers i32 unless noted:
  export `memory`                  the module's linear memory
  export `alloc(len) -> ptr`       room for `len` input bytes; 0 when it cannot (out of memory).
                                   Called once before every `handle`; the module may reuse the
                                   same memory on every call (the host has read the last answer).
  export `handle(ptr, len) -> i64` the event as UTF-8 JSON at [ptr, ptr+len); returns
                                   (out_ptr << 32) | out_len of a UTF-8 JSON answer in `memory`.
Input: the event as a JSON object whose first member is `payload` (a JSON string when the payload
is UTF-8, else `payload_b64`), then type, id, source, timestamp_ms, metadata, confidence, tags,
priority, privacy (name), frame_id. Answer: {"ok": true, "error": "", "events": [{"type": ...,
"payload": ...}]} (see loom_ros.plugins.sandbox.wire); events without a source get the plugin name.

Metadata (PluginMetadata fields) comes from the `metadata` option or a sidecar file next to the
module: <module>.yaml, <module>.yml or <module>.json (e.g. upper.wat -> upper.yaml).

Grants: WASI is linked only with the `wasi` option; then the module gets no argv, environment or
stdio, and the plugin's data_dir is preopened as /data only when storage.read (read-only) or
storage.write is granted. WASI preview 1 has no sockets, so a WASM plugin has no network even when
`network` is granted: run such a plugin as a subprocess plugin instead.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import wasmtime
import yaml

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import (Capability, HealthState, HealthStatus, Plugin,
                                       PluginContext, PluginError, PluginMetadata, PluginResponse)
from loom_ros.plugins.sandbox.wire import WireError, event_to_wire, parse_json, response_from_wire

ABI_VERSION = 1
WASI_MODULE = 'wasi_snapshot_preview1'
WASI_GUEST_DIR = '/data'
WASM_PAGE = 65536
DEFAULT_FUEL_PER_CALL = 50_000_000
DEFAULT_MEMORY_LIMIT_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_OUTPUT_BYTES = 4 * 1024 * 1024
DEFAULT_TABLE_ELEMENTS_LIMIT = 100_000   # about 800 KB of table per store
DEFAULT_MAX_TABLES = 4

_ENGINE: list[wasmtime.Engine] = []
_ENGINE_LOCK = threading.Lock()


def fuel_engine() -> wasmtime.Engine:
    """The process's wasmtime engine: every store in it counts fuel. One engine compiles all
    modules (engines are thread-safe; stores are not)."""
    with _ENGINE_LOCK:
        if not _ENGINE:
            config = wasmtime.Config()
            config.consume_fuel = True
            _ENGINE.append(wasmtime.Engine(config))
        return _ENGINE[0]


def load_sidecar_metadata(module_path: Path) -> PluginMetadata | None:
    """PluginMetadata from <module>.yaml/.yml/.json beside the module, or None if there is none."""
    for suffix in ('.yaml', '.yml', '.json'):
        path = module_path.with_suffix(suffix)
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding='utf-8')
            data = json.loads(text) if suffix == '.json' else yaml.safe_load(text)
            return PluginMetadata.model_validate(data)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise PluginError(f'{path}: not valid plugin metadata: {exc}') from None
    return None


class WasmPlugin(Plugin):
    """A proxy Plugin running a WebAssembly module (.wasm binary or .wat text) in wasmtime."""

    def __init__(self, module: str | Path, metadata: PluginMetadata | dict | None = None, *,
                 fuel_per_call: int = DEFAULT_FUEL_PER_CALL,
                 memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
                 max_restarts: int = 3, wasi: bool = False,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
                 table_elements_limit: int = DEFAULT_TABLE_ELEMENTS_LIMIT,
                 max_tables: int = DEFAULT_MAX_TABLES) -> None:
        super().__init__()
        self.module_path = Path(module)
        if fuel_per_call <= 0 or memory_limit_bytes < WASM_PAGE or max_restarts < 0 \
                or table_elements_limit < 0 or max_tables < 0:
            raise PluginError(f'{self.module_path.name}: fuel_per_call must be > 0, '
                              f'memory_limit_bytes >= {WASM_PAGE}, max_restarts, '
                              'table_elements_limit and max_tables >= 0')
        self.table_elements_limit = int(table_elements_limit)
        self.max_tables = int(max_tables)
        self.fuel_per_call = int(fuel_per_call)
        self.memory_limit_bytes = int(memory_limit_bytes)
        self.max_restarts = int(max_restarts)
        self.wasi = bool(wasi)
        self.max_output_bytes = int(max_output_bytes)
        if isinstance(metadata, dict):
            try:
                metadata = PluginMetadata.model_validate(metadata)
            except ValueError as exc:
                raise PluginError(f'{self.module_path}: bad metadata: {exc}') from None
        metadata = metadata or load_sidecar_metadata(self.module_path)
        if metadata is None:
            raise PluginError(f'{self.module_path}: no plugin metadata; write '
                              f'{self.module_path.with_suffix(".yaml").name} next to it or pass '
                              '`metadata` in the plugin config')
        self.metadata = metadata  # per instance: one proxy class serves every module
        self._module = self._compile()
        self._lock = threading.Lock()
        self._store: wasmtime.Store | None = None
        self._exports: Any = None
        self._failed = ''          # why the plugin refuses calls for good ('' while usable)
        self._consecutive_traps = 0
        self.stats = {'calls': 0, 'failures': 0, 'traps': 0, 'restarts': 0, 'last_fuel_used': 0,
                      'limit_hits': 0, 'malformed': 0}
        self._at_limit = ''  # what the last call left at its limit ('' when nothing)
        self._last_error = ''

    # -- loading ----------------------------------------------------------------------------
    def _compile(self) -> wasmtime.Module:
        if not self.module_path.is_file():
            raise PluginError(f'WASM module {self.module_path} not found')
        try:
            module = wasmtime.Module.from_file(fuel_engine(), str(self.module_path))
        except wasmtime.WasmtimeError as exc:
            raise PluginError(f'{self.module_path}: not a valid WASM module: '
                              f'{_first_line(str(exc))}') from None
        exports = {e.name: e.type for e in module.exports}
        problems = []
        if not isinstance(exports.get('memory'), wasmtime.MemoryType):
            problems.append('export `memory` (a memory)')
        for name, params, results in (('alloc', 1, 1), ('handle', 2, 1)):
            ty = exports.get(name)
            if not isinstance(ty, wasmtime.FuncType) or len(ty.params) != params \
                    or len(ty.results) != results:
                problems.append(f'export function `{name}` with {params} params, 1 result')
        if problems:
            raise PluginError(f'{self.module_path}: does not follow the Loom WASM ABI '
                              f'v{ABI_VERSION}; missing {"; ".join(problems)}')
        return module

    def _instantiate(self) -> None:
        """A fresh store and instance: limits, fuel, and only the imports that were granted."""
        engine = fuel_engine()
        store = wasmtime.Store(engine)
        store.set_limits(memory_size=self.memory_limit_bytes,
                         table_elements=self.table_elements_limit, instances=1,
                         tables=self.max_tables, memories=1)
        store.set_fuel(self.fuel_per_call)  # start functions run on this budget
        linker = wasmtime.Linker(engine)
        wasi_imports = [f'{i.module}::{i.name}' for i in self._module.imports
                        if i.module == WASI_MODULE]
        if self.wasi:
            linker.define_wasi()
            store.set_wasi(self._wasi_config())
        elif wasi_imports:
            raise PluginError(
                f'{self.module_path.name} imports WASI ({", ".join(wasi_imports[:3])}) but WASI '
                'is not granted: set `wasi: true` in its sandbox options (files additionally '
                'need storage.read or storage.write)')
        try:
            instance = linker.instantiate(store, self._module)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            raise PluginError(f'{self.module_path.name}: cannot instantiate: '
                              f'{_trap_reason(exc)}') from None
        self._store, self._exports = store, instance.exports(store)

    def _wasi_config(self) -> wasmtime.WasiConfig:
        """No argv, environment or stdio; the data dir only for storage grants."""
        config = wasmtime.WasiConfig()
        ctx = self.ctx
        if ctx is not None and ctx.data_dir:
            write = Capability.STORAGE_WRITE.value in ctx.granted
            if write or Capability.STORAGE_READ.value in ctx.granted:
                try:
                    config.preopen_dir(ctx.data_dir, WASI_GUEST_DIR, write)
                except wasmtime.WasmtimeError as exc:
                    raise PluginError(f'{self.module_path.name}: cannot open its data dir '
                                      f'{ctx.data_dir} for WASI: {exc}') from None
                ctx.audit('wasm_preopen', dir=ctx.data_dir, guest=WASI_GUEST_DIR, writable=write)
        return config

    @property
    def label(self) -> str:
        """The name errors use: the host's instance name once initialised, else the metadata's."""
        return self.ctx.plugin if self.ctx is not None else self.metadata.name

    # -- the contract -----------------------------------------------------------------------
    def init(self, ctx: PluginContext) -> None:
        super().init(ctx)
        with self._lock:
            self._instantiate()

    def handle_event(self, event: Event) -> PluginResponse:
        start = time.perf_counter()
        with self._lock:
            self.stats['calls'] += 1
            if self._failed:
                return self._fail(f'plugin {self.label!r} is failed and refuses calls: '
                                  f'{self._failed}')
            if self._exports is None:
                try:
                    self._instantiate()
                    self.stats['restarts'] += 1
                except PluginError as exc:
                    self._failed = str(exc)
                    return self._fail(str(exc))
            response = self._call(event)
        response.latency_ms = (time.perf_counter() - start) * 1000.0
        return response

    def _call(self, event: Event) -> PluginResponse:
        store, exports = self._store, self._exports
        name = self.label
        data = json.dumps(event_to_wire(event, text_payload=True), separators=(',', ':'),
                          ensure_ascii=False).encode()
        try:
            store.set_fuel(self.fuel_per_call)
            ptr = exports['alloc'](store, len(data))
            memory = exports['memory']
            if not isinstance(ptr, int) or ptr <= 0 or ptr + len(data) > memory.data_len(store):
                return self._fail(f'plugin {name!r} could not take an input of {len(data)} bytes '
                                  f'(alloc returned {ptr!r}; memory limit '
                                  f'{self.memory_limit_bytes} bytes)')
            memory.write(store, data, ptr)
            packed = exports['handle'](store, ptr, len(data))
            self.stats['last_fuel_used'] = self.fuel_per_call - store.get_fuel()
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            return self._trapped(exc)
        self._check_limits(store, exports)
        out_ptr, out_len = (packed >> 32) & 0xFFFFFFFF, packed & 0xFFFFFFFF
        if out_len > self.max_output_bytes or out_ptr + out_len > memory.data_len(store):
            return self._fail(f'plugin {name!r} answered {out_len} bytes at {out_ptr}: outside '
                              f'its memory or over {self.max_output_bytes} bytes')
        self._consecutive_traps = 0
        try:  # bounded in elements and depth: deep nesting raised RecursionError out of here
            answer = parse_json(memory.read(store, out_ptr, out_ptr + out_len))
        except WireError as exc:
            self.stats['malformed'] += 1
            return self._fail(f'plugin {name!r} sent a {exc}')
        response = response_from_wire(answer, self.metadata.name)
        if not response.ok:
            self.stats['failures'] += 1
            self._last_error = response.error
        return response

    def _at_limits(self, store: wasmtime.Store, exports: Any) -> str:
        """Which exported memory or table the instance left at its store limit ('' if none)."""
        for name, item in _items(exports):
            if isinstance(item, wasmtime.Memory):
                if item.data_len(store) + WASM_PAGE > self.memory_limit_bytes:
                    return f'memory {name!r} at its limit of {self.memory_limit_bytes} bytes'
            elif isinstance(item, wasmtime.Table):
                size = item.size(store)
                if size * 2 > self.table_elements_limit:  # it could not double any more
                    return (f'table {name!r} has {size} elements, over half its limit of '
                            f'{self.table_elements_limit}')
        return ''

    def _check_limits(self, store: wasmtime.Store, exports: Any) -> None:
        """Count a call that ran into a limit and drop the instance that holds that much."""
        self._at_limit = self._at_limits(store, exports)
        if self._at_limit:
            self.stats['limit_hits'] += 1
            self._last_error = f'plugin {self.label!r} reached a store limit: {self._at_limit}'
            self._store = self._exports = None  # the next call gets a fresh, small instance
            if self.ctx is not None:
                self.ctx.audit('wasm_limit', reason=self._at_limit)

    def _trapped(self, exc: Exception) -> PluginResponse:
        """A trap: say why, drop the instance, and fail for good after too many in a row."""
        reason = _trap_reason(exc)
        code = getattr(exc, 'trap_code', None)
        memory_size = self._exports['memory'].data_len(self._store)
        at_limit = self._at_limits(self._store, self._exports)
        self._at_limit = at_limit
        if at_limit:
            self.stats['limit_hits'] += 1
        if code is wasmtime.TrapCode.OUT_OF_FUEL:
            reason = (f'ran out of fuel: used its whole budget of {self.fuel_per_call} units in '
                      'one call (a runaway loop?)' + (f' with {at_limit}' if at_limit else ''))
        elif memory_size + WASM_PAGE > self.memory_limit_bytes:
            reason = (f'reached its memory limit of {self.memory_limit_bytes} bytes '
                      f'(memory is {memory_size} bytes) and trapped: {reason}')
        elif at_limit:
            reason = f'reached a store limit ({at_limit}) and trapped: {reason}'
        self.stats['traps'] += 1
        self._consecutive_traps += 1
        self._store = self._exports = None
        name = self.label
        if self._consecutive_traps > self.max_restarts:
            self._failed = (f'{self._consecutive_traps} traps in a row (max_restarts '
                            f'{self.max_restarts}); last: {reason}')
        if self.ctx is not None:
            self.ctx.audit('wasm_trap', reason=reason, failed=bool(self._failed))
        return self._fail(f'plugin {name!r} stopped: {reason}')

    def _fail(self, error: str) -> PluginResponse:
        self.stats['failures'] += 1
        self._last_error = error
        return PluginResponse.failure(error)

    def health(self) -> HealthStatus:
        details = {k: str(v) for k, v in self.stats.items()}
        details.update(fuel_per_call=str(self.fuel_per_call),
                       memory_limit_bytes=str(self.memory_limit_bytes),
                       table_elements_limit=str(self.table_elements_limit),
                       consecutive_traps=str(self._consecutive_traps),
                       last_error=self._last_error)
        if self._failed:
            return HealthStatus(HealthState.FAILED, self._failed, details)
        if self._consecutive_traps:
            return HealthStatus(HealthState.DEGRADED,
                                f'{self._consecutive_traps} trap(s) in a row, restarting on the '
                                f'next call; last: {self._last_error}', details)
        if self._at_limit:
            return HealthStatus(HealthState.DEGRADED,
                                f'the last call reached a store limit ({self._at_limit}); the '
                                'instance was replaced', details)
        return HealthStatus(HealthState.OK, '', details)

    def shutdown(self) -> None:
        with self._lock:
            self._store = self._exports = None


def _items(exports: Any) -> list[tuple[str, Any]]:
    """(name, extern) of an instance's exports."""
    return list(exports.items())


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _trap_reason(exc: Exception) -> str:
    """The useful line of a wasmtime error: the trap after 'Caused by:', not the backtrace."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if 'Caused by:' in lines:
        after = lines[lines.index('Caused by:') + 1:]
        if after:
            return after[0]
    return lines[0] if lines else type(exc).__name__
