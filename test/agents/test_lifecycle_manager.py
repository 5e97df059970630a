"""The lifecycle manager across real processes: it starts the agent processes, brings them up in
order, reports each agent on loom/agents/status and /diagnostics, restarts a SIGKILLed agent with
its state restored from SQLite, restarts a hung agent, and gives up after max_restarts."""
import json
import os
import signal
import sqlite3

import pytest

from harness import SHM, fastdds_shm, shm_files_of
from loom_ros.bus.event import Event

AGENTS = """agents:
  - id: first
    behavior: counter
    subscriptions: ["test.lm.first"]
    qos: realtime
    settings: {intent_every: 1000, hang_on: hang.please}
  - id: second
    behavior: counter
    subscriptions: ["test.lm.second"]
    qos: realtime
"""


def committed(db_path, agent_id='first'):
    """An agent's committed state in its host's unit database (<storage.root>/db/<namespace>.
    <node>.db), read by hand."""
    try:
        with sqlite3.connect(f'file:{db_path}?mode=ro', uri=True) as db:
            row = db.execute("select value from kv where ns = 'agent_state' and key = ?",
                             [agent_id]).fetchone()
    except sqlite3.OperationalError:
        return {}, 0
    if not row:
        return {}, 0
    record = json.loads(row[0])
    return record['state'], record['events']


class Watch:
    """The test's view of the manager's reports: latest AgentStatus per agent, latest
    diagnostics per agent, plus a bus to send the agents events."""

    def __init__(self, ros, namespace):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.node import Node

        from loom_msgs.msg import AgentStatus
        from loom_ros.bus.bus import EventBus
        from loom_ros.bus.qos import QosLevel, to_qos_profile
        self.ros = ros
        self.node = Node('lm_watch', namespace=namespace, context=ros.node.context)
        self.bus = EventBus(self.node)
        self.status: dict = {}
        self.diagnostics: dict = {}
        self.node.create_subscription(AgentStatus, 'loom/agents/status', self._on_status,
                                      to_qos_profile(QosLevel.BACKGROUND))
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 10)
        ros.executor.add_node(self.node)
        self.sent = 0

    def _on_status(self, msg):
        self.status[msg.agent_id] = msg

    def _on_diag(self, msg):
        for status in msg.status:
            if status.hardware_id.startswith('agent_'):
                self.diagnostics[status.name] = status

    def health(self, agent):
        msg = self.status.get(agent)
        return (msg.health, msg.restarts) if msg else (None, None)

    def send(self, agent, type='tick'):
        self.bus.publish(f'test.lm.{agent}', Event(type=type, id=f'e{self.sent}'), 'realtime')
        self.sent += 1

    def close(self):
        self.ros.executor.remove_node(self.node)
        self.bus.destroy()
        self.node.destroy_node()


@pytest.fixture
def manager(ros, spawn, tmp_path):
    """Start a manager over AGENTS in its own namespace; yields (process, Watch)."""
    agents = tmp_path / 'agents.yaml'
    agents.write_text(AGENTS)
    started = []

    def start(namespace, *params):
        watch = Watch(ros, namespace)
        args = ['-m', 'loom_ros.bringup.lifecycle_manager_node', '--ros-args',
                '-r', f'__ns:={namespace}', '-p', f'agents_file:={agents}',
                '-p', f'storage.root:={tmp_path}', '-p', 'status_period_s:=0.2']
        for p in params:
            args += ['-p', p]
        proc = spawn(*args)
        started.append((proc, watch))
        return proc, watch
    yield start
    for proc, watch in started:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGINT)
            code, out, err = proc.finish()
            assert code == 0, err
        watch.close()


def test_autostart_false_waits_for_the_startup_service(ros, manager, tmp_path):
    # Issue 15, fault 4: with autostart false nothing could ever start the agents.
    from std_srvs.srv import Trigger
    proc, watch = manager('/lm_later', 'autostart:=false')
    startup = ros.node.create_client(Trigger, '/lm_later/lifecycle_manager/startup')
    is_active = ros.node.create_client(Trigger, '/lm_later/lifecycle_manager/is_active')

    def call(client):
        # Resent until answered (a full parallel run lost the first answer to DDS's matching
        # race and waited 60 s): both are safe to repeat, a second startup says so.
        return ros.call(client, Trigger.Request(), 'the manager service', alive=[proc])
    try:
        before = call(is_active)
        assert not before.success and 'call ~/startup' in before.message
        # Nothing was spawned: a report arrived, and no agent has a heartbeat (no pid).
        ros.wait_for(lambda: watch.status.get('first') is not None, 'a report', alive=[proc])
        assert watch.status['first'].pid == 0
        assert call(startup).success
        ros.wait_for(lambda: watch.health('first')[0] == 'ok' and
                     watch.health('second')[0] == 'ok', 'both agents ok after startup',
                     alive=[proc])
        ros.wait_for(lambda: call(is_active).success, 'is_active true', alive=[proc])
        assert call(startup).message == 'already started'
    finally:
        ros.node.destroy_client(startup)
        ros.node.destroy_client(is_active)


def test_brings_agents_up_in_order_and_reports_them(ros, manager, tmp_path):
    proc, watch = manager('/lm_order')
    ros.wait_for(lambda: watch.health('first')[0] == 'ok' and watch.health('second')[0] == 'ok',
                 'both agents ok', alive=[proc])
    first, second = watch.status['first'], watch.status['second']
    assert (first.lifecycle, second.lifecycle) == ('active', 'active')
    assert first.pid != second.pid and first.node.endswith('/agent_first')
    ros.wait_for(lambda: watch.diagnostics.get('loom/agents/second') is not None,
                 'diagnostics for the agents', alive=[proc])
    assert watch.diagnostics['loom/agents/first'].level == b'\x00'  # OK
    # Events reach an agent the manager started, and are committed.
    ros.wait_for(lambda: committed(tmp_path / 'db' / 'lm_order.agent_second.db', 'second')[1] >= 1,
                 'the second agent to handle an event', spin=lambda: watch.send('second'))
    # The agent processes end with the manager; its log shows the bring-up order.
    proc.popen.send_signal(signal.SIGINT)
    code, out, err = proc.finish()
    assert code == 0
    active = [line for line in err.splitlines() if ' is active ' in line]
    assert 'agent_first' in active[0] and 'agent_second' in active[1], err
    for pid in (first.pid, second.pid):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sigkilled_agent_is_restarted_with_its_state(ros, manager, tmp_path):
    proc, watch = manager('/lm_kill', 'agents:=first', 'heartbeat_timeout_s:=2.0',
                          'shm_cleanup:=true')
    ros.wait_for(lambda: watch.health('first')[0] == 'ok', 'the agent ok', alive=[proc])
    db = tmp_path / 'db' / 'lm_kill.agent_first.db'   # the manager handed storage.root down
    ros.wait_for(lambda: committed(db)[1] >= 20, '20 committed events',
                 spin=lambda: watch.send('first'))
    victim = watch.status['first'].pid
    held = shm_files_of(victim)   # its Fast DDS shared memory, which SIGKILL leaves behind
    assert held or not fastdds_shm()
    os.kill(victim, signal.SIGKILL)
    before = committed(db)[1]
    ros.wait_for(lambda: watch.health('first') == ('ok', 1) and
                 watch.status['first'].pid not in (0, victim), 'the restarted agent',
                 alive=[proc])
    # ... until the manager, restarting it, has Fast DDS's tool give it back (bringup/shm.py)
    ros.wait_for(lambda: not any((SHM / f).exists() for f in held), "the killed agent's shared "
                 'memory given back', alive=[proc])
    # Restored, not reset: the restarted agent counts on from what was committed.
    ros.wait_for(lambda: committed(db)[1] > before, 'an event after the restart',
                 spin=lambda: watch.send('first', 'tock'))
    state, events = committed(db)
    assert state['counts']['tick'] >= before and state['total'] == events


def test_hung_agent_is_restarted_then_given_up_on(ros, manager, tmp_path):
    proc, watch = manager('/lm_hang', 'agents:=first', 'hang_timeout_s:=1.0',
                          'max_restarts:=1')
    ros.wait_for(lambda: watch.health('first')[0] == 'ok', 'the agent ok', alive=[proc])
    hung = watch.status['first'].pid
    # Send until the agent has taken one: a first event may go out before the match completes.
    ros.wait_for(lambda: watch.status['first'].busy_ms > 0 or watch.health('first')[1],
                 'the agent to take the hang event', spin=lambda: watch.send('first', 'hang.please'),
                 alive=[proc])
    ros.wait_for(lambda: watch.health('first') == ('ok', 1) and
                 watch.status['first'].pid != hung, 'the hung agent restarted', alive=[proc])
    # The hung process was killed, not left behind.
    ros.wait_for(lambda: not os.path.exists(f'/proc/{hung}'), 'the hung process to be gone')
    # Hanging again exceeds max_restarts: the manager gives up and says so on /diagnostics.
    ros.wait_for(lambda: watch.health('first')[0] == 'failed', 'the agent marked failed',
                 spin=lambda: watch.send('first', 'hang.please'), alive=[proc])
    # (The diagnostic that says 'hung' is an ERROR too and can arrive first: wait for the verdict.)
    ros.wait_for(lambda: 'gave up after' in getattr(watch.diagnostics.get('loom/agents/first'),
                                                    'message', ''), 'the give-up diagnostic')
    diagnostic = watch.diagnostics['loom/agents/first']
    assert diagnostic.level == b'\x02' and 'gave up after 1 restarts' in diagnostic.message
    # ~/startup, a fresh start, retries it (it answered success and the agent stayed failed
    # until the manager itself was restarted).
    from std_srvs.srv import Trigger
    client = ros.node.create_client(Trigger, '/lm_hang/lifecycle_manager/startup')
    try:
        answer = ros.call(client, Trigger.Request(), 'startup', alive=[proc])
        # (its message says 'retrying agent_first', unless this answer is to a repeat)
        assert answer.success, answer.message
        ros.wait_for(lambda: watch.health('first') == ('ok', 0), 'the agent up again, 0 restarts',
                     alive=[proc])
    finally:
        ros.node.destroy_client(client)


def test_pause_resume_shutdown_and_startup_drive_the_agents(ros, manager, tmp_path):
    # Nav2's manager services across processes: the agents go inactive and back, are stopped
    # (their processes end) and started again; is_active follows. One agent: each spawn costs
    # seconds on a loaded machine.
    from std_srvs.srv import Trigger
    proc, watch = manager('/lm_services', 'agents:=first')
    clients = {s: ros.node.create_client(Trigger, f'/lm_services/lifecycle_manager/{s}')
               for s in ('startup', 'shutdown', 'pause', 'resume', 'is_active')}

    def call(service):   # sent again if no answer comes: the manager answers a repeat alike
        return ros.call(clients[service], Trigger.Request(), service, alive=[proc])

    def both(predicate):   # every managed agent
        return watch.status.get('first') is not None and predicate(watch.status['first'])
    try:
        ros.wait_for(lambda: both(lambda s: s.health == 'ok' and s.lifecycle == 'active'),
                     'both agents ok', alive=[proc])
        ros.wait_for(lambda: call('is_active').success, 'is_active', alive=[proc])
        pids = {'first': watch.status['first'].pid}
        assert call('pause').success
        ros.wait_for(lambda: both(lambda s: s.lifecycle == 'inactive'), 'the agent inactive',
                     alive=[proc])
        assert not call('is_active').success
        assert call('resume').success
        ros.wait_for(lambda: call('is_active').success, 'is_active after resume', alive=[proc])
        ros.wait_for(lambda: both(lambda s: s.lifecycle == 'active'), 'the agent active',
                     alive=[proc])
        assert {a: watch.status[a].pid for a in pids} == pids   # the same processes
        assert call('shutdown').success
        ros.wait_for(lambda: both(lambda s: s.health == 'stopped'), 'the agent stopped',
                     alive=[proc])
        for pid in pids.values():
            ros.wait_for(lambda: not os.path.exists(f'/proc/{pid}') or
                         open(f'/proc/{pid}/stat').read().rpartition(')')[2].split()[0] == 'Z',
                         'the agent process to end')
        assert not call('is_active').success
        assert call('startup').success
        ros.wait_for(lambda: call('is_active').success, 'is_active after startup again',
                     alive=[proc])
        ros.wait_for(lambda: both(lambda s: s.health == 'ok' and
                                  s.pid not in (0, pids[s.agent_id])),
                     'the agent ok in a new process', alive=[proc])
    finally:
        for client in clients.values():
            ros.node.destroy_client(client)


def agent_processes(namespace: str, node: str) -> set[int]:
    """The live processes (not zombies) running `node` under `namespace`, from /proc."""
    found = set()
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/cmdline', 'rb') as f:
                args = f.read().split(b'\0')
            with open(f'/proc/{entry}/stat') as f:
                state = f.read().rpartition(')')[2].split()[0]
        except OSError:
            continue
        if state != 'Z' and f'__node:={node}'.encode() in args and \
                f'__ns:={namespace}'.encode() in args:
            found.add(int(entry))
    return found


def test_startup_retries_a_host_whose_configure_failed_in_one_process(ros, manager, tmp_path):
    """A host given up on at a failed configure still runs. ~/startup stops it before it
    starts the next: the retry had started a second process beside it, under the same name and
    storage unit, which the old one answered for, so the unit failed again."""
    import fcntl

    from std_srvs.srv import Trigger
    lock = tmp_path / 'db' / 'lm_fail.agent_first.db.lock'
    lock.parent.mkdir(parents=True, exist_ok=True)
    held = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)   # another writer holds the unit: configure fails
    proc, watch = manager('/lm_fail', 'agents:=first')
    client = ros.node.create_client(Trigger, '/lm_fail/lifecycle_manager/startup')
    try:
        ros.wait_for(lambda: watch.health('first')[0] == 'failed', 'the give-up', alive=[proc])
        old = agent_processes('/lm_fail', 'agent_first')
        assert len(old) == 1, old   # still running, as the log says why
        os.close(held)
        held = None
        assert ros.call(client, Trigger.Request(), 'startup', alive=[proc]).success
        ros.wait_for(lambda: watch.health('first') == ('ok', 0), 'the agent up again',
                     alive=[proc])
        now = agent_processes('/lm_fail', 'agent_first')
        assert len(now) == 1 and not now & old, (old, now)
    finally:
        if held is not None:
            os.close(held)
        ros.node.destroy_client(client)
