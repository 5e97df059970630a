"""Fixtures of the agents tests: the harness's FaceCamera (a camera node whose bus uses the
product's QoS table, as every Loom process does) sending the astronaut photo and collecting what
the face agent shows."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from harness import FaceCamera


@pytest.fixture
def camera_bus(ros):
    """`camera_bus(ns, name)` -> a FaceCamera whose send_frame() sends the astronaut (640x480),
    closed after the test (or earlier by close())."""
    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((640, 480)))
    made: list[FaceCamera] = []

    def make(ns: str, name: str) -> FaceCamera:
        made.append(FaceCamera(ros, ns, name, photo=photo, encoding='bgr8'))
        return made[-1]
    yield make
    for camera in made:
        camera.close()
