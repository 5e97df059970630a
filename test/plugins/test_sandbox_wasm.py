"""WASM plugins in real wasmtime: the example modules in test/plugins/wasm/ answer, run out of fuel,
hit their memory limit and get no file system unless granted, and the host process carries on."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from loom_ros.bus.event import Event
from loom_ros.plugins.contract import (HealthState, Plugin, PluginContext, PluginError,
                                       PluginMetadata)
from loom_ros.plugins.sandbox import sandboxed_plugin
from loom_ros.plugins.sandbox.wasm import WasmPlugin

WASM = Path(__file__).parent / 'wasm'
META = {'name': 'wasm_example', 'type': 'tool'}


def started(module: str, ctx: PluginContext | None = None, **options) -> WasmPlugin:
    plugin = WasmPlugin(WASM / module, options.pop('metadata', META), **options)
    plugin.init(ctx or PluginContext(plugin=plugin.metadata.name))
    return plugin


def text(payload: str) -> Event:
    return Event(type='text.in', payload=payload.encode())


def test_upper_answers_with_metadata_from_its_sidecar():
    plugin = WasmPlugin(WASM / 'upper.wat')
    assert isinstance(plugin, Plugin)
    assert plugin.metadata == PluginMetadata(
        name='wasm_upper', type='feature_extractor', reads=('text.in',), writes=('text.upper',),
        description='Upper-cases a text payload (example WASM plugin used by tests and the '
                    'benchmark).')
    plugin.init(PluginContext(plugin='wasm_upper'))
    response = plugin.handle_event(text('hello, "robot" \\ é'))
    assert response.ok, response.error
    [out] = response.events
    assert (out.type, out.source, out.payload.decode()) == ('text.upper', 'wasm_upper',
                                                            'HELLO, "ROBOT" \\ é')
    assert response.latency_ms > 0
    assert plugin.health().state is HealthState.OK
    assert int(plugin.health().details['last_fuel_used']) > 0
    plugin.shutdown()


def test_the_module_answers_a_failure_for_a_binary_payload():
    plugin = started('upper.wat', metadata=None)
    response = plugin.handle_event(Event(type='text.in', payload=b'\xff\xfe'))
    assert not response.ok and response.error == 'no text payload'
    assert plugin.health().state is HealthState.OK  # the module said no; nothing trapped


def test_infinite_loop_runs_out_of_fuel_then_the_plugin_fails_and_refuses_calls():
    audit: list[dict] = []
    plugin = started('spin.wat', PluginContext(plugin='spin', audit_sink=audit.append),
                     fuel_per_call=1_000_000, max_restarts=1)
    first = plugin.handle_event(text('go'))
    assert not first.ok and 'ran out of fuel' in first.error and '1000000' in first.error
    health = plugin.health()
    assert health.state is HealthState.DEGRADED and health.details['traps'] == '1'
    second = plugin.handle_event(text('go'))  # a fresh instance, the same runaway loop
    assert not second.ok and 'ran out of fuel' in second.error
    health = plugin.health()
    assert health.state is HealthState.FAILED and '2 traps in a row' in health.message
    assert health.details['restarts'] == '1'
    refused = plugin.handle_event(text('go'))
    assert not refused.ok and 'is failed and refuses calls' in refused.error
    assert [r['kind'] for r in audit] == ['wasm_trap', 'wasm_trap']
    assert audit[-1]['failed'] is True
    assert os.getpid() > 0  # still here: the trap never left wasmtime


def test_after_a_trap_the_next_call_runs_on_a_fresh_instance():
    # upper.wat scans its input byte by byte: a big payload costs more fuel than the budget
    plugin = started('upper.wat', metadata=None, fuel_per_call=200_000, max_restarts=3)
    big = plugin.handle_event(text('a' * 100_000))
    assert not big.ok and 'ran out of fuel' in big.error
    assert plugin.health().state is HealthState.DEGRADED
    small = plugin.handle_event(text('small'))
    assert small.ok and small.events[0].payload == b'SMALL'
    health = plugin.health()
    assert health.state is HealthState.OK
    assert (health.details['traps'], health.details['restarts']) == ('1', '1')


def test_memory_grower_traps_at_the_memory_limit():
    plugin = started('grow.wat', memory_limit_bytes=1 << 20, max_restarts=0)
    response = plugin.handle_event(text('grow'))
    assert not response.ok
    assert 'memory limit of 1048576 bytes' in response.error and 'unreachable' in response.error
    assert plugin.health().state is HealthState.FAILED


def test_input_bigger_than_the_memory_limit_is_refused_clearly():
    plugin = started('upper.wat', metadata=None, memory_limit_bytes=256 * 1024)
    response = plugin.handle_event(text('x' * 200_000))
    assert not response.ok and 'could not take an input' in response.error
    assert plugin.handle_event(text('ok')).ok  # not a trap: the same instance keeps working


def test_wasi_module_does_not_instantiate_without_a_grant():
    plugin = WasmPlugin(WASM / 'wasi_read.wat', META)
    with pytest.raises(PluginError, match='imports WASI .* not granted'):
        plugin.init(PluginContext(plugin='wasm_example'))


def wasi_errno(plugin: WasmPlugin) -> int:
    response = plugin.handle_event(text('open'))
    assert response.ok, response.error
    return int(response.events[0].payload)


def test_wasi_without_a_storage_grant_has_no_preopened_directory(tmp_path):
    (tmp_path / 'note.txt').write_text('secret')
    ctx = PluginContext(plugin='wasm_example', data_dir=str(tmp_path))
    assert wasi_errno(started('wasi_read.wat', ctx, wasi=True)) == 8  # EBADF: no fd 3


def test_wasi_with_storage_read_sees_only_its_data_dir(tmp_path):
    (tmp_path / 'note.txt').write_text('hello')
    audit: list[dict] = []
    ctx = PluginContext(plugin='wasm_example', data_dir=str(tmp_path),
                        granted=frozenset({'storage.read'}), audit_sink=audit.append)
    assert wasi_errno(started('wasi_read.wat', ctx, wasi=True)) == 0
    assert audit[0]['kind'] == 'wasm_preopen' and audit[0]['writable'] is False
    (tmp_path / 'note.txt').unlink()
    assert wasi_errno(started('wasi_read.wat', ctx, wasi=True)) == 44  # ENOENT


@pytest.mark.parametrize('wat, message', [
    ('(module (memory (export "memory") 1))', 'does not follow the Loom WASM ABI'),
    ('(module (memory (export "memory") 1) (func (export "alloc") (param i32) (result i32) '
     'i32.const 8) (func (export "handle") (param i32 i32) (result i64) i64.const 1))',
     None),
    ('(module nonsense', 'not a valid WASM module'),
])
def test_bad_modules_are_refused_at_load_or_answer_a_clear_failure(tmp_path, wat, message):
    path = tmp_path / 'bad.wat'
    path.write_text(wat)
    if message:
        with pytest.raises(PluginError, match=message):
            WasmPlugin(path, META)
        return
    plugin = WasmPlugin(path, META)  # answers (ptr 0, len 1): one byte that is not JSON
    plugin.init(PluginContext(plugin='wasm_example'))
    response = plugin.handle_event(text('x'))
    assert not response.ok and 'not JSON' in response.error


def module_plugin(tmp_path, data: str, at: int, packed, pages: int = 1) -> WasmPlugin:
    """A module holding `data` at `at` in its memory whose handle() always returns `packed`
    (pointer << 32 | length), initialised."""
    path = tmp_path / 'answering.wat'
    path.write_text(f'(module (memory (export "memory") {pages})'
                    f' (data (i32.const {at}) "{data}")'
                    ' (func (export "alloc") (param i32) (result i32) i32.const 16)'
                    f' (func (export "handle") (param i32 i32) (result i64) i64.const {packed}))')
    plugin = WasmPlugin(path, META)
    plugin.init(PluginContext(plugin='wasm_example'))
    return plugin


def answering(tmp_path, packed: str) -> WasmPlugin:
    """A module whose handle() always returns `packed`; its memory starts with a bad answer."""
    return module_plugin(tmp_path, '{\\"events\\":[{}]}', 0, packed)


def test_answers_outside_memory_or_malformed_are_failures(tmp_path):
    outside = answering(tmp_path, '0x7fff000000000010').handle_event(text('x'))
    assert not outside.ok and 'outside its memory' in outside.error
    malformed = answering(tmp_path, '15').handle_event(text('x'))  # {"events":[{}]}
    assert not malformed.ok
    assert 'malformed answer' in malformed.error and 'no type' in malformed.error


def fixed_answer(tmp_path, answer: bytes) -> WasmPlugin:
    """A module whose handle() answers `answer` (no quote or backslash in it) to any event."""
    return module_plugin(tmp_path, answer.decode(), 65536, (65536 << 32) | len(answer),
                         pages=(65536 + len(answer)) // 65536 + 1)


@pytest.mark.parametrize('answer, reason', [
    (b'[' * 100_000 + b']' * 100_000, 'too deep'),   # json.loads raised RecursionError
    (b'[' * 100 + b']' * 100, 'too deep'),            # parses, but over MAX_JSON_DEPTH
    (b'[' + b'[],' * 300_000 + b'[]]', 'too many elements'),
])
def test_deep_or_huge_answers_are_malformed_not_raised(tmp_path, answer, reason):
    plugin = fixed_answer(tmp_path, answer)
    response = plugin.handle_event(text('x'))
    assert not response.ok and f'sent a malformed answer ({reason})' in response.error
    health = plugin.health()
    assert health.details['malformed'] == '1' and health.details['traps'] == '0'


def test_missing_metadata_and_module_are_clear_errors(tmp_path):
    (tmp_path / 'anon.wat').write_text((WASM / 'spin.wat').read_text())
    with pytest.raises(PluginError, match='no plugin metadata; write anon.yaml'):
        WasmPlugin(tmp_path / 'anon.wat')
    with pytest.raises(PluginError, match='not found'):
        WasmPlugin(tmp_path / 'missing.wasm', META)
    with pytest.raises(PluginError, match='bad metadata'):
        WasmPlugin(tmp_path / 'anon.wat', {'name': 'x'})


def test_the_sandbox_seam_builds_a_wasm_plugin():
    plugin = sandboxed_plugin('wasm', str(WASM / 'upper.wat'), {'fuel_per_call': 10_000_000})
    assert isinstance(plugin, WasmPlugin) and plugin.fuel_per_call == 10_000_000
    with pytest.raises(PluginError, match='unknown sandbox mode'):
        sandboxed_plugin('docker', 'x')
    with pytest.raises(PluginError, match='unknown wasm sandbox option.* fuel; known: metadata, '
                                          'fuel_per_call'):
        sandboxed_plugin('wasm', str(WASM / 'upper.wat'), {'fuel': 1})


CREATE_WAT = '''(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "new.txt")
  (data (i32.const 16) "{\\"events\\":[{\\"type\\":\\"wasi.errno\\",\\"payload\\":\\"")
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "handle") (param i32 i32) (result i64)
    (local $errno i32)
    ;; path_open(fd 3, "new.txt", O_CREAT, rights fd_write): creates a file in /data
    (local.set $errno (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 7)
                        (i32.const 1) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 512)))
    (i32.store8 (i32.const 59) (i32.add (i32.const 48) (i32.div_u (local.get $errno) (i32.const 10))))
    (i32.store8 (i32.const 60) (i32.add (i32.const 48) (i32.rem_u (local.get $errno) (i32.const 10))))
    (i32.store (i32.const 61) (i32.const 0x7d5d7d22))  ;; "}]} in little-endian order
    (i64.const 0x1000000031)))'''  # answer at 16, 49 bytes


@pytest.mark.parametrize('grant, errno, created', [('storage.read', 63, False),  # EPERM
                                                   ('storage.write', 0, True)])
def test_storage_read_preopens_read_only_and_storage_write_writable(tmp_path, grant, errno,
                                                                    created):
    (tmp_path / 'create.wat').write_text(CREATE_WAT)
    data = tmp_path / 'data'
    data.mkdir()
    plugin = WasmPlugin(tmp_path / 'create.wat', META, wasi=True)
    plugin.init(PluginContext(plugin='wasm_example', data_dir=str(data),
                              granted=frozenset({grant})))
    assert wasi_errno(plugin) == errno
    assert (data / 'new.txt').exists() is created


def table_grow(plugin: WasmPlugin) -> tuple[int, int]:
    """(refused grows, final table size) as table_grow.wat answers them."""
    response = plugin.handle_event(text('grow'))
    assert response.ok, response.error
    refused, size = response.events[0].payload.split()
    return int(refused), int(size)


def test_table_growth_stops_at_the_store_limit_is_counted_and_the_host_keeps_serving():
    # issue 13, fault 6: table.grow in a loop took the host from 64 MB to 2.5 GB while only
    # linear memory was limited. The module asks for 64 x 65536 elements (32 MB unbounded).
    audit: list[dict] = []
    plugin = started('table_grow.wat', PluginContext(plugin='hog', audit_sink=audit.append),
                     table_elements_limit=100_000)
    refused, size = table_grow(plugin)
    assert (refused, size) == (63, 65537)  # the first grow fits, every later one is refused
    health = plugin.health()
    assert health.state is HealthState.DEGRADED and 'table' in health.message
    assert health.details['limit_hits'] == '1' and health.details['table_elements_limit'] == \
        '100000'
    assert audit[-1]['kind'] == 'wasm_limit'
    assert table_grow(plugin) == (63, 65537)  # a fresh instance: the old table was dropped
    assert plugin.health().details['limit_hits'] == '2'
    upper = started('upper.wat', metadata=None)
    assert upper.handle_event(text('still serving')).events[0].payload == b'STILL SERVING'


@pytest.mark.parametrize('declares', ['(table 200000 funcref) (memory (export "memory") 1)',
                                      '(table 1 funcref) (table 1 funcref) '
                                      '(memory (export "memory") 1)',
                                      '(memory (export "memory") 1000)'])
def test_a_module_declaring_more_than_the_store_limits_does_not_instantiate(tmp_path, declares):
    path = tmp_path / 'big.wat'
    path.write_text(f'(module {declares}'
                    ' (func (export "alloc") (param i32) (result i32) i32.const 8)'
                    ' (func (export "handle") (param i32 i32) (result i64) i64.const 1))')
    plugin = WasmPlugin(path, META, max_tables=1, table_elements_limit=100_000)
    with pytest.raises(PluginError, match='cannot instantiate'):
        plugin.init(PluginContext(plugin='wasm_example'))
