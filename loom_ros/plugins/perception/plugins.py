"""The perception plugins (loom.plugins entry points): `face_detector`, `expression`,
`face_expression` (Flow 1: frame -> faces with expressions in one call) and `embedding`.

Frames arrive as camera events, PNG/JPEG or raw pixels with metadata (see image.py). Results keep
the frame's timestamp, frame_id and at least SENSITIVE privacy (faces are personal data), and
name the event they came from in metadata `source_event`. Bad input is a counted failure, never
an exception; a frame without faces answers ok with no events.
"""
from __future__ import annotations

import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loom_ros.bus.event import Event, Privacy
from loom_ros.plugins.backends import ModelError, check_file
from loom_ros.plugins.contract import (
    Capability, HealthState, HealthStatus, Plugin, PluginContext, PluginError, PluginMetadata,
    PluginResponse, PluginType,
)
from loom_ros.plugins.perception.image import ImageError, image_from_event

FACE_DETECTED = 'face.detected'
FACE_EXPRESSION = 'face.expression'
TEXT_EMBEDDING = 'text.embedding'


class _Config(BaseModel):
    model_config = ConfigDict(extra='forbid', frozen=True)

    model_path: str = ''          # '' = the model shipped in its package
    threads: int = Field(1, ge=1, le=64)


class FaceConfig(_Config):
    min_score: float = Field(0.5, gt=0.0, lt=1.0)
    iou_threshold: float = Field(0.3, gt=0.0, lt=1.0)
    max_faces: int = Field(16, ge=1, le=256)


class ExpressionConfig(_Config):
    margin: float = Field(0.1, ge=0.0, le=1.0)


class FaceExpressionConfig(FaceConfig):
    expression_model_path: str = ''
    margin: float = Field(0.1, ge=0.0, le=1.0)


class EmbeddingConfig(_Config):
    tokenizer_path: str = ''
    max_tokens: int = Field(128, ge=8, le=512)
    max_texts: int = Field(64, ge=1)


def _load_config(name: str, model: type[_Config], config: dict) -> _Config:
    try:
        return model(**(config or {}))
    except ValidationError as exc:
        problems = '; '.join(f'{".".join(str(p) for p in e["loc"]) or "config"}: {e["msg"]}'
                             for e in exc.errors())
        raise PluginError(f'{name} config: {problems}') from None


def _derived(event: Event, type: str, data: dict, plugin: str, confidence: float) -> Event:
    """A result event tied to the event it came from."""
    return Event.with_json(type, data, source=f'plugin/{plugin}', timestamp_ms=event.timestamp_ms,
                           frame_id=event.frame_id, metadata={'source_event': event.id},
                           confidence=min(1.0, max(0.0, float(confidence))), tags=list(event.tags),
                           privacy=max(Privacy(event.privacy), Privacy.SENSITIVE))


class _PerceptionPlugin(Plugin):
    """Shared shape: config validated at Init, models loaded at Init (ModelError -> PluginError
    naming the file), per-event counters reported by Health."""

    config_model: type[_Config] = _Config

    def __init__(self) -> None:
        super().__init__()
        self.config = None
        self.stats = {'events': 0, 'results': 0, 'bad_input': 0, 'errors': 0}
        self._last_error = ''
        self._busy_ms = 0.0

    def init(self, ctx: PluginContext) -> None:
        super().init(ctx)
        self.config = _load_config(self.metadata.name, self.config_model, ctx.config)
        try:
            self._load(self.config)
        except ModelError as exc:
            raise PluginError(f'{self.metadata.name}: {exc}') from None

    def _load(self, config) -> None:
        raise NotImplementedError

    def _bad(self, reason: str) -> PluginResponse:
        self.stats['bad_input'] += 1
        self._last_error = reason
        return PluginResponse.failure(reason)

    def _frame(self, event: Event) -> np.ndarray:
        self.ctx.require(Capability.CAMERA_READ, detail=f'{event.type} {event.id}')
        return image_from_event(event)

    def handle_event(self, event: Event) -> PluginResponse:
        if self.config is None:
            return PluginResponse.failure(f'{self.metadata.name} is not initialised')
        self.stats['events'] += 1
        start = time.perf_counter()
        try:
            events = self._handle(event)
        except (ImageError, ValueError, UnicodeDecodeError) as exc:
            return self._bad(f'{self.metadata.name}: {exc}')
        except RuntimeError as exc:  # the runtime failed on input that passed our checks
            self.stats['errors'] += 1
            self._last_error = f'{type(exc).__name__}: {exc}'
            return PluginResponse.failure(f'{self.metadata.name}: {self._last_error}')
        latency = (time.perf_counter() - start) * 1e3
        self._busy_ms += latency
        self.stats['results'] += len(events)
        return PluginResponse(events=events, latency_ms=latency)

    def _handle(self, event: Event) -> list[Event]:
        raise NotImplementedError

    def health(self) -> HealthStatus:
        details = {k: str(v) for k, v in self.stats.items()}
        if self.stats['events']:
            details['mean_ms'] = f'{self._busy_ms / self.stats["events"]:.2f}'
        if self.config is None:
            return HealthStatus(HealthState.FAILED, 'not initialised', details)
        if self.stats['errors']:
            return HealthStatus(HealthState.DEGRADED, f'last error: {self._last_error}', details)
        return HealthStatus(HealthState.OK, '', details)


class FaceDetectorPlugin(_PerceptionPlugin):
    metadata = PluginMetadata(
        name='face_detector', type=PluginType.FEATURE_EXTRACTOR,
        capabilities=(Capability.CAMERA_READ,), reads=('camera.front',), writes=(FACE_DETECTED,),
        description='camera frames -> face.detected (BlazeFace short range: boxes, keypoints)')
    config_model = FaceConfig

    def _load(self, config: FaceConfig) -> None:
        from loom_ros.plugins.perception.face import FaceDetector
        self.detector = FaceDetector(config.model_path or None, threads=config.threads,
                                     min_score=config.min_score,
                                     iou_threshold=config.iou_threshold,
                                     max_faces=config.max_faces)

    def _handle(self, event: Event) -> list[Event]:
        rgb = self._frame(event)
        faces = self.detector.detect(rgb)
        if not faces:
            return []
        height, width = rgb.shape[:2]
        data = {'width': width, 'height': height,
                'faces': [f.to_dict(width, height) for f in faces]}
        return [_derived(event, FACE_DETECTED, data, self.metadata.name, faces[0].score)]

    def shutdown(self) -> None:
        if getattr(self, 'detector', None) is not None:
            self.detector.close()
            self.detector = None


class ExpressionPlugin(_PerceptionPlugin):
    """A face crop (the whole image is the face) or a frame with metadata `box` = "x0,y0,x1,y1"
    in pixels -> face.expression {label, confidence, scores}."""

    metadata = PluginMetadata(
        name='expression', type=PluginType.FEATURE_EXTRACTOR,
        capabilities=(Capability.CAMERA_READ,), reads=('face.crop',), writes=(FACE_EXPRESSION,),
        description='face crops -> face.expression (fer 7-class model)')
    config_model = ExpressionConfig

    def _load(self, config: ExpressionConfig) -> None:
        from loom_ros.plugins.perception.expression import ExpressionClassifier
        self.classifier = ExpressionClassifier(config.model_path or None, threads=config.threads,
                                               margin=config.margin)

    def _handle(self, event: Event) -> list[Event]:
        rgb = self._frame(event)
        box = event.metadata.get('box')
        if box:
            try:
                x0, y0, x1, y1 = (float(v) for v in box.split(','))
            except ValueError:
                raise ValueError(f'metadata box must be "x0,y0,x1,y1" in pixels, got {box!r}') from None
            if not (x1 > x0 and y1 > y0):
                raise ValueError(f'metadata box {box!r} is empty')
            expression = self.classifier.classify_box(rgb, (x0, y0, x1, y1))
        else:
            expression = self.classifier.classify(rgb)
        return [_derived(event, FACE_EXPRESSION, expression.to_dict(), self.metadata.name,
                         expression.confidence)]

    def shutdown(self) -> None:
        if getattr(self, 'classifier', None) is not None:
            self.classifier.close()
            self.classifier = None


class FaceExpressionPlugin(_PerceptionPlugin):
    """Flow 1 in one call: frame -> face.expression with every face's box and expression; the
    top-level label/confidence are the best-scoring face's."""

    metadata = PluginMetadata(
        name='face_expression', type=PluginType.FEATURE_EXTRACTOR,
        capabilities=(Capability.CAMERA_READ,), reads=('camera.front',),
        writes=(FACE_EXPRESSION,),
        description='camera frames -> face.expression (faces with boxes and expressions)')
    config_model = FaceExpressionConfig

    def _load(self, config: FaceExpressionConfig) -> None:
        from loom_ros.plugins.perception.expression import ExpressionClassifier
        from loom_ros.plugins.perception.face import FaceDetector
        self.detector = FaceDetector(config.model_path or None, threads=config.threads,
                                     min_score=config.min_score,
                                     iou_threshold=config.iou_threshold,
                                     max_faces=config.max_faces)
        self.classifier = ExpressionClassifier(config.expression_model_path or None,
                                               threads=config.threads, margin=config.margin)
        # Warm-up at Init, not on the first camera frame: a runtime's first run allocates and
        # plans (the demo's first frame took ~0.9 s and held up the frames behind it).
        blank = np.zeros((480, 640, 3), dtype=np.uint8)
        self.detector.detect(blank)
        self.classifier.classify_box(blank, (160.0, 120.0, 480.0, 360.0))

    def _handle(self, event: Event) -> list[Event]:
        rgb = self._frame(event)
        faces = self.detector.detect(rgb)
        if not faces:
            return []
        height, width = rgb.shape[:2]
        described = []
        for face in faces:
            item = face.to_dict(width, height)
            item['expression'] = self.classifier.classify_box(rgb, face.box).to_dict()
            described.append(item)
        best = described[0]['expression']
        data = {'width': width, 'height': height, 'label': best['label'],
                'confidence': best['confidence'], 'faces': described}
        return [_derived(event, FACE_EXPRESSION, data, self.metadata.name, best['confidence'])]

    def shutdown(self) -> None:
        for name in ('detector', 'classifier'):
            model = getattr(self, name, None)
            if model is not None:
                model.close()
                setattr(self, name, None)


class EmbeddingPlugin(_PerceptionPlugin):
    """Text -> text.embedding. Input payload: UTF-8 text, or JSON {"text": ...} or
    {"texts": [...]}. Output payload: float32 little-endian vectors, row after row, with metadata
    `dim` (384), `count` and `dtype`; read it back with `vectors_from_event`."""

    metadata = PluginMetadata(
        name='embedding', type=PluginType.FEATURE_EXTRACTOR, reads=('text',),
        writes=(TEXT_EMBEDDING,),
        description='text -> 384-d sentence embedding (MiniLM-L6 int8, L2-normalised)')
    config_model = EmbeddingConfig

    def _load(self, config: EmbeddingConfig) -> None:
        from loom_ros.agents.embedding import DIM, MiniLMEmbedder
        from loom_ros.agents.embedding import ModelError as EmbeddingModelError
        if config.model_path:
            check_file(config.model_path, 'onnx')
        if config.tokenizer_path:
            check_file(config.tokenizer_path, 'tokenizer')
        try:
            self.embedder = MiniLMEmbedder(config.model_path or None,
                                           config.tokenizer_path or None,
                                           threads=config.threads, max_tokens=config.max_tokens)
        except EmbeddingModelError as exc:
            raise ModelError(str(exc)) from None
        except Exception as exc:  # tokenizers raises its own Exception for a bad tokenizer file
            raise ModelError(f'embedding tokenizer: {exc}') from None
        dim = self.embedder.embed(['warm up']).shape[1]  # also the warm-up
        if dim != DIM:
            raise ModelError(f'embedding model {config.model_path}: {dim}-d vectors, expected '
                             f'{DIM} (semantic memory indexes {DIM}-d MiniLM vectors)')

    def _texts(self, event: Event) -> list[str]:
        text = bytes(event.payload).decode('utf-8')
        stripped = text.lstrip()
        if stripped.startswith('{'):
            import json
            data = json.loads(stripped)
            if isinstance(data.get('texts'), list):
                texts = data['texts']
            elif isinstance(data.get('text'), str):
                texts = [data['text']]
            else:
                raise ValueError('JSON payload needs "text" (a string) or "texts" (a list)')
        else:
            texts = [text]
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError('nothing to embed: texts must be non-empty strings')
        if len(texts) > self.config.max_texts:
            raise ValueError(f'{len(texts)} texts in one event; the limit is '
                             f'{self.config.max_texts} (config max_texts)')
        return texts

    def _handle(self, event: Event) -> list[Event]:
        vectors = self.embedder.embed(self._texts(event))
        out = Event(type=TEXT_EMBEDDING, payload=vectors.astype('<f4').tobytes(),
                    source=f'plugin/{self.metadata.name}', timestamp_ms=event.timestamp_ms,
                    frame_id=event.frame_id, tags=list(event.tags), privacy=event.privacy,
                    metadata={'source_event': event.id, 'dim': str(vectors.shape[1]),
                              'count': str(vectors.shape[0]), 'dtype': 'float32'})
        return [out]


def vectors_from_event(event: Event) -> np.ndarray:
    """The (count, dim) float32 vectors of a text.embedding event."""
    dim, count = int(event.metadata['dim']), int(event.metadata['count'])
    return np.frombuffer(event.payload, dtype='<f4').reshape(count, dim)
