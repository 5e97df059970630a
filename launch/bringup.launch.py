"""Bring up Loom on a robot: `ros2 launch loom bringup.launch.py [namespace:=robot1] ...`.

Starts the simulated sensors (when asked), the event monitor and the router, with parameters
from config/loom.yaml. Every node here also starts without launch, through the
package's own entry points (`ros2 run loom <node>` or `loom demo`), which is what the tests use.
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
    log_level = LaunchConfiguration('log_level')
    sim_sensors = LaunchConfiguration('sim_sensors')

    common = dict(
        package='loom',
        namespace=namespace,
        output='screen',
        parameters=[params_file, {'use_sim_time': use_sim_time}],
        arguments=['--ros-args', '--log-level', log_level],
    )
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
                              description='Start the simulated sensors (for a robot with none)'),
        Node(executable='sim_sensors', name='sim_sensors', condition=IfCondition(sim_sensors),
             **common),
        Node(executable='event_monitor', name='event_monitor', **common),
        # The router is a lifecycle node; with its `autostart` parameter it configures and
        # activates itself (a lifecycle manager can drive it instead).
        Node(executable='router', name='router', **common),
    ])
