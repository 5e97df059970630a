"""Tracing against a peer's trace context: a tracestate that fails the cheap check is dropped
before OpenTelemetry parses it (and counted), the trace still continues from the traceparent,
and nothing OpenTelemetry logs about what a peer sent reaches stderr (it quoted the member)."""
from __future__ import annotations

import logging
import signal
import time

from loom_ros.bus.event import Event
from loom_ros.telemetry import tracing

CANARY = 'canary-7d41e0'
SECRET = 'sk-live-ABCDEFGHIJKLMNOP'
TRACE_ID, PARENT_ID = 'a' * 32, 'b' * 16
TRACEPARENT = f'00-{TRACE_ID}-{PARENT_ID}-01'
DROPPED = {   # each fails tracestate_ok
    'long': 'k=' + 'v' * 600 + f',{CANARY}-long=1',
    'control': f'a=1,{CANARY}-ctl=\x1b[2J',
    'members': ','.join(f'k{i}=v' for i in range(40)) + f',{CANARY} members',
}
KEPT = {   # pass it: the second fails W3C's grammar, which OTel logged with the member
    'valid': 'vendor=abc,other=1',
    'grammar': f'a=1,{CANARY} password=hunter2 api_key={SECRET}',
}


def test_the_cheap_check():
    assert tracing.tracestate_ok('') and tracing.tracestate_ok('vendor=abc,other=1')
    assert tracing.tracestate_ok('k=' + 'v' * (tracing.MAX_TRACESTATE_CHARS - 2))
    assert not tracing.tracestate_ok('k=' + 'v' * (tracing.MAX_TRACESTATE_CHARS - 1))
    assert tracing.tracestate_ok(','.join(f'k{i}=v' for i in range(32)))
    assert not tracing.tracestate_ok(','.join(f'k{i}=v' for i in range(33)))
    for bad in ('a=\x1b[2J', 'a=1\tb=2', 'a=\u00e9', 'a=1\n'):
        assert not tracing.tracestate_ok(bad), repr(bad)


def test_otel_warnings_are_dropped_and_its_errors_masked(tmp_path, capsys):
    tracing.configure(tracing.TracingConfig(exporter='file', file=str(tmp_path / 's.jsonl')))
    try:
        dropped = tracing.tracestate_dropped()
        event = Event(type='x', metadata={'traceparent': TRACEPARENT,
                                          'tracestate': DROPPED['long']})
        with tracing.handle_span('t', event, 't') as span:
            assert format(span.get_span_context().trace_id, '032x') == TRACE_ID
        assert tracing.tracestate_dropped() == dropped + 1
        kept = tracing.extract(Event(type='x', metadata={'traceparent': TRACEPARENT,
                                                         'tracestate': KEPT['valid']}))
        from opentelemetry import trace
        state = trace.get_current_span(kept).get_span_context().trace_state
        assert dict(state) == {'vendor': 'abc', 'other': '1'}
        forwarded = Event(type='x', metadata={'traceparent': TRACEPARENT,
                                              'tracestate': DROPPED['control']})
        tracing.start_publish_span('t', forwarded).end()
        assert 'tracestate' not in forwarded.metadata   # not passed on to the next hop
        assert forwarded.metadata['traceparent'].startswith(f'00-{TRACE_ID}-')
        otel = logging.getLogger('opentelemetry.sdk.trace.export')
        # what decides where its records go, for the failure message (a full-suite run once
        # printed both lines raw, which no run of this file alone repeats)
        chain = [(lg.name, lg.level, lg.propagate, lg.disabled, [type(h).__name__
                  for h in lg.handlers]) for lg in (otel, otel.parent, logging.getLogger(
                      'opentelemetry'), logging.getLogger())]
        otel.warning('peer sent %s', CANARY)
        otel.error('export failed: token=%s', SECRET)
    finally:
        tracing.shutdown()
    err = capsys.readouterr().err
    assert CANARY not in err and SECRET not in err, (err[-600:], chain)
    assert 'export failed: token=***' in err


def test_a_peers_hostile_tracestate_never_reaches_stderr_and_the_event_flows(
        ros, bus, spawn, tmp_path):
    """Raw events from a peer (this process, tracing off: the metadata goes out as written) to
    a real event_monitor with file tracing on. Its HandleEvent spans continue the peer's trace
    for every case; its loom/metrics count the dropped tracestates; its stderr has no canary."""
    from loom_msgs.msg import Metrics

    from loom_ros.bus.qos import QosLevel, to_qos_profile
    from loom_ros.telemetry.metrics import METRICS_TOPIC
    assert not tracing.ENABLED
    spans_path = tmp_path / 'monitor.jsonl'
    monitor = spawn('-m', 'loom_ros.bus.event_monitor_node', '--ros-args',
                    '-p', 'pattern:=hostile.trace', '-p', 'report_period_s:=60.0',
                    '-p', 'telemetry.tracing.exporter:=file',
                    '-p', f'telemetry.tracing.file:={spans_path}',
                    '-p', 'telemetry.metrics.period_s:=0.2',
                    '-p', 'telemetry.diagnostics.period_s:=0.0')
    reports = []   # (received, tracestate_dropped) from the monitor's loom/metrics

    def on_metrics(msg):
        if msg.node == '/event_monitor':
            reports.append((time.monotonic(), next(
                (s.value for s in msg.samples if s.name == 'tracestate_dropped'), 0.0)))
    ros.node.create_subscription(Metrics, METRICS_TOPIC, on_metrics,
                                 to_qos_profile(QosLevel.REALTIME))
    case_of: dict[str, str] = {}
    last = [0.0]

    def publish():   # every case again every 0.1 s until the monitor has handled each
        if time.monotonic() - last[0] >= 0.1:
            last[0] = time.monotonic()
            for case, state in {**DROPPED, **KEPT}.items():
                event = Event(type='hostile.trace', source='peer', metadata={
                    'traceparent': TRACEPARENT, 'tracestate': state})
                case_of[event.id] = case
                bus.publish('hostile.trace', event)

    handled: dict[str, list] = {}

    def every_case_handled() -> bool:
        handled.clear()
        for span in tracing.read_spans(str(spans_path)):
            case = case_of.get(span['attributes'].get('loom.event.id'))
            if span['name'] == 'HandleEvent' and case is not None:
                handled.setdefault(case, []).append(span)
        return handled.keys() == {**DROPPED, **KEPT}.keys()
    ros.wait_for(every_case_handled, 'HandleEvent spans for every case', spin=publish,
                 alive=[monitor])
    for case, spans in handled.items():   # the trace continues, whatever its tracestate
        assert {(s['trace_id'], s['parent_span_id']) for s in spans} == \
            {(TRACE_ID, PARENT_ID)}, case
    seen = time.monotonic()
    dropped_handled = sum(len(handled[case]) for case in DROPPED)
    # the second report after that was taken after those deliveries
    ros.wait_for(lambda: sum(when > seen for when, _ in reports) >= 2,
                 "two of the monitor's metrics reports", alive=[monitor])
    count = [value for when, value in reports if when > seen][1]
    assert count >= dropped_handled > 0
    monitor.popen.send_signal(signal.SIGINT)
    _code, _out, err = monitor.finish()
    assert CANARY not in err and SECRET not in err and 'hunter2' not in err, err[-2000:]
