"""An agent's `host_plugins` (issue 15): the agent host runs those entries of the plugins file in
its own process, on the plugin host's settings (grants, guard, audit log, data folder, from the
params file it was started with), and its behavior calls them in-process. With no plugin host at
all the face agent still turns the astronaut photo into the happy emoji; a name the plugins file
lacks, or a grant the host settings do not allow, fails configure with the reason."""
import sqlite3

import pytest
import yaml

from harness import REPO

NS = '/hp'


def _agents_file(tmp_path, host_plugins):
    data = yaml.safe_load((REPO / 'config' / 'agents.yaml').read_text())
    face = next(a for a in data['agents'] if a['id'] == 'face')
    face['host_plugins'] = host_plugins
    path = tmp_path / 'agents.yaml'
    path.write_text(yaml.safe_dump({'agents': [face]}))
    return path


def _audit_rows(path):
    try:
        with sqlite3.connect(f'file:{path}?mode=ro', uri=True) as db:
            return db.execute('select plugin, kind from audit').fetchall()
    except sqlite3.OperationalError:
        return []


def test_face_agent_calls_its_host_plugin_in_process_with_no_plugin_host(ros, spawn, camera_bus,
                                                                       tmp_path):
    agents = _agents_file(tmp_path, ['face_expression'])
    params = tmp_path / 'params.yaml'   # what the lifecycle manager hands its agents
    params.write_text(yaml.safe_dump({'/**/plugin_host': {'ros__parameters': {
        'audit_db': str(tmp_path / 'audit.db'), 'data_dir': str(tmp_path / 'plugins')}}}))
    ros_args = ['--ros-args', '-r', f'__ns:={NS}']
    router = spawn('-m', 'loom_ros.router.router_node', *ros_args,
                   '-p', f'history_db:={tmp_path / "router.db"}')
    agent = spawn('-m', 'loom_ros.agents.agent_node', *ros_args, '--params-file', str(params),
                  '-r', '__node:=agent_host_0', '-p', 'agent_id:=face',
                  '-p', f'agents_file:={agents}', '-p', f'storage.root:={tmp_path}')
    procs = [router, agent]
    camera = camera_bus(NS, 'hp_camera')
    ros.wait_for(lambda: camera.out.get_subscription_count() >= 1, 'the face agent', alive=procs)
    ros.wait_for(lambda: camera.happy() is not None, 'the happy emoji from the agent', limit=120,
                 alive=procs, spin=camera.send_frame)
    happy = camera.happy()
    assert happy['emoji'] == '😀' and happy['route'] == 'local'
    names = ros.node.get_node_names_and_namespaces()
    assert 'plugin_host' not in {name for name, ns in names if ns == NS}, names
    clients = {name for name, _types in
               ros.node.get_client_names_and_types_by_node('agent_host_0', NS)}
    assert f'{NS}/router/route' in clients, clients
    assert not [c for c in clients if c.endswith('handle_event')], clients
    # The plugin ran under the plugin host's audit log, the one the params file names.
    assert ('face_expression', 'plugin_init') in _audit_rows(tmp_path / 'audit.db')


def _configure(ros, tmp_path, host_plugins, **settings):
    """A real AgentNode in this process configured on `host_plugins`: (result, why it failed)."""
    from rclpy.parameter import Parameter

    from loom_ros.agents.agent_node import AgentNode
    from loom_ros.plugins.embedded import HostSettings
    defaults = HostSettings.shipped()
    plugin_settings = HostSettings(
        plugins_file=str(REPO / 'config' / 'plugins.yaml'), audit_db=str(tmp_path / 'audit.db'),
        data_dir=str(tmp_path / 'plugins'),
        allowed_capabilities=settings.get('allowed', defaults.allowed_capabilities))
    node = AgentNode(agent_id='face', plugin_settings=plugin_settings, namespace='/hp_cfg',
                     context=ros.node.context, parameter_overrides=[
                         Parameter('agents_file', value=str(_agents_file(tmp_path, host_plugins))),
                         Parameter('storage.root', value=str(tmp_path)),
                         Parameter('autostart', value=False)])
    try:
        result = node.trigger_configure()
        return result, dict(node.failed), node.embedded
    finally:
        node.trigger_shutdown()
        node.destroy_node()


def test_a_host_plugin_the_plugins_file_lacks_fails_configure_with_the_reason(ros, tmp_path):
    from rclpy.lifecycle import TransitionCallbackReturn
    result, failed, embedded = _configure(ros, tmp_path, ['face_expression', 'no_such_plugin'])
    assert result == TransitionCallbackReturn.FAILURE
    assert "no plugin 'no_such_plugin'" in failed['face'], failed
    assert 'host_plugins' in failed['face'] and 'face_expression' in failed['face']  # the have:
    assert embedded is None or embedded.host is None


def test_a_host_plugin_granted_more_than_the_host_allows_fails_configure(ros, tmp_path):
    from rclpy.lifecycle import TransitionCallbackReturn
    result, failed, _ = _configure(ros, tmp_path, ['face_expression'], allowed=('ui.write',))
    assert result == TransitionCallbackReturn.FAILURE
    assert 'camera.read' in failed['face'], failed


def test_a_configured_host_plugin_is_stopped_on_shutdown(ros, tmp_path):
    from rclpy.lifecycle import TransitionCallbackReturn

    from loom_ros.plugins.host import SlotState
    from rclpy.parameter import Parameter

    from loom_ros.agents.agent_node import AgentNode
    from loom_ros.plugins.embedded import HostSettings
    settings = HostSettings(audit_db=str(tmp_path / 'audit.db'),
                            data_dir=str(tmp_path / 'plugins'),
                            allowed_capabilities=HostSettings.shipped().allowed_capabilities)
    node = AgentNode(agent_id='face', plugin_settings=settings, namespace='/hp_stop',
                     context=ros.node.context, parameter_overrides=[
                         Parameter('agents_file', value=str(_agents_file(tmp_path,
                                                                         ['face_expression']))),
                         Parameter('storage.root', value=str(tmp_path)),
                         Parameter('autostart', value=False)])
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        host = node.embedded.host
        assert host.slots['face_expression'].state is SlotState.RUNNING
        assert 'face_expression' in node.ports.plugins._lookup()
    finally:
        node.trigger_shutdown()
        node.destroy_node()
    assert node.embedded is None
    assert host.slots['face_expression'].state is SlotState.STOPPED


@pytest.mark.parametrize('names, why', [
    (['bad name'], 'is not a plugin name'),
    (['face_expression', 'face_expression'], 'appears twice'),
])
def test_host_plugins_names_are_checked_when_the_agents_file_loads(tmp_path, names, why):
    from loom_ros.agents.config import AgentConfigError, load_agents
    with pytest.raises(AgentConfigError, match=why):
        load_agents(_agents_file(tmp_path, names))
