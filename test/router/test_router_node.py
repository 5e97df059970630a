"""The router node in its own process: the Route service, decisions on router/decisions, the
lifecycle services, policy reload through parameters, and history that survives a restart."""
import signal
import time

import pytest

from harness import WAIT_LIMIT_S
from loom_ros.bus.event import Privacy
from loom_ros.bus.qos import to_qos_profile
from loom_ros.bus.replies import PROBE_ANSWER


def call(ros, client, request):
    """One Route request, sent once (a decision is not safe to send twice): only on a client
    whose reply path `matched` proved, else its answer can be lost to DDS's discovery race."""
    ros.wait_for(lambda: client.service_is_ready(), 'the router/route service')
    future = client.call_async(request)
    ros.wait_for(future.done, 'the Route response')
    return future.result()


def matched(ros, client, proc):
    """A client's first exchange (bus/replies.py): the empty Route request, sent until
    answered; the router answers it with no decision, nothing counted or published."""
    answer = ros.first_exchange(client, alive=[proc])
    assert not answer.ok and answer.error == PROBE_ANSWER, answer.error


def route_request(**fields):
    from loom_msgs.srv import Route
    req = Route.Request(event_id='e1', event_type='speech.utterance', agent_id='voice',
                        has_privacy=True, privacy=Privacy.PUBLIC, local_supported=True)
    for key, value in fields.items():
        setattr(req, key, value)
    return req


@pytest.fixture
def router(ros, spawn, tmp_path):
    """Start the router in its own namespace, so no other test's endpoints can answer."""
    db = tmp_path / 'router.db'

    def start(namespace):
        return spawn('-m', 'loom_ros.router.router_node', '--ros-args', '-r', f'__ns:={namespace}',
                     '-p', f'history_db:={db}', '-p', 'stats_period_s:=0.1')
    return start


def stop(proc):
    """SIGINT and wait: a clean exit takes the node's endpoints out of the graph at once."""
    proc.popen.send_signal(signal.SIGINT)
    code, _, err = proc.finish()
    assert code == 0, err


def test_service_decides_explains_publishes_and_persists_across_restarts(ros, router):
    from loom_msgs.msg import RouteDecision, RouteOutcome, RouterStats
    from loom_msgs.srv import Route
    decisions, stats = [], []
    decision_sub = ros.node.create_subscription(RouteDecision, '/r1/router/decisions',
                                                decisions.append, to_qos_profile('batched'))
    ros.node.create_subscription(RouterStats, '/r1/router/stats', stats.append,
                                 to_qos_profile('realtime'))
    outcomes = ros.node.create_publisher(RouteOutcome, '/r1/router/outcomes',
                                         to_qos_profile('batched'))
    client = ros.node.create_client(Route, '/r1/router/route')
    proc = router('/r1')
    # Decisions are published once, volatile: ask only once the router's decisions writer is
    # matched, else the first ones can go out before DDS discovery pairs it with this reader
    # (the service can be ready first; a full-suite run lost all three that way). This reader
    # seeing the writer does not mean the writer sees this reader (a fresh clone's full run
    # lost all three again): a warm-up decision that arrives proves it. Each is counted.
    ros.wait_for(lambda: decision_sub.get_publisher_count() > 0, 'the decisions publisher',
                 alive=[proc])
    matched(ros, client, proc)   # so no warm-up below waits on a lost answer
    warm = 0   # every warm-up request sent: each is one decision the router counts
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not decisions:
        assert time.monotonic() < deadline, 'no warm-up decision reached router/decisions'
        warm += 1
        call(ros, client, route_request(event_type='warm.up', event_id=f'warm-{warm}',
                                        has_local_confidence=True, local_confidence=0.99))
        asked = time.monotonic()
        while not decisions and time.monotonic() - asked < 2.0:   # then ask again
            ros.spin_once(0.05)
    # One writer, reliable, in order, each published before its answer came: once the last
    # warm-up's decision is here, none is still on its way (one sent before the writer matched
    # this reader never comes).
    ros.wait_for(lambda: any(d.event_id == f'warm-{warm}' for d in decisions),
                 'the last warm-up decision', alive=[proc])
    assert {(d.event_type, d.route) for d in decisions} == {('warm.up', 'local')}
    assert len(decisions) <= warm
    decisions.clear()

    # speech.utterance has threshold 0.85 in config/policy.yaml; voice has latency_local_ms 50.
    hybrid = call(ros, client, route_request(has_local_confidence=True, local_confidence=0.7))
    assert (hybrid.ok, hybrid.route, hybrid.rule) == (True, 'hybrid', 'hybrid')
    assert hybrid.reason == ('0.5 < local confidence 0.700 < threshold 0.85: answer locally now, '
                             'refine in the cloud')
    assert (hybrid.cloud_model, hybrid.cloud_cost) == ('intent-large', 0.004)
    fast = call(ros, client, route_request(has_local_confidence=True, local_confidence=0.3,
                                           has_latency_budget=True, latency_budget_ms=40.0))
    assert (fast.route, fast.rule) == ('local', 'latency')
    private = call(ros, client, route_request(privacy=Privacy.PRIVATE, local_supported=False))
    assert (private.route, private.rule, private.upload) == ('local_fallback', 'privacy', 'none')
    # A request that does not say its privacy is Private (PUBLIC is the field's 0 default):
    # with no local capability a Public one would go to the cloud.
    unsaid = call(ros, client, route_request(has_privacy=False, local_supported=False))
    assert (unsaid.route, unsaid.rule, unsaid.upload) == ('local_fallback', 'privacy', 'none')
    public = call(ros, client, route_request(local_supported=False))
    assert (public.route, public.rule) == ('cloud', 'capability')
    bad = call(ros, client, route_request(event_type=''))
    assert not bad.ok and 'event_type' in bad.error
    long = call(ros, client, route_request(event_id='e' * 300))   # before a row or a reason
    assert not long.ok and long.error == 'event_id: longer than 256 characters'

    ros.wait_for(lambda: len(decisions) == 5, 'five decisions on router/decisions', alive=[proc])
    assert [d.rule for d in decisions] == ['hybrid', 'latency', 'privacy', 'privacy', 'capability']
    assert decisions[0].decision_id == hybrid.decision_id

    ros.wait_for(lambda: outcomes.get_subscription_count() >= 1, 'the router to hear outcomes')
    outcomes.publish(RouteOutcome(decision_id=hybrid.decision_id, event_type='speech.utterance',
                                  backend='cloud', latency_ms=240.0, cost=0.004, success=True,
                                  confidence=0.95))
    outcomes.publish(RouteOutcome(decision_id=public.decision_id, event_type='speech.utterance',
                                  backend='cloud', latency_ms=240.0, cost=0.004, success=True,
                                  confidence=0.95))
    ros.wait_for(lambda: stats and stats[-1].outcomes == 2, 'the outcomes in router/stats')
    assert stats[-1].decisions == warm + 5 and stats[-1].spend == pytest.approx(0.008)
    stop(proc)

    # A new process on the same history file keeps decisions, outcomes and the spend.
    stats.clear()
    proc = router('/r1')
    ros.wait_for(lambda: stats, 'router/stats from the restarted router', alive=[proc])
    assert (stats[-1].decisions, stats[-1].outcomes) == (warm + 5, 2)
    assert stats[-1].spend == pytest.approx(0.008)
    assert stats[-1].hybrid_rate == pytest.approx(1 / (warm + 5))


def test_lifecycle_and_policy_reload_through_parameters(ros, router, tmp_path):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from loom_msgs.srv import Route
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter
    proc = router('/r2')
    get_state = ros.node.create_client(GetState, '/r2/router/get_state')
    change = ros.node.create_client(ChangeState, '/r2/router/change_state')
    # get_state, set_parameters and the transition survive DDS's reply-matching race (resent,
    # or checked through get_state); a route decision is not safe to send twice (`matched`).
    state = ros.call(get_state, GetState.Request(), 'get_state', alive=[proc])
    assert state.current_state.label == 'active'

    bad = tmp_path / 'bad.yaml'
    bad.write_text('default:\n  threshold: 2\n')
    good = tmp_path / 'good.yaml'
    good.write_text('default:\n  threshold: 0.6\n')
    params = ros.node.create_client(SetParameters, '/r2/router/set_parameters')
    result = ros.call(params, SetParameters.Request(
        parameters=[Parameter('policy_file', value=str(bad)).to_parameter_msg()]),
        'set_parameters', alive=[proc])
    assert not result.results[0].successful
    assert 'default.threshold: Input should be less than or equal to 1' in result.results[0].reason
    result = ros.call(params, SetParameters.Request(
        parameters=[Parameter('policy_file', value=str(good)).to_parameter_msg()]),
        'set_parameters', alive=[proc])
    assert result.results[0].successful
    client = ros.node.create_client(Route, '/r2/router/route')
    matched(ros, client, proc)
    decision = call(ros, client, route_request(event_type='other', has_local_confidence=True,
                                               local_confidence=0.65))
    assert (decision.route, decision.rule) == ('local', 'threshold')  # 0.65 >= the new 0.6

    assert ros.transition(change, get_state, Transition.TRANSITION_DEACTIVATE, 'inactive',
                          'deactivate', alive=[proc])
    refused = call(ros, client, route_request(has_local_confidence=True, local_confidence=0.9))
    assert not refused.ok and 'not active' in refused.error
    stop(proc)


def test_a_subject_without_cloud_consent_stays_local_until_granted(ros, spawn, tmp_path):
    """Route.srv's subject: the router reads the consent registry under its storage.root (read
    only) at every decision, so `loom consent grant` holds from the next request."""
    import subprocess
    import sys

    from loom_msgs.srv import Route

    from harness import REPO, loom_cli
    client = ros.node.create_client(Route, '/r_consent/router/route')
    proc = spawn('-m', 'loom_ros.router.router_node', '--ros-args', '-r', '__ns:=/r_consent',
                 '-p', f'storage.root:={tmp_path}')
    matched(ros, client, proc)
    ask = dict(has_local_confidence=True, local_confidence=0.7)   # hybrid when anonymous
    assert call(ros, client, route_request(**ask)).rule == 'hybrid'
    for subject in ('alice', '../etc/passwd', 'x' * 4096):
        kept = call(ros, client, route_request(subject=subject, **ask))
        assert (kept.ok, kept.route, kept.rule, kept.upload) == (True, 'local', 'consent', 'none')
        assert 'alice' not in kept.reason and 'consent' in kept.reason
    granted = subprocess.run([sys.executable, *loom_cli('consent', 'grant', 'alice', 'cloud',
                                                        '--root', str(tmp_path))],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert granted.returncode == 0, granted.stderr
    assert call(ros, client, route_request(subject='alice', **ask)).rule == 'hybrid'
    assert call(ros, client, route_request(subject='bob', **ask)).rule == 'consent'
    stop(proc)


def test_decisions_made_in_agent_hosts_reach_the_history_and_malformed_ones_do_not(ros, spawn,
                                                                              tmp_path):
    """An agent host that routes in-process (HostedRouter) publishes its decisions with its name
    in header.frame_id; the router node keeps them in its history (one place for every
    decision, what the learned router trains on). Malformed ones are refused and counted.

    Attack review #8: a hosted decision about a person came in without its subject and was
    filed as anonymous: a training row, out of reach of the subject's erasure. It is filed as
    the router files its own: under the subject with `store` consent, else NOT_KEPT ('-')."""
    import math
    import sqlite3

    from loom_msgs.msg import RouteDecision, RouteOutcome
    from loom_ros.router.history import NOT_KEPT, RouterHistory
    from loom_ros.security.audit import AuditLog
    from loom_ros.storage.consent import ConsentRegistry, SubjectRefs, consent_path
    from loom_ros.storage.erasure import forget
    from loom_ros.storage.layout import StorageLayout
    db = tmp_path / 'router.db'   # the root's router history: erasure finds it there
    audit = AuditLog(tmp_path / 'audit.db')
    registry = ConsentRegistry(consent_path(tmp_path), {}, audit=audit,
                               refs=SubjectRefs.at(tmp_path / 'keys'))
    registry.grant('alice', 'store', 'app:setup')   # bob never consented
    registry.close()
    audit.close()
    pub = ros.node.create_publisher(RouteDecision, '/r_hosted/router/decisions',
                                    to_qos_profile('batched'))
    outcomes = ros.node.create_publisher(RouteOutcome, '/r_hosted/router/outcomes',
                                         to_qos_profile('batched'))
    proc = spawn('-m', 'loom_ros.router.router_node', '--ros-args', '-r', '__ns:=/r_hosted',
                 '-p', f'history_db:={db}', '-p', f'storage.root:={tmp_path}')

    def decision(decision_id, **fields):
        msg = RouteDecision(decision_id=decision_id, event_id='e-' + decision_id,
                            event_type='face.detected', agent_id='face', privacy=Privacy.SENSITIVE,
                            route='local', confidence=0.9, rule='threshold', reason='ok',
                            has_local_confidence=True, local_confidence=0.9, payload_bytes=921600)
        msg.header.frame_id = '/r_hosted/agent_host_0'
        for key, value in fields.items():
            setattr(msg, key, value)
        return msg
    malformed = [decision('f1', route='teleport'), decision('f2', reason='x' * 100_000),
              decision('f3', confidence=math.nan), decision('f4', local_confidence=7.0),
              decision('f5', event_type='t' * 5000), decision('f6', subject='s' * 5000)]
    good = [decision('g1'), decision('g2', has_local_confidence=False, route='cloud',
                                     cloud_cost=0.004),
            decision('g3', subject='alice'), decision('g4', subject='bob'),
            decision('g5', subject='../etc/passwd')]

    def rows(table='decisions', column='id'):
        if not db.exists():
            return []
        with sqlite3.connect(db) as conn:
            return [r[0] for r in conn.execute(f'select {column} from {table} order by 1')]
    ros.wait_for(lambda: pub.get_subscription_count() >= 1 and db.exists(),
                 'the router to listen on router/decisions', alive=[proc])
    for msg in malformed + good:
        pub.publish(msg)
    hosted = ['g1', 'g2', 'g3', 'g4', 'g5']
    ros.wait_for(lambda: rows() == hosted, 'the hosted decisions in the history', alive=[proc])
    with sqlite3.connect(db) as conn:
        g2 = conn.execute('select route, local_confidence, payload_bytes, cloud_cost from '
                          'decisions where id = ?', ('g2',)).fetchone()
        filed = dict(conn.execute('select id, subject from decisions').fetchall())
    assert g2 == ('cloud', None, 921600, 0.004)
    assert filed == {'g1': '', 'g2': '', 'g3': 'alice', 'g4': NOT_KEPT, 'g5': NOT_KEPT}
    # local outcomes for each: only the anonymous decision with a confidence is a training row
    ros.wait_for(lambda: outcomes.get_subscription_count() >= 1, 'the router to hear outcomes',
                 alive=[proc])
    for decision_id in hosted:
        outcomes.publish(RouteOutcome(decision_id=decision_id, event_type='face.detected',
                                      backend='local', latency_ms=5.0, success=True,
                                      confidence=0.9))
    ros.wait_for(lambda: rows('outcomes', 'decision_id') == hosted, 'the outcomes in the history',
                 alive=[proc])
    stop(proc)
    assert rows() == hosted   # nothing malformed arrived later either
    history = RouterHistory(str(db), 3600.0)
    try:
        assert len(history.training_rows()) == 1   # g1: none of alice's, bob's or g5's
    finally:
        history.close()
    receipt = forget(StorageLayout.at(tmp_path), 'alice')   # alice's erasure finds hers
    assert (receipt.counts['decisions'], receipt.counts['outcomes']) == (1, 1)
    assert rows() == ['g1', 'g2', 'g4', 'g5']
