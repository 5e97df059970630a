"""Each node the launch file starts (the node table), started the way launch starts it: the
installed executable with `--params-file config/loom.yaml` under a namespace (launch itself is not
installable from PyPI; test/launch/ runs the launch file where it is). It must come up
in the ROS graph under its name and end cleanly on SIGINT."""
import signal
import subprocess

import pytest

from harness import REPO
from loom_ros.bringup import nodes as table

# executable -> parameters that keep its files in the test's folder (the params file's defaults
# point at ~/.loom) and keep it from starting other processes.
NODES = {
    'sim_sensors': {'mic_enabled': 'false'},
    'camera_adapter': {},
    'router': {'history_db': '{tmp}/router.db'},
    'plugin_host': {'audit_db': '{tmp}/audit.db', 'data_dir': '{tmp}/plugins'},
    'zenoh_bridge': {'audit_db': '{tmp}/audit.db'},
    'lifecycle_manager': {'spawn': 'false', 'state_dir': '{tmp}/agents'},
}


def test_every_node_of_the_table_is_covered_here():
    assert set(NODES) == {node.executable for node in table.NODES}


@pytest.mark.parametrize('executable', list(NODES))
def test_launched_node_comes_up_and_stops_cleanly(ros, tmp_path, executable):
    namespace = f'/launch_{executable}'
    args = [str(REPO / 'install' / 'loom' / 'lib' / 'loom' / executable), '--ros-args',
            '--params-file', str(REPO / 'config' / 'loom.yaml'), '-r', f'__ns:={namespace}']
    for key, value in NODES[executable].items():
        args += ['-p', f'{key}:={value.format(tmp=tmp_path)}']
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            if proc.poll() is not None:
                pytest.fail(f'{executable} exited with {proc.returncode}:\n{proc.stdout.read()}')
            return (executable, namespace) in ros.node.get_node_names_and_namespaces()
        ros.wait_for(up, f'{executable} in the ROS graph')
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert 'Traceback' not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
