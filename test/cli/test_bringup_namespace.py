"""Issue 15, fault 3: with a robot namespace every per-node section of the params file was ignored
(sections were keyed by bare node names, which do not match /robot1/router). Sections are now
/**/<node>; `loom bringup --namespace robot1` (one process per node, as launch starts them) must
give every node, the agent host included, the values its section sets."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import yaml

from harness import REPO, WAIT_LIMIT_S, free_port, loom_cli

# node -> {parameter: a value its section sets, unlike its default}
SET = {
    'sim_sensors': {'imu_rate_hz': 50.0, 'camera_rate_hz': 0.0, 'mic_enabled': False},
    'camera_adapter': {'max_rate_hz': 7.0},
    'router': {'stats_period_s': 2.5},
    'zenoh_bridge': {'status_period_s': 1.5},
    'lifecycle_manager': {'status_period_s': 0.7},
    'agent': {'heartbeat_period_s': 0.15},
}


def _params(tmp) -> str:
    data = yaml.safe_load((REPO / 'config' / 'loom.yaml').read_text())

    def section(name):
        return data[f'/**/{name}']['ros__parameters']
    data['/**']['ros__parameters']['storage']['root'] = str(tmp)   # every file it keeps
    for node, values in SET.items():
        section(node).update(values)
    path = tmp / 'params.yaml'
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _get(ros, node: str, names: list[str]) -> dict:
    from rcl_interfaces.srv import GetParameters
    from rclpy.parameter import parameter_value_to_python
    client = ros.node.create_client(GetParameters, f'{node}/get_parameters')
    try:
        reply = ros.call(client, GetParameters.Request(names=names), f'{node}/get_parameters')
        return {n: parameter_value_to_python(v) for n, v in zip(names, reply.values)}
    finally:
        ros.node.destroy_client(client)


def test_every_section_applies_under_a_namespace(ros, tmp_path):
    cmd = [sys.executable, *loom_cli(
        'bringup', '--namespace', 'robot1', '--config', _params(tmp_path), '--no-cloud',
        '--agents', 'counter', '--zenoh-port', str(free_port()),
        '--keys-dir', str(tmp_path / 'keys'), '--log-dir', str(tmp_path))]
    err = tmp_path / 'bringup.err'
    with open(err, 'w') as stream:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=stream, text=True)
    try:
        line = proc.stdout.readline()   # bounded: bring-up exits 1 after --ready-timeout
        if not line.startswith('{'):
            pytest.fail(f'bring-up not ready: {line!r}\n{err.read_text()[-3000:]}')
        ready = json.loads(line)
        assert ready['namespace'] == '/robot1'
        for node, values in SET.items():
            name = 'agent_host_0' if node == 'agent' else node
            got = _get(ros, f'/robot1/{name}', list(values))
            assert got == values, name
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=2 * WAIT_LIMIT_S) == 0, err.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
