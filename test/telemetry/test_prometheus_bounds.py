"""The Prometheus endpoint's bounds, over real sockets: a connection that never finishes its
request (or trickles it) is closed after the timeout, at most max_connections are open at once
(more are closed on accept), both counted on the endpoint; a scrape answers meanwhile. Before,
every connection held a server thread for as long as its client liked (helper-76, finding 7)."""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest

from harness import WAIT_LIMIT_S, free_port
from loom_ros.telemetry.metrics import MetricsRegistry, serve_prometheus, stop_serving

HALF_REQUEST = b'GET /metrics HTTP/1.1\r\nHost: x\r\n'   # the headers never end


@pytest.fixture
def registry():
    reg = MetricsRegistry('/prom_bounds')
    reg.inc('events_published', topic='a')
    yield reg
    stop_serving(reg)


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics',
                                  timeout=WAIT_LIMIT_S).read().decode()


def _closed_by_server(sock: socket.socket, limit: float = WAIT_LIMIT_S) -> bytes:
    """What the server sent before it closed `sock` (fails if it is still open at `limit`)."""
    sock.settimeout(limit)
    got = b''
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def _trickled_seconds(port: int, data: bytes, every_s: float) -> float:
    """Send `data` a byte every `every_s` (over and over) until the server cuts the connection
    off; how long that took (fails at WAIT_LIMIT_S)."""
    sock = socket.create_connection(('127.0.0.1', port))
    opened, sent = time.monotonic(), 0
    sock.settimeout(every_s)
    try:
        while True:
            try:
                sock.sendall(data[sent:sent + 1])
                sent = (sent + 1) % len(data)
                if not sock.recv(1):
                    break
            except socket.timeout:
                assert time.monotonic() - opened < WAIT_LIMIT_S, 'the trickle was never cut off'
            except (BrokenPipeError, ConnectionResetError):
                break
        return time.monotonic() - opened
    finally:
        sock.close()


def test_idle_and_trickling_connections_are_closed_after_the_timeout(registry):
    timeout = 0.5
    port = serve_prometheus(registry, free_port(), timeout_s=timeout, max_connections=8)
    idle = []
    for i in range(6):   # half of them send half a request, half nothing at all
        sock = socket.create_connection(('127.0.0.1', port))
        if i % 2:
            sock.sendall(HALF_REQUEST)
        idle.append((time.monotonic(), sock))
    assert 'loom_events_published_total{node="/prom_bounds",topic="a"} 1.0' in _scrape(port)
    for opened, sock in idle:
        assert _closed_by_server(sock) == b''
        assert time.monotonic() - opened >= 0.8 * timeout   # closed by the timeout, not before
        sock.close()
    # One that sends a byte every 0.1 s never idles for the timeout: the request's deadline
    # closes it.
    assert _trickled_seconds(port, HALF_REQUEST, 0.1) >= 0.8 * timeout
    # Bytes with no line end keep the server inside one readline, whose many receives each
    # renewed a socket timeout: a byte every 0.6 timeouts was never cut off.
    assert _trickled_seconds(port, b'G', 0.6 * timeout) >= 0.8 * timeout
    text = _scrape(port)
    assert 'loom_prometheus_requests_timed_out_total 8.0' in text
    assert 'loom_prometheus_connections_refused_total 0.0' in text


def test_connections_over_the_cap_are_closed_at_once_and_counted(registry):
    cap = 4
    port = serve_prometheus(registry, free_port(), timeout_s=WAIT_LIMIT_S, max_connections=cap)
    held = [socket.create_connection(('127.0.0.1', port)) for _ in range(cap)]
    for sock in held:
        sock.sendall(HALF_REQUEST)
    # Accepted in order after those: over the cap, closed at once (with a 503 when the socket
    # took it), long before the server's timeout
    for _ in range(3):
        with socket.create_connection(('127.0.0.1', port)) as extra:
            answer = _closed_by_server(extra, limit=WAIT_LIMIT_S / 2)
            assert answer == b'' or answer.startswith(b'HTTP/1.0 503'), answer
    with pytest.raises((urllib.error.URLError, ConnectionError)):   # full: refused too
        _scrape(port)
    held.pop().close()   # a slot frees once the server reads the end of that connection
    deadline = time.monotonic() + WAIT_LIMIT_S
    while True:
        try:
            text = _scrape(port)
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, 'no scrape answered after a slot freed'
    assert 'loom_events_published_total{node="/prom_bounds",topic="a"} 1.0' in text
    assert 'loom_prometheus_connections_refused_total' in text
    refused = float(next(line.split()[1] for line in text.splitlines()
                         if line.startswith('loom_prometheus_connections_refused_total')))
    assert refused >= 4   # the three, and the scrape
    for sock in held:
        sock.close()
