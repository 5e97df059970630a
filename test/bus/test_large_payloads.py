"""Camera frames (640x480 rgb8, Realtime QoS) cross processes over real DDS without loss, with
the Fast DDS profile Loom ships (config/fastdds.xml, applied by `fastdds_environment`).

Two real processes: this file run as a script is the publisher or the subscriber. The test paces
the publisher by counts, not by time: it sends a window of frames (fewer than the Realtime
history depth), waits until the subscriber has every frame sent so far, then sends the next. A
lost frame stalls the count and fails at the generous bound; nothing depends on how fast this
machine is. With Fast DDS's builtin 512 KB shared-memory segment this loses frames
(bench/results/camera.md), so the test fails without the profile.
"""
from __future__ import annotations

import hashlib
import os
import select
import sys
import time
from pathlib import Path

import pytest

TOPIC = 'camera.front'
WIDTH, HEIGHT = 640, 480
FRAMES = 60
WINDOW = 5           # frames in flight at once: under the Realtime depth (10)
PROBE = -1           # index of the frames sent until the subscriber sees one (matching race)
ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 60.0       # generous upper bound on any wait; reaching it is a failure


def frame(index: int) -> bytes:
    """A full-size frame whose bytes depend on its index, so a mixed-up frame is caught."""
    row = bytes((i * 7 + index) % 256 for i in range(WIDTH * 3))
    return index.to_bytes(8, 'little', signed=True) + (row * HEIGHT)[8:]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# -- the two peer processes ---------------------------------------------------------------------
def _bus(node):
    from loom_ros.bus.bus import create_bus
    return create_bus(node, 'camera_adapter')   # the product's bus settings: camera.** realtime


def _peer(role: str) -> None:
    import rclpy
    from rclpy.node import Node

    from loom_ros.bus.event import Event, Privacy
    from loom_ros.bus.executor import make_executor
    rclpy.init()
    node = Node(f'large_payload_{role}')
    bus = _bus(node)
    executor = make_executor()
    executor.add_node(node)
    say = lambda text: print(text, flush=True)   # noqa: E731
    if role == 'pub':
        publisher = bus.publisher_for(TOPIC)
        deadline = time.monotonic() + BOUND_S
        while publisher.get_subscription_count() < 1 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        say('ready')
        sent = 0
        for line in sys.stdin:
            command, _, arg = line.strip().partition(' ')
            count = int(arg or 0)
            if command == 'exit':
                break
            indices = [PROBE] if command == 'probe' else range(sent, sent + count)
            for index in indices:
                bus.publish(TOPIC, Event(type=TOPIC, payload=frame(index), source='test',
                                         metadata={'width': str(WIDTH), 'height': str(HEIGHT),
                                                   'encoding': 'rgb8', 'index': str(index)},
                                         privacy=Privacy.SENSITIVE))
            if command == 'send':
                sent += count
            say(f'sent {sent}')
    else:
        got: set[int] = set()
        state = {'bad': 0}

        def on_frame(event, _topic):
            index = int(event.metadata['index'])
            if len(event.payload) != WIDTH * HEIGHT * 3 or bytes(event.payload) != frame(index):
                state['bad'] += 1
            if index != PROBE:
                got.add(index)
            lost = sum(s.counters.lost for s in bus.stats.subscriptions)
            say(f'got {len(got)} probe {int(index == PROBE)} bad {state["bad"]} lost {lost}')
        bus.subscribe(TOPIC, on_frame)
        say('ready')
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
            if select.select([sys.stdin], [], [], 0)[0] and \
                    sys.stdin.readline().strip() in ('', 'exit'):
                break   # told to stop, or the test closed our stdin
    bus.destroy()
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()


# -- the test -----------------------------------------------------------------------------------
def _fields(line: str) -> dict[str, int]:
    parts = line.split()
    return {parts[i]: int(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}


def peer_env() -> dict:
    """This test's environment plus what bring-up adds for every Loom process."""
    from loom_ros.bus.qos import FASTDDS_USER_VARS, fastdds_environment
    env = {k: v for k, v in os.environ.items() if k not in FASTDDS_USER_VARS}
    env.update(fastdds_environment(env, ROOT / 'config'))
    return env


def test_camera_frames_cross_processes_without_loss():
    env = peer_env()
    from harness import LinePeer   # not at the top: this file also runs as a child script
    sub, pub = (LinePeer(role, [__file__, role], env) for role in ('sub', 'pub'))
    try:
        sub.wait_line(lambda l: l == 'ready', 'subscriber ready')
        pub.wait_line(lambda l: l == 'ready', 'publisher ready')
        # Matching is settled when one probe frame got through (re-sent until then).
        deadline = time.monotonic() + BOUND_S
        while True:
            pub.tell('probe')
            line = sub.poll_line(0.5)
            if line and _fields(line).get('probe') == 1:
                break
            if time.monotonic() > deadline:
                pytest.fail(f'no probe frame reached the subscriber in {BOUND_S:.0f} s')
        sent = 0
        while sent < FRAMES:
            count = min(WINDOW, FRAMES - sent)
            pub.tell(f'send {count}')
            sent += count
            line = sub.wait_line(lambda l, n=sent: _fields(l).get('got', -1) >= n
                                 or _fields(l).get('lost', 0) > 0,
                                 f'{sent} of {FRAMES} frames (a frame was lost)')
            assert _fields(line).get('lost') == 0, f'frames lost after {sent} sent: {line}'
        stats = _fields(line)
        assert stats == {'got': FRAMES, 'probe': 0, 'bad': 0, 'lost': 0}, line
    finally:
        errors = pub.close() + sub.close()
    # Fast DDS falls back to its builtin transports when it cannot read a profile, and says so
    # only on stderr: the profile must load cleanly.
    assert 'XMLParser' not in errors and 'XMLProfileManager' not in errors, errors[-3000:]


if __name__ == '__main__':
    _peer(sys.argv[1])
