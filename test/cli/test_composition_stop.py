"""`loom bringup --composition` stops its nodes within COMPOSITION_STOP_S, and a step that fails
is reported (bring-up exits 1), not swallowed: found in review, `bounded()` counted a call that
raised as done (`within()` now says it raised), so an agent whose deactivate raised (its commits not acknowledged in time) made
the stop look clean while the nodes after it were never finalized. A real rclpy node and executor;
the agent that cannot stop is a stand-in raising what AgentStore.wait raises."""
from __future__ import annotations

import threading
from types import SimpleNamespace

from loom_ros.agents.runtime import AgentState
from loom_ros.cli.bringup import RobotProcess


class StuckAgent:
    id = 'stuck'
    lifecycle = AgentState.ACTIVE

    def deactivate(self):
        raise TimeoutError('agent stuck: 3 commits not acknowledged within 30.0 s')


def test_a_failed_step_is_reported_and_the_other_nodes_still_stop(ros):
    from rclpy.node import Node
    from rclpy.task import Future

    from loom_ros.bus.executor import make_executor
    node = Node('composition_stop_probe')
    exited = threading.Event()
    node.on_exit = exited.set
    executor = make_executor()
    executor.add_node(node)
    robot = object.__new__(RobotProcess)
    robot.nodes, robot.threads, robot._stops = [(node, executor)], [], [Future()]
    robot.deaths = {}
    robot.agents = SimpleNamespace(agents={'stuck': StuckAgent()})
    problems = robot.stop()
    assert problems == {'agent stuck': 'TimeoutError: agent stuck: 3 commits not '
                                       'acknowledged within 30.0 s'}
    assert not robot.left_running
    assert exited.is_set()            # the node after the stuck agent was still finalized
    assert robot._stops[0].done()


class HungAgent:
    id = 'hung'
    lifecycle = AgentState.ACTIVE

    def __init__(self):
        self.release = threading.Event()

    def deactivate(self):
        assert self.release.wait(60)


def test_a_stop_still_running_at_the_bound_is_said_and_flagged_for_the_exit(ros, monkeypatch):
    """An agent whose deactivate hangs past COMPOSITION_STOP_S: stop() returns with what is left
    and `left_running`, so bring-up does not shut rclpy down under the thread still stopping
    the nodes (it exits at once instead). Released, that thread still finalizes the node."""
    from rclpy.node import Node
    from rclpy.task import Future

    from loom_ros.bus.executor import make_executor
    from loom_ros.cli import bringup
    monkeypatch.setattr(bringup, 'COMPOSITION_STOP_S', 0.2)
    node = Node('composition_hang_probe')
    exited = threading.Event()
    node.on_exit = exited.set
    executor = make_executor()
    executor.add_node(node)
    hung = HungAgent()
    robot = object.__new__(RobotProcess)
    robot.nodes, robot.threads, robot._stops = [(node, executor)], [], [Future()]
    robot.deaths = {}
    robot.agents = SimpleNamespace(agents={'hung': hung})
    try:
        problems = robot.stop()
        assert problems == {'nodes': 'not stopped: still running after 0.2 s (left to the exit)'}
        assert robot.left_running and not exited.is_set()
    finally:
        hung.release.set()
    stopping = [t for t in threading.enumerate() if t.name == 'loom_bringup-stop']
    for thread in stopping:
        thread.join(60)
    assert exited.is_set()


def test_within_says_whether_the_call_returned_raised_or_still_runs():
    """The bound used for every teardown step: '' only for a call that returned; one that raised
    did not do its work and says what it raised; one still running says so (and is left to the
    exit on its daemon thread)."""
    from loom_ros.bus.executor import within
    done = []
    assert within(lambda: done.append(1), 10.0, 'returns') == '' and done == [1]

    def fails():
        raise TimeoutError('commits not acknowledged')
    assert within(fails, 10.0, 'raises') == "raised TimeoutError('commits not acknowledged')"
    never = threading.Event()
    try:
        assert within(never.wait, 0.05, 'hangs') == 'still running after 0.05 s'
    finally:
        never.set()
