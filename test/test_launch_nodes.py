"""Each node the launch file starts (the node table), started the way launch starts it: the
installed executable with `--params-file config/loom.yaml` under a namespace (launch itself is not
installable from PyPI; test/launch/ runs the launch file where it is). It must come up
in the ROS graph under its name and end cleanly on SIGINT."""
import signal
import subprocess

import pytest
import yaml

from harness import REPO
from loom_ros.bringup import nodes as table

# executable -> parameters that keep it from starting other processes (every node also gets
# storage.root: the test's folder, not ~/.loom; the bridge the test's credentials). Given in a
# second params file: a `-p` override loses to the first file's /**/<node> section.
NODES = {
    'sim_sensors': {'mic_enabled': False},
    'camera_adapter': {},
    'router': {},
    'plugin_host': {},
    'storage_node': {'storage': {'embedder': 'hash'}},
    'zenoh_bridge': {},   # secure, with credentials made under the test's storage.root
    'lifecycle_manager': {'spawn': False},
}


def test_every_node_of_the_table_is_covered_here():
    assert set(NODES) == {node.executable for node in table.NODES}


@pytest.mark.parametrize('executable', list(NODES))
def test_launched_node_comes_up_and_stops_cleanly(ros, tmp_path, executable):
    namespace = f'/launch_{executable}'
    name = next(n.name for n in table.NODES if n.executable == executable)
    if executable == 'zenoh_bridge':
        from loom_ros.security import keys
        keys.ensure_local(tmp_path / 'keys', {'router': 'router', 'robot1': 'robot',
                                              'cloud': 'cloud'})
    overrides = tmp_path / 'overrides.yaml'
    overrides.write_text(yaml.safe_dump({
        '/**': {'ros__parameters': {'storage': {'root': str(tmp_path)}}},
        f'/**/{name}': {'ros__parameters': NODES[executable] or {'use_sim_time': False}}}))
    args = [str(REPO / 'install' / 'loom' / 'lib' / 'loom' / executable), '--ros-args',
            '--params-file', str(REPO / 'config' / 'loom.yaml'), '--params-file', str(overrides),
            '-r', f'__ns:={namespace}']
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            if proc.poll() is not None:
                pytest.fail(f'{executable} exited with {proc.returncode}:\n{proc.stdout.read()}')
            return (name, namespace) in ros.node.get_node_names_and_namespaces()
        ros.wait_for(up, f'{executable} in the ROS graph')
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert 'Traceback' not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
