"""An agent's cloud link that cannot be opened says which endpoint was dialled: over TLS a
configured `tcp/` endpoint is dialled as `tls/` (zenoh_link.secure_endpoint), and the error named
the configured one while Zenoh's own text named the other (seen in a `ros2 launch` run). Real
credentials, a real Zenoh session dialling a port nobody listens on."""
import socket

import pytest

from loom_ros.agents.flows.cloud import CloudSettings, CloudUnavailable, open_cloud_client
from loom_ros.security import keys


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


@pytest.fixture(scope='module')
def keys_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('keys')
    keys.init_ca(root)
    keys.issue(root, 'robot1', 'robot')
    return root


def test_over_tls_the_error_names_the_tls_endpoint_it_dialled(keys_dir):
    port = _closed_port()
    settings = CloudSettings((f'tcp/127.0.0.1:{port}',), str(keys_dir), 'robot1')
    with pytest.raises(CloudUnavailable) as raised:
        open_cloud_client(settings)
    assert f"['tls/127.0.0.1:{port}']" in str(raised.value)
    assert f'tcp/127.0.0.1:{port}' not in str(raised.value)


def test_insecure_names_the_tcp_endpoint(keys_dir):
    port = _closed_port()
    settings = CloudSettings((f'tcp/127.0.0.1:{port}',), str(keys_dir), 'robot1', insecure=True)
    with pytest.raises(CloudUnavailable) as raised:
        open_cloud_client(settings)
    assert f"['tcp/127.0.0.1:{port}']" in str(raised.value)


def test_missing_credentials_say_so(tmp_path):
    settings = CloudSettings(('tcp/127.0.0.1:7447',), str(tmp_path / 'none'), 'robot1')
    with pytest.raises(CloudUnavailable, match='ca.pem is missing'):
        open_cloud_client(settings)


def test_a_host_stopped_while_its_cloud_link_is_opening_exits_cleanly(ros, spawn, keys_dir,
                                                                      tmp_path):
    """The agent host opens its cloud link in the background. Stopped while that opener is
    inside zenoh.open (a router that accepted and never answered; the open timeout here
    outlasts the test), the host names it and ends with os._exit(0) after its whole shutdown:
    the opener coming back during the interpreter's exit would abort the process ("FATAL:
    exception not rethrown"), as it did for the bridge in a fresh clone's CI."""
    import signal

    from harness import SilentRouter, assert_left_opening
    router = SilentRouter()
    agents = tmp_path / 'agents.yaml'
    agents.write_text(f"""agents:
  - id: asker
    behavior: counter
    subscriptions: ["test.asker"]
    settings:
      zenoh_connect: ["tcp/127.0.0.1:{router.port}"]
      keys_dir: "{keys_dir}"
      identity: robot1
      zenoh_open_timeout_s: 300
""")
    try:
        proc = spawn('-m', 'loom_ros.agents.agent_node', '--ros-args', '-r', '__ns:=/cl_stop',
                     '-r', '__node:=agent_asker', '-p', 'agent_id:=asker',
                     '-p', f'agents_file:={agents}', '-p', f'storage.root:={tmp_path}')
        ros.wait_for(lambda: router.accepted, 'the cloud link to be inside zenoh.open',
                     alive=[proc])
        proc.popen.send_signal(signal.SIGINT)
        code, _, err = proc.finish()
    finally:
        router.close()
    assert_left_opening(code, err, 'agent_asker', 'cloud-link')
