"""ament_python package `loom`: the Python package loom_ros plus launch files and configs."""
from glob import glob

from setuptools import find_packages, setup

package_name = 'loom'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(include=['loom_ros', 'loom_ros.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml') + glob('config/*.xml')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='Loom maintainers',
    maintainer_email='maintainers@loom-robotics.org',
    description='Loom: event-driven AI middleware for robots.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'loom = loom_ros.cli:main',
            'loom_status = loom_ros.telemetry.status:main',
            'sim_sensors = loom_ros.bringup.entry:sim_sensors',
            'camera_adapter = loom_ros.bringup.entry:camera_adapter',
            'loom_record = loom_ros.bringup.entry:loom_record',
            'event_monitor = loom_ros.bringup.entry:event_monitor',
            'router = loom_ros.bringup.entry:router',
            'agent = loom_ros.bringup.entry:agent',
            'lifecycle_manager = loom_ros.bringup.entry:lifecycle_manager',
            'plugin_host = loom_ros.bringup.entry:plugin_host',
            'zenoh_bridge = loom_ros.bringup.entry:zenoh_bridge',
            'storage_node = loom_ros.bringup.entry:storage_node',
            'zenoh_router = loom_ros.bringup.entry:zenoh_router',
            'loom_cloud = loom_ros.bringup.entry:loom_cloud',
        ],
        'loom.behaviors': [
            'counter = loom_ros.agents.behavior:CounterBehavior',
            'memorize = loom_ros.agents.behavior:MemorizeBehavior',
            'face = loom_ros.agents.flows.face:FaceBehavior',
            'voice = loom_ros.agents.flows.voice:VoiceBehavior',
        ],
        'loom.plugins': [
            'weather = loom_ros.plugins.tools.weather:WeatherTool',
            'calendar = loom_ros.plugins.tools.calendar:CalendarTool',
            'memory_search = loom_ros.plugins.tools.memory_search:MemorySearchTool',
            'db_query = loom_ros.plugins.tools.db_query:DbQueryTool',
            'robot_control = loom_ros.plugins.actuators.robot_control:RobotControlPlugin',
            'ui = loom_ros.plugins.actuators.ui:UiPlugin',
            'face_detector = loom_ros.plugins.perception.plugins:FaceDetectorPlugin',
            'expression = loom_ros.plugins.perception.plugins:ExpressionPlugin',
            'face_expression = loom_ros.plugins.perception.plugins:FaceExpressionPlugin',
            'embedding = loom_ros.plugins.perception.plugins:EmbeddingPlugin',
            'asr = loom_ros.plugins.speech.plugins:AsrPlugin',
            'tts = loom_ros.plugins.speech.plugins:TtsPlugin',
        ],
    },
)
