"""A service client's first exchange (bus/replies.py): a lost first answer costs a resent probe,
never a resent request, and never the caller's whole timeout.

DDS's reply-matching race cannot be forced on loopback, so the server here loses the first
answer the way the race does from the client's side: it holds the first probe unanswered until
the client has given up on it and sent another. Real rclpy clients and services over DDS, the
product's Gate and ReplyPaths; the server is the test's own."""
from __future__ import annotations

import threading
import time

import pytest
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node

from harness import WAIT_LIMIT_S
from loom_msgs.srv import HandleEvent, Route
from loom_ros.agents.flows.link import Gate
from loom_ros.bus.replies import PROBE_ANSWER, ReplyPaths, is_probe, reply_writers


class HoldingServer:
    """A router/route server in this process, on its own executor: records every request's
    event id ('' for a probe) and holds the first `hold` requests unanswered until released."""

    def __init__(self, ros, name: str, hold: int, service: str = ''):
        self.node = Node(name, context=ros.node.context)
        self.seen: list[str] = []
        self.hold = hold
        self.release = threading.Event()   # ends every hold (teardown)
        self.gates: list[threading.Event] = []   # one per request: set ends that one's hold
        self._lock = threading.Lock()
        self.node.create_service(Route, service or f'/{name}/route', self._on_route,
                                 callback_group=ReentrantCallbackGroup())
        self.executor = MultiThreadedExecutor(num_threads=4, context=ros.node.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_route(self, req, resp):
        with self._lock:
            self.seen.append(req.event_id)
            held = len(self.seen) <= self.hold
            gate = threading.Event()
            self.gates.append(gate)
        if held:
            deadline = time.monotonic() + WAIT_LIMIT_S
            while not (gate.is_set() or self.release.is_set()) and time.monotonic() < deadline:
                gate.wait(0.05)
        resp.ok = not is_probe(req)
        resp.error = PROBE_ANSWER if is_probe(req) else ''
        resp.decision_id = f'd-{req.event_id}'
        return resp

    def close(self):
        if self.thread is None:
            return
        self.release.set()
        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()
        self.thread.join(5.0)
        self.thread = None


@pytest.fixture
def server_and_client(ros, request):
    name = f'replies_{request.node.name[-20:].strip("_")}'.replace('[', '_').replace(']', '_')
    made = []

    def make(hold: int):
        server = HoldingServer(ros, name, hold)
        client = ros.node.create_client(Route, f'/{name}/route')
        made.append(server)
        clients.append(client)
        ros.wait_for(client.service_is_ready, 'the holding server')
        return server, client
    made, clients = [], []
    make.made = made
    yield make
    for server in made:
        server.close()
    for client in clients:
        ros.node.destroy_client(client)


def in_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def open_gate(graph=None) -> Gate:
    gate = Gate(graph=graph)
    gate.open()
    return gate


def route_call(gate, client, event_id: str, limit: float = WAIT_LIMIT_S, why: str = 'closed'):
    """Gate.call of one Route request on a thread of its own (it blocks): (thread, [result])."""
    return in_thread(lambda: gate.call(client, Route.Request(event_id=event_id, event_type='t'),
                                       limit, why))


def test_empty_requests_are_probes_and_nothing_else_is():
    assert is_probe(Route.Request()) and is_probe(HandleEvent.Request())
    assert not is_probe(Route.Request(event_type='speech.utterance'))
    assert not is_probe(Route.Request(payload_bytes=1))
    nested = HandleEvent.Request()
    nested.event.id = 'e1'
    assert not is_probe(nested)
    nested = HandleEvent.Request()
    nested.event.payload = [0]
    assert not is_probe(nested)


def test_a_lost_first_answer_costs_a_second_probe_and_the_request_goes_once(
        ros, server_and_client):
    server, client = server_and_client(hold=1)
    gate = open_gate()
    thread, out = route_call(gate, client, 'e1')
    ros.wait_for(lambda: not thread.is_alive(), 'the call through a lost first answer')
    resp, why = out[0]
    assert why == '' and resp.ok and resp.decision_id == 'd-e1'
    # The first probe's answer never came in time; the second proved the path; then the
    # request, once.
    assert server.seen == ['', '', 'e1'], server.seen
    assert gate.replies.probes_sent == 2 and gate.replies.proven(client)
    server.release.set()   # the held answer now arrives late, for a request given up on
    thread, out = route_call(gate, client, 'e2')
    ros.wait_for(lambda: not thread.is_alive(), 'the second call')
    assert out[0][0].decision_id == 'd-e2'
    assert server.seen == ['', '', 'e1', 'e2'], 'no probe once the path is proven'
    assert gate.replies.probes_sent == 2


def test_closing_the_gate_ends_a_probe_wait_and_nothing_is_sent(ros, server_and_client):
    server, client = server_and_client(hold=1_000)
    gate = open_gate()
    thread, out = route_call(gate, client, 'e1', why='the host is not active')
    ros.wait_for(lambda: len(server.seen) >= 1, 'a probe at the server')
    gate.close()
    ros.wait_for(lambda: not thread.is_alive(), 'the call ending on close')
    assert out[0] == (None, 'the host is not active')
    assert 'e1' not in server.seen and not gate.replies.proven(client)


def test_an_unanswered_probe_gives_up_at_the_deadline_with_the_reason(ros, server_and_client):
    """The bound is the caller's: `prove` stops at its deadline (here one already past after
    the first probe, so no wait on the clock) and says False; Gate says why."""
    server, client = server_and_client(hold=1_000)
    paths = ReplyPaths()
    wake = threading.Event()
    thread, out = in_thread(lambda: paths.prove(client, wake, deadline=0.0))
    ros.wait_for(lambda: not thread.is_alive(), 'prove at a past deadline')
    assert out == [None] and paths.probes_sent == 1 and not paths.proven(client)
    gate = open_gate()
    thread, out = route_call(gate, client, 'e1', limit=0.0)
    ros.wait_for(lambda: not thread.is_alive(), 'a call with no time left')
    resp, why = out[0]
    assert resp is None and 'did not answer a reply-path probe' in why, why
    ros.wait_for(lambda: len(server.seen) >= 2, 'both probes at the server')
    assert 'e1' not in server.seen


def test_a_server_that_answers_late_still_proves_the_path(ros, server_and_client):
    """A server taking its requests one at a time behind slow ones answers a probe after the
    next one went out: every probe stays awaited, so the late answer counts (dropping each
    probe at its resend left such a server unprovable for as long as it stayed busy)."""
    server, client = server_and_client(hold=1_000)
    gate = open_gate()
    thread, out = route_call(gate, client, 'e1')
    ros.wait_for(lambda: len(server.seen) >= 2, 'a second probe: the first one given up')
    server.gates[0].set()   # the first probe answered now, late; the second stays held
    ros.wait_for(lambda: 'e1' in server.seen, 'the request, after the late answer')
    server.gates[server.seen.index('e1')].set()
    ros.wait_for(lambda: not thread.is_alive(), 'the call')
    assert out[0][0].decision_id == 'd-e1' and gate.replies.proven(client)
    assert server.seen.count('e1') == 1


def test_a_restarted_server_is_probed_again(ros, server_and_client):
    """A new server process has a new reply writer: a new match, with the same race. The proof
    names the servers' reply writers in the graph, so a call after a restart probes first."""
    first, client = server_and_client(hold=0)
    gate = open_gate(graph=ros.node)
    thread, out = route_call(gate, client, 'e1')
    ros.wait_for(lambda: not thread.is_alive(), 'the first call')
    assert out[0][0].ok and first.seen == ['', 'e1']
    ros.wait_for(lambda: reply_writers(ros.node, client), 'the server in the graph')
    before = reply_writers(ros.node, client)
    name = first.node.get_name()
    first.close()
    second = HoldingServer(ros, f'{name}_b', hold=0,
                           service=client.srv_name)
    server_and_client.made.append(second)
    ros.wait_for(lambda: reply_writers(ros.node, client) not in (before, frozenset()),
                 'the restarted server in the graph, the old one gone')
    thread, out = route_call(gate, client, 'e2')
    ros.wait_for(lambda: not thread.is_alive(), 'the call after the restart')
    assert out[0][0].decision_id == 'd-e2'
    assert second.seen == ['', 'e2'], second.seen
    assert gate.replies.probes_sent == 2


class QueuedTasks:
    """Where a future's done callbacks go: rclpy hands them to the executor as tasks, run
    later on its thread. Here they run only when the test says (`run`)."""

    def __init__(self):
        self.tasks = []

    def create_task(self, fn, *args):
        self.tasks.append((fn, args))

    def run(self):
        tasks, self.tasks = self.tasks, []
        for fn, args in tasks:
            fn(*args)


class RacingClient:
    """rclpy's Client at the moment of the race the real one cannot be made to show on demand:
    a probe's answer is in (its future done) while its done callback still waits in the
    executor's queue. The request's future is answered when the test says. A stand-in for
    rclpy, not for Loom: what is tested is Gate and ServicePlugin."""

    def __init__(self, srv_type, srv_name, tasks):
        self.srv_type, self.srv_name, self.tasks = srv_type, srv_name, tasks
        self.requests, self.removed = [], []
        self.request_sent = threading.Event()
        self.request_future = None

    def service_is_ready(self):
        return True

    def wait_for_service(self, timeout_sec=None):
        return True

    def remove_pending_request(self, future):
        self.removed.append(future)

    def call_async(self, request):
        from rclpy.task import Future
        future = Future(executor=self.tasks)
        self.requests.append(request)
        if is_probe(request):
            future.set_result(self.srv_type.Response())
        else:
            self.request_future = future
            self.request_sent.set()
        return future


def _stale_wake_then_answer(tasks, client, thread, answer):
    """The probe's queued callback fires while the request waits; the request must go on
    waiting for its own answer, then return it."""
    assert client.request_sent.wait(WAIT_LIMIT_S)
    tasks.run()   # the probe's late done callback: it sets the wait's Event
    thread.join(0.3)   # a wait woken by it and not by its own answer would end here
    assert thread.is_alive(), 'the request stopped waiting on a probe callback'
    client.request_future.set_result(answer)
    tasks.run()
    thread.join(WAIT_LIMIT_S)
    assert not thread.is_alive()


def test_a_probe_callback_run_late_does_not_end_the_requests_wait():
    tasks = QueuedTasks()
    client = RacingClient(Route, '/racing/route', tasks)
    gate = open_gate()
    thread, out = route_call(gate, client, 'e1')
    answer = Route.Response(ok=True, decision_id='d-e1')
    _stale_wake_then_answer(tasks, client, thread, answer)
    assert out == [(answer, '')]
    assert [r.event_id for r in client.requests] == ['', 'e1'] and not client.removed
    assert gate.replies.proven(client)


def test_a_remote_plugins_call_waits_for_its_own_answer_too():
    from loom_msgs.msg import PluginResponse as PluginResponseMsg
    from loom_ros.bus.event import Event
    from loom_ros.plugins.registry import ServicePlugin
    tasks = QueuedTasks()

    class Node:   # what ServicePlugin asks of its node: clients (and a graph it may lack)
        def create_client(self, srv_type, name):
            return RacingClient(srv_type, name, tasks)
    remote = ServicePlugin(Node(), 'weather', host='/racing_host')
    client = remote._handle
    thread, out = in_thread(lambda: remote.handle_event(Event.with_json(
        'tool.weather.query', {'city': 'Lisbon'}, id='q1')))
    response = HandleEvent.Response(response=PluginResponseMsg(ok=True, latency_ms=1.0))
    _stale_wake_then_answer(tasks, client, thread, response)
    assert out[0].ok, out[0].error
    assert [r.event.id for r in client.requests] == ['', 'q1'] and not client.removed


def test_closing_the_gate_ends_the_requests_own_wait_and_keeps_the_proof():
    """The request went and no answer comes: closing the gate (a deactivate) ends the wait at
    once with the reason; the path stays proven (the server did nothing wrong)."""
    tasks = QueuedTasks()
    client = RacingClient(Route, '/racing/route', tasks)
    gate = open_gate()
    thread, out = route_call(gate, client, 'e1', why='the host is not active')
    assert client.request_sent.wait(WAIT_LIMIT_S)
    tasks.run()
    gate.close()
    thread.join(WAIT_LIMIT_S)
    assert out == [(None, 'the host is not active')]
    assert client.removed == [client.request_future] and gate.replies.proven(client)


def test_a_request_that_is_itself_a_probe_is_asked_once():
    """Health's request has no fields: it is its own probe, and its answer is the answer."""
    from loom_msgs.srv import Health
    from loom_ros.plugins.registry import ServicePlugin
    tasks = QueuedTasks()

    class Node:
        def create_client(self, srv_type, name):
            return RacingClient(srv_type, name, tasks)
    remote = ServicePlugin(Node(), 'weather', host='/racing_host')
    status = remote.health()
    assert len(remote._health.requests) == 1 and isinstance(remote._health.requests[0],
                                                            Health.Request)
    assert status.message == '' and remote._replies.proven(remote._health)


def test_a_relative_service_name_is_found_in_the_graph(ros, server_and_client):
    """ServiceRouter's client is made with 'router/route', relative to the agent node: the
    reply writers are looked up under the name the node resolves it to, or no restart would
    ever be seen on it."""
    server, absolute = server_and_client(hold=0)
    relative = ros.node.create_client(Route, absolute.srv_name.lstrip('/'))
    try:
        assert relative.srv_name != absolute.srv_name   # rclpy keeps the name as given
        ros.wait_for(lambda: reply_writers(ros.node, relative), 'the server under its name')
        assert reply_writers(ros.node, relative) == reply_writers(ros.node, absolute)
    finally:
        ros.node.destroy_client(relative)
