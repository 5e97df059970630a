"""FaceAgent (behavior `face`, Flow 1: real-time face emotion).

camera.front frame -> the `face_expression` plugin (face detector + expression model, called
in-process when a host here runs it) gives the local confidence -> the router decides (Local
when privacy allows and the confidence clears the threshold; the decision's rule and reason are
kept) -> `ui_update {emoji, label}` on agent.face.action, which the `ui` plugin shows on
loom/ui/state and as an rviz marker. The update carries `frame_ms` (the camera stamp), so anyone
reading loom/ui/state can measure camera-to-emoji latency.
Ports (AgentContext): the plugin, the router. Settings: `plugin` (face_expression), `event_type`
for the router (face.detected), `min_interval_ms`
(skip frames arriving faster; 0: none), `emojis` (label -> emoji overrides), `verdict_frames`
(4) and `verdict_gap_ms` (1000) for the outcomes.

Outcomes (router/outcomes, what the learned router trains on): there is no cloud face model to
check a local label against, so "was local good enough" is whether the label held: a frame's
label is good enough when the strict majority of the next `verdict_frames` face frames (each
within `verdict_gap_ms` of the one before, by the frames' own stamps, so a replay gives the same
verdicts for the same decided frames) show the same label; no majority, or a track that ends
first (nobody in view, a gap), gives no verdict. Each outcome is reported once its verdict is
known, `verdict_frames` frames later. It measures stability, not truth: a label that is wrong
for seconds on end counts as good enough.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace

from loom_ros.agents.behavior import PortError
from loom_ros.bus.event import Event
from loom_ros.router.history import Outcome
from loom_ros.telemetry import tracing

EMOJIS = {'happy': '😀', 'sad': '😢', 'angry': '😠', 'surprise': '😮', 'fear': '😨',
          'disgust': '🤢', 'neutral': '😐'}
NO_FACE = ''
MAX_BOXES = 16   # face boxes one ui_update carries (the ui state is bounded in bytes)


@dataclass
class _Pending:
    outcome: Outcome
    label: str
    stamp_ms: float
    after: list[str] = field(default_factory=list)   # labels of the face frames that followed


class LabelConsensus:
    """Verdicts on local labels from the frames that follow (see the module doc). Pure: the
    frames' stamps, no clock. `add` and `end` return the outcomes whose verdict is now known
    (None when there is none), oldest first."""

    def __init__(self, window: int = 4, max_gap_ms: float = 1000.0):
        self.window = max(1, int(window))
        self.max_gap_ms = float(max_gap_ms)
        self._pending: list[_Pending] = []

    def add(self, outcome: Outcome, label: str, stamp_ms: float) -> list[Outcome]:
        done = []
        if self._pending and not 0 <= stamp_ms - self._pending[-1].stamp_ms <= self.max_gap_ms:
            done = self.end()   # a gap (or a stamp going back): the track ended
        still = []
        for item in self._pending:
            item.after.append(label)
            if len(item.after) < self.window:
                still.append(item)
                continue
            top, count = Counter(item.after).most_common(1)[0]
            verdict = item.label == top if 2 * count > self.window else None
            done.append(replace(item.outcome, local_good_enough=verdict))
        self._pending = still + [_Pending(outcome, label, stamp_ms)]
        return done

    def end(self) -> list[Outcome]:
        """The track ended (nobody in view, a gap): what is pending gets no verdict."""
        done = [item.outcome for item in self._pending]
        self._pending = []
        return done


class FaceBehavior:

    def setup(self, settings: dict) -> None:
        self.plugin = str(settings.get('plugin', 'face_expression'))
        self.event_type = str(settings.get('event_type', 'face.detected'))
        self.min_interval_ms = float(settings.get('min_interval_ms', 0))
        self.emojis = {**EMOJIS, **dict(settings.get('emojis', {}))}
        self.plugins = (self.plugin,)   # what the host prepares a client for
        self._last_frame = 0.0
        self._showing = None
        self.consensus = LabelConsensus(int(settings.get('verdict_frames', 4)),
                                        float(settings.get('verdict_gap_ms', 1000.0)))

    def handle(self, event: Event, ctx) -> None:
        # One span for the agent's part, child of the frame's trace (or of the runtime's
        # HandleEvent span), so the plugin call, the routing and the ui_update hang under it.
        with tracing.span('FaceAgent', event, attributes={'loom.agent.id': ctx.agent_id}):
            self._handle(event, ctx)

    def _handle(self, event: Event, ctx) -> None:
        now = time.monotonic()
        if self.min_interval_ms and (now - self._last_frame) * 1000 < self.min_interval_ms:
            ctx.state['skipped'] = ctx.state.get('skipped', 0) + 1
            return
        self._last_frame = now
        started = time.perf_counter()
        with tracing.span(tracing.LOCAL_INFERENCE, attributes={'loom.plugin': self.plugin}):
            response = ctx.call(self.plugin, event)
        if not response.ok:
            ctx.state['plugin_errors'] = ctx.state.get('plugin_errors', 0) + 1
            raise PortError(f'{self.plugin} failed on frame {event.id}: {response.error}')
        ctx.state['frames'] = ctx.state.get('frames', 0) + 1
        if not response.events:   # nobody in view
            for outcome in self.consensus.end():
                ctx.report(outcome)
            if self._showing != NO_FACE:
                self._showing = NO_FACE
                # The ui merges updates: every field a face set is cleared (None), or the
                # screen would keep the last face's confidence, route and reason.
                ctx.action('ui_update', {
                    'emoji': None, 'label': 'no face', 'faces': 0, 'confidence': None,
                    'boxes': None, 'route': None, 'rule': None, 'reason': None,
                    'frame_ms': event.timestamp_ms, 'source_event': event.id})
            return
        result = response.events[0].json()
        decision = ctx.route(event, self.event_type, confidence=float(result['confidence']))
        routes = ctx.state.setdefault('routes', {})
        routes[decision.route] = routes.get(decision.route, 0) + 1
        ctx.state['last_reason'] = f'{decision.rule}: {decision.reason}'
        label = result['label']
        counts = ctx.state.setdefault('labels', {})
        counts[label] = counts.get(label, 0) + 1
        self._showing = label
        # Local, or a cloud route with no cloud face model: the local result is what we have.
        ctx.action('ui_update', {
            'emoji': self.emojis.get(label, '🙂'), 'label': label,
            'confidence': round(float(result['confidence']), 3), 'faces': len(result['faces']),
            # pixels x0, y0, x1, y1 of each face (at most MAX_BOXES), for a view of the frame
            'boxes': [f['box'] for f in result['faces'][:MAX_BOXES]
                      if isinstance(f, dict) and 'box' in f],
            'frame_ms': event.timestamp_ms, 'source_event': event.id,
            'route': decision.route, 'rule': decision.rule, 'reason': decision.reason})
        # The local label answered, whatever the route (no cloud face model); its verdict comes
        # with the frames that follow.
        outcome = Outcome(decision.decision_id, self.event_type, 'local',
                          (time.perf_counter() - started) * 1000.0, 0.0, True,
                          float(result['confidence']))
        for done in self.consensus.add(outcome, label, float(event.timestamp_ms)):
            ctx.report(done)
