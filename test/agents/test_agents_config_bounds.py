"""agents.yaml entries that loaded and then broke the node, refused at load naming the file, the
agent and the key: an id too long for its topics (an uncaught TopicNameError, configure ERROR
with nothing logged), an unknown qos (activate ERROR, nothing logged), a mailbox_size past the
heartbeat's uint32 (every status publish failed), unbounded or non-integer sizes, and keys or
ids given twice. The node logs why whenever configure or activate fails."""
import pytest

from harness import REPO
from loom_ros.agents.config import (MAX_AGENT_ID, MAX_MAILBOX_SIZE, MAX_WORKING_MEMORY,
                                    AgentConfigError, load_agents)

ENTRY = 'agents:\n  - id: {id}\n    behavior: counter\n    subscriptions: [sensor.imu]\n{extra}'


def write(tmp_path, id='a', extra=''):
    path = tmp_path / 'agents.yaml'
    path.write_text(ENTRY.format(id=id, extra=extra))
    return path


def refused(path) -> str:
    with pytest.raises(AgentConfigError) as info:
        load_agents(path)
    message = str(info.value)
    assert message.startswith(f'{path}: '), message
    return message


def test_an_id_is_bounded_so_its_topics_are_valid(tmp_path):
    longest = 'a' * MAX_AGENT_ID
    assert list(load_agents(write(tmp_path, longest))) == [longest]
    message = refused(write(tmp_path, 'a' * 250))
    assert f'agents[0].id: String should have at most {MAX_AGENT_ID} characters (agent ' \
        f"{'a' * 80!r})" in message, message
    # the pattern lets `__` through; ROS names refuse it, in the agent's topics
    message = refused(write(tmp_path, 'a__b'))
    assert 'agent a__b: id: invalid Loom topic' in message, message


def test_qos_is_checked_with_the_bus_levels(tmp_path):
    message = refused(write(tmp_path, extra='    qos: nonsense\n'))
    assert "agents[0].qos: " in message and "unknown QoS level 'nonsense'" in message
    assert message.endswith("(agent 'a')"), message
    assert load_agents(write(tmp_path, extra='    qos: Realtime\n'))['a'].qos == 'realtime'


@pytest.mark.parametrize('key, top', [('mailbox_size', MAX_MAILBOX_SIZE),
                                      ('working_memory', MAX_WORKING_MEMORY)])
@pytest.mark.parametrize('value, why', [
    ('5000000000', 'less than or equal to'), ('1000000000000000000', 'less than or equal to'),
    ('"5"', 'valid integer'), ('true', 'valid integer'), ('2.0', 'valid integer'),
    ('0', 'greater than or equal to 1'),
], ids=['5e9', '1e18', 'string', 'bool', 'float', 'zero'])
def test_sizes_are_strict_bounded_integers(tmp_path, key, top, value, why):
    message = refused(write(tmp_path, extra=f'    {key}: {value}\n'))
    assert f'agents[0].{key}: ' in message and why in message, message
    assert message.endswith("(agent 'a')"), message
    assert getattr(load_agents(write(tmp_path, extra=f'    {key}: {top}\n'))['a'], key) == top


def test_ids_and_keys_given_twice_are_refused(tmp_path):
    path = tmp_path / 'agents.yaml'
    path.write_text('agents:\n  - {id: a, behavior: counter, subscriptions: [x]}\n'
                    '  - {id: a, behavior: counter, subscriptions: [y]}\n')
    assert "agents[1].id: duplicate agent id 'a'" in refused(path)
    message = refused(write(tmp_path, extra='    id: b\n'))
    assert "line 5: key 'id' given twice in one mapping (first on line 2)" in message, message
    path.write_text('agents: []\nagents:\n  - {id: z, behavior: counter, subscriptions: [x]}\n')
    assert "key 'agents' given twice" in refused(path)


def test_the_shipped_agents_file_loads():
    assert 'counter' in load_agents(REPO / 'config' / 'agents.yaml')


class ErrorLog:
    """The node's logger, keeping what it logs as errors."""

    def __init__(self, logger):
        self.logger, self.errors = logger, []

    def __getattr__(self, name):
        return getattr(self.logger, name)

    def error(self, message, **kwargs):
        self.errors.append(message)
        return self.logger.error(message, **kwargs)


@pytest.fixture
def agent_node(ros, tmp_path):
    """`make(agents_file)` -> an AgentNode hosting every agent of the file, its errors kept in
    node.log.errors; shut down and destroyed after the test."""
    from rclpy.parameter import Parameter

    from loom_ros.agents.agent_node import AgentNode
    made = []

    def make(path):
        node = AgentNode(node_name=f'bounds_{len(made)}', namespace='/ag_bounds',
                         parameter_overrides=[
                             Parameter('agents', value='*'), Parameter('autostart', value=False),
                             Parameter('agents_file', value=str(path)),
                             Parameter('storage.root', value=str(tmp_path / 'root'))])
        made.append(node)
        log = node.log = ErrorLog(node.get_logger())
        node.get_logger = lambda: log
        return node
    yield make
    for node in made:
        node.trigger_shutdown()
        node.destroy_node()


@pytest.mark.parametrize('id, extra, key', [
    ('a' * 250, '', 'agents[0].id'),
    ('a', '    qos: nonsense\n', 'agents[0].qos'),
    ('a', '    mailbox_size: 5000000000\n', 'agents[0].mailbox_size'),
], ids=['long_id', 'qos', 'mailbox_past_uint32'])
def test_configure_refuses_a_bad_agents_file_and_logs_why(agent_node, tmp_path, id, extra, key):
    from rclpy.lifecycle import TransitionCallbackReturn
    path = write(tmp_path, id, extra)
    node = agent_node(path)
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert any(str(path) in e and key in e for e in node.log.errors), node.log.errors


def test_a_failing_activate_logs_why(agent_node, tmp_path):
    from rclpy.lifecycle import TransitionCallbackReturn
    node = agent_node(write(tmp_path))
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS

    def subscribe(*args, **kwargs):
        raise ValueError('no subscription for you')
    node.bus.subscribe = subscribe
    assert node.trigger_activate() == TransitionCallbackReturn.ERROR
    assert any('cannot activate: ValueError: no subscription for you' in e
               for e in node.log.errors), node.log.errors
