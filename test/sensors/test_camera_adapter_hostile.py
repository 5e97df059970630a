"""Hostile input on the camera adapter's image topic (attack review, finding 5): any process on
the domain may publish there. A 1 kHz flood of 640x480 frames was republished whole (2,033
frames, 1.9 GB in 5 s: max_rate_hz shipped as 0, no limit), and frames perception cannot read
(step shorter than a row; width 4e9 with 1 byte) were published instead of refused.

Now the shipped max_rate_hz passes frames at most at that rate on average (a token bucket: a
burst of RATE_BURST_S seconds' worth, so a real camera's jitter costs nothing), and every frame
gets perception.image's checks before it becomes an event, counted `bad_frames` otherwise.
The node runs in this process with its clock frozen: counts, not timing."""
from __future__ import annotations

import pytest

from loom_ros.config.params import node_defaults


def _image(width=64, height=48, encoding='rgb8', step=None, size=None, frame_id='cam'):
    from sensor_msgs.msg import Image
    step = width * 3 if step is None else step
    msg = Image(width=width, height=height, encoding=encoding, step=step)
    msg.data = bytes(step * height if size is None else size)
    msg.header.frame_id = frame_id
    return msg


MALFORMED = {
    'step < row': lambda: _image(640, 480, step=1, size=480),
    'huge width, 1 byte': lambda: _image(4_000_000_000, 1, step=1, size=1),
    'huge width and step, 1 byte': lambda: _image(4_000_000_000, 1, step=4_000_000_000, size=1),
    'data short': lambda: _image(640, 480, size=1000),
    'zero size': lambda: _image(0, 0, step=0, size=0),
    'yuv422': lambda: _image(64, 48, 'yuv422', step=128),
}


@pytest.mark.parametrize('name', MALFORMED)
def test_frames_perception_cannot_read_are_not_events(name):
    from loom_ros.plugins.perception.image import ImageError
    from loom_ros.sensors.camera_adapter_node import frame_to_event
    with pytest.raises(ImageError):
        frame_to_event(MALFORMED[name](), 'camera.front')


def test_the_shipped_rate_limit():
    """On by default, above the simulated camera's rate (the demo and the face flow lose no
    frame), with a burst allowance over the 45 frames test_camera_adapter sends back to back."""
    from loom_ros.sensors.camera_adapter_node import RATE_BURST_S
    rate = node_defaults('camera_adapter')['max_rate_hz']
    assert rate > 0
    assert rate >= 2 * node_defaults('sim_sensors')['camera_rate_hz']
    assert rate * RATE_BURST_S >= 50


def test_rate_limit_is_a_token_bucket():
    from loom_ros.sensors.camera_adapter_node import FrameRateLimit
    now = [100.0]
    limit = FrameRateLimit(30.0, burst_s=2.0, clock=lambda: now[0])
    # A 1 kHz flood for 5 s: the burst, then 30 a second.
    passed = 0
    for i in range(5000):
        now[0] = 100.0 + i / 1000
        passed += limit.allow()
    assert passed in (209, 210)   # 60 + 30/s over the 4.999 s (float rounding either way)
    # A 30 Hz camera whose frames come in pairs (DDS bunching) loses none, once refilled.
    now[0] += 10.0
    times = [now[0] + k / 15 + d for k in range(60) for d in (0.0, 0.001)]
    assert sum(now.__setitem__(0, t) or limit.allow() for t in times) == len(times)
    # A clock that goes back mints nothing.
    drained = FrameRateLimit(1.0, burst_s=1.0, clock=lambda: now[0])
    assert drained.allow() and not drained.allow()
    now[0] -= 50.0
    assert not drained.allow()
    # 0: no limit.
    assert all(FrameRateLimit(0.0, clock=lambda: 0.0).allow() for _ in range(1000))


@pytest.fixture
def adapter(ros):
    from loom_ros.sensors.camera_adapter_node import CameraAdapterNode
    node = CameraAdapterNode(namespace='/hostile_cam')
    now = [1000.0]
    node.rate_limit.clock = lambda: now[0]
    sent = []
    publish = node.bus.publish

    def recorded(topic, event):
        publish(topic, event)   # the real bus: its checks (size, privacy) still apply
        sent.append(event)
    node.bus.publish = recorded
    yield node, now, sent
    node.bus.destroy()
    node.destroy_node()


def test_a_flood_is_cut_to_the_shipped_rate(adapter):
    from loom_ros.sensors.camera_adapter_node import RATE_BURST_S
    node, now, sent = adapter
    rate = node_defaults('camera_adapter')['max_rate_hz']
    burst = int(rate * RATE_BURST_S)
    for i in range(1000):          # all at one instant: nothing refills
        node._on_image(_image(frame_id=f'f{i}'))
    assert node.stats == {'frames': 1000, 'published': burst, 'rate_limited': 1000 - burst,
                          'bad_frames': 0}
    assert [e.frame_id for e in sent] == [f'f{i}' for i in range(burst)]
    now[0] += 1.0                  # one second later: one second's worth more
    for i in range(100):
        node._on_image(_image(frame_id=f'g{i}'))
    assert node.stats['published'] == burst + int(rate)
    assert sent[-1].metadata == {'width': '64', 'height': '48', 'encoding': 'rgb8',
                                 'step': '192'}


def test_malformed_frames_are_counted_not_published_and_spend_no_budget(adapter):
    node, now, sent = adapter
    for make in MALFORMED.values():
        node._on_image(make())
    node._on_image(_image(1280, 1100))   # 4.2 MB: refused by the bus, counted the same way
    assert node.stats == {'frames': len(MALFORMED) + 1, 'published': 0, 'rate_limited': 0,
                          'bad_frames': len(MALFORMED) + 1}
    assert sent == []
    # The budget is whole: the malformed frames took none of it (the oversize one was checked
    # by the bus after it passed the limit, so it took one).
    from loom_ros.sensors.camera_adapter_node import RATE_BURST_S
    burst = int(node_defaults('camera_adapter')['max_rate_hz'] * RATE_BURST_S)
    for i in range(burst):
        node._on_image(_image(frame_id=f'ok{i}'))
    assert node.stats['published'] == burst - 1 and node.stats['rate_limited'] == 1
