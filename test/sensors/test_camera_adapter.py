"""The camera path of the launch topology, across three real processes over DDS: a camera driver
publishing sensor_msgs/Image 640x480 rgb8 -> the camera_adapter node (its own entry point) ->
a Loom subscriber of `camera.front`. Every frame arrives, intact, with the metadata
perception.image reads (issue 15, fault 7: about half were lost between processes).

Each process gets what bring-up adds (`fastdds_environment`: config/fastdds.xml). The test paces
the camera by counts: a window of frames, then a wait until the subscriber has every frame so
far, so nothing depends on this machine's speed; a lost frame fails at the generous bound (or
at once, when the bus counts the gap). This file run as a script is the camera or the subscriber.
"""
from __future__ import annotations

import os
import select
import sys
import time
from pathlib import Path

import pytest

IMAGE_TOPIC = 'camera/front/image_raw'   # the adapter's default image_topic (config/loom.yaml)
LOOM_TOPIC = 'camera.front'
WIDTH, HEIGHT = 640, 480
FRAMES = 45
WINDOW = 3        # frames in flight: under both hops' Realtime depth (10)
PROBE = 'probe'   # frame_id of frames sent until one gets through (discovery settling)
ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 60.0


def pixels(index: int) -> bytes:
    """Frame content that depends on its index, so a mixed-up or torn frame is caught."""
    row = bytes((i * 5 + index * 3) % 256 for i in range(WIDTH * 3))
    return row * HEIGHT


# -- peer processes -------------------------------------------------------------------------------
def _camera() -> None:
    """A camera driver: raw rclpy, Realtime QoS like sim_sensors, frames on command."""
    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from loom_ros.bus.qos import QosLevel, to_qos_profile
    rclpy.init()
    node = Node('test_camera')
    pub = node.create_publisher(Image, IMAGE_TOPIC, to_qos_profile(QosLevel.REALTIME))
    deadline = time.monotonic() + BOUND_S
    while pub.get_subscription_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    print('ready', flush=True)
    sent = 0
    for line in sys.stdin:
        command, _, arg = line.strip().partition(' ')
        if command == 'exit':
            break
        indices = [None] if command == 'probe' else range(sent, sent + int(arg))
        for index in indices:
            msg = Image(width=WIDTH, height=HEIGHT, encoding='rgb8', step=WIDTH * 3,
                        data=pixels(0 if index is None else index))
            msg.header.frame_id = PROBE if index is None else f'cam_{index}'
            msg.header.stamp = node.get_clock().now().to_msg()
            pub.publish(msg)
        if command == 'send':
            sent += int(arg)
    node.destroy_node()
    rclpy.try_shutdown()


def _subscriber() -> None:
    """A Loom node with the product's bus settings, checking every camera.front event."""
    import rclpy
    from rclpy.node import Node

    from loom_ros.bus.bus import create_bus
    from loom_ros.bus.executor import make_executor
    rclpy.init()
    node = Node('test_frame_sink')
    bus = create_bus(node, 'camera_adapter')
    executor = make_executor()
    executor.add_node(node)
    got: set[int] = set()
    state = {'bad': 0, 'probe': 0}

    def on_frame(event, _topic):
        meta = event.metadata
        if event.frame_id == PROBE:
            state['probe'] = 1
        else:
            state['probe'] = 0
            index = int(event.frame_id.removeprefix('cam_'))
            ok = (meta.get('width'), meta.get('height'), meta.get('encoding'),
                  meta.get('step')) == (str(WIDTH), str(HEIGHT), 'rgb8', str(WIDTH * 3))
            if not ok or bytes(event.payload) != pixels(index) or event.privacy != 1:
                state['bad'] += 1
            got.add(index)
        lost = sum(s.counters.lost for s in bus.stats.subscriptions)
        print(f'got {len(got)} probe {state["probe"]} bad {state["bad"]} lost {lost}',
              flush=True)
    bus.subscribe(LOOM_TOPIC, on_frame)
    print('ready', flush=True)
    while rclpy.ok():
        executor.spin_once(timeout_sec=0.1)
        if select.select([sys.stdin], [], [], 0)[0] and \
                sys.stdin.readline().strip() in ('', 'exit'):
            break
    bus.destroy()
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()


# -- the test -------------------------------------------------------------------------------------
def _fields(line: str) -> dict[str, int]:
    parts = line.split()
    return {parts[i]: int(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}


def test_camera_frames_reach_a_loom_subscriber_in_another_process_without_loss():
    from loom_ros.bus.qos import FASTDDS_USER_VARS, fastdds_environment
    env = {k: v for k, v in os.environ.items() if k not in FASTDDS_USER_VARS}
    env.update(fastdds_environment(env, ROOT / 'config'))
    from harness import LinePeer   # not at the top: this file also runs as a child script
    sink = LinePeer('subscriber', [__file__, 'sub'], env)
    adapter = LinePeer('camera_adapter', ['-m', 'loom_ros.sensors.camera_adapter_node'], env,
                       terminate_on_close=True)
    camera = LinePeer('camera', [__file__, 'camera'], env)
    procs = (camera, adapter, sink)
    try:
        sink.wait_line(lambda line: line == 'ready', 'subscriber ready')
        camera.wait_line(lambda line: line == 'ready', 'camera matched by the adapter')
        # Both hops have matched once a probe frame went all the way (re-sent until then).
        deadline = time.monotonic() + BOUND_S
        while True:
            camera.tell('probe')
            line = sink.poll_line(0.5)
            if line and _fields(line).get('probe') == 1:
                break
            if adapter.popen.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f'no probe frame went camera -> adapter -> subscriber: '
                            f'{adapter.close()[-3000:]}')
        sent = 0
        while sent < FRAMES:
            count = min(WINDOW, FRAMES - sent)
            camera.tell(f'send {count}')
            sent += count
            line = sink.wait_line(lambda l, n=sent: _fields(l).get('got', -1) >= n
                                  or _fields(l).get('lost', 0) > 0,
                                  f'{sent} of {FRAMES} frames (a frame was lost)')
            assert _fields(line)['lost'] == 0, f'frames lost after {sent} sent: {line}'
        assert _fields(line) == {'got': FRAMES, 'probe': 0, 'bad': 0, 'lost': 0}, line
    finally:
        errors = ''.join(p.close() for p in procs)
    assert 'XMLParser' not in errors and 'XMLProfileManager' not in errors, errors[-3000:]
    assert 'builtin transports' not in errors, errors[-3000:]   # the adapter saw the profile


if __name__ == '__main__':
    _camera() if sys.argv[1] == 'camera' else _subscriber()
