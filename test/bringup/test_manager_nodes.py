"""The lifecycle manager over lifecycle nodes others started, across real processes: a router and
a plugin host run as their own processes with autostart false (as launch starts them); the
manager waits for ~/startup, brings them up in order, pauses and resumes them in reverse/forward
order, reports a SIGKILLed node dead on /diagnostics, brings its respawned process back to
active, shuts everything down, and after a startup brings the respawned processes up again;
is_active follows each step."""
import signal

import pytest

PLUGINS = """plugins:
  - name: weather
    inputs: [tool.weather.query]
    output_topic: tool.weather.result
    config:
      forecasts:
        Lisbon: [{summary: sunny, high_c: 24, low_c: 15, rain_pct: 5}]
"""
NS = '/lm_nodes'


class Nodes:
    """The test's view: lifecycle states of the managed nodes, the manager's services and its
    /diagnostics entries."""

    def __init__(self, ros, procs):
        from diagnostic_msgs.msg import DiagnosticArray
        from lifecycle_msgs.srv import GetState
        from rclpy.node import Node
        from std_srvs.srv import Trigger
        self.ros, self.procs = ros, procs
        self.node = Node('lm_nodes_watch', namespace=NS, context=ros.node.context)
        self.get_state = {n: self.node.create_client(GetState, f'{n}/get_state')
                          for n in ('router', 'plugin_host')}
        self.trigger = {s: self.node.create_client(Trigger, f'lifecycle_manager/{s}')
                        for s in ('startup', 'shutdown', 'pause', 'resume', 'is_active')}
        self.diagnostics = {}
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 10)
        ros.executor.add_node(self.node)

    def _on_diag(self, msg):
        for status in msg.status:
            if status.name.startswith('loom/nodes/'):
                self.diagnostics[status.hardware_id] = status

    def _call(self, client, request):
        """Sent again if no answer comes (ros.call): the manager's services answer a repeat
        as they answered the first."""
        alive = [p for p in self.procs.values() if p.popen.poll() is None]
        return self.ros.call(client, request, client.srv_name, alive=alive)

    def state(self, name):
        from lifecycle_msgs.srv import GetState
        alive = [p for p in self.procs.values() if p.popen.poll() is None]
        return self.ros.call(self.get_state[name], GetState.Request(), f'{name}/get_state',
                             alive=alive).current_state.label

    def call(self, service):
        from std_srvs.srv import Trigger
        return self._call(self.trigger[service], Trigger.Request())

    def wait_states(self, what, **wanted):
        self.ros.wait_for(lambda: all(self.state(n) == s for n, s in wanted.items()), what,
                          alive=[self.procs['manager']])

    def close(self):
        self.ros.executor.remove_node(self.node)
        self.node.destroy_node()


@pytest.fixture
def system(ros, spawn, tmp_path):
    plugins = tmp_path / 'plugins.yaml'
    plugins.write_text(PLUGINS)
    procs = {}

    def start(name):
        common = ['--ros-args', '-r', f'__ns:={NS}', '-p', 'autostart:=false']
        if name == 'router':
            procs[name] = spawn('-m', 'loom_ros.router.router_node', *common,
                                '-p', f'history_db:={tmp_path / "router.db"}')
        elif name == 'plugin_host':
            procs[name] = spawn('-m', 'loom_ros.plugins.host_node', *common,
                                '-p', f'plugins_file:={plugins}', '-p', 'plugins:=weather',
                                '-p', f'audit_db:={tmp_path / "audit.db"}',
                                '-p', f'data_dir:={tmp_path / "data"}')
        else:
            procs[name] = spawn('-m', 'loom_ros.bringup.lifecycle_manager_node', *common,
                                '-p', 'nodes:=[router, plugin_host]', '-p', 'agents:=none',
                                '-p', 'heartbeat_timeout_s:=1.5', '-p', 'status_period_s:=0.2',
                                '-p', 'node_poll_period_s:=0.2', '-p', 'max_restarts:=3')
        return procs[name]
    for name in ('manager', 'plugin_host', 'router'):
        start(name)
    nodes = Nodes(ros, procs)
    yield nodes, procs, start
    nodes.close()


def stop(proc):
    proc.popen.send_signal(signal.SIGINT)
    code, out, err = proc.finish()
    assert code == 0, err
    return err


def test_manager_drives_nodes_in_other_processes(ros, system):
    nodes, procs, start = system
    # autostart false: nothing happens until ~/startup.
    nodes.wait_states('both nodes up, unconfigured', router='unconfigured',
                      plugin_host='unconfigured')
    answer = nodes.call('is_active')
    assert not answer.success and 'call ~/startup' in answer.message
    assert nodes.state('router') == 'unconfigured'

    assert nodes.call('startup').success
    ros.wait_for(lambda: nodes.call('is_active').success, 'is_active after startup',
                 alive=[procs['manager']])
    assert (nodes.state('router'), nodes.state('plugin_host')) == ('active', 'active')
    assert nodes.call('startup').message == 'already started'

    assert nodes.call('pause').success
    nodes.wait_states('both paused', router='inactive', plugin_host='inactive')
    assert not nodes.call('is_active').success
    assert nodes.call('resume').success
    ros.wait_for(lambda: nodes.call('is_active').success, 'is_active after resume',
                 alive=[procs['manager']])

    # SIGKILL the router: dead on /diagnostics (ERROR); launch's respawn starts it again and the
    # manager brings the new process up.
    procs['router'].popen.send_signal(signal.SIGKILL)
    procs['router'].finish()
    ros.wait_for(lambda: 'router' in nodes.diagnostics and
                 nodes.diagnostics['router'].level == b'\x02', 'the router reported dead',
                 alive=[procs['manager']])
    assert nodes.diagnostics['router'].message.startswith('dead: no answer to get_state')
    assert not nodes.call('is_active').success
    start('router')
    ros.wait_for(lambda: nodes.call('is_active').success, 'is_active after the respawn',
                 alive=[procs['manager']])
    assert nodes.state('router') == 'active'
    ros.wait_for(lambda: nodes.diagnostics['router'].level == b'\x00' and
                 {kv.key: kv.value for kv in nodes.diagnostics['router'].values}['restarts'] ==
                 '1', 'the router reported ok after 1 restart', alive=[procs['manager']])

    assert nodes.call('shutdown').success
    nodes.wait_states('both finalized', router='finalized', plugin_host='finalized')
    assert not nodes.call('is_active').success

    # Startup after a shutdown: finalized nodes come back only as new processes (a respawn).
    assert nodes.call('startup').success
    answer = nodes.call('is_active')
    assert not answer.success and 'only a new process' in answer.message
    for name in ('router', 'plugin_host'):
        stop(procs[name])
        start(name)
    ros.wait_for(lambda: nodes.call('is_active').success, 'is_active after startup again',
                 alive=[procs['manager']])

    # The order, from the manager's log: up front to back, down back to front.
    err = stop(procs['manager'])
    lines = [line for line in err.splitlines() if ' done, now ' in line]
    steps = [line.split(']: ', 1)[1].split(' done')[0] for line in lines]
    assert steps[:4] == ['router: configure', 'router: activate', 'plugin_host: configure',
                         'plugin_host: activate'], err
    assert steps[4:8] == ['plugin_host: deactivate', 'router: deactivate',
                          'router: activate', 'plugin_host: activate'], err
    assert steps[8:10] == ['router: configure', 'router: activate'], err   # the respawn
    assert steps[10:16] == ['plugin_host: deactivate', 'plugin_host: cleanup',
                            'plugin_host: shutdown', 'router: deactivate', 'router: cleanup',
                            'router: shutdown'], err
    assert steps[16:] == ['router: configure', 'router: activate', 'plugin_host: configure',
                          'plugin_host: activate'], err
    for name in ('router', 'plugin_host'):
        stop(procs[name])


@pytest.mark.parametrize('nodes, error', [
    (['router', 'bad name'], "'bad name' is not a node name"),
    (['router', 'router'], 'listed twice'),
    ([f'n{i}' for i in range(65)], '65 nodes, at most 64'),
    (['agent_first'], 'are agent host names'),
])
def test_a_bad_nodes_list_is_refused_with_the_reason(ros, tmp_path, nodes, error):
    from rclpy.parameter import Parameter

    from loom_ros.bringup.lifecycle_manager_node import LifecycleManagerNode
    from loom_ros.config.params import ConfigError
    agents = tmp_path / 'agents.yaml'
    agents.write_text('agents:\n  - id: first\n    behavior: counter\n    subscriptions: [t.x]\n')
    with pytest.raises(ConfigError, match=error):
        LifecycleManagerNode(namespace='/lm_bad', parameter_overrides=[
            Parameter('nodes', value=nodes), Parameter('agents_file', value=str(agents)),
            Parameter('storage.root', value=str(tmp_path)), Parameter('autostart', value=False)])
