"""What a flow behavior needs beyond its AgentContext: the router's `router/route` service, the
plugins (in-process handle, else the plugin host's services), and `router/outcomes`.

A behavior runs on a dispatcher worker thread and has no node of its own, so the process gets one
small node (`flow_link_<pid>`) with its own executor on a daemon thread: calls block the worker
(never an executor), answers arrive on that thread. The node takes the process's namespace
remapping, so it finds `router/route` and `/<ns>/plugin_host/...` beside the agents.
"""
from __future__ import annotations

import os
import threading

from loom_ros.bus.event import Event, Privacy
from loom_ros.bus.privacy import effective_privacy
from loom_ros.telemetry import tracing

PRIVACY_CODES = {Privacy.PUBLIC: 0, Privacy.SENSITIVE: 1, Privacy.PRIVATE: 2,
                 Privacy.LOCAL_ONLY: 3}


class FlowError(RuntimeError):
    """The router or a plugin could not be reached or refused the request; says which and why."""


class FlowLink:
    _shared: 'FlowLink | None' = None
    _lock = threading.Lock()

    @classmethod
    def shared(cls, plugin_host: str = 'plugin_host') -> 'FlowLink':
        """One link per process, made on first use (rclpy must be initialised: an agent node
        runs in this process)."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls(plugin_host)
            return cls._shared

    @classmethod
    def close_shared(cls) -> None:
        """Close this process's link, if one was made: its executor thread must end before
        the process does (left running, the process aborted on Ctrl-C)."""
        with cls._lock:
            link, cls._shared = cls._shared, None
        if link is not None:
            link.close()

    def __init__(self, plugin_host: str = 'plugin_host', timeout_s: float = 5.0):
        import rclpy
        from rclpy.task import Future

        from loom_msgs.msg import RouteOutcome
        from loom_msgs.srv import Route
        from loom_ros.bus.executor import make_executor, spin_until
        from loom_ros.bus.qos import to_qos_profile
        self.timeout_s = timeout_s
        # Its own name even under a process-wide `-r __node:=` remap (the lifecycle manager
        # starts agent hosts with one), which would otherwise rename this node too and leave
        # two nodes of one name in the graph; the namespace remap still applies.
        name = f'flow_link_{os.getpid()}'
        self.node = rclpy.create_node(name, cli_args=['--ros-args', '-r', f'__node:={name}'])
        ns = self.node.get_namespace().rstrip('/')
        self.plugin_host = f'{ns}/{plugin_host}'
        self._route_type = Route
        self._route = self.node.create_client(Route, 'router/route')
        self._outcome_type = RouteOutcome
        self._outcomes = self.node.create_publisher(RouteOutcome, 'router/outcomes',
                                                    to_qos_profile('batched'))
        self._plugins: dict[str, object] = {}
        self._stop = Future()
        self._executor = make_executor()
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=spin_until, args=(self._executor, self._stop),
                                        daemon=True, name='flow-link')
        self._thread.start()

    # -- router -------------------------------------------------------------------------------
    def route(self, event: Event, event_type: str, agent_id: str, *, confidence: float | None,
              latency_budget_ms: float | None = None, local_supported: bool = True):
        """The router's decision (a Route.srv response with ok=True); FlowError otherwise."""
        req = self._route_type.Request(
            event_id=event.id, event_type=event_type, agent_id=agent_id,
            privacy=PRIVACY_CODES.get(effective_privacy(event), 1), local_supported=local_supported,
            has_local_confidence=confidence is not None,
            local_confidence=float(confidence or 0.0),
            has_latency_budget=latency_budget_ms is not None,
            latency_budget_ms=float(latency_budget_ms or 0.0), payload_bytes=len(event.payload))
        if hasattr(req, 'traceparent'):   # the router's RouteDecision span joins this trace
            carrier = Event(type='trace')
            tracing.inject(carrier)
            req.traceparent = carrier.metadata.get(tracing.TRACEPARENT, '')
        if not self._route.wait_for_service(timeout_sec=self.timeout_s):
            raise FlowError(f'router service {self._route.srv_name} is not available')
        done = threading.Event()
        future = self._route.call_async(req)
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(self.timeout_s):
            self._route.remove_pending_request(future)
            raise FlowError(f'router did not answer in {self.timeout_s:g} s')
        resp = future.result()
        if not resp.ok:
            raise FlowError(f'router refused: {resp.error}')
        return resp

    def report(self, outcome) -> None:
        """An execute_route Outcome on router/outcomes (the router learns from it)."""
        from loom_ros.cloud.client import outcome_msg
        self._outcomes.publish(outcome_msg(outcome))

    # -- plugins ------------------------------------------------------------------------------
    def plugin(self, name: str):
        """The plugin `name`: in-process when a host here runs it, else through its services."""
        from loom_ros.plugins.registry import local_plugins, plugin_handle
        local = local_plugins().get(name)
        if local is not None:
            return local
        if name not in self._plugins:
            self._plugins[name] = plugin_handle(name, self.node, self.plugin_host,
                                                self.timeout_s)
        return self._plugins[name]

    def close(self) -> None:
        if not self._stop.done():
            self._stop.set_result(True)
        self._thread.join(2.0)
        self._executor.shutdown()
        self.node.destroy_node()
