"""Where the face flow's camera-to-emoji time goes: per-stage P50/P90/P99/max from the spans of
a trace file (`loom demo` writes one: demo_output/trace.jsonl), and the slowest frames with
their stages, so a tail can be named (CPU starvation shows as every stage slow at once; one
slow stage points at its process).

    python bench/face_flow_stages.py demo_output/trace.jsonl [--slowest 8] [--json]

Stages of one camera frame (one trace), from camera_adapter's PublishEvent span on camera.front:
adapter_publish  the adapter's publish of the frame event (serialization, DDS write)
to_agent         publish start -> the agent host's bus callback (transport, its executor)
mailbox          bus callback -> the FaceAgent span (mailbox, dispatcher worker wake-up)
inference        the LocalInference span (face_expression, in-process or a service call)
route            inference end -> the ui_update published (routing, the behavior's bookkeeping)
to_ui            ui_update published -> the ui plugin's HandleEvent span starts
ui               the ui plugin's HandleEvent span (audit, state, publish on loom/ui/state)
total            publish start -> ui end (the demo's camera-to-emoji adds the hop from the
                 simulated camera to the adapter before and loom/ui/state to its watcher after)
and, for frames the demo's watcher saw (its UiStateSeen span names the frame's stamp, which
the adapter's PublishEvent carries as loom.event.timestamp_ms):
capture          the frame's stamp (sim_sensors, right before it publishes the Image) -> the
                 adapter's publish (Image transport, the adapter's executor and conversion)
to_watcher       ui end -> the demo's watcher got loom/ui/state (below 0 when the watcher had it
                 before the ui span ended: the ui plugin writes its audit record after publishing)
camera_to_emoji  the frame's stamp -> the watcher (what the demo reports)
A trace missing one of these spans (an empty scene: no ui_update) is not counted. Bounded: a
span line over MAX_LINE_BYTES is skipped, as is anything that is not a span.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

MAX_LINE_BYTES = 65536
STAGES = ('adapter_publish', 'to_agent', 'mailbox', 'inference', 'route', 'to_ui', 'ui', 'total')
ENDS = ('capture', 'to_watcher', 'camera_to_emoji')   # where the watcher's span is in the file


def _key(span: dict) -> tuple[str, str, str]:
    service = str(span.get('service', ''))
    if service.startswith('agent'):   # agent_<id> or agent_host_<n>: the face agent's host
        service = 'agent'
    attributes = span.get('attributes') or {}
    return service, str(span.get('name', '')), str(attributes.get('loom.topic', ''))


def frames(lines) -> list[dict]:
    """Stage durations (ms) of every complete face-flow trace in `lines` (JSON span lines)."""
    traces: dict[str, dict] = defaultdict(dict)
    stamps: dict[str, int] = {}     # trace -> the camera frame's stamp (ms)
    seen: dict[int, int] = {}       # frame stamp (ms) -> when the watcher got its ui state (ns)
    for line in lines:
        if len(line) > MAX_LINE_BYTES:
            continue
        try:
            span = json.loads(line)
            trace, start, end = span['trace_id'], int(span['start_ns']), int(span['end_ns'])
            attributes = span.get('attributes') or {}
            if span.get('name') == 'UiStateSeen':
                seen.setdefault(int(attributes['loom.frame_ms']), start)
                continue
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        key = _key(span)
        traces[trace].setdefault(key, (start, end))
        if key == ('camera_adapter', 'PublishEvent', 'camera.front'):
            try:
                stamps.setdefault(trace, int(attributes['loom.event.timestamp_ms']))
            except (KeyError, TypeError, ValueError):
                pass
    out = []
    for trace, spans in traces.items():
        got = [spans.get(k) for k in (
            ('camera_adapter', 'PublishEvent', 'camera.front'),
            ('agent', 'HandleEvent', 'camera.front'), ('agent', 'FaceAgent', ''),
            ('agent', 'LocalInference', ''), ('agent', 'PublishEvent', 'agent.face.action'))]
        ui = spans.get(('plugin_host', 'HandleEvent', 'agent.face.action')) or \
            spans.get(('agent', 'HandleEvent', 'agent.face.action'))
        if None in got or ui is None:
            continue
        pub, recv, face, infer, action = got

        def ms(a: int, b: int) -> float:
            return (b - a) / 1e6
        out.append({'at_ns': pub[0], 'adapter_publish': ms(*pub), 'to_agent': ms(pub[0], recv[0]),
                    'mailbox': ms(recv[0], face[0]), 'inference': ms(*infer),
                    'route': ms(infer[1], action[0]), 'to_ui': ms(action[0], ui[0]),
                    'ui': ms(*ui), 'total': ms(pub[0], ui[1])})
        stamp = stamps.get(trace)
        watcher = seen.get(stamp) if stamp is not None else None
        if watcher is not None:
            out[-1].update(capture=ms(stamp * 1_000_000, pub[0]), to_watcher=ms(ui[1], watcher),
                           camera_to_emoji=ms(stamp * 1_000_000, watcher))
    return sorted(out, key=lambda f: f['at_ns'])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(rows: list[dict]) -> dict:
    """Each stage's P50/P90/P99/max over the frames that have it (ENDS: those the watcher
    saw; `frames` says how many)."""
    out = {}
    for stage in STAGES + ENDS:
        values = [r[stage] for r in rows if stage in r]
        if values:
            out[stage] = {'p50': round(percentile(values, 0.5), 2),
                          'p90': round(percentile(values, 0.9), 2),
                          'p99': round(percentile(values, 0.99), 2),
                          'max': round(max(values), 2), 'frames': len(values)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('trace', help='a trace.jsonl written by the file exporter')
    parser.add_argument('--slowest', type=int, default=8, help='frames to list (default 8)')
    parser.add_argument('--json', action='store_true', help='print the summary as JSON')
    args = parser.parse_args(argv)
    with open(args.trace, encoding='utf-8', errors='replace') as stream:
        rows = frames(stream)
    if not rows:
        print(f'{args.trace}: no complete face-flow trace', file=sys.stderr)
        return 1
    stats = summary(rows)
    if args.json:
        print(json.dumps({'frames': len(rows), 'stages_ms': stats}))
        return 0
    print(f'{len(rows)} frames with every span (ms)')
    for stage, s in stats.items():
        print(f'  {stage:16} p50 {s["p50"]:8.2f}  p90 {s["p90"]:8.2f}  p99 {s["p99"]:8.2f}  '
              f'max {s["max"]:8.2f}' + (f'  ({s["frames"]} frames)' if stage in ENDS else ''))
    start = rows[0]['at_ns']
    print('slowest frames (s after the first; stages in ms):')
    slowest = 'camera_to_emoji' if 'camera_to_emoji' in stats else 'total'
    for row in sorted(rows, key=lambda r: -r.get(slowest, 0.0))[:max(0, args.slowest)]:
        stages = ' '.join(f'{k} {row[k]:.1f}' for k in STAGES + ENDS if k in row)
        print(f'  {(row["at_ns"] - start) / 1e9:7.2f}  {stages}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
