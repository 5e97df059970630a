"""Facial expression from a face crop: fer's 7-class model (mini-Xception, TFLite, 64x64 grey in
[-1, 1]), the model the `fer` package ships. Crops come from FaceDetector boxes, squared and
widened by a margin the way fer widens its detector's boxes, with edge pixels repeated where the
square leaves the frame.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from loom_ros.plugins.backends import ModelError, open_model
from loom_ros.plugins.perception.face import package_model
from loom_ros.plugins.perception.image import to_grey

# fer's label order (fer.FER._get_labels): index i of the model output is LABELS[i].
LABELS = ('angry', 'disgust', 'fear', 'happy', 'sad', 'surprise', 'neutral')
INPUT_SIZE = 64


def default_model_path() -> Path:
    return package_model('fer', 'data', 'emotion_model_quantized.tflite')


@dataclass
class Expression:
    label: str
    confidence: float
    scores: dict[str, float]

    def to_dict(self) -> dict:
        return {'label': self.label, 'confidence': round(self.confidence, 4),
                'scores': {k: round(v, 4) for k, v in self.scores.items()}}


def square_crop(pixels: np.ndarray, box, margin: float) -> np.ndarray:
    """The square around `box` (x0, y0, x1, y1), its side the box's longer side widened by
    `margin` on each side; parts outside the frame repeat the edge pixels."""
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left, top = int(round(cx - side / 2.0)), int(round(cy - side / 2.0))
    size = max(1, int(round(side)))
    right, bottom = left + size, top + size
    inner = pixels[max(top, 0):min(bottom, height), max(left, 0):min(right, width)]
    if inner.size == 0:
        raise ValueError(f'face box {box} lies outside the {width}x{height} frame')
    pad = ((max(0, -top), max(0, bottom - height)), (max(0, -left), max(0, right - width)))
    if any(p for pair in pad for p in pair):
        pad = pad + ((0, 0),) * (pixels.ndim - 2)
        inner = np.pad(inner, pad, mode='edge')
    return inner


class ExpressionClassifier:
    """angry / disgust / fear / happy / sad / surprise / neutral for a face."""

    def __init__(self, model_path: str | Path | None = None, threads: int = 1,
                 margin: float = 0.1):
        if not 0.0 <= margin <= 1.0:
            raise ModelError(f'margin must be in [0, 1], got {margin!r}')
        self.model = open_model(model_path or default_model_path(), threads=threads,
                                expect_inputs=[(1, INPUT_SIZE, INPUT_SIZE, 1)],
                                expect_outputs=[(1, len(LABELS))], warmup=1)
        self.margin = margin
        self._tensor = np.empty((1, INPUT_SIZE, INPUT_SIZE, 1), dtype=np.float32)
        self._lock = threading.Lock()  # the input tensor is reused: one face at a time

    def preprocess(self, face: np.ndarray) -> np.ndarray:
        """A face crop (H, W, 3) RGB or (H, W) grey uint8 to the model's (1, 64, 64, 1) input."""
        if face.dtype != np.uint8 or face.ndim not in (2, 3) or (face.ndim == 3 and face.shape[2] != 3):
            raise ValueError(f'expected an (H, W, 3) RGB or (H, W) grey uint8 face, got '
                             f'{face.shape} {face.dtype}')
        grey = to_grey(face) if face.ndim == 3 else face
        if grey.shape != (INPUT_SIZE, INPUT_SIZE):
            grey = np.asarray(Image.fromarray(np.ascontiguousarray(grey)).resize(
                (INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0))
        tensor = self._tensor
        np.multiply(grey[:, :, None], np.float32(2.0 / 255.0), out=tensor[0], casting='unsafe')
        tensor -= 1.0  # fer's (x / 255 - 0.5) * 2
        return tensor

    def classify(self, face: np.ndarray) -> Expression:
        """The expression of a whole image that is one face crop."""
        with self._lock:
            scores = self.model.run([self.preprocess(face)])[0][0]
        best = int(np.argmax(scores))
        return Expression(LABELS[best], float(scores[best]),
                          {label: float(s) for label, s in zip(LABELS, scores)})

    def classify_box(self, rgb: np.ndarray, box) -> Expression:
        """The expression of the face at `box` (x0, y0, x1, y1 pixels) in an RGB frame."""
        return self.classify(square_crop(rgb, box, self.margin))

    def close(self) -> None:
        self.model.close()
