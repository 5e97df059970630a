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
            'sim_sensors = loom_ros.sensors.sim_sensors_node:main',
            'camera_adapter = loom_ros.sensors.camera_adapter_node:main',
            'loom_record = loom_ros.cli.record:main',
            'event_monitor = loom_ros.bus.event_monitor_node:main',
            'router = loom_ros.router.router_node:main',
            'agent = loom_ros.agents.agent_node:main',
            'lifecycle_manager = loom_ros.bringup.lifecycle_manager_node:main',
            'plugin_host = loom_ros.plugins.host_node:main',
            'zenoh_bridge = loom_ros.bridge.bridge_node:main',
            'storage_node = loom_ros.storage.ros2.node:main',
            'zenoh_router = loom_ros.bridge.zenoh_router:main',
            'loom_cloud = loom_ros.cloud.server:main',
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
