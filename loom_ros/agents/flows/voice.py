"""VoiceAgent (behavior `voice`, Flow 2: hybrid voice assistant).

mic.primary.speech (the `asr` plugin's output) ->
- `speech.partial`: `ui_update {text: "… words"}` at once (feedback while the user speaks);
- `speech.utterance`: `ui_update {text: "heard: …"}` at once (the local transcript), then the
  local intent (from the grammar phrase the recogniser matched) and its confidence go to the
  router, which decides (Hybrid when the confidence is between hybrid_floor and the threshold) ->
  `execute_route`: the local answer now, refined by the cloud tier's intent classifier over
  Zenoh (Sensitive speech goes up only as an embedding made here) -> the intent on
  agent.voice.intent -> a `weather` tool call (in-process or the plugin host's service) -> the
  `tts` plugin speaks the answer to a WAV -> `answer.spoken` intent {path, text, timings} and the
  answer on the UI.
Ports (AgentContext): the router, the plugins (tool, tts), the host's cloud client. Settings:
`cloud_budget_ms` (1000), `grammar_confidence` (0.75: the local intent's confidence for a grammar
match, weak evidence since pocketsphinx maps any speech onto the closest phrase), `event_type` for
the router (speech.utterance), `tool`, `tts` plugin names. Which cloud (`zenoh_connect`: [] = no
cloud, Hybrid answers stay local and are marked as fallback; `keys_dir`, `identity`,
`zenoh_insecure`) is the host's to connect (agents/flows/cloud.py): no session is opened here.
"""
from __future__ import annotations

import time
from dataclasses import replace

from loom_ros.agents.behavior import PortError
from loom_ros.bus.event import Event
from loom_ros.bus.privacy import SUBJECT_METADATA_KEY, effective_privacy
from loom_ros.cloud.client import InferenceRequest, execute_route
from loom_ros.telemetry import tracing

PARTIAL, UTTERANCE = 'speech.partial', 'speech.utterance'
# The local intent of each grammar phrase (config/speech.yaml); anything else is `unknown`.
PHRASE_INTENTS = {'what is the weather in <city>': 'weather', 'what time is it': 'time',
                  'hello robot': 'greeting', 'stop': 'stop', 'stop moving': 'stop'}
MOVE_WORDS = ('go', 'turn', 'come', 'follow', 'wait')


def subject_of(event: Event) -> dict:
    """The data-subject metadata of `event`, for what is made from it (a spoken answer is as
    much the person's as the question: erasure finds its WAV by it)."""
    metadata = event.metadata if isinstance(event.metadata, dict) else {}
    return {SUBJECT_METADATA_KEY: metadata[SUBJECT_METADATA_KEY]} \
        if SUBJECT_METADATA_KEY in metadata else {}


def local_intent(phrase: str) -> str:
    if phrase in PHRASE_INTENTS:
        return PHRASE_INTENTS[phrase]
    return 'move' if phrase.split(' ', 1)[0] in MOVE_WORDS else 'unknown'


def with_verdict(result, local: str):
    """The route's outcome, saying whether the local intent was good enough when the cloud's
    intent classifier answered too (the reference: local == cloud). A local or fallback answer
    has nothing to compare with: no verdict (so the events the rules trusted locally are never
    labelled, a selection bias docs/replay.md names)."""
    if result.backend != 'cloud' or result.fallback:
        return result.outcome
    return replace(result.outcome,
                   local_good_enough=str(result.answer.get('intent', '')) == local)


NO_FORECAST = 'Sorry, I have no forecast for that.'   # what a failed weather call says


class VoiceBehavior:

    def setup(self, settings: dict) -> None:
        self.cloud_budget_ms = float(settings.get('cloud_budget_ms', 1000.0))
        self.grammar_confidence = float(settings.get('grammar_confidence', 0.75))
        self.event_type = str(settings.get('event_type', UTTERANCE))
        self.tool = str(settings.get('tool', 'weather'))
        self.tts = str(settings.get('tts', 'tts'))
        self.plugins = (self.tool, self.tts)   # what the host prepares clients for

    def handle(self, event: Event, ctx) -> None:
        with tracing.span('VoiceAgent', event, attributes={'loom.agent.id': ctx.agent_id,
                                                             'loom.event.type': event.type}):
            if event.type == PARTIAL:
                text = event.json().get('text', '')
                if text:
                    ctx.action('ui_update', {'text': f'… {text}', 'source_event': event.id})
            elif event.type == UTTERANCE:
                self._utterance(event, ctx)

    def _utterance(self, event: Event, ctx) -> None:
        started = time.time() * 1000.0
        heard = event.json()
        text, phrase = heard.get('text', ''), heard.get('phrase', '')
        ctx.action('ui_update', {'text': f'heard: {text}', 'source_event': event.id})
        feedback_ms = time.time() * 1000.0
        intent = local_intent(phrase)
        # The local intent's confidence: a grammar match is weak but real evidence (a fixed
        # prior, `grammar_confidence`); pocketsphinx's posterior on it is not calibrated.
        confidence = self.grammar_confidence if intent != 'unknown' else \
            min(float(event.confidence), self.grammar_confidence)
        decision = ctx.route(event, self.event_type, confidence=confidence)
        routes = ctx.state.setdefault('routes', {})
        routes[decision.route] = routes.get(decision.route, 0) + 1
        ctx.state['last_reason'] = f'{decision.rule}: {decision.reason}'

        def local(_request):
            return {'intent': intent, 'confidence': confidence}, confidence
        to_cloud = decision.route in ('cloud', 'hybrid')
        with tracing.span(tracing.CLOUD_REQUEST if to_cloud else tracing.LOCAL_INFERENCE,
                          attributes={'loom.route': decision.route}):
            # A cloud link the host is still opening is waited for, within the budget.
            asked = time.perf_counter()
            cloud, cloud_error = ctx.cloud(self.cloud_budget_ms / 1000.0 if to_cloud else 0.0)
            budget_ms = self.cloud_budget_ms - (time.perf_counter() - asked) * 1000.0
            result = execute_route(decision, InferenceRequest(
                'intent', text, effective_privacy(event), max(0.0, budget_ms), self.event_type,
                decision.decision_id, subject_ref=ctx.subject_ref(event)), local, cloud,
                report=None)
        refined = str(result.answer.get('intent', intent))
        ctx.report(with_verdict(result, intent))
        ctx.intent(refined, {'text': text, 'slots': heard.get('slots', {}), 'local': intent,
                             'route': decision.route, 'backend': result.backend,
                             'confidence': round(result.confidence, 3),
                             'fallback': result.fallback,
                             'cloud_error': result.cloud_error and (
                                 f'{result.cloud_error} ({cloud_error})' if cloud_error
                                 else result.cloud_error),
                             'reason': decision.reason, 'source_event': event.id})
        intents = ctx.state.setdefault('intents', {})
        intents[refined] = intents.get(refined, 0) + 1
        answer = self._answer(refined, heard, event, ctx)
        if answer is None:
            return
        with tracing.span('SpeakAnswer', attributes={'loom.plugin': self.tts}):
            said = ctx.call(self.tts, Event.with_json(
                'tts.say', {'text': answer}, source=f'agent/{ctx.agent_id}',
                privacy=effective_privacy(event), metadata=subject_of(event)))
        if not said.ok or not said.events:
            raise PortError(f'{self.tts} could not speak the answer: {said.error}')
        done = said.events[0].json()
        spoken_ms = time.time() * 1000.0
        ctx.action('ui_update', {'text': answer, 'source_event': event.id})
        ctx.intent('answer.spoken', {
            'text': answer, 'path': done['path'], 'duration_s': done['duration_s'],
            'intent': refined, 'heard': text, 'source_event': event.id,
            'agent_feedback_ms': round(feedback_ms - started, 2),
            'agent_answer_ms': round(spoken_ms - started, 2), 'spoken_at_ms': round(spoken_ms, 1)})
        ctx.state['answers'] = ctx.state.get('answers', 0) + 1

    def _answer(self, intent: str, heard: dict, event: Event, ctx) -> str | None:
        """The sentence to speak for an intent (a tool call for weather), None for no answer."""
        if intent == 'weather':
            query = {'city': heard.get('slots', {}).get('city')} \
                if heard.get('slots', {}).get('city') else {'text': heard.get('text', '')}
            with tracing.span('ToolCall', attributes={'loom.plugin': self.tool}):
                response = ctx.call(self.tool, Event.with_json(
                    'tool.weather.query', query, source=f'agent/{ctx.agent_id}',
                    privacy=effective_privacy(event)))   # a derived event: the input's privacy
            if not response.ok or not response.events:
                # Fixed words, never the tool's error: it quotes the slot heard, and a forged
                # utterance had the robot announce a fire alarm through it. The reason is kept.
                ctx.state['tool_failures'] = ctx.state.get('tool_failures', 0) + 1
                ctx.state['last_tool_error'] = str(response.error)[:200]
                return NO_FORECAST
            return response.events[0].json()['text']
        if intent == 'time':
            return time.strftime('It is %H:%M.')
        if intent == 'greeting':
            return 'Hello!'
        return None
