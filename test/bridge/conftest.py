"""Fixtures for the bridge and cloud tests: a Zenoh router process on a free loopback port,
client sessions to it, bridge nodes in their own processes, and buses in robot namespaces.

Secure by default, as in production: the router listens on TLS with mutual authentication and
access control built from the `zenoh_keys` folder at its start, so every identity a test uses
(robot ids = bridge namespaces, the test sessions' operator `tester`, the cloud) is issued
there first (TEST_IDENTITIES). A module with its own authority overrides `zenoh_keys_root`
(its folder; TEST_IDENTITIES are added to it). `secure=False` / `insecure=True` is for tests about something else."""
from __future__ import annotations

import json

import pytest
import yaml

from loom_ros.security import keys

from link_fixtures import TEST_IDENTITIES, endpoint, free_port, test_fleet  # noqa: F401


@pytest.fixture(scope='module')
def zenoh_keys_root(tmp_path_factory):
    """Where zenoh_keys are made; a module with its own authority overrides this."""
    return tmp_path_factory.mktemp('zenoh_keys')


@pytest.fixture(scope='module')
def zenoh_keys(zenoh_keys_root):
    """The credentials folder the router, the test sessions and the bridges use."""
    return test_fleet(zenoh_keys_root)


@pytest.fixture
def zenoh_router(spawn, zenoh_keys, tmp_path):
    """start(port, secure=True, fleet=None) runs loom_ros.bridge.zenoh_router on 127.0.0.1:port
    (TLS, mutual authentication, access control from zenoh_keys and the `fleet` file's dict;
    plain TCP with secure=False) and waits until it listens."""
    def start(port: int, secure: bool = True, fleet: dict | None = None):
        security = ['--keys-dir', str(zenoh_keys), '--audit-db', str(tmp_path / 'router_audit.db')] \
            if secure else ['--insecure']
        if fleet is not None:
            (tmp_path / 'fleet.yaml').write_text(yaml.safe_dump(fleet))
            security += ['--fleet', str(tmp_path / 'fleet.yaml')]
        proc = spawn('-m', 'loom_ros.bridge.zenoh_router', '--listen', endpoint(port, secure),
                     *security)
        line = proc.popen.stdout.readline()  # the router prints one line once it listens
        if not line or not json.loads(line).get('ready'):
            code, out, err = proc.finish()
            pytest.fail(f'zenoh router did not start (exit {code}):\n{line}{out}\n{err}')
        return proc
    return start


@pytest.fixture
def zsession(zenoh_keys):
    """open(port, name='tester', secure=True) gives a Zenoh client session to the test router as
    identity `name` (mutual TLS; plain TCP with secure=False), closed at teardown."""
    import zenoh
    from loom_ros.bridge.zenoh_link import session_config
    sessions = []

    def open_session(port: int, name: str = 'tester', secure: bool = True):
        identity = keys.load(zenoh_keys, name) if secure else None
        session = zenoh.open(session_config('client', [endpoint(port, secure)],
                                            identity=identity))
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
def bridge(ros, spawn, tmp_path, zenoh_keys):
    """start(namespace, port, inbound=<contract dict, or a list of patterns let in openly>,
    **params) runs a bridge node in its own process; returns (proc, status, audit_path).
    It connects as the identity named like its namespace, from `keys_dir` (default zenoh_keys,
    with seal_sensitive off unless given: nothing is sealed), or over plain TCP with
    insecure=True. Commands are audited to tmp_path/<robot>_audit.db. It waits for the bridge to
    connect, or with connected=False only for its first status."""
    def start(namespace: str, port: int, inbound: dict | None = None, connected: bool = True,
              **params):
        name = namespace.strip('/')
        audit = tmp_path / f'{name}_audit.db'   # commands and privacy refusals
        inbound_file = tmp_path / f'{name}_inbound.yaml'
        if isinstance(inbound, (list, tuple)):
            inbound = open_inbound(*inbound)
        inbound_file.write_text(yaml.safe_dump(inbound or {'rules': []}))
        secure = not params.get('insecure', False)
        if 'keys_dir' not in params:
            params = {'keys_dir': str(zenoh_keys), 'seal_sensitive': 'off', **params}
        values = {'robot_id': name, 'mode': 'client',
                  'connect': [endpoint(port, secure)],
                  'inbound_file': str(inbound_file), 'audit_db': str(audit),
                  'status_period_s': 0.05, **params}
        if secure and not (keys.keys_path(values['keys_dir']) / name / 'cert.pem').is_file():
            pytest.fail(f'no identity {name!r} in {values["keys_dir"]}: add it to '
                        'TEST_IDENTITIES (the router knows only those issued before it started)')
        values.setdefault('bus', {}).setdefault('discovery_period_s', 0.1)
        path = tmp_path / f'{namespace.strip("/")}_params.yaml'
        path.write_text(yaml.safe_dump({'/**': {'ros__parameters': values}}))
        status = BridgeStatus(ros, namespace)
        proc = spawn('-m', 'loom_ros.bridge.bridge_node', '--ros-args', '-r', f'__ns:={namespace}',
                     '--params-file', str(path))
        if connected:
            ros.wait_for(lambda: status.get('connected', False),
                         f'bridge {namespace} to connect', alive=[proc])
        else:   # active, whether or not it ever reaches Zenoh
            ros.wait_for(lambda: status.get('robot_id', '') == name,
                         f'bridge {namespace} to report', alive=[proc])
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


@pytest.fixture(scope='module')
def fleet(tmp_path_factory):
    """A fleet authority with an operator, another robot and the cloud: (keys dir, identities)."""
    root = tmp_path_factory.mktemp('keys')
    keys.init_ca(root)
    ids = {name: keys.issue(root, name, role) for name, role in
           (('ops', 'operator'), ('robot2', 'robot'), ('cloud', 'cloud'))}
    return root, ids
