"""Benchmark of the Flow 1 perception path on a 640x480 frame: PNG decode, face detection
(letterbox + BlazeFace + anchor decoding + NMS), expression (crop + fer model), and the whole
face_expression plugin call, against the raw ai_edge_litert Interpreter.invoke() of the same
models measured in the same run (interleaved, so both see the same machine load).

    python bench/perception_bench.py            # 500 frames per stage
    python bench/perception_bench.py --quick    # 100 frames

Writes bench/results/perception.json and bench/results/perception.md (machine described).
The frame is skimage's astronaut photo scaled to 640x480 (one face, happy). One thread per
model, as the plugins default to.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TARGET_P50_MS = 10.0  # the bar for detection + expression on a 640x480 frame


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1))))]


def summarize(ms: list[float]) -> dict:
    return {'n': len(ms), 'p50_ms': round(percentile(ms, 50), 3),
            'p99_ms': round(percentile(ms, 99), 3), 'max_ms': round(max(ms), 3)}


def machine() -> dict:
    """bus_bench's machine record, plus the versions this benchmark depends on."""
    from importlib.metadata import version

    from bus_bench import machine as base
    return {**base(), 'ai_edge_litert': version('ai-edge-litert'), 'numpy': version('numpy'),
            'pillow': version('pillow'), 'loadavg_1m_start': round(os.getloadavg()[0], 2)}


def run(frames: int) -> dict:
    import skimage.data
    from ai_edge_litert.interpreter import Interpreter
    from PIL import Image

    from loom_ros.plugins.contract import PluginContext
    from loom_ros.plugins.perception.expression import ExpressionClassifier
    from loom_ros.plugins.perception.expression import default_model_path as expression_model
    from loom_ros.plugins.perception.face import FaceDetector
    from loom_ros.plugins.perception.face import default_model_path as face_model
    from loom_ros.plugins.perception.image import decode_image, frame_event
    from loom_ros.plugins.perception.plugins import FaceExpressionPlugin

    frame = np.asarray(Image.fromarray(skimage.data.astronaut()).resize(
        (640, 480), Image.Resampling.BILINEAR))
    png = io.BytesIO()
    Image.fromarray(frame).save(png, format='PNG')
    png = png.getvalue()
    jpeg = io.BytesIO()
    Image.fromarray(frame).save(jpeg, format='JPEG', quality=90)
    jpeg = jpeg.getvalue()

    detector, classifier = FaceDetector(), ExpressionClassifier()
    plugin = FaceExpressionPlugin()
    plugin.init(PluginContext('face_expression', granted=frozenset({'camera.read'})))
    raw_event, png_event = frame_event(frame), frame_event(frame, png=True)

    raw = {}
    for name, path in (('face', face_model()), ('expression', expression_model())):
        interpreter = Interpreter(model_path=str(path), num_threads=1)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(detail['index'], np.zeros(detail['shape'], np.float32))
        raw[name] = interpreter

    stages = {k: [] for k in ('decode_png', 'decode_jpeg', 'detect', 'expression', 'total_png',
                              'total_raw', 'plugin_raw_frame', 'plugin_png_frame',
                              'baseline_face_invoke', 'baseline_expression_invoke',
                              'baseline_total_invoke')}
    faces_seen, labels = set(), set()
    clock = time.perf_counter
    for i in range(frames + 20):  # the first 20 are warm-up, not recorded
        t0 = clock()
        rgb = decode_image(png)
        t1 = clock()
        faces = detector.detect(rgb)
        t2 = clock()
        expressions = [classifier.classify_box(rgb, f.box) for f in faces]
        t3 = clock()
        raw['face'].invoke()
        t4 = clock()
        raw['expression'].invoke()
        t5 = clock()
        response = plugin.handle_event(raw_event)
        t6 = clock()
        plugin.handle_event(png_event)
        t7 = clock()
        decode_image(jpeg)
        t8 = clock()
        if i < 20:
            continue
        ms = 1e3
        stages['decode_png'].append((t1 - t0) * ms)
        stages['decode_jpeg'].append((t8 - t7) * ms)
        stages['detect'].append((t2 - t1) * ms)
        stages['expression'].append((t3 - t2) * ms)
        stages['total_png'].append((t3 - t0) * ms)
        stages['total_raw'].append((t3 - t1) * ms)
        stages['baseline_face_invoke'].append((t4 - t3) * ms)
        stages['baseline_expression_invoke'].append((t5 - t4) * ms)
        stages['baseline_total_invoke'].append((t5 - t3) * ms)
        stages['plugin_raw_frame'].append((t6 - t5) * ms)
        stages['plugin_png_frame'].append((t7 - t6) * ms)
        faces_seen.add(len(faces))
        labels.update(e.label for e in expressions)
        assert response.ok, response.error
    summary = {k: summarize(v) for k, v in stages.items()}
    p50 = {k: v['p50_ms'] for k, v in summary.items()}
    return {
        'frame': {'width': 640, 'height': 480, 'png_bytes': len(png), 'jpeg_bytes': len(jpeg),
                  'faces': sorted(faces_seen),
                  'labels': sorted(labels)},
        'stages': summary,
        'ratios_p50': {
            'detect / raw face invoke': round(p50['detect'] / p50['baseline_face_invoke'], 2),
            'expression / raw expression invoke':
                round(p50['expression'] / p50['baseline_expression_invoke'], 2),
            'detect+expression / raw invokes':
                round(p50['total_raw'] / p50['baseline_total_invoke'], 2),
        },
        'target_p50_ms': TARGET_P50_MS,
    }


def write_markdown(results: dict, path: Path) -> None:
    m = results['machine']
    s = results['stages']
    rows = [
        ('decode_png', 'PNG bytes -> RGB array (PIL)'),
        ('decode_jpeg', 'JPEG (quality 90) bytes -> RGB array (PIL)'),
        ('detect', 'letterbox + BlazeFace invoke + anchor decode + weighted NMS'),
        ('expression', 'square crop + grey + 64x64 + fer invoke, per frame'),
        ('total_raw', 'detect + expression (raw pixels in, the 10 ms bar)'),
        ('total_png', 'decode + detect + expression'),
        ('plugin_raw_frame', 'face_expression.handle_event, raw-pixel event -> result event'),
        ('plugin_png_frame', 'face_expression.handle_event, PNG event -> result event'),
        ('baseline_face_invoke', 'raw ai_edge_litert invoke(), face model'),
        ('baseline_expression_invoke', 'raw ai_edge_litert invoke(), expression model'),
        ('baseline_total_invoke', 'both raw invokes'),
    ]
    lines = ['# Perception benchmark (Flow 1: frame -> face -> expression)', '',
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}; "
             f"Python {m['python']}, ai-edge-litert {m['ai_edge_litert']}, numpy {m['numpy']}, "
             f"Pillow {m['pillow']}; {m['date']}; 1-minute load average at start "
             f"{m['loadavg_1m_start']}, at end {m['loadavg_1m_end']}.", '',
             f"Frame: 640x480 (skimage astronaut, {results['frame']['png_bytes']} bytes as PNG, "
             f"{results['frame']['jpeg_bytes']} as JPEG); "
             f"faces found per frame: {results['frame']['faces']}, labels: "
             f"{results['frame']['labels']}. One thread per model. Milliseconds. Baseline: the raw "
             'ai_edge_litert Interpreter.invoke() of the same models with a pre-set input, '
             'interleaved with the measured stages in the same run.', '',
             '| stage | what | P50 | P99 | max | n |', '| --- | --- | --- | --- | --- | --- |']
    for key, what in rows:
        v = s[key]
        lines.append(f"| {key} | {what} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} | {v['n']} |")
    lines += ['', 'Ratios of P50s (Loom / raw invoke): ' + '; '.join(
        f'{k}: {v}' for k, v in results['ratios_p50'].items()) + '.', '',
        f"Target: detection + expression P50 under {results['target_p50_ms']} ms: "
        f"{'met' if s['total_raw']['p50_ms'] < results['target_p50_ms'] else 'NOT met'} "
        f"({s['total_raw']['p50_ms']} ms).", '',
        'PNG decoding costs more than detection and expression together: cameras should send '
        'raw pixels (sensor_msgs/Image style, metadata width/height/encoding) or JPEG.', '']
    if max(m['loadavg_1m_start'], m['loadavg_1m_end']) > 0.5 * m['cores']:
        lines += ['Taken on a busy machine (load average above half the cores): P99 and max '
                  'include waits for other processes; the P50s are the numbers to compare.', '']
    path.write_text('\n'.join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='100 frames instead of 500')
    parser.add_argument('--frames', type=int, default=0)
    parser.add_argument('--out', default=str(HERE / 'results'))
    args = parser.parse_args()
    frames = args.frames or (100 if args.quick else 500)
    info = machine()
    results = run(frames)
    info['loadavg_1m_end'] = round(os.getloadavg()[0], 2)
    results = {'machine': info, **results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'perception.json').write_text(json.dumps(results, indent=1) + '\n')
    write_markdown(results, out / 'perception.md')
    for key, value in results['stages'].items():
        print(f"{key:<28} P50 {value['p50_ms']:>7} ms  P99 {value['p99_ms']:>7} ms  "
              f"max {value['max_ms']:>7} ms")
    print('ratios (P50):', results['ratios_p50'])


if __name__ == '__main__':
    main()
