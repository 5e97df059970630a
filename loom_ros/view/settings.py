"""`loom view`'s settings (config/view.yaml, overridden on the command line) and where its data
goes: a Rerun RecordingStream sending to Rerun's own server (the `rerun` program of the pinned
rerun-sdk wheel) that serves the web viewer page and the data both on 127.0.0.1 only, and/or an
.rrd file. Pure apart from starting that server."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

import psutil
import rerun as rr
import rerun_cli

from loom_ros.bringup.processes import Process
from loom_ros.bus.event import Privacy
from loom_ros.config.params import ConfigError, config_dir, read_yaml, refuse_unknown_keys
from loom_ros.view.core import ViewLimits, blueprint

CONFIG_FILE = 'view.yaml'
APPLICATION_ID = 'loom'
LOOPBACK = '127.0.0.1'
_MEMORY = re.compile(r'\d{1,6}(B|KiB|MiB|GiB|KB|MB|GB)\Z')


@dataclass(frozen=True)
class ViewSettings:
    web_port: int = 9090
    grpc_port: int = 9876
    server_memory_limit: str = '512MiB'
    max_privacy: Privacy = Privacy.SENSITIVE
    max_image_hz: float = 5.0
    max_text_chars: int = 500
    jpeg_quality: int = 75

    def limits(self) -> ViewLimits:
        return replace(ViewLimits(), max_image_hz=self.max_image_hz,
                       max_text_chars=self.max_text_chars, jpeg_quality=self.jpeg_quality)


def parse_privacy(value: object) -> Privacy:
    """A tier by name (public, sensitive, private, local_only) or number; ValueError otherwise."""
    text = str(value).strip().lower().replace('-', '_')[:32]
    for tier in Privacy:
        if text in (tier.name.lower(), tier.name.lower().replace('_', ''), str(tier.value)):
            return tier
    raise ValueError(f'privacy tier {str(value)[:32]!r}: expected one of '
                     f'{", ".join(t.name.lower() for t in Privacy)}')


def load_settings(path: str | Path | None = None, **overrides) -> ViewSettings:
    """config/view.yaml (or `path`), then the non-None `overrides`; ConfigError names the key."""
    path = Path(path) if path else config_dir() / CONFIG_FILE
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping of settings')
    refuse_unknown_keys(data, ViewSettings.__dataclass_fields__, str(path))
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        ports = {k: int(data.get(k, getattr(ViewSettings, k))) for k in ('web_port', 'grpc_port')}
        memory = str(data.get('server_memory_limit', ViewSettings.server_memory_limit))
        hz = float(data.get('max_image_hz', ViewSettings.max_image_hz))
        chars = int(data.get('max_text_chars', ViewSettings.max_text_chars))
        quality = int(data.get('jpeg_quality', ViewSettings.jpeg_quality))
        privacy = parse_privacy(data.get('max_privacy', 'sensitive'))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f'{path}: {exc}') from None
    for key, port in ports.items():
        if not 0 <= port <= 65535:
            raise ConfigError(f'{path}: {key} {port} is not a port (0-65535)')
    if ports['web_port'] and ports['web_port'] == ports['grpc_port']:
        raise ConfigError(f'{path}: web_port and grpc_port are both {ports["web_port"]}: the '
                          'viewer page and its data need a port each')
    if not _MEMORY.match(memory):
        raise ConfigError(f'{path}: server_memory_limit {memory[:32]!r}: expected e.g. 512MiB')
    if not 0 <= hz <= 1000:
        raise ConfigError(f'{path}: max_image_hz {hz} is not in [0, 1000]')
    if not 16 <= chars <= 100_000:
        raise ConfigError(f'{path}: max_text_chars {chars} is not in [16, 100000]')
    if not 0 <= quality <= 100:
        raise ConfigError(f'{path}: jpeg_quality {quality} is not in [0, 100]')
    return ViewSettings(ports['web_port'], ports['grpc_port'], memory, privacy, hz, chars,
                        quality)


def free_ports(count: int, avoid: tuple[int, ...] = ()) -> list[int]:
    """`count` ports free on loopback now, all different and none of `avoid`: every socket is
    held bound until all are chosen (one at a time, the kernel can hand a port out twice)."""
    held: list[socket.socket] = []
    chosen: list[int] = []
    try:
        while len(chosen) < count:
            sock = socket.socket()
            held.append(sock)
            sock.bind((LOOPBACK, 0))
            if sock.getsockname()[1] not in avoid:
                chosen.append(sock.getsockname()[1])
        return chosen
    finally:
        for sock in held:
            sock.close()


def choose_port(preferred: int, avoid: tuple[int, ...] = ()) -> int:
    """`preferred` when it is free on loopback and not in `avoid` (0: none preferred), else a
    free port not in `avoid`."""
    if preferred and preferred not in avoid:
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, preferred))
                return preferred
            except OSError:
                pass
    return free_ports(1, avoid)[0]


def viewer_url(web_port: int, grpc_port: int) -> str:
    """The page to open: the web viewer, told to connect to the loopback data server."""
    data = f'rerun+http://{LOOPBACK}:{grpc_port}/proxy'
    return f'http://{LOOPBACK}:{web_port}/?url={quote(data, safe="")}'


SERVER_START_S = 30.0   # how long the server has to listen on both ports
SERVER_STOP_S = 5.0     # how long it has to exit on SIGTERM before it is killed
FLUSH_S = 5.0           # how long closing waits for the server to take the last messages


class ViewServerError(RuntimeError):
    """Rerun's server did not start (a port taken, the program missing): the reason, its log."""


def rerun_program() -> Path:
    """The `rerun` program shipped in the rerun-sdk wheel (rerun_cli), pinned with the SDK."""
    return Path(rerun_cli.__file__).parent / 'rerun'


def _own_listeners(pid: int) -> set[int]:
    """The loopback ports process `pid` itself listens on. Asked of the process, not of the
    ports: another local user's socket on a chosen port must never pass for the server (the
    SDK would then send the camera frames to it)."""
    try:
        connections = psutil.Process(pid).net_connections(kind='tcp')
    except psutil.Error:   # gone, or not ours to look at: not ready
        return set()
    return {c.laddr.port for c in connections
            if c.status == psutil.CONN_LISTEN and c.laddr.ip == LOOPBACK}


HOME_PREFIX = 'loom_view_'    # the server's private folders, in the temporary directory
OWNER_FILE = 'owner'           # in each: "<pid> <start time>" of the process that made it
MAX_SWEPT = 1000               # folders looked at per sweep (a temporary directory can be huge)


def new_home(parent: Path | None = None) -> Path:
    """A private folder (0700) for the server's Rerun config and data, naming its owner: this
    process. Folders a SIGKILLed `loom view` left behind (its server died with it) are removed
    first: their owner is gone."""
    sweep_stale_homes(parent)
    home = Path(tempfile.mkdtemp(prefix=HOME_PREFIX, dir=parent))
    me = psutil.Process()
    (home / OWNER_FILE).write_text(f'{me.pid} {me.create_time()!r}\n')
    return home


def sweep_stale_homes(parent: Path | None = None) -> list[Path]:
    """Remove this user's server folders in `parent` (the temporary directory) whose owner
    process is gone. Never one of another user, a link, one without a readable owner line, or
    one whose owner cannot be looked at; returns what it removed."""
    parent = Path(parent or tempfile.gettempdir())
    removed = []
    try:
        candidates = [path for _, path in zip(range(MAX_SWEPT), parent.glob(HOME_PREFIX + '*'))]
    except OSError:
        return removed
    for path in candidates:
        try:
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            with open(path / OWNER_FILE, 'rb') as owner_file:
                pid_text, started_text = owner_file.read(64).decode('ascii').split()
            pid, started = int(pid_text), float(started_text)
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if not _gone(pid, started):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _gone(pid: int, started: float) -> bool:
    """Whether the process that was `pid`, started at `started`, has ended (a pid reused by a
    later process counts as ended)."""
    try:
        return abs(psutil.Process(pid).create_time() - started) > 1.0
    except (psutil.NoSuchProcess, ValueError):
        return True
    except psutil.Error:   # not ours to look at: keep its folder
        return False


@dataclass
class ViewServer:
    """Rerun's own server, `rerun --serve-web --bind 127.0.0.1`: the viewer page and the data
    proxy the SDK sends to, both on loopback. The SDK's serve_web_viewer binds the page to every
    interface (rerun 0.41 has no bind argument there), which a robot on a ward's network should
    not do. Rerun's usage analytics are off for this process: its own config folder (a temporary
    one, removed at stop, or by the next `loom view` when a SIGKILL left it: new_home) says so;
    the user's Rerun settings are not touched.

    Started as every Loom child is (bringup.processes.Process): in a session of its own, so a
    Ctrl-C (or the demo's stop) to loom view's group reaches loom view first, which sends what it
    holds and then stops it; and killed with loom view, by SIGKILL (PR_SET_PDEATHSIG), even
    when loom view is SIGKILLed: a frozen or stopped server would hold a SIGTERM pending for
    good, and it keeps nothing worth a clean exit."""

    web_port: int
    grpc_port: int
    memory_limit: str
    home: Path = field(default_factory=new_home)
    process: Process | None = None

    @property
    def url(self) -> str:
        return viewer_url(self.web_port, self.grpc_port)

    @property
    def data_url(self) -> str:
        return f'rerun+http://{LOOPBACK}:{self.grpc_port}/proxy'

    def _child(self, *args: str) -> Process:
        return Process([str(rerun_program()), *args], name='rerun', env={
            **os.environ, 'XDG_CONFIG_HOME': str(self.home / 'config'),
            'XDG_DATA_HOME': str(self.home / 'data')}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, death_signal=signal.SIGKILL)

    def start(self) -> None:
        """Start it and wait until both ports listen; ViewServerError (stopped) otherwise."""
        try:
            setup = self._child('analytics', 'disable').start()
            if setup.wait(SERVER_START_S) != 0:
                setup.stop(0)
                raise ViewServerError(f'rerun analytics disable {setup.exit_reason()}')
            self.process = self._child(
                '--serve-web', '--bind', LOOPBACK, '--port', str(self.grpc_port),
                '--web-viewer-port', str(self.web_port), '--server-memory-limit',
                self.memory_limit, '--hide-welcome-screen').start()
        except OSError as exc:
            self.stop()
            raise ViewServerError(f'cannot run {rerun_program()}: {exc}') from None
        except ViewServerError:
            self.stop()
            raise
        deadline = time.monotonic() + SERVER_START_S
        while not {self.grpc_port, self.web_port} <= _own_listeners(self.process.pid):
            if not self.process.running or time.monotonic() > deadline:
                why = self.process.exit_reason()
                self.stop()
                raise ViewServerError(f'the Rerun server did not listen on 127.0.0.1:'
                                      f'{self.web_port} and :{self.grpc_port}: {why}'[:2000])
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            proc.stop(SERVER_STOP_S, signum=signal.SIGTERM)
        shutil.rmtree(self.home, ignore_errors=True)


@dataclass
class ViewStream:
    """Where the view draws: the stream, the URL to open (None when not served), the server."""

    rec: rr.RecordingStream
    url: str | None = None
    server: ViewServer | None = None


def open_stream(settings: ViewSettings, serve: bool, save: str | None) -> ViewStream:
    """A RecordingStream with the view's layout, sending to Rerun's server on loopback (the web
    viewer page and its data, `serve`) and/or the .rrd file `save`. Ports of 0 are chosen free
    here. Neither: a disabled stream (the view only counts). ViewServerError when the server
    cannot start."""
    sinks, server = [], None
    if save:   # first: a file that cannot be written fails before any server runs (OSError)
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        sinks.append(rr.FileSink(str(save)))
    if serve:
        web, grpc = settings.web_port, settings.grpc_port
        spare = iter(free_ports(2, avoid=(web, grpc)))
        server = ViewServer(web or next(spare), grpc or next(spare), settings.server_memory_limit)
        server.start()
    try:
        if server is not None:
            sinks.append(rr.GrpcSink(url=server.data_url))
        rec = rr.RecordingStream(APPLICATION_ID, default_enabled=bool(sinks))
        if sinks:
            rec.set_sinks(*sinks)
            rec.send_blueprint(blueprint(), make_active=True, make_default=True)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    return ViewStream(rec, server.url if server else None, server)


def close_stream(stream: ViewStream) -> str | None:
    """Flush everything, finish the .rrd file (its footer) and stop the server; what went wrong
    on the way, or None. Bounded: a server that went away or stopped reading (frozen, stuck)
    cannot take the last messages, and the SDK's disconnect waits on one that does not read
    without end, so after FLUSH_S the server is stopped, which lets the disconnect finish."""
    problem = None
    try:
        stream.rec.flush(timeout_sec=FLUSH_S)
    except (RuntimeError, TimeoutError) as exc:   # a sink it cannot send to, or a stuck one
        problem = f'the last messages did not reach the viewer: {str(exc)[:200]}'
    failed: list[BaseException] = []

    def disconnect():
        try:
            stream.rec.disconnect()   # finishes the .rrd file whatever happens to the server
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failed.append(exc)
    worker = threading.Thread(target=disconnect, daemon=True, name='loom-view-disconnect')
    worker.start()
    worker.join(FLUSH_S)
    if stream.server is not None:
        if worker.is_alive():
            problem = problem or (f'the last messages did not reach the viewer: its server took '
                                  f'nothing for {FLUSH_S:g} s and was stopped')
        stream.server.stop()
    worker.join(FLUSH_S)
    if worker.is_alive():
        problem = problem or 'the view could not finish its streams'
    elif failed:
        raise failed[0]
    return problem
