"""The agent node's ports to the router and the plugins over ROS: service clients and the
outcomes publisher made on the agent node itself (no node of their own), plugins called
in-process when a host in this process runs them, and the routing policy run in this process
when the node is given it (HostedRouter: no service round trip per camera frame, decisions
reported to the router node on router/decisions).

Threads: a behavior runs on a dispatcher worker and blocks there until the answer comes; the
answer is taken by the agent node's executor, on its own thread. So nothing that the executor
runs may wait for a handler that waits for an answer: before a transition drains the mailboxes
on the executor thread the node closes the `Gate`, which ends the waits at once (they fail with
the reason) and refuses new calls until the node is active again; the Recall service gives up
on an agent whose handler is waiting (`waiting`).
"""
from __future__ import annotations

import math
import re
import threading
import time

from rclpy.exceptions import NameValidationException

from loom_msgs.msg import RouteDecision, RouteOutcome, RouterStats
from loom_msgs.srv import HandleEvent, Route

from loom_ros.agents.behavior import InProcessPlugins, PortError, Ports
from loom_ros.bus import topics
from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.qos import QosLevel, to_qos_profile
from loom_ros.bus.replies import ReplyPaths
from loom_ros.cloud.client import outcome_msg
from loom_ros.config.params import config_dir
from loom_ros.plugins.contract import PluginResponse
from loom_ros.plugins.registry import local_plugins as registry_plugins
from loom_ros.plugins.registry import response_from_msg
from loom_ros.router.decision import RequestError
from loom_ros.router.local import LocalRouter, RouteAnswer, RouteQuery
from loom_ros.router.messages import decision_msg
from loom_ros.router.policy import Budget, PolicyError, PolicyFile, load_policy
from loom_ros.telemetry import tracing

PRIVACY_CODES = {Privacy.PUBLIC: 0, Privacy.SENSITIVE: 1, Privacy.PRIVATE: 2,
                 Privacy.LOCAL_ONLY: 3}
CALL_TIMEOUT_S = 5.0         # for the service to appear, then again for its answer
POLL_S = 0.05                # how often a wait for a service looks again (and at the gate)
MAX_PLUGIN_CLIENTS = 64      # distinct plugin names one node makes clients for
PLUGIN_NAME = re.compile(r'[A-Za-z](?:_?[A-Za-z0-9])*')   # as plugin hosts accept (ROS names)

STRING_PARAMETER = 4         # rcl_interfaces/ParameterType.PARAMETER_STRING
DEFAULT_PERIOD_S = Budget().period_s   # the budget period before the policy is known

FlowError = PortError   # the name the flows used before the ports (kept for imports)


class Gate:
    """Open while the node may wait for answers; closing wakes every waiter at once."""

    # What a call gets at once where no call may wait (see Dispatcher.inline).
    INLINE = ('a behavior hosted with workers: 0 runs on the thread that delivers its events '
              'and their answers, so it cannot wait for a service answer; host it with workers '
              '>= 1')

    def __init__(self, refuse_waits: bool = False, graph=None):
        """`refuse_waits`: no call may wait for an answer here (a host whose handlers run on
        the thread that would take it, whatever thread the behavior calls from): each fails at
        once instead of blocking that thread until its timeout. `graph`: the clients' node
        (ReplyPaths: a restarted server is probed again)."""
        self._lock = threading.Lock()
        self._refuse_waits = refuse_waits
        self._open = False
        self._waiters: set[threading.Event] = set()
        self.waiting = 0   # calls waiting for an answer right now
        self.replies = ReplyPaths(graph)   # a client's first exchange is a probe (bus/replies.py)

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        with self._lock:
            self._open = False
            waiters = list(self._waiters)
        for done in waiters:
            done.set()

    def call(self, client, request, timeout_s: float, why_closed: str):
        """(response, '') or (None, why): waits for the service (at most `timeout_s`), proves
        the client's reply path with a probe on its first call (at most `timeout_s` more), then
        waits for the answer (at most `timeout_s` again), and gives up as soon as the gate
        closes. The request itself is sent once: a Route or a tts call must not happen twice."""
        if self._refuse_waits:
            return None, self.INLINE
        done = threading.Event()
        with self._lock:
            if not self._open:
                return None, why_closed
            self._waiters.add(done)
            self.waiting += 1
        try:
            deadline = time.monotonic() + timeout_s
            while not client.service_is_ready():
                if done.wait(POLL_S) or not self._open:
                    return None, why_closed
                if time.monotonic() >= deadline:
                    return None, f'service {client.srv_name} is not available'
            resp, why = self.replies.ask(client, request, done, timeout_s, lambda: self._open)
            return (resp, why) if resp is not None or why else (None, why_closed)
        finally:
            with self._lock:
                self._waiters.discard(done)
                self.waiting -= 1


class ServiceRouter:
    """The RouterPort over `router/route` (decisions) and `router/outcomes` (what happened)."""

    def __init__(self, node, gate: Gate, timeout_s: float = CALL_TIMEOUT_S):
        self.node, self.gate, self.timeout_s = node, gate, timeout_s
        self._client = node.create_client(Route, 'router/route')
        self._outcomes = node.create_publisher(RouteOutcome, 'router/outcomes',
                                               to_qos_profile('batched'))

    def route(self, query: RouteQuery) -> RouteAnswer:
        req = Route.Request(
            event_id=query.event_id, event_type=query.event_type, agent_id=query.agent_id,
            has_privacy=True, privacy=PRIVACY_CODES.get(query.privacy, 1),
            local_supported=query.local_supported,
            has_local_confidence=query.local_confidence is not None,
            local_confidence=float(query.local_confidence or 0.0),
            has_latency_budget=query.latency_budget_ms is not None,
            latency_budget_ms=float(query.latency_budget_ms or 0.0),
            payload_bytes=query.payload_bytes, subject=query.subject)
        carrier = Event(type='trace')   # the router's RouteDecision span joins this trace
        tracing.inject(carrier)
        req.traceparent = carrier.metadata.get(tracing.TRACEPARENT, '')
        resp, error = self.gate.call(self._client, req, self.timeout_s,
                                     'the agent host is not active: no routing now')
        if resp is None:
            raise PortError(f'router: {error}')
        if not resp.ok:
            raise PortError(f'router refused: {resp.error}')
        return RouteAnswer(resp.decision_id, resp.route, resp.rule, resp.reason, resp.upload,
                           float(resp.confidence), resp.cloud_model, float(resp.cloud_cost))

    def report(self, outcome) -> None:
        self._outcomes.publish(outcome_msg(outcome))

    def close(self) -> None:
        self.gate.replies.forget(self._client)
        self.node.destroy_client(self._client)
        self.node.destroy_publisher(self._outcomes)


class HostedRouter:
    """The RouterPort as a LocalRouter in this process, under the router node's policy file:
    a decision is a function call (the face flow asks once per camera frame), not a service
    round trip through two executors. The router node still hears of everything: each decision
    goes out on router/decisions (header.frame_id: this node, so the router node can tell them
    from its own: its history needs them) and outcomes on router/outcomes as before. The
    budget's spend is what the router node last said on router/stats plus the costs reported
    here since (so at most one stats period of other hosts' spend is unseen). `consent`: the
    consent registry's lookup; without one an event that names a data subject stays local
    (fail closed, as in LocalRouter).

    `policy` None: the policy is not known yet (RouterPolicyFollower sets it with `use`); until
    then, or after the policy could not be read here, routes go to `fallback` (the router/route
    service), so routing never waits on the follower."""

    def __init__(self, node, gate: Gate, policy: PolicyFile | None, consent=None,
                 fallback=None):
        self.node, self.gate, self.fallback = node, gate, fallback
        self._lock = threading.Lock()
        self._reported_spend = 0.0   # the router node's, from its last RouterStats
        self._spent_here = 0.0       # outcome costs reported by this node since then
        self._period = -1            # the budget period they belong to
        self.clock = time.time
        self.stats_seen = 0
        self.stats_refused = 0
        self.policy_changes = 0
        self._consent = consent
        self.local = None if policy is None else self._local(policy)
        self._name = node.get_fully_qualified_name()
        self._decisions = node.create_publisher(RouteDecision, topics.ROUTER_DECISIONS,
                                                to_qos_profile(QosLevel.BATCHED))
        self._outcomes = node.create_publisher(RouteOutcome, topics.ROUTER_OUTCOMES,
                                               to_qos_profile(QosLevel.BATCHED))
        self._stats = node.create_subscription(RouterStats, topics.ROUTER_STATS,
                                               self._on_stats, to_qos_profile(QosLevel.REALTIME))

    def _local(self, policy: PolicyFile) -> LocalRouter:
        return LocalRouter(policy, on_decision=self._publish, spend=self.spend,
                           consent=self._consent)

    def use(self, policy: PolicyFile | None) -> None:
        """Route under `policy` from the next decision on; None: through the fallback."""
        if policy is None:
            self.local = None
        elif self.local is None:
            self.local = self._local(policy)
        else:
            self.local.policy = policy   # as the router node swaps it on a reload
        self.policy_changes += 1

    def spend(self) -> float:
        with self._lock:
            return self._reported_spend + self._spent_here

    def _on_stats(self, msg) -> None:
        """The router node's spend. Within a budget period it only ever raises what this host
        counts (a forged RouterStats of 0 had given a host that had spent its budget 100 more
        cloud routes); a new period starts from what is reported."""
        spend = float(msg.spend)
        if not math.isfinite(spend) or spend < 0.0:   # not a spend: keep what we had
            self.stats_refused += 1
            return
        local = self.local
        period_s = local.policy.budget.period_s if local is not None else DEFAULT_PERIOD_S
        period = int(self.clock() // period_s)
        with self._lock:
            if period != self._period:
                self._period, self._reported_spend, self._spent_here = period, spend, 0.0
            else:
                estimate = self._reported_spend + self._spent_here
                self._reported_spend = max(self._reported_spend, spend)
                self._spent_here = max(0.0, estimate - self._reported_spend)
            self.stats_seen += 1

    def route(self, query: RouteQuery) -> RouteAnswer:
        if not self.gate.is_open:
            raise PortError('router: the agent host is not active: no routing now')
        local = self.local
        if local is None:
            if self.fallback is None:
                raise PortError('router: the routing policy is not known yet')
            return self.fallback.route(query)
        try:
            return local.route(query)
        except (RequestError, PolicyError) as exc:
            raise PortError(f'router refused: {exc}') from None

    def _publish(self, query: RouteQuery, answer: RouteAnswer) -> None:
        self._decisions.publish(decision_msg(query, answer, self.node.get_clock().now().to_msg(),
                                             frame_id=self._name))

    def report(self, outcome) -> None:
        """Checked as the router node checks it (LocalRouter.report: bounds, cost, and the
        decision's reservation released), then counted here and sent to the router node."""
        local = self.local
        if local is not None and local.report(outcome):
            return   # refused and counted in local.outcomes_refused
        cost = float(outcome.cost)
        if math.isfinite(cost) and cost > 0.0:
            with self._lock:
                self._spent_here += cost
        self._outcomes.publish(outcome_msg(outcome))

    def close(self) -> None:
        self.node.destroy_subscription(self._stats)
        self.node.destroy_publisher(self._decisions)
        self.node.destroy_publisher(self._outcomes)
        if self.fallback is not None:
            self.fallback.close()


def default_policy():
    """The shipped policy, what a router node with policy_file '' loads."""
    return config_dir() / 'policy.yaml'


class RouterPolicyFollower:
    """Keeps a HostedRouter on the router node's policy: the router's `policy_file` parameter
    is asked through its get_parameters service (asynchronously: the executor never waits),
    again every `retry_s` until answered, and again whenever /parameter_events says a parameter
    of the router node changed or was declared (a reload, a restarted router). The event only
    triggers the question: what is used is what the router node answers, so a forged event
    cannot point this host at a file the router never accepted. A file that cannot be read
    here leaves routing on the router/route service (logged); a router that refuses a bad file
    keeps its parameter, so nothing changes here either."""

    MAX_PATH = 4096
    # Until the first answer: look this often whether the router's service is there, and ask
    # once it is. A question sent before the service is matched is lost, and waiting the whole
    # retry_s for the next one left the host's first frames on the router/route service (the
    # demo's first camera frame waited 205 ms there).
    FIRST_LOOK_S = 0.05
    # Until the first answer, an unanswered question is asked again after this, doubling up to
    # retry_s: service_is_ready() says the request can reach the router, not that its reply can
    # come back (DDS matches the two topics apart), so the first reply can be lost even to a
    # ready service (seen once in CI: the next question was an hour away).
    FIRST_RETRY_S = 0.25

    def __init__(self, node, hosted: HostedRouter, load, log, router_name: str = 'router',
                 retry_s: float = 1.0):
        from rcl_interfaces.msg import ParameterEvent
        from rcl_interfaces.srv import GetParameters
        from rclpy.qos import qos_profile_parameter_events
        self.node, self.hosted, self.load, self.log = node, hosted, load, log
        ns = node.get_namespace().rstrip('/')
        self.router = f'{ns}/{router_name}'
        self.path: str | None = None   # the file now in use ('' = the shipped policy)
        self.asked = self.answers = self.failures = 0
        self._pending = None
        self._stale = False   # the router's policy may have changed since the last answer
        self._request = GetParameters.Request(names=['policy_file'])
        self._client = node.create_client(GetParameters, f'{self.router}/get_parameters')
        self._events = node.create_subscription(ParameterEvent, '/parameter_events',
                                                self._on_event, qos_profile_parameter_events)
        self._retry_s = retry_s
        self._asked_at = 0.0
        self._asked_ready = False
        self._first_wait = min(retry_s, self.FIRST_RETRY_S)
        self._closed = False
        self._timer = node.create_timer(min(retry_s, self.FIRST_LOOK_S), self._retry)
        self.ask()

    @property
    def known(self) -> bool:
        return self.path is not None

    def ask(self) -> None:
        """Ask the router now; a question still unanswered is dropped (DDS can lose a reply,
        and the newest answer is the one that counts)."""
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        self.asked += 1
        self._asked_at = time.monotonic()
        self._asked_ready = self._client.service_is_ready()   # else the question is lost
        self._pending = self._client.call_async(self._request)
        self._pending.add_done_callback(self._on_answer)

    def _retry(self) -> None:
        if self.path is not None and not self._stale:
            return
        waited = time.monotonic() - self._asked_at
        if waited >= self._retry_s:
            self.ask()   # unanswered that long: lost (DDS can lose a request or a reply)
        elif self.path is None and not self._asked_ready and self._client.service_is_ready():
            self.ask()   # the first question, again, now that it can reach the router
        elif self.path is None and self._asked_ready and waited >= self._first_wait:
            self._first_wait = min(self._retry_s, 2 * self._first_wait)
            self.ask()   # asked a ready service and no answer: its reply may not reach us yet

    def _settle_timer(self) -> None:
        """After the first answer: back to retry_s (not after close: an answer already queued
        must not bring a timer back)."""
        if not self._closed and self._timer.timer_period_ns != int(self._retry_s * 1e9):
            self.node.destroy_timer(self._timer)
            self._timer = self.node.create_timer(self._retry_s, self._retry)

    def _on_event(self, msg) -> None:
        if msg.node != self.router:
            return
        if any(p.name == 'policy_file' for p in (*msg.new_parameters, *msg.changed_parameters)):
            self._stale = True   # asked until answered, even if this reply is lost
            self.ask()

    def _on_answer(self, future) -> None:
        if future.cancelled() or self._closed:
            return
        try:
            values = future.result().values
        except Exception as exc:   # noqa: BLE001 - a failed call is retried, never raised here
            self.failures += 1
            self.log(f'router policy: cannot ask {self.router}: {exc}')
            return
        self.answers += 1
        self._stale = False
        self._settle_timer()
        path = values[0].string_value if values and values[0].type == STRING_PARAMETER else None
        if path is None or len(path) > self.MAX_PATH or '\x00' in path:
            self.failures += 1
            self.log(f'router policy: {self.router} gave no usable policy_file')
            return
        if path == self.path:
            return
        try:
            policy = self.load(path)
        except (PolicyError, OSError, ValueError) as exc:
            self.failures += 1
            self.hosted.use(None)
            self.path = path
            self.log(f'router policy: cannot load {path or "the shipped policy"} here ({exc}); '
                     'routing through the router/route service')
            return
        self.hosted.use(policy)
        self.path = path
        self.log(f'router policy: routing in this process under {path or "the shipped policy"}')

    def close(self) -> None:
        self._closed = True
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        self.node.destroy_timer(self._timer)
        self.node.destroy_subscription(self._events)
        self.node.destroy_client(self._client)


class ServicePlugins:
    """The PluginPort: in-process when a host in this process runs the plugin (`local()`), else
    `<ns>/<host>/<name>/handle_event` through a client on the node (made once per name)."""

    def __init__(self, node, gate: Gate, host: str = 'plugin_host', local=None,
                 timeout_s: float = CALL_TIMEOUT_S):
        local = local if local is not None else registry_plugins
        self.node, self.gate, self.timeout_s = node, gate, timeout_s
        self.local = InProcessPlugins(local)   # a {name: handle} mapping, or a function of one
        self._lookup = self.local.lookup
        self.base = f'{node.get_namespace().rstrip("/")}/{host}'
        self._clients: dict[str, object] = {}
        self._lock = threading.Lock()

    def prepare(self, names) -> None:
        """Make the clients for `names` now (on configure, on the executor's thread); a name
        that cannot have one fails later, at its call, with the reason."""
        names = names if isinstance(names, (list, tuple)) else ()
        for name in names[:MAX_PLUGIN_CLIENTS]:
            if isinstance(name, str) and name not in self._lookup():
                try:
                    self._client(name)
                except (PortError, NameValidationException):
                    pass

    def _client(self, name: str):
        with self._lock:
            client = self._clients.get(name)
            if client is None:
                if len(name) > 64 or not PLUGIN_NAME.fullmatch(name):
                    raise PortError(f'{name[:64]!r} is not a plugin name')
                if len(self._clients) >= MAX_PLUGIN_CLIENTS:
                    raise PortError(f'more than {MAX_PLUGIN_CLIENTS} plugin names asked for')
                client = self.node.create_client(HandleEvent, f'{self.base}/{name}/handle_event')
                self._clients[name] = client
            return client

    def call(self, name: str, event: Event) -> PluginResponse:
        if name in self._lookup():
            return self.local.call(name, event)
        try:
            client = self._client(name)
        except (PortError, NameValidationException) as exc:
            return PluginResponse.failure(f'plugin {name[:64]!r}: {exc}')
        resp, error = self.gate.call(client, HandleEvent.Request(event=event.to_msg()),
                                     self.timeout_s,
                                     'the agent host is not active: no plugin calls now')
        if resp is None:
            return PluginResponse.failure(f'plugin {name}: {error}')
        return response_from_msg(resp.response)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            self.gate.replies.forget(client)
            self.node.destroy_client(client)


class NodePorts:
    """What an agent node injects into its agents: one router port, one plugin port and a gate
    shared by all its agents, plus each agent's cloud port (the host's links)."""

    def __init__(self, node, router=None, local_plugins=None, host: str = 'plugin_host',
                 timeout_s: float = CALL_TIMEOUT_S, policy: PolicyFile | None = None,
                 consent=None, follow_router: bool = False, log=None,
                 refuse_waits: bool = False):
        """`router`: an in-process RouterPort (e.g. the router node's, when it lives in this
        process); else, given the router's `policy` (and `consent` lookup), a HostedRouter;
        else, with `follow_router`, a HostedRouter that follows the router node's policy
        (RouterPolicyFollower) and uses the `router/route` service until it knows it; else the
        `router/route` service. `local_plugins`: {name: handle} lookup of in-process plugins
        (default: plugins.registry.local_plugins). `refuse_waits`: see Gate."""
        self.gate = Gate(refuse_waits, graph=node)
        self._own_router = None
        self.follower = None
        if router is None:
            if policy is not None:
                self._own_router = HostedRouter(node, self.gate, policy, consent)
            elif follow_router:
                self._own_router = HostedRouter(node, self.gate, None, consent,
                                                fallback=ServiceRouter(node, self.gate, timeout_s))
                self.follower = RouterPolicyFollower(
                    node, self._own_router, lambda path: load_policy(path or default_policy()),
                    log or (lambda line: node.get_logger().info(line)))
            else:
                self._own_router = ServiceRouter(node, self.gate, timeout_s)
        self.router = router if router is not None else self._own_router
        self.plugins = ServicePlugins(node, self.gate, host, local_plugins, timeout_s)

    def for_agent(self, cloud=None, subject_refs=None) -> Ports:
        return Ports(router=self.router, plugins=self.plugins, subject_refs=subject_refs,
                     **({'cloud': cloud} if cloud is not None else {}))

    def close(self) -> None:
        self.gate.close()
        if self.follower is not None:
            self.follower.close()
        if self._own_router is not None:
            self._own_router.close()
        self.plugins.close()

