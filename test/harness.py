"""Constants and helpers tests import by name (conftest.py files are not importable by name once
several folders have one)."""
import os
import socket
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAIT_LIMIT_S = 60.0  # upper bound on any wait for a condition; reaching it is a failure


# Files that bring up a whole system (bring-up, the demo, the manager with its nodes) or run a
# benchmark: under `make test` (pytest-xdist) they run one after another on one worker, never two
# of them side by side on 2 cores; every other file is its own unit (its module fixtures set up
# once, on one worker). Without xdist this changes nothing.
SYSTEM_FILES = frozenset({
    'test/agents/test_lifecycle_manager.py', 'test/bench/test_bus_bench.py',
    'test/bench/test_speech_bench.py', 'test/bench/test_telemetry_bench.py',
    'test/bringup/test_manager_nodes.py', 'test/cli/test_bringup_namespace.py',
    'test/cli/test_bringup_supervision.py', 'test/cli/test_demo.py',
    'test/config/test_strict_config.py', 'test/flows/test_flows.py',
    'test/replay/test_deterministic_replay.py', 'test/test_launch_nodes.py',
    'test/view/test_view_browser.py',
})


def work_unit(nodeid: str) -> str:
    """The xdist work unit of a test: 'system' for SYSTEM_FILES, else its file."""
    path = nodeid.split('::', 1)[0]
    return 'system' if path in SYSTEM_FILES else path


def console_scripts() -> dict[str, str]:
    """setup.py's console scripts: name -> 'module:function'."""
    import ast
    tree = ast.parse((REPO / 'setup.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == 'console_scripts':
                    entries = [ast.literal_eval(e) for e in value.elts]
                    return dict(tuple(p.strip() for p in e.split('=', 1)) for e in entries)
    raise AssertionError('no console_scripts in setup.py')


def loom_cli(*args: str) -> list[str]:
    return ['-m', 'loom_ros.cli', *args]


def run_loom(*args: str, timeout: float = WAIT_LIMIT_S):
    """`loom <args>` in a subprocess from the repository, its output captured."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, *loom_cli(*args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


class LinePeer:
    """A child Python process spoken to line by line: `tell` on its stdin, lines from its stdout
    read unbuffered (select() on a buffered pipe misses lines already read ahead)."""

    def __init__(self, name: str, args: list[str], env: dict, terminate_on_close: bool = False):
        import subprocess
        import sys
        self.name = name
        self.terminate_on_close = terminate_on_close   # a node: SIGTERM is its clean stop
        self.popen = subprocess.Popen([sys.executable, *args], env=env, cwd=REPO,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self.fd = self.popen.stdout.fileno()
        self.pending, self.lines, self.last = b'', [], ''

    def poll_line(self, timeout: float) -> str | None:
        """The next line, or None after `timeout` s or at the end of the output."""
        import os
        import select
        if not self.lines:
            if not select.select([self.fd], [], [], timeout)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            *complete, self.pending = (self.pending + chunk).split(b'\n')
            self.lines.extend(line.decode().strip() for line in complete)
            if not self.lines:
                return None
        self.last = self.lines.pop(0)
        return self.last

    def wait_line(self, condition, what: str, limit: float = WAIT_LIMIT_S) -> str:
        """Read lines until one satisfies `condition`; fail at `limit` or if the child died."""
        import time

        import pytest
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            line = self.poll_line(0.1)
            if line is not None and condition(line):
                return line
            if line is None and self.popen.poll() is not None:
                break
        self.popen.kill()
        pytest.fail(f'{self.name}: no {what} within {limit:.0f} s (last line {self.last!r}); '
                    f'stderr: {self.popen.stderr.read()[-3000:]}')

    def tell(self, text: str) -> None:
        self.popen.stdin.write(text + '\n')
        self.popen.stdin.flush()

    def close(self) -> str:
        """Ask the child to exit ('exit' on stdin; SIGTERM too for a node), kill it if it has
        not within 15 s; returns its stderr."""
        import subprocess
        if self.popen.poll() is None:
            try:
                self.tell('exit')
                self.popen.stdin.close()
            except BrokenPipeError:
                pass
            if self.terminate_on_close:
                self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.stderr.read()


def old_agent_file(path, rows, episodes=(), facts=()):
    """An agent's own file as agents/state.py and memory.py wrote it before the storage layer
    (their tables, by hand): state rows (agent, schema, state json, events), episodes, facts."""
    import sqlite3
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute('create table agent_state (agent_id text primary key, schema int, state text, '
               'events int, last_event_id text, updated_ms int)')
    db.execute('create table episodes (agent_id text, event_id text, time_ms int, type text, '
               'source text, tags text, payload text)')
    db.execute('create table facts (id integer primary key, agent_id text, subject text, '
               'relation text, object text, provenance text, time_ms int, vector blob)')
    db.executemany('insert into agent_state values (?, ?, ?, ?, ?, 0)', rows)
    db.executemany('insert into episodes values (?, ?, ?, ?, ?, ?, ?)', episodes)
    db.executemany('insert into facts (agent_id, subject, relation, object, provenance, time_ms, '
                   'vector) values (?, ?, ?, ?, ?, ?, ?)', facts)
    db.commit()
    db.close()


# --- Replay into a fresh system (test/replay/test_deterministic_replay.py, test/cli/test_demo.py):
# a router and a face agent (real processes) in their own namespace and storage root, a test
# camera that talks to them, and the decision fields a replay must reproduce.

# RouteDecision fields that are the same when a decision is made again on the same event (the
# decision id and stamps are not: docs/replay.md).
DECISION_FIELDS = ('event_id', 'event_type', 'agent_id', 'privacy', 'route', 'rule', 'reason',
                   'upload', 'cloud_model', 'cloud_cost', 'confidence')


def decision_fields(msg) -> dict:
    return {name: getattr(msg, name) for name in DECISION_FIELDS}


def face_system_config(folder, mailbox_size: int = 100):
    """(agents file, params file) under `folder` for a face agent alone, with the shipped
    settings but a mailbox of `mailbox_size`: with the shipped 1 a newer frame replaces a waiting
    one, so which frames get decided depends on timing (docs/replay.md)."""
    import yaml
    folder.mkdir(parents=True, exist_ok=True)
    agents = yaml.safe_load((REPO / 'config' / 'agents.yaml').read_text())
    face = next(a for a in agents['agents'] if a['id'] == 'face')
    face['host_plugins'] = ['face_expression']
    face['mailbox_size'] = mailbox_size
    (folder / 'agents.yaml').write_text(yaml.safe_dump({'agents': [face]}))
    params = folder / 'params.yaml'
    params.write_text(yaml.safe_dump({
        '/**/plugin_host': {'ros__parameters': {'audit_db': str(folder / 'audit.db'),
                                                'data_dir': str(folder / 'plugins')}}}))
    return folder / 'agents.yaml', params


def start_face_system(spawn, root, ns: str, agents, params) -> list:
    """A router and a face agent host in namespace `ns` (real processes from the `spawn`
    fixture), under their own storage root <root>/<ns>."""
    ros_args = ['--ros-args', '-r', f'__ns:={ns}', '--params-file', str(params),
                '-p', f'storage.root:={root / ns.strip("/")}']
    router = spawn('-m', 'loom_ros.router.router_node', *ros_args)
    agent = spawn('-m', 'loom_ros.agents.agent_node', *ros_args, '-r', '__node:=agent_host_0',
                  '-p', 'agent_id:=face', '-p', f'agents_file:={agents}')
    return [router, agent]


def stop_procs(procs) -> list:
    """SIGINT to every process still running, then each one's (code, stdout, stderr)."""
    import signal
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGINT)
    return [proc.finish() for proc in procs]


FRAME_PERIOD_S = 0.2   # send_frame: five frames a second until the agent answers


class FaceCamera:
    """The test's camera: a node `name` in namespace `ns` on the session's rclpy context, its
    EventBus on the product's QoS table (as every Loom process has), sending frames as
    camera.front events; it keeps what the face agent showed (agent.face.action JSON: `shown` in
    order, `answered` by the frame's id) and what the router decided there (`decisions`, by event
    id). The agents, replay and demo tests all talk to a face agent through it."""

    def __init__(self, ros, ns: str, name: str = 'rp_camera', photo=None,
                 encoding: str = 'rgb8'):
        from loom_msgs.msg import RouteDecision
        from rclpy.node import Node

        from loom_ros.bus.bus import EventBus
        from loom_ros.bus.qos import TopicQosTable, to_qos_profile
        from loom_ros.config.params import node_defaults
        self.ros = ros
        self.photo, self.encoding = photo, encoding   # what send_frame sends
        self.node = Node(name, namespace=ns, context=ros.node.context)
        defaults = node_defaults(name)
        self.bus = EventBus(self.node, topic_qos=TopicQosTable(defaults['bus.topic_qos'],
                                                               defaults['bus.default_qos']))
        ros.executor.add_node(self.node)
        self.shown: list[dict] = []
        self.answered: dict[str, dict] = {}
        self.decisions: dict[str, object] = {}
        self.bus.subscribe('agent.face.action', self._on_action)
        self.node.create_subscription(RouteDecision, 'router/decisions',
                                      lambda m: self.decisions.setdefault(m.event_id, m),
                                      to_qos_profile('batched'))
        self.out = self.bus.publisher_for('camera.front', 'realtime')
        self._last = 0.0

    def _on_action(self, event, _topic):
        data = event.json()
        self.shown.append(data)
        self.answered[data.get('source_event', '')] = data

    def send(self, rgb, encoding: str | None = None) -> str:
        from loom_ros.plugins.perception.image import frame_event
        event = frame_event(rgb, type='camera.front', encoding=encoding or self.encoding)
        self.bus.publish('camera.front', event, 'realtime')
        return event.id

    def send_frame(self) -> None:
        """`photo` again, at most every FRAME_PERIOD_S: pass it as wait_for's spin."""
        import time
        if time.monotonic() - self._last >= FRAME_PERIOD_S:
            self._last = time.monotonic()
            self.send(self.photo)

    def happy(self) -> dict | None:
        return next((s for s in self.shown if s.get('label') == 'happy'), None)

    def warm_up(self, rgb, alive) -> list[str]:
        """The same frame every half second until the agent answers one (it is active, and it
        has handled everything that was in its mailbox before); the ids sent."""
        import time
        sent, last = [], [-1.0]

        def resend():
            if time.monotonic() - last[0] >= 0.5:
                last[0] = time.monotonic()
                sent.append(self.send(rgb))
        self.ros.wait_for(lambda: any(i in self.answered for i in sent), 'the face agent',
                          limit=120, alive=alive, spin=resend)
        return sent

    def close(self):
        if self.node is None:
            return
        self.ros.executor.remove_node(self.node)
        self.bus.destroy()
        self.node.destroy_node()
        self.node = None


T0_MS = 1_700_000_000_000   # the storage tests' epoch (ms)


class MsClock:
    """An injected wall clock in milliseconds that stands still until a test moves `.ms`
    (ages and timeouts driven without sleeping)."""

    def __init__(self, ms: int = T0_MS):
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


# --- The bridge's pure core without a network (test/bridge/test_core.py,
# test/storage/test_forget_service.py).

class RecordingTransport:
    """A transport standing in for Zenoh: `puts` records (key, event id, level) for every event
    put (a batch's one by one); only keys in `listening` have a subscriber, and nothing is ready
    while `connected` is false."""

    def __init__(self):
        self.connected, self.listening, self.puts = True, set(), []

    def ready(self, key, level):
        return self.connected and key in self.listening

    def put(self, key, data, level):
        from loom_ros.bridge import codec
        self.puts += [(key, event.id, level) for event in codec.decode_all(data)]


def recording_bridge(params: dict, inbound: dict | None = None, level_for=None, gate=None,
                     **options):
    """A bridge core (robot r1 unless `params` say otherwise) over a RecordingTransport:
    (bridge, transport, the privacy refusals it audited). `level_for` maps a topic to its QoS
    level (default: batched); `options` go to Bridge (batch_max_events...)."""
    from loom_ros.bridge.core import Bridge, BridgeConfig
    from loom_ros.bridge.gate import PrivacyGate
    from loom_ros.bus.qos import QosLevel
    config = BridgeConfig.from_params({'robot_id': 'r1', 'out_deny': [], 'buffer_max_events': 100,
                                       **params}, inbound or {'rules': []})
    audit: list[dict] = []
    transport = RecordingTransport()
    bridge = Bridge(config, transport, level_for or (lambda topic: QosLevel.BATCHED),
                    gate if gate is not None else PrivacyGate(), audit.append, **options)
    return bridge, transport, audit


def run_threads(target, count: int) -> None:
    """`target(i)` on `count` threads at once, to the end, with the GIL handed over as often as
    the interpreter can (races show up in a few runs instead of a few thousand)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)


LOOPBACK_HEX = '0100007F'   # 127.0.0.1 as /proc/net/tcp writes it
ANY_HEX = '00000000'        # 0.0.0.0


def tcp_listeners(port: int) -> list[str]:
    """The local addresses (as /proc/net/tcp and tcp6 write them) of every TCP socket of this
    machine listening on `port`: what an outsider's connect could reach."""
    found = []
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                address, _, hex_port = fields[1].partition(':')
                if fields[3] == '0A' and int(hex_port, 16) == port:   # 0A: LISTEN
                    found.append(address)
    return found


def free_port() -> int:
    """A TCP port free on loopback now (for a server the test starts next)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class SilentRouter:
    """A TCP listener that accepts every connection and never says a word: what a router that
    hangs (or a black-holing middlebox) looks like to zenoh.open, which then waits its open
    timeout out inside native code."""

    def __init__(self):
        self.server = socket.create_server(('127.0.0.1', 0))
        self.port = self.server.getsockname()[1]
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True, name='silent-router').start()

    def _accept(self):
        while True:
            try:
                self.accepted.append(self.server.accept()[0])
            except OSError:   # closed
                return

    def close(self):
        self.server.close()
        for conn in self.accepted:
            conn.close()


def assert_left_opening(code: int, err: str, node: str, thread: str) -> None:
    """A process stopped while `thread` was inside zenoh.open exited 0 on purpose (os._exit
    after its shutdown, bus.executor.end_process), naming the thread, and did not abort."""
    assert code == 0, err[-3000:]
    assert 'FATAL' not in err, err[-3000:]
    assert f'{node}: {thread} still inside native code after the shutdown; exiting now with 0' \
        in err, err[-3000:]


SHM = Path('/dev/shm')


def fastdds_shm() -> bool:
    """Whether processes here keep Fast DDS shared memory in /dev/shm (the rmw is Fast DDS)."""
    from loom_ros.bus.qos import FASTDDS_RMWS, rmw_of
    return rmw_of(os.environ) in FASTDDS_RMWS and SHM.is_dir()


def shm_files_of(pid: int) -> set[str]:
    """The lock files (`fastdds_<id>_el`) of the Fast DDS shared-memory segments process `pid`
    holds a flock on (/proc/locks): its own, which no other process keeps open (bringup/shm.py).
    Ports are left out: every participant of a domain opens its discovery port too."""
    inodes = set()
    for line in Path('/proc/locks').read_text().splitlines():
        fields = line.split()
        if 'FLOCK' in fields and fields[fields.index('FLOCK') + 3] == str(pid):
            inodes.add(int(fields[fields.index('FLOCK') + 4].rsplit(':', 1)[1]))
    held = set()
    for path in SHM.glob('fastdds_*_el'):
        if path.name.startswith('fastdds_port'):
            continue
        try:
            if path.stat().st_ino in inodes:
                held.add(path.name)
        except FileNotFoundError:
            pass
    return held


# Forgets argv[2] under the root argv[1] in a fresh process; prints how much forget grew its peak
# RSS (KiB; VmHWM: ru_maxrss keeps the forking parent's peak) and the receipt (as_dict).
FORGET_PEAK_SCRIPT = '''
import json, sys
import rclpy.serialization, loom_msgs.msg, std_msgs.msg   # what forget imports, before
from loom_ros.storage.erasure import forget
from loom_ros.storage.layout import StorageLayout

def peak():
    with open('/proc/self/status') as status:
        return next(int(line.split()[1]) for line in status if line.startswith('VmHWM:'))

before = peak()
receipt = forget(StorageLayout.at(sys.argv[1]), sys.argv[2], requested_by='dpo:test')
print(json.dumps({'grew_kib': peak() - before, 'receipt': receipt.as_dict()}))
'''
