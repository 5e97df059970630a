"""Tracing: W3C trace context in event metadata, span parentage in one process, and one trace
across three processes (source -> relay -> event_monitor) read back from the span files."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from loom_ros.bus.event import Event
from loom_ros.telemetry import tracing

HERE = Path(__file__).resolve().parent
TRACEPARENT_RE = re.compile(r'^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$')


@pytest.fixture
def file_tracing(tmp_path):
    path = tmp_path / 'spans.jsonl'
    tracing.configure(tracing.TracingConfig(exporter='file', file=str(path), service_name='t'))
    yield path
    tracing.shutdown()


def test_config_is_checked():
    with pytest.raises(tracing.TracingConfigError, match='exporter'):
        tracing.TracingConfig(exporter='jaeger').check()
    with pytest.raises(tracing.TracingConfigError, match='sample_ratio'):
        tracing.TracingConfig(exporter='file', file='x', sample_ratio=2.0).check()
    with pytest.raises(tracing.TracingConfigError, match='needs a path'):
        tracing.TracingConfig(exporter='file').check()


def test_off_means_no_metadata_and_no_spans():
    assert not tracing.ENABLED
    event = Event(type='x')
    tracing.inject(event)
    assert event.metadata == {}
    with tracing.span(tracing.LOCAL_INFERENCE, event) as span:
        span.set_attribute('k', 'v')
        assert span is tracing.NO_SPAN


def test_spans_nest_and_context_rides_in_the_event(file_tracing):
    event = Event(type='face.detected')
    with tracing.span(tracing.PUBLISH_EVENT) as publish:
        tracing.inject(event)
    assert TRACEPARENT_RE.match(event.metadata['traceparent'])
    assert int(event.metadata['traceparent'][-2:], 16) & 1   # the sampled flag
    with tracing.span(tracing.ROUTE_DECISION, event) as route:
        with tracing.span(tracing.LOCAL_INFERENCE):
            pass
        with tracing.span(tracing.CLOUD_REQUEST):
            pass
    tracing.flush()
    spans = {s['name']: s for s in tracing.read_spans(str(file_tracing))}
    assert set(spans) == {'PublishEvent', 'RouteDecision', 'LocalInference', 'CloudRequest'}
    trace_id = spans['PublishEvent']['trace_id']
    assert all(s['trace_id'] == trace_id for s in spans.values())
    assert spans['RouteDecision']['parent_span_id'] == spans['PublishEvent']['span_id']
    assert spans['LocalInference']['parent_span_id'] == spans['RouteDecision']['span_id']
    assert spans['CloudRequest']['parent_span_id'] == spans['RouteDecision']['span_id']
    assert route.get_span_context().trace_id == publish.get_span_context().trace_id


def test_sample_ratio_zero_starts_nothing_but_continues_sampled_traces(tmp_path):
    path = tmp_path / 'spans.jsonl'
    tracing.configure(tracing.TracingConfig(exporter='file', file=str(path), sample_ratio=0.0))
    try:
        fresh = Event(type='x')
        assert tracing.start_publish_span('a.b', fresh) is None
        assert fresh.metadata == {} and not tracing.wants_handle_span(fresh)
        parent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'
        continuing = Event(type='y', metadata={'traceparent': parent})
        assert tracing.wants_handle_span(continuing)
        tracing.start_publish_span('a.b', continuing).end()
        assert continuing.metadata['traceparent'].startswith('00-0af7651916cd43dd8448eb211c80319c-')
        unsampled = Event(type='z', metadata={'traceparent': parent[:-2] + '00'})
        assert tracing.start_publish_span('a.b', unsampled) is None
    finally:
        tracing.shutdown()
    spans = tracing.read_spans(str(path))
    assert [(s['name'], s['parent_span_id']) for s in spans] == [('PublishEvent', 'b7ad6b7169203331')]


def _ros_args(path: Path) -> list[str]:
    return ['-p', 'telemetry.tracing.exporter:=file', '-p', f'telemetry.tracing.file:={path}',
            '-p', 'telemetry.metrics.period_s:=0.0', '-p', 'telemetry.diagnostics.period_s:=0.0']


def test_one_trace_across_three_processes(ros, spawn, tmp_path):
    files = {name: tmp_path / f'{name}.jsonl' for name in 'abc'}
    source = spawn(str(HERE / 'trace_relay.py'), 'source', 'trace.in', '--ros-args',
                   *_ros_args(files['a']))
    relay = spawn(str(HERE / 'trace_relay.py'), 'relay', 'trace.in', 'trace.out', '--ros-args',
                  *_ros_args(files['b']))
    monitor = spawn('-m', 'loom_ros.bus.event_monitor_node', '--ros-args', '-p',
                    'pattern:=trace.out', *_ros_args(files['c']))

    def chain():
        spans = {name: tracing.read_spans(str(path)) for name, path in files.items()}
        by_id = {(s['trace_id'], s['span_id']): s for group in spans.values() for s in group}
        for handled in spans['c']:
            if handled['name'] != 'HandleEvent':
                continue
            links = [handled]
            while links[-1]['parent_span_id']:
                parent = by_id.get((links[-1]['trace_id'], links[-1]['parent_span_id']))
                if parent is None:
                    break
                links.append(parent)
            if not links[-1]['parent_span_id'] and len(links) == 4:
                return list(reversed(links))
        return None

    found = []
    ros.wait_for(lambda: found.append(chain()) or found[-1] is not None,
                 'a complete A -> B -> C trace in the span files', alive=[source, relay, monitor])
    root, b_handle, b_publish, c_handle = found[-1]
    assert [s['name'] for s in found[-1]] == ['PublishEvent', 'HandleEvent', 'PublishEvent',
                                              'HandleEvent']
    assert len({s['trace_id'] for s in found[-1]}) == 1
    assert root['attributes']['loom.topic'] == 'trace.in' and root['kind'] == 'PRODUCER'
    assert b_handle['attributes']['loom.topic'] == 'trace.in' and b_handle['kind'] == 'CONSUMER'
    assert b_publish['attributes']['loom.topic'] == 'trace.out'
    assert c_handle['attributes']['loom.topic'] == 'trace.out'
    pids = [root['pid'], b_handle['pid'], c_handle['pid']]
    assert len(set(pids)) == 3 and b_handle['pid'] == b_publish['pid']
    assert [root['service'], b_handle['service'], c_handle['service']] == \
        ['trace_source', 'trace_relay', 'event_monitor']


def test_otlp_exporter_posts_spans_to_a_collector():
    """A stand-in collector on 127.0.0.1 receives the OTLP/HTTP protobuf export."""
    import http.server
    import threading
    bodies: list[tuple[str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append((self.path, self.rfile.read(int(self.headers['Content-Length']))))
            self.send_response(200)
            self.send_header('Content-Type', 'application/x-protobuf')
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(('127.0.0.1', 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f'http://127.0.0.1:{server.server_address[1]}/v1/traces'
        tracing.configure(tracing.TracingConfig(exporter='otlp', otlp_endpoint=endpoint,
                                                service_name='otlp_test'))
        with tracing.span(tracing.CLOUD_REQUEST, attributes={'loom.cloud.model': 'intent-large'}):
            pass
        tracing.shutdown()   # flushes the batch
    finally:
        server.shutdown()
        server.server_close()
    assert bodies and bodies[0][0] == '/v1/traces'
    assert b'CloudRequest' in bodies[0][1] and b'otlp_test' in bodies[0][1]
