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
