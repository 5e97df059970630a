"""Issue 14, a cloud server in peer mode (no router between it and the robots): it listens only
with an identity issued to serve TLS, and it holds its own links to the fleet's rules, as the
router and a peer bridge do, so a member that reaches it cannot put under another robot's keys
through it. Real Zenoh sessions on loopback, and the real server process for its refusal."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import zenoh

from cloud_fixtures import fleet  # noqa: F401  (fixture)
from harness import WAIT_LIMIT_S
from link_fixtures import put
from loom_ros.bridge.zenoh_link import session_config
from loom_ros.cloud.server import session_config_for
from loom_ros.security import keys

MOVE_KEY = 'loom/robot1/fleet/robot/move'


def test_a_cloud_peer_without_the_right_to_serve_does_not_start(fleet, port):
    """The shipped identities are TLS clients: `--mode peer --listen` says what to reissue."""
    run = subprocess.run(
        [sys.executable, '-m', 'loom_ros.cloud.server', '--mode', 'peer', '--listen',
         f'tls/127.0.0.1:{port}', '--keys-dir', str(fleet)],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "identity 'cloud' may not serve TLS" in run.stderr
    assert '--serve --host ADDRESS --force' in run.stderr


def test_a_listening_cloud_peer_holds_the_fleets_rules_for_its_own_links(fleet, port,
                                                                           tmp_path):
    """robot2, connected to the cloud peer, puts 20 moves under robot1's key: refused by the
    cloud's own access control (its session is the one `loom cloud serve` opens). Its marks
    on its own key, sent after them on the same link, arrive: the link works and keeps order."""
    peer_fleet = tmp_path / 'fleet'
    shutil.copytree(fleet, peer_fleet)
    cloud = keys.issue(peer_fleet, 'cloud', 'cloud', serve=True, force=True)
    endpoint = [f'tls/127.0.0.1:{port}']
    server = zenoh.open(session_config_for('peer', [], endpoint, False, cloud, peer_fleet))
    robot2 = zenoh.open(session_config('peer', endpoint, (),
                                       identity=keys.load(peer_fleet, 'robot2')))
    try:
        moves, marks = [], []
        subs = [server.declare_subscriber(MOVE_KEY, lambda s: moves.append(1)),
                server.declare_subscriber('loom/robot2/mark', lambda s: marks.append(1))]
        for _ in range(20):
            put(robot2, MOVE_KEY, b'robot2')
        deadline = time.monotonic() + WAIT_LIMIT_S
        while not marks:
            assert time.monotonic() < deadline, 'robot2 never reached the cloud peer'
            put(robot2, 'loom/robot2/mark', b'm')
            time.sleep(0.02)
        assert moves == []
        for sub in subs:
            sub.undeclare()
    finally:
        robot2.close()
        server.close()
