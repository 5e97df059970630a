"""Bring up Loom on a robot: `ros2 launch loom bringup.launch.py [namespace:=robot1] ...`.

The nodes come from Loom's node table (loom_ros/bringup/nodes.py), the same declaration
`loom bringup` starts from: sim_sensors (when asked), camera_adapter, router, plugin_host,
storage, zenoh_bridge (unless bridge:=false) and the lifecycle_manager, each in its own process
with respawn. The lifecycle nodes start with autostart false; the manager configures and
activates them in table order, then starts the agents of the agents file (together in
agent_host_0, or alone as agent_<id> when the agents file says own_process) and brings them up; with autostart:=false it waits for its ~/startup service. Every node gets the
params file (config/loom.yaml by default; its sections are keyed /**/<node>, so a namespace keeps
them), rewritten the way `loom bringup` rewrites it (empty lists dropped, the /**/agent section
given to every agent host), then its own parameters from the table.

use_composition:=true runs every node in one process instead (intra-process fast path). Loom's
nodes are Python, and rclpy has no component container (launch_ros' ComposableNodeContainer loads
C++ components only), so this starts the one process `loom bringup --composition --nodes-only`,
which builds the same table's nodes there, each on its own executor thread.
When the launch ends, the Fast DDS shared memory its dead nodes left is given back, as `loom
bringup` gives it back (only dead owners' segments). Uses only launch / launch_ros APIs present in Jazzy and Kilted.
"""
import atexit
import os
import sys
import tempfile

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from loom_ros.bringup import nodes as table

# (name, default, description); `loom bringup` has a switch for each condition.
ARGUMENTS = (
    ('namespace', '', 'Robot namespace; Loom topics live under <ns>/loom/...'),
    ('params_file', None, 'ROS params file for all Loom nodes (default: the shipped loom.yaml)'),
    ('agents_file', '', "Agents YAML ('' = the shipped config/agents.yaml)"),
    ('use_sim_time', 'false', 'Use /clock (simulation or bag replay)'),
    ('autostart', 'true', 'Bring the lifecycle nodes and agents up at once (false: on the '
     "manager's ~/startup service)"),
    ('use_composition', 'false', 'Every node in one process (loom bringup --composition)'),
    ('log_level', 'info', 'debug, info, warn, error'),
    ('sim_sensors', 'false', 'Start the simulated sensors (camera, mic, IMU)'),
    ('bridge', 'true', 'Start the Zenoh bridge (to the fleet router named in the params file)'),
)
RESPAWN_DELAY_S = 2.0


def _true(value: str) -> bool:
    return value.strip().lower() in ('true', '1', 'yes', 'on')


def robot_actions(context):
    """The table's nodes for this launch's arguments (evaluated when launch runs)."""
    from loom_ros.agents.config import load_agents
    from loom_ros.cli.bringup import robot_params
    from loom_ros.config.params import config_dir
    value = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    ns, log_level = value['namespace'], value['log_level']
    conditions = {c: _true(value[c]) for c in table.CONDITIONS}
    if _true(value['use_composition']):
        args = ['bringup', '--composition', '--nodes-only', '--config', value['params_file'],
                '--namespace', ns, '--agents-file', value['agents_file']]
        args += [] if conditions['sim_sensors'] else ['--no-sim-sensors']
        args += [] if conditions['bridge'] else ['--no-bridge']
        args += [] if _true(value['autostart']) else ['--no-autostart']
        # No name/namespace here: a __node remap would rename every node of the process.
        return [Node(package='loom', executable='loom', output='screen', arguments=args,
                     additional_env=table.env_additions(table.by_name(table.MANAGER),
                                                        os.environ),
                     # bring-up stops the manager, then the rest, each within STOP_TIMEOUT_S
                     sigterm_timeout=str(3 * table.STOP_TIMEOUT_S),
                     ros_arguments=['--log-level', log_level, '-p',
                                    f'use_sim_time:={value["use_sim_time"]}'])]
    agents_file = value['agents_file'] or str(config_dir() / 'agents.yaml')
    configs = load_agents(agents_file)
    ids = ','.join(configs)
    # Agents that ask for their own process run alone (agent_<id>), the rest in agent_host_0.
    groups, hosts = table.agent_hosting({a: c.own_process for a, c in configs.items()})
    # Kept for the launch's life (the agent processes read it when the manager restarts them).
    robot_file = robot_params(value['params_file'], tempfile.mkdtemp(prefix='loom_launch_'),
                              hosts)
    selected = table.select(conditions)
    actions = []
    for node in selected:
        params = table.node_parameters(
            node, selected, autostart=_true(value['autostart']), agents=ids, groups=groups,
            agents_file=value['agents_file'], agent_params_file=robot_file)
        params['use_sim_time'] = _true(value['use_sim_time'])
        actions.append(Node(
            package='loom', executable=node.executable, name=node.name, namespace=ns,
            output='screen', respawn=node.respawn, respawn_delay=RESPAWN_DELAY_S,
            sigterm_timeout=str(table.STOP_TIMEOUT_S),
            parameters=[robot_file, params],
            additional_env=table.env_additions(node, os.environ),
            arguments=['--ros-args', '--log-level', log_level]))
    return actions


def _give_back_shared_memory() -> None:
    """At the launch process's exit, once every node it started has stopped (launch waits for
    them, SIGKILLs the late ones): the Fast DDS segments dead processes left in /dev/shm, which
    a killed or respawned node never releases, as `loom bringup` does when its nodes are gone.
    Only segments whose owner is dead (bringup/shm.py); the launch goes on if it cannot."""
    from loom_ros.bringup.shm import clean_dead_segments
    try:
        cleaned = clean_dead_segments()
    except Exception as exc:  # noqa: BLE001 - an exit hook must not turn a clean exit into a trace
        print(f'loom launch: shared-memory pass failed: {exc!r}'[:300], file=sys.stderr)
        return
    if cleaned.segments or cleaned.error:
        print(f'loom launch: {cleaned}', file=sys.stderr)


def generate_launch_description():
    atexit.register(_give_back_shared_memory)
    declared = []
    for name, default, description in ARGUMENTS:
        if default is None:   # the shipped params file, found in the install
            default = PathJoinSubstitution([FindPackageShare('loom'), 'config', 'loom.yaml'])
        declared.append(DeclareLaunchArgument(name, default_value=default,
                                              description=description))
    return LaunchDescription([*declared, OpaqueFunction(function=robot_actions)])
