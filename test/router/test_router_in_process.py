"""The router node's in-process port (what agents in its process use under `loom bringup
--composition`): the same decision path and history as its service, decisions published on
router/decisions, refused while inactive, usable from a worker thread."""
import threading

import pytest
from rclpy.parameter import Parameter

from loom_ros.bus.event import Privacy
from loom_ros.bus.qos import to_qos_profile
from loom_ros.router.history import Outcome
from loom_ros.router.local import RouteQuery, RouterRefused


@pytest.fixture
def router_node(ros, tmp_path):
    from loom_ros.router.router_node import RouterNode
    node = RouterNode(namespace='/rin', parameter_overrides=[
        Parameter('history_db', value=str(tmp_path / 'router.db')),
        Parameter('autostart', value=False)])
    ros.executor.add_node(node)
    yield node
    ros.executor.remove_node(node)
    node.trigger_shutdown()
    node.destroy_node()


def test_in_process_port_decides_publishes_and_refuses_when_inactive(ros, router_node):
    from loom_msgs.msg import RouteDecision
    port = router_node.in_process()
    query = RouteQuery(event_id='e1', event_type='speech.utterance', agent_id='voice',
                       privacy=Privacy.PUBLIC, local_confidence=0.7)
    with pytest.raises(RouterRefused, match='not active'):
        port.route(query)   # unconfigured: no history, no policy
    decisions = []
    ros.node.create_subscription(RouteDecision, '/rin/router/decisions', decisions.append,
                                 to_qos_profile('batched'))
    router_node.trigger_configure()
    with pytest.raises(RouterRefused, match='not active'):
        port.route(query)   # configured but inactive: refused like the service refuses
    router_node.trigger_activate()

    answers, errors = [], []

    def worker():   # a dispatcher worker thread, not the thread that opened the history
        try:
            answers.append(port.route(query))
            port.report(Outcome(answers[0].decision_id, 'speech.utterance', 'cloud', 240.0,
                                0.004, True, 0.95))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert errors == [] and len(answers) == 1
    answer = answers[0]
    # speech.utterance has threshold 0.85 in config/policy.yaml: 0.7 is Hybrid, as the service says
    assert (answer.route, answer.rule, answer.cloud_model) == ('hybrid', 'hybrid', 'intent-large')
    with pytest.raises(RouterRefused, match='event_type'):
        port.route(RouteQuery(event_id='e2', event_type=''))
    ros.wait_for(lambda: len(decisions) == 1, 'the in-process decision on router/decisions')
    assert decisions[0].decision_id == answer.decision_id
    assert decisions[0].privacy == int(Privacy.PUBLIC)
    local = router_node.local
    with local.lock:
        assert local.history.decisions == 1 and local.history.outcomes == 1
        assert local.history.spend() == pytest.approx(0.004)

    router_node.trigger_deactivate()
    with pytest.raises(RouterRefused, match='not active'):
        port.route(query)
