"""`loom_status`: the table from messages (pure), and `--once` against a running system."""
from __future__ import annotations

from loom_ros.telemetry.metrics import MetricsRegistry, to_msg
from loom_ros.telemetry.status import StatusView


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
