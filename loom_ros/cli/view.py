"""`loom view`: a live visual view of a running Loom system, or of a recording, in the Rerun viewer
(served from the rerun-sdk package: no network, no ROS tools). See docs/view.md.

    loom view                              # attach over ROS; prints the URL to open
    loom view --recording demo_output/recording.mcap
    loom view --save run.rrd --headless    # no viewer: write an .rrd file (`rerun run.rrd`)

Shows the camera image with face boxes and the emoji, the robot's screen, the transcript and
spoken answers, route decisions with their reasons, and plots of latencies, queue depths and
drops. Rerun's server (viewer page and data) listens on 127.0.0.1 only. Settings:
config/view.yaml. Output: JSON lines ({"view": URL}, {"first": kind} the first time each kind
is shown), a summary line at the end.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time

from loom_ros.bringup.stop_signals import stop_event
from loom_ros.config.params import ConfigError
from loom_ros.replay.mcap_source import NotRegularError, open_regular


def add_parser(sub) -> None:
    p = sub.add_parser('view', help='live visual view (Rerun web viewer) of a running system or '
                                    'a recording')
    _arguments(p)
    p.set_defaults(run=lambda args: run(args, args.ros_args))


def _arguments(p) -> None:
    p.add_argument('--recording', metavar='FILE.mcap', default=None,
                   help='open this recording (loom record) instead of attaching over ROS')
    p.add_argument('--web-port', type=int, default=None, metavar='N',
                   help='port of the web viewer page (config/view.yaml: 9090; 0: any free one)')
    p.add_argument('--grpc-port', type=int, default=None, metavar='N',
                   help='port of the loopback data server (config/view.yaml: 9876; 0: free)')
    p.add_argument('--save', metavar='FILE.rrd', default=None,
                   help='also write everything shown to this Rerun file')
    p.add_argument('--headless', action='store_true',
                   help='no viewer (with --save: only the file; a recording then exits at its end)')
    p.add_argument('--duration', type=float, default=0.0,
                   help='stop after this many seconds (0: until Ctrl-C)')
    p.add_argument('--max-privacy', default=None, metavar='TIER',
                   help='strictest tier shown: public, sensitive (default), private, local_only')
    p.add_argument('--config', default=None, help='settings file (default config/view.yaml)')


def _say(**fields) -> None:
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def run(args, ros_args: list[str]) -> int:
    from loom_ros.view.settings import load_settings
    try:
        settings = load_settings(args.config, web_port=args.web_port, grpc_port=args.grpc_port,
                                 max_privacy=args.max_privacy)
    except (ConfigError, ValueError) as exc:
        print(f'loom view: {exc}', file=sys.stderr)
        return 2
    if args.headless and not args.save and not args.recording:
        print('loom view: --headless without --save shows nothing anywhere', file=sys.stderr)
        return 2
    recording = None
    if args.recording:
        recording, problem = open_recording(args.recording)
        if problem:
            print(f'loom view: --recording {problem}', file=sys.stderr)
            return 2
    try:
        return _run(args, settings, recording, ros_args)
    finally:
        if recording is not None:
            recording.close()


def _run(args, settings, recording, ros_args: list[str]) -> int:
    """The view, of `recording` (open, checked) or live."""
    from loom_ros.view.core import LoomView
    from loom_ros.view.settings import ViewServerError, close_stream, open_stream
    stop = stop_event()
    try:
        stream = open_stream(settings, serve=not args.headless, save=args.save)
    except ViewServerError as exc:
        print(f'loom view: {exc}', file=sys.stderr)
        return 1
    except OSError as exc:   # --save to a folder that cannot be made
        print(f'loom view: cannot write {str(args.save)[:200]}: {exc.strerror or exc}',
              file=sys.stderr)
        return 2
    url, view, code = stream.url, None, 0
    try:   # from here on the server is stopped and the file finished whatever happens
        view = LoomView(stream.rec, settings.limits(), settings.max_privacy,
                        self_node='loom_view', on_first=lambda kind: _say(first=kind))
        if url:
            _say(view=url)
            print(f'loom view: open {url}', file=sys.stderr, flush=True)
        if recording is not None:
            code = _recording(view, args.recording, recording)
            if code == 0 and url:
                print('loom view: the recording is loaded; Ctrl-C to stop serving it',
                      file=sys.stderr, flush=True)
                _wait(stop, args.duration)
        else:
            _live(view, stop, args.duration, ros_args)
    finally:
        problem = close_stream(stream)
        if problem:
            print(f'loom view: {problem}', file=sys.stderr, flush=True)
        if view is not None:
            _say(**view.summary(), **({'saved': args.save} if args.save else {}))
    return code


def open_recording(path: str):
    """(the recording open for reading, None) or (None, why not). Opened first, then the open
    file checked (fstat: a regular file), and that file is what is read: a check of the name
    followed by an open of the name could be raced (a FIFO swapped in blocked open() for good,
    deaf to SIGINT and SIGTERM). Never blocking (O_NONBLOCK) and never through a symbolic link
    (O_NOFOLLOW: give the file itself)."""
    shown = str(path)[:200]
    try:
        return open_regular(path, follow=False), None
    except NotRegularError:
        return None, f'{shown}: not a regular file (a FIFO, folder or device); refused'
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, f'{shown}: a symbolic link; refused (give the file itself)'
        return None, f'{shown}: cannot read: {exc.strerror or exc}'


def _wait(stop: threading.Event, duration: float) -> None:
    end = time.monotonic() + duration if duration > 0 else None
    while not stop.is_set() and (end is None or time.monotonic() < end):
        stop.wait(0.2)


def _recording(view, path: str, stream) -> int:
    """Draw the recording open in `stream`. An unfinished file (a recorder killed: its
    `.partial.mcap`) is drawn to its end and said (`unfinished`), not an error."""
    from loom_ros.replay.mcap_source import McapSource, RecordingError, UnfinishedError
    from loom_ros.view.recording import ViewTypes, play_into
    source = McapSource(path, ViewTypes(), stream=stream)
    error = unfinished = None
    skipped: dict = {}
    try:
        skipped = play_into(view, source)
    except UnfinishedError as exc:
        unfinished = str(exc)
        print(f'loom view: {unfinished}', file=sys.stderr, flush=True)
    except RecordingError as exc:
        error = str(exc)
    _say(recording=path, file_skipped=dict(source.skipped), examples=source.examples,
         decode_skipped=dict(skipped), **({'error': error} if error else {}),
         **({'unfinished': unfinished} if unfinished else {}))
    if error:
        print(f'loom view: {error}', file=sys.stderr)
        return 1
    return 0


def _live(view, stop: threading.Event, duration: float, ros_args: list[str]) -> None:
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from loom_ros.bus.executor import make_executor
    from loom_ros.bus.qos import fastdds_environment
    from loom_ros.config.params import config_dir
    from loom_ros.view.ros import ViewNode
    # Loom's Fast DDS profile (as bring-up gives its nodes), so camera frames arrive whole.
    os.environ.update(fastdds_environment(os.environ, config_dir()))
    rclpy.init(args=['loom_view', *ros_args], signal_handler_options=SignalHandlerOptions.NO)
    shell = ViewNode(view)
    executor = make_executor()
    executor.add_node(shell.node)
    end = time.monotonic() + duration if duration > 0 else None
    try:
        while not stop.is_set() and (end is None or time.monotonic() < end):
            executor.spin_once(timeout_sec=0.1)
    finally:
        executor.remove_node(shell.node)   # detached before destroying (status.py's lesson)
        executor.shutdown()
        shell.destroy()
        rclpy.try_shutdown()


def main(argv=None) -> int:
    from loom_ros.cli import standalone
    return standalone('loom view', __doc__.splitlines()[0], _arguments, run, argv)


if __name__ == '__main__':
    sys.exit(main())
