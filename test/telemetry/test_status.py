"""`loom_status`: the table from messages (pure), and `--once` against a running system and
against a hostile DDS peer (terminal sequences, huge and countless diagnostics)."""
from __future__ import annotations

import re
import time

from loom_ros.telemetry.metrics import COUNTER, METRICS_TOPIC, MetricsRegistry, to_msg
from loom_ros.telemetry.status import (
    HEALTH_STALE_AFTER_S, MAX_HEALTH, MAX_NODES, MAX_TEXT, StatusView, safe_text,
)


def test_render_from_messages():
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from loom_msgs.msg import RouterStats
    reg = MetricsRegistry('/agent_face')
    reg.snapshot(now=0.0)
    reg.set_total('events_received', 300, topic='camera.front.face')
    reg.set_total('events_dropped', 12, subscription='camera.**')
    reg.set_gauge('queue_depth', 90, subscription='camera.**')
    reg.set_gauge('queue_capacity', 100, subscription='camera.**')
    for v in (1.0, 2.0, 3.0, 40.0):
        reg.histogram('handle_latency_ms', topic='camera.front.face').record(v)
    view = StatusView()
    view.on_metrics(to_msg('/agent_face', 1.0, reg.snapshot(now=10.0)), now=100.0)
    view.on_router_stats(RouterStats(decisions=10, local_rate=0.7, cloud_rate=0.2, hybrid_rate=0.1,
                                     spend=0.5, budget_limit=5.0))
    view.on_diagnostics(DiagnosticArray(status=[DiagnosticStatus(
        level=DiagnosticStatus.ERROR, name='/host: plugin face', message='plugin face unhealthy')]))
    text = view.render(now=100.5)
    assert 'camera.front.face' in text and '30.0' in text          # 300 events over 10 s
    assert '90/100' in text and '12' in text
    assert 'local 70%  cloud 20%' in text
    assert 'ERROR  /host: plugin face: plugin face unhealthy' in text
    assert 'node(s)' in view.render(now=1000.0) and '/agent_face' not in view.render(now=1000.0)


def test_once_prints_a_table_from_a_running_system(ros, spawn):
    sensors = spawn('-m', 'loom_ros.sensors.sim_sensors_node', '--ros-args',
                    '-p', 'telemetry.metrics.period_s:=0.5')
    monitor = spawn('-m', 'loom_ros.bus.event_monitor_node', '--ros-args',
                    '-p', 'telemetry.metrics.period_s:=0.5')
    status = spawn('-m', 'loom_ros.telemetry.status', '--once', '--timeout', '50',
                   '--require-topic', 'sensor.imu.motion', '--require-topic', 'mic.primary')
    code, out, err = status.finish()
    assert code == 0, err
    assert 'TOPIC' in out and 'sensor.imu.motion' in out and 'mic.primary' in out
    assert '/sim_sensors' in out and '/event_monitor' in out
    assert 'HEALTH (/diagnostics)' in out
    for proc in (sensors, monitor):
        assert proc.popen.poll() is None


ESC, BEL = '\x1b', '\x07'
TITLE = f'{ESC}]0;pwned{BEL}'                     # set the terminal's window title
CLIPBOARD = f'{ESC}]52;c;ZWNobyBwd25lZA=={BEL}'   # OSC 52: the clipboard <- "echo pwned"


def test_peer_text_is_cut_and_its_control_characters_shown_as_question_marks():
    assert safe_text(f'/robot{TITLE}') == '/robot?]0;pwned?'
    assert safe_text('a\x9b2Jb\x7fc\r\nd\x00') == 'a?2Jb?c??d?'   # C1 CSI, DEL, CR LF, NUL
    # direction overrides and isolates: a name shown backwards could pass for another's
    assert safe_text('/cam\u202eaerf\u2066x\u2069\u200f') == '/cam?aerf?x??'
    assert safe_text('planner\u200b\u061c\u2028\u2029\ufeff') == 'planner?????'   # invisible
    long = safe_text('A' * 200_000)
    assert len(long) == MAX_TEXT and long.endswith('\u2026')
    assert safe_text(long) == long                    # made safe twice: unchanged
    assert safe_text('camera.front.face é 日本') == 'camera.front.face é 日本'


def test_the_view_keeps_a_bounded_number_of_entries_and_expires_stale_ones():
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    view = StatusView()
    for i in range(MAX_NODES + 10):
        view.on_metrics(to_msg(f'/node{i}', 1.0, []), now=float(i) / 1000)
    assert len(view.metrics) == MAX_NODES and view.dropped['nodes'] == 10
    assert '/node0' not in view.metrics and f'/node{MAX_NODES + 9}' in view.metrics  # oldest out
    names = [DiagnosticStatus(level=DiagnosticStatus.OK, name=f'spam/{i}', message='x')
             for i in range(MAX_HEALTH + 50)]
    view.on_diagnostics(DiagnosticArray(status=names), now=0.0)
    assert len(view.health) == MAX_HEALTH and view.dropped['health'] == 50
    assert '(dropped over the limits: 10 node(s)' in view.render(now=0.0)
    later = view.render(now=HEALTH_STALE_AFTER_S + 60.0)   # nothing reported since
    assert view.health == {} and view.metrics == {} and '(no reports yet)' in later


def test_once_prints_a_hostile_peers_text_safe_and_bounded(ros, spawn):
    """A DDS peer's node name, topic label and diagnostic name and message carrying terminal
    sequences and a 200 kB message, and more diagnostics than the view keeps, through the real
    `loom_status --once`: no ESC, BEL or C1 byte reaches its stdout, and every line is short."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from loom_msgs.msg import KeyValue, Metrics, MetricSample

    from loom_ros.bus.qos import QosLevel, to_qos_profile
    metrics_pub = ros.node.create_publisher(Metrics, METRICS_TOPIC,
                                            to_qos_profile(QosLevel.REALTIME))
    diagnostics_pub = ros.node.create_publisher(DiagnosticArray, '/diagnostics', 10)
    status = spawn('-m', 'loom_ros.telemetry.status', '--once', '--timeout', '30',
                   '--settle', '2.0')
    ros.wait_for(lambda: metrics_pub.get_subscription_count() > 0
                 and diagnostics_pub.get_subscription_count() > 0,
                 'loom_status to subscribe', alive=[status])
    hostile = Metrics(node=f'/robot{TITLE}', period_s=1.0, samples=[MetricSample(
        name='events_published', kind=COUNTER, value=1.0, rate=1.0,
        labels=[KeyValue(key='topic', value=f'cam{ESC}[2J{CLIPBOARD}')])])
    diagnostics = DiagnosticArray(status=[DiagnosticStatus(
        level=DiagnosticStatus.ERROR, name=f'evil{ESC}[8m',
        message=f'ok{CLIPBOARD}\x9b2J' + 'A' * 200_000)] + [
        DiagnosticStatus(level=DiagnosticStatus.OK, name=f'spam/{i}', message='x')
        for i in range(MAX_HEALTH + 50)])
    last = [0.0]

    def publish_both():   # again every 0.1 s until loom_status has printed (metrics are best
        if time.monotonic() - last[0] >= 0.1:   # effort; a 200 kB array may come late)
            last[0] = time.monotonic()
            diagnostics_pub.publish(diagnostics)
            metrics_pub.publish(hostile)
    ros.wait_for(lambda: status.popen.poll() is not None, 'loom_status to print and exit',
                 spin=publish_both)
    code, out, err = status.finish()
    assert code == 0, err
    assert not set(out) & {ESC, BEL, '\x9b'}, repr(out[:300])
    assert max(len(line) for line in out.splitlines()) < 2 * MAX_TEXT
    assert '/robot?]0;pwned?' in out and 'cam?[2J?]52;c;' in out
    assert 'ERROR  evil?[8m: ok?]52;c;ZWNobyBwd25lZA==??2JAAA' in out
    health = [line for line in out.splitlines() if line.startswith('  ')]
    assert len(health) == MAX_HEALTH
    # 1 + MAX_HEALTH + 50 sent each time: 51 more dropped per array taken
    dropped = int(re.search(r'(\d+) diagnostic\(s\) beyond', out).group(1))
    assert dropped >= 51 and dropped % 51 == 0, dropped
