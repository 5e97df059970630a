"""The test harness's service calls (conftest.RosHarness.call): a lost answer is sent again, and
`settled` ends a call whose request took effect though its answer never came."""
from rclpy.task import Future


class LosesAnswers:
    """A service client whose answers never come (the DDS discovery race at its worst)."""

    def __init__(self):
        self.sent = 0
        self.dropped = 0

    def service_is_ready(self) -> bool:
        return True

    def call_async(self, _request) -> Future:
        self.sent += 1
        return Future()

    def remove_pending_request(self, _future) -> None:
        self.dropped += 1


def test_an_unanswered_call_is_sent_again_until_settled_says_it_took_effect(ros):
    client = LosesAnswers()
    result = ros.call(client, object(), 'a lossy service', resend_s=0.01,
                      settled=lambda: 'took effect' if client.sent >= 3 else None)
    assert result == 'took effect'
    assert client.sent == 3 and client.dropped == 3   # each unanswered request given up on


def test_an_answer_is_returned_as_it_came(ros):
    class Answers(LosesAnswers):
        def call_async(self, request):
            future = super().call_async(request)
            if self.sent == 2:   # the first answer was lost
                future.set_result(('answer to', request))
            return future
    client = Answers()
    assert ros.call(client, 'q', 'a service', resend_s=0.01) == ('answer to', 'q')
    assert client.sent == 2 and client.dropped == 1
