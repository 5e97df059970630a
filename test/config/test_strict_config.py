"""Strict configuration (issue 13, fault 11): every broken configuration is refused with the key
or path and the file, never a `ready` while degraded. Real files throughout: a truncated YAML, a
corrupt .tflite, a folder that is a file, a read-only and a full file system (tmpfs when root);
the nodes' own configure in-process, and a few through `loom bringup` end to end."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter

from harness import REPO, WAIT_LIMIT_S, free_port, loom_cli
from loom_ros.agents.agent_node import AgentNode
from loom_ros.agents.config import AgentConfigError, load_agents
from loom_ros.bridge.bridge_node import ZenohBridgeNode
from loom_ros.config.params import ConfigError, check_params_file, config_dir
from loom_ros.config.paths import usable_dir, usable_file
from loom_ros.plugins.actuators.config import UiConfig, load_section
from loom_ros.plugins.contract import PluginError
from loom_ros.plugins.host import PluginsFileError, load_plugins_file
from loom_ros.plugins.host_node import PluginHostNode
from loom_ros.router.policy import PolicyError, load_policy
from loom_ros.router.router_node import RouterNode

WEATHER_ONLY = """plugins:
  - name: weather
    inputs: [tool.weather.query]
    output_topic: tool.weather.result
    config:
      forecasts:
        Lisbon: [{summary: sunny, high_c: 24, low_c: 15, rain_pct: 5}]
"""


def _params(tmp: Path, edit=None) -> Path:
    """config/loom.yaml with every file under `tmp`, changed by `edit(sections)`."""
    data = yaml.safe_load((REPO / 'config' / 'loom.yaml').read_text())
    # Sections are keyed /**/<node>; edits name the node.
    sections = {name.rsplit('/', 1)[-1] if name != '/**' else name: body['ros__parameters']
                for name, body in data.items()}
    sections['/**']['storage']['root'] = str(tmp)   # every file the system keeps
    sections['plugin_host']['plugins_file'] = str(tmp / 'plugins.yaml')
    if not (tmp / 'plugins.yaml').exists():
        (tmp / 'plugins.yaml').write_text(WEATHER_ONLY)
    if edit is not None:
        edit(data, sections)
    path = tmp / 'params.yaml'
    path.write_text(yaml.safe_dump(data))
    return path


def _mount_tmpfs(path: Path, options: str) -> None:
    """A real read-only or tiny file system where permissions cannot stop root; skip without one."""
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip()}')


@pytest.fixture
def readonly_dir(tmp_path):
    path = tmp_path / 'readonly'
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    _mount_tmpfs(path, 'ro,size=64k')
    try:
        yield path
    finally:
        subprocess.run(['umount', str(path)], check=False)


@pytest.fixture
def full_dir(tmp_path):
    if os.geteuid() != 0:
        pytest.skip('a full file system needs a tmpfs mount (root)')
    path = tmp_path / 'full'
    path.mkdir()
    _mount_tmpfs(path, 'size=64k')
    try:
        fd = os.open(path / 'filler', os.O_WRONLY | os.O_CREAT)
        try:   # until the file system says it is full
            while os.write(fd, b'\0' * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        yield path
    finally:
        subprocess.run(['umount', str(path)], check=False)


@pytest.fixture
def invalid_dir(tmp_path):
    path = tmp_path / 'a_file'
    path.write_text('not a folder')
    return path


BAD_DIRS = ['readonly_dir', 'full_dir', 'invalid_dir']
REASONS = {'readonly_dir': 'read-only', 'full_dir': 'full', 'invalid_dir': 'not a folder'}


# -- the params file: unknown node sections and parameters -----------------------------------------
def test_the_shipped_params_file_passes():
    assert check_params_file(str(config_dir() / 'loom.yaml'))


def test_a_typo_in_a_parameter_is_refused_with_the_file_section_and_key(tmp_path):
    path = _params(tmp_path, lambda d, s: s['zenoh_bridge'].update(out_denny=['camera.**']))
    with pytest.raises(ConfigError) as err:
        check_params_file(str(path))
    assert str(path) in str(err.value) and 'zenoh_bridge' in str(err.value)
    assert "unknown parameter 'out_denny'" in str(err.value) and "'out_deny'" in str(err.value)


def test_an_unknown_node_section_is_refused(tmp_path):
    path = _params(tmp_path, lambda d, s: d.update(routr={'ros__parameters': {'x': 1}}))
    with pytest.raises(ConfigError, match=rf"{path}: unknown node section 'routr'"):
        check_params_file(str(path))


def test_wildcards_namespaces_and_agent_nodes_are_known(tmp_path):
    path = tmp_path / 'p.yaml'
    path.write_text(yaml.safe_dump({
        '/**': {'ros__parameters': {'autostart': False, 'use_sim_time': True}},
        '/robot1/router': {'ros__parameters': {'stats_period_s': 2.0}},
        'agent_face': {'ros__parameters': {'state_max_mb': 5.0,
                                           'bus': {'default_qos': 'batched'}}},
        'camera_adapter': {'ros__parameters': {'qos_overrides': {'/x': {'depth': 5}}}}}))
    check_params_file(str(path))
    path.write_text(yaml.safe_dump({'agent_face': {'ros__parameters': {'robot_id': 'r1'}}}))
    with pytest.raises(ConfigError, match="agent_face: unknown parameter 'robot_id'"):
        check_params_file(str(path))


# -- agents, plugins, policy and actuator files: unknown keys ---------------------------------------
def test_unknown_keys_in_agents_plugins_policy_and_actuator_files(tmp_path):
    agents = yaml.safe_load((REPO / 'config' / 'agents.yaml').read_text())
    bad = tmp_path / 'agents.yaml'
    bad.write_text(yaml.safe_dump({**agents, 'agentz': []}))
    with pytest.raises(AgentConfigError, match=rf"{bad}: unknown key 'agentz'"):
        load_agents(bad)
    agents['agents'][0]['mailbox_sise'] = 4
    bad.write_text(yaml.safe_dump(agents))
    with pytest.raises(AgentConfigError, match=rf'{bad}: agents\[0\].mailbox_sise: Extra inputs'):
        load_agents(bad)

    plugins = tmp_path / 'plugins.yaml'
    plugins.write_text(WEATHER_ONLY + 'plugin: []\n')
    with pytest.raises(PluginsFileError, match=rf"{plugins}: unknown key 'plugin'"):
        load_plugins_file(plugins)
    plugins.write_text(WEATHER_ONLY.replace('    config:', '    grant: [network]\n    config:'))
    with pytest.raises(PluginsFileError, match=rf"{plugins}: plugin 'weather': grant: Extra"):
        load_plugins_file(plugins)

    policy = tmp_path / 'policy.yaml'
    policy.write_text('default: {treshold: 0.5}\n')
    with pytest.raises(PolicyError, match=rf'{policy}: default.treshold: Extra inputs'):
        load_policy(policy)
    policy.write_text('budgett: {limit: 1}\n')
    with pytest.raises(PolicyError, match=rf'{policy}: budgett: Extra inputs'):
        load_policy(policy)

    actuators = yaml.safe_load((REPO / 'config' / 'actuators.yaml').read_text())
    bad = tmp_path / 'actuators.yaml'
    bad.write_text(yaml.safe_dump({**actuators, 'robot_contrl': {}}))
    with pytest.raises(PluginError, match=rf"{bad}: unknown key 'robot_contrl'"):
        load_section('ui', UiConfig, {}, str(bad))
    actuators['ui']['colour'] = [1, 1, 1, 1]
    bad.write_text(yaml.safe_dump(actuators))
    with pytest.raises(PluginError, match=rf"{bad}: ui: unknown key 'colour'"):
        load_section('ui', UiConfig, {}, str(bad))


# -- paths ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('which', BAD_DIRS)
def test_unusable_folders_are_refused_naming_the_key_and_path(request, which):
    folder = request.getfixturevalue(which)
    with pytest.raises(ConfigError) as err:
        usable_dir(folder, 'storage.root')
    assert f'storage.root {folder}' in str(err.value) and REASONS[which] in str(err.value)
    with pytest.raises(ConfigError, match='plugin_host.audit_db'):
        usable_file(folder / 'audit.db', 'plugin_host.audit_db')


# -- the nodes' configure, in this process --------------------------------------------------------
def _configure(node) -> TransitionCallbackReturn:
    try:
        return node.trigger_configure()
    finally:
        node.destroy_node()


@pytest.mark.parametrize('which', BAD_DIRS)
def test_agent_node_refuses_a_bad_storage_root_and_every_agent_says_why(ros, request, which):
    folder = request.getfixturevalue(which)
    node = AgentNode(context=ros.node.context, parameter_overrides=[
        Parameter('storage.root', value=str(folder)), Parameter('autostart', value=False)])
    assert _configure(node) == TransitionCallbackReturn.FAILURE
    assert set(node.failed) == {'counter'}
    assert str(folder) in node.failed['counter'] and REASONS[which] in node.failed['counter']


def test_router_refuses_an_unusable_or_corrupt_history_db(ros, tmp_path, invalid_dir):
    for db, why in ((invalid_dir / 'router.db', 'not a folder'),
                    (tmp_path / 'corrupt.db', 'file is not a database')):
        if db.parent == tmp_path:
            db.write_bytes(b'this is no SQLite file' * 100)
        node = RouterNode(context=ros.node.context,
                          parameter_overrides=[Parameter('history_db', value=str(db))])
        assert _configure(node) == TransitionCallbackReturn.FAILURE
        assert 'router.history_db' in node.configure_error and why in node.configure_error
        assert str(db.parent if why == 'not a folder' else db) in node.configure_error


def _host(ros, tmp_path, plugins: str, **params) -> PluginHostNode:
    path = tmp_path / 'plugins.yaml'
    path.write_text(plugins)
    values = {'plugins_file': str(path), 'audit_db': str(tmp_path / 'audit.db'),
              'data_dir': str(tmp_path / 'data'), 'guard': False, **params}
    return PluginHostNode(context=ros.node.context, parameter_overrides=[
        Parameter(k, value=v) for k, v in values.items()])


def test_plugin_host_refuses_a_truncated_plugins_file(ros, tmp_path):
    node = _host(ros, tmp_path, WEATHER_ONLY[:40])   # cut inside the first entry
    assert _configure(node) == TransitionCallbackReturn.FAILURE
    assert f'{tmp_path / "plugins.yaml"}: not valid YAML' in node.configure_error


@pytest.mark.parametrize('model', ['missing', 'corrupt'])
def test_plugin_host_refuses_a_missing_or_corrupt_model_naming_the_path(ros, tmp_path, model):
    path = tmp_path / f'{model}.tflite'
    if model == 'corrupt':
        path.write_bytes(b'TFL3' + bytes(range(256)) * 8)
    node = _host(ros, tmp_path, WEATHER_ONLY + f"""  - name: face_expression
    grants: [camera.read]
    config: {{model_path: "{path}"}}
""")
    assert _configure(node) == TransitionCallbackReturn.FAILURE
    assert 'plugin face_expression' in node.configure_error and str(path) in node.configure_error
    assert ('file not found' if model == 'missing' else 'corrupt') in node.configure_error


def test_a_plugin_marked_not_required_may_fail_and_the_host_runs_degraded(ros, tmp_path):
    node = _host(ros, tmp_path, WEATHER_ONLY + f"""  - name: face_expression
    required: false
    config: {{model_path: "{tmp_path / 'missing.tflite'}"}}
""")
    assert _configure(node) == TransitionCallbackReturn.SUCCESS
    assert node.configure_error == ''


def test_plugin_host_refuses_an_unusable_audit_db(ros, tmp_path, invalid_dir):
    node = _host(ros, tmp_path, WEATHER_ONLY, audit_db=str(invalid_dir / 'audit.db'))
    assert _configure(node) == TransitionCallbackReturn.FAILURE
    assert f'plugin_host.audit_db (its folder) {invalid_dir}' in node.configure_error


def test_bridge_refuses_a_bad_robot_id(ros, tmp_path):
    node = ZenohBridgeNode(context=ros.node.context, parameter_overrides=[
        Parameter('robot_id', value='robot/1')])
    assert _configure(node) == TransitionCallbackReturn.FAILURE
    assert "robot_id 'robot/1'" in node.configure_error and 'one Zenoh key' in node.configure_error


# -- end to end through `loom bringup` --------------------------------------------------------------

def _bringup(params: Path, *extra: str) -> subprocess.CompletedProcess:
    keys_dir = params.parent / 'keys'   # never the user's ~/.loom/keys
    return subprocess.run(
        [sys.executable, *loom_cli('bringup', '--config', str(params), '--no-cloud',
                                   '--no-sim-sensors', '--agents', 'counter', '--zenoh-port',
                                   str(free_port()), '--duration', '0.1', '--keys-dir',
                                   str(keys_dir), *extra)],
        # Six node processes and an agent host start: twice the usual bound on a loaded machine.
        cwd=REPO, capture_output=True, text=True, timeout=2 * WAIT_LIMIT_S)


def _refused(result, *needles: str) -> str:
    reason = [line for line in result.stderr.splitlines() if line.startswith('loom bringup:')]
    assert result.returncode == 1, result.stderr[-3000:]
    assert '"ready"' not in result.stdout, result.stdout
    assert reason, result.stderr[-3000:]
    for needle in needles:
        assert needle in reason[-1], reason[-1]
    return reason[-1]


def test_bringup_refuses_a_typo_before_starting_anything(tmp_path):
    params = _params(tmp_path, lambda d, s: s['zenoh_bridge'].update(out_denny=['camera.**']))
    _refused(_bringup(params), str(params), "unknown parameter 'out_denny'")


def test_bringup_exits_with_the_bridge_reason_for_a_bad_robot_id(tmp_path):
    params = _params(tmp_path, lambda d, s: s['zenoh_bridge'].update(robot_id='robot/1'))
    _refused(_bringup(params), 'zenoh_bridge', "robot_id 'robot/1'")


def test_bringup_exits_at_once_for_an_unusable_storage_root(tmp_path, invalid_dir):
    params = _params(tmp_path, lambda d, s: s['/**']['storage'].update(root=str(invalid_dir)))
    # Checked by bring-up before anything starts (every node keeps its files under it).
    _refused(_bringup(params, '--no-bridge'), 'storage.root', str(invalid_dir), 'not a folder')


def test_bringup_exits_with_the_path_of_a_corrupt_model(tmp_path):
    model = tmp_path / 'corrupt.tflite'
    model.write_bytes(b'TFL3' + bytes(range(256)) * 8)
    (tmp_path / 'plugins.yaml').write_text(WEATHER_ONLY + f"""  - name: face_expression
    grants: [camera.read]
    config: {{model_path: "{model}"}}
""")
    _refused(_bringup(_params(tmp_path), '--no-bridge'), 'plugin_host', 'face_expression',
             str(model))


def test_bringup_with_a_good_config_is_ready(tmp_path):
    result = _bringup(_params(tmp_path), '--no-bridge')
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"ready": true' in result.stdout
