"""Parts of `loom demo` without processes: what its watcher takes from a UI state
(`loom/ui/state` is anyone's to publish on: a face for a camera frame becomes one latency sample,
anything else none and no error), and the params file it gives the system (tracing only with
--trace: its cost would be in the latencies it reports)."""
import json

import pytest
import yaml

from loom_ros.cli.demo import (
    MAX_UI_STATE_CHARS, FaceLatency, _params, _percent, _ratio, face_line, ui_face,
)
from loom_ros.config.params import config_dir

STAMP = 1_796_192_738_123


def state(**fields) -> str:
    return json.dumps({'emoji': '😀', 'label': 'happy', 'frame_ms': STAMP, **fields})


def test_a_face_for_a_frame_is_a_sample():
    assert ui_face(state()) == ('😀 happy', STAMP)
    assert ui_face(state(frame_ms=float(STAMP))) == ('😀 happy', STAMP)
    assert ui_face(state(label='')) == ('😀 ', STAMP)


@pytest.mark.parametrize('data', [
    state(frame_ms='1796192738123'),          # a string
    state(frame_ms=True),                     # a bool is an int to Python
    state(frame_ms=None), state(frame_ms=0), state(frame_ms=-5),
    state(frame_ms=STAMP + 0.5),              # not a whole ms
    state(frame_ms=2 ** 53),                  # beyond what a float holds exactly
    state(frame_ms=1e308),
    state(frame_ms=[STAMP]), state(frame_ms={'ms': STAMP}),
    '{"emoji": "x", "label": "y", "frame_ms": NaN}',
    '{"emoji": "x", "label": "y", "frame_ms": Infinity}',
    '{"emoji": "x", "label": "y", "frame_ms": -Infinity}',
    state(emoji=''), state(emoji=None), state(emoji=['😀']), state(label=7),
    json.dumps({'emoji': '😀', 'label': 'happy'}),   # "no face" states carry no frame
    json.dumps([1, 2, 3]), '"a string"', '12', 'null', 'not json', '', '{',
    '[' * 30_000 + ']' * 30_000,              # nested past the parser's recursion limit
    state(pad='x' * MAX_UI_STATE_CHARS),      # over the bound: never parsed
])
def test_anything_else_is_no_sample_and_no_error(data):
    assert ui_face(data) is None


def test_not_a_string_is_no_sample():
    assert ui_face(b'{"emoji": "x", "frame_ms": 5}') is None
    assert ui_face(None) is None


def test_long_fields_are_cut_in_what_is_shown():
    shown, frame = ui_face(state(emoji='😀' * 100, label='h' * 1000))
    assert shown == '😀' * 16 + ' ' + 'h' * 64 and frame == STAMP


def test_latency_counts_from_bring_up_ready_and_keeps_the_start_up_apart():
    """Frames captured before bring-up was ready are reported apart (the rest of bring-up ran
    on the same cores), not dropped; the split is by the frame's own stamp, not by arrival."""
    lat = FaceLatency()
    lat.add(STAMP, STAMP + 900.0)            # before ready: a first route through the service
    lat.mark_ready(STAMP + 1000.0)
    lat.add(STAMP + 500, STAMP + 1010.0)     # captured before ready, arrived after it
    for i in range(99):
        lat.add(STAMP + 1000 + i, STAMP + 1000 + i + 20.0)
    lat.add(STAMP + 2000, STAMP + 2031.0)
    lat.mark_ready(STAMP + 5000.0)           # only the first ready counts
    lat.add(STAMP + 3000, STAMP + 3025.0)
    got = lat.snapshot()
    assert got['updates'] == 101 and got['p50'] == 20.0 and got['max'] == 31.0
    assert got['p99'] == 25.0   # the 100th of 101 sorted samples
    assert got['during_bringup'] == {'updates': 2, 'max': 900.0}
    kept = lat.snapshot(samples=True)   # what summary.json keeps, to pool runs
    samples = kept['samples_ms']
    assert len(samples) == 101 and samples[0] == 20.0 and samples[-2:] == [31.0, 25.0]
    times = kept['sample_frames_s']   # each sample's frame, seconds after ready
    assert len(times) == 101 and times[:2] == [0.0, 0.001] and times[-2:] == [1.0, 2.0]


def test_no_ready_yet_means_every_sample_is_start_up():
    lat = FaceLatency()
    lat.add(STAMP, STAMP + 12.0)
    assert lat.snapshot() == {'updates': 0, 'p50': None, 'p99': None, 'max': None,
                              'during_bringup': {'updates': 1, 'max': 12.0}}


def test_the_summary_line_says_which_updates_its_percentiles_count():
    """The printed P99 is over the updates since bring-up was ready, and the line says so
    whether or not any update came during bring-up (a run without any used to print bare
    percentiles, which read as every update)."""
    lat = FaceLatency()
    lat.mark_ready(STAMP)
    for i in range(10):
        lat.add(STAMP + i, STAMP + i + 15.0)
    face = {'updates': 10, 'emojis': {'x': 10}, 'camera_to_emoji_ms': lat.snapshot()}
    line = face_line(face)
    assert line.endswith('P99 15.0 ms, max 15.0 ms over the 10 since bring-up was ready')
    lat.add(STAMP - 100, STAMP + 40.0)   # a frame from before ready
    face['camera_to_emoji_ms'] = lat.snapshot()
    assert face_line(face).endswith(
        'over the 10 since bring-up was ready (1 during bring-up: max 140.0 ms)')


def test_a_ratio_says_100_percent_only_when_nothing_was_missed():
    """The camera line's ratios come from one report each (a part never exceeds its whole);
    one frame missed of thousands must not round up to 100%."""
    assert _ratio(319, 319) == 1.0 and _percent(_ratio(319, 319)) == '100%'
    assert _percent(_ratio(9999, 10000)) == '99.9%'
    assert _ratio(99999, 100000) == 0.9999 and _percent(_ratio(99999, 100000)) == '99.9%'
    assert _percent(_ratio(150, 300)) == '50.0%'
    assert _ratio(0, 0) is None
    # AgentStatus counters are uint64 from a topic anyone may publish on: at the limit, or a
    # part forged past its whole, a ratio still stays in [0, 1].
    top = 2 ** 64 - 1
    assert _ratio(top - 1, top) == 0.9999 and _ratio(top, top) == 1.0
    assert _ratio(top, 5) == 1.0 and _percent(_ratio(0, top)) == '0.0%'


def tracing_of(path) -> dict:
    data = yaml.safe_load(path.read_text())
    return data['/**']['ros__parameters'].get('telemetry', {}).get('tracing', {})


def test_the_demo_traces_only_when_asked(tmp_path):
    shipped = yaml.safe_load((config_dir() / 'loom.yaml').read_text())
    default = shipped['/**']['ros__parameters']['telemetry']['tracing']
    assert default['exporter'] == 'none'   # a robot runs untraced
    assert tracing_of(_params(str(config_dir() / 'loom.yaml'), tmp_path)) == default
    traced = tracing_of(_params(str(config_dir() / 'loom.yaml'), tmp_path, trace=True))
    assert traced == {**default, 'exporter': 'file', 'file': str(tmp_path / 'trace.jsonl')}
