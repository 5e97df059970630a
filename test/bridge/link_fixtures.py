"""Plain helpers of the bridge tests (importable by name, unlike conftest.py: several folders
have one): the identities every bridge and cloud test connects as, free ports, endpoints, and a
put that waits rather than drops."""
from __future__ import annotations


import zenoh

from harness import free_port  # noqa: F401 (conftest takes it from here)
from loom_ros.security import keys

# Every identity the bridge and cloud tests connect as (robot ids are the bridge namespaces).
TEST_IDENTITIES = {
    'router': 'router', 'cloud': 'cloud', 'tester': 'operator',
    **{robot: 'robot' for robot in ('robot1', 'robot2', 'r1', 'rs', 'rh', 'sd', 'ta', 'tb',
                                    'ri', 'rs2', 'priv1', 'priv2')},
}


def test_fleet(root):
    """`root` with the authority and TEST_IDENTITIES (what exists is kept)."""
    keys.ensure_local(root, TEST_IDENTITIES)
    return root


test_fleet.__test__ = False   # a helper, not a test


def endpoint(port: int, secure: bool = False) -> str:
    return f'{"tls" if secure else "tcp"}/127.0.0.1:{port}'


def put(session, key: str, data: bytes) -> None:
    """A put that blocks under congestion instead of dropping (a test counts what arrives)."""
    session.put(key, data, congestion_control=zenoh.CongestionControl.BLOCK)
