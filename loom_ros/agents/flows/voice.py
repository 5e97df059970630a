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
Settings: `zenoh_connect` (list of endpoints of the Zenoh router the cloud tier uses; [] = no
cloud: Hybrid answers stay local, marked as fallback), `cloud_budget_ms` (1000),
`grammar_confidence` (0.75: the local intent's confidence for a grammar match, weak evidence since
pocketsphinx maps any speech onto the closest phrase), `event_type` for the router (speech.utterance), `tool`, `tts` plugin names.
"""
from __future__ import annotations

import logging
import time

from loom_ros.agents.flows.link import FlowError, FlowLink
from loom_ros.bus.event import Event
from loom_ros.bus.privacy import effective_privacy
from loom_ros.telemetry import tracing

PARTIAL, UTTERANCE = 'speech.partial', 'speech.utterance'
# The local intent of each grammar phrase (config/speech.yaml); anything else is `unknown`.
PHRASE_INTENTS = {'what is the weather in <city>': 'weather', 'what time is it': 'time',
                  'hello robot': 'greeting', 'stop': 'stop', 'stop moving': 'stop'}
MOVE_WORDS = ('go', 'turn', 'come', 'follow', 'wait')


def local_intent(phrase: str) -> str:
    if phrase in PHRASE_INTENTS:
        return PHRASE_INTENTS[phrase]
    return 'move' if phrase.split(' ', 1)[0] in MOVE_WORDS else 'unknown'


class VoiceBehavior:

    def setup(self, settings: dict) -> None:
        self.zenoh_connect = list(settings.get('zenoh_connect', []))
        self.cloud_budget_ms = float(settings.get('cloud_budget_ms', 1000.0))
        self.grammar_confidence = float(settings.get('grammar_confidence', 0.75))
        self.event_type = str(settings.get('event_type', UTTERANCE))
        self.tool = str(settings.get('tool', 'weather'))
        self.tts = str(settings.get('tts', 'tts'))
        # Who this robot is on Zenoh and to the cloud (mutual TLS and signed requests), from the
        # fleet's keys folder; zenoh_insecure: plain TCP (logged as a warning when opened).
        self.keys_dir = str(settings.get('keys_dir', '~/.loom/keys'))
        self.identity = str(settings.get('identity', 'robot1'))
        self.zenoh_insecure = settings.get('zenoh_insecure', False) is True
        if self.zenoh_insecure and self.zenoh_connect:
            from loom_ros.bridge.zenoh_link import INSECURE_WARNING
            logging.getLogger('loom.voice').warning(f'voice cloud link: {INSECURE_WARNING}')
        self._cloud = None
        self._cloud_error = ''

    def _cloud_client(self):
        """A CloudClient on its own Zenoh session (made once), with the local embedder so
        Sensitive speech goes up as a vector; None (and why) when no cloud is configured."""
        if self._cloud is not None or not self.zenoh_connect:
            return self._cloud
        import zenoh

        from loom_ros.agents.embedding import MiniLMEmbedder
        from loom_ros.bridge.zenoh_link import session_config, transport_identity
        from loom_ros.cloud.client import CloudClient
        from loom_ros.security.keys import CredentialsError
        try:
            identity = transport_identity(self.zenoh_insecure, self.keys_dir, self.identity)
            session = zenoh.open(session_config('client', self.zenoh_connect, identity=identity))
        except (zenoh.ZError, CredentialsError, ValueError) as exc:
            self._cloud_error = f'cannot open a Zenoh session to {self.zenoh_connect}: {exc}'
            return None
        try:
            self._cloud = CloudClient.from_keys(session, self.keys_dir, self.identity,
                                                embedder=MiniLMEmbedder())
        except CredentialsError as exc:
            session.close()
            self._cloud_error = f'no credentials to sign cloud requests: {exc}'
            return None
        return self._cloud

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
        from loom_ros.cloud.client import InferenceRequest, execute_route
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
        link = FlowLink.shared()
        decision = link.route(event, self.event_type, ctx.agent_id, confidence=confidence)
        routes = ctx.state.setdefault('routes', {})
        routes[decision.route] = routes.get(decision.route, 0) + 1
        ctx.state['last_reason'] = f'{decision.rule}: {decision.reason}'

        def local(_request):
            return {'intent': intent, 'confidence': confidence}, confidence
        cloud = self._cloud_client()
        with tracing.span(tracing.CLOUD_REQUEST if decision.route in ('cloud', 'hybrid')
                          else tracing.LOCAL_INFERENCE, attributes={'loom.route': decision.route}):
            result = execute_route(decision, InferenceRequest(
                'intent', text, effective_privacy(event), self.cloud_budget_ms, self.event_type,
                decision.decision_id), local, cloud, report=link.report)
        refined = str(result.answer.get('intent', intent))
        ctx.intent(refined, {'text': text, 'slots': heard.get('slots', {}), 'local': intent,
                             'route': decision.route, 'backend': result.backend,
                             'confidence': round(result.confidence, 3),
                             'fallback': result.fallback,
                             'cloud_error': result.cloud_error or self._cloud_error,
                             'reason': decision.reason, 'source_event': event.id})
        intents = ctx.state.setdefault('intents', {})
        intents[refined] = intents.get(refined, 0) + 1
        answer = self._answer(refined, heard, event, link)
        if answer is None:
            return
        with tracing.span('SpeakAnswer', attributes={'loom.plugin': self.tts}):
            said = link.plugin(self.tts).handle_event(Event.with_json(
                'tts.say', {'text': answer}, source=f'agent/{ctx.agent_id}',
                privacy=effective_privacy(event)))
        if not said.ok or not said.events:
            raise FlowError(f'{self.tts} could not speak the answer: {said.error}')
        done = said.events[0].json()
        spoken_ms = time.time() * 1000.0
        ctx.action('ui_update', {'text': answer, 'source_event': event.id})
        ctx.intent('answer.spoken', {
            'text': answer, 'path': done['path'], 'duration_s': done['duration_s'],
            'intent': refined, 'heard': text, 'source_event': event.id,
            'agent_feedback_ms': round(feedback_ms - started, 2),
            'agent_answer_ms': round(spoken_ms - started, 2), 'spoken_at_ms': round(spoken_ms, 1)})
        ctx.state['answers'] = ctx.state.get('answers', 0) + 1

    def _answer(self, intent: str, heard: dict, event: Event, link: FlowLink) -> str | None:
        """The sentence to speak for an intent (a tool call for weather), None for no answer."""
        if intent == 'weather':
            query = {'city': heard.get('slots', {}).get('city')} \
                if heard.get('slots', {}).get('city') else {'text': heard.get('text', '')}
            with tracing.span('ToolCall', attributes={'loom.plugin': self.tool}):
                response = link.plugin(self.tool).handle_event(Event.with_json(
                    'tool.weather.query', query, source='agent/voice',
                    privacy=effective_privacy(event)))   # a derived event: the input's privacy
            if not response.ok or not response.events:
                return f'Sorry, I have no forecast: {response.error}'
            return response.events[0].json()['text']
        if intent == 'time':
            return time.strftime('It is %H:%M.')
        if intent == 'greeting':
            return 'Hello!'
        return None
