"""The colcon workspace as a ROS user gets it: both packages installed, scripts where `ros2 run`
looks, share files in place, and package.xml in format 3."""
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from ament_index_python.packages import get_package_prefix, get_package_share_directory

from harness import REPO


def test_package_xml_is_format_3_ament_python():
    root = ET.parse(REPO / 'package.xml').getroot()
    assert root.get('format') == '3' and root.findtext('name') == 'loom'
    assert root.find('export/build_type').text == 'ament_python'
    assert {'rclpy', 'loom_msgs'} <= {d.text for d in root.findall('exec_depend')}


def test_both_packages_are_in_the_ament_index():
    assert Path(get_package_share_directory('loom_msgs'), 'msg', 'Event.msg').is_file()
    share = Path(get_package_share_directory('loom'))
    assert (share / 'config' / 'loom.yaml').is_file()
    assert (share / 'launch' / 'bringup.launch.py').is_file()


def test_node_executables_are_where_ros2_run_looks():
    lib = Path(get_package_prefix('loom')) / 'lib' / 'loom'
    for name in ('loom', 'sim_sensors', 'event_monitor'):
        assert os.access(lib / name, os.X_OK), name
    out = subprocess.run([str(lib / 'loom'), '--help'], capture_output=True, text=True, check=True)
    assert 'demo' in out.stdout and 'echo' in out.stdout


def test_launch_file_starts_only_installed_executables():
    """launch_ros is not installable here; check the file's nodes against what colcon installed."""
    import ast
    tree = ast.parse((REPO / 'launch' / 'bringup.launch.py').read_text())
    executables = {node.value.value for node in ast.walk(tree) if isinstance(node, ast.keyword)
                   and node.arg == 'executable' and isinstance(node.value, ast.Constant)}
    lib = Path(get_package_prefix('loom')) / 'lib' / 'loom'
    assert executables and all((lib / name).is_file() for name in executables), executables
