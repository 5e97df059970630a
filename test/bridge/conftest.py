"""Fixtures for the bridge and cloud tests: a Zenoh router process on a free loopback port,
client sessions to it, bridge nodes in their own processes, and buses in robot namespaces."""
from __future__ import annotations

import json
import socket

import pytest
import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def endpoint(port: int) -> str:
    return f'tcp/127.0.0.1:{port}'


@pytest.fixture
def zenoh_router(spawn):
    """start(port) runs loom_ros.bridge.zenoh_router on tcp/127.0.0.1:port and waits until it listens."""
    def start(port: int):
        proc = spawn('-m', 'loom_ros.bridge.zenoh_router', '--listen', endpoint(port))
        line = proc.popen.stdout.readline()  # the router prints one line once it listens
        if not line or not json.loads(line).get('ready'):
            code, out, err = proc.finish()
            pytest.fail(f'zenoh router did not start (exit {code}):\n{line}{out}\n{err}')
        return proc
    return start


@pytest.fixture
def zsession():
    """open(port) gives a Zenoh client session to the test router (closed at teardown)."""
    import zenoh
    from loom_ros.bridge.zenoh_link import session_config
    sessions = []

    def open_session(port: int):
        session = zenoh.open(session_config('client', [endpoint(port)]))
        sessions.append(session)
        return session
    yield open_session
    for session in sessions:
        session.close()


class BridgeStatus:
    """The latest JSON status a bridge published on <namespace>/zenoh_bridge/status."""

    def __init__(self, ros, namespace: str):
        from std_msgs.msg import String
        from loom_ros.bus.qos import to_qos_profile
        self.last: dict = {}
        self.sub = ros.node.create_subscription(
            String, f'{namespace}/zenoh_bridge/status', self._on, to_qos_profile('realtime'))

    def _on(self, msg) -> None:
        self.last = json.loads(msg.data)

    def get(self, key, default=0):
        return self.last.get(key, default)


def open_inbound(*patterns: str, privacy: str = 'public', rate: float = 1e6) -> dict:
    """An inbound contract letting every sample under `patterns` in (no actuator among them)."""
    return {'rules': [{'key': p, 'privacy': privacy, 'rate': rate, 'burst': rate}
                      for p in patterns]}


@pytest.fixture
def bridge(ros, spawn, tmp_path):
    """start(namespace, port, inbound=<contract dict, or a list of patterns let in openly>,
    **params) runs a bridge node in its own process; returns (proc, status, audit_path). Credentials come from `keys_dir` (default: an
    empty folder, so nothing is sealed) and commands are audited to tmp_path/<robot>_audit.db."""
    def start(namespace: str, port: int, inbound: dict | None = None, **params):
        name = namespace.strip('/')
        audit = tmp_path / f'{name}_audit.jsonl'
        inbound_file = tmp_path / f'{name}_inbound.yaml'
        if isinstance(inbound, (list, tuple)):
            inbound = open_inbound(*inbound)
        inbound_file.write_text(yaml.safe_dump(inbound or {'rules': []}))
        values = {'robot_id': name, 'mode': 'client',
                  'connect': [endpoint(port)], 'audit_file': str(audit),
                  'inbound_file': str(inbound_file), 'audit_db': str(tmp_path / f'{name}_audit.db'),
                  'keys_dir': str(tmp_path / 'no_keys'), 'status_period_s': 0.05, **params}
        values.setdefault('bus', {}).setdefault('discovery_period_s', 0.1)
        path = tmp_path / f'{namespace.strip("/")}_params.yaml'
        path.write_text(yaml.safe_dump({'/**': {'ros__parameters': values}}))
        status = BridgeStatus(ros, namespace)
        proc = spawn('-m', 'loom_ros.bridge.bridge_node', '--ros-args', '-r', f'__ns:={namespace}',
                     '--params-file', str(path))
        ros.wait_for(lambda: status.get('connected', False), f'bridge {namespace} to connect',
                     alive=[proc])
        return proc, status, audit
    return start


@pytest.fixture
def robot_bus(ros):
    """bus(namespace, extra_topic_qos) is an EventBus on a test node in a robot's namespace."""
    import rclpy
    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.qos import TopicQosTable
    from loom_ros.config.params import node_defaults
    made = []

    def make(namespace: str, extra_qos=()):
        node = rclpy.create_node(f'test_{namespace.strip("/")}', namespace=namespace)
        ros.executor.add_node(node)
        defaults = node_defaults('loom_test')
        bus = EventBus(node, topic_qos=TopicQosTable([*extra_qos, *defaults['bus.topic_qos']],
                                                     defaults['bus.default_qos']),
                       discovery_period_s=0.1)
        made.append((node, bus))
        return bus
    yield make
    for node, bus in made:
        bus.destroy()
        ros.executor.remove_node(node)
        node.destroy_node()


@pytest.fixture
def port():
    return free_port()


@pytest.fixture
def wait_subscribed(ros):
    """Wait until a bridge subscribes `topic` on `bus` (so nothing is published into the void)."""
    def wait(bus, topic: str, alive=()) -> None:
        pub = bus.publisher_for(topic)
        ros.wait_for(lambda: pub.get_subscription_count() >= 1, f'the bridge to subscribe {topic}',
                     alive=alive)
    return wait
