"""`loom view`'s settings (config/view.yaml, overridden on the command line) and where its data
goes: a Rerun RecordingStream with a gRPC data server on 127.0.0.1 that the web viewer page
connects to, and/or an .rrd file. Pure apart from starting Rerun's servers."""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote

import rerun as rr

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def choose_port(preferred: int) -> int:
    """`preferred` when it is free on loopback (0: none preferred), else a free port."""
    if preferred:
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, preferred))
                return preferred
            except OSError:
                pass
    return free_port()


def viewer_url(web_port: int, grpc_port: int) -> str:
    """The page to open: the web viewer, told to connect to the loopback data server."""
    data = f'rerun+http://{LOOPBACK}:{grpc_port}/proxy'
    return f'http://{LOOPBACK}:{web_port}/?url={quote(data, safe="")}'


def open_stream(settings: ViewSettings, serve: bool, save: str | None
                ) -> tuple[rr.RecordingStream, str | None]:
    """A RecordingStream with the view's layout, writing to a loopback gRPC server plus the web
    viewer page (`serve`) and/or the .rrd file `save`; (stream, the URL to open or None).
    Ports of 0 are chosen free here. Neither: a disabled stream (the view only counts)."""
    sinks, url = [], None
    if serve:
        grpc_port = settings.grpc_port or free_port()
        web_port = settings.web_port or free_port()
        sinks.append(rr.GrpcServerSink(bind_ip=LOOPBACK, port=grpc_port,
                                       server_memory_limit=settings.server_memory_limit))
        url = viewer_url(web_port, grpc_port)
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        sinks.append(rr.FileSink(str(save)))
    rec = rr.RecordingStream(APPLICATION_ID, default_enabled=bool(sinks))
    if sinks:
        rec.set_sinks(*sinks)
        rec.send_blueprint(blueprint(), make_active=True, make_default=True)
    if serve:
        rr.serve_web_viewer(web_port=web_port, open_browser=False,
                            connect_to=f'rerun+http://{LOOPBACK}:{grpc_port}/proxy')
    return rec, url


def close_stream(rec: rr.RecordingStream) -> None:
    """Flush everything and finish the .rrd file (its footer); stops the data server."""
    rec.flush()
    rec.disconnect()
