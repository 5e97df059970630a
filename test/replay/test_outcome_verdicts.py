"""What agents report as "was local good enough" (RouteOutcome has_local_verdict /
local_good_enough) and `names_subject`, the training labels of `loom router train`: the face
flow's verdict from the frames that follow, the voice flow's from the cloud's answer, and the
agent context marking outcomes of events that named a data subject."""
from __future__ import annotations

from collections import deque

from harness import REPO
from loom_ros.agents.flows.face import LabelConsensus
from loom_ros.router.history import Outcome


def _outcome(i: int) -> Outcome:
    return Outcome(f'd{i}', 'face.detected', 'local', 1.0, 0.0, True, 0.9)


def _run(consensus, labels, stamps=None):
    verdicts = {}
    for i, label in enumerate(labels):
        stamp = stamps[i] if stamps else 100.0 * i
        for done in consensus.add(_outcome(i), label, stamp):
            verdicts[done.decision_id] = done.local_good_enough
    return verdicts


def test_a_label_is_good_enough_when_the_next_frames_settle_on_it():
    labels = ['happy', 'sad', 'happy', 'happy', 'happy', 'happy', 'sad', 'sad', 'happy', 'sad']
    verdicts = _run(LabelConsensus(window=3), labels)
    # d0 happy: next three happy/sad... sad, happy, happy -> happy (2 of 3): good
    # d1 sad: happy x3: not good; d2..d3 happy: happy majority; d4 happy: happy, sad, sad: not
    assert verdicts == {'d0': True, 'd1': False, 'd2': True, 'd3': True, 'd4': False,
                        'd5': False, 'd6': True}
    # No strict majority among the next frames: no verdict.
    tied = _run(LabelConsensus(window=2), ['happy', 'sad', 'angry', 'angry'])
    assert tied == {'d0': None, 'd1': False}


def test_a_track_that_ends_or_breaks_gives_no_verdict():
    consensus = LabelConsensus(window=3, max_gap_ms=500)
    # d0..d1 pending, then a gap of 2 s: they end without a verdict; d2.. start a new track.
    verdicts = _run(consensus, ['happy', 'happy', 'happy', 'happy'], [0, 100, 2100, 2200])
    assert verdicts == {'d0': None, 'd1': None}
    assert [o.local_good_enough for o in consensus.end()] == [None, None]   # nobody in view
    assert consensus.end() == []
    # A stamp going back (another camera, a replay restarting) also ends the track.
    back = LabelConsensus(window=1)
    assert _run(back, ['happy', 'happy'], [1000, 10]) == {'d0': None}


def test_the_voice_verdict_compares_local_with_the_clouds_intent():
    from loom_ros.agents.flows.voice import with_verdict
    from loom_ros.cloud.client import RouteResult

    def result(backend, intent, fallback=False):
        return RouteResult('hybrid', backend, {'intent': intent}, 0.9, 10.0, 0.004, fallback,
                           '', Outcome('d', 'speech.utterance', backend, 10.0, 0.004, True, 0.9))
    assert with_verdict(result('cloud', 'weather'), 'weather').local_good_enough is True
    assert with_verdict(result('cloud', 'time'), 'weather').local_good_enough is False
    assert with_verdict(result('local', 'weather', fallback=True),
                        'weather').local_good_enough is None   # the cloud did not answer
    assert with_verdict(result('local', 'weather'), 'weather').local_good_enough is None


class _Reports:
    """The router port: a real LocalRouter, keeping what was reported to it."""

    def __init__(self, router):
        self.router, self.reported = router, []

    def route(self, query):
        return self.router.route(query)

    def report(self, outcome):
        self.reported.append(outcome)
        self.router.report(outcome)


def test_outcomes_of_events_naming_a_subject_say_so(tmp_path):
    from loom_ros.agents.behavior import AgentContext, Ports
    from loom_ros.bus.event import Event
    from loom_ros.router.local import LocalRouter
    from loom_ros.router.policy import load_policy
    port = _Reports(LocalRouter(load_policy(REPO / 'config' / 'policy.yaml')))
    ctx = AgentContext('face', {}, deque(), lambda *a: None, ports=Ports(router=port))
    anon = Event(type='camera.front', payload=b'x')
    named = Event(type='camera.front', payload=b'x', metadata={'loom.subject': 'alice'})
    for event in (anon, named):
        answer = ctx.route(event, 'face.detected', confidence=0.9)
        ctx.report(Outcome(answer.decision_id, 'face.detected', 'local', 1.0, 0.0, True, 0.9))
    ctx.report(_outcome(99))   # a decision this context never made: marked (fail closed)
    assert [o.names_subject for o in port.reported] == [False, True, True]
