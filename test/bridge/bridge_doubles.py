"""What in-process Bridge tests share: a clock the test steps, a transport that takes every put,
and a robot.move event. No ROS, no Zenoh."""
from __future__ import annotations

from loom_ros.bus.event import Event


class Clock:
    """Seconds (what Bridge's clock reads) and ms (its wall_ms), stepped by setting `s`."""

    def __init__(self):
        self.s = 1000.0

    def __call__(self):
        return self.s

    def ms(self):
        return int(self.s * 1000)


class Recorder:
    """A connected transport that keeps what was put."""

    connected = True

    def __init__(self):
        self.puts = []

    def ready(self, key, level):
        return True

    def put(self, key, data, level):
        self.puts.append((key, data))


def move(x=0.2):
    return Event.with_json('robot.move', {'linear': {'x': x}}, metadata={'privacy': 'public'})
