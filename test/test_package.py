"""The colcon workspace as a ROS user gets it: both packages installed, scripts where `ros2 run`
looks, share files in place, package.xml in format 3 and honest (every ROS package the code
imports is declared)."""
import ast
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from ament_index_python.packages import get_package_prefix, get_package_share_directory

from harness import REPO
from loom_ros.bringup import nodes as table

# Python packages that are ROS packages (rosdep resolves them by their own name).
ROS_PACKAGE_SUFFIXES = ('_msgs', '_srvs', '_interfaces')
ROS_PACKAGES = {'rclpy', 'launch', 'launch_ros', 'ament_index_python', 'launch_testing',
                'launch_testing_ros'}


def _imported_top_level(paths) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text(encoding='utf-8'))):
            if isinstance(node, ast.Import):
                names |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split('.')[0])
    return names


def test_package_xml_is_format_3_ament_python():
    root = ET.parse(REPO / 'package.xml').getroot()
    assert root.get('format') == '3' and root.findtext('name') == 'loom'
    assert root.find('export/build_type').text == 'ament_python'
    assert {'rclpy', 'loom_msgs'} <= {d.text for d in root.findall('exec_depend')}


def test_package_xml_declares_every_ros_package_the_code_imports():
    root = ET.parse(REPO / 'package.xml').getroot()
    declared = {d.text for d in root.findall('exec_depend')}
    code = [*REPO.glob('loom_ros/**/*.py'), *REPO.glob('launch/*.py')]
    imported = {n for n in _imported_top_level(code)
                if n in ROS_PACKAGES or n.endswith(ROS_PACKAGE_SUFFIXES)}
    assert {'sensor_msgs', 'lifecycle_msgs', 'std_srvs', 'launch_ros'} <= imported  # the check sees
    assert imported - declared == set(), f'imported but not in package.xml: {imported - declared}'
    tests = {n for n in _imported_top_level(REPO.glob('test/**/*.py'))
             if n in ROS_PACKAGES or n.endswith(ROS_PACKAGE_SUFFIXES)}
    test_declared = declared | {d.text for d in root.findall('test_depend')}
    assert tests - test_declared == set(), f'tests import undeclared: {tests - test_declared}'


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


def test_every_node_of_the_table_is_an_installed_executable():
    """The launch file starts table entries by executable; colcon installed each one."""
    lib = Path(get_package_prefix('loom')) / 'lib' / 'loom'
    for node in table.NODES:
        assert os.access(lib / node.executable, os.X_OK), node.executable
