"""Shared set-up: one rclpy context and test node per session, a private DDS domain per run,
and helpers that wait on conditions (never on fixed sleeps)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Before rclpy is imported anywhere: keep this run's DDS traffic to itself.
# Under pytest-xdist each worker gets its own domain (the controller's, inherited, plus the
# worker's number), so tests running side by side never see each other's topics.
# A run takes a block of four (100, 104, ... 228): its own, and up to three workers' (+1 to +3),
# so neither a worker nor another run can land on a domain in use; Fast DDS's ids end at 232.
_WORKER = os.environ.get('PYTEST_XDIST_WORKER', '')
os.environ.setdefault('ROS_DOMAIN_ID', str(100 + os.getpid() % 33 * 4))
if _WORKER.startswith('gw') and _WORKER[2:].isdigit():
    _DOMAIN = int(os.environ['ROS_DOMAIN_ID']) + 1 + int(_WORKER[2:])
    if int(_WORKER[2:]) > 2 or _DOMAIN > 232:
        raise RuntimeError(f'test worker {_WORKER}: the suite runs on at most 3 workers (make '
                           f'test: 2), each on DDS domain ROS_DOMAIN_ID + 1 + its number <= 232; '
                           f'this one would be {_DOMAIN}')
    os.environ['ROS_DOMAIN_ID'] = str(_DOMAIN)
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
# The test process and every process it starts run under Loom's Fast DDS profile, as bring-up
# gives each node. Without it the test process's shared-memory segment (512 KB) is smaller than
# the frames and megabyte events it publishes: reliable samples then wait on repairs, and under
# CI load one waited past a minute (test_logs_hostile, stop 24).
from loom_ros.bus.qos import fastdds_environment  # noqa: E402

os.environ.update(fastdds_environment(os.environ, Path(__file__).resolve().parents[1] / 'config'))
# Every Python process the tests start prints its threads' stacks on a fatal signal (a hang
# that a test ends with SIGABRT says where it was).
os.environ['PYTHONFAULTHANDLER'] = '1'

from harness import REPO, WAIT_LIMIT_S, loom_cli  # noqa: E402,F401  (re-exported for fixtures)
from harness import work_unit  # noqa: E402

# Property tests must not depend on timing: hypothesis' default 200 ms deadline per example fails
# tests on a loaded 2-core machine (CI runs the whole suite on one).
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile('loom', deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile('loom')


class RosHarness:
    """A node in the test process plus a way to spin it until a condition holds."""

    def __init__(self, node, executor):
        self.node = node
        self.executor = executor

    def wait_for(self, condition, what: str, limit: float = WAIT_LIMIT_S, spin=None,
                 alive=()):
        """Spin until `condition()`; fail at `limit`, or at once if a process in `alive` failed."""
        deadline = time.monotonic() + limit
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f'timed out after {limit:.0f} s waiting for {what}')
            for proc in alive:
                if proc.popen.poll() not in (None, 0):
                    code, out, err = proc.finish()
                    pytest.fail(f'{proc.args} exited with {code} while waiting for {what}:\n'
                                f'{out}\n{err}')
            if spin is not None:
                spin()
            self.spin_once()

    stale_callbacks = 0

    def spin_once(self, timeout_sec: float = 0.02) -> None:
        """One turn of the session's executor. A callback of a node an earlier test destroyed
        (its timer event already queued when it was removed) raises InvalidHandle here under
        load; that is the session's leftover, not this test's failure: counted, skipped."""
        from rclpy._rclpy_pybind11 import InvalidHandle
        try:
            self.executor.spin_once(timeout_sec=timeout_sec)
        except InvalidHandle:
            self.stale_callbacks += 1

    def call(self, client, request, what: str, resend_s: float = 5.0, limit: float = WAIT_LIMIT_S,
             alive=(), settled=None):
        """A service call that survives DDS's discovery race: `service_is_ready` can be true
        before the server's reply writer has matched our reply reader, and that reply is lost.
        Waits for the service, then sends again every `resend_s` until one answer comes: only
        for requests that are safe to repeat (queries, get_state, get_parameters, and the
        lifecycle manager's Trigger services, which answer a repeat as they did the first).
        `settled()`, when given, is asked each time no answer came in time: anything but None
        ends the call with it (the request took effect, only its answer was lost), None sends
        the request again."""
        self.wait_for(client.service_is_ready, f'the {what} service', limit=limit, alive=alive)
        deadline = time.monotonic() + limit
        while True:
            future = client.call_async(request)
            resend = min(deadline, time.monotonic() + resend_s)
            self.wait_for(lambda: future.done() or time.monotonic() >= resend, what,
                          limit=limit, alive=alive)
            if future.done():
                return future.result()
            client.remove_pending_request(future)
            if settled is not None and (result := settled()) is not None:
                return result
            if time.monotonic() >= deadline:
                pytest.fail(f'timed out after {limit:.0f} s waiting for {what} to answer')

    def first_exchange(self, client, alive=()):
        """A client's first exchange as Loom's own clients make it (loom_ros/bus/replies.py):
        the service's empty request, sent again until answered. Its answer proves the reply
        path for the one-shot requests after it; Loom's servers answer it with nothing done."""
        return self.call(client, client.srv_type.Request(), f'{client.srv_name}: a probe',
                         resend_s=1.0, alive=alive)

    def transition(self, change, get_state, transition: int, goal: str, what: str,
                   resend_s: float = 5.0, limit: float = WAIT_LIMIT_S, alive=()) -> bool:
        """A lifecycle transition that survives the same race (a transition is not safe to
        send twice): when no answer comes within `resend_s`, get_state (safe to repeat) says
        whether it happened; at `goal` it did (True), else it is sent again. False only when
        the node answered that it refused."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState, GetState

        def reached():
            state = self.call(get_state, GetState.Request(), f'{what}: get_state', alive=alive)
            return True if state.current_state.label == goal else None
        answer = self.call(change, ChangeState.Request(transition=Transition(id=transition)),
                           what, resend_s, limit, alive, settled=reached)
        return answer is True or answer.success


@pytest.hookimpl(optionalhook=True)   # a hook of pytest-xdist, absent under -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` by work_unit. xdist's own loadgroup takes the groups from
    `xdist_group` marks by rewriting node ids, which pytest 9 no longer lets it do: every test
    was sent on its own, so a file's module fixtures were set up on both workers and the system
    files ran side by side."""
    if config.getvalue('dist') != 'loadgroup':
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)
    return FileUnits(config, log)


@pytest.fixture(scope='session')
def ros():
    import rclpy
    from rclpy.node import Node
    from rclpy.signals import SignalHandlerOptions

    from loom_ros.bus.executor import make_executor
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = Node('loom_test')
    executor = make_executor()
    executor.add_node(node)
    yield RosHarness(node, executor)
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()


@pytest.fixture(autouse=True)
def _ros_left_over(request):
    """After each test that uses `ros`: destroy what it left on the session's node
    (subscriptions, publishers, clients, services, timers) and the nodes it left in the
    executor. The test process is one DDS participant for the whole session: an endpoint left
    there stays announced to every process started later, which has to match it (matching slows
    down with many: test/replay/test_deterministic_replay.py). About one in three tests that use
    `ros` left one or two (a client, a status subscription)."""
    if 'ros' not in request.fixturenames:
        yield
        return
    ros = request.getfixturevalue('ros')
    node = ros.node
    kinds = {'subscriptions': node.destroy_subscription, 'publishers': node.destroy_publisher,
             'clients': node.destroy_client, 'services': node.destroy_service,
             'timers': node.destroy_timer}
    before = {kind: set(getattr(node, kind)) for kind in kinds}
    nodes = set(ros.executor.get_nodes())
    yield
    for left in set(ros.executor.get_nodes()) - nodes:
        ros.executor.remove_node(left)
        left.destroy_node()
    for kind, destroy in kinds.items():
        for entity in set(getattr(node, kind)) - before[kind]:
            destroy(entity)


@pytest.fixture
def bus(ros):
    """A fresh EventBus on the session's test node (torn down after the test)."""
    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.qos import TopicQosTable
    from loom_ros.config.params import node_defaults
    defaults = node_defaults('loom_test')
    bus = EventBus(ros.node, topic_qos=TopicQosTable(defaults['bus.topic_qos'],
                                                     defaults['bus.default_qos']),
                   discovery_period_s=0.1)
    yield bus
    bus.destroy()


class Proc:
    """A subprocess running a Loom entry point; killed at teardown if still alive."""

    def __init__(self, args: list[str]):
        self.args = args
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=REPO)

    def finish(self, limit: float = WAIT_LIMIT_S) -> tuple[int, str, str]:
        try:
            out, err = self.popen.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            # SIGABRT first: faulthandler (PYTHONFAULTHANDLER, set above) prints every thread's
            # stack, so a hang says where it hung.
            self.popen.send_signal(signal.SIGABRT)
            try:
                out, err = self.popen.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                out, err = self.popen.communicate()
            pytest.fail(f'{self.args} did not finish in {limit:.0f} s\n{out}\n{err[-20000:]}')
        return self.popen.returncode, out, err

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.communicate()


@pytest.fixture
def spawn():
    procs: list[Proc] = []

    def start(*args: str) -> Proc:
        proc = Proc([sys.executable, *args])
        procs.append(proc)
        return proc
    yield start
    for proc in procs:
        proc.kill()


def pytest_sessionfinish(session, exitstatus):
    """The suite SIGKILLs processes on purpose (durability, restarts), and each leaves its Fast
    DDS shared memory (16 MiB with Loom's profile) until a reboot: a day of runs held 13 GB of a
    24 GB machine. Once at the end, by the controller, bring-up's pass gives it back
    (loom_ros/bringup/shm.py)."""
    if hasattr(session.config, 'workerinput'):   # a pytest-xdist worker: the controller does it
        return
    from loom_ros.bringup.shm import clean_dead_segments
    cleaned = clean_dead_segments()
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    if reporter is not None and (cleaned.error or cleaned.segments):
        reporter.write(f'\nshared memory: {cleaned}\n')
