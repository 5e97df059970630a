"""Per-topic trace sampling (telemetry.tracing.sample_rules): a high-rate topic can start fewer
traces than the rest, a trace's decision is still followed wherever it goes, and a rule is
checked and bounded before anything parses it."""
from __future__ import annotations

import pytest

from loom_ros.bus.event import Event
from loom_ros.telemetry import tracing

SAMPLED = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'


def sampled(event) -> bool:
    """The W3C sampled bit of the trace-flags the event carries (other bits may be set)."""
    return bool(int(event.metadata['traceparent'][-2:], 16) & 1)


def test_rules_are_checked_and_bounded():
    ok = tracing.parse_sample_rules(['sensor.imu.*=0.01', 'camera/?ront = 1'])
    assert ok == (('sensor.imu.*', 0.01), ('camera/?ront', 1.0))
    for bad, why in [(['sensor.imu.*'], 'topic-pattern=ratio'), (['a=2'], 'not in'),
                     (['a=nan'], 'not in'), (['a=-0.1'], 'not in'), (['a=x'], 'not in'),
                     (['[abc]=0.5'], 'topic-pattern'), (['=0.5'], 'topic-pattern'),
                     (['a' * 300 + '=1'], '240 characters'), ([7], 'string'),
                     ('a=1', 'a list'), (['a=1'] * 65, 'at most 64')]:
        with pytest.raises(tracing.TracingConfigError, match=why):
            tracing.TracingConfig(exporter='file', file='x', sample_rules=tuple(bad)
                                  if isinstance(bad, list) else bad).check()


def test_a_topic_rule_starts_fewer_traces_and_a_started_trace_is_followed(tmp_path):
    path = tmp_path / 'spans.jsonl'
    tracing.configure(tracing.TracingConfig(exporter='file', file=str(path), sample_ratio=1.0,
                                            sample_rules=('sensor.imu.*=0', 'sensor.*=1')))
    try:
        imu, face = Event(type='imu.motion'), Event(type='face.detected')
        tracing.start_publish_span('sensor.imu.motion', imu).end()
        tracing.start_publish_span('camera.front', face).end()
        # The IMU event carries its trace unsampled: every process after follows that.
        assert not sampled(imu) and sampled(face)
        with tracing.handle_span('sensor.imu.motion', imu, 'counter') as span:
            assert not span.is_recording()
        # A trace started elsewhere, sampled, is followed even on the IMU topic.
        continuing = Event(type='imu.motion', metadata={'traceparent': SAMPLED})
        tracing.start_publish_span('sensor.imu.motion', continuing).end()
        # First match wins: sensor.imu.* before sensor.*; sensor.sonar by the second rule.
        sonar = Event(type='range')
        tracing.start_publish_span('sensor.sonar', sonar).end()
        assert sampled(sonar)
    finally:
        tracing.shutdown()
    spans = tracing.read_spans(str(path))
    topics = sorted(s['attributes'].get('loom.topic') for s in spans)
    assert topics == ['camera.front', 'sensor.imu.motion', 'sensor.sonar']
    follow = next(s for s in spans if s['attributes'].get('loom.topic') == 'sensor.imu.motion')
    assert follow['parent_span_id'] == 'b7ad6b7169203331'


def test_the_shipped_config_samples_the_imu_at_one_in_a_hundred():
    from loom_ros.config.params import config_dir, node_defaults
    values = node_defaults('storage', str(config_dir() / 'loom.yaml'))
    rules = tracing.parse_sample_rules(list(values['telemetry.tracing.sample_rules']))
    assert ('sensor.imu.*', 0.01) in rules
