"""Telemetry for one node: the telemetry.* parameters, tracing set-up, loom/metrics, Prometheus,
/diagnostics and the structured log, wired in one call.

Every node built with `create_bus` gets this automatically (the bus's metrics and checks
included). Other nodes call `attach_telemetry(node, '<section>')` and register their own checks
and metrics:

    self.telemetry = attach_telemetry(self, 'router')
    self.telemetry.diagnostics.add_check('cloud budget', lambda: budget_check(spend, limit))
    self.telemetry.registry.set_gauge('cloud_spend', spend)
"""
from __future__ import annotations

import ipaddress

from loom_ros.config.params import ParamSpec, declare_parameters
from loom_ros.storage.layout import derived, node_layout
from loom_ros.telemetry import tracing
from loom_ros.telemetry.diagnostics import (
    CheckResult, DiagnosticsReporter, DropsRising, queues_check,
)
from loom_ros.telemetry.logs import NodeLog, mask_node_logger
from loom_ros.telemetry.metrics import (
    BusMetrics, MetricsPublisher, MetricsRegistry, ResourceSampler, bus_drop_total,
    serve_prometheus, stop_serving,
)

MAX_ADDRESS_CHARS = 45   # the longest IPv6 text form (with an IPv4 tail)

TELEMETRY_PARAMETERS = [
    ParamSpec('telemetry.tracing.exporter', 'Where spans go: none, file (JSON lines) or otlp '
              '(OTLP/HTTP collector); process-wide, the first node to set it wins',
              read_only=True),
    ParamSpec('telemetry.tracing.file', "Span file of the file exporter (JSON lines; ~ expands; "
              "'' = <storage.root>/traces/spans.jsonl)", read_only=True),
    ParamSpec('telemetry.tracing.file_max_bytes', 'The span file is rotated past this many bytes '
              '(0: never)', read_only=True, min_value=0),
    ParamSpec('telemetry.tracing.file_keep', 'Rotated span files kept (<file>.1 ... .<n>)',
              read_only=True, min_value=0, max_value=100),
    ParamSpec('telemetry.tracing.otlp_endpoint', 'OTLP/HTTP traces endpoint of the collector',
              read_only=True),
    ParamSpec('telemetry.tracing.sample_ratio', 'Fraction of new traces recorded (children follow '
              'their parent)', read_only=True, min_value=0.0, max_value=1.0),
    ParamSpec('telemetry.tracing.sample_rules', "Per topic, 'topic-pattern=ratio' (* and ?): "
              'the fraction of traces started by an event on a matching topic (first match '
              'wins; the rest get sample_ratio)', read_only=True),
    ParamSpec('telemetry.metrics.period_s', 'Seconds between Metrics messages on loom/metrics '
              '(0: off)', read_only=True, min_value=0.0, max_value=3600.0),
    ParamSpec('telemetry.metrics.latency', 'Record handler latency and event age histograms per '
              'topic (about 1 us per delivered event)', read_only=True),
    ParamSpec('telemetry.metrics.max_topics', 'Topics with metric series of their own; the '
              "series of later topics are summed under topic='(other topics)'", read_only=True,
              min_value=0, max_value=100000),
    ParamSpec('telemetry.metrics.prometheus_port', 'Serve Prometheus metrics on this port '
              '(0: off; one server per process)', read_only=True, min_value=0, max_value=65535),
    ParamSpec('telemetry.metrics.prometheus_address', 'IP address the Prometheus endpoint '
              'listens on: 127.0.0.1 (this machine) by default; another (0.0.0.0: every '
              'interface) serves the unauthenticated metrics to the network, with a warning',
              read_only=True),
    ParamSpec('telemetry.diagnostics.period_s', 'Seconds between /diagnostics reports (0: off)',
              read_only=True, min_value=0.0, max_value=3600.0),
    ParamSpec('telemetry.diagnostics.queue_warn_fraction', 'A bounded queue this full is WARN '
              '(ERROR at 0.95)', read_only=True, min_value=0.0, max_value=1.0),
    ParamSpec('telemetry.diagnostics.drops_warn_per_s', 'Drops per second above this are WARN',
              read_only=True, min_value=0.0),
    ParamSpec('telemetry.diagnostics.drops_error_per_s', 'Drops per second above this are ERROR',
              read_only=True, min_value=0.0),
    ParamSpec('telemetry.log.json', 'Also write structured JSON log lines (masked)',
              read_only=True),
    ParamSpec('telemetry.log.file', "Where JSON log lines go ('' or '-': stderr; ~ expands)",
              read_only=True),
    ParamSpec('telemetry.log.level', 'Lowest level of the structured log: debug, info, warn, '
              'error', read_only=True),
]


class NodeTelemetry:
    """What a node holds: `registry` (metrics), `diagnostics` (checks), `log` (structured)."""

    def __init__(self, node, defaults_section: str, bus=None):
        import os
        self.node = node
        self.params = values = declare_parameters(node, defaults_section, TELEMETRY_PARAMETERS)
        # Every node gets storage.root here (the one /** path), and tracing files go under it.
        self.layout = node_layout(node, defaults_section)
        values['telemetry.tracing.file'] = derived(values['telemetry.tracing.file'],
                                                   self.layout.traces / 'spans.jsonl')
        name = node.get_fully_qualified_name()
        json_target = ''
        if values['telemetry.log.json']:
            json_target = os.path.expanduser(str(values['telemetry.log.file'])) or '-'
        self.log = NodeLog(node.get_name(), node, json_target, str(values['telemetry.log.level']))
        mask_node_logger(node, self.log)   # the node's own log calls: masked, and JSON when on
        self._setup_tracing(values, node.get_name())

        self.registry = MetricsRegistry(name, int(values['telemetry.metrics.max_topics']))
        self.registry.collectors.append(ResourceSampler())
        if bus is not None:
            self.registry.collectors.append(BusMetrics(bus))
            if values['telemetry.metrics.latency']:
                bus.metrics = self.registry
        period = float(values['telemetry.metrics.period_s'])
        self.metrics_publisher = (MetricsPublisher(node, self.registry, period)
                                  if period > 0 else None)
        self.prometheus_port = 0
        port = int(values['telemetry.metrics.prometheus_port'])
        if port:
            self._serve_prometheus(port, str(values['telemetry.metrics.prometheus_address']))

        period = float(values['telemetry.diagnostics.period_s'])
        self.diagnostics = DiagnosticsReporter(node, period)
        if bus is not None:
            warn = float(values['telemetry.diagnostics.queue_warn_fraction'])
            self.diagnostics.add_check('bus queues', lambda: queues_check(_bus_queues(bus), warn))
            drops = DropsRising(float(values['telemetry.diagnostics.drops_warn_per_s']),
                                float(values['telemetry.diagnostics.drops_error_per_s']))
            self.diagnostics.add_check('bus drops', lambda: drops.update(bus_drop_total(bus)))

    def _serve_prometheus(self, port: int, address: str) -> None:
        """The endpoint on `address` (an IP address, not a name: nothing to resolve; no scope),
        loopback by default; any other address is said loudly: the metrics have no credentials."""
        try:
            if len(address) > MAX_ADDRESS_CHARS:
                raise ValueError('too long')
            ip = ipaddress.ip_address(address)
            if getattr(ip, 'scope_id', None):
                raise ValueError('a scoped address')
        except ValueError:
            self.log.error('Prometheus endpoint not served: telemetry.metrics.prometheus_address '
                           f'{address[:MAX_ADDRESS_CHARS]!r} is not an IP address')
            return
        if not ip.is_loopback:
            self.log.warning(f'Prometheus metrics served unauthenticated on {ip}:{port} '
                             '(telemetry.metrics.prometheus_address): anyone who can reach it '
                             "reads this process's topic names, rates and drops")
        try:
            self.prometheus_port = serve_prometheus(self.registry, port, str(ip))
        except (OSError, ValueError) as exc:   # UnicodeError is a ValueError
            self.log.error(f'Prometheus endpoint not served on {ip}:{port}: {str(exc)[:200]}')

    def _setup_tracing(self, values: dict, service: str) -> None:
        try:
            config = tracing.config_from_params(values, service)
        except tracing.TracingConfigError as exc:
            self.log.error(f'tracing stays off: {exc}')
            return
        if config.exporter != 'none' and not tracing.ENABLED:
            try:
                tracing.configure(config)
            except Exception as exc:  # e.g. an unwritable span file
                self.log.error(f'tracing stays off: cannot start the {config.exporter} '
                               f'exporter: {exc}')
                return
            rules = f', per topic {", ".join(config.sample_rules)}' if config.sample_rules else ''
            self.log.info(f'tracing on: exporter {config.exporter}, sample ratio '
                          f'{config.sample_ratio:g}{rules}')

    def add_check(self, name: str, check) -> None:
        self.diagnostics.add_check(name, check)

    def destroy(self) -> None:
        if self.metrics_publisher is not None:
            self.metrics_publisher.destroy()
            self.metrics_publisher = None
        if self.diagnostics is not None:
            self.diagnostics.destroy()
            self.diagnostics = None
        if self.prometheus_port:
            stop_serving(self.registry)
            self.prometheus_port = 0


def _bus_queues(bus) -> dict[str, tuple[int, int]]:
    return {sub.pattern.text: (len(sub.queue), sub.policy.queue_size)
            for sub in list(bus.stats.subscriptions) if sub.queue is not None}


def attach_telemetry(node, defaults_section: str, bus=None) -> NodeTelemetry:
    return NodeTelemetry(node, defaults_section, bus)


__all__ = ['NodeTelemetry', 'attach_telemetry', 'CheckResult', 'TELEMETRY_PARAMETERS']
