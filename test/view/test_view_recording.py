"""`loom view --recording` as a user runs it (a real process) on a recording written by the real
recorder (McapRecorder): the .rrd it saves holds the camera frames, the screen and the route
decisions; what the file spoils is counted, not drawn; bad arguments exit 2."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from harness import loom_cli
from rrd import read_rrd, values
from loom_ros.view import core

T0 = 1_700_000_000_000_000_000   # ns
STEP = 100_000_000               # 10 frames a second


def _recording(path, frames: int, garbage_decisions: int = 0):
    from rclpy.serialization import serialize_message
    from std_msgs.msg import String

    from loom_msgs.msg import RouteDecision
    from loom_ros.cli.record import McapRecorder
    from loom_ros.plugins.perception.image import image_to_msg
    from loom_ros.sensors.camera_adapter_node import frame_to_event
    from loom_ros.sensors.scenes import make_scene
    rgb = make_scene('astronaut')[::4, ::4].copy()   # 128x128: a small file
    recorder = McapRecorder(path)
    recorder.add_topic('/loom/camera/front', 'loom_msgs/msg/Event')
    recorder.add_topic('/loom/ui/state', 'std_msgs/msg/String')
    recorder.add_topic('/router/decisions', 'loom_msgs/msg/RouteDecision')
    for i in range(frames):
        event = frame_to_event(image_to_msg(rgb, 'rgb8', 'camera_front_optical'), 'camera.front')
        t = T0 + i * STEP
        recorder.write('/loom/camera/front', serialize_message(event.to_msg()), t)
        state = {'emoji': '😀', 'label': 'happy', 'boxes': [[40, 10, 80, 50]], 'seq': i}
        recorder.write('/loom/ui/state', serialize_message(String(data=json.dumps(state))), t + 1)
        recorder.write('/router/decisions', serialize_message(RouteDecision(
            agent_id='face', route='local', rule='confident_local', reason=f'frame {i}')), t + 2)
    for _ in range(garbage_decisions):
        recorder.write('/router/decisions', b'\x00\x01\x00\x00\xff\xff\xff\x7f', T0)
    recorder.close()
    return rgb


def test_a_recording_becomes_an_rrd_with_its_camera_frames(spawn, tmp_path):
    rgb = _recording(tmp_path / 'rec.mcap', frames=10, garbage_decisions=2)
    out = tmp_path / 'view.rrd'
    view = spawn(*loom_cli('view', '--recording', str(tmp_path / 'rec.mcap'), '--save',
                           str(out), '--headless'))
    code, stdout, stderr = view.finish()
    assert code == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    summary, loaded = lines[-1], lines[-2]
    assert loaded['decode_skipped'] == {'undecodable': 2} and not loaded['file_skipped'], loaded
    # 10 frames 100 ms apart at max_image_hz 5 (config/view.yaml): every other one is drawn.
    assert summary['shown']['image'] == 5 and summary['skipped'] == {'image_rate_limited': 5}
    assert summary['shown']['route'] == 10 and summary['saved'] == str(out)
    rows = read_rrd(out)
    blobs = values(rows, core.IMAGE, 'EncodedImage:blob')   # JPEG (config/view.yaml)
    assert len(blobs) == 5
    shown = np.asarray(Image.open(io.BytesIO(bytes(blobs[0][0]))).convert('RGB'))
    assert shown.shape == rgb.shape and np.abs(shown.astype(int) - rgb).mean() < 8
    assert len(values(rows, core.FACES, 'Boxes2D:half_sizes')) == 10
    assert len(values(rows, core.ROUTE_LOG, 'TextLog:text')) == 10


def test_a_cut_recording_shows_what_came_before_and_exits_1(spawn, tmp_path):
    _recording(tmp_path / 'rec.mcap', frames=6)
    data = (tmp_path / 'rec.mcap').read_bytes()
    (tmp_path / 'cut.mcap').write_bytes(data[:len(data) // 2])
    view = spawn(*loom_cli('view', '--recording', str(tmp_path / 'cut.mcap'), '--save',
                           str(tmp_path / 'cut.rrd'), '--headless'))
    code, stdout, stderr = view.finish()
    assert code == 1 and 'cut short' in stderr, (code, stderr)
    assert 'error' in json.loads(stdout.splitlines()[-2])


def test_bad_arguments_exit_2(tmp_path, capsys):
    from loom_ros.cli import main
    for args in (('--headless',), ('--max-privacy', 'secret', '--headless', '--save', 'x.rrd'),
                 ('--web-port', '70000')):
        assert main(['view', *args]) == 2, args
        assert 'loom view:' in capsys.readouterr().err
