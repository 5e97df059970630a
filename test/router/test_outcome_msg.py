"""What an agent reports on router/outcomes keeps its verdict on the local answer and whether the
event named a data subject: the learned router trains on the first and asks consent for the
second (loom router train), so losing either on the way would mislabel or leak a row."""
from loom_ros.cloud.client import outcome_msg
from loom_ros.router.history import Outcome


def test_outcome_message_carries_the_verdict_and_the_subject_flag():
    base = dict(decision_id='d1', event_type='speech.utterance', backend='cloud',
                latency_ms=120.0, cost=0.002, success=True, confidence=0.8)
    unknown = outcome_msg(Outcome(**base))
    assert (unknown.has_local_verdict, unknown.local_good_enough, unknown.names_subject) == \
        (False, False, False)
    good = outcome_msg(Outcome(**base, local_good_enough=True, names_subject=True))
    assert (good.has_local_verdict, good.local_good_enough, good.names_subject) == \
        (True, True, True)
    bad = outcome_msg(Outcome(**base, local_good_enough=False))
    assert (bad.has_local_verdict, bad.local_good_enough) == (True, False)
    assert (bad.decision_id, bad.backend, bad.cost) == ('d1', 'cloud', 0.002)
