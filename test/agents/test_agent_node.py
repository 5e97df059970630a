"""An agent in its own process: events through the mailbox into persisted state, intents out,
SIGKILL mid-stream with the state equal to the last committed event, restore on restart, the
standard lifecycle services, and a failing behavior that is counted while the agent goes on."""
import json
import signal
import sqlite3

import pytest

from loom_ros.bus.event import Event

AGENTS = """agents:
  - id: tally
    behavior: counter
    subscriptions: ["test.tally"]
    qos: batched
    mailbox_size: 5000   # more than the test sends: nothing is dropped, so order is checkable
    settings: {intent_every: 10}
"""


def committed(db_path, agent_id='tally'):
    """The agent's state as committed, read straight from its host's unit database
    (<storage.root>/db/<namespace>.<node>.db)."""
    try:
        with sqlite3.connect(f'file:{db_path}?mode=ro', uri=True) as db:
            row = db.execute("select value from kv where ns = 'agent_state' and key = ?",
                             [agent_id]).fetchone()
    except sqlite3.OperationalError:
        return None
    if not row:
        return None
    record = json.loads(row[0])
    return record['state'], record['events']


@pytest.fixture
def agent(spawn, tmp_path):
    agents = tmp_path / 'agents.yaml'
    agents.write_text(AGENTS)

    def start(namespace='/ag'):
        """Each test its own namespace: a killed agent's endpoints linger in discovery."""
        return spawn('-m', 'loom_ros.agents.agent_node', '--ros-args', '-r', f'__ns:={namespace}',
                     '-r', '__node:=agent_tally', '-p', 'agent_id:=tally',
                     '-p', f'agents_file:={agents}', '-p', f'storage.root:={tmp_path}')
    return start


def test_sigkill_mid_stream_keeps_the_last_committed_state_and_restart_restores_it(
        ros, agent, tmp_path):
    from rclpy.node import Node

    from loom_ros.bus.bus import EventBus
    node = Node('tally_feeder', namespace='/ag', context=ros.node.context)
    bus = EventBus(node)
    ros.executor.add_node(node)
    intents = []
    bus.subscribe('agent.tally.intent', lambda e, t: intents.append(e.json()['total']))
    db = tmp_path / 'db' / 'ag.agent_tally.db'
    try:
        proc = agent()
        pub = bus.publisher_for('test.tally', 'batched')
        ros.wait_for(lambda: pub.get_subscription_count() >= 1, 'the agent to subscribe',
                     alive=[proc])
        # and its intents reach us: the agent makes their publisher when configured, before
        # its first tick, but matching our reader may still be under way (intents are volatile)
        ros.wait_for(lambda: bus.matched_publishers('agent.tally.intent') >= 1,
                     "the agent's intents to match", alive=[proc])
        for i in range(3000):
            bus.publish('test.tally', Event(type='tick', id=f't{i}'), 'batched')
        bus.flush()
        ros.wait_for(lambda: intents and intents[-1] >= 10, 'intents from the agent')
        ros.wait_for(lambda: (committed(db) or ({}, 0))[1] >= 100, 'the agent to be mid-stream')
        proc.popen.send_signal(signal.SIGKILL)
        proc.finish()
        state, events = committed(db)
        assert state['total'] == events and state['counts'] == {'tick': events}
        assert state['last_id'] == f't{events - 1}'  # in order, nothing skipped
        assert all(n % 10 == 0 for n in intents)

        proc = agent()  # restart on the same unit database
        # The killed agent's reader lingers in discovery until its lease ends, so a matched
        # count proves nothing: send until the new agent has taken one, then it is connected.
        sent = iter(range(10**6))

        def tock():
            bus.publish('test.tally', Event(type='tock', id=f'n{next(sent)}'), 'batched')
            bus.flush()
        ros.wait_for(lambda: 'tock' in committed(db)[0]['counts'], 'the restarted agent',
                     spin=tock, alive=[proc])
        bus.publish('test.tally', Event(type='fail.please', id='boom'), 'batched')
        bus.publish('test.tally', Event(type='tock', id='after'), 'batched')
        bus.flush()
        ros.wait_for(lambda: committed(db)[0].get('last_id') == 'after', 'the new events')
        state, handled = committed(db)
        # Restored, not reset: every tick committed before the kill is still counted (a tick
        # still in flight to the killed agent may also arrive, so at least, not exactly).
        assert state['counts']['tick'] >= events and state['counts']['tock'] >= 1
        assert state['total'] == sum(state['counts'].values())
        # The failed event was taken from the mailbox, but its half-made changes were rolled back.
        assert 'fail.please' not in state['counts'] and handled == state['total'] + 1
        proc.popen.send_signal(signal.SIGINT)
        assert proc.finish()[0] == 0
    finally:
        ros.executor.remove_node(node)
        bus.destroy()
        node.destroy_node()


def test_lifecycle_services_from_another_process(ros, agent):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    proc = agent('/ag_lifecycle')
    get_state = ros.node.create_client(GetState, '/ag_lifecycle/agent_tally/get_state')
    change = ros.node.create_client(ChangeState, '/ag_lifecycle/agent_tally/change_state')

    def label():   # safe to repeat: resent until answered (DDS's reply-matching race)
        return ros.call(get_state, GetState.Request(), 'get_state',
                        alive=[proc]).current_state.label
    assert label() == 'active'
    assert ros.transition(change, get_state, Transition.TRANSITION_DEACTIVATE, 'inactive',
                          'deactivate', alive=[proc])
    assert label() == 'inactive'
    assert ros.transition(change, get_state, Transition.TRANSITION_CLEANUP, 'unconfigured',
                          'cleanup', alive=[proc])
    assert label() == 'unconfigured'
    proc.popen.send_signal(signal.SIGINT)
    assert proc.finish()[0] == 0


def test_recall_service_over_episodic_and_semantic_memory(ros, spawn, tmp_path):
    from loom_msgs.srv import Recall
    from rclpy.node import Node

    from loom_ros.bus.bus import EventBus
    agents = tmp_path / 'agents.yaml'
    agents.write_text('agents:\n  - id: mem\n    behavior: memorize\n    subscriptions: [user.facts]\n'
                      '    qos: batched\n    semantic_memory: true\n')
    # No __node remap: a standalone agent is named after its id (issue 15, fault 5: it was
    # always /agent, so /ag_mem/agent_mem/recall did not exist).
    proc = spawn('-m', 'loom_ros.agents.agent_node', '--ros-args', '-r', '__ns:=/ag_mem',
                 '-p', 'agent_id:=mem', '-p', f'agents_file:={agents}',
                 '-p', f'storage.root:={tmp_path}')
    node = Node('fact_feeder', namespace='/ag_mem', context=ros.node.context)
    bus = EventBus(node)
    client = ros.node.create_client(Recall, '/ag_mem/agent_mem/recall')

    def recall(**fields):
        return ros.call(client, Recall.Request(**fields), 'recall', alive=[proc])
    try:
        pub = bus.publisher_for('user.facts', 'batched')
        ros.wait_for(lambda: pub.get_subscription_count() >= 1, 'the agent', alive=[proc])
        facts = [('Alice', 'likes', 'green tea'), ('Alice', 'works_in', 'the robotics lab'),
                 ('Bob', 'drives', 'a red car')]
        for i, (s, r, o) in enumerate(facts):
            bus.publish('user.facts', Event.with_json('fact', {'subject': s, 'relation': r,
                                                               'object': o}, id=f'f{i}',
                                                      tags=['user']), 'batched')
        bus.flush()
        ros.wait_for(lambda: len(recall(mode='episodic').results) == 3, 'three episodes')
        best = json.loads(recall(mode='similar', query='which beverage does Alice like',
                                 k=1).results[0])
        assert (best['object'], best['provenance']) == ('green tea', 'f0')
        graph = [json.loads(r) for r in recall(mode='graph', query='Alice').results]
        assert {g['object'] for g in graph} == {'green tea', 'the robotics lab'}
        tagged = recall(mode='episodic', tag='user', type='fact')
        assert [json.loads(r)['event_id'] for r in tagged.results] == ['f0', 'f1', 'f2']
        bad = recall(mode='dream')
        assert not bad.ok and 'mode must be' in bad.error
    finally:
        bus.destroy()
        node.destroy_node()
    proc.popen.send_signal(signal.SIGINT)
    assert proc.finish()[0] == 0


@pytest.mark.parametrize('limit', [
    # A 256 KiB cap on the host's database (its tables take 128): SQLite then reports
    # 'database or disk is full'.
    'state_max_mb:=0.25',
    # The root's total budget (every file under it, WAL included), which every writer under
    # the root stops at (review finding: the budget gate was never given to a writer).
    'storage.budget.total_bytes:=1000000'])
def test_full_disk_deactivates_the_agent_and_keeps_what_was_committed(ros, spawn, tmp_path,
                                                                       limit):
    from lifecycle_msgs.srv import GetState
    from rclpy.node import Node

    from loom_ros.bus.bus import EventBus
    agents = tmp_path / 'agents.yaml'
    agents.write_text(AGENTS)
    proc = spawn('-m', 'loom_ros.agents.agent_node', '--ros-args', '-r', '__ns:=/ag_full',
                 '-r', '__node:=agent_tally', '-p', 'agent_id:=tally', '-p', f'agents_file:={agents}',
                 '-p', f'storage.root:={tmp_path}', '-p', limit)
    node = Node('full_feeder', namespace='/ag_full', context=ros.node.context)
    bus = EventBus(node)
    get_state = ros.node.create_client(GetState, '/ag_full/agent_tally/get_state')

    def label():
        return ros.call(get_state, GetState.Request(), 'get_state', alive=[proc]).current_state.label
    try:
        pub = bus.publisher_for('test.tally', 'batched')
        ros.wait_for(lambda: pub.get_subscription_count() >= 1, 'the agent', alive=[proc])
        ros.wait_for(get_state.service_is_ready, 'get_state', alive=[proc])
        sent = iter(range(10**6))

        def flood():
            bus.publish('test.tally', Event(type='tick', id=f'x{next(sent)}',
                                            payload=b'p' * 2000), 'batched')
            bus.flush()
        db = tmp_path / 'db' / 'ag_full.agent_tally.db'
        # One event committed first: a flood's first group commit can take in more than the cap
        # holds, and fail whole (a loaded CI run committed nothing before the disk was full).
        flood()
        ros.wait_for(lambda: committed(db) is not None, 'the first event committed', alive=[proc])
        ros.wait_for(lambda: label() == 'inactive', 'the agent to deactivate', spin=flood)
        state, events = committed(db)
        assert 0 < events == state['total'] and state['last_id'] == f'x{events - 1}'
        with sqlite3.connect(f'file:{db}?mode=ro', uri=True) as conn:   # each in its episode
            assert conn.execute('pragma integrity_check').fetchone()[0] == 'ok'
            assert [r[0] for r in conn.execute("select event_id from episodes where agent_id = "
                                               "'tally' order by id")] == \
                [f'x{i}' for i in range(events)]
        assert proc.popen.poll() is None  # the process lives on, inactive
        # ... and says why on /diagnostics, at ERROR, with what to do.
        from diagnostic_msgs.msg import DiagnosticArray
        seen = {}
        node.create_subscription(DiagnosticArray, '/diagnostics', lambda m: seen.update(
            {s.name: s for s in m.status}), 10)
        ros.executor.add_node(node)
        key = '/ag_full/agent_tally: state persistence'
        ros.wait_for(lambda: key in seen, 'the persistence diagnostic', alive=[proc])
        assert seen[key].level == b'\x02' and 'cannot persist' in seen[key].message
        if 'budget' in limit:   # it says which limit, with the numbers
            assert 'of 1,000,000 bytes budget used' in seen[key].message, seen[key].message
        ros.executor.remove_node(node)
    finally:
        bus.destroy()
        node.destroy_node()
    proc.popen.send_signal(signal.SIGINT)
    assert proc.finish()[0] == 0


def test_in_process_router_and_plugins_are_injected_into_the_behaviors(ros, tmp_path):
    """An agent node sharing its process with the router's decision path and a plugin host
    (composition): the face agent calls them directly, with no service client at all."""
    import threading

    import numpy as np
    import skimage.data
    from PIL import Image
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.task import Future

    from harness import REPO
    from loom_ros.agents.agent_node import AgentNode
    from loom_ros.bus.bus import EventBus
    from loom_ros.bus.executor import make_executor, spin_until
    from loom_ros.bus.qos import TopicQosTable
    from loom_ros.config.params import node_defaults
    from loom_ros.plugins.host import PluginHost, load_plugins_file
    from loom_ros.plugins.perception.image import frame_event
    from loom_ros.router.local import LocalRouter
    host = PluginHost([s for s in load_plugins_file(REPO / 'config' / 'plugins.yaml')
                       if s.name == 'face_expression'])
    assert host.start() == {}
    router = LocalRouter.from_file(REPO / 'config' / 'policy.yaml')
    agents = AgentNode(agent_id='face', router=router, local_plugins=lambda: host.handles,
                       namespace='/ag_inproc', parameter_overrides=[
                           Parameter('storage.root', value=str(tmp_path)),
                           Parameter('autostart', value=False)])
    executor, stop = make_executor(), Future()
    executor.add_node(agents)
    spinning = threading.Thread(target=spin_until, args=(executor, stop), daemon=True)
    node = Node('inproc_camera', namespace='/ag_inproc', context=ros.node.context)
    defaults = node_defaults('inproc_camera')   # the product's QoS table, as every process
    camera = EventBus(node, topic_qos=TopicQosTable(defaults['bus.topic_qos'],
                                                    defaults['bus.default_qos']))
    ros.executor.add_node(node)
    shown = []
    camera.subscribe('agent.face.action', lambda e, _t: shown.append(e.json()))
    photo = frame_event(np.asarray(Image.fromarray(skimage.data.astronaut()).resize(
        (640, 480))), type='camera.front', encoding='bgr8')
    try:
        assert agents.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert agents.trigger_activate() == TransitionCallbackReturn.SUCCESS
        spinning.start()
        out = camera.publisher_for('camera.front', 'realtime')
        ros.wait_for(lambda: out.get_subscription_count() >= 1, 'the face agent')
        ros.wait_for(lambda: shown, 'the ui_update', spin=lambda: camera.publish(
            'camera.front', photo, 'realtime') if not shown else None)
        assert shown[0]['label'] == 'happy' and shown[0]['rule'] == 'threshold'
        assert router.decisions >= 1
        assert host.counters('face_expression')['calls'] >= 1
        names = [client.srv_name for client in agents.clients]
        assert not [n for n in names if n.endswith(('router/route', 'handle_event'))], names
    finally:
        stop.set_result(True)
        if spinning.is_alive():
            spinning.join(10)
        executor.shutdown()
        agents.trigger_shutdown()
        agents.destroy_node()
        ros.executor.remove_node(node)
        camera.destroy()
        node.destroy_node()
        host.stop()


def test_an_agent_host_with_encryption_on_keeps_no_plaintext_and_refuses_to_start_without_key(
        ros, spawn, tmp_path):
    """storage.encryption (the params file's /** section) reaches the agent hosts, not only the
    storage node: what an agent stores is ciphertext in its unit database (Recall still reads
    it), and a host started without the master key refuses to configure, saying why, rather
    than writing plaintext beside encrypted rows."""
    from loom_msgs.srv import Recall
    from rclpy.node import Node

    from loom_ros.bus.bus import EventBus
    from loom_ros.security.keyring import MasterKey, write_key_file
    canary = 'CANARY-7f3e-teapot-in-the-lab'
    key_file = tmp_path / 'master.key'
    write_key_file(key_file, [MasterKey.generate()])
    agents = tmp_path / 'agents.yaml'
    agents.write_text('agents:\n  - id: mem\n    behavior: memorize\n    subscriptions: [user.facts]\n'
                      '    qos: batched\n')
    args = ['-m', 'loom_ros.agents.agent_node', '--ros-args', '-r', '__ns:=/ag_enc',
            '-p', 'agent_id:=mem', '-p', f'agents_file:={agents}',
            '-p', f'storage.root:={tmp_path}', '-p', 'storage.encryption.enabled:=true']
    proc = spawn(*args, '-p', f'storage.encryption.master_key_file:={key_file}')
    node = Node('enc_feeder', namespace='/ag_enc', context=ros.node.context)
    bus = EventBus(node)
    client = ros.node.create_client(Recall, '/ag_enc/agent_mem/recall')
    try:
        pub = bus.publisher_for('user.facts', 'batched')
        ros.wait_for(lambda: pub.get_subscription_count() >= 1, 'the agent', alive=[proc])
        bus.publish('user.facts', Event.with_json('fact', {'subject': 'Alice', 'relation': 'owns',
                                                           'object': canary}, id='f0'), 'batched')
        bus.flush()
        ros.wait_for(lambda: canary in ''.join(ros.call(
            client, Recall.Request(mode='episodic'), 'recall', alive=[proc]).results),
            'the episode, decrypted by Recall')
    finally:
        bus.destroy()
        node.destroy_node()
    proc.popen.send_signal(signal.SIGINT)
    assert proc.finish()[0] == 0
    files = [p for p in (tmp_path / 'db').rglob('*') if p.is_file()]
    assert files, 'the host wrote no unit database'
    for path in files:
        assert canary.encode() not in path.read_bytes(), path
    keyless = spawn(*args)   # no key file, and no LOOM_STORAGE_MASTER_KEY in the environment
    code, _out, err = keyless.finish()
    assert code == 1 and 'there is no master key' in err, err[-2000:]
    assert canary.encode() not in b''.join(p.read_bytes() for p in files if p.exists())
