"""What `loom view` draws, as Rerun log calls: Loom's messages in, entities on a RecordingStream
out. Pure (no rclpy): the ROS node (view/ros.py) and the MCAP reader (view/recording.py) feed it
the same way, so a live system and a recording look the same.

Entities (the blueprint below lays them out):
- `camera/image`: camera frames (raw rgb8/bgr8/mono8/rgba8/bgra8, or PNG/JPEG), at most
  `max_image_hz`, raw ones sent as JPEG when `jpeg_quality` is set; `camera/image/faces`: face
  boxes with the emoji and label, from the UI state (`boxes`, pixels x0,y0,x1,y1) or face
  events (`faces[].box`);
- `ui/screen`: what the robot's screen shows (emoji, label, text) as markdown;
- `log/speech`: transcripts and spoken answers; `log/routes`: each route decision with its rule
  and reason;
- `routes/<route>`: decisions per route so far; `latency/camera_to_emoji_ms`, and per topic
  `latency/<topic>/<node>/p50|p99` (handler latency from loom/metrics); `queues/<node>/<sub>`:
  queue depth; `drops/<node>/<sub>/dropped|lost` (from loom/bus/stats; each from the first time
  it is not 0).

Every input is bounded before it reaches Rerun (image size and shape, text length, box and series
counts, finite numbers); a bad message is counted under a reason in `skipped` and dropped, never
raised. Privacy: an event whose effective privacy is above `max_privacy` is not shown (counted
`withheld`); the default, Sensitive, shows what the robot's own screen shows (camera frames and
what is derived from them) and never Private or LocalOnly payloads. Time: each call names its
instant (`stamp_s`: when the view received it, or the recording's log time), never the message's
own claim.
"""
from __future__ import annotations

import json
import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import rerun as rr
import rerun.blueprint as rrb

from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.privacy import effective_privacy
from loom_ros.bus.topics import CAMERA_FRONT, CAMERA_FRONT_FACE, MIC_PRIMARY_SPEECH
from loom_ros.plugins.actuators.ui import frame_stamp_ms

TIMELINE = 'time'
IMAGE = 'camera/image'
FACES = 'camera/image/faces'
SCREEN = 'ui/screen'
SPEECH_LOG = 'log/speech'
ROUTE_LOG = 'log/routes'
CAMERA_TO_EMOJI = 'latency/camera_to_emoji_ms'
RAW_CHANNELS = {'rgb8': 3, 'bgr8': 3, 'mono8': 1, 'rgba8': 4, 'bgra8': 4}
COLOR_MODELS = {'rgb8': 'RGB', 'bgr8': 'BGR', 'mono8': 'L', 'rgba8': 'RGBA', 'bgra8': 'BGRA'}
ENCODED = {'png': 'image/png', 'jpeg': 'image/jpeg', 'jpg': 'image/jpeg'}
MAX_NUMBER_CHARS = 12     # of a number in metadata (width, height, step) before it is parsed
MAX_ABS_SCALAR = 1e15     # larger (or not finite) is not a number the view uses (ms stamps fit)

# Reasons a message (or part of one) is skipped; `skipped` counts each.
WITHHELD = 'withheld'                  # above max_privacy
BAD_IMAGE = 'bad_image'                # encoding, size or shape wrong
IMAGE_TOO_LARGE = 'image_too_large'
RATE_LIMITED = 'image_rate_limited'    # faster than max_image_hz (not an error)
BAD_JSON = 'bad_json'
TOO_LONG = 'too_long'                  # a JSON text over max_json_bytes
BAD_BOX = 'bad_box'
TOO_MANY_BOXES = 'too_many_boxes'
NOT_FINITE = 'not_finite'
TOO_MANY_SERIES = 'too_many_series'
BAD_MESSAGE = 'bad_message'            # a field of the wrong type
CUT = 'text_cut'                       # a text cut to max_text_chars (still shown)


@dataclass(frozen=True)
class ViewLimits:
    """Bounds on what one message may put into the view."""

    max_image_side: int = 4096         # pixels, width and height
    max_image_bytes: int = 32 << 20    # raw pixels or an encoded image
    max_image_hz: float = 5.0          # frames shown per second (0: every frame)
    jpeg_quality: int = 0              # raw frames sent as JPEG of this quality (0: raw pixels)
    max_text_chars: int = 500          # of a transcript, answer, label or reason
    max_json_bytes: int = 64 * 1024    # a UI state or event payload parsed as JSON
    max_boxes: int = 32                # face boxes per frame
    max_series: int = 256              # entities named by message fields (nodes, topics, routes)
    max_name_chars: int = 80           # of one such name


def _cut(text: object, limit: int) -> tuple[str, bool]:
    text = text if isinstance(text, str) else str(text)
    return (text, False) if len(text) <= limit else (text[:limit - 1] + '\u2026', True)


def _finite(value: object) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and abs(number) <= MAX_ABS_SCALAR else None


def _small_int(text: object) -> int | None:
    text = str(text)
    if len(text) > MAX_NUMBER_CHARS or not text.strip().isdigit():
        return None
    return int(text)


# Text logs show the message only: the time is on the timeline, the entity in the view's title.
_BODY_ONLY = rrb.TextLogColumns(text_log_columns=[
    rrb.components.TextLogColumn('EntityPath', visible=False),
    rrb.components.TextLogColumn('LogLevel', visible=False), 'Body'])


def blueprint() -> rrb.Blueprint:
    """The layout a person sees first: camera and screen left, plots middle, logs right."""
    return rrb.Blueprint(
        rrb.Horizontal(
            rrb.Vertical(rrb.Spatial2DView(origin='camera', name='Camera (faces, emoji)'),
                         rrb.TextDocumentView(origin=SCREEN, name='Robot screen'),
                         row_shares=[3, 1]),
            rrb.Vertical(rrb.TimeSeriesView(origin='latency', name='Latency (ms)'),
                         rrb.TimeSeriesView(origin='queues', name='Queue depth'),
                         rrb.TimeSeriesView(origin='drops', name='Drops and losses'),
                         rrb.TimeSeriesView(origin='routes', name='Routes taken')),
            rrb.Vertical(rrb.TextLogView(origin=ROUTE_LOG, name='Route decisions and reasons',
                                         columns=_BODY_ONLY),
                         rrb.TextLogView(origin=SPEECH_LOG, name='Transcript and answers',
                                         columns=_BODY_ONLY)),
            column_shares=[5, 4, 4]),
        rrb.BlueprintPanel(state='collapsed'), rrb.SelectionPanel(state='collapsed'),
        rrb.TimePanel(state='collapsed'))


class LoomView:
    """Turns Loom messages into Rerun entities on `rec` (see the module doc). Thread-safe: the
    ROS executor may call from several threads."""

    def __init__(self, rec: rr.RecordingStream, limits: ViewLimits = ViewLimits(),
                 max_privacy: Privacy = Privacy.SENSITIVE, self_node: str = '',
                 on_first: Callable[[str], None] | None = None):
        """`self_node`: this view's own node name (its bus stats are not plotted);
        `on_first(kind)`: called once per kind the first time one is shown."""
        self.rec = rec
        self.limits = limits
        self.max_privacy = Privacy(max_privacy)
        self.self_node = self_node
        self.on_first = on_first
        self.shown: Counter = Counter()
        self.skipped: Counter = Counter()
        self._series: set[str] = set()
        self._active: set[str] = set()   # bus series that have been non-zero
        self._route_counts: Counter = Counter()
        self._last_image_s: float | None = None
        self._image_size: tuple[int, int] | None = None
        self._screen: dict = {}
        self._lock = threading.Lock()

    # -- bookkeeping ------------------------------------------------------------------------
    def summary(self) -> dict:
        with self._lock:
            return {'shown': dict(self.shown), 'skipped': dict(self.skipped)}

    def _shown(self, kind: str) -> None:
        self.shown[kind] += 1
        if self.shown[kind] == 1 and self.on_first is not None:
            self.on_first(kind)

    def _text(self, value: object) -> str:
        text, cut = _cut(value, self.limits.max_text_chars)
        if cut:
            self.skipped[CUT] += 1
        return text

    def _entity(self, *parts: object) -> str | None:
        """An entity path from message-supplied names (escaped, bounded in length and number);
        None (counted) past max_series."""
        path = '/'.join(rr.escape_entity_path_part(str(p)[:self.limits.max_name_chars] or '_')
                        for p in parts)
        if path not in self._series:
            if len(self._series) >= self.limits.max_series:
                self.skipped[TOO_MANY_SERIES] += 1
                return None
            self._series.add(path)
        return path

    def _scalar(self, path: str | None, value: object) -> bool:
        number = _finite(value)
        if path is None:
            return False
        if number is None:
            self.skipped[NOT_FINITE] += 1
            return False
        self.rec.log(path, rr.Scalars(number))
        return True

    def _at(self, stamp_s: float) -> bool:
        stamp = _finite(stamp_s)
        if stamp is None or stamp < 0:
            self.skipped[BAD_MESSAGE] += 1
            return False
        self.rec.set_time(TIMELINE, timestamp=stamp)
        return True

    # -- Loom events --------------------------------------------------------------------------
    def on_event(self, event: Event, topic: str, stamp_s: float) -> None:
        """A Loom event from the bus or a recording: camera frames, face detections, speech,
        agents' actions and intents; anything else is ignored."""
        with self._lock:
            if not isinstance(event, Event) or not isinstance(topic, str):
                self.skipped[BAD_MESSAGE] += 1
                return
            try:
                privacy = effective_privacy(event)
            except Exception:   # noqa: BLE001 - a malformed event: treated as the strictest
                privacy = Privacy.LOCAL_ONLY
            if privacy > self.max_privacy:
                self.skipped[WITHHELD] += 1
                return
            if not self._at(stamp_s):
                return
            if topic == CAMERA_FRONT:
                self._image(event, stamp_s)
            elif topic == CAMERA_FRONT_FACE:
                data = self._json(event.payload)
                if isinstance(data, dict):
                    self._boxes(data.get('faces'), self._face_label(data))
            elif topic == MIC_PRIMARY_SPEECH or topic.startswith('agent.'):
                self._speech(event, topic)

    def _json(self, payload: object):
        if isinstance(payload, str):
            payload = payload.encode('utf-8', 'replace')
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            self.skipped[BAD_MESSAGE] += 1
            return None
        if len(payload) > self.limits.max_json_bytes:
            self.skipped[TOO_LONG] += 1
            return None
        try:
            return json.loads(bytes(payload))
        except (ValueError, RecursionError):
            self.skipped[BAD_JSON] += 1
            return None

    def _image(self, event: Event, stamp_s: float) -> None:
        lim = self.limits
        if lim.max_image_hz > 0 and self._last_image_s is not None and \
                0 <= stamp_s - self._last_image_s < 1.0 / lim.max_image_hz - 1e-6:
            self.skipped[RATE_LIMITED] += 1
            return
        payload = event.payload if isinstance(event.payload, (bytes, bytearray)) else None
        meta = event.metadata if isinstance(event.metadata, dict) else {}
        encoding = str(meta.get('encoding', ''))[:16].strip().lower()
        if payload is None:
            self.skipped[BAD_IMAGE] += 1
            return
        if len(payload) > lim.max_image_bytes:
            self.skipped[IMAGE_TOO_LARGE] += 1
            return
        if encoding in ENCODED or (not encoding and payload[:4] in (b'\x89PNG', b'\xff\xd8\xff\xe0',
                                                                    b'\xff\xd8\xff\xe1')):
            media = ENCODED.get(encoding) or ('image/png' if payload[:4] == b'\x89PNG'
                                              else 'image/jpeg')
            self.rec.log(IMAGE, rr.EncodedImage(contents=bytes(payload), media_type=media))
            self._image_size = None
        else:
            image = self._raw_image(payload, meta, encoding)
            if image is None:
                return
            frame = rr.Image(image, color_model=COLOR_MODELS[encoding])
            if lim.jpeg_quality:   # a 20th of the bytes for the viewer to take in
                frame = frame.compress(jpeg_quality=lim.jpeg_quality)
            self.rec.log(IMAGE, frame)
            self._image_size = (image.shape[1], image.shape[0])
        self._last_image_s = stamp_s
        self._shown('image')

    def _raw_image(self, payload: bytes, meta: dict, encoding: str) -> np.ndarray | None:
        lim = self.limits
        channels = RAW_CHANNELS.get(encoding)
        width, height = _small_int(meta.get('width', '')), _small_int(meta.get('height', ''))
        step = _small_int(meta.get('step', '')) if 'step' in meta else \
            (width * channels if width and channels else None)
        if channels is None or not width or not height or step is None:
            self.skipped[BAD_IMAGE] += 1
            return None
        if width > lim.max_image_side or height > lim.max_image_side:
            self.skipped[IMAGE_TOO_LARGE] += 1
            return None
        if step < width * channels or step * height > len(payload):
            self.skipped[BAD_IMAGE] += 1
            return None
        rows = np.frombuffer(payload, dtype=np.uint8, count=step * height).reshape(height, step)
        image = rows[:, :width * channels].reshape(height, width, channels)
        return image[:, :, 0] if channels == 1 else image

    def _face_label(self, data: dict) -> str:
        parts = [data.get(k) for k in ('emoji', 'label')]
        label = ' '.join(p for p in parts if isinstance(p, str) and p)
        confidence = _finite(data.get('confidence'))
        if confidence is not None and 0 <= confidence <= 1:
            label = f'{label} {confidence:.2f}'.strip()
        return self._text(label)

    def _boxes(self, faces: object, label: str) -> None:
        """Face boxes: a list of [x0, y0, x1, y1] or of {'box': [...]}, pixels."""
        if faces is None:
            return
        if not isinstance(faces, list):
            self.skipped[BAD_BOX] += 1
            return
        if len(faces) > self.limits.max_boxes:
            self.skipped[TOO_MANY_BOXES] += 1
            faces = faces[:self.limits.max_boxes]
        boxes = []
        side = self.limits.max_image_side
        for face in faces:
            box = face.get('box') if isinstance(face, dict) else face
            if not isinstance(box, (list, tuple)) or len(box) != 4:
                self.skipped[BAD_BOX] += 1
                continue
            values = [_finite(v) for v in box]
            if any(v is None or not -side <= v <= 2 * side for v in values) or \
                    values[2] <= values[0] or values[3] <= values[1]:
                self.skipped[BAD_BOX] += 1
                continue
            boxes.append(values)
        if not boxes:
            self.rec.log(FACES, rr.Clear(recursive=False))
            return
        labels = [label] + [''] * (len(boxes) - 1) if label else None
        self.rec.log(FACES, rr.Boxes2D(array=boxes, array_format=rr.Box2DFormat.XYXY,
                                       labels=labels, colors=[(255, 200, 0)] * len(boxes)))
        self._shown('faces')

    def _speech(self, event: Event, topic: str) -> None:
        data = self._json(event.payload) if event.payload else None
        if not isinstance(data, dict):
            return
        text = data.get('text')
        if not isinstance(text, str) or not text:
            return
        kind = str(event.type)[:64]
        if topic == MIC_PRIMARY_SPEECH:
            if data.get('partial'):
                return
            line, level = f'transcript: {self._text(text)}', 'INFO'
        elif kind == 'answer.spoken':
            line, level = f'answer: {self._text(text)}', 'INFO'
        elif kind == 'ui_update' and topic.endswith('.action'):
            line, level = f'screen: {self._text(text)}', 'DEBUG'
        else:
            line, level = f'{self._text(kind)}: {self._text(text)}', 'DEBUG'
        self.rec.log(SPEECH_LOG, rr.TextLog(line, level=level))
        self._shown('speech')

    # -- plain ROS messages -------------------------------------------------------------------
    def on_ui_state(self, text: object, stamp_s: float) -> None:
        """loom/ui/state (std_msgs/String data): the robot's screen. Shown whatever the tier
        (the robot's own UI shows it); face boxes in it (`boxes`) go on the camera image."""
        with self._lock:
            state = self._json(text)
            if state is None:
                return
            if not isinstance(state, dict):
                self.skipped[BAD_JSON] += 1
                return
            if not self._at(stamp_s):
                return
            emoji, label, words = (state.get(k) for k in ('emoji', 'label', 'text'))
            screen = {k: self._text(v) for k, v in (('emoji', emoji), ('label', label),
                                                    ('text', words)) if isinstance(v, str) and v}
            if screen != self._screen:
                self._screen = screen
                face = ' '.join(screen[k] for k in ('emoji', 'label') if k in screen)
                body = [f'# {face}' if face else '# (nobody in view)']
                if 'text' in screen:
                    body.append(screen['text'])
                self.rec.log(SCREEN, rr.TextDocument('\n\n'.join(body),
                                                     media_type=rr.MediaType.MARKDOWN))
                self._shown('screen')
            if 'boxes' in state:
                self._boxes(state['boxes'], self._face_label(state))
            elif state.get('faces') == 0:
                self.rec.log(FACES, rr.Clear(recursive=False))
            frame_ms = frame_stamp_ms(state)   # the ui plugin's own reading of its field
            if emoji and frame_ms is not None:
                latency = stamp_s * 1000.0 - frame_ms
                if 0 <= latency <= 3_600_000 and self._scalar(CAMERA_TO_EMOJI, latency):
                    self._shown('latency')

    def on_route_decision(self, msg, stamp_s: float) -> None:
        """router/decisions (loom_msgs/RouteDecision): a log line with rule and reason, and the
        count per route."""
        with self._lock:
            try:
                route = str(msg.route)
                who, what = str(msg.agent_id), str(msg.event_type)
                rule, reason = str(msg.rule), str(msg.reason)
            except AttributeError:
                self.skipped[BAD_MESSAGE] += 1
                return
            if not self._at(stamp_s):
                return
            path = self._entity('routes', route or '?')
            if path is None:
                return
            self._route_counts[path] += 1
            self._scalar(path, self._route_counts[path])
            line = (f'{self._text(who or "?")} {self._text(what)} -> {self._text(route)} '
                    f'({self._text(rule)}: {self._text(reason)})')
            self.rec.log(ROUTE_LOG, rr.TextLog(line, level='INFO'))
            self._shown('route')

    def on_metrics(self, msg, stamp_s: float) -> None:
        """loom/metrics (loom_msgs/Metrics): handler latency P50 and P99 per topic."""
        with self._lock:
            try:
                samples = list(msg.samples)
                node = str(msg.node)
            except (AttributeError, TypeError):
                self.skipped[BAD_MESSAGE] += 1
                return
            if not self._at(stamp_s):
                return
            short = node.rsplit('/', 1)[-1]
            for sample in samples[:4 * self.limits.max_series]:
                try:
                    if sample.name != 'handle_latency_ms' or not sample.count:
                        continue
                    labels = {kv.key: kv.value for kv in sample.labels}
                except (AttributeError, TypeError):
                    self.skipped[BAD_MESSAGE] += 1
                    continue
                topic = labels.get('topic')
                if not topic:
                    continue
                for key in ('p50', 'p99'):
                    if self._scalar(self._entity('latency', topic, short, key),
                                    getattr(sample, key, None)):
                        self._shown('latency')

    def on_bus_stats(self, msg, stamp_s: float) -> None:
        """loom/bus/stats (loom_msgs/BusStats): queue depth, drops (dropped_oldest + overflow)
        and losses (sequence gaps) per subscription."""
        with self._lock:
            try:
                node = str(msg.node)
                subs = list(msg.subscriptions)
            except (AttributeError, TypeError):
                self.skipped[BAD_MESSAGE] += 1
                return
            short = node.rsplit('/', 1)[-1]
            if self.self_node and short == self.self_node:
                return
            if not self._at(stamp_s):
                return
            for sub in subs[:self.limits.max_series]:
                try:
                    pattern = str(sub.pattern)
                    depth, lost = sub.queue_depth, sub.lost
                    dropped = int(sub.dropped_oldest) + int(sub.overflow)
                except (AttributeError, TypeError, ValueError):
                    self.skipped[BAD_MESSAGE] += 1
                    continue
                shown = False
                for parts, value in ((('queues', short, pattern), depth),
                                     (('drops', short, pattern, 'dropped'), dropped),
                                     (('drops', short, pattern, 'lost'), lost)):
                    shown |= self._active_scalar(parts, value)
                if shown:
                    self._shown('bus')

    def _active_scalar(self, parts: tuple, value: object) -> bool:
        """A series that has been non-zero once: dozens of subscriptions whose queues and drops
        stay at 0 would bury the few that matter (and load the viewer for nothing)."""
        key = '/'.join(map(str, parts))
        if key not in self._active:
            if _finite(value) == 0:
                return False
            if len(self._active) >= self.limits.max_series:
                self.skipped[TOO_MANY_SERIES] += 1
                return False
            self._active.add(key)
        return self._scalar(self._entity(*parts), value)
