"""Every Loom node masks its log lines from the first one, not only once telemetry is attached
(issue 13, fault 10), and a standalone node that cannot start says why and exits 1 instead of
staying up unconfigured (issue 13, fault 11)."""
from __future__ import annotations

import os
import subprocess
import sys

from harness import REPO, WAIT_LIMIT_S

SECRET = 'hunter2-sekret-value'


def test_a_configure_error_quoting_a_secret_is_masked_and_the_node_exits_1(tmp_path):
    env = dict(os.environ, ROS_LOG_DIR=str(tmp_path / 'log'))
    done = subprocess.run([sys.executable, '-m', 'loom_ros.bridge.bridge_node', '--ros-args',
                           '-p', f'robot_id:=password={SECRET}'], env=env, cwd=REPO,
                          timeout=WAIT_LIMIT_S, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr[-2000:]
    # The refusal is said (with the key), the value is not.
    assert 'robot_id' in done.stderr and 'password=***' in done.stderr, done.stderr[-2000:]
    assert 'exiting with code 1' in done.stderr
    assert SECRET not in done.stderr + done.stdout
    logs = [p for p in (tmp_path / 'log').rglob('*') if p.is_file()]
    assert logs
    for path in logs:
        assert SECRET.encode() not in path.read_bytes(), path
