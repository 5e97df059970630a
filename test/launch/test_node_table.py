"""The node table (loom_ros/bringup/nodes.py), setup.py, `loom bringup` and the launch file agree:
the same nodes, by the same executables (console script -> the module `loom bringup` runs), with
the same names and the same parameters. The launch part runs where launch_ros is installed."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from harness import REPO, console_scripts
from loom_ros.bringup import entry
from loom_ros.bringup import nodes as table
from loom_ros.cli import bringup


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bringup.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_every_table_node_is_a_console_script_running_its_module_main():
    scripts = console_scripts()
    for node in table.NODES:
        # through the entry (loom_ros/bringup/entry.py), which starts the module's main()
        assert scripts[node.executable] == f'loom_ros.bringup.entry:{node.executable}', node.name
        assert entry.MODULES[node.executable] == node.module, node.name
        assert getattr(entry, node.executable).__name__ == node.executable
        assert callable(importlib.import_module(node.module).main)
        cls = node.load_class()
        assert cls.__module__ == node.module, node.name
        assert node.managed <= node.lifecycle   # only lifecycle nodes can be managed
    assert [n.name for n in table.NODES if n.managed] == ['router', 'plugin_host', 'storage', 'zenoh_bridge']
    assert table.NODES[-1].name == table.MANAGER   # it starts after what it manages


def test_conditions_select_nodes():
    names = lambda **c: [n.name for n in table.select(c)]  # noqa: E731
    assert names(sim_sensors=True, bridge=True) == [n.name for n in table.NODES]
    assert 'sim_sensors' not in names(bridge=True) and 'zenoh_bridge' not in names()
    assert table.managed_names(table.select({})) == ['router', 'plugin_host', 'storage']
    with pytest.raises(ValueError, match='unknown node condition'):
        table.select({'cloud_tier': True})


def _bringup_plan(tmp_path: Path, namespace: str = 'robot7') -> dict[str, dict]:
    """What `loom bringup` starts per node: module, node name, namespace and parameters."""
    args = _args(namespace=namespace, sim_sensors=True, zenoh_connect='tls/10.0.0.2:7447')
    params_file = str(REPO / 'config' / 'loom.yaml')
    robot_file = bringup.robot_params(params_file, str(tmp_path))
    agents_file = str(REPO / 'config' / 'agents.yaml')
    ids = bringup._agent_ids(args, agents_file)
    plan = {}
    for node, cmd, env in bringup.node_commands(args, bringup._selected(args), ids, agents_file,
                                                params_file, robot_file, str(tmp_path),
                                                ['--ros-args']):
        files = [cmd[i + 1] for i, a in enumerate(cmd) if a == '--params-file']
        assert files[0] == robot_file and len(files) == 2   # the robot file, then its own
        own = yaml.safe_load(Path(files[1]).read_text())
        assert list(own) == [f'/**/{node.name}']
        assert cmd[:3] == [sys.executable, '-m', 'loom_ros.bringup.entry']
        plan[node.name] = {'module': cmd[3],
                           'remaps': [cmd[i + 1] for i, a in enumerate(cmd) if a == '-r'],
                           'params': own[f'/**/{node.name}']['ros__parameters'], 'env': env}
    return plan


def test_bringup_starts_each_table_node_as_launch_would(tmp_path):
    plan = _bringup_plan(tmp_path)
    assert list(plan) == [n.name for n in table.NODES]
    for node in table.NODES:
        planned = plan[node.name]
        assert planned['module'] == node.module
        assert planned['remaps'] == [f'__node:={node.name}', '__ns:=/robot7']
        if node.managed:
            assert planned['params']['autostart'] is False
    manager = plan[table.MANAGER]['params']
    assert manager['nodes'] == ['router', 'plugin_host', 'storage', 'zenoh_bridge']
    assert manager['autostart'] is True and manager['spawn'] is True
    # face asks for its own process (agents.yaml own_process): the others share agent_host_0.
    assert manager['agents'] == 'face,voice,counter' and manager['groups'] == 'voice,counter'
    assert plan['zenoh_bridge']['params']['connect'] == ['tls/10.0.0.2:7447']


def test_agents_hosting_follows_own_process():
    assert table.agent_hosting({'face': True, 'voice': False, 'counter': False}) == \
        ('voice,counter', ['agent_host_0', 'agent_face'])
    assert table.agent_hosting({'a': True, 'b': True}) == ('', ['agent_a', 'agent_b'])
    assert table.agent_hosting({'a': False}) == ('a', ['agent_host_0'])


def test_the_agent_section_reaches_the_agent_host_through_the_robot_params_file(tmp_path):
    source = tmp_path / 'in.yaml'
    data = yaml.safe_load((REPO / 'config' / 'loom.yaml').read_text())
    data['/**/agent']['ros__parameters']['heartbeat_period_s'] = 0.25
    data['/**/zenoh_bridge']['ros__parameters']['listen'] = []
    source.write_text(yaml.safe_dump(data))
    out = yaml.safe_load(Path(bringup.robot_params(
        str(source), str(tmp_path), ['agent_host_0', 'agent_face'])).read_text())
    for name in ('agent_host_0', 'agent_face'):
        host = out[f'/**/{name}']['ros__parameters']
        assert host['heartbeat_period_s'] == 0.25 and 'agent_id' not in host
    assert 'listen' not in out['/**/zenoh_bridge']['ros__parameters']   # rcl cannot type []


def _launch_module():
    pytest.importorskip('launch')
    try:
        importlib.import_module('launch_ros.actions')
    except ImportError as exc:   # launch_ros needs composition_interfaces (built by hand here)
        pytest.skip(f'launch_ros is not usable here: {exc}')
    spec = importlib.util.spec_from_file_location('bringup_launch',
                                                  REPO / 'launch' / 'bringup.launch.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch_nodes(module, arguments: dict) -> list:
    from launch import LaunchContext
    from launch.actions import OpaqueFunction
    context = LaunchContext()
    description = module.generate_launch_description()
    for action in description.entities:
        if isinstance(action, OpaqueFunction):
            continue
        action.visit(context)   # declares the argument's default
    for name, value in arguments.items():
        context.launch_configurations[name] = value
    return module.robot_actions(context), context


def _text(context, value) -> str:
    from launch.utilities import normalize_to_list_of_substitutions, perform_substitutions
    return perform_substitutions(context, normalize_to_list_of_substitutions(value))


def test_the_launch_file_starts_the_table_with_the_same_parameters(tmp_path):
    module = _launch_module()
    actions, context = _launch_nodes(module, {
        'namespace': 'robot7', 'sim_sensors': 'true',
        'params_file': str(REPO / 'config' / 'loom.yaml')})
    plan = _bringup_plan(tmp_path)
    assert [_text(context, a.node_executable) for a in actions] == \
        [n.executable for n in table.NODES]
    for action, node in zip(actions, table.NODES):
        action._perform_substitutions(context)
        assert action.node_name == f'/robot7/{node.name}'
        files = [arg for arg, is_file in action._Node__expanded_parameter_arguments if is_file]
        assert len(files) == 2   # the robot params file, then the node's own parameters
        robot = yaml.safe_load(Path(files[0]).read_text())
        assert robot == yaml.safe_load(Path(bringup.robot_params(
            str(REPO / 'config' / 'loom.yaml'), str(tmp_path),
            ['agent_host_0', 'agent_face'])).read_text())
        # launch_ros writes lists as `!!python/tuple` (rcl reads them as sequences).
        own = yaml.load(Path(files[1]).read_text(), Loader=yaml.FullLoader)
        own = {k: list(v) if isinstance(v, tuple) else v
               for k, v in own[f'/robot7/{node.name}']['ros__parameters'].items()}
        assert own.pop('use_sim_time') is False
        expected = dict(plan[node.name]['params'])
        if node.name == 'zenoh_bridge':   # bring-up also points the bridge at its own router
            for key in ('connect', 'keys_dir', 'insecure'):
                expected.pop(key)
        if node.name == 'storage':   # and storage/forget's fleet erasure at that router
            for key in ('forget.fleet_connect', 'forget.keys_dir', 'forget.identity',
                        'forget.insecure'):
                expected.pop(key)
        if node.name == table.MANAGER:    # each writes its own copy of the robot params file
            assert Path(own.pop('agent_params_file')).name == 'params.yaml'
            expected.pop('agent_params_file')
            expected.pop('agents_file')   # bring-up names the file; launch leaves '' (shipped)
        assert own == expected, node.name


def test_use_composition_runs_one_bringup_process_without_renaming_its_nodes():
    module = _launch_module()
    actions, context = _launch_nodes(module, {'use_composition': 'true', 'bridge': 'false'})
    assert len(actions) == 1
    assert _text(context, actions[0].node_executable) == 'loom'
    actions[0]._perform_substitutions(context)
    cmd = [_text(context, part) for part in actions[0].cmd]
    assert cmd[1:4] == ['bringup', '--composition', '--nodes-only'] and '--no-bridge' in cmd
    assert not any(part.startswith('__node:=') for part in cmd)   # would rename every node
