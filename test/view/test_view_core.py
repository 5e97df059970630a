"""The view's pure core on real Loom messages: what it logs is read back from the .rrd file with
Rerun's own reader (entity paths, image shape, boxes, scalars, texts), and hostile inputs are
counted and skipped while the view goes on."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rrd import read_rrd, values
from loom_ros.bus.event import Event, Privacy
from loom_ros.view import core
from loom_ros.view.core import LoomView, ViewLimits

T0 = 1_700_000_000.0


def _frame_event(rgb: np.ndarray, encoding: str = 'rgb8') -> Event:
    """A camera frame exactly as the camera adapter makes it from a sensor_msgs/Image."""
    from loom_ros.plugins.perception.image import image_to_msg
    from loom_ros.sensors.camera_adapter_node import frame_to_event
    return frame_to_event(image_to_msg(rgb, encoding, 'camera_front_optical'), 'camera.front')


@pytest.fixture
def scene():
    from loom_ros.sensors.scenes import make_scene
    return make_scene('astronaut')


def _stream(path):
    import rerun as rr
    rec = rr.RecordingStream('loom_test')
    rec.save(str(path))
    return rec


def _close(rec):
    rec.flush()
    rec.disconnect()


def _ui_state(**fields) -> str:
    """loom/ui/state as the ui plugin publishes it (UiState.apply + encode)."""
    from loom_ros.plugins.actuators.ui import UiState
    state = UiState()
    return UiState.encode(state.apply(fields, source='agent/face', now_ms=int(T0 * 1000))).decode()


def _bus_stats(node: str, depth: int, dropped: int, lost: int):
    from loom_msgs.msg import BusStats, SubscriptionStats
    return BusStats(node=node, subscriptions=[SubscriptionStats(
        pattern='camera.front', topics=['camera.front'], queue_depth=depth,
        dropped_oldest=dropped, overflow=0, lost=lost)])


def _metrics(node: str, p50: float, p99: float):
    from loom_msgs.msg import KeyValue, MetricSample, Metrics
    return Metrics(node=node, period_s=1.0, samples=[MetricSample(
        name='handle_latency_ms', kind=MetricSample.HISTOGRAM, count=10, p50=p50, p99=p99,
        max=p99, labels=[KeyValue(key='topic', value='camera.front')])])


def test_real_messages_become_the_entities_a_person_sees(tmp_path, scene):
    from loom_msgs.msg import RouteDecision
    rec = _stream(tmp_path / 'view.rrd')
    firsts = []
    view = LoomView(rec, ViewLimits(max_image_hz=0), on_first=firsts.append)
    frame = _frame_event(scene)
    frame.timestamp_ms = int(T0 * 1000) - 30   # the camera's stamp, 30 ms before the view got it
    view.on_event(frame, 'camera.front', T0)
    boxes = [[180.0, 40.0, 300.0, 190.0], [10.0, 10.0, 60.0, 70.0]]
    view.on_ui_state(_ui_state(emoji='😀', label='happy', confidence=0.93, faces=2, boxes=boxes,
                               frame_ms=frame.timestamp_ms, route='local'), T0 + 0.05)
    view.on_ui_state(_ui_state(text='heard: what is the weather in Paris'), T0 + 0.06)
    for i, route in enumerate(('local', 'local', 'hybrid')):
        view.on_route_decision(RouteDecision(
            agent_id='face', event_type='face.detected', route=route, rule='confident_local',
            reason=f'confidence 0.93 >= 0.6 (#{i})'), T0 + 0.1 + i)
    view.on_event(Event.with_json('speech.utterance', {'text': 'what is the weather in Paris',
                                                       'partial': False}),
                  'mic.primary.speech', T0 + 1)
    view.on_event(Event.with_json('answer.spoken', {'text': 'Sunny, 21 degrees in Paris'}),
                  'agent.voice.intent', T0 + 2)
    view.on_bus_stats(_bus_stats('/agent_face', depth=0, dropped=0, lost=0), T0 + 1.5)  # not drawn
    view.on_bus_stats(_bus_stats('/agent_face', depth=3, dropped=4, lost=0), T0 + 2)
    view.on_bus_stats(_bus_stats('/agent_face', depth=0, dropped=4, lost=2), T0 + 3)
    view.on_metrics(_metrics('/agent_face', 12.5, 40.0), T0 + 2)
    _close(rec)
    assert not view.skipped, view.skipped
    assert firsts == ['image', 'screen', 'faces', 'latency', 'route', 'speech', 'bus']

    rows = read_rrd(tmp_path / 'view.rrd')
    fmt, = values(rows, core.IMAGE, 'Image:format')
    assert (fmt[0]['width'], fmt[0]['height']) == (512, 512)
    buffer, = values(rows, core.IMAGE, 'Image:buffer')
    assert np.array_equal(np.asarray(buffer[0], dtype=np.uint8), scene.reshape(-1))
    half, = values(rows, core.FACES, 'Boxes2D:half_sizes')
    assert half == [[60.0, 75.0], [25.0, 30.0]]
    assert values(rows, core.FACES, 'Boxes2D:labels') == [['😀 happy 0.93', '']]
    screens = [t[0] for t in values(rows, core.SCREEN, 'TextDocument:text')]
    assert screens[0].startswith('# 😀 happy') and 'heard: what is the weather' in screens[1]
    latency, = values(rows, core.CAMERA_TO_EMOJI, 'Scalars:scalars')
    assert latency[0] == pytest.approx(80.0, abs=0.01)
    assert values(rows, 'routes/local', 'Scalars:scalars') == [[1.0], [2.0]]
    assert values(rows, 'routes/hybrid', 'Scalars:scalars') == [[1.0]]
    routes = [t[0] for t in values(rows, core.ROUTE_LOG, 'TextLog:text')]
    assert routes[2] == 'face face.detected -> hybrid (confident_local: confidence 0.93 >= 0.6 (#2))'
    speech = [t[0] for t in values(rows, core.SPEECH_LOG, 'TextLog:text')]
    assert speech == ['transcript: what is the weather in Paris',
                      'answer: Sunny, 21 degrees in Paris']
    # Each bus series from the first time it is not 0 (then 0 again is drawn).
    assert values(rows, 'queues/agent_face/camera.front', 'Scalars:scalars') == [[3.0], [0.0]]
    assert values(rows, 'drops/agent_face/camera.front/dropped', 'Scalars:scalars') == [[4.0],
                                                                                         [4.0]]
    assert values(rows, 'drops/agent_face/camera.front/lost', 'Scalars:scalars') == [[2.0]]
    assert values(rows, 'latency/camera.front/agent_face/p99', 'Scalars:scalars') == [[40.0]]


def test_hostile_inputs_are_counted_and_skipped_and_the_view_goes_on(tmp_path, scene):
    from loom_msgs.msg import RouteDecision
    rec = _stream(tmp_path / 'view.rrd')
    view = LoomView(rec, ViewLimits(max_image_hz=0, max_boxes=4, max_series=12))
    good = _frame_event(scene)
    oversize = _frame_event(scene)
    oversize.metadata.update(width='5000', height='5000', step='15000')
    short = _frame_event(scene)
    short.payload = short.payload[:1000]                      # wrong shape for 512x512
    huge_number = _frame_event(scene)
    huge_number.metadata['width'] = '9' * 400                 # not parsed at all
    odd = _frame_event(scene)
    odd.metadata['encoding'] = 'yuv422'
    for bad in (oversize, short, huge_number, odd):
        view.on_event(bad, 'camera.front', T0)
    view.on_ui_state('x' * (1 << 20), T0)                     # 1 MB of text
    view.on_ui_state('{"emoji": "😀", "boxes": [[1, 2, ', T0)  # not JSON
    view.on_ui_state(json.dumps({'emoji': '😀', 'label': 'happy', 'boxes': [
        [0, 0, 10, 10], [5, 5, 1, 1], [0, 0, float('nan'), 4], 'box', [1, 2, 3],
        [0, 0, 1e9, 1e9]] + [[0, 0, 2, 2]] * 10}), T0)
    view.on_ui_state(json.dumps({'text': 'y' * 10_000}), T0)   # cut, still shown
    view.on_bus_stats(_bus_stats('/n', depth=1, dropped=1, lost=0), float('nan'))
    view.on_metrics(_metrics('/n', math.nan, math.inf), T0)
    view.on_route_decision(object(), T0)
    for i in range(20):                                        # one route name per decision
        view.on_route_decision(RouteDecision(route=f'r{i}', reason='x'), T0)
    private = _frame_event(scene)
    private.privacy = Privacy.PRIVATE
    stated = _frame_event(scene)
    stated.metadata['privacy'] = 'local_only'                 # metadata may only raise it
    view.on_event(private, 'camera.front', T0)
    view.on_event(stated, 'camera.front', T0)
    view.on_event(good, 'camera.front', T0 + 1)               # the view still works
    _close(rec)

    s = view.skipped
    assert s[core.IMAGE_TOO_LARGE] == 1 and s[core.BAD_IMAGE] == 3, s
    assert s[core.TOO_LONG] == 1 and s[core.BAD_JSON] == 1, s
    assert s[core.BAD_BOX] == 3 and s[core.TOO_MANY_BOXES] == 1, s   # 16 boxes cut to 4
    assert s[core.CUT] == 1 and s[core.NOT_FINITE] == 2, s
    assert s[core.BAD_MESSAGE] == 2 and s[core.TOO_MANY_SERIES] == 20 - 12 + 2, s
    assert s[core.WITHHELD] == 2, s
    assert view.shown['image'] == 1
    rows = read_rrd(tmp_path / 'view.rrd')
    assert len(values(rows, core.IMAGE, 'Image:buffer')) == 1
    half, = values(rows, core.FACES, 'Boxes2D:half_sizes')
    assert half == [[5.0, 5.0]]                               # the one good box of the first 4
    text, = [t[0] for t in values(rows, core.SCREEN, 'TextDocument:text') if 'yyy' in t[0]]
    assert len(text) < 600


def test_frames_are_shown_at_most_max_image_hz_and_privacy_config_hides_them(tmp_path, scene):
    rec = _stream(tmp_path / 'view.rrd')
    view = LoomView(rec, ViewLimits(max_image_hz=5))
    for i in range(20):   # 10 frames a second for 2 s
        view.on_event(_frame_event(scene), 'camera.front', T0 + i * 0.1)
    assert view.shown['image'] == 10 and view.skipped[core.RATE_LIMITED] == 10
    public_only = LoomView(rec, ViewLimits(max_image_hz=0), max_privacy=Privacy.PUBLIC)
    public_only.on_event(_frame_event(scene), 'camera.front', T0 + 5)
    public_only.on_ui_state(_ui_state(emoji='😐', label='neutral'), T0 + 5)
    _close(rec)
    assert public_only.skipped[core.WITHHELD] == 1 and not public_only.shown['image']
    assert public_only.shown['screen'] == 1   # what the robot's own screen shows
    assert len(values(read_rrd(tmp_path / 'view.rrd'), core.IMAGE, 'Image:buffer')) == 10


def test_bgr_and_mono_frames_keep_their_pixels(tmp_path, scene):
    rec = _stream(tmp_path / 'view.rrd')
    view = LoomView(rec, ViewLimits(max_image_hz=0))
    view.on_event(_frame_event(scene, 'bgr8'), 'camera.front', T0)
    _close(rec)
    rows = read_rrd(tmp_path / 'view.rrd')
    fmt, = values(rows, core.IMAGE, 'Image:format')
    buffer, = values(rows, core.IMAGE, 'Image:buffer')
    assert np.array_equal(np.asarray(buffer[0], dtype=np.uint8), scene[:, :, ::-1].reshape(-1))
    assert fmt[0]['color_model'] is not None


def test_a_latency_sample_needs_a_frame_stamp_as_the_ui_plugin_writes_it(tmp_path):
    """loom/ui/state is anyone's to publish on: the view reads `frame_ms` as the demo does (the
    ui plugin's frame_stamp_ms), so "12", true, a fraction or a number past what a float holds
    exactly make no latency sample; a whole stamp does."""
    rec = _stream(tmp_path / 'view.rrd')
    view = LoomView(rec, ViewLimits(max_image_hz=0))
    stamp = int(T0 * 1000) - 40
    for bad in (str(stamp), True, stamp + 0.5, 2 ** 53, -stamp, 0):
        view.on_ui_state(json.dumps({'emoji': '😀', 'label': 'happy', 'frame_ms': bad}), T0)
    view.on_ui_state(json.dumps({'emoji': '😀', 'label': 'happy', 'frame_ms': stamp}), T0)
    _close(rec)
    latency, = values(read_rrd(tmp_path / 'view.rrd'), core.CAMERA_TO_EMOJI, 'Scalars:scalars')
    assert latency == [pytest.approx(40.0, abs=0.01)]
