"""Benchmark of plugin sandboxes: the cost of one HandleEvent call for the same upper-casing plugin
in-process (the baseline, measured in the same run), in a subprocess, and in wasmtime; plus what
starting, restarting and stopping a runaway plugin cost.

    python bench/sandbox_bench.py [--quick]     # writes bench/results/sandbox.md and sandbox.json

Plugins: loom_ros.plugins.sandbox.examples:UpperPlugin (in-process and subprocess) and
test/plugins/wasm/upper.wat (WASM), on `text.in` events with a 100-byte text payload.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bus_bench import machine, summarize  # noqa: E402  (same machine record and percentiles)

UPPER = 'loom_ros.plugins.sandbox.examples:UpperPlugin'
FAULTY = 'loom_ros.plugins.sandbox.examples:FaultyPlugin'
WASM_DIR = REPO / 'test' / 'plugins' / 'wasm'


def calls(plugin, n: int) -> dict:
    from loom_ros.bus.event import Event
    events = [Event(type='text.in', payload=(f'event {i:06d} ' + 'x' * 87).encode())
              for i in range(n)]
    for event in events[:min(100, n)]:  # warm-up
        plugin.handle_event(event)
    out = []
    for event in events:
        start = time.perf_counter_ns()
        response = plugin.handle_event(event)
        out.append((time.perf_counter_ns() - start) / 1000.0)
        if not response.ok:
            raise SystemExit(f'{plugin.metadata.name}: {response.error}')
    return summarize(out)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 4)


def run(n: int) -> dict:
    from loom_ros.bus.event import Event
    from loom_ros.plugins.contract import PluginContext
    from loom_ros.plugins.sandbox.examples import UpperPlugin
    from loom_ros.plugins.sandbox.subprocess import SubprocessPlugin
    from loom_ros.plugins.sandbox.wasm import WasmPlugin

    def ctx(name):
        return PluginContext(plugin=name)
    in_process = UpperPlugin()
    in_process.init(ctx('example_upper'))
    holder: dict = {}
    start_sub = seconds(lambda: holder.update(sub=SubprocessPlugin(UPPER, call_timeout_s=60)))
    sub = holder['sub']
    start_sub += seconds(lambda: sub.init(ctx('example_upper')))
    start_wasm = seconds(lambda: holder.update(wasm=WasmPlugin(WASM_DIR / 'upper.wat')))
    wasm = holder['wasm']
    start_wasm += seconds(lambda: wasm.init(ctx('wasm_upper')))
    results = {'n': n, 'payload_bytes': 100,
               'call': {'in_process': calls(in_process, n), 'subprocess': calls(sub, n),
                        'wasm': calls(wasm, n)},
               'start_s': {'subprocess': round(start_sub, 4), 'wasm': round(start_wasm, 4)}}
    sub.shutdown()

    faulty = SubprocessPlugin(FAULTY, call_timeout_s=60)
    faulty.init(ctx('example_faulty'))
    crash_s = seconds(lambda: faulty.handle_event(Event(type='fault.crash')))
    restart_s = seconds(lambda: faulty.handle_event(Event(type='text.in', payload=b'x')))
    faulty.shutdown()
    spin = WasmPlugin(WASM_DIR / 'spin.wat', {'name': 'spin', 'type': 'tool'}, max_restarts=100)
    spin.init(ctx('spin'))
    stop_s = seconds(lambda: spin.handle_event(Event(type='x')))
    restart_wasm_s = seconds(lambda: spin._instantiate())  # what the next call pays first
    results['recovery_s'] = {
        'subprocess_crash_detected': crash_s, 'subprocess_restart_and_call': restart_s,
        'wasm_runaway_stopped_default_fuel': stop_s, 'wasm_fresh_instance': restart_wasm_s,
        'wasm_default_fuel_per_call': spin.fuel_per_call}
    return results


def write_markdown(results: dict, path: Path) -> None:
    m = results['machine']
    base = results['call']['in_process']['p50_us']
    lines = ['# Plugin sandbox benchmark', '',
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}; "
             f"Python {m['python']}; {m['date']}.",
             '', f"One HandleEvent call of the same upper-casing plugin, {results['n']} calls, "
             f"{results['payload_bytes']}-byte text payload; baseline: the plugin in-process, "
             'measured in the same run. Ratio: P50 / baseline P50; latency in microseconds.',
             '', '| where | P50 / P99 / max | ratio |', '| --- | --- | --- |']
    for where, s in results['call'].items():
        lines.append(f"| {where} | {s['p50_us']} / {s['p99_us']} / {s['max_us']} | "
                     f"{s['p50_us'] / base:.1f} |")
    lines += ['', '| start (construct + init) | seconds |', '| --- | --- |']
    lines += [f'| {k} | {v} |' for k, v in results['start_s'].items()]
    lines += ['', '| recovery | seconds |', '| --- | --- |']
    lines += [f'| {k} | {v} |' for k, v in results['recovery_s'].items()]
    if results.get('note'):
        lines += ['', results['note']]
    path.write_text('\n'.join(lines) + '\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--out', default=str(HERE / 'results'))
    parser.add_argument('--note', default='', help='a line added to the table (e.g. load)')
    args = parser.parse_args()
    results = {'machine': machine(), **run(300 if args.quick else 5000), 'note': args.note}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'sandbox.json').write_text(json.dumps(results, indent=1))
    write_markdown(results, out / 'sandbox.md')
    print((out / 'sandbox.md').read_text())
    return 0


if __name__ == '__main__':
    sys.exit(main())
