"""Fixtures of the agents tests: a camera node whose bus uses the product's QoS table (as every
Loom process does), sending the astronaut photo and collecting what the face agent shows."""
from __future__ import annotations

import time

import numpy as np
import pytest
import skimage.data
from PIL import Image

FRAME_PERIOD_S = 0.2   # five frames a second until the agent answers


class CameraBus:
    """A node `name` in `ns` with an EventBus on the product's QoS table: `send_frame()` (the
    astronaut as a camera.front event, at most every FRAME_PERIOD_S: pass it as wait_for's
    spin), `shown` (the JSON of every agent.face.action event), `out` (the frame publisher)."""

    def __init__(self, ros, ns: str, name: str):
        from rclpy.node import Node

        from loom_ros.bus.bus import EventBus
        from loom_ros.bus.qos import TopicQosTable
        from loom_ros.config.params import node_defaults
        self.ros = ros
        self.node = Node(name, namespace=ns, context=ros.node.context)
        defaults = node_defaults(name)
        self.bus = EventBus(self.node, topic_qos=TopicQosTable(defaults['bus.topic_qos'],
                                                               defaults['bus.default_qos']))
        ros.executor.add_node(self.node)
        self.shown: list[dict] = []
        self.bus.subscribe('agent.face.action', lambda e, _t: self.shown.append(e.json()))
        self.photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((640, 480)))
        self.out = self.bus.publisher_for('camera.front', 'realtime')
        self._last = 0.0
        self._closed = False

    def send_frame(self) -> None:
        from loom_ros.plugins.perception.image import frame_event
        if time.monotonic() - self._last >= FRAME_PERIOD_S:
            self._last = time.monotonic()
            self.bus.publish('camera.front', frame_event(self.photo, type='camera.front',
                                                         encoding='bgr8'), 'realtime')

    def happy(self) -> dict | None:
        return next((s for s in self.shown if s.get('label') == 'happy'), None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.ros.executor.remove_node(self.node)
        self.bus.destroy()
        self.node.destroy_node()


@pytest.fixture
def camera_bus(ros):
    """`camera_bus(ns, name)` -> a CameraBus, closed after the test (or earlier by close())."""
    made: list[CameraBus] = []

    def make(ns: str, name: str) -> CameraBus:
        made.append(CameraBus(ros, ns, name))
        return made[-1]
    yield make
    for camera in made:
        camera.close()
