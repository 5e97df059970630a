"""Loom's node table: the one declaration of the robot's nodes that `ros2 launch loom
bringup.launch.py` and `loom bringup` both start from (Nav2 style: one ordered list, the lifecycle
nodes among them brought up by one lifecycle manager).

Each entry says the node's name, its console script (setup.py), the module whose `main()` that
script runs (what `loom bringup` starts with `python -m`, the same code without an install), the
node class (what `loom bringup --composition` builds in one process), whether it is a lifecycle
node managed by the lifecycle manager (then it gets `autostart: false` and the manager configures
and activates it in table order), and the launch argument / bring-up switch it depends on.

Plain Python, no rclpy: launch files, the CLI and tests import it without a ROS context.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Mapping

from loom_ros.bus.qos import fastdds_environment
from loom_ros.config.params import config_dir

# Conditions a node can depend on; each is a launch argument and a `loom bringup` switch.
CONDITIONS = ('sim_sensors', 'bridge')
MANAGER = 'lifecycle_manager'


@dataclass(frozen=True)
class LoomNode:
    """One node of the robot: how to start it alone, or build it in a shared process."""

    name: str                  # node name, relative to the robot's namespace
    executable: str            # console script in setup.py (lib/loom/<executable>)
    module: str                # module whose main() the script runs
    node_class: str            # 'module:Class' for the one-process form
    lifecycle: bool = False
    managed: bool = False      # brought up by the lifecycle manager (autostart false)
    condition: str = ''        # one of CONDITIONS that must be true ('' = always started)
    respawn: bool = True       # started again when its process dies (launch's respawn)
    env: Mapping[str, str] = field(default_factory=dict)   # extra environment of its process
    # The SECRET_ENV variables its process needs (it opens storage with encryption or the
    # object store, or starts processes that do); the others are not handed to it (node_env).
    secrets: tuple[str, ...] = ()

    def load_class(self):
        """The node class (imports rclpy and the node's module)."""
        module, _, name = self.node_class.partition(':')
        return getattr(importlib.import_module(module), name)


# Secrets bring-up finds in its environment and hands only to the nodes that name them in
# `secrets`: the storage master key (security/keyring.py) and the S3 keys (storage/backend).
# The storage node opens both (lifecycle, forget); the lifecycle manager starts the agent hosts
# (each agent's Storage: its keyring and blobs) and, with composition, hosts them itself. The
# others open no keyring nor object store: the router and the bridge read consent and write
# plain databases, the plugin host's memory_search reads without a keyring, the sensors keep
# nothing.
MASTER_KEY_ENV = 'LOOM_STORAGE_MASTER_KEY'     # security/keyring.MASTER_KEY_ENV
S3_KEY_ENV = ('LOOM_S3_ACCESS_KEY', 'LOOM_S3_SECRET_KEY')   # storage/backend (both or neither)
SECRET_ENV = (MASTER_KEY_ENV, *S3_KEY_ENV)
STORAGE_SECRETS = SECRET_ENV

# In start order; managed lifecycle nodes are brought up in this order, then the agents.
NODES: tuple[LoomNode, ...] = (
    LoomNode('sim_sensors', 'sim_sensors', 'loom_ros.sensors.sim_sensors_node',
             'loom_ros.sensors.sim_sensors_node:SimSensorsNode', condition='sim_sensors'),
    LoomNode('camera_adapter', 'camera_adapter', 'loom_ros.sensors.camera_adapter_node',
             'loom_ros.sensors.camera_adapter_node:CameraAdapterNode'),
    LoomNode('router', 'router', 'loom_ros.router.router_node',
             'loom_ros.router.router_node:RouterNode', lifecycle=True, managed=True),
    LoomNode('plugin_host', 'plugin_host', 'loom_ros.plugins.host_node',
             'loom_ros.plugins.host_node:PluginHostNode', lifecycle=True, managed=True),
    # The data lifecycle (hot > warm > cold > archive), budgets and storage/query over every
    # database under storage.root.
    LoomNode('storage', 'storage_node', 'loom_ros.storage.ros2.node',
             'loom_ros.storage.ros2.node:StorageNode', lifecycle=True, managed=True,
             secrets=STORAGE_SECRETS),
    LoomNode('zenoh_bridge', 'zenoh_bridge', 'loom_ros.bridge.bridge_node',
             'loom_ros.bridge.bridge_node:ZenohBridgeNode', lifecycle=True, managed=True,
             condition='bridge'),
    # Brings up the nodes above and the agents (which it starts itself: agent_host_0).
    LoomNode(MANAGER, 'lifecycle_manager', 'loom_ros.bringup.lifecycle_manager_node',
             'loom_ros.bringup.lifecycle_manager_node:LifecycleManagerNode',
             secrets=STORAGE_SECRETS),
)

# Environment every Loom process gets (the node's own `env` is added on top).
# glibc maps every buffer over 128 KiB afresh (and unmaps it on free), so each copy of a 786 KB
# camera frame paid page faults: the camera adapter's work took 8 ms P50 by default and 0.5 ms
# with these (bench/camera_bench.py --loom-malloc; docs/face_flow_latency.md).
COMMON_ENV: Mapping[str, str] = {'MALLOC_MMAP_THRESHOLD_': '4194304',
                                 'MALLOC_TRIM_THRESHOLD_': '16777216'}
# How long a node may take to stop after SIGINT before SIGTERM/SIGKILL: the manager stops its
# agents first (up to 10 s each, state committed), and a Python node on a loaded 2-core machine
# was measured taking 3 s to exit; launch's default of 5 s cut every node short here.
STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class SideProcess:
    """A process `loom bringup` starts beside the nodes, as a robot's fleet would run it
    (launch leaves these to the fleet: a robot connects to its zenohd and cloud)."""

    name: str
    module: str
    condition: str    # the `loom bringup` switch that starts it


SIDE_PROCESSES: tuple[SideProcess, ...] = (
    SideProcess('zenoh_router', 'loom_ros.bridge.zenoh_router', 'zenoh_router'),
    SideProcess('cloud', 'loom_ros.cloud.server', 'cloud'),
)


def select(conditions: Mapping[str, bool], table: tuple[LoomNode, ...] = NODES) -> list[LoomNode]:
    """The nodes to start, in order, given each condition's value (missing: false)."""
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f'unknown node condition(s) {unknown} (known: {", ".join(CONDITIONS)})')
    return [n for n in table if not n.condition or conditions.get(n.condition, False)]


def managed_names(selected: list[LoomNode]) -> list[str]:
    """The lifecycle manager's `nodes` parameter: managed nodes in bring-up order."""
    return [n.name for n in selected if n.managed]


def by_name(name: str, table: tuple[LoomNode, ...] = NODES) -> LoomNode:
    for node in table:
        if node.name == name:
            return node
    raise KeyError(f'no Loom node {name!r} (have: {", ".join(n.name for n in table)})')


SHARED_HOST = 'agent_host_0'   # the lifecycle manager's name for its first agents group


def agent_hosting(own_process: Mapping[str, bool]) -> tuple[str, list[str]]:
    """How the agents are hosted, from {agent id: own_process} in bring-up order: the manager's
    `groups` (every agent that does not ask for its own process, together in agent_host_0) and
    the agent host node names that result (agent_host_0, then agent_<id> for each agent alone)."""
    shared = [a for a, alone in own_process.items() if not alone]
    hosts = ([SHARED_HOST] if shared else []) + \
        [f'agent_{a}' for a, alone in own_process.items() if alone]
    return ','.join(shared), hosts


def node_parameters(node: LoomNode, selected: list[LoomNode], *, autostart,
                    agents: str, groups: str, agents_file: str = '',
                    agent_params_file: str = '') -> dict:
    """What a node gets on top of the params file, the same from launch and `loom bringup`:
    a managed lifecycle node waits for the manager (autostart false); the manager gets the
    managed nodes in order, the agents it starts and whether to bring everything up at once.
    Values may be launch substitutions (autostart, files) where launch calls this."""
    if node.managed:
        return {'autostart': False}
    if node.name == MANAGER:
        params = {'nodes': managed_names(selected), 'autostart': autostart, 'spawn': True,
                  'agents': agents, 'groups': groups}
        if agents_file:
            params['agents_file'] = agents_file
        if agent_params_file:
            params['agent_params_file'] = agent_params_file
        return params
    return {}


def without_secrets(base: Mapping[str, str], keep: tuple[str, ...] = ()) -> dict[str, str]:
    """`base` without the SECRET_ENV variables not in `keep` (also for the side processes: the
    Zenoh router and the cloud tier open no storage of the robot)."""
    return {k: v for k, v in base.items() if k not in SECRET_ENV or k in keep}


def node_env(node: LoomNode, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of a node's process: `base` without the SECRET_ENV variables the node
    does not need (node.secrets), Loom's Fast DDS profile (camera frames across processes;
    nothing when `base` sets its own or another rmw), COMMON_ENV, the node's own."""
    return {**without_secrets(base, node.secrets), **fastdds_environment(base, config_dir()),
            **COMMON_ENV, **node.env}


def env_additions(node: LoomNode, base: Mapping[str, str]) -> dict[str, str]:
    """What node_env adds to or changes in `base` (launch's additional_env, which can add and
    change, not remove): a secret of `base` the node does not need is set to '' (what the
    keyring and the object store read as unset)."""
    env = node_env(node, base)
    changed = {k: v for k, v in env.items() if base.get(k) != v}
    return {**changed, **{k: '' for k in SECRET_ENV if k in base and k not in env}}
