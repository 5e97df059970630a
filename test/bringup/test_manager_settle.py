"""The lifecycle manager's settling of an agent host's configure or activate whose answer did
not come (DDS's reply-matching race can lose it: loom_ros/bus/replies.py): get_state, safe to
repeat, is asked SETTLE_S after the request and again at most every SETTLE_S; an answer at the
transition's target moves the phase on as if answered. The manager's own `_settle` on its own
bookkeeping (`_Managed`), with stand-ins for the two rclpy clients and an injected `now`."""
from types import SimpleNamespace

from lifecycle_msgs.msg import State
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.task import Future

from loom_ros.bringup.lifecycle_manager_node import SETTLE_S, LifecycleManagerNode, _Managed


class Client:
    """An rclpy client as `_settle` uses it: futures the test answers, and what was dropped."""

    def __init__(self):
        self.futures, self.removed = [], []

    def call_async(self, request):
        self.futures.append(Future())
        return self.futures[-1]

    def remove_pending_request(self, future):
        self.removed.append(future)


class Manager:
    """What `_settle` reads of its node: the message types and a logger."""
    _types = (ChangeState, GetState)

    def __init__(self):
        self.lines = []

    def get_logger(self):
        manager = self

        class Log:
            def info(self, text):
                manager.lines.append(text)
        return Log()


def managed(phase):
    m = _Managed(unit=SimpleNamespace(node='agent_face'))
    m.phase, m.phase_since = phase, 100.0
    m.get_state, m.change_state = Client(), Client()
    m.future = m.change_state.call_async(ChangeState.Request())   # sent, never answered
    return m


def state(label):
    return GetState.Response(current_state=State(label=label))


def test_a_configure_unanswered_is_settled_by_get_state_at_its_target():
    manager, m = Manager(), managed('configuring')
    sent = m.future
    LifecycleManagerNode._settle(manager, m, 100.0 + SETTLE_S / 2)
    assert m.get_state.futures == []                     # not yet: it may just be slow
    LifecycleManagerNode._settle(manager, m, 100.0 + SETTLE_S)
    assert len(m.get_state.futures) == 1
    m.get_state.futures[0].set_result(state('configuring'))   # not there yet
    LifecycleManagerNode._settle(manager, m, 100.0 + SETTLE_S + 0.1)
    LifecycleManagerNode._settle(manager, m, 100.0 + SETTLE_S + 0.5)
    assert len(m.get_state.futures) == 1 and m.future is sent   # asked at most every SETTLE_S
    LifecycleManagerNode._settle(manager, m, 100.0 + 2 * SETTLE_S + 0.1)
    assert len(m.get_state.futures) == 2
    m.get_state.futures[1].set_result(state('inactive'))
    LifecycleManagerNode._settle(manager, m, 100.0 + 2 * SETTLE_S + 0.2)
    assert m.future is not sent and m.future.done() and m.future.result().success
    assert m.change_state.removed == [sent]
    assert 'configure took effect' in manager.lines[0]


def test_an_activate_is_not_settled_by_another_state_and_an_unanswered_ask_is_replaced():
    manager, m = Manager(), managed('activating')
    sent = m.future
    LifecycleManagerNode._settle(manager, m, 100.0 + SETTLE_S)
    first = m.get_state.futures[0]   # never answered: dropped and asked again
    LifecycleManagerNode._settle(manager, m, 100.0 + 2 * SETTLE_S)
    assert m.get_state.removed == [first] and len(m.get_state.futures) == 2
    m.get_state.futures[1].set_result(state('inactive'))   # an activate's target is active
    LifecycleManagerNode._settle(manager, m, 100.0 + 2 * SETTLE_S + 0.1)
    assert m.future is sent and not m.future.done() and manager.lines == []
    # A phase change drops what is still asked.
    LifecycleManagerNode._settle(manager, m, 100.0 + 3 * SETTLE_S + 0.1)
    asked = m.get_state.futures[-1]
    LifecycleManagerNode._enter(manager, m, 'running', 104.0)
    assert m.settle is None and m.get_state.removed[-1] is asked
