"""Where a node's Prometheus endpoint listens (telemetry.metrics.prometheus_address): the metrics
carry no credentials, so by default only this machine reaches them (127.0.0.1; it listened on
0.0.0.0 before); every interface only when configured, said as a warning; an address that is
not an IP address serves nothing and says why (never resolved as a name)."""
from __future__ import annotations

import json
import urllib.request

import pytest

from harness import ANY_HEX, LOOPBACK_HEX, free_port, tcp_listeners


def _telemetry(ros, tmp_path, name: str, **overrides):
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from loom_ros.telemetry.node_telemetry import attach_telemetry
    params = {'telemetry.log.json': True, 'telemetry.log.file': str(tmp_path / f'{name}.jsonl'),
              'telemetry.metrics.period_s': 0.0, 'telemetry.diagnostics.period_s': 0.0,
              **overrides}
    node = Node(name, context=ros.node.context,
                parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    return node, attach_telemetry(node, 'event_monitor')


def _log(tmp_path, name: str) -> list[dict]:
    path = tmp_path / f'{name}.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize('address, listens, warned', [
    (None, LOOPBACK_HEX, False),          # the default (config/loom.yaml)
    ('127.0.0.1', LOOPBACK_HEX, False),
    ('0.0.0.0', ANY_HEX, True),
])
def test_the_endpoint_listens_where_configured_and_says_so_when_not_loopback(
        ros, tmp_path, address, listens, warned):
    port = free_port()
    extra = {} if address is None else {'telemetry.metrics.prometheus_address': address}
    node, telemetry = _telemetry(ros, tmp_path, 'prom_node',
                                 **{'telemetry.metrics.prometheus_port': port}, **extra)
    try:
        assert telemetry.prometheus_port == port
        assert tcp_listeners(port) == [listens]
        text = urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10).read()
        assert b'loom_' in text
        warnings = [r for r in _log(tmp_path, 'prom_node')
                    if r['level'] == 'WARN' and 'unauthenticated' in r['msg']]
        assert bool(warnings) == warned, warnings
    finally:
        telemetry.destroy()
        node.destroy_node()
    assert tcp_listeners(port) == []


@pytest.mark.parametrize('address', [
    'localhost', 'evil.example', '1.2.3', '', 'x' * 5000,
    '::1%lo',                          # a scoped address: an interface by name
    '::1%' + 'a' * 60 + 'TAIL',        # cut to 64 characters it parsed, then crashed the node
])
def test_an_address_that_is_not_an_ip_serves_nothing_and_says_why(ros, tmp_path, address):
    port = free_port()
    node, telemetry = _telemetry(ros, tmp_path, 'prom_bad', **{
        'telemetry.metrics.prometheus_port': port,
        'telemetry.metrics.prometheus_address': address})
    try:
        assert telemetry.prometheus_port == 0 and tcp_listeners(port) == []
        errors = [r['msg'] for r in _log(tmp_path, 'prom_bad') if r['level'] == 'ERROR']
        assert any('is not an IP address' in m for m in errors), errors
        assert all(len(m) < 400 for m in errors)   # a long value is cut, never echoed whole
    finally:
        telemetry.destroy()
        node.destroy_node()


def test_a_second_node_asking_for_another_address_is_refused_not_silently_moved(ros, tmp_path):
    """One endpoint per process: a later node whose address differs from the served one is
    told so (its metrics are not where it asked), as one asking for another port is."""
    port = free_port()
    first, first_telemetry = _telemetry(ros, tmp_path, 'prom_first', **{
        'telemetry.metrics.prometheus_port': port,
        'telemetry.metrics.prometheus_address': '0.0.0.0'})
    second, second_telemetry = _telemetry(ros, tmp_path, 'prom_second', **{
        'telemetry.metrics.prometheus_port': port,
        'telemetry.metrics.prometheus_address': '127.0.0.1'})
    try:
        assert first_telemetry.prometheus_port == port and second_telemetry.prometheus_port == 0
        assert tcp_listeners(port) == [ANY_HEX]
        errors = [r['msg'] for r in _log(tmp_path, 'prom_second') if r['level'] == 'ERROR']
        assert any('already serves Prometheus metrics on 0.0.0.0' in m for m in errors), errors
    finally:
        for telemetry, node in ((second_telemetry, second), (first_telemetry, first)):
            telemetry.destroy()
            node.destroy_node()
    assert tcp_listeners(port) == []

