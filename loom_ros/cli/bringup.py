"""`loom bringup`: the whole robot system from Loom's own entry point, reading the same YAML as
`ros2 launch loom bringup.launch.py` (which needs ROS 2's launch, absent where Loom runs from
PyPI wheels). Tests and `loom demo` use it.

One process runs the robot's nodes, each on its own executor thread (the Python equivalent of a
component container, so agents call plugins in-process, without serialization):
sim_sensors (optional) and camera_adapter, router, plugin_host, the agents hosted in one
AgentNode `agent_host_0`, the lifecycle_manager bringing that node up (spawn: false) and
watching it, and zenoh_bridge. Two more processes are started beside it, as on a real robot
and its cloud: a Zenoh router (`--zenoh-port`, unless `--zenoh-connect` names an existing one) and
the cloud tier `loom cloud serve` (unless `--no-cloud`).
When everything is up it prints one JSON line `{"ready": true, ...}` (with the side processes'
pids); it runs until SIGINT or SIGTERM (or `--duration`), then stops the nodes (agents commit
their state) and the processes.

Supervised: a node's spin thread that ends before the stop (a callback's exception is already
counted and survived by `spin_until`; this is what escapes even that) or a side process that
exits is reported on stderr and bring-up exits 1, so it never stays "ready" with a dead part.
The side processes get PR_SET_PDEATHSIG (SIGKILL): a SIGKILLed bring-up leaves no orphan holding
a port.

Secure by default: the first run makes local credentials (an authority and the `router`, robot
and `cloud` identities) in `--keys-dir`, and every Zenoh link is TLS with mutual authentication
under the router's access control, even on loopback. `--insecure` (plain TCP) is the only way
out; bring-up and every node it starts then log a warning, and the bridge reports it on
/diagnostics.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from loom_ros.bridge.keys import RobotIdError, validate_robot_id
from loom_ros.bridge.zenoh_link import INSECURE_WARNING
from loom_ros.bringup.processes import die_with_parent
from loom_ros.config.params import (
    DEFAULTS_FILE, check_params_file, config_dir, load_params_file, node_defaults,
)
from loom_ros.security import keys

AGENT_HOST = 'agent_host_0'


def add_parser(sub) -> None:
    p = sub.add_parser('bringup', help='start the robot system (both seed flows) in one process '
                       'plus a Zenoh router and the cloud tier')
    add_arguments(p)
    p.set_defaults(run=run_bringup)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--config', default=None,
                   help=f'ROS params file for every node (default: config/{DEFAULTS_FILE})')
    p.add_argument('--agents-file', default='', help="agents YAML ('' = config/agents.yaml)")
    p.add_argument('--agents', default='*', help="agents to run, comma-separated ('*' = all)")
    p.add_argument('--no-sim-sensors', dest='sim_sensors', action='store_false',
                   help='do not start the simulated sensors (a real robot brings its own)')
    p.add_argument('--zenoh-port', type=int, default=7447,
                   help='port of the Zenoh router started here on 127.0.0.1 (default 7447)')
    p.add_argument('--zenoh-connect', default='',
                   help='use this existing Zenoh router instead (e.g. tcp/10.0.0.2:7447)')
    p.add_argument('--no-cloud', dest='cloud', action='store_false',
                   help='do not start the cloud tier (Hybrid routes then answer locally)')
    p.add_argument('--no-bridge', dest='bridge', action='store_false',
                   help='do not start the zenoh_bridge node')
    p.add_argument('--duration', type=float, default=0.0,
                   help='stop after this many seconds (default: run until Ctrl-C)')
    p.add_argument('--log-dir', default='', help='where the Zenoh router and cloud logs go')
    p.add_argument('--keys-dir', default=keys.DEFAULT_KEYS_DIR,
                   help='fleet credentials, made on first run for the router, this robot and the '
                   f'cloud (default {keys.DEFAULT_KEYS_DIR})')
    p.add_argument('--insecure', action='store_true',
                   help='Zenoh over plain TCP: no TLS, authentication or access control (warned)')


def run_bringup(args) -> int:
    return main_with(args, getattr(args, 'ros_args', []))


def _endpoint(args) -> str:
    scheme = 'tcp' if args.insecure else 'tls'
    return args.zenoh_connect or f'{scheme}/127.0.0.1:{args.zenoh_port}'


def robot_id(params_file: str) -> str:
    """The bridge's robot_id in the params file (else loom.yaml's): this robot's identity.
    Checked here, before credentials are made for it, with the bridge's own rule and words."""
    section = load_params_file(params_file).get('zenoh_bridge', {})
    value = str(section.get('robot_id') or node_defaults('zenoh_bridge')['robot_id'])
    try:
        return validate_robot_id(value)
    except RobotIdError as exc:
        raise RuntimeError(f'zenoh_bridge in {params_file}: {exc}') from None


def local_credentials(args, robot: str) -> dict:
    """The authority and the router, robot and cloud identities, made on first run. Needed even
    with --insecure: robots sign cloud requests and commands, the cloud signs its answers."""
    return keys.ensure_local(args.keys_dir, {'router': 'router', robot: 'robot', 'cloud': 'cloud'})


def _zenoh_security(args) -> list[str]:
    """The router's and the cloud's flags for this bring-up's transport security."""
    return ['--keys-dir', str(keys.keys_path(args.keys_dir))] + \
        (['--insecure'] if args.insecure else [])


def _start_side(name: str, cmd: list[str], log_dir: str) -> tuple[subprocess.Popen, dict]:
    """A side process that prints one JSON ready line; stderr goes to a log file."""
    err = open(Path(log_dir) / f'{name}.log', 'w') if log_dir else subprocess.DEVNULL
    # SIGKILL, not SIGTERM, when bring-up dies: they keep no state, and a Zenoh router told to
    # stop while its peers vanish was seen hanging in session.close() for good, port held.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                            start_new_session=True, preexec_fn=die_with_parent(signal.SIGKILL))
    return proc, {}


def _wait_ready(proc: subprocess.Popen, name: str, limit: float = 60.0) -> dict:
    box: dict = {}

    def read():
        line = proc.stdout.readline()
        try:
            box['ready'] = json.loads(line) if line else {}
        except ValueError:
            box['ready'] = {'error': line}
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(limit)
    ready = box.get('ready') or {}
    if not ready.get('ready'):
        raise RuntimeError(f'{name} did not start (exit {proc.poll()}): {ready}')
    return ready


def _agents_file(args, tmp: str, robot: str = 'robot1') -> str:
    """The agents file, with the voice agent pointed at this bring-up's Zenoh router, as this
    robot's identity from the keys folder."""
    path = args.agents_file or str(config_dir() / 'agents.yaml')
    data = yaml.safe_load(Path(path).read_text(encoding='utf-8'))
    for entry in data.get('agents', []):
        settings = entry.get('settings') or {}
        if 'zenoh_connect' in settings:
            settings['zenoh_connect'] = [_endpoint(args)] if args.cloud or args.zenoh_connect \
                else []
            settings.update(keys_dir=str(keys.keys_path(args.keys_dir)), identity=robot,
                            zenoh_insecure=bool(args.insecure))
    out = Path(tmp) / 'agents.yaml'
    out.write_text(yaml.safe_dump(data), encoding='utf-8')
    return str(out)


def _typed_params(path: str, tmp: str) -> str:
    """The params file without empty lists: rcl cannot type them and hands nodes None, while
    the node's own default (from config/loom.yaml) is the same empty list."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if v != []}
        return value
    data = yaml.safe_load(Path(path).read_text(encoding='utf-8'))
    out = Path(tmp) / 'params.yaml'
    out.write_text(yaml.safe_dump(strip(data)), encoding='utf-8')
    return str(out)


class RobotProcess:
    """The robot's nodes in this process, each spun by its own executor on its own thread."""

    def __init__(self, args, agents_file: str, params_file: str):
        from rclpy.parameter import Parameter

        from loom_ros.agents.agent_node import AgentNode
        from loom_ros.agents.config import load_agents
        from loom_ros.bringup.lifecycle_manager_node import LifecycleManagerNode
        from loom_ros.plugins.host_node import PluginHostNode
        from loom_ros.router.router_node import RouterNode
        from loom_ros.sensors.camera_adapter_node import CameraAdapterNode
        self.nodes = []
        self.threads = []
        self._stops = []
        self.deaths: dict[str, str] = {}   # node name -> what ended its spin thread
        wanted = list(load_agents(agents_file)) if args.agents.strip() in ('', '*') else \
            [a.strip() for a in args.agents.split(',') if a.strip()]
        self.agent_ids = wanted
        if args.sim_sensors:
            from loom_ros.sensors.sim_sensors_node import SimSensorsNode
            self._add(SimSensorsNode())
        self._add(CameraAdapterNode())
        self.router = self._add(RouterNode(), lifecycle=True)
        self.plugin_host = self._add(PluginHostNode(), lifecycle=True)
        ids = ','.join(wanted)
        # The params file's `agent` section applies to the host node too (it has another name).
        from loom_ros.config.params import load_params_file
        section = load_params_file(params_file).get('agent', {})
        fixed = {'agents': ids, 'autostart': False, 'agents_file': agents_file}
        self.agents = self._add(AgentNode(node_name=AGENT_HOST, parameter_overrides=[
            Parameter(k, value=v) for k, v in {**section, **fixed}.items()
            if k not in ('agent_id',)]))
        self._add(LifecycleManagerNode(parameter_overrides=[
            Parameter('spawn', value=False), Parameter('agents', value=ids),
            Parameter('groups', value=ids), Parameter('agents_file', value=agents_file)]))
        if args.bridge:
            from loom_ros.bridge.bridge_node import ZenohBridgeNode
            self._add(ZenohBridgeNode(parameter_overrides=[
                Parameter('connect', value=[_endpoint(args)]),
                Parameter('keys_dir', value=str(keys.keys_path(args.keys_dir))),
                Parameter('insecure', value=bool(args.insecure))]), lifecycle=True)

    def _add(self, node, lifecycle: bool = False):
        from rclpy.lifecycle import TransitionCallbackReturn
        from rclpy.task import Future

        from loom_ros.bus.executor import make_executor, spin_until
        executor = make_executor()
        executor.add_node(node)
        stop = Future()

        name = node.get_name()

        def spin():
            # Transitions on the node's own thread: what configure opens (SQLite connections)
            # is then used on the thread that made it.
            try:
                if lifecycle and node.get_parameter('autostart').value:
                    if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                        node.trigger_activate()
                spin_until(executor, stop)
            except BaseException as exc:  # the thread ends here: say why, for the main loop
                self.deaths[name] = f'{type(exc).__name__}: {str(exc)[:300]}'
                raise
        thread = threading.Thread(target=spin, daemon=True, name=f'spin-{name}')
        thread.start()
        self.nodes.append((node, executor))
        self.threads.append(thread)
        self._stops.append(stop)
        return node

    def dead_nodes(self) -> dict[str, str]:
        """Nodes whose spin thread ended before they were told to stop, and why."""
        return {node.get_name(): self.deaths.get(node.get_name(), 'its spin thread ended')
                for (node, _), thread, stop in zip(self.nodes, self.threads, self._stops)
                if not thread.is_alive() and not stop.done()}

    def agents_active(self) -> bool:
        from loom_ros.agents.runtime import AgentState
        agents = dict(self.agents.agents)
        return bool(agents) and all(a.lifecycle is AgentState.ACTIVE for a in agents.values())

    def failures(self) -> dict:
        return dict(self.agents.failed)

    def stop(self) -> None:
        from loom_ros.agents.runtime import AgentState
        # Agents first: they deactivate (handle what they accepted) and commit their state.
        for agent in list(self.agents.agents.values()):
            if agent.lifecycle is AgentState.ACTIVE:
                agent.deactivate()
        for stop in self._stops:
            if not stop.done():
                stop.set_result(True)
        for thread in self.threads:
            thread.join(5.0)
        from loom_ros.agents.flows.link import FlowLink
        FlowLink.close_shared()
        from loom_ros.bus.executor import finalize_node
        for node, executor in reversed(self.nodes):
            executor.shutdown()
            finalize_node(node)   # lifecycle nodes run on_shutdown: state committed, sessions closed
            node.destroy_node()


def _check_alive(robot: RobotProcess, side: dict[str, subprocess.Popen]) -> None:
    """Raise naming every node whose spin thread died and every side process that exited."""
    problems = [f'node {n} died ({why})' for n, why in robot.dead_nodes().items()]
    problems += [f'{n} exited with {p.returncode}' for n, p in side.items()
                 if p.poll() is not None]
    if problems:
        raise RuntimeError('; '.join(problems))


def _all_active(robot: RobotProcess) -> bool:
    """Whether every lifecycle node and every agent is active. Raises with each reason as soon as
    one refused configure, so bring-up neither prints ready while degraded nor waits 60 s."""
    failed = [f'agent {a}: {why}' for a, why in robot.failures().items()]
    failed += [f'{node.get_name()}: {node.configure_error}' for node, _ in robot.nodes
               if getattr(node, 'configure_error', '')]
    if failed:
        raise RuntimeError('configure failed: ' + '; '.join(failed))
    # rclpy has no public getter for a lifecycle node's state in-process; its services use this.
    return robot.agents_active() and all(
        node._state_machine.current_state[1] == 'active'
        for node, _ in robot.nodes if hasattr(node, '_state_machine'))


def main_with(args, ros_args: list[str]) -> int:
    import rclpy
    from rclpy.signals import SignalHandlerOptions
    params_file = args.config or str(config_dir() / DEFAULTS_FILE)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    side: dict[str, subprocess.Popen] = {}
    robot = None
    code = 0
    with tempfile.TemporaryDirectory(prefix='loom_bringup_') as tmp:
        try:
            check_params_file(params_file)   # a typo'd key or node section: refused up front
            robot_name = robot_id(params_file)
            local_credentials(args, robot_name)
            if args.insecure:
                print(f'loom bringup: WARNING {INSECURE_WARNING}', file=sys.stderr, flush=True)
            if not args.zenoh_connect:
                side['zenoh_router'], _ = _start_side('zenoh_router', [
                    sys.executable, '-m', 'loom_ros.bridge.zenoh_router', '--listen',
                    _endpoint(args), *_zenoh_security(args)], args.log_dir)
                _wait_ready(side['zenoh_router'], 'the Zenoh router')
            if args.cloud:
                side['cloud'], _ = _start_side('cloud', [
                    sys.executable, '-m', 'loom_ros.cloud.server', '--connect', _endpoint(args),
                    *_zenoh_security(args)], args.log_dir)
            agents_file = _agents_file(args, tmp, robot_name)
            rclpy.init(args=['loom_bringup', '--ros-args', '--params-file',
                             _typed_params(params_file, tmp),
                             *ros_args[1:]], signal_handler_options=SignalHandlerOptions.NO)
            robot = RobotProcess(args, agents_file, params_file)
            if 'cloud' in side:
                _wait_ready(side['cloud'], 'the cloud tier')
            started = time.monotonic()
            while not _all_active(robot) and not stop.is_set():
                _check_alive(robot, side)
                if time.monotonic() - started > 60.0:
                    raise RuntimeError('agents did not become active within 60 s')
                stop.wait(0.05)
            _check_alive(robot, side)
            print(json.dumps({'ready': True, 'pid': os.getpid(), 'agents': robot.agent_ids,
                              'zenoh': _endpoint(args), 'cloud': 'cloud' in side,
                              'secure': not args.insecure,
                              'keys_dir': str(keys.keys_path(args.keys_dir)),
                              'side_pids': {n: p.pid for n, p in side.items()},
                              'params_file': params_file}), flush=True)
            deadline = time.monotonic() + args.duration if args.duration else None
            while not stop.wait(0.2):
                if deadline and time.monotonic() > deadline:
                    break
                _check_alive(robot, side)
        except Exception as exc:  # a bad config, a side process that died: say why
            print(f'loom bringup: {type(exc).__name__}: {exc}', file=sys.stderr, flush=True)
            code = 1
        finally:
            if robot is not None:
                robot.stop()
            from loom_ros.telemetry import tracing
            tracing.flush()
            rclpy.try_shutdown()
            for proc in side.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            for proc in side.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return code


def main(argv=None) -> int:
    from loom_ros.cli import split_ros_args
    argv, ros_args = split_ros_args(argv)
    parser = argparse.ArgumentParser(prog='loom bringup', description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main_with(parser.parse_args(argv), ros_args)


if __name__ == '__main__':
    sys.exit(main())
