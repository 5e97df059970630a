"""OpenTelemetry tracing for Loom: one trace follows an event across nodes and processes.

The W3C trace context (`traceparent`, `tracestate`) travels inside the Event's metadata, so it
crosses DDS, batching and the Zenoh bridge with the event itself. The bus opens a PublishEvent span
on publish and a HandleEvent span around each subscriber callback; the router adds RouteDecision,
and agents and plugins add LocalInference / CloudRequest with `tracing.span(...)`.

Tracing is process-wide and off until `configure()` picks an exporter:
- `file`: spans as JSON lines (one object per span), written off the hot path every 0.2 s and
  at exit (`flush()` forces it);
- `otlp`: OTLP/HTTP to a collector (batched in a background thread);
- `none`: off. The bus then pays one module-attribute test per publish and per delivery.

Trace context comes from whoever published the event: a `tracestate` that fails a cheap check
(tracestate_ok) is dropped before OpenTelemetry parses it, counted (tracestate_dropped) and not
passed on; the trace continues from the traceparent. OpenTelemetry's own loggers keep only
errors, masked (see _quiet_otel_logging).
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from fnmatch import fnmatchcase

from loom_ros.telemetry.logs import MaskingFilter
from loom_ros.telemetry.rotating import RotatingAppender

TRACEPARENT = 'traceparent'
TRACESTATE = 'tracestate'

PUBLISH_EVENT = 'PublishEvent'
HANDLE_EVENT = 'HandleEvent'
ROUTE_DECISION = 'RouteDecision'
LOCAL_INFERENCE = 'LocalInference'
CLOUD_REQUEST = 'CloudRequest'

EXPORTERS = ('none', 'file', 'otlp')

# Read by the bus on every publish and delivery: keep it a plain module attribute.
ENABLED = False
# sample_ratio 0: this process starts no traces and skips span work for unsampled events; it still
# continues traces that arrive sampled (the decision is made where a trace starts).
_SAMPLE_NONE = False
_SAMPLED_FLAG_DIGITS = frozenset('13579bdf')  # last hex digit of trace-flags with bit 0 set

MAX_SAMPLE_RULES = 64
# A rule's topic pattern: topic characters and the wildcards * and ? (no [..] classes).
_RULE_PATTERN = re.compile(r'[A-Za-z0-9_.*?/-]{1,200}')

_STATE: dict = {}  # 'tracer', 'provider', 'propagator', 'config' while enabled
_LOCK = threading.Lock()

# An event's tracestate comes from whoever published it. One that fails this cheap check is
# dropped before OpenTelemetry parses it (the trace still continues from the traceparent), and
# counted: OTel's own limit is 8192 characters, and it logged each bad member it met whole.
MAX_TRACESTATE_CHARS = 512
MAX_TRACESTATE_MEMBERS = 32   # W3C's limit on list members
_DROPPED = {'tracestate': 0}
_DROPPED_LOCK = threading.Lock()


class TracingConfigError(ValueError):
    """A tracing configuration that cannot be used; says which key and why."""


@dataclass(frozen=True)
class TracingConfig:
    exporter: str = 'none'
    file: str = ''
    otlp_endpoint: str = 'http://127.0.0.1:4318/v1/traces'
    sample_ratio: float = 1.0
    service_name: str = 'loom'
    file_max_bytes: int = 0   # the file exporter rotates its file past this (0: never)
    file_keep: int = 2        # rotated files kept
    # 'topic-pattern=ratio': the ratio of traces started by an event on a matching topic (first
    # match wins; others get sample_ratio). A 200 Hz IMU at ratio 1 was most of the demo's spans.
    sample_rules: tuple = ()

    @cached_property
    def rules(self) -> tuple[tuple[str, float], ...]:
        """sample_rules parsed once (TracingConfigError for a bad one)."""
        return parse_sample_rules(self.sample_rules)

    def check(self) -> 'TracingConfig':
        self.rules   # noqa: B018: parsing is the check
        if self.exporter not in EXPORTERS:
            raise TracingConfigError(f'telemetry.tracing.exporter: {self.exporter!r} is not one of '
                                     f'{", ".join(EXPORTERS)}')
        if not 0.0 <= float(self.sample_ratio) <= 1.0:
            raise TracingConfigError(f'telemetry.tracing.sample_ratio: {self.sample_ratio!r} is '
                                     'not in [0, 1]')
        if self.exporter == 'file' and not self.file:
            raise TracingConfigError('telemetry.tracing.file: the file exporter needs a path')
        if int(self.file_max_bytes) < 0 or int(self.file_keep) < 0:
            raise TracingConfigError('telemetry.tracing.file_max_bytes and file_keep must be >= 0')
        if self.exporter == 'otlp' and not self.otlp_endpoint:
            raise TracingConfigError('telemetry.tracing.otlp_endpoint: the otlp exporter needs '
                                     'an endpoint (e.g. http://collector:4318/v1/traces)')
        return self


def parse_sample_rules(rules) -> tuple[tuple[str, float], ...]:
    """[(topic pattern, ratio)] from 'pattern=ratio' strings; TracingConfigError says which rule
    is wrong and why (bounded before anything parses it)."""
    if isinstance(rules, str) or not isinstance(rules, (list, tuple)):
        raise TracingConfigError('telemetry.tracing.sample_rules: a list of '
                                 "'topic-pattern=ratio' strings")
    if len(rules) > MAX_SAMPLE_RULES:
        raise TracingConfigError(f'telemetry.tracing.sample_rules: {len(rules)} rules, at most '
                                 f'{MAX_SAMPLE_RULES}')
    parsed = []
    for i, rule in enumerate(rules):
        where = f'telemetry.tracing.sample_rules[{i}]'
        if not isinstance(rule, str) or len(rule) > 240:
            raise TracingConfigError(f"{where}: not a 'topic-pattern=ratio' string of at most "
                                     '240 characters')
        pattern, sep, ratio = rule.partition('=')
        if not sep or not _RULE_PATTERN.fullmatch(pattern.strip()):
            raise TracingConfigError(f'{where}: {rule[:80]!r} is not topic-pattern=ratio (topic '
                                     'characters with * and ?)')
        try:
            value = float(ratio)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:   # NaN fails this too
            raise TracingConfigError(f'{where}: ratio {ratio[:20]!r} is not in [0, 1]')
        parsed.append((pattern.strip(), value))
    return tuple(parsed)


def _make_sampler(config: TracingConfig):
    """ParentBased: a trace's decision is made where it starts and followed everywhere after
    (across processes, through the traceparent flag); where it starts, by the first rule whose
    pattern matches the span's `loom.topic`, else by sample_ratio."""
    from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
    default = TraceIdRatioBased(float(config.sample_ratio))
    rules = [(pattern, TraceIdRatioBased(ratio))
             for pattern, ratio in config.rules]
    if not rules:
        return ParentBased(default)

    class TopicRatioSampler(Sampler):
        """The root sampler: per-topic ratios (answers cached per topic, bounded)."""

        def __init__(self):
            self._by_topic: dict[str, object] = {}

        def _for(self, topic: str):
            sampler = self._by_topic.get(topic)
            if sampler is None:
                sampler = next((s for p, s in rules if fnmatchcase(topic, p)), default)
                if len(self._by_topic) < 4096:
                    self._by_topic[topic] = sampler
            return sampler

        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                          links=None, trace_state=None):
            topic = (attributes or {}).get('loom.topic', '')
            return self._for(topic if isinstance(topic, str) else '').should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return 'TopicRatio{' + ','.join(f'{p}={s.rate}' for p, s in rules) + \
                f',*={default.rate}}}'

    return ParentBased(TopicRatioSampler())


def _hex(value: int, width: int) -> str:
    return format(value, f'0{width}x')


def span_record(span) -> dict:
    """A finished span as a flat JSON-friendly dict (ids in W3C hex form)."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        'name': span.name,
        'trace_id': _hex(ctx.trace_id, 32),
        'span_id': _hex(ctx.span_id, 16),
        'parent_span_id': _hex(parent.span_id, 16) if parent is not None else '',
        'kind': span.kind.name,
        'start_ns': span.start_time,
        'end_ns': span.end_time,
        'status': span.status.status_code.name,
        'service': span.resource.attributes.get('service.name', ''),
        'pid': os.getpid(),
        'attributes': {k: (v if isinstance(v, (str, int, float, bool)) else str(v))
                       for k, v in (span.attributes or {}).items()},
        'events': [{'name': e.name, 'ts_ns': e.timestamp} for e in span.events],
    }


def _make_file_exporter(config: TracingConfig):
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLinesSpanExporter(SpanExporter):
        """Appends each finished span to a file as one JSON line (readable with jq, or by tests);
        the file rotates past file_max_bytes, so traces cannot fill the disk."""

        def __init__(self, config: TracingConfig):
            self._file = RotatingAppender(config.file, int(config.file_max_bytes),
                                          int(config.file_keep))

        def export(self, spans):
            lines = ''.join(json.dumps(span_record(s), separators=(',', ':')) + '\n' for s in spans)
            try:
                self._file.write(lines)
            except (ValueError, OSError):   # closed, or the disk refused: the spans are lost
                return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            self._file.flush()
            return True

        def shutdown(self) -> None:
            self._file.close()

    return JsonLinesSpanExporter(config)


class _MaskedStderr(logging.Handler):
    """sys.stderr as it is at each record (as logging's last resort), after MaskingFilter."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + '\n')
        except Exception:  # a closed stderr must not raise into the bus
            self.handleError(record)


def _quiet_otel_logging() -> None:
    """OpenTelemetry's Python loggers warn about every malformed traceparent or tracestate they
    extract, quoting the member: with no handler configured, logging's last resort wrote that
    text (an attacker's, unmasked: ~4 KB per event) to stderr. Its warnings are about what peers
    sent, so only errors are kept (an exporter that fails), masked and bounded by Loom's filter,
    and never passed on to handlers that do not mask. Idempotent."""
    logger = logging.getLogger('opentelemetry')
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    if not any(isinstance(h, _MaskedStderr) for h in logger.handlers):
        handler = _MaskedStderr()
        handler.addFilter(MaskingFilter())
        handler.setFormatter(logging.Formatter('%(name)s %(levelname)s: %(message)s'))
        logger.addHandler(handler)


def configure(config: TracingConfig) -> bool:
    """Set up (or replace) the process's tracer; returns whether tracing is now on."""
    global ENABLED
    config.check()
    _quiet_otel_logging()
    with _LOCK:
        _shutdown_locked()
        if config.exporter == 'none':
            return False
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        provider = TracerProvider(
            resource=Resource.create({'service.name': config.service_name,
                                      'process.pid': os.getpid()}),
            sampler=_make_sampler(config))
        if config.exporter == 'file':
            # Batched off the publishing thread, flushed every 0.2 s and at exit.
            provider.add_span_processor(BatchSpanProcessor(
                _make_file_exporter(config), schedule_delay_millis=200))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=config.otlp_endpoint)))
        _STATE.update(provider=provider, config=config,
                      tracer=provider.get_tracer('loom_ros'),
                      propagator=TraceContextTextMapPropagator())
        global _SAMPLE_NONE
        _SAMPLE_NONE = float(config.sample_ratio) == 0.0 and all(
            ratio == 0.0 for _p, ratio in config.rules)
        ENABLED = True
        return True


def flush(timeout_s: float = 5.0) -> bool:
    """Export every span that has ended so far (the file exporter batches every 0.2 s)."""
    provider = _STATE.get('provider')
    return provider.force_flush(int(timeout_s * 1000)) if provider is not None else True


def shutdown() -> None:
    """Flush and stop the exporter; tracing is off afterwards."""
    with _LOCK:
        _shutdown_locked()


def _shutdown_locked() -> None:
    global ENABLED, _SAMPLE_NONE
    ENABLED = _SAMPLE_NONE = False
    provider = _STATE.pop('provider', None)
    _STATE.clear()
    if provider is not None:
        provider.shutdown()


def config_from_params(values: dict, service_name: str) -> TracingConfig:
    return TracingConfig(exporter=str(values['telemetry.tracing.exporter']),
                         file=os.path.expanduser(str(values['telemetry.tracing.file'])),
                         otlp_endpoint=str(values['telemetry.tracing.otlp_endpoint']),
                         sample_ratio=float(values['telemetry.tracing.sample_ratio']),
                         file_max_bytes=int(values['telemetry.tracing.file_max_bytes']),
                         file_keep=int(values['telemetry.tracing.file_keep']),
                         sample_rules=tuple(values.get('telemetry.tracing.sample_rules', ())),
                         service_name=service_name).check()


# -- trace context in events -------------------------------------------------------------------
def tracestate_ok(state: str) -> bool:
    """The cheap check a tracestate passes before OTel parses it: bounded, printable ASCII, at
    most MAX_TRACESTATE_MEMBERS members (linear; no pattern runs on it)."""
    return (len(state) <= MAX_TRACESTATE_CHARS and state.isascii() and state.isprintable()
            and state.count(',') < MAX_TRACESTATE_MEMBERS)


def tracestate_dropped() -> int:
    """Events' tracestates dropped in this process for failing tracestate_ok."""
    return _DROPPED['tracestate']


def _drop_bad_tracestate(metadata: dict) -> dict:
    """`metadata`, or, when its tracestate fails tracestate_ok, what the propagator may read
    instead: the traceparent alone (the drop counted)."""
    state = metadata.get(TRACESTATE)
    if state is None or (type(state) is str and tracestate_ok(state)):
        return metadata
    with _DROPPED_LOCK:
        _DROPPED['tracestate'] += 1
    return {k: metadata[k] for k in (TRACEPARENT,) if k in metadata}


def _extract(metadata: dict):
    return _STATE['propagator'].extract(_drop_bad_tracestate(metadata))


def inject(event, context=None) -> None:
    """Write the current (or given) span context into event.metadata as W3C traceparent."""
    if ENABLED:
        _STATE['propagator'].inject(event.metadata, context=context)


def extract(event):
    """The OTel Context carried by an event's metadata (empty Context when it carries none)."""
    from opentelemetry.context import Context
    if not ENABLED or TRACEPARENT not in event.metadata:
        return Context()
    return _extract(event.metadata)


def _parent_for(event):
    """A span's parent: the active span when there is one (an agent republishing inside its
    HandleEvent), else the context the event carries, else none (a new trace)."""
    from opentelemetry import trace
    current = trace.get_current_span()
    if current.get_span_context().is_valid:
        return None  # the SDK then takes the current context
    if event is not None and TRACEPARENT in event.metadata:
        return _extract(event.metadata)
    return None


class _NoSpan:
    """What span() yields when tracing is off: accepts the calls a span accepts, does nothing."""

    def set_attribute(self, *_args) -> None:
        pass

    def set_attributes(self, *_args) -> None:
        pass

    def add_event(self, *_args, **_kw) -> None:
        pass

    def record_exception(self, *_args, **_kw) -> None:
        pass

    def is_recording(self) -> bool:
        return False


NO_SPAN = _NoSpan()


@contextmanager
def span(name: str, event=None, attributes: dict | None = None, kind: str = 'INTERNAL'):
    """A span made current for the block, child of the active span or of `event`'s trace context.

    With tracing off this yields NO_SPAN and costs a generator frame. Exceptions are recorded on
    the span and re-raised."""
    if not ENABLED:
        yield NO_SPAN
        return
    from opentelemetry.trace import SpanKind
    tracer = _STATE['tracer']
    with tracer.start_as_current_span(name, context=_parent_for(event), kind=SpanKind[kind],
                                      attributes=attributes) as current:
        yield current


def carries_sampled_trace(event) -> bool:
    """Whether the event continues a sampled trace (W3C trace-flags bit 0), without parsing."""
    parent = event.metadata.get(TRACEPARENT)
    return bool(parent) and parent[-1] in _SAMPLED_FLAG_DIGITS


def _inside_sampled_span() -> bool:
    from opentelemetry import trace
    return trace.get_current_span().get_span_context().trace_flags.sampled


def wants_handle_span(event) -> bool:
    """Called by the bus (only when ENABLED) before a delivery: False skips the HandleEvent span
    where nothing would be recorded (sample ratio 0 and the event is not in a sampled trace)."""
    return not _SAMPLE_NONE or carries_sampled_trace(event)


def start_publish_span(topic: str, event):
    """Called by the bus (only when ENABLED): open PublishEvent and write its context into the
    event before it is delivered or serialized. The caller ends the returned span (None: skipped,
    at sample ratio 0 outside a sampled trace)."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind
    if _SAMPLE_NONE and not (carries_sampled_trace(event) or _inside_sampled_span()):
        return None
    if TRACESTATE in event.metadata and \
            _drop_bad_tracestate(event.metadata) is not event.metadata:
        # not passed on either: inject below writes a tracestate only when the span has one
        del event.metadata[TRACESTATE]
    current = _STATE['tracer'].start_span(
        PUBLISH_EVENT, context=_parent_for(event), kind=SpanKind.PRODUCER,
        attributes={'loom.topic': topic, 'loom.event.id': event.id,
                    'loom.event.type': event.type,
                    # a sensor event's stamp: how long before its publish it was taken
                    'loom.event.timestamp_ms': event.timestamp_ms})
    _STATE['propagator'].inject(event.metadata, context=trace.set_span_in_context(current))
    return current


@contextmanager
def handle_span(topic: str, event, subscription: str):
    """Called by the bus (only when ENABLED) around a subscriber callback: HandleEvent, child of
    the event's PublishEvent, made current so publishes inside the callback continue the trace."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind
    parent = _extract(event.metadata) if TRACEPARENT in event.metadata else None
    current = _STATE['tracer'].start_span(
        HANDLE_EVENT, context=parent, kind=SpanKind.CONSUMER,
        attributes={'loom.topic': topic, 'loom.event.id': event.id,
                    'loom.event.type': event.type, 'loom.subscription': subscription})
    token = otel_context.attach(trace.set_span_in_context(current, parent))
    try:
        yield current
    except BaseException as exc:
        current.record_exception(exc)
        from opentelemetry.trace import Status, StatusCode
        current.set_status(Status(StatusCode.ERROR, repr(exc)))
        raise
    finally:
        otel_context.detach(token)
        current.end()


def read_spans(path: str) -> list[dict]:
    """Spans written by the file exporter (a partly written last line is skipped)."""
    spans = []
    try:
        with open(path, encoding='utf-8') as stream:
            for line in stream:
                try:
                    spans.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return spans
