"""An agent host that routes in-process asks `<ns>/router/get_parameters` which policy file the
router runs (agents/flows/link.py RouterPolicyFollower). Whoever answers there is not trusted
with anything but a bounded path: a node posing as the router that answers a 10,000-character
path, or a number, is counted as a failure and changes nothing (routing stays on the
router/route service); once it answers a usable path the host follows it."""
from rcl_interfaces.msg import Parameter, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.node import Node

from loom_ros.agents.flows.link import NodePorts, RouterPolicyFollower


def _set(ros, setter, value: ParameterValue):
    return ros.call(setter, SetParameters.Request(
        parameters=[Parameter(name='policy_file', value=value)]),
        'posing router set_parameters').results[0]


def test_an_oversize_or_non_string_policy_file_answer_is_refused_and_counted(ros):
    ns = '/pf_hostile'
    oversize = '/' + 'a' * (RouterPolicyFollower.MAX_PATH + 10)
    # The impostor: any node may call itself <ns>/router; its parameter is what it answers.
    router = Node('router', namespace=ns, context=ros.node.context,
                  allow_undeclared_parameters=True)
    router.declare_parameter('policy_file', oversize,
                             ignore_override=True)
    ros.executor.add_node(router)
    host = Node('agent_host_0', namespace=ns, context=ros.node.context)
    ros.executor.add_node(host)
    ports = NodePorts(host, follow_router=True)
    setter = ros.node.create_client(SetParameters, f'{ns}/router/set_parameters')
    follower = ports.follower
    try:
        ports.gate.open()
        ros.wait_for(lambda: follower.failures >= 1, 'the oversize answer to be refused')
        assert follower.answers >= 1 and not follower.known
        assert follower.path is None and ports.router.local is None   # still the service
        # A number where a path belongs: refused the same way (the follower asks again on
        # every /parameter_events change of <ns>/router, which set_parameters publishes).
        router.undeclare_parameter('policy_file')
        router.declare_parameter('policy_file', 7, ignore_override=True)
        failures = follower.failures
        ros.wait_for(lambda: follower.failures > failures, 'the non-string answer to be refused')
        assert not follower.known and ports.router.local is None
        # A usable answer ('' = the shipped policy) is followed.
        router.undeclare_parameter('policy_file')
        router.declare_parameter('policy_file', 'placeholder', ignore_override=True)
        assert _set(ros, setter, ParameterValue(type=4, string_value='')).successful
        ros.wait_for(lambda: follower.path == '', 'the shipped policy to be followed')
        assert ports.router.local is not None
    finally:
        ports.close()
        ros.node.destroy_client(setter)
        for node in (host, router):
            ros.executor.remove_node(node)
            node.destroy_node()
