"""Where `loom view` listens, as a user runs it (a real process, attached over ROS): Rerun's
server serves the viewer page and the data on 127.0.0.1 only (Rerun's serve_web_viewer, used
before, bound the page to every interface), with Rerun's usage analytics off in a config of its
own (the user's Rerun settings untouched), and it does not outlive `loom view`, not even a
SIGKILL of it (it would keep the frames in its buffer and the ports open)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest

from harness import LOOPBACK_HEX, WAIT_LIMIT_S, LinePeer, loom_cli, run_loom, tcp_listeners
from loom_ros.view import settings as view_settings
from loom_ros.view.settings import close_stream, free_ports, load_settings, open_stream


@contextlib.contextmanager
def _running_view(env: dict):
    """A real `loom view` attached over ROS on two free ports, once it printed its URL:
    (the view, its Rerun server, its URL line, web port, data port); both killed at the end."""
    web, grpc = free_ports(2)
    view = LinePeer('view', loom_cli('view', '--web-port', str(web), '--grpc-port', str(grpc)),
                    env=env)
    server = None
    try:
        line = view.wait_line(lambda text: text.startswith('{"view"'), 'the URL to open')
        server = _server_of(view)
        yield view, server, line, web, grpc
    finally:
        if view.popen.poll() is None:
            view.popen.kill()
            view.popen.wait()
        if server is not None and server.is_running():
            server.kill()


def _kill_and_wait(view: LinePeer, server: psutil.Process) -> None:
    """SIGKILL loom view; its server must then be gone (psutil.TimeoutExpired fails the test)."""
    view.popen.send_signal(signal.SIGKILL)
    view.popen.wait(timeout=WAIT_LIMIT_S)
    server.wait(timeout=WAIT_LIMIT_S)


def _server_of(view: LinePeer) -> psutil.Process:
    children = [p for p in psutil.Process(view.popen.pid).children() if p.name() == 'rerun']
    assert len(children) == 1, f'expected one Rerun server under loom view, found {children}'
    return children[0]


def test_the_view_listens_on_loopback_only_without_analytics_and_dies_with_loom_view(tmp_path):
    home = tmp_path / 'home'
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith('XDG_')}
    env['HOME'] = str(home)   # the user's own Rerun settings would be under here
    env['TMPDIR'] = str(tmp_path)   # the server's own folder, which a SIGKILL leaves behind
    with _running_view(env) as (view, server, line, web, grpc):
        assert json.loads(line)['view'].startswith(f'http://127.0.0.1:{web}/')
        for port in (web, grpc):
            assert tcp_listeners(port) == [LOOPBACK_HEX], (port, tcp_listeners(port))
        config_home = server.environ()['XDG_CONFIG_HOME']
        with open(os.path.join(config_home, 'rerun', 'analytics.json')) as stream:
            assert json.load(stream)['analytics_enabled'] is False
        assert not (home / '.config' / 'rerun').exists()
        _kill_and_wait(view, server)
        assert tcp_listeners(web) == [] and tcp_listeners(grpc) == []
    # The server's folder outlives a SIGKILL; the next loom view removes it (new_home).
    left = list(tmp_path.glob(view_settings.HOME_PREFIX + '*'))
    assert len(left) == 1, left
    fresh = view_settings.new_home(tmp_path)
    assert list(tmp_path.glob(view_settings.HOME_PREFIX + '*')) == [fresh]


def test_only_folders_whose_owner_is_gone_are_swept(tmp_path):
    """What the sweep removes: this user's folder whose owner ended or whose pid now names a
    later process. What it keeps: a live owner's, one without an owner line, a link (nor what it
    points to), another user's."""
    import subprocess
    import sys

    def folder(name: str, owner: str | None) -> Path:
        path = tmp_path / f'{view_settings.HOME_PREFIX}{name}'
        path.mkdir()
        if owner is not None:
            (path / view_settings.OWNER_FILE).write_text(owner)
        return path
    ended = subprocess.Popen([sys.executable, '-c', 'pass'])
    started = psutil.Process(ended.pid).create_time()
    ended.wait()
    me = psutil.Process()
    dead = folder('dead', f'{ended.pid} {started!r}\n')
    reused = folder('reused', f'{me.pid} {me.create_time() - 3600!r}\n')
    alive = folder('alive', f'{me.pid} {me.create_time()!r}\n')
    unnamed = folder('unnamed', None)
    garbage = folder('garbage', 'x' * 10_000)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / view_settings.OWNER_FILE).write_text(f'{ended.pid} {started!r}\n')
    (tmp_path / f'{view_settings.HOME_PREFIX}link').symlink_to(elsewhere)
    foreign = folder('foreign', f'{ended.pid} {started!r}\n')
    if os.getuid() == 0:
        os.chown(foreign, 65534, 65534)
    removed = view_settings.sweep_stale_homes(tmp_path)
    assert sorted(removed) == sorted([dead, reused] + ([] if os.getuid() == 0 else [foreign]))
    for kept in (alive, unnamed, garbage, elsewhere / view_settings.OWNER_FILE):
        assert kept.exists(), kept
    assert (tmp_path / f'{view_settings.HOME_PREFIX}link').is_symlink()
    assert foreign.exists() == (os.getuid() == 0)


def test_a_server_gone_first_is_reported_and_the_rrd_file_is_still_finished(tmp_path):
    """The server can go before the view (killed, out of memory): closing says so, does not
    raise, and the .rrd file written beside it is complete and readable."""
    import rerun as rr

    from rrd import read_rrd
    settings = replace(load_settings(), web_port=0, grpc_port=0)
    stream = open_stream(settings, serve=True, save=str(tmp_path / 'out.rrd'))
    home = stream.server.home
    stream.server.process.kill()
    stream.server.process.wait(timeout=WAIT_LIMIT_S)
    for i in range(50):
        stream.rec.log('check/value', rr.Scalars(float(i)))
    problem = close_stream(stream)
    assert problem and problem.startswith('the last messages did not reach the viewer: '), \
        problem
    assert not home.exists()
    assert len(read_rrd(tmp_path / 'out.rrd')['check/value']) == 50


def test_a_port_someone_else_listens_on_is_never_taken_for_the_server(tmp_path):
    """Another local user listening first on the configured data port: the view must not take
    that socket for its server (it would send the camera frames there). Rerun's server cannot
    bind, so the view does not start, and says why."""
    import socket

    from loom_ros.view.settings import ViewServerError
    with socket.socket() as squatter:
        squatter.bind(('127.0.0.1', 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        settings = replace(load_settings(), web_port=0, grpc_port=taken)
        with pytest.raises(ViewServerError, match='did not listen on 127.0.0.1'):
            open_stream(settings, serve=True, save=None)
        squatter.settimeout(0.2)
        with pytest.raises(socket.timeout):   # nothing of the view connected to it either
            squatter.accept()


def test_a_server_that_stops_reading_cannot_hang_the_view(tmp_path, monkeypatch):
    """A server frozen (SIGSTOP: a stuck process) while the view still has messages for it:
    closing gives up after FLUSH_S, kills the server and still finishes the .rrd file; it never
    waits for good (the SDK's disconnect alone waits on such a server without end)."""
    import rerun as rr

    from rrd import read_rrd
    monkeypatch.setattr(view_settings, 'FLUSH_S', 1.0)
    monkeypatch.setattr(view_settings, 'SERVER_STOP_S', 1.0)
    stream = open_stream(replace(load_settings(), web_port=0, grpc_port=0), serve=True,
                         save=str(tmp_path / 'out.rrd'))
    server = psutil.Process(stream.server.process.pid)
    server.suspend()
    try:
        for i in range(50):
            stream.rec.log('check/image', rr.Image(np.full((240, 320, 3), i, dtype=np.uint8)))
        result: list = []
        closer = threading.Thread(target=lambda: result.append(close_stream(stream)),
                                  daemon=True)
        closer.start()
        closer.join(WAIT_LIMIT_S)   # the old close waited for good: a failure, not a hang
        assert not closer.is_alive(), 'closing the view waits on a frozen server'
        problem = result[0]
    finally:
        if server.is_running():
            server.kill()
    assert problem and problem.startswith('the last messages did not reach the viewer: ')
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    assert len(read_rrd(tmp_path / 'out.rrd')['check/image']) == 50


def test_a_file_that_cannot_be_written_starts_no_server(tmp_path):
    with pytest.raises(OSError):
        open_stream(replace(load_settings(), web_port=0, grpc_port=0), serve=True,
                    save='/proc/no/such/out.rrd')
    assert [p for p in psutil.Process().children() if p.name() == 'rerun'] == []
    done = run_loom('view', '--web-port', '0', '--grpc-port', '0', '--save', '/proc/no/x.rrd')
    assert done.returncode == 2 and 'loom view: cannot write /proc/no/x.rrd' in done.stderr, \
        done.stderr[-2000:]


def test_the_page_and_its_data_need_a_port_each(tmp_path):
    from loom_ros.config.params import ConfigError
    with pytest.raises(ConfigError, match='a port each'):
        load_settings(web_port=9999, grpc_port=9999)


def test_a_frozen_server_still_dies_with_loom_view(tmp_path):
    """A server stopped (SIGSTOP) when loom view is killed: a SIGTERM would wait pending for
    good (three such servers were found left behind); the death signal is SIGKILL."""
    with _running_view({**os.environ, 'TMPDIR': str(tmp_path)}) as (view, server, *_):
        server.suspend()
        _kill_and_wait(view, server)
