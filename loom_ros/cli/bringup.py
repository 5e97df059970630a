"""`loom bringup`: the whole robot system from Loom's own entry point, started from the same node
table (loom_ros/bringup/nodes.py) and params file as `ros2 launch loom bringup.launch.py` (which
needs ROS 2's launch, absent where Loom runs from PyPI wheels). Tests and `loom demo` use it.

By default one process per node, as launch starts them (the same module `main()` the console
script runs, the params file, then the node's own parameters from the table): sim_sensors
(optional), camera_adapter, router, plugin_host, storage, zenoh_bridge (optional) and the
lifecycle_manager, which starts the agents (all hosted in one process, agent_host_0) and brings
up the managed lifecycle nodes (started with autostart false) and then the agents, in table
order. A node process that dies is started again with backoff (launch's respawn); one that keeps
dying (`--max-restarts`) ends bring-up with exit 1. `--composition` runs every node in this one
process instead, each on its own executor thread (the Python equivalent of a component
container: agents call plugins in-process, without serialization).

Two more processes are started beside them, as on a real robot and its cloud: a Zenoh router
(`--zenoh-port`, unless `--zenoh-connect` names an existing one) and the cloud tier
`loom cloud serve` (unless `--no-cloud`; `--cloud-data-dir` makes it keep its request log, and
the storage node's `storage/forget` is linked to it, so a data subject's erasure reaches it).
`--nodes-only` starts the node table alone, with the
bridge's Zenoh settings from the params file (what launch's use_composition runs).

When every lifecycle node and every agent is active it prints one JSON line `{"ready": true, ...}`
(with the pids); it runs until SIGINT or SIGTERM (or `--duration`), then stops the manager (agents
commit their state), the other nodes and the side processes. It exits 1, with the reason on
stderr, when a part cannot start: a node or agent whose configure fails (the nodes log
`cannot configure: <why>`, which bring-up watches for), a process that keeps dying, a side process
that exits, or nothing active within `--ready-timeout`. Every child dies with it, even by SIGKILL.

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
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

import yaml

from loom_ros.bridge.keys import RobotIdError, validate_robot_id
from loom_ros.bridge.zenoh_link import INSECURE_WARNING
from loom_ros.bringup import entry
from loom_ros.bringup import nodes as table
from loom_ros.bringup.processes import (
    Process, RestartPolicy, Supervised, stop_bound_s, stop_together,
)
from loom_ros.bringup.shm import Janitor, clean_dead_segments
from loom_ros.bringup.stop_signals import STACKS_SIGNAL, stop_event
from loom_ros.config.params import (
    AGENT_SECTION, DEFAULTS_FILE, by_node, check_params_file, config_dir, load_params_file,
    node_defaults, node_section,
)
from loom_ros.config.paths import usable_dir
from loom_ros.security import keys
from loom_ros.storage.layout import ROOT_PARAMETER, StorageLayout

AGENT_HOST = 'agent_host_0'
CONFIGURE_FAILED = 'cannot configure:'   # what every Loom lifecycle node logs when it refuses
ASK_TIMEOUT_S = 3.0   # a readiness question unanswered this long is asked again
SIDE_STOP_S = 10.0    # the Zenoh router and the cloud tier, after SIGINT, before SIGKILL
WATCHER_CLOSE_S = 5.0   # Readiness.close: each of its two bounded steps
RCLPY_SHUTDOWN_S = 5.0   # rclpy.try_shutdown at the end (it destroys what is left)
STOP_JANITOR_S = 2.0   # a shared-memory pass still running when the nodes have stopped (shm.py)
# After SIGINT, the longest bring-up takes to stop when no node hangs past its bound: the
# manager (it stops the agents, which commit), then the other nodes on one deadline, the
# readiness watcher, rclpy, the side processes on one deadline. Each SIGKILL adds a wait
# (stop_bound_s counts one per step). Whoever stops a bring-up (loom demo) waits this long
# before SIGKILL: killed sooner, its nodes die with it, uncommitted (a loaded run took longer
# than 60 s). With --composition the nodes stop in this process, within COMPOSITION_STOP_S
# (RobotProcess.stop). A SIGINT while a side process loads is seen at once (_wait_ready).
COMPOSITION_STOP_S = 2 * table.STOP_TIMEOUT_S
STOP_BOUND_S = max(2 * stop_bound_s(table.STOP_TIMEOUT_S) + 2 * WATCHER_CLOSE_S + STOP_JANITOR_S,
                   COMPOSITION_STOP_S) + RCLPY_SHUTDOWN_S + stop_bound_s(SIDE_STOP_S)


def add_parser(sub) -> None:
    p = sub.add_parser('bringup', help='start the robot system (both seed flows): one process per '
                       'node, plus a Zenoh router and the cloud tier')
    add_arguments(p)
    p.set_defaults(run=run_bringup)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--config', default=None,
                   help=f'ROS params file for every node (default: config/{DEFAULTS_FILE})')
    p.add_argument('--agents-file', default='', help="agents YAML ('' = config/agents.yaml)")
    p.add_argument('--agents', default='*', help="agents to run, comma-separated ('*' = all)")
    p.add_argument('--namespace', default='',
                   help="robot namespace: nodes run as /<namespace>/<node> ('' = none)")
    p.add_argument('--composition', action='store_true',
                   help='every node in this one process, each on its own executor thread '
                   '(intra-process fast path) instead of one process per node')
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
    p.add_argument('--nodes-only', action='store_true',
                   help='start only the node table (no Zenoh router, no cloud, no credentials '
                   'made; the bridge uses the params file\'s Zenoh settings), as launch does')
    p.add_argument('--no-autostart', dest='autostart', action='store_false',
                   help='the lifecycle manager waits for its ~/startup service (ready then means '
                   'every node is up and answering, not active)')
    p.add_argument('--duration', type=float, default=0.0,
                   help='stop after this many seconds (default: run until Ctrl-C)')
    p.add_argument('--ready-timeout', type=float, default=120.0,
                   help='exit 1 when not everything is active after this many seconds')
    p.add_argument('--max-restarts', type=int, default=5,
                   help='restarts of a dying node process before bring-up gives up (default 5)')
    p.add_argument('--shm-cleanup', action='store_true',
                   help='give back the Fast DDS shared memory dead node processes left in '
                   '/dev/shm (bring-up and its lifecycle manager; off by default: README)')
    p.add_argument('--log-dir', default='', help='where the Zenoh router and cloud logs go')
    p.add_argument('--cloud-data-dir', default='',
                   help="where the cloud tier keeps its request log (bounded; erased by "
                   "storage/forget, which bring-up links to the cloud; '' = cloud.yaml's "
                   "request_log.dir: none by default, nothing kept)")
    p.add_argument('--keys-dir', default='',
                   help='fleet credentials, made on first run for the router, this robot and the '
                   'cloud (default <storage.root>/keys: storage.root of the params file)')
    p.add_argument('--insecure', action='store_true',
                   help='Zenoh over plain TCP: no TLS, authentication or access control (warned)')


def run_bringup(args) -> int:
    return main_with(args, getattr(args, 'ros_args', []))


def _endpoint(args) -> str:
    scheme = 'tcp' if args.insecure else 'tls'
    return args.zenoh_connect or f'{scheme}/127.0.0.1:{args.zenoh_port}'


def _namespace(args) -> str:
    ns = args.namespace.strip().strip('/')
    return f'/{ns}' if ns else '/'


def robot_id(params_file: str) -> str:
    """The bridge's robot_id in the params file (else loom.yaml's): this robot's identity.
    Checked here, before credentials are made for it, with the bridge's own rule and words."""
    section = node_section(params_file, 'zenoh_bridge')
    value = str(section.get('robot_id') or node_defaults('zenoh_bridge')['robot_id'])
    try:
        return validate_robot_id(value)
    except RobotIdError as exc:
        raise RuntimeError(f'zenoh_bridge in {params_file}: {exc}') from None


def local_credentials(args, robot: str) -> dict:
    """The identities this bring-up signs with, made on first run (with the authority): the
    robot's always (it signs cloud requests and commands, even with --insecure), the router's
    only when it starts one (no --zenoh-connect), the cloud's only when it starts loom_cloud. So
    a fleet robot's folder (ca.pem, its own identity, the cloud's certificate to seal to) is
    enough with --zenoh-connect --no-cloud: it never needs the cloud's private key, which would
    let it open what every robot seals for the cloud."""
    wanted = {robot: 'robot'}
    if not args.zenoh_connect:
        wanted['router'] = 'router'
    if args.cloud:
        wanted['cloud'] = 'cloud'
    return keys.ensure_local(args.keys_dir, wanted)


def _zenoh_security(args) -> list[str]:
    """The router's and the cloud's flags for this bring-up's transport security."""
    return ['--keys-dir', str(keys.keys_path(args.keys_dir))] + \
        (['--insecure'] if args.insecure else [])


def _start_side(name: str, cmd: list[str], log_dir: str) -> Process:
    """A side process that prints one JSON ready line; stderr goes to a log file."""
    err = open(Path(log_dir) / f'{name}.log', 'w') if log_dir else subprocess.DEVNULL
    # SIGKILL, not SIGTERM, when bring-up dies: they keep no state, and a Zenoh router told to
    # stop while its peers vanish was seen hanging in session.close() for good, port held.
    try:
        # the router and the cloud tier open no storage of the robot: no storage secrets
        return Process(cmd, name=name, stdout=subprocess.PIPE, stderr=err, text=True,
                       env=table.without_secrets(os.environ),
                       death_signal=signal.SIGKILL).start()
    finally:
        if err is not subprocess.DEVNULL:
            err.close()


class Stopped(Exception):
    """SIGINT or SIGTERM came while bring-up was starting: stop what started, exit 0."""


def _wait_ready(proc: Process, name: str, stop: threading.Event | None = None,
                limit: float = 60.0) -> dict:
    """The JSON ready line of a side process, read within `limit` s; raises Stopped as soon as
    `stop` is set (a Ctrl-C while the cloud tier loads its models is not left waiting)."""
    box: dict = {}

    def read():
        line = proc.popen.stdout.readline()
        try:
            box['ready'] = json.loads(line) if line else {}
        except ValueError:
            box['ready'] = {'error': line}
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + limit
    while reader.is_alive() and time.monotonic() < deadline:
        if stop is not None and stop.wait(0):
            raise Stopped(f'asked to stop while waiting for {name}')
        reader.join(0.1)
    ready = box.get('ready') or {}
    if not ready.get('ready'):
        # Its stdout closed: it is exiting, so name its code (poll() alone raced its exit).
        code = proc.wait(5.0) if 'ready' in box and not ready else proc.poll()
        raise RuntimeError(f'{name} did not start (exit {code}): {ready}')
    return ready


def _agents_file(args, tmp: str, robot: str = 'robot1') -> str:
    """The agents file, with the voice agent pointed at this bring-up's Zenoh router, as this
    robot's identity from the keys folder (as it is with --nodes-only)."""
    path = args.agents_file or str(config_dir() / 'agents.yaml')
    if args.nodes_only:
        return path
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


def robot_params(path: str, tmp: str, hosts=(AGENT_HOST,)) -> str:
    """The params file every node gets: without empty lists (rcl cannot type them and hands
    nodes None, while the node's own default from config/loom.yaml is the same empty list), and
    with the agent defaults section (`/**/agent`) also given to each agent host, whose node name
    (`hosts`: agent_host_0, agent_<id>) it does not match."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if v != []}
        return value
    data = strip(yaml.safe_load(Path(path).read_text(encoding='utf-8')) or {})
    agent = {k: v for k, v in node_section(path, AGENT_SECTION).items() if k != 'agent_id'}
    for host in hosts if agent else ():
        host_section = data.setdefault(f'/**/{host}', {}).setdefault('ros__parameters', {})
        for key, value in agent.items():   # dotted keys back into nested form
            parts = key.split('.')
            slot = host_section
            for part in parts[:-1]:
                slot = slot.setdefault(part, {})
            slot.setdefault(parts[-1], value)
    out = Path(tmp) / 'params.yaml'
    out.write_text(yaml.safe_dump(data), encoding='utf-8')
    return str(out)


def _agent_ids(args, agents_file: str) -> list[str]:
    from loom_ros.agents.config import load_agents
    if args.agents.strip() in ('', '*'):
        return list(load_agents(agents_file))
    return [a.strip() for a in args.agents.split(',') if a.strip()]


def agent_hosting(agents_file: str, agent_ids) -> tuple[str, list[str]]:
    """The manager's `groups` and the agent host names for these agents (the node table's
    rule: agents that ask for their own process run alone, the rest in agent_host_0)."""
    from loom_ros.agents.config import load_agents
    configs = load_agents(agents_file)
    return table.agent_hosting({a: configs[a].own_process for a in agent_ids if a in configs})


def node_parameters(args, node: table.LoomNode, selected: list[table.LoomNode], agent_ids,
                    agents_file: str, params_file: str, robot_file: str) -> dict:
    """The node table's parameters for `node`, plus what this bring-up decides: the bridge's
    router and credentials. (The agents keep their files under storage.root, the params file's
    /** section, as every node does.)"""
    ids = ','.join(agent_ids)
    groups, _hosts = agent_hosting(agents_file, agent_ids)
    params = table.node_parameters(node, selected, autostart=bool(args.autostart), agents=ids,
                                   groups=groups,
                                   agents_file=agents_file, agent_params_file=robot_file)
    if node.name == table.MANAGER and args.shm_cleanup:
        params['shm_cleanup'] = True
    if node.name == 'zenoh_bridge' and not args.nodes_only:
        params.update(connect=[_endpoint(args)], keys_dir=str(keys.keys_path(args.keys_dir)),
                      insecure=bool(args.insecure))
    if node.name == 'storage' and not args.nodes_only and (args.cloud or args.zenoh_connect):
        # storage/forget reaches the cloud servers on this bring-up's router (fleet erasure),
        # signed as this robot.
        params.update({'forget.fleet_connect': [_endpoint(args)],
                       'forget.keys_dir': str(keys.keys_path(args.keys_dir)),
                       'forget.identity': robot_id(params_file),
                       'forget.insecure': bool(args.insecure)})
    return params


def _selected(args) -> list[table.LoomNode]:
    return table.select({'sim_sensors': bool(args.sim_sensors), 'bridge': bool(args.bridge)})


# -- one process per node ---------------------------------------------------------------------
class _Watch:
    """Where a node process's stderr goes: echoed to ours, and every `cannot configure:` line
    kept (the reason bring-up exits with)."""

    def __init__(self, name: str, failures: list[str], lock: threading.Lock):
        self.name, self.failures, self.lock = name, failures, lock

    def write(self, text: str) -> None:
        if CONFIGURE_FAILED in text:
            with self.lock:
                self.failures.append(f'{self.name}: {text.strip()[:2000]}')
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def node_commands(args, selected, agent_ids, agents_file, params_file, robot_file, tmp,
                  ros_args: list[str]) -> list[tuple[table.LoomNode, list[str], dict]]:
    """(node, command, environment) of each node process, as launch starts it: the module the
    console script runs, the robot params file, then the node's own parameters (a file keyed
    /**/<node>, given last so it wins, as launch_ros does with a dict)."""
    out = []
    ns = _namespace(args)
    for node in selected:
        own = Path(tmp) / f'{node.name}.params.yaml'
        params = node_parameters(args, node, selected, agent_ids, agents_file, params_file,
                                 robot_file)
        own.write_text(yaml.safe_dump({f'/**/{node.name}': {'ros__parameters': params}}),
                       encoding='utf-8')
        cmd = [*entry.command(node.module), '--ros-args', '-r', f'__node:={node.name}',
               '-r', f'__ns:={ns}', '--params-file', robot_file, '--params-file', str(own),
               *ros_args[1:]]
        out.append((node, cmd, table.node_env(node, os.environ)))
    return out


class NodeProcesses:
    """The node table as one supervised process per node (what launch does with respawn)."""

    left_running = False   # no thread of this process stops a node (see RobotProcess.stop)

    def __init__(self, args, commands, tmp):
        self.failures: list[str] = []
        self.gave_up: dict[str, str] = {}
        self._lock = threading.Lock()
        self.janitor = Janitor(self._cleaned) if args.shm_cleanup else None
        policy = RestartPolicy(max_restarts=max(0, args.max_restarts), initial_backoff_s=0.5,
                               max_backoff_s=5.0)
        self.children: dict[str, Supervised] = {}
        for node, cmd, env in commands:
            self.children[node.name] = Supervised(
                self._maker(node.name, cmd, env), policy if node.respawn else
                RestartPolicy(max_restarts=0), on_event=self._event)
        for child in self.children.values():
            child.poll()   # start them, in table order

    def _maker(self, name, cmd, env):
        def make() -> Process:
            return Process(cmd, name=name, env=env, stdout=subprocess.DEVNULL, text=True,
                           echo_stderr=_Watch(name, self.failures, self._lock),
                           stacks_signal=STACKS_SIGNAL)   # run_node answers it
        return make

    def _event(self, kind: str, text: str) -> None:
        if kind in ('exited', 'gave_up'):
            print(f'loom bringup: {text}' + ('' if kind == 'gave_up' else '; restarting'),
                  file=sys.stderr, flush=True)
        if kind == 'exited' and self.janitor is not None:   # its shared memory (shm.py)
            self.janitor.request()

    @staticmethod
    def _cleaned(cleaned) -> None:
        """Only a failure is said: bring-up's last line is why it stopped, and a pass may end
        after that (the manager logs what its own passes removed)."""
        if cleaned.error:
            print(f'loom bringup: {cleaned}', file=sys.stderr, flush=True)

    def poll(self) -> None:
        """Restart the dead; raise naming what failed for good or refused configure."""
        for name, child in self.children.items():
            if child.poll() == 'failed':
                self.gave_up[name] = child.restarts.gave_up
        problems = [f'{why}' for why in self.gave_up.values()]
        with self._lock:
            if self.failures:
                problems.append('configure failed: ' + '; '.join(self.failures[:3]))
        if problems:
            raise RuntimeError('; '.join(problems))

    def pids(self) -> dict[str, int | None]:
        return {n: c.process.pid if c.process else None for n, c in self.children.items()}

    def stop(self) -> dict[str, int | None]:
        """The manager first (it stops the agents, which commit their state), then the rest
        together, newest first: SIGINT to each, then SIGKILL to those still running
        table.STOP_TIMEOUT_S after (one deadline for all of them, not one each)."""
        codes = {}
        manager = self.children.get(table.MANAGER)
        if manager is not None:
            codes[table.MANAGER] = manager.stop(table.STOP_TIMEOUT_S)
        rest = [(n, c) for n, c in reversed(list(self.children.items())) if n != table.MANAGER]
        codes.update(zip([n for n, _ in rest],
                         stop_together([c for _, c in rest], table.STOP_TIMEOUT_S)))
        if self.janitor is not None:
            self.janitor.idle(STOP_JANITOR_S)
        return codes


class Readiness:
    """This bring-up's own node asking the running system whether it is up: every lifecycle node
    of the table active (its get_state service) and the manager's ~/is_active (agents included)."""

    def __init__(self, selected, namespace: str, autostart: bool = True):
        from lifecycle_msgs.srv import GetState
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.task import Future
        from std_srvs.srv import Trigger

        from loom_ros.bus.executor import spin_until
        self.node = Node('loom_bringup', namespace=namespace)
        self.autostart = autostart
        self._types = (GetState, Trigger)
        self.states: dict[str, str] = {}
        self.clients = {n.name: self.node.create_client(GetState, f'{n.name}/get_state')
                        for n in selected if n.lifecycle}
        self.manager = self.node.create_client(Trigger, f'{table.MANAGER}/is_active')
        self.manager_says = ''
        self._pending: dict[str, object] = {}
        self._stop = Future()
        # rclpy's stable executor, not the EventsExecutor the nodes use: this watcher handles a
        # few answers a second, and a fault in it takes the whole system down (bring-up's
        # children die with it). Its process crashed once with SIGSEGV in a native thread while
        # this EventsExecutor spun and the main thread sent requests (cause not found), and
        # the EventsExecutor's shutdown has hung here now and then (close below).
        self._executor = SingleThreadedExecutor()
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=spin_until, args=(self._executor, self._stop),
                                        kwargs={'once': True}, daemon=True,
                                        name='spin-loom_bringup')
        self._thread.start()

    def check(self) -> bool:
        """Ask again (answers come on the spin thread); True once everything said active."""
        GetState, Trigger = self._types
        now = time.monotonic()
        for name, (future, client, asked) in list(self._pending.items()):
            if not future.done():
                # A dead predecessor's service lingers in discovery and never answers: ask again.
                if now - asked > ASK_TIMEOUT_S:
                    client.remove_pending_request(future)
                    del self._pending[name]
                continue
            del self._pending[name]
            result = future.result()
            if result is None:
                continue
            if name == table.MANAGER:
                self.manager_says = ('active' if result.success else '') + \
                    f' ({result.message})'
            else:
                self.states[name] = result.current_state.label
        for name, client in [*self.clients.items(), (table.MANAGER, self.manager)]:
            if name not in self._pending and client.service_is_ready():
                request = Trigger.Request() if name == table.MANAGER else GetState.Request()
                self._pending[name] = (client.call_async(request), client, now)
        if not self.autostart:   # up and answering is all there is until ~/startup
            return all(n in self.states for n in self.clients) and bool(self.manager_says)
        return all(self.states.get(n) == 'active' for n in self.clients) and \
            self.manager_says.startswith('active')

    def waiting_for(self) -> str:
        nodes = [f'{n} {self.states.get(n, "not answering")}' for n in self.clients
                 if self.states.get(n) != 'active']
        return '; '.join(nodes + [f'{table.MANAGER}: {self.manager_says or "not answering"}'])

    def close(self) -> None:
        """Stop the spin thread and the executor, bounded: an executor whose shutdown hangs
        (rclpy's EventsExecutor did, now and then) is left to the process's exit."""
        from loom_ros.bus.executor import within
        self._stop.set_result(True)
        self._thread.join(WATCHER_CLOSE_S)

        def shut():
            self._executor.shutdown()
            self.node.destroy_node()
        why = within(shut, WATCHER_CLOSE_S, 'close-loom_bringup')
        if why:
            print(f'loom bringup: the readiness watcher did not shut down ({why}); leaving it '
                  'to the exit', file=sys.stderr, flush=True)


# -- one process for every node (composition) ------------------------------------------------
class RobotProcess:
    """The robot's nodes in this process, each spun by its own executor on its own thread; the
    agents hosted in one AgentNode here, which the manager brings up (spawn: false)."""

    left_running = False   # stop() left a thread inside a node's teardown (rclpy must stay up)

    def __init__(self, args, selected, agent_ids, agents_file: str, params_file: str,
                 robot_file: str):
        from rclpy.parameter import Parameter

        from loom_ros.agents.agent_node import AgentNode
        self.nodes = []
        self.threads = []
        self._stops = []
        self.deaths: dict[str, str] = {}   # node name -> what ended its spin thread
        self.agent_ids = agent_ids
        self.agents = None
        ids = ','.join(agent_ids)

        def overrides(node):
            params = node_parameters(args, node, selected, agent_ids, agents_file, params_file,
                                     robot_file)
            if node.name == table.MANAGER:
                # Every agent is hosted in this process's one AgentNode (agent_host_0), those
                # that ask for their own process too: one group. With the table's groups the
                # manager waited 30 s for an agent_<id> node that never comes (launch's
                # use_composition:=true, the face agent), then restarted it.
                params.update(spawn=False, groups=','.join(agent_ids))
                params.pop('agent_params_file', None)
            return [Parameter(k, value=v) for k, v in params.items()]
        routers = []
        for node in selected:
            if node.name == table.MANAGER:
                # The agents' host: the params file's agent section reaches it through
                # robot_file's /**/agent_host_0 section, storage.root through /**.
                # The router runs here: agents ask it in-process (no service round trip).
                router = routers[0].in_process() if routers else None
                self.agents = self._add(AgentNode(node_name=AGENT_HOST, router=router,
                                                  parameter_overrides=[
                    Parameter('agents', value=ids), Parameter('autostart', value=False),
                    Parameter('agents_file', value=agents_file)]))
            made = self._add(node.load_class()(parameter_overrides=overrides(node)))
            if node.name == 'router':
                routers.append(made)

    def _add(self, node):
        from rclpy.task import Future

        from loom_ros.bus.executor import make_executor, spin_until
        executor = make_executor()
        executor.add_node(node)
        stop = Future()
        name = node.get_name()

        def spin():
            try:
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

    def poll(self) -> None:
        """Raise naming every dead node and every refused configure (agents' included)."""
        problems = [f'node {n} died ({why})' for n, why in self.dead_nodes().items()]
        failed = [f'agent {a}: {why}' for a, why in dict(self.agents.failed).items()]
        failed += [f'{node.get_name()}: {node.configure_error}' for node, _ in self.nodes
                   if getattr(node, 'configure_error', '')]
        if failed:
            problems.append('configure failed: ' + '; '.join(failed))
        if problems:
            raise RuntimeError('; '.join(problems))

    def all_active(self) -> bool:
        """Every lifecycle node and every hosted agent active."""
        from loom_ros.agents.runtime import AgentState
        agents = dict(self.agents.agents)
        if not agents or any(a.lifecycle is not AgentState.ACTIVE for a in agents.values()):
            return False
        # rclpy has no public getter for a lifecycle node's state in-process; its services use
        # this.
        return all(node._state_machine.current_state[1] == 'active'
                   for node, _ in self.nodes if hasattr(node, '_state_machine'))

    def waiting_for(self) -> str:
        return ', '.join(node.get_name() for node, _ in self.nodes
                         if hasattr(node, '_state_machine')
                         and node._state_machine.current_state[1] != 'active')

    def stop(self) -> dict[str, str]:
        """Every node stopped within COMPOSITION_STOP_S (agents deactivated and committed,
        lifecycle nodes shut down); {} when they did, else what is left to the exit."""
        from loom_ros.bus.executor import STILL_RUNNING, within
        deadline = time.monotonic() + COMPOSITION_STOP_S
        problems: dict[str, str] = {}
        why = within(lambda: self._stop_all(deadline, problems), COMPOSITION_STOP_S,
                     'loom_bringup-stop')
        if why:
            problems['nodes'] = f'not stopped: {why} (left to the exit)'
        # Still inside an executor's shutdown or a node's teardown on its thread: rclpy must not
        # be shut down under it (main_with then exits at once, as end_process does).
        self.left_running = why.startswith(STILL_RUNNING)
        return problems

    def _stop_all(self, deadline: float, problems: dict[str, str]) -> None:
        """Each step of each agent and node tried, whatever an earlier one raised; what failed
        goes into `problems` (bring-up then exits 1)."""
        from loom_ros.agents.runtime import AgentState
        from loom_ros.bus.executor import finalize_node

        def step(name: str, call) -> None:
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - said, and the others still stop
                problems[name] = f'{type(exc).__name__}: {str(exc)[:300]}'
        # Agents first: they deactivate (handle what they accepted) and commit their state.
        for agent in list(self.agents.agents.values()):
            if agent.lifecycle is AgentState.ACTIVE:
                step(f'agent {agent.id}', agent.deactivate)
        for stop in self._stops:
            if not stop.done():
                stop.set_result(True)
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for node, executor in reversed(self.nodes):
            name = node.get_name()
            step(name, executor.shutdown)
            # lifecycle nodes run on_shutdown: state committed, sessions closed
            step(name, lambda node=node: finalize_node(node))
            step(name, node.destroy_node)


def _check_side(side: dict[str, Process]) -> None:
    exited = [f'{n} {p.exit_reason()}' for n, p in side.items() if not p.running]
    if exited:
        raise RuntimeError('; '.join(exited))


def storage_layout(params_file: str) -> StorageLayout:
    """The layout under the params file's storage.root (its /** section, else the default)."""
    root = by_node(load_params_file(params_file)).get('/**', {}).get(ROOT_PARAMETER.name) or \
        node_defaults('/**')[ROOT_PARAMETER.name]
    return StorageLayout.at(root)


def main_with(args, ros_args: list[str]) -> int:
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from loom_ros.bus.executor import within
    params_file = args.config or str(config_dir() / DEFAULTS_FILE)
    stop = stop_event()   # never stop.set() in a signal handler itself (stop_signals)
    side: dict[str, Process] = {}
    robot = readiness = None
    code = 0
    with tempfile.TemporaryDirectory(prefix='loom_bringup_') as tmp:
        try:
            check_params_file(params_file)   # a typo'd key or node section: refused up front
            robot_name = robot_id(params_file)
            layout = storage_layout(params_file)
            usable_dir(layout.root, 'storage.root')
            args.keys_dir = args.keys_dir or str(layout.keys)
            if not args.nodes_only:
                local_credentials(args, robot_name)
                if args.insecure:
                    print(f'loom bringup: WARNING {INSECURE_WARNING}', file=sys.stderr,
                          flush=True)
                if not args.zenoh_connect:
                    side['zenoh_router'] = _start_side('zenoh_router', [
                        *entry.command('loom_ros.bridge.zenoh_router'), '--listen',
                        _endpoint(args), *_zenoh_security(args)], args.log_dir)
                    _wait_ready(side['zenoh_router'], 'the Zenoh router', stop)
                if args.cloud:
                    side['cloud'] = _start_side('cloud', [
                        *entry.command('loom_ros.cloud.server'), '--connect',
                        _endpoint(args), *_zenoh_security(args),
                        *(['--data-dir', args.cloud_data_dir] if args.cloud_data_dir else [])],
                        args.log_dir)
            agents_file = _agents_file(args, tmp, robot_name)
            agent_ids = _agent_ids(args, agents_file)
            # Composition hosts every agent in agent_host_0; processes follow own_process.
            hosts = [AGENT_HOST] if args.composition else \
                agent_hosting(agents_file, agent_ids)[1]
            robot_file = robot_params(params_file, tmp, hosts)
            selected = _selected(args)
            ns = _namespace(args)
            if args.composition:   # this process runs the nodes: the table's environment
                os.environ.update(table.env_additions(table.by_name(table.MANAGER), os.environ))
            rclpy.init(args=['loom_bringup', '--ros-args', '--params-file', robot_file,
                             *(['-r', f'__ns:={ns}'] if args.composition else []),
                             *ros_args[1:]], signal_handler_options=SignalHandlerOptions.NO)
            if args.composition:
                robot = RobotProcess(args, selected, agent_ids, agents_file, params_file,
                                     robot_file)
                active = robot.all_active if args.autostart else (lambda: True)
                waiting = robot.waiting_for
            else:
                robot = NodeProcesses(args, node_commands(
                    args, selected, agent_ids, agents_file, params_file, robot_file, tmp,
                    ros_args), tmp)
                readiness = Readiness(selected, ns, bool(args.autostart))
                active, waiting = readiness.check, readiness.waiting_for
            if 'cloud' in side:
                _wait_ready(side['cloud'], 'the cloud tier', stop)
            started = time.monotonic()
            while not stop.is_set():
                robot.poll()
                _check_side(side)
                if active():
                    break
                if time.monotonic() - started > args.ready_timeout:
                    raise RuntimeError(f'not active within {args.ready_timeout:.0f} s: '
                                       f'waiting for {waiting()}')
                stop.wait(0.1)
            robot.poll()
            _check_side(side)
            if not stop.is_set():
                print(json.dumps({
                    'ready': True, 'pid': os.getpid(),
                    'mode': 'composition' if args.composition else 'processes',
                    'namespace': ns, 'agents': agent_ids,
                    'nodes': [n.name for n in selected],
                    'node_pids': {} if args.composition else robot.pids(),
                    'zenoh': None if args.nodes_only else _endpoint(args),
                    'cloud': 'cloud' in side, 'secure': not args.insecure,
                    'keys_dir': str(keys.keys_path(args.keys_dir)),
                    'side_pids': {n: p.pid for n, p in side.items()},
                    'params_file': params_file}), flush=True)
            deadline = time.monotonic() + args.duration if args.duration else None
            while not stop.wait(0.2):
                if deadline and time.monotonic() > deadline:
                    break
                robot.poll()
                _check_side(side)
        except Stopped as exc:   # a stop asked for during start-up: not a failure
            print(f'loom bringup: {exc}', file=sys.stderr, flush=True)
        except Exception as exc:  # a bad config, a part that died: say why
            print(f'loom bringup: {type(exc).__name__}: {exc}', file=sys.stderr, flush=True)
            code = 1
        finally:
            # The nodes first: nothing may keep them from stopping (the readiness watcher's
            # executor could hang in its shutdown, and then no node got its SIGINT).
            if robot is not None:
                codes = robot.stop()
                bad = {n: c for n, c in (codes or {}).items()
                       if c not in (0, -signal.SIGINT, None)}
                if bad:   # a node that aborts on Ctrl-C is a fault, not a detail
                    print(f'loom bringup: nodes did not stop cleanly: {bad}', file=sys.stderr,
                          flush=True)
                    code = 1
            if readiness is not None:
                readiness.close()
            if args.composition:
                from loom_ros.telemetry import tracing
                tracing.flush()
            for proc in side.values():   # SIGINT now, before rclpy's shutdown
                proc.interrupt()
            left_running = robot is not None and robot.left_running
            why = 'the nodes\' stop still runs' if left_running else \
                within(rclpy.try_shutdown, RCLPY_SHUTDOWN_S, 'loom_bringup-shutdown')
            if why:
                print(f'loom bringup: rclpy did not shut down ({why}); leaving it to the exit',
                      file=sys.stderr, flush=True)
            stop_together(side.values(), SIDE_STOP_S)
            if not left_running and not why:
                # Every node and this process's own participant are gone: nothing can still read
                # from the nodes' shared memory, and what this process had mapped of it would
                # never be released (it ends with os._exit): a demo left 11 segments, 87 MB.
                clean_dead_segments()   # said: nothing (the last line is the reason)
            if left_running:
                # Python's own exit would tear rclpy down under the thread still stopping the
                # nodes: end here (the side processes are stopped, the temporary folder goes).
                shutil.rmtree(tmp, ignore_errors=True)
                _end(code or 1)
    _end(code)


def _end(code: int) -> NoReturn:
    """Bring-up's last step: every node, side process and rclpy itself is stopped and its
    output flushed, so the process ends here instead of in Python's own exit, which then runs
    the middleware's C++ static destructors (Fast DDS's participant factory and shared-memory
    watchdog threads; such destructors have hung, eProsima/Fast-DDS#235, #1921). A bring-up
    whose every node had stopped cleanly and which had printed nothing more hung somewhere
    after its last bounded step, until the demo SIGKILLed it 85 s later (one demo of about 60
    on 2026-12-02): nothing bring-up still had to do was left for that exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> int:
    from loom_ros.cli import standalone
    return standalone('loom bringup', __doc__.splitlines()[0], add_arguments, main_with, argv)


if __name__ == '__main__':
    sys.exit(main())
