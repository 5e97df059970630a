"""`loom demo`: the main job. Both seed flows run on the simulated sensors for `--duration`
seconds (30 by default) with a live view, then a summary, and the artifacts stay in the output
folder (demo_output/):

- `loom bringup` (one process per robot node, as `ros2 launch loom bringup.launch.py` starts
  them, a Zenoh router and the cloud tier beside them):
  Flow 1, camera frames -> FaceAgent -> router (Local) -> face_expression -> ui_update {emoji};
  Flow 2, speech -> asr -> VoiceAgent -> router (Hybrid) -> local transcript on the UI, cloud
  intent over Zenoh -> weather tool -> tts WAV;
- `event_monitor` (events/s on every Loom topic) and `loom record` (an MCAP file of the topics);
- this process watches router/decisions, loom/ui/state, the voice agent and /diagnostics, and
  measures camera-to-emoji latency, time to first feedback and time to the spoken answer (both
  from the moment the simulated speaker stops talking), and counts camera frames: sent into
  Loom by camera_adapter, received (and lost) by the face agent, handled (face in view or not:
  an empty scene sends no emoji) and dropped by it, from loom/bus/stats and loom/agents/status.
Secure by default, like bring-up: credentials are made on the first run in <output>/keys (or
`--keys-dir`) and every Zenoh link is mutual TLS under the router's access control; `--insecure`
runs plain TCP and says so.
Tracing is off, as a robot runs by default (config/loom.yaml telemetry.tracing.exporter): at
sample ratio 1 it costs every process CPU on every event, and the face flow about 5 ms at P50 on
this 2-core machine. `--trace` records it (for bench/face_flow_stages.py).
Artifacts: summary.json, answer.wav (the last spoken answer), recording.mcap (camera frames too
with `--record-camera`, so that it replays: docs/replay.md), trace.jsonl (with `--trace`: the
OpenTelemetry spans of every hop), logs/, and the agents' state, router history and audit log.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

from loom_ros.bringup import entry
from loom_ros.bringup.processes import Process
from loom_ros.bringup.stop_signals import stop_event
from loom_ros.cli.bringup import STOP_BOUND_S
from loom_ros.bus.qos import fastdds_environment
from loom_ros.config.params import DEFAULTS_FILE, config_dir
from loom_ros.plugins.actuators.ui import frame_stamp_ms
from loom_ros.telemetry import tracing

CAMERA_TOPIC = 'camera.front'
FACE_AGENT = 'face'


def add_parser(sub) -> None:
    demo = sub.add_parser('demo', help='run both seed flows on simulated sensors, live view')
    demo.add_argument('--duration', type=float, default=30.0, help='seconds to run (default 30)')
    demo.add_argument('--params-file', default=None,
                      help=f'ROS params file (default: config/{DEFAULTS_FILE})')
    demo.add_argument('--stop-after-events', type=int, default=0, metavar='N',
                      help='stop early once N events were received and both flows have '
                           'delivered (an emoji shown and an answer spoken)')
    demo.add_argument('--output', default='demo_output',
                      help='folder for the summary and artifacts (default demo_output)')
    demo.add_argument('--keys-dir', default='',
                      help="fleet credentials, made on first run ('' = <output>/keys)")
    demo.add_argument('--insecure', action='store_true',
                      help='Zenoh over plain TCP: no TLS, authentication or access control')
    demo.add_argument('--record-camera', action='store_true',
                      help='also record the camera frames (`loom record --camera`, about 8 MB/s) '
                           'so that recording.mcap replays into a fresh system (docs/replay.md)')
    demo.add_argument('--trace', action='store_true',
                      help='record OpenTelemetry spans of every hop in <output>/trace.jsonl '
                           '(sample ratio 1: slower, about 5 ms more per camera frame here) for '
                           'bench/face_flow_stages.py; off by default, as a robot runs')
    demo.add_argument('--view', action='store_true',
                      help='also run the live visual view (`loom view`, Rerun web viewer) and '
                           'print the URL to open')
    demo.set_defaults(run=run_demo)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _params(source: str, out: Path, trace: bool = False) -> Path:
    """The params file with every file the system writes moved under the output folder;
    `trace`: spans of every hop to <out>/trace.jsonl (else the params file's own tracing)."""
    data = yaml.safe_load(Path(source).read_text(encoding='utf-8'))

    def section(name):   # sections are keyed /**/<node> (any namespace)
        key = name if name == '/**' else f'/**/{name}'
        return data.setdefault(key, {}).setdefault('ros__parameters', {})
    section('/**').setdefault('storage', {})['root'] = str(out)   # every path derives from it
    if trace:
        tracing = section('/**').setdefault('telemetry', {}).setdefault('tracing', {})
        tracing.update(exporter='file', file=str(out / 'trace.jsonl'))
    path = out / 'demo_params.yaml'
    path.write_text(yaml.safe_dump(data), encoding='utf-8')
    return path


def _spawn(name: str, cmd: list[str], env: dict, log: Path | None = None) -> Process:
    """A child that dies with the demo, even a SIGKILLed one (a demo killed by a timeout left
    its bring-up running for good): SIGTERM, so bring-up still stops its nodes cleanly."""
    if log is None:
        return Process(cmd, name=name, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, bufsize=1).start()
    with open(log, 'w') as stream:
        return Process(cmd, name=name, env=env, stdout=stream, stderr=subprocess.STDOUT).start()


def _lines(proc: Process) -> queue.Queue:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l.rstrip('\n')) for l in proc.popen.stdout],
                     daemon=True).start()
    return lines


def _stop(procs: dict[str, Process]) -> dict[str, int | None]:
    """SIGINT to all at once, then each gets up to a minute before SIGKILL; bring-up as long as
    it may take to stop its nodes (STOP_BOUND_S), so none is killed before it committed. The
    minutes run from the SIGINT, together (as stop_together's deadline): the whole stop takes
    at most the longest of them, not their sum."""
    for proc in procs.values():
        if proc.running:
            proc.send_signal(signal.SIGINT)
    sent = time.monotonic()

    def left(name: str) -> float:
        limit = max(60.0, STOP_BOUND_S) if name == 'bringup' else 60.0
        return max(0.0, sent + limit - time.monotonic())
    return {name: proc.stop(timeout_s=left(name)) for name, proc in procs.items()}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


class FaceLatency:
    """Camera-to-emoji samples, split at the moment bring-up said every node and agent is
    active: the run's latency is the running system's, as the event monitor's reports are. Frames
    captured before it met the rest of bring-up (the voice host loading its models, the cloud
    link's handshake) on the same cores, and the face agent's first routes going to the
    router/route service while it still learns the router's policy (up to 0.9 s); they are
    counted and reported apart, not dropped. `ready_ms` is wall-clock ms, as the frames' stamps."""

    def __init__(self):
        self.ready_ms: float | None = None
        self.running: list[float] = []
        self.running_frames: list[int] = []   # the running samples' frame stamps
        self.startup: list[float] = []

    @property
    def total(self) -> int:
        return len(self.running) + len(self.startup)

    def mark_ready(self, now_ms: float) -> None:
        if self.ready_ms is None:
            self.ready_ms = now_ms

    def add(self, frame_ms: int, now_ms: float) -> None:
        if self.ready_ms is not None and frame_ms >= self.ready_ms:
            self.running.append(now_ms - frame_ms)
            self.running_frames.append(frame_ms)
        else:
            self.startup.append(now_ms - frame_ms)

    def snapshot(self, samples: bool = False) -> dict:
        """P50/P99/max of the running samples and the start-up's count and max; `samples`
        (summary.json): every running sample (ms, arrival order) and when its frame was captured
        (s after `ready_ms`), so runs can be pooled (a run's P99 over 150-200 updates is its
        second-worst frame) and slow frames placed in time."""
        out = {'updates': len(self.running), 'p50': _pct(self.running, 0.5),
               'p99': _pct(self.running, 0.99), 'max': _pct(self.running, 1.0),
               'during_bringup': {'updates': len(self.startup), 'max': _pct(self.startup, 1.0)}}
        if samples:
            out.update(samples_ms=[round(v, 1) for v in self.running],
                       sample_frames_s=[round((f - self.ready_ms) / 1000.0, 3)
                                        for f in self.running_frames],
                       ready_ms=self.ready_ms)   # wall clock, as the frames' stamps
        return out


MAX_UI_STATE_CHARS = 64 * 1024   # a UI state longer than this is not parsed
FRAMES_REMEMBERED = 4096          # frame stamps seen (a repeated UI state is counted once)


def ui_face(data: str) -> tuple[str, int] | None:
    """('<emoji> <label>', frame_ms) of a UI state that shows a face for a camera frame; None
    for anything else. The UI topic is anyone's to publish on: a state that is not a bounded
    JSON object, or whose frame stamp is not a whole positive number of ms that a float holds
    exactly (JSON also says Infinity, NaN, 1e308 and "12"), is no latency sample."""
    if not isinstance(data, str) or len(data) > MAX_UI_STATE_CHARS:
        return None
    try:
        state = json.loads(data)
    except (ValueError, RecursionError):   # not JSON, or nested too deep for the parser
        return None
    if not isinstance(state, dict):
        return None
    emoji, label, frame = state.get('emoji'), state.get('label', ''), frame_stamp_ms(state)
    if not emoji or not isinstance(emoji, str) or not isinstance(label, str) or frame is None:
        return None
    return f'{emoji[:16]} {label[:64]}', frame


class Watcher:
    """The demo's own node: routes with reasons, the UI, the voice agent, plugin health."""

    def __init__(self):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.node import Node
        from rclpy.task import Future
        from std_msgs.msg import String

        from loom_msgs.msg import AgentStatus, BusStats, RouteDecision
        from loom_ros.bus import topics
        from loom_ros.bus.bus import STATS_TOPIC, create_bus
        from loom_ros.bus.executor import make_executor, spin_until
        from loom_ros.bus.qos import to_qos_profile
        self.node = Node('loom_demo')
        self.bus = create_bus(self.node, 'loom_demo')
        self.lock = threading.Lock()
        self.routes: Counter = Counter()
        self.reasons: dict[str, str] = {}
        self.face_ms = FaceLatency()
        self.emojis: Counter = Counter()
        self.last_emoji = ''
        self._frames_seen: collections.OrderedDict = collections.OrderedDict()
        # The face agent's own counts (AgentStatus on loom/agents/status): frames it handled
        # (with or without a face in view: an empty scene sends no emoji) and dropped.
        self.frames_handled = 0
        self.frames_dropped = 0
        self.face_errors = 0
        self.frames_sent: dict[str, int] = {}       # node -> camera.front events published
        self.frames_received: dict[str, tuple[int, int]] = {}   # node -> (received, lost)
        self.feedback_ms: list[float] = []
        self.answer_ms: list[float] = []
        self.intents: Counter = Counter()
        self.answers: list[dict] = []
        self.transcripts: list[str] = []
        self.plugins: dict[str, str] = {}
        self._speech_end: dict[str, float] = {}   # utterance text -> when its speech ended
        self._answered: set = set()
        self.node.create_subscription(RouteDecision, topics.ROUTER_DECISIONS, self._on_route,
                                      to_qos_profile('batched'))
        self.node.create_subscription(String, 'loom/ui/state', self._on_ui,
                                      to_qos_profile('batched'))
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 10)
        self.node.create_subscription(BusStats, STATS_TOPIC, self._on_stats,
                                      to_qos_profile('realtime'))
        self.node.create_subscription(AgentStatus, topics.AGENTS_STATUS, self._on_agent,
                                      to_qos_profile('background'))
        self.bus.subscribe('mic.primary', self._on_mic)
        self.bus.subscribe('agent.voice.action', self._on_voice_action)
        self.bus.subscribe('agent.voice.intent', self._on_voice_intent)
        self._stop = Future()
        self._executor = make_executor()
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=spin_until, args=(self._executor, self._stop),
                                        daemon=True)
        self._thread.start()

    def _on_route(self, msg) -> None:
        with self.lock:
            self.routes[msg.route] += 1
            self.reasons[f'{msg.agent_id or "?"} -> {msg.route}'] = f'{msg.rule}: {msg.reason}'

    def _on_ui(self, msg) -> None:
        now = time.time() * 1000.0
        face = ui_face(msg.data)
        if face is None:
            return
        shown, frame = face
        with self.lock:
            if frame in self._frames_seen:
                return
            self._frames_seen[frame] = None
            if len(self._frames_seen) > FRAMES_REMEMBERED:
                self._frames_seen.popitem(last=False)
            self.face_ms.add(frame, now)
            self.emojis[shown] += 1
            self.last_emoji = shown
        if tracing.ENABLED:
            # the end of the path the trace covers: bench/face_flow_stages.py pairs it with
            # the frame's stamp (the camera adapter's PublishEvent)
            with tracing.span('UiStateSeen', attributes={'loom.frame_ms': frame}):
                pass

    def _on_stats(self, msg) -> None:
        """camera.front events each node published, and what subscribers to it got and lost."""
        sent = dict(zip(msg.published_topics, msg.published_counts)).get(CAMERA_TOPIC)
        got = [(s.received, s.lost) for s in msg.subscriptions if CAMERA_TOPIC in s.topics]
        with self.lock:
            if sent is not None:
                self.frames_sent[msg.node] = int(sent)
            if got:
                self.frames_received[msg.node] = (sum(g[0] for g in got), sum(g[1] for g in got))

    def _on_agent(self, msg) -> None:
        if msg.agent_id == FACE_AGENT:
            with self.lock:
                self.frames_handled = int(msg.handled)
                self.frames_dropped = int(msg.mailbox_dropped)
                self.face_errors = int(msg.behavior_errors)

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.name.endswith(': plugins'):
                with self.lock:
                    self.plugins = {kv.key: kv.value for kv in status.values}

    def _on_mic(self, event, _topic) -> None:
        end = event.metadata.get('speech_end_ms')
        if end:
            with self.lock:
                self._speech_end[event.metadata.get('utterance', '')] = float(end)

    def _on_voice_action(self, event, _topic) -> None:
        text = event.json().get('text') or ''
        if not text.startswith('heard: '):
            return
        heard = text[len('heard: '):]
        with self.lock:
            self.transcripts.append(heard)
            end = self._speech_end.get(heard)   # paired by what was said (a misheard: unpaired)
            if end is not None and event.timestamp_ms >= end:
                self.feedback_ms.append(event.timestamp_ms - end)

    def _on_voice_intent(self, event, _topic) -> None:
        data = event.json()
        with self.lock:
            if event.type == 'answer.spoken':
                self.answers.append(data)
                end = self._speech_end.get(data.get('heard', ''))
                if end is not None and data['spoken_at_ms'] >= end:
                    self.answer_ms.append(data['spoken_at_ms'] - end)
            else:
                self.intents[event.type] += 1

    def snapshot(self, samples: bool = False) -> dict:
        """What the status line and the summary show; `samples`: every camera-to-emoji sample
        too (the summary's, for summary.json)."""
        with self.lock:
            face = self.face_ms.snapshot(samples)
            return {
                'routes': dict(self.routes), 'route_reasons': dict(self.reasons),
                'face': {'emojis': dict(self.emojis), 'updates': self.face_ms.total,
                         'camera_to_emoji_ms': face},
                'voice': {'transcripts': list(self.transcripts), 'intents': dict(self.intents),
                          'answers': [{k: a[k] for k in ('text', 'path', 'intent', 'heard')}
                                      for a in self.answers],
                          'first_feedback_ms': [round(v, 1) for v in self.feedback_ms],
                          'spoken_answer_ms': [round(v, 1) for v in self.answer_ms]},
                'camera': self._camera(),
                'plugins': dict(self.plugins), 'last_emoji': self.last_emoji,
            }

    def _camera(self) -> dict:
        """Frames sent into Loom and handled by the face flow (call with the lock held). The
        face agents are the non-demo subscribers of camera.front (the demo's monitors are not).

        Frames sent while the face agent was still starting were never its to handle, so "once
        it was up" is two ratios, each from one report: of the frames sent while the agent was
        subscribed, how many the bus delivered (received and lost, from its bus stats), and of
        those it was given, how many it handled (handled and dropped, from its AgentStatus).
        Sent against handled would compare two processes' reports taken up to a second apart."""
        sent = sum(self.frames_sent.values())
        agents = {n: v for n, v in self.frames_received.items() if 'agent' in n.rsplit('/', 1)[-1]}
        received = sum(v[0] for v in agents.values())
        lost = sum(v[1] for v in agents.values())
        given = self.frames_handled + self.frames_dropped
        return {'frames_sent': sent, 'frames_received_by_agents': received,
                'frames_lost_before_agents': lost,
                'frames_handled': self.frames_handled,
                'frames_dropped_by_face_agent': self.frames_dropped,
                'face_errors': self.face_errors,
                'delivered_ratio': _ratio(received, received + lost),
                'handled_ratio': _ratio(self.frames_handled, given),
                'note': 'sent and received as of the last loom/bus/stats (1 s period); handled '
                        'and dropped as of the face agent\'s last AgentStatus'}

    def mark_ready(self) -> None:
        """Bring-up is ready: camera-to-emoji from here on is the run's (FaceLatency)."""
        with self.lock:
            self.face_ms.mark_ready(time.time() * 1000.0)

    def close(self) -> None:
        self._stop.set_result(True)
        self._thread.join(2.0)
        self._executor.shutdown()
        self.bus.destroy()
        self.node.destroy_node()


def run_demo(args) -> int:
    import rclpy
    from rclpy.signals import SignalHandlerOptions
    out = Path(args.output).resolve()
    (out / 'logs').mkdir(parents=True, exist_ok=True)
    for stale in ('trace.jsonl', 'recording.mcap', 'answer.wav'):
        (out / stale).unlink(missing_ok=True)
    trace = bool(getattr(args, 'trace', False))
    params = _params(args.params_file or str(config_dir() / DEFAULTS_FILE), out, trace=trace)
    env = dict(os.environ)
    env.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    env.update(fastdds_environment(env, config_dir()))   # the monitor and recorder take frames
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    port = _free_port()
    print(f'Loom demo: both seed flows on simulated sensors for {args.duration:.0f} s '
          f'(ROS_DOMAIN_ID={env.get("ROS_DOMAIN_ID", "0")}, Zenoh '
          f'{"INSECURE plain TCP" if args.insecure else "mutual TLS"} on 127.0.0.1:{port}, '
          f'output {out})', flush=True)
    procs = {
        'bringup': _spawn('bringup', [
            sys.executable, '-m', 'loom_ros.cli', 'bringup', '--config', str(params),
            '--zenoh-port', str(port),
            '--log-dir', str(out / 'logs'), '--keys-dir', args.keys_dir or str(out / 'keys'),
            *(['--insecure'] if args.insecure else [])], env, out / 'logs' / 'bringup.log'),
        'event_monitor': _spawn('event_monitor', [
            *entry.command('loom_ros.bus.event_monitor_node'), '--ros-args', '--params-file',
            str(params),
            '-p', 'event_monitor:json_output:=true'], env),
        'record': _spawn('record', [
            # --root: the demo's consent registry decides what the recording may keep
            *entry.command('loom_ros.cli.record'), '--output', str(out / 'recording.mcap'),
            '--root', str(out), *(['--camera'] if getattr(args, 'record_camera', False)
                                  else [])], env,
            out / 'logs' / 'record.log'),
    }
    if getattr(args, 'view', False):
        procs['view'] = _start_view(env, out)
    rclpy.init(args=['loom_demo', '--ros-args', '--params-file', str(params)],
               signal_handler_options=SignalHandlerOptions.NO)
    watcher = Watcher()
    lines = _lines(procs['event_monitor'])
    reports: list[dict] = []
    interactive = sys.stdout.isatty()
    stop = stop_event()   # Ctrl-C / SIGTERM: stop everything, summarize, exit 130
    started = time.monotonic()
    try:
        # The duration counts from bring-up's ready line (every node and agent active): on a
        # loaded 2-core machine bring-up alone can take most of 30 s.
        started = _wait_ready(procs, out / 'logs' / 'bringup.log', lines, interactive, stop)
        watcher.mark_ready()
        while time.monotonic() - started < args.duration and not stop.is_set():
            if any(p.poll() is not None for p in procs.values()):
                break
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if not line.startswith('{'):
                continue
            report = json.loads(line)
            reports.append(report)
            snap = watcher.snapshot()
            _show(report, snap, time.monotonic() - started, args.duration, interactive)
            if args.stop_after_events and \
                    sum(report['received'].values()) >= args.stop_after_events and \
                    snap['face']['updates'] and snap['voice']['answers']:
                break
    finally:
        snap = watcher.snapshot(samples=True)
        codes = _stop(procs)
        watcher.close()
        rclpy.try_shutdown()
    if interactive:
        print()
    summary = _summary(reports, snap, time.monotonic() - started, codes, out, trace=trace)
    (out / 'summary.json').write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    _print_summary(summary, out)
    failed = {n: c for n, c in codes.items() if c not in (0, -signal.SIGINT)}
    short = args.stop_after_events and summary['events_total'] < args.stop_after_events
    if failed or not reports or short:
        print(f'demo failed: exit codes {codes}; see {out / "logs"}', file=sys.stderr)
        log = (out / 'logs' / 'bringup.log')
        for line in (log.read_text(errors='replace').splitlines() if log.exists() else [])[-20:]:
            print(f'  {line}', file=sys.stderr)
        return 1
    return 130 if stop.is_set() else 0


def _start_view(env: dict, out: Path) -> Process:
    """`loom view` beside the demo (config/view.yaml's ports when free); prints the URL."""
    from loom_ros.view.settings import choose_port, load_settings, viewer_url
    settings = load_settings()
    web = choose_port(settings.web_port)
    grpc = choose_port(settings.grpc_port, avoid=(web,))
    proc = _spawn('view', [sys.executable, '-m', 'loom_ros.cli', 'view', '--web-port', str(web),
                           '--grpc-port', str(grpc)], env, out / 'logs' / 'view.log')
    print(f'Live view (Rerun): open {viewer_url(web, grpc)}', flush=True)
    return proc


def _wait_ready(procs: dict[str, Process], log: Path, lines: queue.Queue,
                interactive: bool, stop: threading.Event) -> float:
    """When bring-up printed its ready line (its stdout goes to `log`), showing progress while
    it starts; the moment anything exits instead. Bring-up itself gives up (exit 1) after its
    --ready-timeout. Returns at once when `stop` is set."""
    began, offset, last, shown = time.monotonic(), 0, '', 0.0
    while all(p.poll() is None for p in procs.values()) and not stop.is_set():
        try:
            with open(log, 'rb') as stream:
                stream.seek(offset)
                chunk = stream.read(1 << 20)
        except OSError:
            chunk = b''
        complete = chunk[:chunk.rfind(b'\n') + 1]
        offset += len(complete)
        for raw in complete.decode(errors='replace').splitlines():
            if raw.startswith('{') and '"ready": true' in raw:
                print(f'\rbring-up ready after {time.monotonic() - began:.1f} s' +
                      ' ' * 40, flush=True)
                return time.monotonic()
            if 'is active' in raw or 'activate done' in raw or 'configured' in raw:
                last = raw.split(']: ', 1)[-1][:70]
        while not lines.empty():   # the monitor's reports before ready are not the run's
            lines.get_nowait()
        now = time.monotonic()
        if now - shown >= 1.0:
            shown = now
            text = f'[bring-up {now - began:5.1f} s] {last}'
            print(f'\r{text:<100}' if interactive else text, end='' if interactive else '\n',
                  flush=True)
        stop.wait(0.2)
    return time.monotonic()


def _show(report: dict, snap: dict, elapsed: float, duration: float, interactive: bool) -> None:
    face = snap['face']['camera_to_emoji_ms']
    voice = snap['voice']
    routes = ' '.join(f'{k} {v}' for k, v in sorted(snap['routes'].items())) or '-'
    health = Counter(v.split(':')[0] for v in snap['plugins'].values())
    line = (f'[{elapsed:5.1f}/{duration:.0f} s] {report["total_rate"]:.0f} ev/s | face '
            f'{snap["last_emoji"] or "-"} p50 {face["p50"]} ms | routes {routes} | voice '
            f'feedback {voice["first_feedback_ms"][-1:] or "-"} answer '
            f'{voice["spoken_answer_ms"][-1:] or "-"} ms | plugins '
            f'{" ".join(f"{k} {v}" for k, v in health.items()) or "-"}')
    print(f'\r{line:<150}' if interactive else line, end='' if interactive else '\n', flush=True)


def _summary(reports: list[dict], snap: dict, elapsed: float, codes: dict, out: Path,
             trace: bool = False) -> dict:
    last = reports[-1] if reports else {'received': {}, 'rejected': {}}
    artifacts = {}
    answers = snap['voice']['answers']
    if answers and Path(answers[-1]['path']).is_file():
        shutil.copyfile(answers[-1]['path'], out / 'answer.wav')
    for name in ('answer.wav', 'recording.mcap', 'trace.jsonl'):
        if (out / name).is_file():
            artifacts[name] = str(out / name)
    return {
        'duration_s': round(elapsed, 1),
        'events_received': last['received'],
        'events_total': sum(last['received'].values()),
        # the event monitor's per-second rates while the demo ran (its cumulative count also
        # holds what it heard during bring-up, before `elapsed` starts: mean came out > peak)
        'mean_rate': round(sum(r['total_rate'] for r in reports) / len(reports), 1)
        if reports else 0.0,
        'peak_rate': max((r['total_rate'] for r in reports), default=0.0),
        'rejected': last['rejected'],
        **snap,
        'artifacts': artifacts,
        'exit_codes': codes,
        # what the latencies above were measured with: tracing at ratio 1 costs every hop
        'tracing': 'on: every hop in trace.jsonl (its cost is in the latencies)' if trace else
        'as the params file says (config/loom.yaml: off, as a robot runs); --trace records '
        'every hop',
    }


def _ratio(part: int, whole: int) -> float | None:
    """part / whole to 4 places, never rounded up to 1 when something is missing."""
    if whole <= 0:
        return None
    return 1.0 if part >= whole else min(round(part / whole, 4), 0.9999)


def _percent(ratio: float) -> str:
    """A ratio of at most 1 as a percentage that says 100% only when nothing was missed."""
    return '100%' if ratio >= 1 else f'{min(99.9, 100 * ratio):.1f}%'


def face_line(face: dict) -> str:
    """The summary's Flow 1 line: the percentiles say which updates they count (those since
    bring-up was ready), whether or not any came before."""
    lat = face['camera_to_emoji_ms']
    early = lat.get('during_bringup') or {}
    return (f'  Flow 1 (face emotion): {face["updates"]} emoji updates {face["emojis"]}; '
            f'camera-to-emoji P50 {lat["p50"]} ms, P99 {lat["p99"]} ms, max {lat["max"]} ms '
            f'over the {lat["updates"]} since bring-up was ready'
            + (f' ({early["updates"]} during bring-up: max {early["max"]} ms)'
               if early.get('updates') else ''))


def _print_summary(s: dict, out: Path) -> None:
    print('\nLoom demo summary')
    print(f'  ran {s["duration_s"]} s; {s["events_total"]} events received across processes '
          f'(mean {s["mean_rate"]} ev/s, peak {s["peak_rate"]} ev/s); rejected '
          f'{sum(s["rejected"].values())}')
    print(face_line(s['face']))
    v = s['voice']
    print(f'  Flow 2 (voice assistant): heard {v["transcripts"]}; intents {v["intents"]}; '
          f'first feedback {v["first_feedback_ms"]} ms, spoken answer {v["spoken_answer_ms"]} '
          f'ms after the speaker stopped')
    for answer in v['answers'][-1:]:
        print(f'    answer: "{answer["text"]}"')
    cam = s['camera']
    print(f'  Camera frames: {cam["frames_sent"]} sent into Loom, {cam["frames_received_by_agents"]} '
          f'received by the face agent ({cam["frames_lost_before_agents"]} lost), '
          f'{cam["frames_handled"]} handled by the face flow '
          f'({cam["frames_dropped_by_face_agent"]} dropped, {cam["face_errors"]} errors)'
          + (f'; once it was up, the bus delivered {_percent(cam["delivered_ratio"])} of the '
             f'frames to it and it handled {_percent(cam["handled_ratio"])} of those'
             if cam['delivered_ratio'] is not None and cam['handled_ratio'] is not None
             else ''))
    print(f'  routes {s["routes"]}')
    for who, reason in sorted(s['route_reasons'].items()):
        print(f'    {who}: {reason}')
    print(f'  plugins: {s["plugins"] or "no health report"}')
    print(f'  tracing: {s["tracing"]}')
    for name, path in s['artifacts'].items():
        print(f'  {name}: {path}')
    print(f'  summary written to {out / "summary.json"}')
