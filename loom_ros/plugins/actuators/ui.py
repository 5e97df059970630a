"""Plugin `ui`: `ui_update` actions -> the merged UI state as JSON (std_msgs/String on
loom/ui/state, for a screen or `ros2 topic echo`) and text markers for rviz
(visualization_msgs/MarkerArray on loom/ui/markers).

An update changes only the fields it names, so `{emoji, label}` from the face agent and `{text}`
from speech feedback share one screen. Fields: `emoji`, `label`, `text` (strings; null removes
one), `clear: true` (start from an empty state), and any other JSON values, which ride along in
the state. Two markers with stable ids float above `frame_id`: id 0 is "emoji label", id 1 the
text; a line with nothing to show is deleted.

The append-only audit keeps the screen's words only while every field on it came from a Public
event that names no data subject: a later anonymous update does not make an earlier person's
words on the same screen auditable (UiState remembers, per field, why its words are withheld).

The state says whose update set each field it shows (`loom.subjects`: {field: subject},
bus/privacy.py SUBJECTS_JSON_KEY; '..' for one named by an invalid id): `loom record` keeps a
field only with its subject's `recording` consent, and `loom forget` / `loom export` take out or
hand over that subject's fields. The rviz markers
carry the same words with no such list; they are not recorded by default (cli/record.py).
"""
from __future__ import annotations

import json
import threading

from loom_ros.bus.event import Event
from loom_ros.bus.privacy import (STRIPPED_JSON_KEY, SUBJECTS_JSON_KEY, audit_withholds,
                                  subject_or_someone)
from loom_ros.bus.qos import to_qos_profile
from loom_ros.plugins.actuators.config import UiConfig, load_section
from loom_ros.plugins.contract import (
    Capability, HealthState, HealthStatus, Plugin, PluginContext, PluginMetadata, PluginResponse,
    PluginType,
)

UPDATE = 'ui_update'
TEXT_FIELDS = ('emoji', 'label', 'text')
RESERVED = ('source', 'updated_ms', 'seq', 'truncated', SUBJECTS_JSON_KEY,
            STRIPPED_JSON_KEY)
FACE_ID, TEXT_ID = 0, 1


MAX_FRAME_MS = 2 ** 53   # the largest whole number a float (and JSON's readers) holds exactly


def frame_stamp_ms(state: object) -> int | None:
    """The camera frame's stamp (wall-clock ms) that a UI state shows a face for, or None. The
    one reading of `frame_ms` for everyone who measures camera-to-emoji from loom/ui/state (the
    demo, `loom view`): that topic is anyone's to publish on, and JSON also says "12", true,
    1e308, NaN and Infinity, so only a whole positive number a float holds exactly counts."""
    if not isinstance(state, dict):
        return None
    frame = state.get('frame_ms')
    if isinstance(frame, bool) or not isinstance(frame, (int, float)) or \
            not 0 < frame < MAX_FRAME_MS or frame != int(frame):
        return None
    return int(frame)


class UiError(ValueError):
    """A ui_update that cannot be shown: not an object, a text field that is not a string, a
    reserved key, a state too large."""


class UiState:
    """The merged UI state (plain Python): what the screen shows right now."""

    def __init__(self, max_text_chars: int = 280, max_state_bytes: int = 16384):
        self.max_text_chars = max_text_chars
        self.max_state_bytes = max_state_bytes
        self.fields: dict = {}
        self.withheld: dict[str, str] = {}   # field -> why its words stay out of the audit
        self.subjects: dict[str, str] = {}   # field -> the data subject whose update set it
        self.seq = 0

    def apply(self, update: object, source: str = '', now_ms: int = 0,
              withheld: str = '', subject: str = '') -> dict:
        """Merge one update; return the new state. Raises UiError and leaves the state as it was.
        `withheld`: why the update's words may not be audited (audit_withholds of its event);
        `subject`: the data subject its event names (subject_or_someone); both remembered for
        each field it sets until another update replaces or removes it."""
        if not isinstance(update, dict):
            raise UiError(f'ui_update payload must be a JSON object, got {type(update).__name__}')
        reserved = sorted(set(update) & set(RESERVED))
        if reserved:
            raise UiError(f'ui_update: {reserved} are set by the ui plugin, not by senders')
        clear = update.get('clear', False)
        if not isinstance(clear, bool):
            # the type only: the value is the sender's, and this text is audited
            raise UiError(f'ui_update: clear must be true or false, got '
                          f'{type(clear).__name__}')
        fields = {} if clear else dict(self.fields)
        origins = {} if clear else dict(self.withheld)
        owners = {} if clear else dict(self.subjects)
        truncated = []
        for key, value in update.items():
            if key == 'clear':
                continue
            if value is None:
                fields.pop(key, None)
                origins.pop(key, None)
                owners.pop(key, None)
                continue
            if key in TEXT_FIELDS:
                if not isinstance(value, str):
                    raise UiError(f'ui_update: {key} must be a string or null, got '
                                  f'{type(value).__name__}')
                if len(value) > self.max_text_chars:
                    value = value[:self.max_text_chars - 1] + '\u2026'
                    truncated.append(key)
            fields[key] = value
            origins[key] = withheld
            owners[key] = subject
        state = {**fields, 'source': source, 'updated_ms': now_ms, 'seq': self.seq + 1}
        shown = {field: who for field, who in owners.items() if who and field in fields}
        if shown:
            state[SUBJECTS_JSON_KEY] = shown
        if truncated:
            state['truncated'] = truncated
        size = len(self.encode(state))
        if size > self.max_state_bytes:
            raise UiError(f'ui state would be {size} bytes, over max_state_bytes '
                          f'{self.max_state_bytes}')
        self.fields, self.seq = fields, self.seq + 1
        self.withheld = {k: why for k, why in origins.items() if why}
        self.subjects = {k: who for k, who in owners.items() if who}
        return state

    def lines_withheld(self) -> str:
        """Why the screen's lines may not be audited ('' when every field they show came from a
        Public event naming no data subject)."""
        why = next((self.withheld[k] for k in TEXT_FIELDS
                    if k in self.withheld and self.fields.get(k)), '')
        return f'the screen shows words of an earlier update: {why}' if why else ''

    @staticmethod
    def encode(state: dict) -> bytes:
        return json.dumps(state, ensure_ascii=False, separators=(',', ':')).encode()

    def lines(self) -> dict[int, str]:
        """Marker id -> text for the lines that have something to show."""
        face = ' '.join(str(self.fields[k]) for k in ('emoji', 'label') if self.fields.get(k))
        text = self.fields.get('text') or ''
        return {i: s for i, s in ((FACE_ID, face), (TEXT_ID, text)) if s}


class UiPlugin(Plugin):
    metadata = PluginMetadata(
        name='ui', type=PluginType.ACTUATOR, capabilities=(Capability.UI_WRITE,),
        reads=(UPDATE,), writes=('ros:loom/ui/state', 'ros:loom/ui/markers'),
        description='ui_update actions -> UI state JSON and rviz text markers')

    def __init__(self) -> None:
        super().__init__()
        self.config: UiConfig | None = None
        self.state: UiState | None = None
        self.stats = {'updates': 0, 'bad_input': 0, 'ignored': 0, 'published': 0}
        self.last_state: dict | None = None
        self._lock = threading.Lock()
        self._state_pub = self._markers_pub = None

    def init(self, ctx: PluginContext) -> None:
        super().init(ctx)
        cfg = self.config = load_section('ui', UiConfig, ctx.config)
        self.state = UiState(cfg.max_text_chars, cfg.max_state_bytes)
        node = ctx.ros_node
        if node is None:
            return
        from std_msgs.msg import String
        from visualization_msgs.msg import MarkerArray
        qos = to_qos_profile(cfg.qos)
        self._state_pub = node.create_publisher(String, cfg.state_topic, qos)
        self._markers_pub = node.create_publisher(MarkerArray, cfg.markers_topic, qos)

    def shutdown(self) -> None:
        node = self.ctx.ros_node if self.ctx is not None else None
        if node is not None:
            for pub in (self._state_pub, self._markers_pub):
                if pub is not None:
                    node.destroy_publisher(pub)
        self._state_pub = self._markers_pub = None

    def handle_event(self, event: Event) -> PluginResponse:
        """One ui_update. CapabilityDenied propagates (the host counts it); bad payloads come back
        as failures, audited and counted; other event types are ignored and counted."""
        if self.state is None:
            return PluginResponse.failure('ui is not initialised')
        if event.type != UPDATE:  # e.g. a robot.move on the same agent.*.action topic
            self.stats['ignored'] += 1
            return PluginResponse()
        self.ctx.require(Capability.UI_WRITE, detail=f'{UPDATE} {event.id} from '
                         f'{event.source or "?"}')
        why = audit_withholds(event)   # the audit is never erased: no one's words in it
        try:
            update = event.json()
            with self._lock:
                state = self.state.apply(update, event.source, event.timestamp_ms, why,
                                         subject_or_someone(event))
                lines = self.state.lines()
                # an anonymous update can leave an earlier subject's words on the screen
                withheld = why or self.state.lines_withheld()
                self._publish(state, lines)
        except UnicodeDecodeError:   # its message quotes a byte of the payload
            return self._rejected(event, 'payload is not JSON (not UTF-8)')
        except ValueError as exc:    # UiError, JSONDecodeError (says where, not what)
            return self._rejected(
                event, str(exc) if isinstance(exc, UiError) else f'payload is not JSON: {exc}')
        self.stats['updates'] += 1
        if withheld:
            self.ctx.audit('ui_update', event_id=event.id, source=event.source,
                           withheld=withheld, lines=len(lines))
        else:
            self.ctx.audit('ui_update', event_id=event.id, source=event.source,
                           update=update, lines=list(lines.values()))
        return PluginResponse()

    def _rejected(self, event: Event, reason: str) -> PluginResponse:
        self.stats['bad_input'] += 1
        self.ctx.audit('ui_rejected', event_id=event.id, source=event.source, error=reason)
        return PluginResponse.failure(reason)

    def health(self) -> HealthStatus:
        details = {k: str(v) for k, v in self.stats.items()}
        if self.state is None:
            return HealthStatus(HealthState.FAILED, 'not initialised', details)
        if self.ctx.ros_node is None:
            return HealthStatus(HealthState.DEGRADED, 'no ROS node: updates are checked and '
                                'audited but not published', details)
        return HealthStatus(HealthState.OK, '', details)

    # -- output ---------------------------------------------------------------------------
    def _publish(self, state: dict, lines: dict[int, str]) -> None:
        self.last_state = state
        self.stats['published'] += 1
        if self._state_pub is None:
            return
        from std_msgs.msg import String
        self._state_pub.publish(String(data=UiState.encode(state).decode()))
        self._markers_pub.publish(self.markers(lines))

    def markers(self, lines: dict[int, str]):
        """A MarkerArray: one TEXT_VIEW_FACING marker per line, DELETE for an empty line."""
        from builtin_interfaces.msg import Duration
        from visualization_msgs.msg import Marker, MarkerArray
        cfg = self.config
        sec, frac = divmod(cfg.lifetime_s, 1.0)
        array = MarkerArray()
        for marker_id in (FACE_ID, TEXT_ID):
            m = Marker()
            m.header.frame_id = cfg.frame_id   # stamp 0: rviz uses the latest transform
            m.ns, m.id = cfg.marker_ns, marker_id
            if marker_id not in lines:
                m.action = Marker.DELETE
                array.markers.append(m)
                continue
            m.type, m.action = Marker.TEXT_VIEW_FACING, Marker.ADD
            m.text = lines[marker_id]
            m.pose.position.z = cfg.height_m - marker_id * cfg.line_spacing_m
            m.pose.orientation.w = 1.0
            m.scale.z = cfg.text_size_m
            m.color.r, m.color.g, m.color.b, m.color.a = cfg.color
            m.lifetime = Duration(sec=int(sec), nanosec=int(round(frac * 1e9)) % 1_000_000_000)
            m.frame_locked = True
            array.markers.append(m)
        return array
