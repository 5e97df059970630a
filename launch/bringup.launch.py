"""Bring up Loom on a robot: `ros2 launch loom bringup.launch.py [namespace:=robot1] ...`.

Starts the lifecycle manager (which starts the agents of config/agents.yaml in one host process
and brings them up), the router, the plugin host, the Zenoh bridge, the camera adapter (camera
Images -> camera.front events) and, when asked, the simulated sensors, all with parameters from
the params file (config/loom.yaml by default). The lifecycle nodes configure and activate
themselves when `autostart` is true. The same system starts without launch through the package's
own entry point, `loom bringup --config config/loom.yaml` (what the tests use).
Uses only launch / launch_ros APIs present in Jazzy and Kilted.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def generate_launch_description():
    namespace = LaunchConfiguration('namespace')
    params_file = LaunchConfiguration('params_file')
    use_sim_time = LaunchConfiguration('use_sim_time')
    autostart = LaunchConfiguration('autostart')
    log_level = LaunchConfiguration('log_level')
    sim_sensors = LaunchConfiguration('sim_sensors')

    def node(executable, name, lifecycle=False, extra=None):
        overrides = {'use_sim_time': use_sim_time}
        if lifecycle:
            overrides['autostart'] = autostart
        overrides.update(extra or {})
        return Node(package='loom', executable=executable, name=name, namespace=namespace,
                    output='screen', parameters=[params_file, overrides],
                    arguments=['--ros-args', '--log-level', log_level])

    return LaunchDescription([
        DeclareLaunchArgument('namespace', default_value='',
                              description='Robot namespace; Loom topics live under <ns>/loom/...'),
        DeclareLaunchArgument(
            'params_file',
            default_value=PathJoinSubstitution([FindPackageShare('loom'), 'config', 'loom.yaml']),
            description='ROS params file for all Loom nodes'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='Use /clock (simulation or bag replay)'),
        DeclareLaunchArgument('autostart', default_value='true',
                              description='Configure and activate lifecycle nodes on start'),
        DeclareLaunchArgument('log_level', default_value='info',
                              description='debug, info, warn, error'),
        DeclareLaunchArgument('sim_sensors', default_value='false',
                              description='Start the simulated sensors (camera, mic, IMU)'),
        Node(package='loom', executable='sim_sensors', name='sim_sensors', namespace=namespace,
             output='screen', condition=IfCondition(sim_sensors),
             parameters=[params_file, {'use_sim_time': use_sim_time}],
             arguments=['--ros-args', '--log-level', log_level]),
        node(executable='camera_adapter', name='camera_adapter'),
        node(executable='router', name='router', lifecycle=True),
        node(executable='plugin_host', name='plugin_host', lifecycle=True),
        node(executable='zenoh_bridge', name='zenoh_bridge', lifecycle=True),
        # Starts the agents (hosted together: agent_host_0) and brings them up in order.
        node(executable='lifecycle_manager', name='lifecycle_manager', lifecycle=True,
             extra={'agent_params_file': params_file, 'groups': 'face,voice,counter'}),
    ])
